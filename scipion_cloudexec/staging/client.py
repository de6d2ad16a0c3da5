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
import json
import os
import shlex
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple


from ..agent import bundle
from ..config import ClusterConfig
from ..transport.ssh import SSHConnection
from .hashing import BLOCK, HashCache

#: progress(done_bytes, total_bytes, done_files, total_files)
Progress = Callable[[int, int, int, int], None]
WINDOW = 16 << 20  # SSH window: keeps a long or slow link busy
BATCH = 2000  # files per request: bounds memory on both sides


class StagingError(RuntimeError):
    """Staging failed; the message names the files and what to do."""


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


class _Channel:
    """The cluster's staging server (``python agent.zip stage serve``) on one exec channel,
    kept open so each request costs no new SSH session."""

    NO_BUNDLE = 97

    def __init__(self, ssh: SSHConnection, cluster: ClusterConfig):
        self.cluster = cluster
        self.chan = ssh._require().open_session(window_size=WINDOW, max_packet_size=32768)
        # no progress for this long means a dead link (a cut link drops packets silently)
        self.chan.settimeout(max(10.0, 6 * cluster.heartbeat))
        # one SSH session: test for the bundle and start the server in the same command
        self.chan.exec_command("test -s %s || exit %d\n%s" % (
            shlex.quote(bundle.remote_path(cluster)), self.NO_BUNDLE,
            bundle.command(cluster, "stage", "serve", "--workdir", cluster.workdir)))
        self.out = self.chan.makefile("rb", BLOCK)

    def ready(self) -> bool:
        """False when the cluster lacks this version's bundle (upload it, then retry)."""
        self.send_line({"cmd": "ping"})
        if self.out.readline():
            return True
        if self.chan.recv_exit_status() == self.NO_BUNDLE:
            return False
        raise StagingError("the staging server on %s did not start: %s"
                           % (self.cluster.name, self.stderr() or "no answer"))

    def send_line(self, obj) -> None:
        self.chan.sendall(json.dumps(obj).encode() + b"\n")

    def line(self) -> dict:
        try:
            raw = self.out.readline()
        except socket.timeout:
            raise StagingError("no answer from %s for %.0f s: link or cluster down"
                               % (self.cluster.name, self.chan.gettimeout())) from None
        if not raw:
            raise StagingError("the staging server on %s stopped: %s" % (
                self.cluster.name, self.stderr() or "connection lost"))
        reply = json.loads(raw)
        if isinstance(reply, dict) and reply.get("error") == "failed":
            raise StagingError("staging on %s failed: %s" % (self.cluster.name, reply["detail"]))
        return reply

    def stderr(self) -> str:
        if self.chan.recv_stderr_ready():
            return self.chan.recv_stderr(65536).decode(errors="replace").strip()
        return ""

    @property
    def alive(self) -> bool:
        return not self.chan.closed and not self.chan.exit_status_ready()

    def close(self) -> None:
        try:
            self.chan.shutdown_write()
            self.chan.close()
        except (OSError, EOFError):
            pass


