"""Average power spectrum of many micrographs, parallel with MPI (mpi4py).

Usage::

    [mpirun -np N] python -m scipion_cloudexec.programs.average_spectrum \\
        --list extra/mics.txt --out extra/average_psd.mrc --box 256 [--angpix 1.0]

``--list`` holds one micrograph path per line. Rank ``r`` of ``N`` computes
the tile periodogram sums of micrographs ``r, r+N, r+2N...``; rank 0 receives
them one by one *in micrograph order* and adds them in float64, so the result
is the same bytes for any number of ranks, including a run without mpirun
(a singleton MPI world of one rank). Rank 0 writes the log-scaled average
spectrum (MRC, float32, fftshifted) and a JSON stats file beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import List, Optional, Tuple

import numpy as np

from . import log_spectrum, periodogram_sum, read_mrc, write_mrc


def read_list(path: str) -> List[str]:
    """Micrograph paths from a list file: one a line, blank lines and # comments skipped."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def micrograph_sums(path: str, box: int) -> Tuple[np.ndarray, int, float]:
    """``(float64 periodogram sum, tile count, header voxel size)`` of one micrograph."""
    image, voxel = read_mrc(path)
    acc, tiles = periodogram_sum(image, box)
    return acc, tiles, voxel


def average(paths: List[str], box: int, comm) -> Optional[dict]:
    """Run the distributed average; rank 0 returns the result, the others None.

    The result holds ``half`` (the float64 mean periodogram on the rfft2 half
    plane), ``tiles`` and ``voxel`` (the first micrograph's voxel size).
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank != 0:
        # Send in the order rank 0 asks for them; the tag is the micrograph index.
        for i in range(rank, len(paths), size):
            comm.send(micrograph_sums(paths[i], box), dest=0, tag=i)
        return None
    total = np.zeros((box, box // 2 + 1), dtype=np.float64)
    tiles, voxel = 0, None
    for i, path in enumerate(paths):
        owner = i % size
        if owner == 0:
            acc, n, v = micrograph_sums(path, box)
        else:
            acc, n, v = comm.recv(source=owner, tag=i)
        # A fixed summation order (micrograph order) makes the float64 sum
        # independent of how the micrographs were spread over the ranks.
        total += acc
        tiles += n
        voxel = v if voxel is None else voxel
    return {"half": total / tiles, "tiles": tiles, "voxel": voxel}


def stats_path(out: str) -> str:
    """The stats file written beside ``out``: ``average_psd.mrc`` -> ``average_psd.json``."""
    return os.path.splitext(out)[0] + ".json"


def write_outputs(out: str, result: dict, n_mics: int, box: int) -> dict:
    """Write the average spectrum MRC and its JSON stats; return the stats."""
    psd = log_spectrum(result["half"])
    write_mrc(out, psd, result["voxel"])
    stats = {
        "micrographs": n_mics,
        "tiles": result["tiles"],
        "box": box,
        "samplingRate": result["voxel"],
        "min": float(psd.min()),
        "max": float(psd.max()),
        "mean": float(psd.astype(np.float64).mean()),
    }
    # Sorted keys and repr floats: the same bytes on every machine.
    with open(stats_path(out), "w") as f:
        json.dump(stats, f, indent=1, sort_keys=True)
        f.write("\n")
    return stats


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit code (rank 0's matters)."""
    p = argparse.ArgumentParser(prog="scipion_cloudexec.programs.average_spectrum",
                                description=__doc__.splitlines()[0])
    p.add_argument("--list", required=True, help="text file with one micrograph path a line")
    p.add_argument("--out", required=True, help="output average spectrum (MRC)")
    p.add_argument("--box", type=int, default=256, help="tile size (even)")
    p.add_argument("--angpix", type=float, default=None,
                   help="sampling rate in A/px (default: the first micrograph's header)")
    a = p.parse_args(argv)
    if a.box < 8 or a.box % 2:
        p.error("--box must be an even number >= 8")

    from mpi4py import MPI  # imported late: --help works without an MPI library
    comm = MPI.COMM_WORLD
    try:
        paths = read_list(a.list)
        if not paths:
            raise ValueError("%s lists no micrograph" % a.list)
        result = average(paths, a.box, comm)
        if result is not None:
            if a.angpix is not None:
                result["voxel"] = a.angpix
            stats = write_outputs(a.out, result, len(paths), a.box)
            print("averaged %d micrographs (%d tiles) on %d MPI rank(s) into %s"
                  % (stats["micrographs"], stats["tiles"], comm.Get_size(), a.out))
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        if comm.Get_size() > 1:
            comm.Abort(1)  # the other ranks would wait forever for this one
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
