"""The scheduling policy: one method that picks a cluster for a job.

Write your own by subclassing :class:`Policy`::

    class GpuJobsToGpuClusters(CapacityPolicy):
        def choose(self, job, clusters):
            if job.gpus:
                clusters = [c for c in clusters if c.gpus]
            return super().choose(job, clusters)

and pass it to the dispatcher (``MultiClusterDispatcher(..., policy=...)``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class JobRequest:
    """What the policy knows of a job: its size."""
    ranks: int = 1
    threads: int = 1
    gpus: Tuple[int, ...] = ()

    @property
    def slots(self) -> int:
        """The cores it takes: ranks times threads (at least one)."""
        return max(1, self.ranks * self.threads)


@dataclass(frozen=True)
class ClusterView:
    """A cluster as the policy sees it at the moment of choosing.

    Attributes:
        name: the clusters-file name.
        slots: cores this plugin may use there (clusters file).
        busy: cores taken by this protocol's running jobs there.
        seconds_per_job: recent mean duration of this protocol's jobs there (0: unknown).
        gpus: GPU numbers the cluster offers.
        cached_bytes: how much of the job's input that cluster already holds (0: unknown).
    """
    name: str
    slots: int
    busy: int
    seconds_per_job: float = 0.0
    gpus: Tuple[int, ...] = ()
    cached_bytes: int = 0

    @property
    def free(self) -> int:
        return self.slots - self.busy


class Policy(abc.ABC):
    """Picks the cluster that runs a job."""

    @abc.abstractmethod
    def choose(self, job: JobRequest, clusters: Sequence[ClusterView]) -> Optional[str]:
        """The name of the cluster that should run *job* now, or None to wait for a slot.

        *clusters* holds only healthy clusters. Called under the dispatcher's lock: keep it
        quick and free of I/O.
        """


class CapacityPolicy(Policy):
    """The cluster where the job would finish first: free slots, measured speed, data.

    A cluster takes a job only if it has ``ranks * threads`` free slots. Among those, the
    expected finish is ``seconds_per_job`` (unknown speeds count as the best known one) and
    ties go to the cluster holding more of the job's input, then to the one with more free
    slots. So a slow cluster (or one behind a slow link, which lengthens its jobs) gets
    proportionally less work, and an idle big cluster gets more.
    """

    def choose(self, job: JobRequest, clusters: Sequence[ClusterView]) -> Optional[str]:
        need = job.slots
        known = [c.seconds_per_job for c in clusters if c.seconds_per_job > 0]
        default = min(known) if known else 1.0
        fits = [c for c in clusters if c.free >= need or (c.busy == 0 and c.slots < need)]
        if not fits:
            return None
        best = min(fits, key=lambda c: (c.seconds_per_job or default, -c.cached_bytes, -c.free))
        return best.name
