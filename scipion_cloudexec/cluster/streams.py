"""Several OpenSSH streams at once for bulk data (issue 13: a single SSH channel is capped
by its window, about 2 MB per round trip, whatever the link): the pool of streams, and
large files fetched in chunks.

Uploads go over the pool's streams through :class:`.batches.BatchUploader`; a large file
travels there as below (the wire of staging protocol 2)::

    desktop                                        cluster (one staging server per stream)
      ChunkPlan(sha, size, chunk) per file ----->  which chunks are written already
      Chunk(sha, index) + its bytes, each by
        whichever stream is free --------------->  pwrite at index*chunk, record it when whole
        (the next chunk goes before the answer of this one is read: one in flight ahead)
      Publish(sha), once every chunk of the
        file is answered ----------------------->  hash the whole file once, rename into the
                                                   cache if right; else drop every chunk

Downloads ask ``SendRange`` of each chunk over the streams and write it at its offset.

N is the cluster's ``streams`` key, or with ``auto`` adapted to the link: START streams,
then STEP more while the measured throughput grows by at least GROWTH, at most CAP. The
count reached is kept for the next files of the same stager. After a cut link, staging again
asks the plan and sends only the chunks not recorded (per-chunk resume); the whole-file
hash is checked once, on the cluster, before anything enters the cache.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from ..config import ClusterConfig
from ..remote.hashing import BLOCK
from ..remote.stage_protocol import SendRange
from .channels import OpenSSHChannel, ServerChannel, dead_link_seconds
from .errors import LinkLost, StagingError

log = logging.getLogger(__name__)

CHUNKED_MIN = 64 << 20  # files from this size go in chunks over parallel streams
CHUNK = 32 << 20  # bytes per chunk: the unit of resume
START, STEP, CAP, GROWTH = 4, 2, 16, 1.10
INTERVAL = 2.0  # seconds of transfer per throughput measurement (auto)


def paid(before: Optional[float], rate: float) -> bool:
    """Whether the streams last added paid: the first measurement, or a rate GROWTH times
    the one *before* them (auto)."""
    return before is None or rate >= GROWTH * before



def fixed_streams(cluster: ClusterConfig) -> Optional[int]:
    """The cluster's fixed stream count, or None for ``auto``."""
    value = getattr(cluster, "streams", "auto")
    return None if value == "auto" else int(value)


