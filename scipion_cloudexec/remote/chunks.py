"""Large files in byte ranges, written by several staging servers at once (stdlib only;
shipped with the agent).

A desktop with a long link sends a large file as chunks over several SSH streams (one
staging server each): a single SSH channel is capped by its window, whatever the link.
Layout under the workdir::

    cache/chunks/<sha>.<chunk>        the file being assembled: each chunk pwritten at its
                                      offset, by whichever server got it
    cache/chunks/<sha>.<chunk>.done   one line per chunk written whole (appended with
                                      O_APPEND, so concurrent writers never mix lines)

A chunk is recorded only once all its bytes are written, so a stream cut mid-chunk costs
that chunk only: the next ChunkPlan answers which chunks are there and the desktop sends
the others. Writers hold a shared flock on the file while they write; Publish takes it
exclusively, checks every chunk is recorded, hashes the whole file once and renames it
into the cache (:meth:`.cache.Cache._publish`); a writer that finds the file gone after its
lock drops its bytes. A whole file of another hash is deleted, never published.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
from typing import BinaryIO, List, Optional, Set, Tuple

from .cache import Cache, StageError, _same, _unlink_quiet
from .hashing import BLOCK
from .stage_protocol import Chunk, ChunkPlan, Publish

MIN_CHUNK = 1 << 20


def _paths(cache: Cache, sha: str, chunk: int) -> Tuple[str, str]:
    if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
        raise StageError("%r is not a SHA-256" % sha)
    if chunk < MIN_CHUNK:
        raise StageError("chunk of %d bytes: at least %d" % (chunk, MIN_CHUNK))
    folder = os.path.join(cache.root, "chunks")
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(folder, "%s.%d" % (sha, chunk))
    return data, data + ".done"


def _count(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


def _done(done_path: str, n: int) -> Set[int]:
    try:
        with open(done_path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return set()
    out = set()
    for line in lines[:-1]:  # the last piece has no newline yet: not written whole
        try:
            i = int(line)
        except ValueError:
            continue
        if 0 <= i < n:
            out.add(i)
    return out


def plan(cache: Cache, request: ChunkPlan) -> dict:
    """Which chunks of the file are written already (none when the data file is gone)."""
    sha, size, chunk = request.sha256, int(request.size), int(request.chunk)
    data, done = _paths(cache, sha, chunk)
    if cache._trusted(sha):
        return {"present": True, "have": []}
    if not os.path.exists(data):
        _unlink_quiet(done)  # records of bytes no longer there
        return {"present": False, "have": []}
    return {"present": False, "have": sorted(_done(done, _count(size, chunk)))}


def _open_locked(data: str, how: int, create: bool) -> Optional[int]:
    """An fd on *data* under flock *how*, still named *data*; None when it is gone."""
    for _attempt in range(20):
        try:
            fd = os.open(data, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except (FileNotFoundError, PermissionError):
            return None
        fcntl.flock(fd, how)
        if _same(data, fd):
            return fd
        os.close(fd)  # published or dropped between our open and our lock
        if not create:
            return None
    return None


def receive(cache: Cache, request: Chunk, stream: BinaryIO) -> dict:
    """Write chunk *index* from *stream* at its offset; record it once whole. Always
    consumes the chunk's bytes; raises StageError when the stream ends before."""
    sha, size, chunk, index = (request.sha256, int(request.size), int(request.chunk),
                               int(request.index))
    data, done = _paths(cache, sha, chunk)
    n = _count(size, chunk)
    if not 0 <= index < n:
        raise StageError("chunk %d of a file of %d chunks" % (index, n))
    start = index * chunk
    left = min(size, start + chunk) - start
    fd = None if cache._trusted(sha) else _open_locked(data, fcntl.LOCK_SH, create=True)
    if fd is None:  # published meanwhile (or cannot be written): keep the stream in step
        cache._drain(sha, left, stream)
        return {"present": cache._trusted(sha)}
    try:
        offset = start
        while left:
            block = cache._next(sha, left, stream)
            while block:
                w = os.pwrite(fd, block, offset)
                block = block[w:]
                offset += w
                left -= w
        rec = os.open(done, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(rec, b"%d\n" % index)
        finally:
            os.close(rec)
    finally:
        os.close(fd)
    return {"ok": True}


def publish(cache: Cache, request: Publish) -> dict:
    """Hash the assembled file once; publish it into the cache when it is *sha*."""
    sha, size, chunk = request.sha256, int(request.size), int(request.chunk)
    data, done = _paths(cache, sha, chunk)
    if cache._trusted(sha):
        return {"ok": True}
    fd = _open_locked(data, fcntl.LOCK_EX, create=False)
    if fd is None:
        if cache._trusted(sha):
            return {"ok": True}
        return {"missing": list(range(_count(size, chunk)))}
    try:
        n = _count(size, chunk)
        missing: List[int] = sorted(set(range(n)) - _done(done, n))
        if missing:
            return {"missing": missing}
        h = hashlib.sha256()
        pos = 0
        while pos < size:
            block = os.pread(fd, min(8 * BLOCK, size - pos), pos)
            if not block:
                break
            h.update(block)
            pos += len(block)
        digest = h.hexdigest()
        if digest != sha or os.fstat(fd).st_size != size:
            os.unlink(data)  # every chunk is sent again; nothing wrong is published
            _unlink_quiet(done)
            return {"bad": digest}
        os.fchmod(fd, 0o444)
        cache._publish(data, sha, os.fstat(fd))
        _unlink_quiet(done)
    finally:
        os.close(fd)
    return {"ok": True}


def sweep(cache: Cache, min_age: Optional[float]) -> int:
    """Bytes of chunked uploads in progress; with *min_age*, first drop those untouched for
    that long (abandoned: their desktop will send them again)."""
    folder = os.path.join(cache.root, "chunks")
    total = 0
    now = time.time()
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if min_age is not None and now - st.st_mtime >= min_age:
            _unlink_quiet(path)
            continue
        total += st.st_size
    return total
