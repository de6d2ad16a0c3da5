"""Content hashes of files, remembered by (path, size, mtime, inode) so unchanged files
are hashed once. Used on both sides; shipped to the cluster with the agent (stdlib only).
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

BLOCK = 1 << 20
RACY_SECONDS = 2.0  # files changed this recently are hashed again next time
MEMO_MAX = 500_000  # files remembered in memory per memo file (about 100 MB at most)
_MEMOS: Dict[str, Dict[str, Tuple[Tuple[int, int, int], str]]] = {}  # db path -> memo
_MEMOS_LOCK = threading.Lock()


def sha256_file(path: str) -> str:
    """SHA-256 of a file's content, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                return h.hexdigest()
            h.update(block)


def open_wal(path: str, timeout: float = 60.0, threads: bool = False) -> sqlite3.Connection:
    """An autocommit sqlite connection in WAL mode. Two processes creating the file at the
    same moment race for the switch to WAL, which sqlite refuses at once ("database is
    locked") instead of waiting: retry it. *threads*: usable from any thread (the caller
    serializes its use)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=timeout,
                         check_same_thread=not threads)
    for attempt in range(100):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if attempt == 99:
                raise
            time.sleep(0.05)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def stat_key(st: os.stat_result) -> Tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


class HashCache:
    """sqlite memo of file hashes; a file whose size, mtime or inode moved is hashed again.
    Several processes share it (two protocols staging at once): reads run outside any
    transaction and new hashes are written in short immediate transactions.

    A copy of what this process read or wrote is kept in memory (per memo file, shared by
    its instances, at most MEMO_MAX files): a run folder listed once per step then costs
    a dict lookup per file, not an sqlite query. It holds exactly the (path, size, mtime,
    inode) -> hash rows sqlite holds, under the same rule (racy files never enter), so it
    answers as sqlite would; a key it lacks or that moved is looked up in sqlite."""

    def __init__(self, path: str, racy_seconds: float = RACY_SECONDS):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with _MEMOS_LOCK:
            self._mem = _MEMOS.setdefault(os.path.abspath(path), {})
        self.db = open_wal(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER,"
                        " mtime_ns INTEGER, ino INTEGER, sha256 TEXT)")
        self._new: List[tuple] = []
        self.hashed_bytes = 0  # read to hash, since opened: the memo did not know them
        self.racy_seconds = racy_seconds

    def get_many(self, items: Sequence[Tuple[str, os.stat_result]]) -> List[str]:
        """Hashes of many files: the memo is read in a few queries, not one per file."""
        mem = self._mem
        out: List[Optional[str]] = []
        misses: List[int] = []  # one pass, one key per file: a run folder is mostly hits
        for p, st in items:
            hit = mem.get(p)
            if hit is not None and hit[0] == (st.st_size, st.st_mtime_ns, st.st_ino):
                out.append(hit[1])
            else:
                misses.append(len(out))
                out.append(None)
        known: Dict[str, tuple] = {}
        paths = [items[i][0] for i in misses]
        for i in range(0, len(paths), 500):  # old sqlite allows 999 parameters
            chunk = paths[i:i + 500]
            known.update((r[0], r[1:]) for r in self.db.execute(
                "SELECT path, size, mtime_ns, ino, sha256 FROM hashes WHERE path IN (%s)"
                % ",".join("?" * len(chunk)), chunk))
        for i in misses:
            path, st = items[i]
            key = stat_key(st)
            hit = mem.get(path)  # hashed just above, as a duplicate of an earlier item
            if hit is not None and hit[0] == key:
                out[i] = hit[1]
                continue
            row = known.get(path)
            if row and tuple(row[:3]) == key:
                self._remember(path, key, row[3])
                out[i] = row[3]
            else:
                out[i] = self._hash(path, st)
        self.flush()
        return out  # type: ignore[return-value]  # every None was filled

    def _remember(self, path: str, key: Tuple[int, int, int], digest: str) -> None:
        if len(self._mem) >= MEMO_MAX:
            self._mem.clear()  # rare: start over rather than grow without bound
        self._mem[path] = (key, digest)

    def get(self, path: str, st: Optional[os.stat_result] = None) -> str:
        """The file's SHA-256, from the memo when size, mtime and inode are unchanged."""
        st = st or os.stat(path)
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = self._mem.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        row = self.db.execute("SELECT size, mtime_ns, ino, sha256 FROM hashes WHERE path=?",
                              (path,)).fetchone()
        if row and tuple(row[:3]) == key:
            self._remember(path, key, row[3])
            return row[3]
        return self._hash(path, st)

    def _hash(self, path: str, st: os.stat_result) -> str:
        digest = sha256_file(path)
        self.hashed_bytes += st.st_size
        after = os.stat(path)
        # not remembered: a file changed while hashed, or changed so recently that a
        # same-size rewrite within the filesystem's mtime granularity (1 s, 2 s on some)
        # would look unchanged (git's "racily clean" files); ctime cannot be set back
        if stat_key(after) == stat_key(st) and time.time() - after.st_ctime > self.racy_seconds:
            self._new.append((path, *stat_key(st), digest))
            self._remember(path, stat_key(st), digest)
            if len(self._new) >= 1000:
                self.flush()
        return digest

    def flush(self) -> None:
        """Write the new hashes (waits up to a minute for another writer)."""
        if not self._new:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT OR REPLACE INTO hashes VALUES (?,?,?,?,?)", self._new)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self._new.clear()

    def close(self) -> None:
        self.flush()
        self.db.close()


def path_state(path: str, memo: "HashCache") -> str:
    """A path's state in the run-folder sync model (see ``staging/sync.py``), the same on
    both sides: "" (nothing), "d" (a folder), "l:TARGET" (a symbolic link), the SHA-256 of
    a file, "?" (a FIFO, socket or device: never opened)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a file in its parent's place)
        return ""
    if stat.S_ISLNK(st.st_mode):
        return "l:" + os.readlink(path)
    if stat.S_ISDIR(st.st_mode):
        return "d"
    if stat.S_ISREG(st.st_mode):
        try:
            return memo.get(path, st)
        except FileNotFoundError:  # deleted meanwhile (by a running job, say)
            return ""
    return "?"
