"""The protocol's list of running jobs, as Scipion's Stop reads it, written in group commits.

Scipion's Stop cancels every job id the protocol lists (hosts.conf ``CANCEL_COMMAND``), so a
job is listed, committed to the run's database, before it is submitted, and unlisted when it
has ended. One commit per change made every step wait behind every other step's commit
(issue 13: 64 steps starting together waited 64 commits). Here a caller whose change is not
yet written becomes the writer if none is at work, and writes every change queued so far in
one commit; the others wait for that commit. Each caller still returns only once its own
change is committed: what Stop sees is unchanged.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, List, Tuple

logger = logging.getLogger(__name__)

__all__ = ["JobIdList"]


class JobIdList:
    """Adds and removes ``cluster:job`` references in a protocol's job ids, committed.

    Args:
        protocol: returns the protocol (``appendJobId``, ``removeJobId``, ``_store``,
            ``_jobId``); called by the writer only.
    """

    def __init__(self, protocol: Callable[[], object]):
        self._protocol = protocol
        self._cond = threading.Condition()
        self._queued: List[Tuple[str, bool]] = []
        self._asked = 0    # changes queued since the start
        self._written = 0  # changes committed (or given up on, logged) since the start
        self._writing = False

    def change(self, ref: str, add: bool) -> None:
        """List (*add*) or unlist *ref*; returns once the change is committed. A failure is
        logged, never raised: bookkeeping must not fail the job."""
        with self._cond:
            self._queued.append((ref, add))
            self._asked += 1
            mine = self._asked
            while self._written < mine:
                if self._writing:
                    self._cond.wait()
                    continue
                batch, self._queued, upto = self._queued, [], self._asked
                self._writing = True
                self._cond.release()
                try:
                    self._write(batch)
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self._written = upto
                    self._cond.notify_all()

    def _write(self, batch: List[Tuple[str, bool]]) -> None:
        protocol = self._protocol()
        changed = []
        for ref, add in batch:  # in the order asked: an add and its remove stay in order
            try:
                if add:
                    protocol.appendJobId(ref)
                else:
                    protocol.removeJobId(ref)
                changed.append(ref)
            except Exception as e:
                logger.warning("could not record job id %s: %s", ref, e)
        if not changed:
            return
        try:
            protocol._store(protocol._jobId)
        except Exception as e:
            logger.warning("could not record job id%s %s: %s", "s" if len(changed) > 1 else "",
                           ", ".join(changed), e)