class StreamPool:
    """Staging servers used side by side for the chunks of large files (and batches of
    small ones): OpenSSH streams by default, each its own login; or exec channels of one
    paramiko connection where paramiko is the carrier (each channel has its own window,
    which is what a long link needs)."""

    def __init__(self, cluster: ClusterConfig,
                 make_channel: Optional[Callable[[], ServerChannel]] = None):
        self.cluster = cluster
        self._make = make_channel or (lambda: OpenSSHChannel(cluster))
        self.channels: List[ServerChannel] = []
        fixed = fixed_streams(cluster)
        self.count = fixed or START  # the count to start the next upload with
        self.adapt = fixed is None
        self.used = 0  # streams the last upload ended with

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.channels = []

    def _chan(self, i: int) -> ServerChannel:
        while len(self.channels) <= i:
            self.channels.append(self._make())
        if not self.channels[i].alive:
            self.channels[i].close()
            self.channels[i] = self._make()
        return self.channels[i]

    def _parallel(self, work: "queue.Queue", tick: Callable[[int], None],
                  body: Callable[..., None]) -> None:
        """Run *body* on START (or the fixed count of) streams taking items from *work*;
        with ``auto``, add STEP streams while throughput grows by GROWTH, up to CAP."""
        lock = threading.Lock()
        sent = [0]
        failed: List[BaseException] = []

        def counted(n: int) -> None:
            with lock:
                sent[0] += n
                tick(n)

        def worker(i: int, started: threading.Event) -> None:
            try:
                body(self._chan(i), work, counted, started, failed, lock)
            except BaseException as e:  # noqa: B902 - handed to the caller
                failed.append(e)
            finally:
                started.set()

        threads: List[threading.Thread] = []

        def grow(n: int) -> None:
            events = []
            n = min(n, CAP, len(threads) + work.qsize())
            for i in range(len(threads), n):
                self._chan(i)  # started here: the list is only grown by this thread
                ev = threading.Event()
                t = threading.Thread(target=worker, args=(i, ev), daemon=True,
                                     name="cloudexec-stream-%d" % i)
                t.start()
                threads.append(t)
                events.append(ev)
            for ev in events:  # measure once the new streams are logged in and sending
                ev.wait(dead_link_seconds(self.cluster))

        grow(self.count)
        prev = None
        stopped = False
        while self.adapt and not failed and work.qsize() and len(threads) < CAP:
            with lock:
                b0, t0 = sent[0], time.monotonic()
            time.sleep(INTERVAL)
            with lock:
                rate = (sent[0] - b0) / (time.monotonic() - t0)
            if not paid(prev, rate):
                stopped = True  # the last streams added did not pay: stop here
                break
            prev = rate
            log.debug("%d streams: %.1f MB/s, adding %d", len(threads), rate / 1e6, STEP)
            grow(len(threads) + STEP)
        for t in threads:
            t.join()
        self.used = len(threads)
        if self.adapt and prev is not None:  # measured: start there next time
            self.count = len(threads) - STEP if stopped else len(threads)
        if failed:
            raise failed[0]

    # ---- downloads ----------------------------------------------------------------------

    def download(self, remote_root: str, files: List[Tuple[str, str, int]],
                 tick: Callable[[int], None], have: Optional[Dict[str, Set[int]]] = None,
                 chunk_done: Optional[Callable[[str, int], None]] = None) -> None:
        """Receive files ``(rel under remote_root, local temporary file, size)`` in chunks
        over the streams, each written at its offset; the caller hashes and renames them.
        ``have[tmp]``: chunks a cut download already wrote there (not asked again);
        ``chunk_done(tmp, index)`` is called once a chunk is written whole.

        Raises:
            LinkLost: a stream broke (the caller keeps or deletes the temporary files).
        """
        work: "queue.Queue" = queue.Queue()
        for rel, tmp, size in files:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            skip = (have or {}).get(tmp, set())
            for i in range(max(1, -(-size // CHUNK))):
                if i not in skip:
                    work.put((rel, tmp, size, i))
        if work.empty():
            return
        done = chunk_done or (lambda tmp, index: None)
        try:
            self._parallel(work, tick, lambda *a: self._chunk_receiver(remote_root, done, *a))
        except (OSError, EOFError, StagingError) as e:
            self.close()
            if isinstance(e, LinkLost):
                raise
            raise LinkLost("connection to %s lost during a parallel download (%s)"
                           % (self.cluster.name, e)) from None

    @staticmethod
    def _chunk_receiver(remote_root: str, chunk_done: Callable[[str, int], None],
                        ch: ServerChannel, work: "queue.Queue",
                        counted: Callable[[int], None], started: threading.Event,
                        failed: list, lock: threading.Lock) -> None:
        """One stream's loop for downloads: two ranges asked ahead, each written at its
        offset as it comes."""
        inflight: List[tuple] = []
        fds: Dict[str, int] = {}
        try:
            while not failed:
                while len(inflight) < 2:
                    try:
                        rel, tmp, size, index = work.get_nowait()
                    except queue.Empty:
                        break
                    start = index * CHUNK
                    ch.send(SendRange(root=remote_root, path=rel, offset=start,
                                      length=min(size, start + CHUNK) - start))
                    inflight.append((tmp, start, index))
                if not inflight:
                    break
                tmp, offset, index = inflight.pop(0)
                left = ch.line()["size"]
                started.set()
                if tmp not in fds:
                    fds[tmp] = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
                while left:
                    block = ch.out.read1(min(8 * BLOCK, left)) if hasattr(ch.out, "read1") \
                        else ch.out.read(min(BLOCK, left))
                    if not block:
                        raise LinkLost("the stream to %s ended mid-chunk" % ch.cluster.name)
                    view = memoryview(block)
                    while view:
                        w = os.pwrite(fds[tmp], view, offset)
                        view = view[w:]
                        offset += w
                    left -= len(block)
                    counted(len(block))
                chunk_done(tmp, index)
        finally:
            for fd in fds.values():
                os.close(fd)
