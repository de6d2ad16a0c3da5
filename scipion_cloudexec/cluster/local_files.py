"""The desktop's files in a staging: walked and hashed in batches on a thread, the run
folder's three-way filter, and the report of what moved.

Split from :mod:`.stager` (which sends, :mod:`.gather` receives): the walk follows links
with one stat per file and one realpath per folder, so a project of 100,000 files costs
one pass; the hashes of unchanged files come from the memo.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Set,
                    Tuple)

from ..remote.hashing import HashCache
from .errors import InputMissing
from .sync import DIR

if TYPE_CHECKING:
    from .stager import Stager

#: progress(done_bytes, total_bytes, done_files, total_files)
Progress = Callable[[int, int, int, int], None]
# The bulk stream moves ~330 MB/s here vs ~185 MB/s for paramiko but costs a login (~0.5 s):
BATCH = 2000  # files per request: bounds memory on both sides
BATCH_BYTES = 256 << 20  # and bytes: the next batch is hashed while this one travels
#: the first batch is this small, the next ones twice the one before up to BATCH: the first
#: check leaves (and the first contents travel) while most files are still being hashed
FIRST_BATCH, FIRST_BATCH_BYTES = 256, 16 << 20
#: batches walked ahead of the sender: with 2, a walk stopped at 1,800 files while a new
#: process's stream opened (2-3 round trips), then ran behind the checks (issue 13)
AHEAD = 8
EXTERNAL = "_external"  # inputs outside the project, under their absolute path
#: a gather's file still being received (renamed to its real name once verified): another
#: cluster's stage-in walking the same run folder must not send it
TEMP_PREFIX = ".cloudexec-"


@dataclass
class StageReport:
    """What one staging did."""
    files: int = 0
    bytes_total: int = 0
    bytes_sent: int = 0
    linked: int = 0
    unchanged: int = 0
    repaired: int = 0
    seconds: float = 0.0
    fetched: List[str] = field(default_factory=list)
    refused: List[Tuple[str, str]] = field(default_factory=list)
    hashes: Dict[str, str] = field(default_factory=dict)
    #: run-folder sync (see :mod:`.sync`): states now agreed with the cluster ("" = gone),
    #: paths changed on both sides, special files skipped, files that moved while sent
    agreed: Dict[str, str] = field(default_factory=dict)
    conflicts: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    deferred: List[str] = field(default_factory=list)
    #: nothing done for this step: a sync that began after its need arose covered it
    shared: bool = False

    @property
    def rate(self) -> float:
        """Bytes per second of content moved."""
        return self.bytes_sent / self.seconds if self.seconds else 0.0


def mirror_path(project_root: str, local: str) -> str:
    """Where *local* (absolute, or relative to the project) lives in the project's mirror,
    relative to the mirror: its project-relative path, or ``_external/<absolute path>`` for
    a path outside the project."""
    root = os.path.abspath(project_root)
    path = os.path.abspath(os.path.join(root, local))
    rel = os.path.relpath(path, root)
    if rel == ".." or rel.startswith(".." + os.sep):
        rel = os.path.join(EXTERNAL, path.lstrip("/"))
    return os.path.normpath(rel)

@dataclass
class _Batch:
    files: List[Tuple[str, str, int, str]]  # (mirror path, local path, size, sha256)
    dirs: List[str]
    fresh_bytes: int  # bytes the hash memo did not know: likely new content
    base: Optional[Dict[str, Tuple[str, bool]]] = None  # run-folder files: (state they
    # replace, shared from the cache)


class _Batches:
    """Walks and hashes the files in a thread, at most AHEAD batches ahead of the sender
    (hashlib and file reads release the GIL, so both cores work)."""

    _END = object()

    def __init__(self, stager: "Stager", project_root: str, paths: Sequence[str],
                 exclude: Sequence[str],
                 entries: Optional[Iterator[Tuple[str, Optional["_Local"]]]] = None):
        self._q: "queue.Queue" = queue.Queue(maxsize=AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloudexec-hash", daemon=True,
                                        args=(stager, project_root, paths, exclude, entries))
        self._thread.start()

    def _run(self, stager: "Stager", project_root: str, paths: Sequence[str],
             exclude: Sequence[str], entries) -> None:
        """*entries*: what to hash instead of a walk of *paths* (the changed paths)."""
        try:
            memo = HashCache(stager.hash_cache_path)
        except BaseException as e:  # noqa: B036 - handed to the consumer
            self._put(e)
            return
        try:
            pending: List[Tuple[str, _Local]] = []
            dirs: List[str] = []
            size = 0
            files_max, bytes_max = FIRST_BATCH, FIRST_BATCH_BYTES

            def batch() -> _Batch:
                nonlocal size, files_max, bytes_max
                size = 0
                files_max, bytes_max = min(BATCH, 2 * files_max), min(BATCH_BYTES, 2 * bytes_max)
                before = memo.hashed_bytes
                shas = memo.get_many([(e.real, e.st) for _r, e in pending])
                files = [(rel, e.path, e.st.st_size, sha)
                         for (rel, e), sha in zip(pending, shas)]
                b = _Batch(files, list(dirs), memo.hashed_bytes - before)
                pending.clear()
                dirs.clear()
                return b

            if entries is None:
                entries = stager.walk(project_root, paths, exclude)
            for rel, entry in entries:
                if entry is None:
                    dirs.append(rel)
                    continue
                pending.append((rel, entry))
                size += entry.st.st_size
                if (len(pending) >= files_max or size >= bytes_max) and not self._put(batch()):
                    return
            if (pending or dirs) and not self._put(batch()):
                return
            self._put(self._END)
        except BaseException as e:  # noqa: B036 - handed to the consumer
            self._put(e)
        finally:
            memo.close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Local:
    """A local file to stage: its path, its real path (the hash memo's key) and stat."""
    path: str
    real: str
    st: os.stat_result


def _walk_dir(folder: str, rel: str, exclude: Sequence[str], seen: set
              ) -> Iterator[Tuple[str, Optional[_Local]]]:
    """Like os.walk following links, with one stat per file and one realpath per folder;
    a folder that is its own ancestor (a link cycle) is skipped, a second link to a
    folder already walked elsewhere is walked again (its files have other paths)."""
    if _excluded(rel, exclude):
        return
    real_dir = os.path.realpath(folder)
    st = os.stat(real_dir)
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return
    seen.add(key)  # *seen*: the folders above this one
    try:
        yield from _walk_entries(folder, rel, real_dir, exclude, seen)
    finally:
        seen.discard(key)


def _walk_entries(folder: str, rel: str, real_dir: str, exclude: Sequence[str], seen: set
                  ) -> Iterator[Tuple[str, Optional[_Local]]]:
    yield rel, None
    subdirs = []
    # names joined by hand: os.path.join twice per file was a third of the walk (issue 13)
    prefix = "" if rel == "." else rel.rstrip("/") + "/"
    real_prefix = real_dir.rstrip("/") + "/"
    with os.scandir(folder) as it:  # streamed: a folder of 100,000 files costs no memory
        for e in it:
            if e.name.startswith(TEMP_PREFIX):
                continue
            frel = prefix + e.name
            try:
                if e.is_dir():
                    subdirs.append((e.path, frel))
                    continue
                if exclude and _excluded(frel, exclude):
                    continue
                fst = e.stat()
            except FileNotFoundError:
                if e.is_symlink():
                    raise InputMissing("input %s is a broken link" % e.path) from None
                continue  # deleted since the folder was read: as if walked a moment later
            real = os.path.realpath(e.path) if e.is_symlink() else real_prefix + e.name
            yield frel, _Local(e.path, real, fst)
    subdirs.sort()
    for path, srel in subdirs:
        yield from _walk_dir(path, srel, exclude, seen)


def _excluded(rel: str, prefixes: Sequence[str]) -> bool:
    rel = rel.rstrip("/") + "/"
    return any(rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def _entry(f: Tuple[str, str, int, str], base: Optional[Dict[str, Tuple[str, bool]]]) -> list:
    """A file of a staging request: ``[rel, size, sha]``; for a run-folder file, also the
    state it replaces (the cluster writes it only over that state) and whether it may be
    shared from the cache instead of copied."""
    rel, _local, size, sha = f
    if base is not None and rel in base:
        was, shared = base[rel]
        return [rel, size, sha, was, 1 if shared else 0]
    return [rel, size, sha]


class _InSync:
    """The run-folder side of one stage-in: which files travel (changed locally since the
    base), which folders are new, what was deleted locally."""

    def __init__(self, run_dir: str, base: Optional[Dict[str, str]],
                 scope: Optional[Tuple[Set[str], Set[str]]] = None):
        """*scope*: (paths, folders among them) when only those were walked (see
        :meth:`.watch.RunFolderWatch.changes`); every other path holds its base state."""
        self.scope = scope
        self.prefix = os.path.normpath(run_dir)
        # under() inlined: these run once per file of the run folder (issue 13)
        self._below = self.prefix.rstrip("/") + "/"
        below, top = self._below, self.prefix
        # with a scope, only the paths in it are looked up: no pass over the whole base
        self.base = dict(base or {}) if scope is not None else {
            k: v for k, v in (base or {}).items() if k == top or k.startswith(below)}
        self.seen: set = set()
        self.seen_dirs: set = set()
        self.sent: Dict[str, str] = {}
        self.removed: List[List[str]] = []
        # what replaces a path of another kind (a folder now a file, a file now a folder):
        # sent once the old one is removed, which the far side does only where it still
        # holds the base (its content first); their base states, and what waits
        self.replaced: Dict[str, str] = {}
        self.held_files: List[Tuple[str, str, int, str]] = []
        self.held_dirs: List[str] = []

    def filter(self, batch: "_Batch", report: StageReport) -> None:
        dirs = []
        below, top = self._below, self.prefix
        for d in batch.dirs:
            if d == top or d.startswith(below):
                self.seen.add(d)
                self.seen_dirs.add(d)
                was = self.base.get(d, "")
                if was == DIR:
                    continue
                self.sent[d] = DIR
                if was or (self.replaced and self._under_replaced(d)):
                    if was:  # a file or link here before
                        self.replaced[d] = was
                    self.held_dirs.append(d)
                    continue
            dirs.append(d)
        files, replaced = [], {}
        for f in batch.files:
            rel, local, _size, sha = f
            if rel == top or rel.startswith(below):
                self.seen.add(rel)
                was = self.base.get(rel, "")
                if was == DIR or (self.replaced and self._under_replaced(rel)):
                    if was == DIR:
                        self.replaced[rel] = DIR
                    self.held_files.append(f)
                    self.sent[rel] = sha
                    continue
                if was.startswith("l:") and os.path.islink(local) and \
                        "l:" + os.readlink(local) == was:
                    continue  # a link the cluster made: it has it
                if was == sha:
                    report.unchanged += 1
                    continue
                # a link here (an input linked into the run folder, often large) is shared
                # from the cache like any input; a file is the run's own: a private copy
                replaced[rel] = (was, os.path.islink(local))
                self.sent[rel] = sha
            files.append(f)
        batch.dirs, batch.files, batch.base = dirs, files, replaced

    def _under_replaced(self, rel: str) -> bool:
        parent = os.path.dirname(rel)
        while parent and parent != self.prefix:
            if parent in self.replaced:
                return True
            parent = os.path.dirname(parent)
        return False

    def release(self, report: StageReport) -> Optional["_Batch"]:
        """What was held (see ``replaced``), now that the paths it replaces were removed
        (:meth:`gone` and ``replaced`` went in one removal): a batch written over nothing;
        what a conflict kept in place (or lies under it) stays here, a conflict too."""
        if not (self.held_files or self.held_dirs):
            return None
        clash = {rel for rel, _why in report.conflicts}

        def blocked(rel: str) -> bool:
            parent = rel
            while parent and parent != self.prefix:
                if parent in clash:
                    return True
                parent = os.path.dirname(parent)
            return False
        files = [f for f in self.held_files if not blocked(f[0])]
        dirs = sorted((d for d in self.held_dirs if not blocked(d)), key=lambda d: d.count("/"))
        for rel in [f[0] for f in self.held_files] + self.held_dirs:
            if blocked(rel) and rel not in clash:
                report.conflicts.append((rel, "in place of a path changed on the cluster"))
        return _Batch(files, dirs, 0, {f[0]: ("", os.path.islink(f[1])) for f in files})

    def removals(self) -> List[List[str]]:
        """What goes before the held paths: :meth:`gone`, and the paths they replace."""
        return self.gone() + [[p, s] for p, s in self.replaced.items()]

    def gone(self) -> List[List[str]]:
        """Paths the base holds that the local run folder no longer has."""
        if not self.removed:
            if self.scope is None:
                self.removed = [[p, s] for p, s in self.base.items() if p not in self.seen]
            else:
                self.removed = [[p, s] for p, s in self._gone_in_scope()]
        return self.removed

    def _gone_in_scope(self) -> Iterator[Tuple[str, str]]:
        """The base's paths gone among those looked at: the paths named, and what the base
        holds under a folder walked whole, or under one that is no folder any more."""
        paths, folders = self.scope  # type: ignore[misc]
        gone: Dict[str, str] = {}
        for p in paths:
            if p not in self.seen and p in self.base:
                gone[p] = self.base[p]
            if self.base.get(p) == DIR and (p in folders or p not in self.seen_dirs):
                below = p + "/"  # rare (a folder removed or made again): one pass of the base
                gone.update((q, s) for q, s in self.base.items()
                            if q.startswith(below) and q not in self.seen)
        return iter(sorted(gone.items()))

    def settle(self, report: StageReport) -> None:
        clash = {rel for rel, _why in report.conflicts}
        report.agreed.update((p, "") for p, _s in self.removed if p not in clash)
        report.agreed.update((p, "") for p in self.replaced if p not in clash)
        report.agreed.update((p, s) for p, s in self.sent.items() if p not in clash)


def _tick(progress: Optional[Progress], report: StageReport, n: int, total: int, i: int,
          files: int) -> None:
    report.bytes_sent += n
    if progress is not None:
        progress(report.bytes_sent, total, i, files)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _temp_name(dest: str) -> str:
    return os.path.join(os.path.dirname(dest), TEMP_PREFIX + os.urandom(6).hex())