class Stager:
    """Stage files between a local project and its mirror on one cluster.

    Args:
        ssh: a connected SSH connection to the cluster.
        cluster: the cluster's config (workdir, python, env_setup).
        hash_cache: path of the local hash memo (default under ~/.cache).
    """

    def __init__(self, ssh: SSHConnection, cluster: ClusterConfig,
                 hash_cache: Optional[str] = None):
        self.ssh = ssh
        self.cluster = cluster
        self.hash_cache_path = hash_cache or default_hash_cache()
        self._chan: Optional[_Channel] = None

    def _channel(self) -> _Channel:
        """The staging server, started (and the bundle uploaded) on first use."""
        if self._chan is None or not self._chan.alive:
            ch = _Channel(self.ssh, self.cluster)
            if not ch.ready():
                bundle.ensure_uploaded(self.ssh, self.cluster)
                ch = _Channel(self.ssh, self.cluster)
                if not ch.ready():
                    raise StagingError("the staging server on %s cannot start: the agent "
                                       "bundle is missing after upload" % self.cluster.name)
            self._chan = ch
        return self._chan

    def _request(self, request: dict) -> _Channel:
        ch = self._channel()
        try:
            ch.send_line(request)
        except (OSError, EOFError) as e:
            self.close()
            raise StagingError("connection to %s lost: %s" % (self.cluster.name, e)) from None
        return ch

    def close(self) -> None:
        """Stop the staging server on the cluster (a new one starts on next use)."""
        if self._chan is not None:
            self._chan.close()
            self._chan = None

    def mirror(self, project: str) -> str:
        """The project's mirror, relative to the workdir."""
        if not project or "/" in project or project.startswith("."):
            raise StagingError("project name %r cannot name a mirror folder" % project)
        return "projects/" + project

    def mirror_root(self, project: str) -> str:
        return "%s/%s" % (self.cluster.workdir.rstrip("/"), self.mirror(project))

    # ---- stage in ---------------------------------------------------------------------

    def walk(self, project_root: str, paths: Iterable[str],
             exclude: Sequence[str] = ()) -> Iterator[Tuple[str, Optional[str]]]:
        """(mirror-relative path, local path) for every file under *paths*, and (path, None)
        for every folder, lazily. Paths are relative to *project_root* or absolute; absolute
        ones outside the project go under ``_external/`` in the mirror. Symbolic links are
        followed; paths under an *exclude* prefix (relative to the project) are left out."""
        root = os.path.abspath(project_root)
        for p in paths:
            local = p if os.path.isabs(p) else os.path.join(root, p)
            rel = os.path.relpath(os.path.abspath(local), root)
            if rel.startswith(".."):
                rel = os.path.join("_external", os.path.abspath(local).lstrip("/"))
            if os.path.isdir(local):
                for dirpath, _dirs, names in os.walk(local, followlinks=True):
                    drel = os.path.normpath(os.path.join(rel, os.path.relpath(dirpath, local)))
                    if _excluded(drel, exclude):
                        continue
                    yield drel, None
                    for name in sorted(names):
                        frel = os.path.normpath(os.path.join(drel, name))
                        if not _excluded(frel, exclude):
                            yield frel, os.path.join(dirpath, name)
            elif os.path.exists(local):
                if not _excluded(rel, exclude):
                    yield os.path.normpath(rel), local
            else:
                raise StagingError("input %s does not exist (or is a broken link)" % local)

    def stage_in(self, project_root: str, paths: Sequence[str], project: str,
                 progress: Optional[Progress] = None, exclude: Sequence[str] = (),
                 keep_hashes: bool = True) -> StageReport:
        """Make *paths* present in the cluster's mirror of *project*; send only what the
        cluster's cache lacks, resuming partial uploads. Files go in batches of BATCH, so
        memory does not grow with their number (unless *keep_hashes* keeps every file's
        hash in the report, as the executor needs).

        Raises:
            NoSpace: before a batch is sent; StagingError: a file changed during the upload
            or arrived corrupted (nothing wrong is ever linked into the mirror).
        """
        t0 = time.monotonic()
        report = StageReport()
        problems: List[str] = []
        memo = HashCache(self.hash_cache_path)
        files: List[Tuple[str, str, int, str]] = []
        dirs: List[str] = []
        try:
            for rel, local in self.walk(project_root, paths, exclude):
                if local is None:
                    dirs.append(rel)
                    continue
                st = os.stat(local)
                sha = memo.get(os.path.realpath(local), st)
                files.append((rel, local, st.st_size, sha))
                report.files += 1
                report.bytes_total += st.st_size
                if keep_hashes:
                    report.hashes[rel] = sha
                if len(files) >= BATCH:
                    problems += self._stage_batch(project, files, dirs, report, progress)
                    files, dirs = [], []
            problems += self._stage_batch(project, files, dirs, report, progress)
        finally:
            memo.close()
        report.seconds = time.monotonic() - t0
        if problems:
            raise StagingError("staging to %s incomplete:\n  %s\n(files that changed while being "
                               "sent were not recorded; stage again once they are written)"
                               % (self.cluster.name, "\n  ".join(problems)))
        return report

    def _stage_batch(self, project: str, entries: List[Tuple[str, str, int, str]],
                     dirs: List[str], report: StageReport,
                     progress: Optional[Progress]) -> List[str]:
        """One "in" request: returns the problems (files that changed, missing content)."""
        ch = self._request({"cmd": "in", "mirror": self.mirror(project),
                            "files": [[rel, size, sha] for rel, _l, size, sha in entries],
                            "dirs": dirs})
        try:
            answer = ch.line()
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
            self.close()  # the stream is out of step: start afresh next time
            raise
        report.linked += final["linked"]
        report.unchanged += final["unchanged"]
        report.repaired += final["repaired"]
        # the cluster verifies every hash; a mismatch means the file moved while it was read
        changed = sorted({local_of[sha][0] for sha in final.get("bad", [])})
        return ["%s changed during the upload" % c for c in changed] + final["errors"]

    @staticmethod
    def _send_file(ch: _Channel, local: str, size: int, offset: int,
                   tick: Callable[[int], None]) -> None:
        """Send bytes offset..size of *local* (the cluster checks their hash)."""
        with open(local, "rb") as f:
            f.seek(offset)
            left = size - offset
            while left:
                block = f.read(min(BLOCK, left))
                if not block:  # shrank: keep the stream aligned, the hash will fail
                    block = b"\0" * min(BLOCK, left)
                ch.chan.sendall(block)
                left -= len(block)
                tick(len(block))

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
        listing = self._request({"cmd": "list", "root": remote_root, "dir": sub}).line()
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
        ch = self._request({"cmd": "send", "root": remote_root, "paths": [w[0] for w in wanted]})
        total = sum(w[2] for w in wanted)
        bad: List[str] = []
        try:
            for i, (rel, dest, _size, _sha) in enumerate(wanted):
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
            self.close()
            raise
        if bad:
            raise StagingError("files from %s arrived corrupted and were not kept: %s"
                               % (self.cluster.name, ", ".join(bad)))

    # ---- cache ---------------------------------------------------------------------------

    def mirrors(self) -> Dict[str, dict]:
        """Bytes and files each project mirror on the cluster has received, by mirror name."""
        rows = self._request({"cmd": "mirrors"}).line()["mirrors"]
        return {r["mirror"].split("/", 1)[-1]: r for r in rows}

    def cache_info(self, gc: bool = False) -> dict:
        """Entries and bytes in the cluster's cache; with *gc*, drop unlinked entries first."""
        return self._request({"cmd": "cache", "gc": gc}).line()


def _excluded(rel: str, prefixes: Sequence[str]) -> bool:
    rel = rel.rstrip("/") + "/"
    return any(rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def _tick(progress: Optional[Progress], report: StageReport, n: int, total: int, i: int,
          files: int) -> None:
    report.bytes_sent += n
    if progress is not None:
        progress(report.bytes_sent, total, i, files)
