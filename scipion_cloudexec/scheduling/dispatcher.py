"""Runs each job on the cluster the policy picks; fails over when a cluster goes away.

::

    run(job, work)                       work(cluster, attempt) does the job on one cluster
      wait for a slot (policy.choose)    slots freed by ending jobs wake waiters at once
                                         (and below ``max_jobs`` held in all, if set)
      work(...)  ok        -> result     speed of that cluster updated
                 program   -> raise      the program's own failure: never retried elsewhere
                 infra     -> that cluster is down for ``down_for`` s, retry on another
                              (at most ``retries`` times); after ``down_for`` it takes work again

``run_with_slot(job, work)`` hands ``work`` its :class:`Slot` instead: ``slot.release()``
gives the slots back as soon as the job has ended on the cluster, while the caller still
works for it (gathers its outputs): a waiting job starts at once. The release is idempotent
(the end of ``run_with_slot`` releases only what is still held) and the speed estimate is the
time from taking the slots to that release: the job, not what follows it.

Knows nothing of SSH or pyworkflow: ``is_infra`` tells an infrastructure failure apart.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, TypeVar

from .policy import CapacityPolicy, ClusterView, JobRequest, Policy

log = logging.getLogger(__name__)
T = TypeVar("T")


class NoClusterLeft(RuntimeError):
    """Every cluster failed this job for infrastructure reasons, retries exhausted."""


@dataclass
class _Cluster:
    name: str
    slots: int
    gpus: Tuple[int, ...] = ()
    busy: int = 0
    down_until: float = 0.0
    seconds_per_job: float = 0.0
    done: int = 0
    failed_over: int = 0

    def view(self, cached: int = 0) -> ClusterView:
        return ClusterView(self.name, self.slots, self.busy, self.seconds_per_job, self.gpus,
                           cached)


class Slot:
    """One attempt's hold on its cluster's slots (``job.slots`` of them).

    Attributes:
        cluster: the cluster that holds them.
        attempt: 0 for the first try of the job, then 1, 2... after infrastructure failures.
        held: whether the slots are held now.
        seconds: the last hold's length, from taking the slots to :meth:`release` (None
            while held and never released).
    """

    def __init__(self, dispatcher: "MultiClusterDispatcher", cluster: str, job: JobRequest,
                 attempt: int):
        self.cluster = cluster
        self.attempt = attempt
        self.job = job
        self.held = True
        self.seconds: Optional[float] = None
        self._since = time.monotonic()
        self._dispatcher = dispatcher

    def release(self) -> None:
        """The job has ended on the cluster: its slots go to the next job. Idempotent."""
        self._dispatcher._give(self)

    def take(self) -> None:
        """Hold slots on the same cluster again (a job runs there again after
        :meth:`release`): waits for them, and for ``max_jobs``. No-op while held."""
        self._dispatcher._retake(self)


class MultiClusterDispatcher:
    """Shares one protocol's jobs between clusters.

    Args:
        clusters: (name, slots, gpus) of each cluster.
        policy: picks the cluster (default :class:`CapacityPolicy`).
        retries: how many times a job failed by infrastructure is tried again.
        down_for: seconds a failed cluster gets no work before it is tried again.
        cached: bytes of this protocol's data a cluster already holds (name -> bytes); the
            policy prefers those clusters when speed does not decide. Must not block.
        max_jobs: at most that many jobs hold slots at once, all clusters together
            (0: no bound but the slots).
    """

    def __init__(self, clusters: Iterable[Tuple[str, int, Tuple[int, ...]]],
                 policy: Optional[Policy] = None, retries: int = 2, down_for: float = 30.0,
                 cached: Callable[[str], int] = lambda name: 0, max_jobs: int = 0):
        self.clusters: Dict[str, _Cluster] = {n: _Cluster(n, s, tuple(g)) for n, s, g in clusters}
        if not self.clusters:
            raise ValueError("no cluster to dispatch to")
        self.policy = policy or CapacityPolicy()
        self.retries = retries
        self.down_for = down_for
        self.cached = cached
        self.max_jobs = max_jobs
        self.holding = 0  # jobs holding slots now, all clusters together
        self._cond = threading.Condition()

    def run(self, job: JobRequest, work: Callable[[str, int], T],
            is_infra: Callable[[BaseException], bool],
            on_failover: Callable[[str, BaseException], None] = lambda name, e: None,
            prefer: Optional[str] = None,
            is_down: Callable[[BaseException], bool] = lambda e: True,
            is_permanent: Callable[[BaseException], bool] = lambda e: False) -> T:
        """Run *job* with ``work(cluster_name, attempt)``; see the module docstring.

        *prefer*: the cluster that already has this job (a resumed step): it is used while
        healthy, whatever the policy would say, so the job is attached to, not run again.
        *is_down*: whether an infrastructure failure takes its cluster out for a while
        (else only the job is retried, by the policy's choice). *is_permanent*: a failure
        that waiting will not cure (a refused key, a changed host key, a refused
        connection): with no other cluster up, the job gives up at once.
        """
        return self.run_with_slot(job, lambda slot: work(slot.cluster, slot.attempt),
                                  is_infra, on_failover, prefer, is_down, is_permanent)

    def run_with_slot(self, job: JobRequest, work: Callable[[Slot], T],
                      is_infra: Callable[[BaseException], bool],
                      on_failover: Callable[[str, BaseException], None] = lambda name, e: None,
                      prefer: Optional[str] = None,
                      is_down: Callable[[BaseException], bool] = lambda e: True,
                      is_permanent: Callable[[BaseException], bool] = lambda e: False) -> T:
        """As :meth:`run`, but ``work(slot)`` gets its :class:`Slot` (``slot.cluster``,
        ``slot.attempt``) and may give it back early with ``slot.release()``."""
        for attempt in range(self.retries + 1):
            slot = self._acquire(job, prefer if attempt == 0 else None, attempt)
            try:
                result = work(slot)
            except BaseException as e:
                self._give(slot)  # a no-op if work released it already
                name = slot.cluster
                if not is_infra(e):
                    raise
                if is_down(e):
                    self._mark_down(name, e)
                if is_permanent(e) and not self._others_up(name):
                    raise NoClusterLeft("giving up: cluster %s cannot be used and no other "
                                        "cluster is up: %s" % (name, e)) from e
                on_failover(name, e)
                last = e
                continue
            self._give(slot)
            self._learn(slot)
            return result
        raise NoClusterLeft("giving up after %d attempt(s) that failed for infrastructure "
                            "reasons; the last: %s" % (self.retries + 1, last)) from last

    def _others_up(self, name: str) -> bool:
        now = time.monotonic()
        with self._cond:
            return any(c.down_until <= now for n, c in self.clusters.items() if n != name)

    def _room(self) -> bool:
        return not self.max_jobs or self.holding < self.max_jobs

    def _hold(self, name: str, job: JobRequest, attempt: int) -> Slot:
        self.clusters[name].busy += job.slots
        self.holding += 1
        return Slot(self, name, job, attempt)

    def _acquire(self, job: JobRequest, prefer: Optional[str] = None, attempt: int = 0) -> Slot:
        with self._cond:
            while True:
                now = time.monotonic()
                if self._room():
                    if prefer in self.clusters and self.clusters[prefer].down_until <= now:
                        return self._hold(prefer, job, attempt)
                    healthy = [c.view(self.cached(c.name)) for c in self.clusters.values()
                               if c.down_until <= now]
                    name = self.policy.choose(job, healthy) if healthy else None
                    if name is not None:
                        return self._hold(name, job, attempt)
                wake = [c.down_until - now for c in self.clusters.values() if c.down_until > now]
                self._cond.wait(min(wake) if wake else None)

    def _give(self, slot: Slot) -> None:
        with self._cond:
            if not slot.held:
                return
            slot.held = False
            slot.seconds = time.monotonic() - slot._since
            self.clusters[slot.cluster].busy -= slot.job.slots
            self.holding -= 1
            self._cond.notify_all()

    def _retake(self, slot: Slot) -> None:
        with self._cond:
            if slot.held:
                return
            c, need = self.clusters[slot.cluster], slot.job.slots
            # as the policy's fit: enough free, or an idle cluster too small for the job
            while not (self._room() and (c.slots - c.busy >= need or c.busy == 0)):
                self._cond.wait()
            c.busy += need
            self.holding += 1
            slot.held, slot.seconds, slot._since = True, None, time.monotonic()

    def _learn(self, slot: Slot) -> None:
        """A job done on *slot*'s cluster: its speed estimate follows the job's time."""
        with self._cond:
            c = self.clusters[slot.cluster]
            c.done += 1
            seconds = slot.seconds or 0.0
            # recent jobs weigh most: a cluster that slows down gets less work soon
            c.seconds_per_job = seconds if not c.seconds_per_job else \
                0.7 * c.seconds_per_job + 0.3 * seconds

    def _mark_down(self, name: str, error: BaseException) -> None:
        with self._cond:
            c = self.clusters[name]
            c.down_until = time.monotonic() + self.down_for
            c.failed_over += 1
            log.warning("cluster %s lost (%s): no work for it for %.0f s", name, error,
                        self.down_for)
            self._cond.notify_all()

    def status(self) -> List[Dict]:
        """Each cluster: slots, busy, healthy, jobs done, failovers, seconds per job."""
        now = time.monotonic()
        with self._cond:
            return [dict(name=c.name, slots=c.slots, busy=c.busy, healthy=c.down_until <= now,
                         done=c.done, failed_over=c.failed_over,
                         seconds_per_job=round(c.seconds_per_job, 3))
                    for c in self.clusters.values()]
