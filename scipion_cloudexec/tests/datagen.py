"""Synthetic, cryo-EM-like micrographs for tests and benchmarks.

Each micrograph is Gaussian noise plus a few Gaussian "particles", filtered by
a CTF-like oscillation (Thon rings), float32, written as a real MRC file with
mrcfile. Everything derives from ``seed``, so the same call writes the same
bytes on every machine.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

#: Voxel size written into the synthetic micrographs, in Å.
VOXEL_SIZE = 1.0


def make_micrograph(shape: Tuple[int, int], rng: np.random.Generator,
                    voxel_size: float = VOXEL_SIZE) -> np.ndarray:
    """One synthetic micrograph as a float32 array of ``shape`` (rows, columns)."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    signal = np.zeros(shape, dtype=np.float64)
    # A few blobs of particle size (radius 6-14 px), randomly placed.
    for _ in range(int(rng.integers(3, 9))):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        sigma = rng.uniform(6.0, 14.0)
        signal += rng.uniform(1.0, 3.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)
                                                 / (2.0 * sigma * sigma))
    image = signal + rng.normal(0.0, 1.0, size=shape)
    # CTF-like ring modulation: sin(pi * lambda * defocus * s^2) with some
    # amplitude contrast, a defocus picked per micrograph (1-3 um at 300 kV).
    wavelength = 0.0197  # Å, 300 kV electrons
    defocus = rng.uniform(10000.0, 30000.0)  # Å
    fy = np.fft.fftfreq(ny, d=voxel_size)[:, None]
    fx = np.fft.rfftfreq(nx, d=voxel_size)[None, :]
    s2 = fy * fy + fx * fx
    ctf = -np.sin(np.pi * wavelength * defocus * s2 + np.arcsin(0.1))
    envelope = np.exp(-40.0 * s2)  # B-factor-like fall-off
    filtered = np.fft.irfft2(np.fft.rfft2(image) * (0.3 + ctf * envelope), s=shape)
    return (filtered + 0.05 * rng.normal(0.0, 1.0, size=shape)).astype(np.float32)


def write_micrographs(folder: str, n: int, shape: Tuple[int, int] = (512, 512),
                      seed: int = 0, voxel_size: float = VOXEL_SIZE) -> List[str]:
    """Write ``n`` micrographs ``mic_000.mrc``... into ``folder``; return their paths.

    The same ``(n, shape, seed)`` always gives the same files; micrograph ``i``
    does not depend on ``n``.
    """
    import mrcfile

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        path = os.path.join(folder, "mic_%03d.mrc" % i)
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(make_micrograph(shape, rng, voxel_size))
            mrc.voxel_size = voxel_size
            mrc.header.label[0] = b"scipion-cloudexec synthetic micrograph"
            mrc.header.nlabl = 1
        paths.append(path)
    return paths
