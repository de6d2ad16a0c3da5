"""Command-line programs that the plugin's protocols run through ``runJob``.

Each program is a module run as ``python -m scipion_cloudexec.programs.NAME``.
They only use numpy, mrcfile and (for the MPI one) mpi4py, read and write
paths relative to the current directory (the project), and write
byte-for-byte deterministic MRC files: no timestamps, host names or absolute
paths end up inside any output, so a step run on a cluster gives the same
bytes as one run locally.

This module holds the numerics shared by the programs.
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import List, Tuple

import numpy as np

#: The first (and only) MRC header label of every file the programs write.
#: mrcfile would otherwise put the creation time there.
MRC_LABEL = "scipion-cloudexec"

#: The module path prefix of the programs, e.g. ``PROGRAMS + ".powerspectrum"``.
PROGRAMS = __name__


def program_command(module: str, args: List[str]) -> Tuple[str, str]:
    """Return ``(program, arguments)`` for ``Protocol.runJob`` to run a program.

    ``module`` is the short name (``"powerspectrum"``); the program is the
    interpreter running the protocol, which is the one that has this plugin.
    ``runJob`` runs the command through a shell, so each argument is shell
    quoted; Scipion's project-relative paths need no quotes and stay as they are.
    """
    quoted = [shlex.quote(str(a)) for a in args]
    return sys.executable, " ".join(["-m", "%s.%s" % (PROGRAMS, module)] + quoted)


def read_mrc(path: str) -> Tuple[np.ndarray, float]:
    """Read a 2D MRC image as float32 and return ``(data, voxel size in Å)``."""
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
        voxel = float(mrc.voxel_size.x)
    if data.ndim == 3 and data.shape[0] == 1:  # a single-section "volume"
        data = data[0]
    if data.ndim != 2:
        raise ValueError("%s: expected a 2D image, got shape %s" % (path, data.shape))
    return np.ascontiguousarray(data), voxel


def write_mrc(path: str, data: np.ndarray, voxel_size: float) -> None:
    """Write a float32 MRC file deterministically (fixed label, no time stamp).

    The file is written beside its destination and renamed into place, so a
    reader (or a stage-out) never sees a half-written file.
    """
    import mrcfile

    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = path + ".part"
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        mrc.voxel_size = float(voxel_size)
        mrc.header.label[0] = MRC_LABEL.encode("ascii")
        mrc.header.nlabl = 1
    os.replace(tmp, path)


def tile_origins(size: int, box: int) -> List[int]:
    """Origins of half-overlapping ``box`` tiles along an axis of ``size``."""
    if box > size:
        raise ValueError("box %d is larger than the image (%d)" % (box, size))
    step = max(box // 2, 1)
    return list(range(0, size - box + 1, step))


def periodogram_sum(image: np.ndarray, box: int) -> Tuple[np.ndarray, int]:
    """Sum of the tile periodograms of ``image``, on the rfft2 half plane.

    Returns ``(sum, number of tiles)``; the sum is float64 with shape
    ``(box, box // 2 + 1)``. Each tile has its mean removed first so the
    zero frequency does not swamp the spectrum. Tiles are visited in a fixed
    order, so the float64 sum is the same on every run.
    """
    acc = np.zeros((box, box // 2 + 1), dtype=np.float64)
    count = 0
    ys, xs = tile_origins(image.shape[0], box), tile_origins(image.shape[1], box)
    for y in ys:
        for x in xs:
            tile = image[y:y + box, x:x + box].astype(np.float64)
            tile -= tile.mean()
            f = np.fft.rfft2(tile)
            acc += (f.real * f.real + f.imag * f.imag) / float(box * box)
            count += 1
    return acc, count


def full_spectrum(half: np.ndarray) -> np.ndarray:
    """Expand an rfft2 half-plane spectrum to the full, fftshifted plane.

    The missing half is filled from Hermitian symmetry, P(-k) = P(k), so the
    result is exactly centrosymmetric about the centre pixel (box//2, box//2).
    """
    box = half.shape[0]
    h = half.shape[1]
    full = np.empty((box, box), dtype=half.dtype)
    full[:, :h] = half
    rows = (-np.arange(box)) % box
    cols = box - np.arange(h, box)
    full[:, h:] = half[rows][:, cols]
    return np.fft.fftshift(full)


def log_spectrum(mean_half: np.ndarray) -> np.ndarray:
    """The displayed PSD: ``log(1 + P)``, fftshifted, float32, never negative."""
    return np.log1p(full_spectrum(mean_half)).astype(np.float32)


def fourier_crop(image: np.ndarray, factor: int) -> np.ndarray:
    """Downsample by ``factor`` keeping only the low frequencies (no aliasing).

    The output shape is ``(ny // factor, nx // factor)`` rounded down to even
    sizes, and the mean value of the image is preserved.
    """
    if factor < 1:
        raise ValueError("factor must be >= 1")
    ny, nx = image.shape
    oy, ox = (ny // factor) // 2 * 2, (nx // factor) // 2 * 2
    if oy < 2 or ox < 2:
        raise ValueError("image %s is too small for factor %d" % (image.shape, factor))
    if factor == 1 and (oy, ox) == (ny, nx):
        return image.astype(np.float32)
    f = np.fft.rfft2(image.astype(np.float64))
    # Keep rows 0..oy/2-1 and the last oy/2 (negative frequencies), cols 0..ox/2.
    crop = np.concatenate([f[:oy // 2, :ox // 2 + 1], f[ny - oy // 2:, :ox // 2 + 1]])
    out = np.fft.irfft2(crop, s=(oy, ox)) * (oy * ox) / float(ny * nx)
    return out.astype(np.float32)


def relative_to_project(path: str) -> str:
    """``path`` relative to the current directory (a protocol's project) when inside it.

    Input files registered with absolute paths inside the project become
    relative, so the command line is the same wherever the project lives;
    paths outside the project are left as they are.
    """
    if os.path.isabs(path):
        rel = os.path.relpath(path)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return rel
    return path
