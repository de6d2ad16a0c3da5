"""The content-addressed store of one cluster workdir, shared by every staging server that
runs there (stdlib only; shipped with the agent).

Layout under the workdir::

    cache/objects/ab/abcdef...   verified content, read-only, named by SHA-256
    cache/partial/abcdef...      an upload in progress (kept for resume)
    cache/index.sqlite           size, mtime and inode of each object when it was verified
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from typing import BinaryIO, Dict, Iterable, Optional, Tuple

from .hashing import BLOCK, open_wal

SMALL = 4 << 20  # files up to this size are received in one read, without resume


class StageError(Exception):
    """A staging request cannot be served."""


class Cache:
    """The content-addressed store of one workdir."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.root = os.path.join(workdir, "cache")
        self.objects = os.path.join(self.root, "objects")
        self.partial = os.path.join(self.root, "partial")
        os.makedirs(self.objects, exist_ok=True)
        os.makedirs(self.partial, exist_ok=True)
        self.db = open_wal(os.path.join(self.root, "index.sqlite"))
        self.db.execute("CREATE TABLE IF NOT EXISTS objects (sha256 TEXT PRIMARY KEY,"
                        " size INTEGER, mtime_ns INTEGER, ino INTEGER)")
        if "ino" not in [r[1] for r in self.db.execute("PRAGMA table_info(objects)")]:
            self.db.execute("ALTER TABLE objects ADD COLUMN ino INTEGER")  # caches of 0.1
        self._buffer = memoryview(bytearray(SMALL))
        # what each project mirror received, for `scipion-cloudexec status`
        self.db.execute("CREATE TABLE IF NOT EXISTS mirrors (mirror TEXT PRIMARY KEY,"
                        " bytes INTEGER, files INTEGER, updated REAL)")

    def path(self, sha: str) -> str:
        return os.path.join(self.objects, sha[:2], sha)

    def records(self, shas: Iterable[str]) -> Dict[str, Tuple[int, int, Optional[int]]]:
        """(size, mtime_ns, inode) of each object when it was verified, in few queries."""
        shas = list(shas)
        out: Dict[str, Tuple[int, int, Optional[int]]] = {}
        for i in range(0, len(shas), 500):  # old sqlite allows 999 parameters
            chunk = shas[i:i + 500]
            out.update((r[0], tuple(r[1:])) for r in self.db.execute(
                "SELECT sha256, size, mtime_ns, ino FROM objects WHERE sha256 IN (%s)"
                % ",".join("?" * len(chunk)), chunk))
        return out

    def present(self, sha: str, size: int, record: Optional[tuple]) -> Tuple[bool, bool]:
        """(usable, was_corrupt): an object whose size or mtime moved since it was
        verified (*record*) is corrupt; it is deleted so that it is sent again."""
        path = self.path(sha)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False, False
        if record and record[0] == st.st_size == size and record[1] == st.st_mtime_ns:
            if record[2] != st.st_ino:  # verified before inodes were recorded
                self.db.execute("UPDATE objects SET ino=? WHERE sha256=?", (st.st_ino, sha))
            return True, False
        os.unlink(path)  # mirrors keep their (bad) link; linking replaces it
        self.db.execute("DELETE FROM objects WHERE sha256=?", (sha,))
        return False, True

    def receive(self, sha: str, size: int, offset: int, stream: BinaryIO) -> Optional[str]:
        """Append ``size - offset`` bytes from *stream* to the partial file, verify, publish.
        Returns None, or why the content was refused (it is then deleted, never linked)."""
        if offset == 0 and size <= SMALL:
            return self._receive_small(sha, size, stream)
        part = os.path.join(self.partial, sha)
        h = hashlib.sha256()
        with open(part, "ab") as out:
            fcntl.flock(out, fcntl.LOCK_EX)  # partial_size() of a retry waits for us
            out.truncate(offset)
            if offset:
                with open(part, "rb") as old:
                    left = offset
                    while left:
                        block = old.read(min(BLOCK, left))
                        if not block:
                            break
                        h.update(block)
                        left -= len(block)
            left = size - offset
            while left:
                block = self._buffer[:min(BLOCK, left)]
                n = stream.readinto(block)
                if not n:
                    raise StageError("stream ended %d bytes before the end of %s" % (left, sha))
                out.write(block[:n])
                h.update(block[:n])
                left -= n
        if h.hexdigest() != sha:
            os.unlink(part)
            return _refused(sha, h.hexdigest())
        os.chmod(part, 0o444)
        self._publish(part, sha)
        return None

    def _receive_small(self, sha: str, size: int, stream: BinaryIO) -> Optional[str]:
        """A small file in one read into a reused buffer, verified in memory, then written
        straight to its object name (no temporary name: an object counts only once the
        index holds its size and mtime, so a write cut short is never trusted)."""
        data = self._buffer[:size]
        got = stream.readinto(data)
        if got != size:
            raise StageError("stream ended %d bytes before the end of %s" % (size - got, sha))
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha:
            return _refused(sha, digest)
        dest = self.path(sha)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(dest, flags, 0o444)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fd = os.open(dest, flags, 0o444)
        except FileExistsError:  # a write cut short, or another client's copy: ours is right
            os.unlink(dest)
            fd = os.open(dest, flags, 0o444)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?)",
                        (sha, st.st_size, st.st_mtime_ns, st.st_ino))
        return None

    def _publish(self, tmp: str, sha: str) -> None:
        dest = self.path(sha)
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(tmp, dest)
        st = os.stat(dest)
        self.db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?)",
                        (sha, st.st_size, st.st_mtime_ns, st.st_ino))

    def partial_size(self, sha: str, size: int) -> int:
        """Bytes of an interrupted upload, once its writer (a helper whose connection
        died) has let go of it."""
        if size <= SMALL:
            return 0
        try:
            with open(os.path.join(self.partial, sha), "rb") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                n = os.fstat(f.fileno()).st_size
        except OSError:
            return 0
        return n if n < size else 0

    def link(self, sha: str, dest: str) -> bool:
        """Hard-link the object at *dest*; False when it already is that object.
        Raises FileNotFoundError when the object is not in the cache."""
        src = self.path(sha)
        try:
            os.link(src, dest)
            return True
        except FileExistsError:
            if os.lstat(dest).st_ino == os.stat(src).st_ino:
                return False
        except FileNotFoundError:
            os.stat(src)  # the object is missing: say so
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.link(src, dest)
            return True
        tmp = dest + ".cloudexec-link"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dest)
        return True


def _refused(sha: str, digest: str) -> str:
    return "content of %s arrived with hash %s (changed during upload or corrupted)" % (
        sha[:12], digest[:12])
