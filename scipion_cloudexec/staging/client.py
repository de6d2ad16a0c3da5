"""Moving a project's files to a cluster's mirror and back, over one SSH exec channel each way.

::

    stage_in(paths)                              cluster (python agent.zip stage in)
      manifest [(rel, size, sha256)] -------->   which hashes are not in cache/objects?
      <--- missing [(sha256, resume offset)]     (free space checked first: NoSpace)
      the missing contents, back to back ---->   hash while writing, publish if right
      <--- report                                hard-link every file into the mirror

    stage_out(run folder)
      list ---------------------------------->   files under the run folder with hashes
      only those that differ locally -------->   send: header, bytes, trailer hash
      write to a temporary name, verify, rename; refuse any path leaving the run folder

Local files are only read by ``stage_in``; hashes of unchanged files come from a memo in
``~/.cache/scipion-cloudexec/hashes.sqlite``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple


from ..agent import bundle
from ..config import ClusterConfig
from ..transport.ssh import SSHConnection
from .channels import (NoBundle, OpenSSHChannel, ParamikoChannel, ServerChannel,
                       StagingError, dead_link_seconds)
from .hashing import BLOCK, HashCache

log = logging.getLogger(__name__)
__all__ = ["Stager", "StageReport", "StagingError", "NoSpace", "PathEscape"]

#: progress(done_bytes, total_bytes, done_files, total_files)
Progress = Callable[[int, int, int, int], None]
BATCH = 2000  # files per request: bounds memory on both sides
BATCH_BYTES = 256 << 20  # and bytes: the next batch is hashed while this one travels
# The bulk stream moves ~330 MB/s here vs ~185 MB/s for paramiko but costs a login (~0.5 s):
BULK_START = 128 << 20  # start it for a staging with this much new content
BULK_MIN = 1 << 20  # once it runs, transfers from this size use it
CHECKS_AHEAD = 2  # checks in flight: the cluster checks one batch while we walk the next


class NoSpace(StagingError):
    """The cluster lacks the space the upload needs."""

    def __init__(self, cluster: str, needed: int, free: int):
        super().__init__("not enough space on cluster %s: the upload needs %s, %s are free in "
                         "its workdir; free some (scipion-cloudexec cache %s --gc) or point "
                         "workdir at a larger disk" % (cluster, _size(needed), _size(free), cluster))
        self.needed, self.free = needed, free


class PathEscape(StagingError):
    """The cluster named a path that would land outside the run folder."""


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

    @property
    def rate(self) -> float:
        """Bytes per second of content moved."""
        return self.bytes_sent / self.seconds if self.seconds else 0.0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return "%.1f %s" % (n, unit) if unit != "B" else "%d B" % n
        n /= 1000
    return ""


def default_hash_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "scipion-cloudexec", "hashes.sqlite")


class Stager:
    """Stage files between a local project and its mirror on one cluster.

    Requests and small transfers use an exec channel of *ssh*; batches of more than
    ``BULK_START`` bytes (or more than ``BULK_MIN`` once it runs) go through the system's OpenSSH client when the cluster's
    ``transfer`` setting allows (see :mod:`.channels`).

    Args:
        ssh: a connected SSH connection to the cluster.
        cluster: the cluster's config (workdir, python, env_setup, transfer).
        hash_cache: path of the local hash memo (default under ~/.cache).
    """

    def __init__(self, ssh: SSHConnection, cluster: ClusterConfig,
                 hash_cache: Optional[str] = None):
        self.ssh = ssh
        self.cluster = cluster
        self.hash_cache_path = hash_cache or default_hash_cache()
        self._chan: Optional[ServerChannel] = None
        self._bulk_chan: Optional[ServerChannel] = None
        self._bulk_refused = cluster.transfer == "paramiko" or (
            cluster.transfer == "auto" and shutil.which("ssh") is None)

    def _channel(self, bulk: bool = False) -> ServerChannel:
        """The staging server on the control (or bulk) stream, started on first use."""
        if bulk and not self._bulk_refused:
            if self._bulk_chan is None or not self._bulk_chan.alive:
                self._bulk_chan = OpenSSHChannel(self.cluster)
            return self._bulk_chan
        if self._chan is None or not self._chan.alive:
            self._chan = ParamikoChannel(self.ssh, self.cluster)
        return self._chan

    @property
    def bulk_available(self) -> bool:
        return not self._bulk_refused

    def _wants_bulk(self, size: int) -> bool:
        running = self._bulk_chan is not None and self._bulk_chan.alive
        asked = self.cluster.transfer == "openssh"  # chosen by the user: worth a login
        return size >= (BULK_MIN if running or asked else BULK_START)

    def _ask(self, request: dict, bulk: bool = False) -> Tuple[ServerChannel, dict]:
        """Send *request* to the server and read its first answer; uploads the agent bundle
        when the cluster lacks it. In ``auto`` mode a bulk stream that cannot start is
        reported once and replaced by the control stream."""
        for attempt in range(2):
            use_bulk = bulk and not self._bulk_refused
            ch = self._channel(use_bulk)
            try:
                ch.send_line(request)
                return ch, ch.line()
            except NoBundle:
                self._drop(ch)
                if attempt:
                    break
                bundle.ensure_uploaded(self.ssh, self.cluster)
            except (OSError, EOFError, StagingError) as e:
                if not ch._greeted and not isinstance(e, StagingError):
                    # died before answering (ssh refused, say): its own words say why
                    e = StagingError("the staging server on %s did not start (%s): %s" % (
                        self.cluster.name, ch.kind, ch.stderr() or e))
                self._drop(ch)
                if use_bulk and self.cluster.transfer == "auto" and not ch._greeted:
                    log.warning("OpenSSH transfers to %s unavailable, using paramiko: %s",
                                self.cluster.name, e)
                    self._bulk_refused = True
                    continue
                if isinstance(e, StagingError):
                    raise
                raise StagingError("connection to %s lost: %s" % (self.cluster.name, e)) from None
        raise StagingError("the staging server on %s cannot start: the agent bundle is "
                           "missing after upload" % self.cluster.name)

    def _drop(self, ch: ServerChannel) -> None:
        ch.close()
        if ch is self._chan:
            self._chan = None
        if ch is self._bulk_chan:
            self._bulk_chan = None

    def close(self) -> None:
        """Stop the staging servers on the cluster (new ones start on next use)."""
        for ch in (self._chan, self._bulk_chan):
            if ch is not None:
                self._drop(ch)

    def mirror(self, project: str) -> str:
        """The project's mirror, relative to the workdir."""
        if not project or "/" in project or project.startswith("."):
            raise StagingError("project name %r cannot name a mirror folder" % project)
        return "projects/" + project

    def mirror_root(self, project: str) -> str:
        return "%s/%s" % (self.cluster.workdir.rstrip("/"), self.mirror(project))

    # ---- stage in ---------------------------------------------------------------------

    def walk(self, project_root: str, paths: Iterable[str], exclude: Sequence[str] = ()
             ) -> Iterator[Tuple[str, Optional["_Local"]]]:
        """(mirror-relative path, local file) for every file under *paths*, and (path, None)
        for every folder, lazily. Paths are relative to *project_root* or absolute; absolute
        ones outside the project go under ``_external/`` in the mirror. Symbolic links are
        followed; paths under an *exclude* prefix (relative to the project) are left out."""
        root = os.path.abspath(project_root)
        for p in paths:
            local = p if os.path.isabs(p) else os.path.join(root, p)
            rel = os.path.relpath(os.path.abspath(local), root)
            if rel.startswith(".."):
                rel = os.path.join("_external", os.path.abspath(local).lstrip("/"))
            rel = os.path.normpath(rel)
            if os.path.isdir(local):
                yield from _walk_dir(local, rel, exclude, set())
            elif os.path.exists(local):
                if not _excluded(rel, exclude):
                    yield rel, _Local(local, os.path.realpath(local), os.stat(local))
            else:
                raise StagingError("input %s does not exist (or is a broken link)" % local)

    def stage_in(self, project_root: str, paths: Sequence[str], project: str,
                 progress: Optional[Progress] = None, exclude: Sequence[str] = (),
                 keep_hashes: bool = True) -> StageReport:
        """Make *paths* present in the cluster's mirror of *project*; send only what the
        cluster's cache lacks, resuming partial uploads. Files go in batches of BATCH, so
        memory does not grow with their number (unless *keep_hashes* keeps every file's
        hash in the report, as the executor needs). A thread walks and hashes the next
        batch while this one travels.

        Raises:
            NoSpace: before a batch is sent; StagingError: a file changed during the upload
            or arrived corrupted (nothing wrong is ever linked into the mirror).
        """
        t0 = time.monotonic()
        report = StageReport()
        problems: List[str] = []
        self._channel()  # the remote shell and Python start while we walk
        batches = _Batches(self, project_root, paths, exclude)
        checking: "deque[_Batch]" = deque()  # checks sent, answers not read yet
        to_send: List[Tuple[str, str, int, str]] = []  # files whose content the cluster lacks
        fresh = 0
        try:
            for batch in batches:
                report.files += len(batch.files)
                report.bytes_total += sum(f[2] for f in batch.files)
                if keep_hashes:
                    report.hashes.update((f[0], f[3]) for f in batch.files)
                fresh += batch.fresh_bytes
                if self.bulk_available and self._wants_bulk(fresh):
                    self._channel(bulk=True)  # much new content ahead: start the fast stream
                self._send_check(project, batch)
                checking.append(batch)
                if len(checking) > CHECKS_AHEAD:
                    problems += self._read_check(checking.popleft(), report, to_send)
                if len(to_send) >= BATCH or sum(f[2] for f in to_send) >= BATCH_BYTES:
                    while checking:  # the control stream must be idle for a transfer
                        problems += self._read_check(checking.popleft(), report, to_send)
                    problems += self._transfer(project, to_send, report, progress)
                    to_send = []
            while checking:
                problems += self._read_check(checking.popleft(), report, to_send)
            if to_send:
                problems += self._transfer(project, to_send, report, progress)
        except (OSError, EOFError) as e:
            self.close()
            raise StagingError("connection to %s lost during the upload (%s); what arrived is "
                               "kept: stage again to resume" % (self.cluster.name, e)) from None
        except BaseException:
            if checking:
                self.close()  # answers left unread: the stream is out of step
            raise
        finally:
            batches.close()
        report.seconds = time.monotonic() - t0
        if problems:
            raise StagingError("staging to %s incomplete:\n  %s\n(files that changed while being "
                               "sent were not recorded; stage again once they are written)"
                               % (self.cluster.name, "\n  ".join(problems)))
        return report

    def _send_check(self, project: str, batch: "_Batch") -> None:
        """Ask which of the batch's contents the cluster lacks; it links all the others
        into the mirror at once. Answers are read later (several checks in flight)."""
        request = {"cmd": "in", "check": True, "mirror": self.mirror(project), "dirs": batch.dirs,
                   "files": [[rel, size, sha] for rel, _l, size, sha in batch.files]}
        if self._chan is not None and self._chan._greeted:
            self._chan.send_line(request)
        else:  # first use: may need the bundle uploaded, which _ask handles
            batch.answer = self._ask(request)[1]

    def _read_check(self, batch: "_Batch", report: StageReport,
                    to_send: List[Tuple[str, str, int, str]]) -> List[str]:
        if batch.answer is None and self._chan is None:
            raise StagingError("the staging server on %s went away" % self.cluster.name)
        answer = batch.answer if batch.answer is not None else self._chan.line()
        report.linked += answer["linked"]
        report.unchanged += answer["unchanged"]
        report.repaired += answer["repaired"]
        missing = {sha for sha, _off in answer["missing"]}
        to_send.extend(f for f in batch.files if f[3] in missing)
        return answer["errors"]

    def _transfer(self, project: str, entries: List[Tuple[str, str, int, str]],
                  report: StageReport, progress: Optional[Progress]) -> List[str]:
        """Send the contents of *entries* (their checks said missing), verified and linked
        by the cluster; on the bulk stream when large. Returns the problems."""
        total_new = sum(e[2] for e in entries)
        # the server gives up (and lets go of a partial upload) once data stops this long
        request = {"cmd": "in", "mirror": self.mirror(project), "dirs": [],
                   "files": [[rel, size, sha] for rel, _l, size, sha in entries],
                   "stall": max(5.0, dead_link_seconds(self.cluster) / 2)}
        ch = None
        try:
            ch, answer = self._ask(request, bulk=self._wants_bulk(total_new))
            if answer.get("error") == "nospace":
                raise NoSpace(self.cluster.name, answer["needed"], answer["free"])
            local_of = {sha: (local, size) for _r, local, size, sha in entries}
            missing = [(sha, off) for sha, off in answer["missing"]]
            total = report.bytes_sent + sum(local_of[sha][1] - off for sha, off in missing)
            for i, (sha, offset) in enumerate(missing):
                local, size = local_of[sha]
                self._send_file(ch, local, size, offset,
                                lambda n: _tick(progress, report, n, total, i, len(missing)))
            final = ch.line()
        except NoSpace:
            raise
        except BaseException:
            if ch is not None:
                self._drop(ch)  # the stream is out of step: start afresh next time
            raise
        report.linked += final["linked"]
        report.unchanged += final["unchanged"]
        report.repaired += final["repaired"]
        # the cluster verifies every hash; a mismatch means the file moved while it was read
        changed = sorted({local_of[sha][0] for sha in final.get("bad", [])})
        return ["%s changed during the upload" % c for c in changed] + final["errors"]

    @staticmethod
    def _send_file(ch: ServerChannel, local: str, size: int, offset: int,
                   tick: Callable[[int], None]) -> None:
        """Send bytes offset..size of *local* (the cluster checks their hash)."""
        with open(local, "rb") as f:
            while offset < size:
                n = ch.send_file(f, offset, size - offset)
                if not n:  # shrank: keep the stream aligned, the hash will fail
                    n = min(BLOCK, size - offset)
                    ch.sendall(b"\0" * n)
                offset += n
                tick(n)

    # ---- stage out ----------------------------------------------------------------------

    def stage_out(self, project_root: str, project: str, run_dir: str,
                  progress: Optional[Progress] = None, baseline: Optional[Dict[str, str]] = None,
                  exclude: Sequence[str] = ()) -> StageReport:
        """Bring back what changed under *run_dir* (relative to the project) in the mirror.

        Files whose hash on the cluster is the one *baseline* says we sent are left alone
        (the job did not touch them; the local copy may be newer). Each file is written to a
        temporary name, verified and renamed into place. A path that would land outside the
        local run folder is refused and reported, never written.
        """
        root = os.path.realpath(project_root)
        guard = os.path.realpath(os.path.join(root, run_dir))
        return self._fetch(self.mirror_root(project), run_dir, root, guard, progress,
                           baseline or {}, exclude)

    def fetch(self, remote_path: str, to: str, progress: Optional[Progress] = None) -> StageReport:
        """Copy a file or folder under the workdir (path relative to it) into folder *to*."""
        rel = os.path.normpath(remote_path.strip("/"))
        parent, name = os.path.split(rel)
        remote_root = "%s/%s" % (self.cluster.workdir.rstrip("/"), parent) if parent \
            else self.cluster.workdir
        os.makedirs(to, exist_ok=True)
        dest = os.path.realpath(to)
        return self._fetch(remote_root, name, dest, dest, progress)

    def _fetch(self, remote_root: str, sub: str, local_root: str, guard: str,
               progress: Optional[Progress], baseline: Optional[Dict[str, str]] = None,
               exclude: Sequence[str] = ()) -> StageReport:
        t0 = time.monotonic()
        _ch, listing = self._ask({"cmd": "list", "root": remote_root, "dir": sub})
        report = StageReport(refused=[(r, why) for r, why in listing["refused"]])
        wanted: List[Tuple[str, str, int, str]] = []
        memo = HashCache(self.hash_cache_path)
        try:
            for rel, size, _mtime, sha in listing["files"]:
                if _excluded(rel, exclude):
                    continue
                report.files += 1
                report.bytes_total += size
                report.hashes[rel] = sha
                if baseline and baseline.get(rel) == sha:
                    report.unchanged += 1  # what we sent, untouched by the job
                    continue
                dest = self._guarded(local_root, guard, rel, report)
                if dest is None:
                    continue
                if os.path.isfile(dest) and not os.path.islink(dest) and \
                        os.path.getsize(dest) == size and memo.get(dest) == sha:
                    report.unchanged += 1
                    continue
                wanted.append((rel, dest, size, sha))
        finally:
            memo.close()
        for rel, target in listing["links"]:
            if _excluded(rel, exclude):
                continue
            self._link(local_root, guard, rel, target, report)
        if wanted:
            self._receive(remote_root, wanted, report, progress)
        report.seconds = time.monotonic() - t0
        return report

    @staticmethod
    def _guarded(local_root: str, guard: str, rel: str, report: StageReport) -> Optional[str]:
        dest = os.path.join(local_root, rel)
        parent = os.path.realpath(os.path.dirname(dest))
        if os.path.isabs(rel) or ".." in rel.split(os.sep) or not (
                parent == guard or parent.startswith(guard + os.sep)) or (
                os.path.islink(dest) and not os.path.realpath(dest).startswith(guard + os.sep)):
            report.refused.append((rel, "would be written outside %s" % guard))
            return None
        return dest

    def _link(self, local_root: str, guard: str, rel: str, target: str,
              report: StageReport) -> None:
        dest = self._guarded(local_root, guard, rel, report)
        if dest is None:
            return
        resolved = os.path.realpath(os.path.join(os.path.dirname(dest), target))
        if not resolved.startswith(os.path.realpath(local_root) + os.sep):
            report.refused.append((rel, "symbolic link to %s, outside the project" % target))
            return
        if os.path.islink(dest) and os.readlink(dest) == target:
            return
        tmp = dest + ".cloudexec-part"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, dest)
        report.fetched.append(rel)

    def _receive(self, remote_root: str, wanted: List[Tuple[str, str, int, str]],
                 report: StageReport, progress: Optional[Progress]) -> None:
        total = sum(w[2] for w in wanted)
        ch, header = self._ask({"cmd": "send", "root": remote_root,
                                "paths": [w[0] for w in wanted]}, bulk=self._wants_bulk(total))
        bad: List[str] = []
        try:
            for i, (rel, dest, _size, _sha) in enumerate(wanted):
                if i:
                    header = ch.line()
                tmp = dest + ".cloudexec-part"
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                h = hashlib.sha256()
                with open(tmp, "wb") as f:
                    left = header["size"]
                    while left:
                        block = ch.out.read(min(BLOCK, left))
                        if not block:
                            raise StagingError("connection to %s lost while receiving %s"
                                               % (self.cluster.name, rel))
                        f.write(block)
                        h.update(block)
                        left -= len(block)
                        _tick(progress, report, len(block), total, i, len(wanted))
                trailer = ch.line()
                if h.hexdigest() != trailer["sha256"]:
                    os.unlink(tmp)
                    bad.append(rel)
                    continue
                os.replace(tmp, dest)
                report.hashes[rel] = trailer["sha256"]
                report.fetched.append(rel)
        except BaseException:
            self._drop(ch)
            raise
        if bad:
            raise StagingError("files from %s arrived corrupted and were not kept: %s"
                               % (self.cluster.name, ", ".join(bad)))

    # ---- cache ---------------------------------------------------------------------------

    def mirrors(self) -> Dict[str, dict]:
        """Bytes and files each project mirror on the cluster has received, by mirror name."""
        rows = self._ask({"cmd": "mirrors"})[1]["mirrors"]
        return {r["mirror"].split("/", 1)[-1]: r for r in rows}

    def cache_info(self, gc: bool = False) -> dict:
        """Entries and bytes in the cluster's cache; with *gc*, drop unlinked entries first."""
        return self._ask({"cmd": "cache", "gc": gc})[1]


