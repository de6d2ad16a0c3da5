"""Moving a project's files to a cluster's mirror and back, over one SSH exec channel each way.

::

    stage_in(paths)                              cluster (python agent.zip stage in)
      manifest [(rel, size, sha256)] -------->   which hashes are not in cache/objects?
      <--- missing [(sha256, resume offset)]     (free space checked first: NoSpace)
      the missing contents, back to back ---->   hash while writing, publish if right
      <--- report                                hard-link every file into the mirror

    gather(run folder, base)
      list ---------------------------------->   files, folders, links under the run folder
      what changed there since the base ----->   send: header, bytes, trailer hash
      write to a new temporary file, verify against the listing, rename; refuse any path
      or link leaving the run folder (the sync model: .sync)

Local files are only read by ``stage_in``; hashes of unchanged files come from a memo in
``~/.cache/scipion-cloudexec/hashes.sqlite``.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple


from ..agent import bundle
from ..config import ClusterConfig
from ..transport.ssh import SSHConnection
from .channels import (InputMissing, LinkLost, NoBundle, OpenSSHChannel, ParamikoChannel,
                       ServerChannel, StagingError, dead_link_seconds)
from .hashing import BLOCK, HashCache, path_state
from .sync import DIR, GatherPlan, plan_gather, under

log = logging.getLogger(__name__)
__all__ = ["Stager", "StageReport", "StagingError", "LinkLost", "InputMissing", "NoSpace",
           "DesktopFull"]

#: progress(done_bytes, total_bytes, done_files, total_files)
Progress = Callable[[int, int, int, int], None]
BATCH = 2000  # files per request: bounds memory on both sides
BATCH_BYTES = 256 << 20  # and bytes: the next batch is hashed while this one travels
# The bulk stream moves ~330 MB/s here vs ~185 MB/s for paramiko but costs a login (~0.5 s):
BULK_START = 128 << 20  # start it for a staging with this much new content
BULK_MIN = 1 << 20  # once it runs, transfers from this size use it
CHECKS_AHEAD = 2  # checks in flight: the cluster checks one batch while we walk the next
EXTERNAL = "_external"  # inputs outside the project, under their absolute path
#: a gather's file still being received (renamed to its real name once verified): another
#: cluster's stage-in walking the same run folder must not send it
TEMP_PREFIX = ".cloudexec-"


class NoSpace(StagingError):
    """The cluster lacks the space the upload needs."""

    def __init__(self, cluster: str, needed: int, free: int):
        super().__init__("not enough space on cluster %s: the upload needs %s, %s are free in "
                         "its workdir; free some (scipion-cloudexec cache %s --gc) or point "
                         "workdir at a larger disk" % (cluster, _size(needed), _size(free), cluster))
        self.needed, self.free = needed, free


class DesktopFull(RuntimeError):
    """The desktop's disk filled up during a gather (not the cluster's fault: no retry
    elsewhere). What arrived complete is in place; nothing half-written is left."""

    def __init__(self, cluster: str, folder: str, needed: int):
        super().__init__("no space left on the desktop in %s while gathering %s from %s: free "
                         "some space there, then Continue the protocol (the cluster keeps the "
                         "job's outputs; they are gathered then)" % (folder, _size(needed),
                                                                      cluster))


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
                    e = LinkLost("the staging server on %s did not start (%s): %s" % (
                        self.cluster.name, ch.kind, ch.stderr() or e))
                self._drop(ch)
                if use_bulk and self.cluster.transfer == "auto" and not ch._greeted:
                    log.warning("OpenSSH transfers to %s unavailable, using paramiko: %s",
                                self.cluster.name, e)
                    self._bulk_refused = True
                    continue
                if isinstance(e, StagingError):
                    raise e from None  # a bare raise would re-raise the OSError, not e
                raise LinkLost("connection to %s lost: %s" % (self.cluster.name, e)) from None
        raise LinkLost("the staging server on %s cannot start: the agent bundle is "
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

    def reset(self, project: str, run_dir: str) -> None:
        """Empty *run_dir* of the mirror (a run starting afresh on this cluster)."""
        self._ask({"cmd": "reset", "mirror": self.mirror(project), "dir": run_dir})

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
            rel = mirror_path(root, local)
            if os.path.isdir(local):
                yield from _walk_dir(local, rel, exclude, set())
            elif os.path.exists(local):
                if not _excluded(rel, exclude):
                    yield rel, _Local(local, os.path.realpath(local), os.stat(local))
            else:
                raise InputMissing("input %s does not exist (or is a broken link)" % local)

    def stage_in(self, project_root: str, paths: Sequence[str], project: str,
                 progress: Optional[Progress] = None, exclude: Sequence[str] = (),
                 keep_hashes: bool = True, run_dir: Optional[str] = None,
                 base: Optional[Dict[str, str]] = None) -> StageReport:
        """Make *paths* present in the cluster's mirror of *project*; send only what the
        cluster's cache lacks, resuming partial uploads. Files go in batches of BATCH, so
        memory does not grow with their number (unless *keep_hashes* keeps every file's
        hash in the report, as the executor needs). A thread walks and hashes the next
        batch while this one travels.

        With *run_dir* (relative to the project) and its *base* (see :mod:`.sync`), the
        files under *run_dir* are synced instead: only those changed locally since the base
        travel, each written only where the mirror still holds its base state, as a
        private copy; what was deleted locally is deleted in the mirror. Paths changed on
        both sides are left alone and listed in ``report.conflicts``.

        Raises:
            NoSpace: before a batch is sent; StagingError: a file changed during the upload
            or arrived corrupted (nothing wrong is ever linked into the mirror).
        """
        t0 = time.monotonic()
        report = StageReport()
        sync = _InSync(run_dir, base) if run_dir is not None else None
        problems: List[str] = []
        self._channel()  # the remote shell and Python start while we walk
        batches = _Batches(self, project_root, paths, exclude)
        checking: "deque[_Batch]" = deque()  # checks sent, answers not read yet
        to_send: List[Tuple[str, str, int, str]] = []  # files whose content the cluster lacks
        fresh = 0
        try:
            for batch in batches:
                if sync is not None:
                    sync.filter(batch, report)
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
            if sync is not None and sync.gone():
                self._delete(project, sync.gone(), report)
        except FileNotFoundError as e:  # a local file went away while staged: not the link
            self.close()
            raise StagingError("%s went away while it was staged to %s; stage again"
                               % (e.filename, self.cluster.name)) from None
        except (OSError, EOFError) as e:
            self.close()
            raise LinkLost("connection to %s lost during the upload (%s); what arrived is "
                               "kept: stage again to resume" % (self.cluster.name, e)) from None
        except BaseException:
            if checking:
                self.close()  # answers left unread: the stream is out of step
            raise
        finally:
            batches.close()
        report.seconds = time.monotonic() - t0
        if sync is not None:
            sync.settle(report)
        if problems:
            raise StagingError("staging to %s incomplete:\n  %s\n(files that changed while being "
                               "sent were not recorded; stage again once they are written)"
                               % (self.cluster.name, "\n  ".join(problems)))
        return report

    def _send_check(self, project: str, batch: "_Batch") -> None:
        """Ask which of the batch's contents the cluster lacks; it links all the others
        into the mirror at once. Answers are read later (several checks in flight)."""
        request = {"cmd": "in", "check": True, "mirror": self.mirror(project), "dirs": batch.dirs,
                   "files": [_entry(f, batch.base) for f in batch.files]}
        if self._chan is not None and self._chan._greeted:
            self._chan.send_line(request)
        else:  # first use: may need the bundle uploaded, which _ask handles
            batch.answer = self._ask(request)[1]

    def _read_check(self, batch: "_Batch", report: StageReport,
                    to_send: List[Tuple[str, str, int, str]]) -> List[str]:
        if batch.answer is None and self._chan is None:
            raise LinkLost("the staging server on %s went away" % self.cluster.name)
        answer = batch.answer if batch.answer is not None else self._chan.line()
        report.linked += answer["linked"]
        report.unchanged += answer["unchanged"]
        report.repaired += answer["repaired"]
        report.conflicts += [(rel, "changed on %s since the last sync" % self.cluster.name)
                             for rel, _now in answer.get("conflicts", [])]
        missing = {sha for sha, _off in answer["missing"]}
        to_send.extend(f + (batch.base.get(f[0]),) if batch.base else f
                       for f in batch.files if f[3] in missing)
        return answer["errors"]

    def _transfer(self, project: str, entries: List[Tuple[str, str, int, str]],
                  report: StageReport, progress: Optional[Progress]) -> List[str]:
        """Send the contents of *entries* (their checks said missing), verified and linked
        by the cluster; on the bulk stream when large. Returns the problems."""
        total_new = sum(e[2] for e in entries)
        entries = list(entries)
        # the server gives up (and lets go of a partial upload) once data stops this long
        request = {"cmd": "in", "mirror": self.mirror(project), "dirs": [],
                   "files": [_entry(e[:4], {e[0]: e[4]} if len(e) > 4 and e[4] is not None
                                    else None) for e in entries],
                   "stall": max(5.0, dead_link_seconds(self.cluster) / 2)}
        ch = None
        try:
            ch, answer = self._ask(request, bulk=self._wants_bulk(total_new))
            if answer.get("error") == "nospace":
                raise NoSpace(self.cluster.name, answer["needed"], answer["free"])
            local_of = {e[3]: (e[1], e[2]) for e in entries}
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
        report.conflicts += [(rel, "changed on %s since the last sync" % self.cluster.name)
                             for rel, _now in final.get("conflicts", [])]
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

    def _delete(self, project: str, paths: List[List[str]], report: StageReport) -> None:
        """Delete ``[rel, state]`` paths in the mirror where they still hold that state."""
        answer = self._ask({"cmd": "rm", "mirror": self.mirror(project), "paths": paths})[1]
        report.conflicts += [(rel, "changed on %s since the last sync" % self.cluster.name)
                             for rel, _now in answer["conflicts"]]

    # ---- stage out ----------------------------------------------------------------------

    def gather(self, project_root: str, project: str, run_dir: str, base: Dict[str, str],
               exclude: Sequence[str] = (), progress: Optional[Progress] = None
               ) -> StageReport:
        """Bring what changed in the mirror's *run_dir* since *base* into the local run
        folder (three-way, see :mod:`.sync`): files, folders (empty ones too), links that
        stay inside the run folder, deletions. A path that changed locally too is left
        alone and listed in ``report.conflicts``; a file that changed while it was sent
        is left for the next gather (``report.deferred``); FIFOs, sockets and devices are
        listed in ``report.skipped``. ``report.agreed`` holds the new base states."""
        t0 = time.monotonic()
        root = os.path.realpath(project_root)
        run_dir = os.path.normpath(run_dir)
        guard = os.path.realpath(os.path.join(root, run_dir))
        remote_root = self.mirror_root(project)
        _ch, listing = self._ask({"cmd": "list", "root": remote_root, "dir": run_dir,
                                  "exclude": [os.path.relpath(e, run_dir) for e in exclude]})
        if not listing.get("exists", True):
            raise StagingError("the run folder %s is gone from the mirror on %s: nothing was "
                               "changed locally; Restart the protocol" % (run_dir, self.cluster.name))
        report = StageReport(refused=[tuple(r) for r in listing["refused"]],
                             skipped=[tuple(r) for r in listing.get("skipped", [])])
        remote: Dict[str, str] = {run_dir: DIR}
        sizes: Dict[str, int] = {}
        for rel, size, _mtime, sha in listing["files"]:
            remote[rel], sizes[rel] = sha, size
        remote.update((rel, DIR) for rel in listing.get("dirs", []))
        remote.update((rel, "l:" + target) for rel, target in listing["links"])
        for rel in [k for k in remote if not under(k, run_dir)]:  # no real walk says so
            report.refused.append((rel, "outside %s" % run_dir))
            del remote[rel]
        remote = {k: v for k, v in remote.items() if not _excluded(k, exclude)}
        base = {k: v for k, v in base.items() if under(k, run_dir) and not _excluded(k, exclude)}
        memo = HashCache(self.hash_cache_path)
        try:
            plan = plan_gather(remote, sizes, base,
                               lambda rel: path_state(os.path.join(root, rel), memo),
                               self.cluster.name)
        finally:
            memo.close()
        report.files = len(sizes)
        report.bytes_total = sum(sizes.values())
        report.conflicts = plan.conflicts
        report.agreed.update(plan.agreed)
        self._apply(plan, root, guard, remote_root, report, progress)
        report.seconds = time.monotonic() - t0
        return report

    def _apply(self, plan: GatherPlan, root: str, guard: str, remote_root: str,
               report: StageReport, progress: Optional[Progress]) -> None:
        """Carry out a gather plan: files and links out of the way, folders, contents and
        links, then folders the cluster removed (when empty)."""
        def dest_of(rel: str) -> Optional[str]:
            return self._guarded(root, guard, rel, report)

        for rel, here in plan.delete:
            if here != DIR and (dest := dest_of(rel)) is not None:
                os.unlink(dest)
                report.agreed[rel] = ""  # a folder made in its place below says so
        for rel in sorted(plan.mkdirs, key=lambda r: r.count("/")):
            if (dest := dest_of(rel)) is not None:
                os.makedirs(dest, exist_ok=True)
                report.agreed[rel] = DIR
        for rel, target in plan.links:
            if self._link(root, guard, rel, target, report):
                report.agreed[rel] = "l:" + target
        wanted = [(rel, dest, size, sha) for rel, size, sha in plan.fetch
                  if (dest := dest_of(rel)) is not None]
        if wanted:
            self._receive(remote_root, wanted, report, progress)
            fetched = set(report.fetched)
            report.agreed.update((rel, sha) for rel, _d, _s, sha in wanted if rel in fetched)
        for rel, here in sorted(plan.delete, key=lambda x: -x[0].count("/")):
            if here == DIR and (dest := dest_of(rel)) is not None:
                try:
                    os.rmdir(dest)
                    report.agreed[rel] = ""
                except OSError:  # holds files made here since: they go up next time
                    pass

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
               progress: Optional[Progress]) -> StageReport:
        t0 = time.monotonic()
        _ch, listing = self._ask({"cmd": "list", "root": remote_root, "dir": sub})
        report = StageReport(refused=[(r, why) for r, why in listing["refused"]])
        wanted: List[Tuple[str, str, int, str]] = []
        memo = HashCache(self.hash_cache_path)
        try:
            for rel, size, _mtime, sha in listing["files"]:
                report.files += 1
                report.bytes_total += size
                report.hashes[rel] = sha
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
            self._link(local_root, guard, rel, target, report)
        if wanted:
            self._receive(remote_root, wanted, report, progress)
        if report.deferred:
            raise StagingError("files on %s changed while they were fetched: %s; fetch again "
                               "once they are written" % (self.cluster.name,
                                                          ", ".join(report.deferred)))
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
              report: StageReport) -> bool:
        """Make the symbolic link *rel* -> *target*, only if it resolves inside *guard*."""
        dest = self._guarded(local_root, guard, rel, report)
        if dest is None:
            return False
        resolved = os.path.realpath(os.path.join(os.path.dirname(dest), target))
        if not resolved.startswith(guard + os.sep):
            report.refused.append((rel, "symbolic link to %s, outside %s" % (target, guard)))
            return False
        if os.path.islink(dest) and os.readlink(dest) == target:
            return True
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = _temp_name(dest)
        os.symlink(target, tmp)  # fails rather than follow anything already there
        os.replace(tmp, dest)
        report.fetched.append(rel)
        return True

    def _receive(self, remote_root: str, wanted: List[Tuple[str, str, int, str]],
                 report: StageReport, progress: Optional[Progress]) -> None:
        """Receive files ``(rel, dest, size, sha)``, *sha* from the listing. Each lands in
        a new temporary file beside *dest* (created exclusively, never through a link) and
        is renamed into place only with the listing's hash; one that changed since the
        listing goes to ``report.deferred``, a corrupted one fails the gather."""
        total = sum(w[2] for w in wanted)
        ch, header = self._ask({"cmd": "send", "root": remote_root,
                                "paths": [w[0] for w in wanted]}, bulk=self._wants_bulk(total))
        bad: List[str] = []
        try:
            for i, (rel, dest, _size, sha) in enumerate(wanted):
                if i:
                    header = ch.line()
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                h = hashlib.sha256()
                fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=os.path.dirname(dest))
                try:
                    with os.fdopen(fd, "wb") as f:
                        left = header["size"]
                        while left:
                            block = ch.out.read(min(BLOCK, left))
                            if not block:
                                raise LinkLost("connection to %s lost while receiving %s"
                                                   % (self.cluster.name, rel))
                            f.write(block)
                            h.update(block)
                            left -= len(block)
                            _tick(progress, report, len(block), total, i, len(wanted))
                    trailer = ch.line()
                    got = h.hexdigest()
                    if got == sha:
                        os.chmod(tmp, 0o666 & ~_UMASK)
                        os.replace(tmp, dest)
                        report.hashes[rel] = sha
                        report.fetched.append(rel)
                    elif got == trailer["sha256"]:
                        report.deferred.append(rel)  # written to while sent: next time
                    else:
                        bad.append(rel)
                finally:
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
        except OSError as e:
            self._drop(ch)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DesktopFull(self.cluster.name, os.path.dirname(wanted[0][1]),
                                  sum(w[2] for w in wanted)) from None
            raise
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

    def cache_info(self, gc: bool = False, min_age: float = 3600.0) -> dict:
        """Entries and bytes in the cluster's cache; with *gc*, first drop entries no mirror
        links to that are at least *min_age* seconds old (younger ones may be on their way
        into a mirror of a staging under way)."""
        return self._ask({"cmd": "cache", "gc": gc, "min_age": min_age})[1]


@dataclass
class _Batch:
    files: List[Tuple[str, str, int, str]]  # (mirror path, local path, size, sha256)
    dirs: List[str]
    fresh_bytes: int  # bytes the hash memo did not know: likely new content
    answer: Optional[dict] = None  # the cluster's answer to its check, once read
    base: Optional[Dict[str, Tuple[str, bool]]] = None  # run-folder files: (state they
    # replace, shared from the cache)


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
    with os.scandir(folder) as it:  # streamed: a folder of 100,000 files costs no memory
        for e in it:
            if e.name.startswith(TEMP_PREFIX):
                continue
            frel = os.path.join(rel, e.name) if rel != "." else e.name
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


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _temp_name(dest: str) -> str:
    return os.path.join(os.path.dirname(dest), TEMP_PREFIX + os.urandom(6).hex())


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

    def __init__(self, run_dir: str, base: Optional[Dict[str, str]]):
        self.prefix = os.path.normpath(run_dir)
        self.base = {k: v for k, v in (base or {}).items() if under(k, self.prefix)}
        self.seen: set = set()
        self.sent: Dict[str, str] = {}
        self.removed: List[List[str]] = []

    def filter(self, batch: "_Batch", report: StageReport) -> None:
        dirs = []
        for d in batch.dirs:
            if under(d, self.prefix):
                self.seen.add(d)
                if self.base.get(d) == DIR:
                    continue
                self.sent[d] = DIR
            dirs.append(d)
        files, replaced = [], {}
        for f in batch.files:
            rel, local, _size, sha = f
            if under(rel, self.prefix):
                self.seen.add(rel)
                was = self.base.get(rel, "")
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

    def gone(self) -> List[List[str]]:
        """Paths the base holds that the local run folder no longer has."""
        if not self.removed:
            self.removed = [[p, s] for p, s in self.base.items() if p not in self.seen]
        return self.removed

    def settle(self, report: StageReport) -> None:
        clash = {rel for rel, _why in report.conflicts}
        report.agreed.update((p, s) for p, s in self.sent.items() if p not in clash)
        report.agreed.update((p, "") for p, _s in self.removed if p not in clash)
