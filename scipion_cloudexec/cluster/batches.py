"""What the checks say missing, over several OpenSSH streams at once (issue 13: one SSH
channel moves at most its 2 MB window per round trip, and one cluster process verifies and
writes file after file).

::

    stager (main thread)                         the pool's streams, each a staging server
      walk + hash, StageIn(check) per batch ---> (control stream: links what the cache has)
      what the checks say missing:
        small files, in requests of
        SUB_FILES / SUB_BYTES ------------------> N workers, each on its own stream, each
        large files (from streams.CHUNKED_MIN):   taking the next piece of work when free:
          a plan, then its chunks, then its         StageIn(files) -> missing, offsets
          publish and its link, each piece          the contents   -> verified, published
          taken by whichever stream is free         ChunkPlan -> chunks already there
                                                    Chunk + bytes  -> written at offset
                                                    Publish -> hashed whole, published
                                                  (the next request goes before this
                                                  one's last answer is read: one ahead)
                                                 <- reports: linked, bad, errors

The StageIn requests are the ordinary ones and the chunks those of :mod:`.streams` (the
wire does not change): the cluster verifies each file's hash, publishes atomically, resumes
a partial upload from its offset (a chunked one from its recorded chunks) and links only
what it verified. A cut stream stops every worker after its request; what was published
stays in the cache and the next staging's check links it, so staging again sends only
what is missing.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

from ..config import ClusterConfig
from ..remote.stage_protocol import Chunk, ChunkPlan, Publish, StageIn
from . import streams as streams_mod
from .channels import NO_BUNDLE, NoBundle, ServerChannel, dead_link_seconds
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


class _Work:
    """The uploader's queue: first in, first out, except follow-up work (a large file's
    chunks, its publish, its link) which goes in front, so that files finish one after
    another and few are half-assembled on the cluster at any time."""

    def __init__(self) -> None:
        self._items: "deque" = deque()
        self._cond = threading.Condition()
        self.unfinished = 0  # put and not yet marked done

    def put(self, item: object, front: bool = False) -> None:
        with self._cond:
            if front:
                self._items.appendleft(item)
            else:
                self._items.append(item)
            self.unfinished += 1
            self._cond.notify_all()

    def get(self, block: bool) -> object:
        """The next item; raises queue.Empty when there is none and *block* is false."""
        with self._cond:
            while not self._items:
                if not block:
                    raise queue.Empty
                self._cond.wait()
            return self._items.popleft()

    def task_done(self) -> None:
        with self._cond:
            self.unfinished -= 1
            self._cond.notify_all()

    def join(self) -> None:
        """Wait until every item put (follow-ups included) is done."""
        with self._cond:
            while self.unfinished:
                self._cond.wait()

    def qsize(self) -> int:
        return len(self._items)


class _Files:
    """One StageIn request: small files sent with it, or a published large file linked."""

    def __init__(self, entries: List[Entry]):
        self.entries = entries
        self.answer: dict = {}  # the server's list of what is missing, once read


class _Large:
    """A large file sent in chunks: its entries (one per mirror path with this content)
    and the chunks whose answers are still to come."""

    def __init__(self, entry: Entry, chunk: int):
        self.entries = [entry]
        self.chunk = chunk  # fixed per file: the plan, the chunks and the publish agree
        self.left = 0
        self.linked = False  # its link is queued: an entry found later is linked alone

    @property
    def local(self) -> str:
        return self.entries[0][1]

    @property
    def size(self) -> int:
        return self.entries[0][2]

    @property
    def sha(self) -> str:
        return self.entries[0][3]


class _Plan:
    """Ask which chunks of a large file the cluster has (the first step of its upload)."""

    def __init__(self, large: _Large):
        self.large = large


class _Part:
    """Chunk *index* of a large file."""

    def __init__(self, large: _Large, index: int):
        self.large = large
        self.index = index


class _Publish:
    """Every chunk of a large file answered: the cluster hashes it whole and publishes it."""

    def __init__(self, large: _Large):
        self.large = large


class BatchUploader:
    """Files sent side by side over the streams of *pool*: small ones in StageIn requests
    of up to SUB_FILES / SUB_BYTES, large ones (from ``streams.CHUNKED_MIN``) in chunks.
    Every stream takes the next piece of work as soon as it is free, whichever file it
    belongs to, so a data set of many large files keeps every stream busy from its first
    chunk to its last (no pause at the end of each file while its last chunks travel and
    the cluster hashes it). With ``streams = auto`` the count grows while throughput does.

    Args:
        pool: the stager's :class:`StreamPool` (its streams are this uploader's until
            :meth:`finish` returns).
        request: builds the StageIn of a list of entries.
        send_file: ``send_file(ch, local, size, offset, tick)``.
        tick: called with the bytes sent (from several threads, serialized here).
        streams: how many streams to start with.
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
        self._work = _Work()
        self._pending: List[Entry] = []
        self._pending_bytes = 0
        self.planned = 0  # bytes put, for progress
        self.sent = 0  # bytes sent, for the stream count's adaptation
        self.results: List[Result] = []
        self.problems: Dict[str, str] = {}  # {sha: why} of large files not published
        self.failed: List[BaseException] = []
        self.refused = False  # a stream's ssh never reached the server (not the link)
        self.fallback = fallback
        self._flushed: List[_Files] = []
        self._large: Dict[str, _Large] = {}
        self._stop_growing = threading.Event()
        self._threads: List[threading.Thread] = []
        self._working: List[threading.Event] = []
        self._grower: Optional[threading.Thread] = None
        try:
            self._add_streams(max(1, streams))  # logins start now, while the checks travel
        except BaseException:
            self._stop_workers()
            raise

    @property
    def count(self) -> int:
        """Streams in use now."""
        return len(self._threads)

    # ---- the caller's side --------------------------------------------------------------

    def put(self, entries: List[Entry]) -> None:
        """Queue *entries* (their check said missing); sent as soon as a stream is free.

        Raises:
            the first failure of a stream (the staging stops there).
        """
        if not (self.refused and self.fallback):  # else: handed back by finish()
            self._raise()
        small = [e for e in entries if e[2] < streams_mod.CHUNKED_MIN]
        for e in entries:
            if e[2] >= streams_mod.CHUNKED_MIN:
                self._put_large(e)
        # while few files are known (the first checks), smaller requests keep every
        # stream busy; then full ones
        n = sum(e[2] for e in small) + self._pending_bytes
        most_bytes = min(SUB_BYTES, max(n // self.count, 1 << 20))
        most_files = min(SUB_FILES, max((len(small) + len(self._pending)) // self.count, 8))
        for e in small:
            self.planned += e[2]
            self._pending.append(e)
            self._pending_bytes += e[2]
            if len(self._pending) >= most_files or self._pending_bytes >= most_bytes:
                self._flush()
        if self._work.unfinished < self.count:
            self._flush()  # a stream is idle: don't wait for a full request

    def _put_large(self, entry: Entry) -> None:
        with self._lock:
            known = self._large.get(entry[3])
            if known is not None:  # the same content at another path: sent once
                known.entries.append(entry)
                if known.linked:
                    self._work.put(_Files([entry]))
                return
            large = self._large[entry[3]] = _Large(entry, streams_mod.CHUNK)
        self.planned += entry[2]
        self._work.put(_Plan(large))
        if self.pool.adapt and self._grower is None:  # large files: the link sets the pace
            self._grower = threading.Thread(target=self._grow, daemon=True,
                                            name="cloudexec-streams-grow")
            self._grower.start()

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
            elif getattr(ch, "chan", None) is not None:
                ch.chan.close()  # a paramiko channel: its reads end now
        self.fallback = True  # nothing raised here
        try:
            self.finish()
        except Exception:  # noqa: BLE001 - the caller is already raising its own error
            pass

    def finish(self) -> Tuple[List[Result], List[Entry]]:
        """Send what is left, wait for every answer and stop the workers. Returns the
        results and, with ``fallback`` when OpenSSH could not reach the server at all, the
        entries not sent (for the caller's other carrier). Large files not published are
        in :attr:`problems`.

        Raises:
            LinkLost: a stream broke (what the cluster verified stays: stage again);
            NoSpace, StagingError: the cluster refused a request.
        """
        self._flush()
        self._work.join()  # follow-ups (a file's chunks, its publish) come from the workers
        self._stop_workers()
        self.pool.used = self.count
        if self.fallback and self.refused:
            done = {id(entries) for entries, _a, _r in self.results}
            linked = {e[0] for entries, _a, _r in self.results for e in entries}
            return self.results, [e for item in self._flushed if id(item.entries) not in done
                                  for e in item.entries] + [
                e for large in self._large.values() if large.sha not in self.problems
                for e in large.entries if e[0] not in linked]
        self._raise()
        return self.results, []

    def _stop_workers(self) -> None:
        self._stop_growing.set()
        if self._grower is not None:
            self._grower.join()
        for _t in self._threads:
            self._work.put(self._STOP)
        for t in self._threads:
            t.join()

    def _flush(self) -> None:
        if self._pending:
            item = _Files(self._pending)
            self._flushed.append(item)
            self._work.put(item)
            self._pending, self._pending_bytes = [], 0

    def _raise(self) -> None:
        if self.failed:
            e = self.failed[0]
            # LinkLost and NoSpace are StagingErrors; a local file gone is the caller's to say
            if isinstance(e, (StagingError, VersionMismatch, FileNotFoundError)):
                raise e
            raise LinkLost("connection to %s lost during the upload (%s); what arrived is "
                           "kept: stage again to resume" % (self.pool.cluster.name, e))

    # ---- the stream count (streams = auto) ----------------------------------------------

    def _add_streams(self, n: int, greeted: bool = False) -> None:
        """Start streams up to *n* in all (at most CAP), each with its worker; with
        *greeted*, each one's server answers before its worker starts."""
        for i in range(len(self._threads), min(n, streams_mod.CAP)):
            ch = self.pool._chan(i)  # its login starts now
            if greeted:
                ch.greet()
            working = threading.Event()
            t = threading.Thread(target=self._run, args=(i, working), daemon=True,
                                 name="cloudexec-stream-%d" % i)
            self._working.append(working)
            self._threads.append(t)
            t.start()

    def _grow(self) -> None:
        """Add STEP streams while the throughput measured over INTERVAL grows by GROWTH,
        up to CAP; measured only while every stream has work (else the walk, not the link,
        sets the pace). The count reached is where the pool's next upload starts."""
        prev = None
        stop = self._stop_growing
        while not stop.is_set() and not self.failed and self.count < streams_mod.CAP:
            for ev in self._working:  # the newest streams are logged in and sending
                while not ev.wait(0.1):
                    if stop.is_set():
                        return
            with self._lock:
                b0, t0 = self.sent, time.monotonic()
            busy = self._busy()
            if stop.wait(streams_mod.INTERVAL):
                return
            if not (busy and self._busy()):
                continue  # not enough work to tell: measure again
            with self._lock:
                rate = (self.sent - b0) / (time.monotonic() - t0)
            if not streams_mod.paid(prev, rate):
                self.pool.count = self.count - streams_mod.STEP  # the last ones did not pay
                return
            prev = rate
            log.debug("%d streams: %.1f MB/s, adding %d", self.count, rate / 1e6,
                      streams_mod.STEP)
            try:
                self._add_streams(self.count + streams_mod.STEP, greeted=True)
            except Exception as e:  # noqa: BLE001 - the streams running go on
                log.info("no more streams to %s: %s", self.pool.cluster.name, e)
                if len(self.pool.channels) > self.count:
                    self.pool.channels.pop().close()  # not started: not this pool's
                return
            finally:
                self.pool.count = self.count

    def _busy(self) -> bool:
        """Work for every stream: waiting, or in hand (a stream holds one or two pieces:
        the one it sends and the one whose answer it awaits)."""
        return self._work.qsize() > 0 or self._work.unfinished >= self.count

    # ---- one worker per stream ----------------------------------------------------------

    def _next(self, block: bool) -> Optional[object]:
        """The next piece of work; None when there is none now (or STOP, which is put
        back for the blocking get that ends the loop)."""
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

    def _run(self, i: int, working: threading.Event) -> None:
        while True:
            item = self._next(block=True)
            if item is None:
                self._work.task_done()
                return
            if self.failed:  # another stream broke: drain the queue, send nothing
                self._work.task_done()
                continue
            try:
                self._serve(i, item, working)
            except BaseException as e:  # noqa: B902 - handed to the caller
                ch = self.pool.channels[i] if i < len(self.pool.channels) else None
                if ch is not None and not ch._greeted and not isinstance(e, VersionMismatch):
                    self.refused = True
                self.failed.append(e)
                if i < len(self.pool.channels):
                    self.pool.channels[i].close()  # out of step: a new one next time

    def _serve(self, i: int, item: object, working: threading.Event) -> None:
        """Do *item*, then the work queued meanwhile, each piece's request sent before
        the last answer of the one before is read. Every item taken is marked done, sent
        or not."""
        held = [item]  # taken from the queue, not yet marked done
        try:
            ch = self._open(i, item)
            working.set()
            pending: Optional[object] = item  # its last answer is still to read
            while True:
                nxt = self._next(block=False) if not self.failed else None
                if nxt is not None:
                    held.append(nxt)
                    self._head(ch, nxt)
                if pending is not None:
                    self._tail(ch, pending)
                    held.remove(pending)
                    self._work.task_done()
                if nxt is None:
                    return
                self._body(ch, nxt)
                pending = nxt
        finally:
            for _ in held:
                self._work.task_done()

    def _open(self, i: int, item: object) -> ServerChannel:
        """Stream *i*, its server greeted, with *item* begun (its last answer still to
        read). A stream started before the bundle was uploaded exited for want of it:
        started again."""
        for attempt in range(2):
            ch = self.pool._chan(i)
            try:
                ch.greet()  # before any bytes: a cut during them is not "did not start"
            except (NoBundle, OSError, EOFError, LinkLost) as e:
                if attempt or ch.exit_status() != NO_BUNDLE:  # its own words say why
                    raise LinkLost("the staging server on %s did not start (%s): %s" % (
                        self.pool.cluster.name, ch.kind, ch.stderr() or e)) from None
                ch.close()  # the bundle is there now: the caller's check answered
                continue
            self._head(ch, item)
            self._body(ch, item)
            return ch
        raise AssertionError("unreachable")

    # Each piece of work in three steps: _head sends its request (and a chunk's bytes),
    # _body reads what must come before it goes on (a StageIn's list of what is missing,
    # then the contents; a plan's or a publish's answer), _tail reads its last answer.

    def _head(self, ch: ServerChannel, item: object) -> None:
        if isinstance(item, _Files):
            ch.send(self._request(item.entries))
        elif isinstance(item, _Part):
            large, start = item.large, item.index * item.large.chunk
            ch.send(Chunk(sha256=large.sha, size=large.size, chunk=large.chunk,
                          index=item.index, stall=self._stall()))
            self._send_file(ch, large.local, min(large.size, start + large.chunk), start,
                            self._counted)
        elif isinstance(item, _Plan):
            ch.send(ChunkPlan(sha256=item.large.sha, size=item.large.size,
                              chunk=item.large.chunk))
        else:
            ch.send(Publish(sha256=item.large.sha, size=item.large.size,
                            chunk=item.large.chunk))

    def _body(self, ch: ServerChannel, item: object) -> None:
        if isinstance(item, _Files):
            item.answer = self._answer(ch)
            self._send(ch, item.entries, item.answer)
        elif isinstance(item, _Plan):
            self._planned(item.large, ch.line())
        elif isinstance(item, _Publish):
            self._published(item.large, ch.line())

    def _tail(self, ch: ServerChannel, item: object) -> None:
        if isinstance(item, _Files):
            self.results.append((item.entries, item.answer, ch.line()))
        elif isinstance(item, _Part):
            ch.line()  # {"ok"}, or {"present"}: published meanwhile by another staging
            with self._lock:
                item.large.left -= 1
                last = item.large.left == 0
            if last:
                self._work.put(_Publish(item.large), front=True)

    def _planned(self, large: _Large, plan: dict) -> None:
        """A plan's answer: the chunks the cluster lacks go in front of the queue."""
        if plan.get("present"):
            self._link(large)
            return
        have = set(plan["have"])
        todo = [i for i in range(max(1, -(-large.size // large.chunk))) if i not in have]
        if not todo:
            self._work.put(_Publish(large), front=True)
            return
        large.left = len(todo)
        for index in reversed(todo):
            self._work.put(_Part(large, index), front=True)

    def _published(self, large: _Large, answer: dict) -> None:
        if "bad" in answer:
            self.problems[large.sha] = (
                "%s changed during the upload or arrived corrupted (its chunks on %s hash to "
                "%s); not published" % (large.local, self.pool.cluster.name, answer["bad"][:12]))
        elif "missing" in answer:
            self.problems[large.sha] = ("%s: %d chunks did not arrive on %s; stage again"
                                        % (large.local, len(answer["missing"]),
                                           self.pool.cluster.name))
        else:
            self._link(large)

    def _link(self, large: _Large) -> None:
        """The file is in the cluster's cache: a StageIn of its entries links them (and
        reports them like any other file's)."""
        with self._lock:
            large.linked = True
            self._work.put(_Files(list(large.entries)), front=True)

    def _stall(self) -> float:
        return max(5.0, dead_link_seconds(self.pool.cluster) / 2)

    def _answer(self, ch: ServerChannel) -> dict:
        answer = ch.line()
        if answer.get("error") == "nospace":
            raise NoSpace(self.pool.cluster.name, answer["needed"], answer["free"])
        return answer

    def _send(self, ch: ServerChannel, entries: List[Entry], answer: dict) -> None:
        local_of = {e[3]: (e[1], e[2]) for e in entries}
        for sha, offset in answer["missing"]:
            local, size = local_of[sha]
            self._send_file(ch, local, size, offset, self._counted)

    def _counted(self, n: int) -> None:
        with self._lock:
            self.sent += n
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
        problems.extend(up.problems.values())
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
