"""Power spectrum and Fourier-cropped copy of one micrograph.

Usage::

    python -m scipion_cloudexec.programs.powerspectrum \\
        --input MIC.mrc --psd OUT_psd.mrc --down OUT_down.mrc --factor 2 --box 256 \\
        [--angpix 1.0]

The PSD is the average periodogram of half-overlapping ``box`` tiles,
fftshifted and log-scaled (``log(1 + P)``), float32, with the micrograph's
voxel size. The downsampled micrograph is Fourier-cropped by ``factor`` and
its voxel size is the input's times ``factor``. Both outputs are
deterministic for a given input.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import fourier_crop, log_spectrum, periodogram_sum, read_mrc, write_mrc


def compute(input_path: str, psd_path: str, down_path: str, factor: int, box: int,
            angpix: Optional[float] = None) -> dict:
    """Write the PSD and the downsampled micrograph; return a small summary.

    ``angpix`` (Å/px) overrides the voxel size in the input's header: Scipion's
    sampling rate is the reference, headers are often wrong.
    """
    image, voxel = read_mrc(input_path)
    voxel = voxel if angpix is None else angpix
    acc, tiles = periodogram_sum(image, box)
    write_mrc(psd_path, log_spectrum(acc / tiles), voxel)
    down = fourier_crop(image, factor)
    write_mrc(down_path, down, voxel * factor)
    return {"tiles": tiles, "box": box, "down_shape": down.shape, "voxel": voxel}


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="scipion_cloudexec.programs.powerspectrum",
                                description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="input micrograph (MRC)")
    p.add_argument("--psd", required=True, help="output power spectrum (MRC)")
    p.add_argument("--down", required=True, help="output downsampled micrograph (MRC)")
    p.add_argument("--factor", type=int, default=2, help="downsampling factor (>= 1)")
    p.add_argument("--box", type=int, default=256, help="power spectrum tile size (even)")
    p.add_argument("--angpix", type=float, default=None,
                   help="input sampling rate in A/px (default: from the MRC header)")
    a = p.parse_args(argv)
    if a.factor < 1 or a.box < 8 or a.box % 2:
        p.error("--factor must be >= 1 and --box an even number >= 8")
    info = compute(a.input, a.psd, a.down, a.factor, a.box, a.angpix)
    print("%s: %d tiles of %d px, downsampled to %dx%d at %.4f A/px"
          % (a.input, info["tiles"], info["box"], info["down_shape"][1],
             info["down_shape"][0], info["voxel"] * a.factor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
