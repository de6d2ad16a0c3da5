"""Moving a project's files to a cluster's mirror and back, over one SSH exec channel each way.

::

    stage_in(paths)                              cluster (python agent.zip stage in)
      check: manifest [(rel, size, sha256)] ->   which hashes are not in cache/objects?
                                                 hard-link every file it has into the mirror
      <--- missing [(sha256, resume offset)]
      then, per request of missing files:
      manifest ------------------------------>   (free space checked first: NoSpace)
      <--- missing [(sha256, resume offset)]
      the missing contents, back to back ---->   hash while writing, publish if right
      <--- report                                hard-link every file into the mirror

    gather(run folder, base)
      list ---------------------------------->   files, folders, links under the run folder
      what changed there since the base ----->   send: header, bytes, trailer hash
      write to a new temporary file, verify against the listing, rename; refuse any path
      or link leaving the run folder (the sync model: .sync)

Local files are only read by ``stage_in``; hashes of unchanged files come from a memo in
``~/.cache/scipion-cloudexec/hashes.sqlite``. With much new content, what the checks say
missing travels over several OpenSSH streams while the walk and the checks go on
(:mod:`.batches`); large files go in chunks (:mod:`.streams`).

Over 400 lines: ``stage_in``'s pipeline (checks in flight, a missing bundle, transfers on
three carriers) and its error handling read best in one class; the walk is in
:mod:`.local_files`, the uploader in :mod:`.batches`, the receiving side in :mod:`.gather`.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..config import ClusterConfig
from ..remote.hashing import BLOCK
from ..remote.stage_protocol import CacheInfo, Mirrors, Remove, Request, Reset, StageIn
from . import batches as batches_mod
from . import bundle
from .batches import BatchUploader, SmallFilesOverStreams
from . import endpoints
from .channels import (EndpointRefused, ForwardedChannel, NoBundle, OpenSSHChannel,
                       ParamikoChannel, ServerChannel, dead_link_seconds)
from .errors import DesktopFull, InputMissing, LinkLost, NoSpace, StagingError
from .gather import Gathering
from .remote_tree import RemoteTree
from .watch import RunFolderWatch
from .local_files import (BATCH, BATCH_BYTES, Progress, StageReport, _Batch, _Batches, _entry,
                          _excluded, _InSync, _Local, _tick, _walk_dir, mirror_path)
from .ssh import SSHConnection
from . import streams

log = logging.getLogger(__name__)
__all__ = ["Stager", "StageReport", "StagingError", "LinkLost", "InputMissing", "NoSpace",
           "DesktopFull"]  # the staging errors live in .errors with the rest of the family

BULK_START = 128 << 20  # start it for a staging with this much new content
BULK_MIN = 1 << 20  # once it runs, transfers from this size use it
CHECKS_AHEAD = 8  # checks in flight: the cluster checks while we walk, and a long round trip
# is paid once for several batches (a walk ahead of the checks had waited 1 RTT per 2)


def default_hash_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "scipion-cloudexec", "hashes.sqlite")



class Stager(Gathering, SmallFilesOverStreams):
    """Stage files between a local project and its mirror on one cluster.

    Requests and small transfers use an exec channel of *ssh*; when the cluster's
    ``transfer`` setting allows, a staging with ``batches.START_AT`` bytes of new content
    sends its small files over several streams of the system's OpenSSH client
    (:mod:`.batches`), large ones in chunks (:mod:`.streams`), and otherwise batches of
    more than ``BULK_START`` bytes (or ``BULK_MIN`` once it runs) go through one OpenSSH
    stream (see :mod:`.channels`).

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
        self._pool: Optional[streams.StreamPool] = None
        self._trees: Dict[tuple, RemoteTree] = {}  # run folders as last listed (gather)
        #: the agent's staging endpoint ({"port", "token"}), as last learnt
        self.endpoint: Optional[dict] = endpoints.load(cluster, bundle.build()[1])

    def _channel(self, bulk: bool = False) -> ServerChannel:
        """The staging server on the control (or bulk) stream, started on first use."""
        if bulk and not self._bulk_refused:
            if self._bulk_chan is None or not self._bulk_chan.alive:
                self._bulk_chan = OpenSSHChannel(self.cluster)
            return self._bulk_chan
        if self._chan is None or not self._chan.alive:
            self._chan = self._control()
        return self._chan

    def _control(self) -> ServerChannel:
        """A server on a channel of our connection: the agent's staging endpoint when it is
        known (no remote shell), else one started by an exec."""
        return self._via_endpoint(lambda e: ForwardedChannel(self.ssh, self.cluster, e),
                                  lambda: ParamikoChannel(self.ssh, self.cluster))

    def _via_endpoint(self, through: Callable[[dict], ServerChannel],
                      started: Callable[[], ServerChannel]) -> ServerChannel:
        """*through* the known endpoint; one it refuses is forgotten, and *started* (a
        server started by an exec) serves instead."""
        endpoint = self.endpoint  # once: a stream of the pool may forget it meanwhile
        if endpoint is not None:
            try:
                return through(endpoint)
            except EndpointRefused as e:
                log.info("%s: the staging endpoint at port %s is not usable (%s): a staging "
                         "server starts over SSH instead", self.cluster.name,
                         endpoint.get("port"), e)
                self.use_endpoint(None)
        return started()

    def use_endpoint(self, stage: Optional[dict], version: Optional[str] = None,
                     agent: Optional[dict] = None) -> None:
        """Stage through the agent's endpoint *stage* (its ``READY`` line's ``stage``) from
        now on, and remember it (with the *agent*'s state) for the next process; None
        forgets both."""
        self.endpoint = stage
        if stage is None:
            endpoints.forget(self.cluster)
        else:
            endpoints.save(self.cluster, version or bundle.build()[1], stage, agent)

    def prepare(self, again: bool = False) -> None:
        """Start the control stream's staging server now, so that its start (a remote shell
        and Python) overlaps other work, the agent's start; whatever fails here fails
        again, and is reported, on first use. *again*: replace the one started early
        (before the bundle was uploaded: it exits for want of it)."""
        if again and self._chan is not None and not self._chan._greeted:
            self._drop(self._chan)
        if self._chan is None and self.endpoint is None:  # the endpoint answers at once
            try:
                self._chan = ParamikoChannel(self.ssh, self.cluster)
            except Exception as e:  # noqa: BLE001  (paramiko's own errors are no OSError)
                log.debug("%s: staging server not started early: %s", self.cluster.name, e)

    @property
    def bulk_available(self) -> bool:
        return not self._bulk_refused

    def _new_pool(self) -> streams.StreamPool:
        """Parallel streams: OpenSSH logins, or channels of our paramiko connection where
        OpenSSH is not the carrier (``transfer = paramiko``, or ``auto`` without it)."""
        if self._bulk_refused:
            return streams.StreamPool(self.cluster, self._control)
        return streams.StreamPool(self.cluster, self._bulk_stream)

    def _bulk_stream(self) -> ServerChannel:
        """An OpenSSH stream of the pool (made in the stream's own thread): to the agent's
        staging endpoint when it is known (``ssh -W``: no remote shell), else a server
        started by an exec."""
        return self._via_endpoint(lambda e: OpenSSHChannel(self.cluster, endpoint=e),
                                  lambda: OpenSSHChannel(self.cluster))

    def _wants_bulk(self, size: int) -> bool:
        running = self._bulk_chan is not None and self._bulk_chan.alive
        asked = self.cluster.transfer == "openssh"  # chosen by the user: worth a login
        return size >= (BULK_MIN if running or asked else BULK_START)

    def _ask(self, request: Request, bulk: bool = False) -> Tuple[ServerChannel, dict]:
        """Send *request* to the server and read its first answer; uploads the agent bundle
        when the cluster lacks it. In ``auto`` mode a bulk stream that cannot start is
        reported once and replaced by the control stream."""
        for attempt in range(2):
            use_bulk = bulk and not self._bulk_refused
            ch = self._channel(use_bulk)
            try:
                ch.send(request)
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
        if self._pool is not None:
            self._pool.close()

    def mirror(self, project: str) -> str:
        """The project's mirror, relative to the workdir."""
        if not project or "/" in project or project.startswith("."):
            raise StagingError("project name %r cannot name a mirror folder" % project)
        return "projects/" + project

    def reset(self, project: str, run_dir: str) -> None:
        """Empty *run_dir* of the mirror (a run starting afresh on this cluster)."""
        self._ask(Reset(mirror=self.mirror(project), dir=run_dir))

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
                 base: Optional[Dict[str, str]] = None,
                 watch: Optional[RunFolderWatch] = None) -> StageReport:
        """Make *paths* present in the cluster's mirror of *project*; send only what the
        cluster's cache lacks, resuming partial uploads. Files go in batches of BATCH, so
        memory does not grow with their number (unless *keep_hashes* keeps every file's
        hash in the report, as the executor needs). A thread walks and hashes the next
        batch while this one's check travels (the first batch is small: its check leaves
        early); with much new content, what the checks say missing goes over several
        OpenSSH streams while the walk and the checks go on.

        With *run_dir* (relative to the project) and its *base* (see :mod:`.sync`), the
        files under *run_dir* are synced instead: only those changed locally since the base
        travel, each written only where the mirror still holds its base state, as a
        private copy; what was deleted locally is deleted in the mirror. Paths changed on
        both sides are left alone and listed in ``report.conflicts``. With *watch* (of that
        run folder, used by this cluster's stage-ins only), only the paths it names are
        looked at when it can vouch for the others; else it is set up before a full walk.

        Raises:
            NoSpace: before a batch is sent; StagingError: a file changed during the upload
            or arrived corrupted (nothing wrong is ever linked into the mirror).
        """
        t0 = time.monotonic()
        report = StageReport()
        changed = None
        if watch is not None and run_dir is not None:
            if [os.path.normpath(p) for p in paths] == [os.path.normpath(run_dir)]:
                changed = watch.changes()
            if changed is None:
                watch.start()  # before the walk: what changes during it is an event
        sync = _InSync(run_dir, base, scope=changed) if run_dir is not None else None
        problems: List[str] = []
        batches = _Batches(self, project_root, paths, exclude,  # the walk starts first
                           entries=None if changed is None or watch is None
                           else watch.entries(*changed))
        try:
            self._channel()  # the remote shell and Python start while we walk
        except BaseException:
            batches.close()
            raise
        checking: "deque[_Batch]" = deque()  # checks sent, answers not read yet
        to_send: List[Tuple[str, str, int, str]] = []  # files whose content the cluster lacks
        fresh = 0
        up: Optional[BatchUploader] = None  # small files over the pool's streams
        aborted = False

        def read_check() -> None:
            nonlocal up
            problems.extend(self._read_check(project, checking, report, to_send))
            if up is None and self._parallel_ok() and (
                    sum(f[2] for f in to_send) >= batches_mod.START_AT):
                up = self._uploader(project, report, progress)
            if up is not None:  # at once: small ones in requests, large ones in chunks
                up.put(list(to_send))
                to_send[:] = []

        try:
            try:
                for batch in batches:
                    if sync is not None:
                        sync.filter(batch, report)
                    report.files += len(batch.files)
                    report.bytes_total += sum(f[2] for f in batch.files)
                    if keep_hashes:
                        report.hashes.update((f[0], f[3]) for f in batch.files)
                    fresh += batch.fresh_bytes
                    if sync is not None and not batch.files and not batch.dirs:
                        continue  # the run folder as the base has it: no request (issue 13)
                    if up is None and fresh >= batches_mod.START_AT and self._parallel_ok():
                        up = self._uploader(project, report, progress)  # logins start now
                    elif up is None and self.bulk_available and self._wants_bulk(fresh):
                        self._channel(bulk=True)  # much new content ahead: start the fast stream
                    self._send_check(project, batch, checking)
                    # with streams waiting for work, answers are read at once
                    while len(checking) > (1 if up is not None else CHECKS_AHEAD):
                        read_check()
                    if len(to_send) >= BATCH or sum(f[2] for f in to_send) >= BATCH_BYTES:
                        while checking:  # the control stream must be idle for a transfer
                            read_check()
                        up = self._settle(up, report, problems, to_send)  # frees the streams
                        problems += self._transfer(project, to_send, report, progress)
                        to_send = []
                while checking:
                    read_check()
                up = self._settle(up, report, problems, to_send)
                if to_send:
                    problems += self._transfer(project, to_send, report, progress)
                if sync is not None and sync.removals():
                    self._delete(project, sync.removals(), report)
                    held = sync.release(report)  # a path of another kind replaces one
                    if held is not None:
                        self._send_check(project, held, checking)
                        while checking:
                            read_check()
                        up = self._settle(up, report, problems, to_send)
                        if to_send:
                            problems += self._transfer(project, to_send, report, progress)
            except BaseException:
                if up is not None:  # its threads stop before the streams are closed
                    up.abort()
                    up, aborted = None, True
                raise
        except FileNotFoundError as e:  # a local file went away while staged: not the link
            self.close()
            raise StagingError("%s went away while it was staged to %s; stage again"
                               % (e.filename, self.cluster.name)) from None
        except (OSError, EOFError) as e:
            self.close()
            raise LinkLost("connection to %s lost during the upload (%s); what arrived is "
                               "kept: stage again to resume" % (self.cluster.name, e)) from None
        except BaseException:
            if checking or aborted:
                self.close()  # answers left unread: the streams are out of step
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

    def _check_request(self, project: str, batch: "_Batch") -> StageIn:
        return StageIn(check=True, mirror=self.mirror(project), dirs=batch.dirs,
                       files=[_entry(f, batch.base) for f in batch.files])

    def _send_check(self, project: str, batch: "_Batch", checking: "deque[_Batch]") -> None:
        """Ask which of the batch's contents the cluster lacks; it links all the others
        into the mirror at once. Answers are read later (several checks in flight), even
        the first one's: a server that cannot start is dealt with then."""
        ch = self._chan if checking else self._channel()  # never a new one in mid-flight
        checking.append(batch)
        if ch is None:
            return  # dropped by a failed read: that read raised already
        try:
            ch.send(self._check_request(project, batch))
        except OSError:
            if ch._greeted:
                raise
            # not started (bundle missing, ssh refused): the first answer says why

    def _read_check(self, project: str, checking: "deque[_Batch]", report: StageReport,
                    to_send: List[Tuple[str, str, int, str]]) -> List[str]:
        """Read the answer to the oldest check in flight. A server that exited for want of
        the agent bundle gets it uploaded, and every check in flight is sent again."""
        for attempt in range(2):
            ch = self._chan
            if ch is None:
                raise LinkLost("the staging server on %s went away" % self.cluster.name)
            try:
                answer = ch.line()
                break
            except NoBundle:
                self._drop(ch)
                if attempt:
                    raise LinkLost("the staging server on %s cannot start: the agent bundle "
                                   "is missing after upload" % self.cluster.name) from None
                bundle.ensure_uploaded(self.ssh, self.cluster)
                ch = self._channel()
                for b in checking:
                    ch.send(self._check_request(project, b))
                if self._pool is not None:  # streams that exited for want of it: log in
                    for i in range(len(self._pool.channels)):  # again now (their workers
                        self._pool._chan(i)  # wait for work: the answers are still to come)
            except (OSError, EOFError) as e:
                if ch._greeted:
                    raise
                self._drop(ch)
                raise LinkLost("the staging server on %s did not start (%s): %s" % (
                    self.cluster.name, ch.kind, ch.stderr() or e)) from None
        batch = checking.popleft()
        missing = {sha for sha, _off in answer["missing"]}
        to_send.extend(f + (batch.base.get(f[0]),) if batch.base else f
                       for f in batch.files if f[3] in missing)
        return self._reported(batch.files, answer, report)

    def _reported(self, entries: List[tuple], final: dict, report: StageReport) -> List[str]:
        """Count a transfer's report; the problems it names."""
        report.linked += final["linked"]
        report.unchanged += final["unchanged"]
        report.repaired += final["repaired"]
        report.conflicts += [(rel, "changed on %s since the last sync" % self.cluster.name)
                             for rel, _now in final.get("conflicts", [])]
        # the cluster verifies every hash; a mismatch means the file moved while it was read
        local_of = {e[3]: e[1] for e in entries}
        changed = sorted({local_of[sha] for sha in final.get("bad", [])})
        return ["%s changed during the upload" % c for c in changed] + final["errors"]

    def _upload_request(self, project: str, entries: List[tuple]) -> StageIn:
        """The StageIn sending *entries*' contents (their checks said missing)."""
        # the server gives up (and lets go of a partial upload) once data stops this long
        return StageIn(mirror=self.mirror(project),
                       files=[_entry(e[:4], {e[0]: e[4]} if len(e) > 4 and e[4] is not None
                                     else None) for e in entries],
                       stall=max(5.0, dead_link_seconds(self.cluster) / 2))

    def _transfer(self, project: str, entries: List[Tuple[str, str, int, str]],
                  report: StageReport, progress: Optional[Progress]) -> List[str]:
        """Send the contents of *entries* (their checks said missing), verified and linked
        by the cluster; on the bulk stream when large. Returns the problems."""
        problems_chunked, chunked = self._chunked(project, entries, report, progress)
        entries = [e for e in entries if e[3] not in chunked]  # linked already, or not sent
        if not entries:
            return problems_chunked
        total_new = sum(e[2] for e in entries)
        request = self._upload_request(project, entries)
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
        return problems_chunked + self._reported(entries, final, report)

    @property
    def streams_used(self) -> int:
        """Parallel streams the last upload over several streams used or, for chunks,
        ended with (0: none ran)."""
        return self._pool.used if self._pool is not None else 0

    def _chunked(self, project: str, entries: List[Tuple[str, str, int, str]],
                 report: StageReport, progress: Optional[Progress]) -> Tuple[List[str], set]:
        """Files of CHUNKED_MIN bytes or more go in chunks over parallel streams
        (:class:`.batches.BatchUploader`) into the cluster's cache and are linked there.
        Returns (the problems, the shas sent this way)."""
        big = [e for e in entries if e[2] >= streams.CHUNKED_MIN]
        if not big or not self._parallel_ok():
            return [], set()
        problems: List[str] = []
        todo = big
        while todo:  # twice at most: OpenSSH refused in auto mode, then paramiko channels
            up = self._uploader(project, report, progress)
            try:
                up.put(todo)
            except BaseException:
                up.abort()
                raise
            todo = []
            self._settle(up, report, problems, todo)
        return problems, {e[3] for e in big}

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
        answer = self._ask(Remove(mirror=self.mirror(project), paths=paths))[1]
        report.conflicts += [(rel, "changed on %s since the last sync" % self.cluster.name)
                             for rel, _now in answer["conflicts"]]

    # ---- cache ---------------------------------------------------------------------------

    def mirrors(self) -> Dict[str, dict]:
        """Bytes and files each project mirror on the cluster has received, by mirror name."""
        rows = self._ask(Mirrors())[1]["mirrors"]
        return {r["mirror"].split("/", 1)[-1]: r for r in rows}

    def cache_info(self, gc: bool = False, min_age: float = 3600.0) -> dict:
        """Entries and bytes in the cluster's cache; with *gc*, first drop entries no mirror
        links to that are at least *min_age* seconds old (younger ones may be on their way
        into a mirror of a staging under way)."""
        return self._ask(CacheInfo(gc=gc, min_age=min_age))[1]


