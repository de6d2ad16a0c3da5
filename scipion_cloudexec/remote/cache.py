"""The content-addressed store of one cluster workdir, shared by every staging server that
runs there, from one desktop or several, at once (stdlib only; shipped with the agent).

Layout under the workdir::

    cache/objects/ab/abcdef...   verified content, read-only, named by SHA-256
    cache/partial/abcdef...      a large upload in progress, kept for resume (one writer)
    cache/partial/abcdef....<pid>.<random>   an upload no other process knows of
    cache/index.sqlite           size, mtime and inode of each object when it was verified
    cache/publish.lock           flock held while an object enters or leaves objects/

Several servers at once are safe because: a published object is never written to,
truncated or replaced while it matches its record (content is written in partial/ and
renamed into objects/ once verified, unless a good copy got there first); an object
counts only once its record (size, mtime, inode) is in the index, inserted before the
rename under ``publish.lock``, under which present() also checks again before deleting;
each index write is one autocommit statement (none spans a transfer); ``partial/<sha>``
has one writer at a time, never waited for while it makes progress.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import time
from contextlib import contextmanager
from typing import BinaryIO, Dict, Iterable, Iterator, Optional, Tuple

from .hashing import BLOCK, open_wal

SMALL = 4 << 20  # files up to this size are received in one read, without resume
STALE = 3600.0  # a private upload file unlocked and untouched this long was left by a crash
GRACE = 2.0  # a partial file another server still writes after this long: a live upload
WAIT = 300.0  # partial_size() waits at most this long for a stalled writer to give up

Record = Tuple[int, int, Optional[int]]  # size, mtime_ns, inode (None: cache of 0.1)


class StageError(Exception):
    """A staging request cannot be served."""


class Cache:
    """The content-addressed store of one workdir."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.root = os.path.join(workdir, "cache")
        self.objects = os.path.join(self.root, "objects")
        self.partial = os.path.join(self.root, "partial")
        self.lock_path = os.path.join(self.root, "publish.lock")
        os.makedirs(self.objects, exist_ok=True)
        os.makedirs(self.partial, exist_ok=True)
        self.db = open_wal(os.path.join(self.root, "index.sqlite"))
        self.db.execute("CREATE TABLE IF NOT EXISTS objects (sha256 TEXT PRIMARY KEY,"
                        " size INTEGER, mtime_ns INTEGER, ino INTEGER)")
        if "ino" not in [r[1] for r in self.db.execute("PRAGMA table_info(objects)")]:
            try:
                self.db.execute("ALTER TABLE objects ADD COLUMN ino INTEGER")  # caches of 0.1
            except sqlite3.OperationalError:  # another server starting added it first
                if "ino" not in [r[1] for r in self.db.execute("PRAGMA table_info(objects)")]:
                    raise
        self._buffer = memoryview(bytearray(SMALL))
        # what each project mirror received, for `scipion-cloudexec status`
        self.db.execute("CREATE TABLE IF NOT EXISTS mirrors (mirror TEXT PRIMARY KEY,"
                        " bytes INTEGER, files INTEGER, updated REAL)")
        self._sweep()

    def path(self, sha: str) -> str:
        """Where the object of *sha* lives (whether or not it is there)."""
        return os.path.join(self.objects, sha[:2], sha)

    def records(self, shas: Iterable[str]) -> Dict[str, Record]:
        """(size, mtime_ns, inode) of each object when it was verified, in few queries."""
        shas = list(shas)
        out: Dict[str, Record] = {}
        for i in range(0, len(shas), 500):  # old sqlite allows 999 parameters
            chunk = shas[i:i + 500]
            out.update((r[0], r[1:]) for r in self.db.execute(
                "SELECT sha256, size, mtime_ns, ino FROM objects WHERE sha256 IN (%s)"
                % ",".join("?" * len(chunk)), chunk))
        return out

    def present(self, sha: str, size: int, record: Optional[tuple]) -> Tuple[bool, bool]:
        """(usable, was_corrupt): the object of *sha* is there as verified. *record* (from
        records(): maybe older than another server's publish) decides the usual case; else
        checked again under the publish lock, where an object whose size or mtime moved
        since it was verified, or that has no record, is deleted, to be sent again."""
        path = self.path(sha)
        st = _stat(path)
        if st is None:
            return False, False
        if record and _matches(record, st) and record[2] == st.st_ino and st.st_size == size:
            return True, False
        with self._publishing():  # no publish half done: object and record agree, or not
            st = _stat(path)
            if st is None:
                return False, False
            record = self._record(sha)
            if record and _matches(record, st):
                if record[2] != st.st_ino:  # verified before inodes were recorded
                    self.db.execute("UPDATE objects SET ino=? WHERE sha256=?", (st.st_ino, sha))
                return st.st_size == size, False  # another size: the client is wrong, not us
            os.unlink(path)  # mirrors keep their (bad) link; linking replaces it
            self.db.execute("DELETE FROM objects WHERE sha256=?", (sha,))
            return False, True

    def receive(self, sha: str, size: int, offset: int, stream: BinaryIO) -> Optional[str]:
        """Take bytes *offset*..*size* of *sha* from *stream*; with the *offset* bytes
        already in ``partial/<sha>``, verify and publish them. Returns None when the object
        is in the cache, or why the content was refused (nothing is published then: the
        client sends it again). Always consumes ``size - offset`` bytes of *stream*;
        raises StageError when it ends before."""
        if offset == 0 and size <= SMALL:
            return self._receive_small(sha, size, stream)
        if self._trusted(sha):  # another server published it meanwhile
            self._drain(sha, size - offset, stream)
            return None
        shared = os.path.join(self.partial, sha)
        fd = self._take(shared, create=offset == 0)
        if fd is not None:
            have = os.fstat(fd).st_size
            # a resume needs the bytes it was told of (an upload from 0 that died since
            # rewrote them); an upload from 0 leaves alone the bytes another server may
            # have been told to resume from
            if have < offset or (offset == 0 and 0 < have < size):
                os.close(fd)
                fd = None
        if fd is None and offset:  # the bytes to resume from are gone or in other hands
            self._drain(sha, size - offset, stream)
            return None if self._trusted(sha) else (
                "upload of %s could not resume: its partial file went to another upload "
                "meanwhile (send it again)" % sha[:12])
        part = shared
        if fd is None:  # another server writes partial/<sha>: send ours alongside
            fd, part = self._private(sha)
        try:
            os.ftruncate(fd, offset)
            h = hashlib.sha256()
            done = 0
            while done < offset:  # the bytes already here count in the hash
                block = os.pread(fd, min(BLOCK, offset - done), done)
                if not block:  # cannot be (we cut it to offset): let the hash refuse it
                    break
                h.update(block)
                done += len(block)
            os.lseek(fd, offset, os.SEEK_SET)
            left = size - offset
            while left:
                block = self._next(sha, left, stream)
                _write_all(fd, block)
                h.update(block)
                left -= len(block)
            if h.hexdigest() != sha:
                os.unlink(part)
                return _refused(sha, h.hexdigest())
            os.fchmod(fd, 0o444)
            # published while still locked: no other writer can take partial/<sha> and
            # write to the inode that becomes the object
            self._publish(part, sha, os.fstat(fd))
        except BaseException:
            if part != shared:  # nobody can resume a private file
                _unlink_quiet(part)
            raise
        finally:
            os.close(fd)
        return None

    def _receive_small(self, sha: str, size: int, stream: BinaryIO) -> Optional[str]:
        """A small file in one read into a reused buffer, verified in memory, written to a
        private file and published (or dropped, when a good copy is there already)."""
        data = self._buffer[:size]
        got = stream.readinto(data) or 0
        if got != size:
            raise StageError("stream ended %d bytes before the end of %s" % (size - got, sha))
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha:
            return _refused(sha, digest)
        if self._trusted(sha):
            return None
        fd, tmp = self._private(sha)
        try:
            _write_all(fd, data)
            os.fchmod(fd, 0o444)
            self._publish(tmp, sha, os.fstat(fd))
        except BaseException:
            _unlink_quiet(tmp)
            raise
        finally:
            os.close(fd)
        return None

    def _publish(self, tmp: str, sha: str, st: os.stat_result) -> None:
        """Move the verified file *tmp* (whose stat is *st*) to its object name, its record
        written first; or drop it if a good copy got there first (never replace that)."""
        dest = self.path(sha)
        with self._publishing():
            if self._trusted(sha):
                os.unlink(tmp)
                return
            # rename keeps size, mtime and inode: the record holds for the object
            self.db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?)",
                            (sha, st.st_size, st.st_mtime_ns, st.st_ino))
            try:
                os.replace(tmp, dest)  # over an unrecorded or changed file: not a good copy
            except FileNotFoundError:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(tmp, dest)

    def partial_size(self, sha: str, size: int) -> int:
        """Bytes of an interrupted upload that a new one can resume from (0: none). While
        another server has the file: wait for it (a server whose client died drains its
        stream and goes; one whose link was cut gives up within its ``stall`` seconds),
        unless the file still grows after GRACE seconds: a live upload, not waited for."""
        if size <= SMALL:
            return 0
        path = os.path.join(self.partial, sha)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return 0
        try:
            t0 = moved = time.monotonic()
            seen = _state(fd)
            while not _try_lock(fd, fcntl.LOCK_SH):
                now = time.monotonic()
                if _state(fd) != seen:
                    seen, moved = _state(fd), now
                if now - t0 > WAIT or (now - t0 > GRACE and now - moved < GRACE):
                    return 0
                time.sleep(0.05)
            n = os.fstat(fd).st_size if _same(path, fd) else 0
        finally:
            os.close(fd)
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
        # a name of our own: two servers may replace the same mirror file at once
        tmp = "%s.cloudexec-link.%d.%s" % (dest, os.getpid(), os.urandom(4).hex())
        os.link(src, tmp)
        try:
            os.replace(tmp, dest)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        return True

    @contextmanager
    def _publishing(self) -> Iterator[None]:
        """The workdir-wide lock under which objects enter and leave objects/ with their
        records; held for a rename and an index write, never for a transfer."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _record(self, sha: str) -> Optional[Record]:
        row = self.db.execute("SELECT size, mtime_ns, ino FROM objects WHERE sha256=?",
                              (sha,)).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def _trusted(self, sha: str) -> bool:
        """The object is there and matches its record as it is now in the index (a good
        object is never changed, so this holds once true; no lock needed)."""
        st = _stat(self.path(sha))
        record = self._record(sha) if st is not None else None
        return record is not None and _matches(record, st)

    def _take(self, path: str, create: bool) -> Optional[int]:
        """An fd on the shared ``partial/<sha>``, locked for us alone; None when it is
        missing (and not *create*) or another writer has it."""
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        for _attempt in range(5):
            try:
                fd = os.open(path, flags, 0o644)
            except (FileNotFoundError, PermissionError):  # gone; or published-mode leftover
                return None
            if _try_lock(fd, fcntl.LOCK_EX):
                if _same(path, fd):
                    return fd
                os.close(fd)  # its writer published or dropped it between our open and lock
                if not create:
                    return None
                continue
            os.close(fd)
            time.sleep(0.02)  # partial_size() holds it an instant; a writer, for long
        return None

    def _private(self, sha: str) -> Tuple[int, str]:
        """A new file in partial/ that no other server knows of, locked against _sweep."""
        while True:
            name = "%s.%d.%s" % (sha, os.getpid(), os.urandom(4).hex())
            path = os.path.join(self.partial, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd, path

    def _next(self, sha: str, left: int, stream: BinaryIO) -> memoryview:
        """The next block (at most *left* bytes) of *stream*, in the reused buffer."""
        # what has arrived, not a full block: a live upload's file grows as data comes
        read = getattr(stream, "readinto1", None) or stream.readinto  # type: ignore
        n = read(self._buffer[:min(BLOCK, left)])
        if not n:
            raise StageError("stream ended %d bytes before the end of %s" % (left, sha))
        return self._buffer[:n]

    def _drain(self, sha: str, left: int, stream: BinaryIO) -> None:
        """Read and drop *left* bytes: the stream stays in step with the requests."""
        while left:
            left -= len(self._next(sha, left, stream))

    def _sweep(self) -> None:
        """Delete what servers that died left in partial/: private files unlocked and
        untouched for STALE (one being created is new, one being written is locked), and
        unlocked partial/<sha> whose object is in the cache (nobody will resume it)."""
        now = time.time()
        for name in os.listdir(self.partial):
            path = os.path.join(self.partial, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                useless = (now - os.fstat(fd).st_mtime > STALE if "." in name
                           else self._trusted(name))
                if useless and _try_lock(fd, fcntl.LOCK_EX) and _same(path, fd):
                    os.unlink(path)
            finally:
                os.close(fd)


def _stat(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _matches(record: tuple, st: os.stat_result) -> bool:
    """The file is as verified: same size and mtime (the inode may be unrecorded)."""
    return record[0] == st.st_size and record[1] == st.st_mtime_ns


def _same(path: str, fd: int) -> bool:
    """*path* still names the file open as *fd* (not renamed away or replaced)."""
    st = _stat(path)
    own = os.fstat(fd)
    return st is not None and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _state(fd: int) -> Tuple[int, int]:
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns


def _try_lock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _refused(sha: str, digest: str) -> str:
    return "content of %s arrived with hash %s (changed during upload or corrupted)" % (
        sha[:12], digest[:12])
