"""Small files over several OpenSSH streams at once (issue 13: one SSH channel moves at
most its 2 MB window per round trip, and one cluster process verifies and writes file
after file).

::

    stager (main thread)                         the pool's streams, each a staging server
      walk + hash, StageIn(check) per batch ---> (control stream: links what the cache has)
      what the checks say missing, in
      requests of SUB_FILES / SUB_BYTES -------> N workers, each on its own stream:
                                                   StageIn(files) -> missing, resume offsets
                                                   the contents   -> verified, published
                                                   (the next request goes before this
                                                   one's report is read: one ahead)
                                                 <- report: linked, bad, errors

Every request is the ordinary :class:`StageIn` (the wire does not change): the cluster
verifies each file's hash, publishes atomically, resumes a partial upload from its offset
and links only what it verified. A cut stream stops every worker after its request; what
was published stays in the cache and the next staging's check links it, so staging again
sends only what is missing.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, List, Optional, Tuple

from ..config import ClusterConfig
from ..remote.stage_protocol import StageIn
from .channels import NO_BUNDLE, NoBundle, ServerChannel
from .errors import LinkLost, NoSpace, StagingError, VersionMismatch
from .local_files import Progress, StageReport, _tick
from .streams import StreamPool, fixed_streams

log = logging.getLogger("scipion_cloudexec.cluster.stager")  # said as the stager's

SUB_FILES = 256  # files per request on a stream
SUB_BYTES = 16 << 20  # and bytes: long enough to keep a stream busy between its answers
START_AT = 64 << 20  # new content from which a staging sends its small files this way

Entry = tuple  # (mirror path, local path, size, sha256[, base])
#: (entries, first answer, report) of each request served
Result = Tuple[List[Entry], dict, dict]


class BatchUploader:
    """Requests of small files sent side by side over the streams of *pool*.

    Args:
        pool: the stager's :class:`StreamPool` (its streams are this uploader's until
            :meth:`finish` returns).
        request: builds the StageIn of a list of entries.
        send_file: ``send_file(ch, local, size, offset, tick)``.
        tick: called with the bytes sent (from several threads, serialized here).
        streams: how many streams to use.
        fallback: when OpenSSH cannot reach the server at all, hand back what was not sent
            (``auto`` mode) instead of failing.
    """

    _STOP = object()

    def __init__(self, pool: StreamPool, request: Callable[[List[Entry]], StageIn],
                 send_file: Callable[..., None], tick: Callable[[int], None], streams: int,
                 fallback: bool = False):
        self.pool = pool
        self._request = request
        self._send_file = send_file
        self._lock = threading.Lock()
        self._tick = tick
        self._work: "queue.Queue" = queue.Queue()
        self._pending: List[Entry] = []
        self._pending_bytes = 0
        self.planned = 0  # bytes put, for progress
        self.results: List[Result] = []
        self.failed: List[BaseException] = []
        self.refused = False  # a stream's ssh never reached the server (not the link)
        self.fallback = fallback
        self._flushed: List[List[Entry]] = []
        self.count = max(1, streams)
        for i in range(self.count):  # logins start now, while the checks travel
            pool._chan(i)
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name="cloudexec-batch-%d" % i)
                         for i in range(self.count)]
        for t in self._threads:
            t.start()

    # ---- the caller's side --------------------------------------------------------------

    def put(self, entries: List[Entry]) -> None:
        """Queue *entries* (their check said missing); sent as soon as a stream is free.

        Raises:
            the first failure of a stream (the staging stops there).
        """
        if not (self.refused and self.fallback):  # else: handed back by finish()
            self._raise()
        # while few files are known (the first checks), smaller requests keep every
        # stream busy; then full ones
        n = sum(e[2] for e in entries) + self._pending_bytes
        most_bytes = min(SUB_BYTES, max(n // self.count, 1 << 20))
        most_files = min(SUB_FILES, max((len(entries) + len(self._pending)) // self.count, 8))
        for e in entries:
            self.planned += e[2]
            self._pending.append(e)
            self._pending_bytes += e[2]
            if len(self._pending) >= most_files or self._pending_bytes >= most_bytes:
                self._flush()
        if self._work.unfinished_tasks < self.count:
            self._flush()  # a stream is idle: don't wait for a full request

    def abort(self) -> None:
        """Stop now: nothing more is sent, the streams' ssh processes are killed (their
        requests end with them; the fds stay open until the caller closes the pool, so no
        worker writes into a reused fd), the workers are waited for; no error raised."""
        self.failed.append(LinkLost("staging stopped"))
        self._pending = []
        for ch in self.pool.channels[:self.count]:
            proc = getattr(ch, "proc", None)
            if proc is not None:
                proc.kill()
        self.fallback = True  # nothing raised here
        try:
            self.finish()
        except Exception:  # noqa: BLE001 - the caller is already raising its own error
            pass

    def finish(self) -> Tuple[List[Result], List[Entry]]:
        """Send what is left, wait for every answer and stop the workers. Returns the
        results and, with ``fallback`` when OpenSSH could not reach the server at all, the
        entries not sent (for the caller's other carrier).

        Raises:
            LinkLost: a stream broke (what the cluster verified stays: stage again);
            NoSpace, StagingError: the cluster refused a request.
        """
        self._flush()
        for _t in self._threads:
            self._work.put(self._STOP)
        for t in self._threads:
            t.join()
        if self.fallback and self.refused:
            done = {id(item) for item, _a, _r in self.results}
            return self.results, [e for item in self._flushed if id(item) not in done
                                  for e in item]
        self._raise()
        return self.results, []

    def _flush(self) -> None:
        if self._pending:
            self._flushed.append(self._pending)
            self._work.put(self._pending)
            self._pending, self._pending_bytes = [], 0

    def _raise(self) -> None:
        if self.failed:
            e = self.failed[0]
            if isinstance(e, (StagingError, VersionMismatch)):  # LinkLost, NoSpace too
                raise e
            raise LinkLost("connection to %s lost during the upload (%s); what arrived is "
                           "kept: stage again to resume" % (self.pool.cluster.name, e))

    # ---- one worker per stream ----------------------------------------------------------

    def _next(self, block: bool) -> Optional[List[Entry]]:
        """The next request's entries; None when there is none now (or STOP, which
        is put back for the blocking get that ends the loop)."""
        try:
            item = self._work.get(block)
        except queue.Empty:
            return None
        if item is self._STOP:
            if not block:
                self._work.task_done()
                self._work.put(item)
            return None
        return item

    def _run(self, i: int) -> None:
        while True:
            item = self._next(block=True)
            if item is None:
                self._work.task_done()
                return
            if self.failed:  # another stream broke: drain the queue, send nothing
                self._work.task_done()
                continue
            try:
                self._serve(i, item)
            except BaseException as e:  # noqa: B902 - handed to the caller
                ch = self.pool.channels[i] if i < len(self.pool.channels) else None
                if ch is not None and not ch._greeted and not isinstance(e, VersionMismatch):
                    self.refused = True
                self.failed.append(e)
                if i < len(self.pool.channels):
                    self.pool.channels[i].close()  # out of step: a new one next time

    def _serve(self, i: int, item: List[Entry]) -> None:
        """Send *item*, then the requests queued meanwhile, each one before the report of
        the one before is read. Every item taken is marked done, sent or not."""
        held = [item]  # taken from the queue, not yet marked done
        try:
            ch, answer = self._open(i, item)
            while True:
                self._send(ch, item, answer)
                nxt = self._next(block=False) if not self.failed else None
                if nxt is not None:
                    held.append(nxt)
                    ch.send(self._request(nxt))
                self.results.append((item, answer, ch.line()))
                held.remove(item)
                self._work.task_done()
                if nxt is None:
                    return
                item, answer = nxt, self._answer(ch)
        finally:
            for _ in held:
                self._work.task_done()

    def _open(self, i: int, item: List[Entry]) -> Tuple[ServerChannel, dict]:
        """Stream *i* with *item*'s request sent and its first answer read. A stream
        started before the bundle was uploaded exited for want of it: started again."""
        for attempt in range(2):
            ch = self.pool._chan(i)
            try:
                ch.send(self._request(item))
                return ch, self._answer(ch)
            except (NoBundle, OSError, EOFError, LinkLost) as e:
                if ch._greeted:
                    raise
                if attempt or ch.exit_status() != NO_BUNDLE:  # its own words say why
                    raise LinkLost("the staging server on %s did not start (%s): %s" % (
                        self.pool.cluster.name, ch.kind, ch.stderr() or e)) from None
                ch.close()  # the bundle is there now: the caller's check answered
        raise AssertionError("unreachable")

    def _answer(self, ch: ServerChannel) -> dict:
        answer = ch.line()
        if answer.get("error") == "nospace":
            raise NoSpace(self.pool.cluster.name, answer["needed"], answer["free"])
        return answer

    def _send(self, ch: ServerChannel, item: List[Entry], answer: dict) -> None:
        local_of = {e[3]: (e[1], e[2]) for e in item}
        for sha, offset in answer["missing"]:
            local, size = local_of[sha]
            self._send_file(ch, local, size, offset, self._counted)

    def _counted(self, n: int) -> None:
        with self._lock:
            self._tick(n)


class SmallFilesOverStreams:
    """The :class:`~.stager.Stager`'s side of the uploader (a mixin: it uses the stager's
    ``cluster``, ``_pool``, ``_new_pool``, ``_bulk_refused``, ``_send_file``, ``_upload_request`` and
    ``_reported``)."""

    cluster: ClusterConfig
    _pool: Optional[StreamPool]
    _bulk_refused: bool
    _new_pool: Callable[[], StreamPool]

    def _parallel_ok(self) -> bool:
        """Whether several streams may be used (not ``streams = 1``)."""
        return fixed_streams(self.cluster) != 1

    def _uploader(self, project: str, report: StageReport,
                  progress: Optional[Progress]) -> BatchUploader:
        """An uploader on the pool's streams (their logins start now)."""
        if self._pool is None:
            self._pool = self._new_pool()
        self._pool.used = self._pool.count
        base, up = report.bytes_sent, []

        def tick(n: int) -> None:  # serialized by the uploader; the total grows with checks
            _tick(progress, report, n, base + up[0].planned, 0, report.files)
        up.append(BatchUploader(self._pool, lambda entries: self._upload_request(project,
                                                                                 entries),
                                self._send_file, tick, self._pool.count,
                                fallback=self.cluster.transfer == "auto" and
                                not self._bulk_refused))
        return up[0]

    def _settle(self, up: Optional[BatchUploader], report: StageReport, problems: List[str],
                to_send: List[Tuple[str, str, int, str]]) -> None:
        """Wait for every request of *up*, count what its reports say. When OpenSSH could
        not reach the server in ``auto`` mode, what it did not send goes into *to_send*
        for the control stream (said once, like the bulk stream's fallback)."""
        if up is None:
            return None
        results, unsent = up.finish()
        if up.refused and up.fallback:
            log.warning("OpenSSH transfers to %s unavailable, using paramiko: %s",
                        self.cluster.name, up.failed[0] if up.failed else "")
            self._bulk_refused = True
            self._pool.close()
            self._pool = None  # the next one: channels of the paramiko connection
            to_send.extend(unsent)
        for entries, _answer, final in results:
            problems.extend(self._reported(entries, final, report))
        return None