@dataclass
class _Batch:
    files: List[Tuple[str, str, int, str]]  # (mirror path, local path, size, sha256)
    dirs: List[str]
    fresh_bytes: int  # bytes the hash memo did not know: likely new content
    answer: Optional[dict] = None  # the cluster's answer to its check, once read


class _Batches:
    """Walks and hashes the files in a thread, at most two batches ahead of the sender
    (hashlib and file reads release the GIL, so both cores work)."""

    _END = object()

    def __init__(self, stager: "Stager", project_root: str, paths: Sequence[str],
                 exclude: Sequence[str]):
        self._q: "queue.Queue" = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloudexec-hash", daemon=True,
                                        args=(stager, project_root, paths, exclude))
        self._thread.start()

    def _run(self, stager: "Stager", project_root: str, paths: Sequence[str],
             exclude: Sequence[str]) -> None:
        try:
            memo = HashCache(stager.hash_cache_path)
        except BaseException as e:  # noqa: B036 - handed to the consumer
            self._put(e)
            return
        try:
            pending: List[Tuple[str, _Local]] = []
            dirs: List[str] = []
            size = 0

            def batch() -> _Batch:
                nonlocal size
                size = 0
                before = memo.hashed_bytes
                shas = memo.get_many([(e.real, e.st) for _r, e in pending])
                files = [(rel, e.path, e.st.st_size, sha)
                         for (rel, e), sha in zip(pending, shas)]
                b = _Batch(files, list(dirs), memo.hashed_bytes - before)
                pending.clear()
                dirs.clear()
                return b

            for rel, entry in stager.walk(project_root, paths, exclude):
                if entry is None:
                    dirs.append(rel)
                    continue
                pending.append((rel, entry))
                size += entry.st.st_size
                if (len(pending) >= BATCH or size >= BATCH_BYTES) and not self._put(batch()):
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
    a folder met again through a link cycle is skipped."""
    if _excluded(rel, exclude):
        return
    real_dir = os.path.realpath(folder)
    st = os.stat(real_dir)
    if (st.st_dev, st.st_ino) in seen:
        return
    seen.add((st.st_dev, st.st_ino))
    yield rel, None
    subdirs = []
    with os.scandir(folder) as it:  # streamed: a folder of 100,000 files costs no memory
        for e in it:
            frel = os.path.join(rel, e.name) if rel != "." else e.name
            try:
                if e.is_dir():
                    subdirs.append((e.path, frel))
                    continue
                if exclude and _excluded(frel, exclude):
                    continue
                fst = e.stat()
            except FileNotFoundError:
                raise StagingError("input %s is a broken link" % e.path) from None
            real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_dir, e.name)
            yield frel, _Local(e.path, real, fst)
    subdirs.sort()
    for path, srel in subdirs:
        yield from _walk_dir(path, srel, exclude, seen)


def _excluded(rel: str, prefixes: Sequence[str]) -> bool:
    rel = rel.rstrip("/") + "/"
    return any(rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def _tick(progress: Optional[Progress], report: StageReport, n: int, total: int, i: int,
          files: int) -> None:
    report.bytes_sent += n
    if progress is not None:
        progress(report.bytes_sent, total, i, files)
