"""A small synthetic single-particle data set, and a PNG montage of 2D class averages.

* :func:`test_volume`: a 64^3 asymmetric "molecule" (a few Gaussian domains of different
  sizes), written as an MRC file.
* :func:`project_particles`: RELION's own ``relion_project`` projects it at uniformly random
  orientations (drawn here, from a seed) and adds white Gaussian noise: a stack of particles
  and its STAR file.
* :func:`micrographs_from_particles`: a few micrographs made of those particles on a noisy
  background with CTF-like rings, for the power-spectra protocol.
* :func:`write_montage`: the class averages side by side, each with its particle count, as a
  PNG (Pillow when importable, else a grey-level PNG written with zlib).

Everything derives from a seed: the same call writes the same files.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from typing import List, Optional, Sequence

import numpy as np

#: (centre x, y, z in px from the box centre, sigma in px, amplitude): an asymmetric shape
DOMAINS = ((0, 0, 0, 7.0, 1.0), (11, 4, -3, 4.0, 0.9), (-6, 13, 5, 5.0, 0.9),
           (3, -13, 8, 3.5, 0.8), (-11, -5, -9, 4.5, 0.7), (8, -4, 13, 3.0, 0.8))


def test_volume(path: str, size: int = 64, angpix: float = 3.0) -> str:
    """Write the test volume (float32, ``size``^3, ``angpix`` Å/px) to *path*."""
    import mrcfile
    z, y, x = (np.mgrid[:size, :size, :size] - size / 2).astype(np.float32)
    vol = np.zeros((size, size, size), np.float32)
    for cx, cy, cz, sigma, amp in DOMAINS:
        vol += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma ** 2))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = angpix
    return path


def random_orientations(path: str, n: int, angpix: float, size: int, seed: int = 1) -> str:
    """A RELION 3.1 particle STAR file of *n* orientations drawn uniformly over the sphere
    (rot, psi uniform; cos(tilt) uniform) from *seed*, for ``relion_project --ang``."""
    rng = np.random.default_rng(seed)
    rot, psi = rng.uniform(0, 360, n), rng.uniform(0, 360, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    with open(path, "w") as f:
        f.write("\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n"
                "_rlnOpticsGroupName #2\n_rlnImagePixelSize #3\n_rlnImageSize #4\n"
                "_rlnImageDimensionality #5\n_rlnVoltage #6\n_rlnSphericalAberration #7\n"
                "1 optics1 %.6f %d 2 300.0 2.7\n\n" % (angpix, size))
        f.write("# version 30001\n\ndata_particles\n\nloop_\n_rlnAngleRot #1\n"
                "_rlnAngleTilt #2\n_rlnAnglePsi #3\n_rlnOpticsGroup #4\n")
        for a in zip(rot, tilt, psi):
            f.write("%.4f %.4f %.4f 1\n" % a)
    return path


def project_particles(volume: str, out_root: str, n: int, angpix: float = 3.0,
                      noise: float = 4.0, env: Optional[dict] = None, seed: int = 1,
                      program: str = "relion_project") -> str:
    """Project *volume* with ``relion_project`` at *n* orientations drawn uniformly from
    *seed* and add white noise of standard deviation *noise*; returns the stack
    ``<out_root>.mrcs`` (its orientations are in ``<out_root>.star``). The same arguments
    write the same bytes (``--nr_uniform`` would draw the orientations from the clock).

    Raises:
        FileNotFoundError: ``relion_project`` is not installed (``apt-get install relion``).
        RuntimeError: it failed; the message holds its output.
    """
    exe = shutil.which(program, path=(env or os.environ).get("PATH"))
    if exe is None:
        raise FileNotFoundError("%s not found: install RELION (apt-get install relion; "
                                "scripts/setup.sh does)" % program)
    folder, name = os.path.split(os.path.abspath(out_root))
    os.makedirs(folder, exist_ok=True)
    import mrcfile
    with mrcfile.open(volume, header_only=True) as m:
        size = int(m.header.nx)
    angles = random_orientations(os.path.join(folder, name + "_angles.star"), n, angpix, size,
                                 seed)
    r = subprocess.run([exe, "--i", os.path.abspath(volume), "--o", name,
                        "--ang", os.path.basename(angles), "--add_noise",
                        "--white_noise", str(noise), "--angpix", str(angpix)], cwd=folder, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stack = os.path.join(folder, name + ".mrcs")
    if r.returncode != 0 or not os.path.exists(stack):
        raise RuntimeError("relion_project failed (exit %d):\n%s" % (r.returncode, r.stdout[-2000:]))
    return stack


def micrographs_from_particles(stack: str, folder: str, n: int = 4, size: int = 512,
                               per_micrograph: int = 20, angpix: float = 3.0,
                               seed: int = 7) -> List[str]:
    """Write *n* micrographs ``mic_000.mrc``... of *size* px: particles of *stack* pasted at
    random places on a noisy background, filtered with CTF-like rings (1-3 um defocus)."""
    import mrcfile
    with mrcfile.open(stack, permissive=True) as m:
        parts = np.asarray(m.data, dtype=np.float64)
    box = parts.shape[-1]
    os.makedirs(folder, exist_ok=True)
    fy = np.fft.fftfreq(size, d=angpix)[:, None]
    fx = np.fft.rfftfreq(size, d=angpix)[None, :]
    s2 = fy * fy + fx * fx
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        image = rng.normal(0.0, 1.0, (size, size))
        for _ in range(per_micrograph):
            y, x = rng.integers(0, size - box, 2)
            image[y:y + box, x:x + box] += parts[rng.integers(len(parts))] * 0.5
        defocus = rng.uniform(10000.0, 30000.0)  # Å
        ctf = -np.sin(np.pi * 0.0197 * defocus * s2 + np.arcsin(0.1)) * np.exp(-40.0 * s2)
        mic = np.fft.irfft2(np.fft.rfft2(image) * (0.3 + ctf), s=(size, size))
        path = os.path.join(folder, "mic_%03d.mrc" % i)
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(mic.astype(np.float32))
            m.voxel_size = angpix
        paths.append(path)
    return paths


# ---- the montage ------------------------------------------------------------------------

def _to_bytes(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, (1, 99.5))
    return (np.clip((img - lo) / ((hi - lo) or 1.0), 0, 1) * 255).astype(np.uint8)


def montage_array(images: np.ndarray, zoom: int = 2, gap: int = 4,
                  columns: Optional[int] = None) -> np.ndarray:
    """Images (K, Y, X) side by side in a grid, each scaled to 0-255 alone, as uint8."""
    k, ny, nx = images.shape
    cols = columns or min(k, 8)
    rows = (k + cols - 1) // cols
    h, w = ny * zoom, nx * zoom
    out = np.zeros((rows * (h + gap) + gap, cols * (w + gap) + gap), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        tile = np.kron(_to_bytes(img), np.ones((zoom, zoom), np.uint8))
        out[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = tile
    return out


def write_png_gray(path: str, pixels: np.ndarray) -> None:
    """An 8-bit grey-level PNG written with zlib alone (no image library needed)."""
    pixels = np.ascontiguousarray(pixels, np.uint8)
    h, w = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))  # filter 0 on each row
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_montage(path: str, images: np.ndarray, labels: Sequence[str] = (), zoom: int = 2,
                  title: str = "") -> str:
    """Write the montage of *images* (K, Y, X) to *path* (PNG), each tile captioned with its
    label when Pillow is available; returns the image library used ("Pillow" or "zlib")."""
    grid = montage_array(images, zoom=zoom)
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        write_png_gray(path, grid)
        return "zlib"
    k, ny, nx = images.shape
    cols = min(k, 8)
    gap, w, h = 4, nx * zoom, ny * zoom
    top, caption = (18 if title else 0), (14 if labels else 0)
    rows = (k + cols - 1) // cols
    canvas = Image.new("L", (grid.shape[1], top + rows * (h + gap + caption) + gap), 0)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 3), title, fill=255)
    for i in range(k):
        r, c = divmod(i, cols)
        x0 = gap + c * (w + gap)
        y0 = top + gap + r * (h + gap + caption)
        tile = grid[gap + r * (h + gap):gap + r * (h + gap) + h, x0:x0 + w]
        canvas.paste(Image.fromarray(tile), (x0, y0))
        if labels:
            draw.text((x0 + 2, y0 + h + 1), labels[i], fill=255)
    canvas.save(path)
    return "Pillow"
