"""The desktop's step threads as slots for local work (issue 13).

pyworkflow's threads (minus the one it keeps) bound how many steps run at once. In
:class:`~.cloud.CloudStepExecutor` they bound only the steps working on the desktop: a step
whose ``runJob`` has its cluster slots lends its desktop slot while its job runs, and takes
one back, ahead of new steps, before its own code goes on. Jobs in flight are bounded by the
clusters' slots (the dispatcher) and ``CLOUD_JOBS``, not here; those are given back when the
job has ended on the cluster, its gather still to come (the desktop slot only after it).
"""
from __future__ import annotations

import threading

__all__ = ["DesktopSlots"]


class DesktopSlots:
    """pyworkflow's threads as slots for local work. The loop takes one per step it starts;
    the step's thread gives it back when it ends (before the loop writes the step's end). A
    step lends its slot while its job runs on a cluster (:meth:`lend`) and takes one back
    (:meth:`take_back`) before going on, ahead of new steps (:meth:`take_free` gives none
    while one waits): it never starves behind them."""

    def __init__(self, n: int, wake: threading.Event):
        self.n = max(1, n)
        self.used = 0
        self.returning = 0
        self.lent = 0
        self._cond = threading.Condition()
        self._wake = wake

    def take_free(self) -> int:
        """Takes every slot free for new steps (none while a step waits to come back);
        the loop gives back those it did not use."""
        with self._cond:
            n = 0 if self.returning else max(0, self.n - self.used)
            self.used += n
            return n

    def give(self, n: int = 1) -> None:
        if n:
            with self._cond:
                self.used -= n
                self._cond.notify_all()

    def lend(self) -> None:
        """The calling step waits on the cluster: its slot may start another step."""
        with self._cond:
            self.used -= 1
            self.lent += 1
            self._cond.notify_all()
        self._wake.set()

    def take_back(self) -> None:
        with self._cond:
            self.returning += 1
            try:
                while self.used >= self.n:
                    self._cond.wait()
                self.used += 1
                self.lent -= 1
            finally:
                self.returning -= 1
