"""Jobs between the agent's loop and its schedulers: start, follow, cancel, end.

Every scheduler call (``submit``, ``status``, ``cancel``, ``abandon``) runs on that
scheduler's own thread (:class:`Workers`), one at a time, with a deadline; results come
back through a pipe the loop polls. So the loop, which answers heartbeats and requests,
never waits on SLURM. A process job's exit is still seen at once: its pidfd is polled by
the loop and reaped there (``reap``).

A submit that fails for the scheduler's sake (``SubmitError.transient``: SLURM down or
timing out, or a fork that failed for want of processes, memory or file descriptors) is
tried again with backoff for ``Scheduler.submit_for`` seconds, the job staying SUBMITTED;
then it is LOST with the last error, and whatever the failed tries may have created is
cancelled (``abandon``). A worker thread that cannot be started (``can't start new thread``)
is started again with backoff, its calls waiting in its queue; a cancel that raised is
tried again the same way.

Shipped to the cluster with the agent: standard library only. Over 400 lines: one job's
life (submit, retries, status, cancel, end) across the worker threads is one state machine,
which reads best whole.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from .jobs import JobFiles, JobSpec, JobState, job_script
from .journal import Journal
from .launchers import launcher_for
from .schedulers import (PoolScheduler, Scheduler, Status, SubmitError, final_from_rc,
                         scheduler_kind)

log = logging.getLogger("cloudexec.agent")

#: deadline of one call on a scheduler's thread; the scheduler's own commands time out first
TIMEOUTS = {"submit": 240.0, "status": 150.0, "cancel": 150.0, "abandon": 150.0}
#: tries of a cancel or abandon that raised (0.5 s .. 30 s apart)
CHORE_TRIES = 8
#: seconds between journal writes of when the scheduler last reported a running job
SEEN_EVERY = 5.0


class Call:
    """One scheduler call handed to a worker thread, and its outcome."""

    def __init__(self, sched: str, op: str, job_id: str, fn: Callable[[], Any], timeout: float):
        self.sched, self.op, self.job_id, self.fn = sched, op, job_id, fn
        self.deadline = time.monotonic() + timeout
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.overdue = False
        self.tries = 0  # earlier tries of the same call that raised


class Workers:
    """One thread per scheduler, running its calls in order; finished calls wake the loop
    through a pipe (:meth:`fileno`)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._queues: Dict[str, "queue.Queue[Optional[Call]]"] = {}
        self._threads: Dict[str, threading.Thread] = {}
        self._thread_failures: Dict[str, int] = {}
        self._thread_retry: Dict[str, float] = {}  # scheduler -> when to try a thread again
        self._done: Deque[Call] = collections.deque()
        self._pending: Set[Call] = set()
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._r

    def call(self, sched: str, op: str, job_id: str, fn: Callable[[], Any]) -> Call:
        c = Call(sched, op, job_id, fn, TIMEOUTS[op])
        with self._lock:
            self._pending.add(c)
        self._queues.setdefault(sched, queue.Queue()).put(c)
        self._ensure_thread(sched)
        return c

    def _ensure_thread(self, sched: str) -> None:
        """Start the scheduler's thread unless it runs (threads only for schedulers in use);
        when the system cannot make one now, its calls wait and it is tried again later."""
        t = self._threads.get(sched)
        if t is not None and t.is_alive():
            return
        now = time.monotonic()
        if now < self._thread_retry.get(sched, 0.0):
            return
        t = threading.Thread(target=self._serve, args=(self._queues[sched],), daemon=True,
                             name="cloudexec-%s" % sched)
        try:
            t.start()
        except RuntimeError as e:  # "can't start new thread": clone() failed with EAGAIN
            n = self._thread_failures[sched] = self._thread_failures.get(sched, 0) + 1
            delay = min(30.0, 0.25 * 2 ** n)
            self._thread_retry[sched] = now + delay
            log.warning("cannot start the %s scheduler's thread (%s); its %d call(s) wait, "
                        "trying again in %.1f s", sched, e, self._queues[sched].qsize(), delay)
            return
        self._threads[sched] = t
        self._thread_failures.pop(sched, None)
        self._thread_retry.pop(sched, None)

    def retry_threads(self) -> None:
        """Start the threads that could not be started before and have calls waiting."""
        for sched, q in self._queues.items():
            if not q.empty():
                self._ensure_thread(sched)

    def due(self) -> List[float]:
        """When threads that could not start are to be tried again (monotonic)."""
        return [t for s, t in self._thread_retry.items() if not self._queues[s].empty()]

    def _serve(self, q: "queue.Queue[Optional[Call]]") -> None:
        while True:
            c = q.get()
            if c is None:
                return
            try:
                c.result = c.fn()
            except BaseException as e:  # handed to the loop, which decides
                c.error = e
            with self._lock:
                self._pending.discard(c)
                self._done.append(c)
            try:
                os.write(self._w, b"x")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: the loop wakes anyway

    def finished(self) -> List[Call]:
        """Calls that returned since the last look (drains the wake-up pipe)."""
        try:
            while os.read(self._r, 65536):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            done = list(self._done)
            self._done.clear()
        return done

    def overdue(self, now: float) -> List[Call]:
        """Calls past their deadline, each reported once."""
        with self._lock:
            late = [c for c in self._pending if not c.overdue and now > c.deadline]
        for c in late:
            c.overdue = True
        return late

    def stop(self) -> None:
        # the pipe stays open: a thread stuck in a command may still write to it
        for q in self._queues.values():
            q.put(None)


def _write_script(spec: JobSpec, files: JobFiles) -> None:
    """The job's script, as its launcher runs it (raises OSError, ValueError)."""
    command = launcher_for(spec.launcher.kind).command(spec, files)
    with open(files.script, "w") as f:
        f.write(job_script(spec, files, command))


def _pool_argv(argv: List[str]) -> bool:
    """Whether *argv* starts a worker pool (the bundle's ``pool --dir D``)."""
    return len(argv) == 5 and argv[1].endswith(".zip") and argv[2:4] == ["pool", "--dir"]


class Starting:
    """A job handed to its scheduler, not started yet."""

    def __init__(self, spec: JobSpec, sched: str, files: JobFiles):
        self.spec, self.sched, self.files = spec, sched, files
        self.first = time.monotonic()
        self.tries = 0
        self.retry_at = 0.0  # 0: a submit is in flight


class Supervisor:
    """The agent's jobs: ``starting`` (submit in flight or to retry) and ``active``."""

    def __init__(self, journal: Journal, jobs_root: str, schedulers: Dict[str, Scheduler],
                 on_end: Callable[[str, Dict], None]):
        self.journal = journal
        self.jobs_root = jobs_root
        self.schedulers = schedulers
        self.on_end = on_end  # (job_id, journal row) once the job's end is recorded
        self.workers = Workers()
        self.active: Dict[str, Tuple[str, str, JobFiles]] = {}  # job -> (scheduler, lid, files)
        self.starting: Dict[str, Starting] = {}
        # jobs waiting for the head node's slots (JobSpec.slots), in order of arrival, and
        # the slots taken by head-node jobs started or starting, of every client
        self.held: "collections.OrderedDict[str, Starting]" = collections.OrderedDict()
        self.cores: Dict[str, int] = {}
        self.gpus: Dict[str, Tuple[str, List[int]]] = {}  # the (client, GPUs) they hold
        self.next_poll: Dict[str, float] = {}
        self.polling: Set[str] = set()  # schedulers with a status call in flight
        self.retries: List[Tuple[float, Call, int]] = []  # (when, failed cancel, tries so far)
        self.cancelled_pools: Dict[str, str] = {}  # worker pool -> its job, being cancelled

    def count(self) -> int:
        return len(self.active) + len(self.starting) + len(self.held)

    def busy(self) -> bool:
        """Jobs to follow, or scheduler chores left (a cancel to retry)."""
        return bool(self.count()) or any(s.pending_work() for s in self.schedulers.values())

    def exit_fds(self) -> Dict[int, str]:
        return self.schedulers["process"].exit_fds()

    def _call(self, sched: str, op: str, job_id: str, fn: Callable[[], Any]) -> None:
        self.workers.call(sched, op, job_id, fn)

    # ---- life -----------------------------------------------------------------------------

    def adopt(self) -> None:
        """Take over the journal's unfinished jobs from an earlier agent, and what it left
        pending: scancels not done yet, cancels asked for while it stopped."""
        for sched in self.schedulers.values():
            sched.restore(self.journal.path)
        waiting: List[Tuple[float, Starting]] = []
        for row in self.journal.active():
            job_id, sched = row["job_id"], row["scheduler"]
            files = JobFiles(self.jobs_root, job_id)
            spec = self.journal.spec(job_id)
            if os.path.exists(files.held) and spec is not None and sched in self.schedulers \
                    and not row["launcher_id"] and not files.read_started_pid() \
                    and files.read_rc() is None:  # never handed over (the marker alone
                waiting.append((row["submitted"], Starting(spec, sched, files)))  # is not proof)
                continue
            if row["state"] == JobState.SUBMITTED.value or not row["launcher_id"]:
                # the earlier agent died between starting the job and recording it: the
                # job's own files say whether it ran (a LOST job is run again: twice)
                lid = self.schedulers[sched].unrecorded(files) if sched in self.schedulers \
                    else ""
                rc = None if lid else files.read_rc()
                if lid:
                    row = dict(row, launcher_id=lid)
                    self.journal.update(job_id, state=JobState.RUNNING, launcher_id=lid)
                    log.info("job %s had started unrecorded (%s %s)", job_id, sched, lid)
                elif rc is not None:
                    self.finish(job_id, final_from_rc(rc))  # type: ignore[arg-type]
                    continue
                else:
                    self.finish(job_id, Status(JobState.LOST, None,
                                               "the agent stopped before the job started"))
                    if sched in self.schedulers:  # its submit may have gone through
                        self._call(sched, "abandon", job_id,
                                   lambda s=self.schedulers[sched], j=job_id, f=files:
                                   s.abandon(j, f))
                    continue
            self.active[job_id] = (sched, row["launcher_id"], files)
            if sched == "process" and spec is not None and self._limited(spec, sched):
                self.cores[job_id] = spec.cores
                if spec.gpus:  # as handed over (the journal's spec)
                    self.gpus[job_id] = (spec.client, list(spec.gpus))
            log.info("adopted job %s (%s %s)", job_id, sched, row["launcher_id"])
            if sched in self.schedulers:
                self.schedulers[sched].adopt(job_id, row["launcher_id"],
                                             row["seen"] or row["started"] or row["submitted"])
                if row["cancelled"]:  # its cancel may never have reached the scheduler
                    log.info("job %s was cancelled: asking %s again", job_id, sched)
                    self._cancel_lid(sched, job_id, row["launcher_id"], files)
        for _when, st in sorted(waiting, key=lambda w: w[0]):  # after the running jobs
            if (self.journal.get(st.spec.job_id) or {}).get("cancelled"):
                self._unhold(st, cancelled=True)
                self.finish(st.spec.job_id, Status(JobState.CANCELLED, None,
                                                   "cancelled while waiting for slots"))
                continue
            self.held[st.spec.job_id] = st
            log.info("job %s waits for slots again", st.spec.job_id)
        self._release()

    def start(self, spec: JobSpec) -> None:
        """Write the job's script and hand it to its scheduler's thread."""
        files = JobFiles(self.jobs_root, spec.job_id)
        sched = scheduler_kind(spec.launcher.kind)
        try:
            os.makedirs(files.dir, exist_ok=True)
            _write_script(spec, files)
        except (OSError, ValueError) as e:
            self._not_started(spec.job_id, files, e)
            return
        st = Starting(spec, sched, files)
        if self._limited(spec, sched) and (self._waits(spec) or self._behind(spec)):
            try:  # the marker tells a new agent that it was never handed over
                open(files.held, "w").close()
            except OSError as e:
                self._not_started(spec.job_id, files, e)
                return
            self.held[spec.job_id] = st
            why = self._waiting_for(spec)
            self.journal.update(spec.job_id, reason=why)
            log.info("job %s (%d slot(s)) %s", spec.job_id, spec.cores, why)
            return
        self._hand_over(st)

    @staticmethod
    def _limited(spec: JobSpec, sched: str) -> bool:
        """Whether the job shares the head node's slots or GPUs with other clients' jobs.
        A worker pool's own job is not: it holds its ranks for a whole protocol, and that
        protocol's single-rank jobs run in it (counting it could make them wait for it)."""
        return sched == "process" and not _pool_argv(spec.argv) and \
            (spec.slots > 0 or bool(spec.gpus))

    def _short_of_slots(self, spec: JobSpec) -> bool:
        """Other jobs take the slots it needs (a job larger than the slots waits until none
        runs, then runs alone)."""
        used = sum(self.cores.values())
        return spec.slots > 0 and used > 0 and used + spec.cores > spec.slots

    def _waits(self, spec: JobSpec) -> bool:
        """No room for it yet: its slots or GPUs are taken."""
        return self._short_of_slots(spec) or self._gpus_for(spec) is None

    def _behind(self, spec: JobSpec) -> bool:
        """A job that came earlier waits for slots this one needs too: slots go in order,
        so that a large job is not passed forever by small ones."""
        return spec.slots > 0 and any(self._short_of_slots(h.spec) for h in self.held.values())

    def _held_gpus(self, client: str) -> Set[int]:
        """GPUs held by other clients' jobs (a protocol's own steps may share one, as
        pyworkflow shares a GPU between threads when there are fewer GPUs than threads)."""
        return {g for c, gpus in self.gpus.values() if c != client for g in gpus}

    def _gpus_for(self, spec: JobSpec) -> Optional[List[int]]:
        """The GPUs the job gets: its own if no other client's job holds them, else as
        many free ones of its pool; None: not enough are free."""
        held = self._held_gpus(spec.client)
        if not spec.gpus or not held & set(spec.gpus):
            return list(spec.gpus)
        free = [g for g in spec.gpu_pool if g not in held]
        return free[:len(spec.gpus)] if len(free) >= len(spec.gpus) else None

    def _waiting_for(self, spec: JobSpec) -> str:
        if self._gpus_for(spec) is None:
            return "waiting for GPUs: %s held by other protocols' jobs" % ",".join(
                str(g) for g in sorted(self._held_gpus(spec.client)))
        return "waiting for slots: %d of %d in use by running jobs, %d job(s) waiting" % (
            sum(self.cores.values()), spec.slots, len(self.held))

    def _hand_over(self, st: Starting) -> None:
        spec = st.spec
        if self._limited(spec, st.sched):
            gpus = self._gpus_for(spec) or []
            if gpus != spec.gpus:  # another client's job holds them: free ones instead
                log.info("job %s gets GPUs %s (%s held)", spec.job_id, gpus, spec.gpus)
                spec.gpus = gpus
                try:
                    _write_script(spec, st.files)
                except (OSError, ValueError) as e:
                    self._not_started(spec.job_id, st.files, e)
                    return
                self.journal.update(spec.job_id, spec=json.dumps(spec.to_dict()))
            if spec.gpus:
                self.gpus[spec.job_id] = (spec.client, list(spec.gpus))
            self.cores[spec.job_id] = spec.cores
            st.first, st.tries = time.monotonic(), 0  # its submit retries start now
        self.starting[spec.job_id] = st
        self._submit(spec.job_id)

    def _unhold(self, st: Starting, cancelled: bool = False) -> bool:
        """The job waits no more. Handed over (not *cancelled*), False if its marker is
        still there: then it must not run (a new agent would take it for never started,
        and run it again) and it ends lost."""
        self.held.pop(st.spec.job_id, None)
        try:
            os.unlink(st.files.held)
        except FileNotFoundError:
            pass
        except OSError as e:
            if cancelled:  # it ends for good: a stale marker of a final job is never read
                return True
            self._not_started(st.spec.job_id, st.files, OSError(
                "cannot remove %s (%s): the job was not started" % (st.files.held, e)))
            return False
        return True

    def _release(self) -> None:
        """Hand over the waiting jobs that fit now, in order: one waiting for slots keeps
        the later ones that need slots waiting (a large job is not passed forever by small
        ones); one waiting for GPUs holds back no other."""
        short = False
        for st in list(self.held.values()):
            spec = st.spec
            if (spec.slots > 0 and short) or self._short_of_slots(spec):
                short = short or spec.slots > 0
                continue
            if self._gpus_for(spec) is None:
                continue
            # the marker goes before the submit: a crash in between makes the job lost
            # (run again by its client), never run twice
            if self._unhold(st):
                self.journal.update(spec.job_id, reason="")
                self._hand_over(st)

    def _submit(self, job_id: str) -> None:
        st = self.starting[job_id]
        st.retry_at = 0.0
        sched = self.schedulers[st.sched]
        self._call(st.sched, "submit", job_id, lambda: sched.submit(st.spec, st.files))

    def _submitted(self, c: Call) -> None:
        st = self.starting.get(c.job_id)
        if st is None:  # given up (deadline) while the call ran: nothing of it may run
            if c.error is None:
                self._cancel_lid(c.sched, c.job_id, c.result[0], JobFiles(self.jobs_root, c.job_id))
            elif isinstance(c.error, SubmitError) and c.error.transient:
                s = self.schedulers[c.sched]
                self._call(c.sched, "abandon", c.job_id, lambda: s.abandon(
                    c.job_id, JobFiles(self.jobs_root, c.job_id)))
            return
        sched = self.schedulers[st.sched]
        e = c.error
        if e is not None:
            transient = isinstance(e, SubmitError) and e.transient
            cancelled = bool((self.journal.get(c.job_id) or {}).get("cancelled"))
            if transient and not cancelled and time.monotonic() - st.first < sched.submit_for:
                st.tries += 1
                st.retry_at = time.monotonic() + min(30.0, sched.retry_first * 2 ** (st.tries - 1))
                log.warning("job %s: %s; trying again in %.1f s", c.job_id,
                            str(e).replace("\n", " "), st.retry_at - time.monotonic())
                return
            if transient:
                self._call(st.sched, "abandon", c.job_id, lambda: sched.abandon(c.job_id, st.files))
                if st.tries:
                    e = SubmitError("%s\n(tried %d times over %.0f s)" % (
                        e, st.tries + 1, time.monotonic() - st.first), transient=True)
            self._not_started(c.job_id, st.files, e)
            return
        del self.starting[c.job_id]
        lid, state = c.result
        self.journal.update(c.job_id, launcher_id=lid, state=state,
                            started=time.time() if state == JobState.RUNNING else 0)
        self.active[c.job_id] = (st.sched, lid, st.files)
        if (self.journal.get(c.job_id) or {}).get("cancelled"):  # cancelled while starting
            self._cancel_lid(st.sched, c.job_id, lid, st.files)

    def _not_started(self, job_id: str, files: JobFiles, e: BaseException) -> None:
        try:
            with open(files.stderr, "a") as f:
                f.write("cloudexec: %s\n" % e)
        except OSError:
            pass
        permanent = isinstance(e, ValueError) or (isinstance(e, SubmitError) and not e.transient)
        self.finish(job_id, Status(JobState.FAILED if permanent else JobState.LOST, None, str(e)))

    def cancel(self, job_id: str) -> None:
        """Record the cancel and ask the scheduler (on its thread); the end comes later."""
        self.journal.update(job_id, cancelled=1)
        if job_id in self.held:
            self._unhold(self.held[job_id], cancelled=True)
            self.finish(job_id, Status(JobState.CANCELLED, None,
                                       "cancelled while waiting for slots"))
            self._release()  # those behind it may fit
            return
        pool = self._pool_served_by(job_id)
        if pool is not None:  # its jobs, killed with it, end cancelled too
            self.cancelled_pools[pool] = job_id
        if job_id in self.active:
            sched, lid, files = self.active[job_id]
            self._cancel_lid(sched, job_id, lid, files)
        elif job_id in self.starting and self.starting[job_id].retry_at:
            st = self.starting[job_id]  # waiting to retry a submit: stop here
            sched = self.schedulers[st.sched]
            self._call(st.sched, "abandon", job_id, lambda: sched.abandon(job_id, st.files))
            self.finish(job_id, Status(JobState.CANCELLED, None, "cancelled before the "
                                       "scheduler took the job"))
        # a submit in flight: _submitted cancels the job once it has an id

    def _cancel_lid(self, sched: str, job_id: str, lid: str, files: JobFiles) -> None:
        s = self.schedulers[sched]
        self._call(sched, "cancel", job_id, lambda: s.cancel(lid, files))
        self.next_poll[sched] = 0.0

    def reap(self, job_ids: List[str]) -> None:
        """Process jobs whose pidfd became readable (on the loop: seen at once)."""
        sched = self.schedulers["process"]
        for job_id in job_ids:
            if job_id in self.starting:
                continue  # its submit result is still in the pipe: reaped next round
            st = sched.reap(job_id)  # also a job given up meanwhile: its fd must go
            if st is not None and job_id in self.active:
                self.finish(job_id, st)

    def finish(self, job_id: str, st: Status) -> None:
        """Record a final state, then let the agent tell the watchers."""
        row = self.journal.get(job_id)
        state = st.state
        if row and row["cancelled"] and state in (JobState.FAILED, JobState.LOST):
            state = JobState.CANCELLED
        pool = (row or {}).get("launcher_id", "")[5:] if (row or {}).get(
            "scheduler") == "pool" else ""
        if pool in self.cancelled_pools and state in (JobState.FAILED, JobState.LOST):
            state = JobState.CANCELLED  # killed with its pool (rc 143 or no rc)
            st = Status(state, None, "worker pool %s was cancelled (job %s)"
                        % (pool, self.cancelled_pools[pool]))
        fields = {}
        if row and not row["started"]:  # never seen running (a short SLURM or pool job):
            files = (self.active.get(job_id) or (None, None, None))[2] or getattr(
                self.starting.get(job_id), "files", None)  # its script says when it started
            fields["started"] = files.read_started() if files is not None else 0.0
        # a cancelled program has no exit code of its own (SLURM says 0 for a scancel)
        exit_code = None if state == JobState.CANCELLED else st.exit_code
        self.journal.update(job_id, state=state, exit_code=exit_code, reason=st.reason,
                            ended=time.time(), **fields)
        self.active.pop(job_id, None)
        self.starting.pop(job_id, None)
        freed = self.cores.pop(job_id, None) is not None  # slots, and GPUs, given back
        self.gpus.pop(job_id, None)
        log.info("job %s %s (exit %s) %s", job_id, state.value, st.exit_code, st.reason)
        self.on_end(job_id, self.journal.get(job_id))  # type: ignore[arg-type]
        pool = self._pool_served_by(job_id)
        if pool is not None:
            self._pool_ended(pool, job_id, state)
            self.cancelled_pools.pop(pool, None)  # a new pool of that name starts afresh
        if freed:
            self._release()

    def _pool_served_by(self, job_id: str) -> Optional[str]:
        """The worker pool that job *job_id* ran (see ClusterSession.start_pool), or None."""
        sched = self.schedulers.get("pool")
        spec = self.journal.spec(job_id) if sched is not None else None
        argv = spec.argv if spec is not None else []
        if isinstance(sched, PoolScheduler) and _pool_argv(argv):
            name = os.path.basename(argv[4].rstrip("/"))
            try:
                if os.path.abspath(sched.pool_dir(name)) == os.path.abspath(argv[4]):
                    return name
            except SubmitError:
                pass
        return None

    def _pool_ended(self, pool: str, pool_job: str, state: JobState) -> None:
        """A worker pool's own job ended: its jobs end now, not once its heartbeat is
        missed; cancelled with it when it was cancelled. Whatever of them still runs or waits
        in its queue is cancelled, so a later pool of that name never takes them."""
        for job_id, (sched, lid, files) in list(self.active.items()):
            if sched != "pool" or lid != "pool:" + pool:
                continue
            self._cancel_lid(sched, job_id, lid, files)
            rc = files.read_rc()
            if rc is not None:  # it had ended just before
                self.finish(job_id, final_from_rc(rc))  # type: ignore[arg-type]
            elif pool in self.cancelled_pools:  # finish() says why
                self.finish(job_id, Status(JobState.LOST))
            else:
                self.finish(job_id, Status(JobState.LOST, None, "worker pool %s ended (%s) "
                                           "before the job did" % (pool, state.value)))

    # ---- the loop's phases --------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Start what is due: submit retries, status calls; give up overdue submits."""
        self.workers.retry_threads()
        for job_id, st in list(self.starting.items()):
            if st.retry_at and now >= st.retry_at:
                self._submit(job_id)
        due = [r for r in self.retries if r[0] <= now]
        self.retries = [r for r in self.retries if r[0] > now]
        for _, c, tries in due:
            self.workers.call(c.sched, c.op, c.job_id, c.fn).tries = tries
        for name, sched in self.schedulers.items():
            if name in self.polling or now < self.next_poll.get(name, 0.0):
                continue
            jobs = {j: (lid, f) for j, (s, lid, f) in self.active.items() if s == name}
            if not jobs and not sched.pending_work():
                continue
            self.polling.add(name)
            self._call(name, "status", "", lambda s=sched, j=jobs: s.status(j))
        for c in self.workers.overdue(now):
            log.warning("%s %s %s has not returned for %.0f s; the agent goes on", c.sched,
                        c.op, c.job_id, now - c.deadline + TIMEOUTS[c.op])
            if c.op == "submit" and c.job_id in self.starting:
                self.finish(c.job_id, Status(JobState.LOST, None, "the %s scheduler did not "
                                             "start the job within %.0f s"
                                             % (c.sched, TIMEOUTS["submit"])))

    def collect(self) -> None:
        """Apply the results of the calls that returned."""
        for c in self.workers.finished():
            if c.op == "submit":
                self._submitted(c)
            elif c.op == "status":
                self._polled(c)
            elif c.error is not None:
                tries = c.tries + 1
                if tries < CHORE_TRIES:  # e.g. EMFILE or a failed fork: it may work later
                    delay = min(30.0, 0.5 * 2 ** tries)
                    self.retries.append((time.monotonic() + delay, c, tries))
                    log.warning("%s %s of job %s failed (%s); trying again in %.1f s",
                                c.sched, c.op, c.job_id, c.error, delay)
                else:
                    log.error("%s %s of job %s failed %d times, given up: %s", c.sched, c.op,
                              c.job_id, tries, c.error)


    def _polled(self, c: Call) -> None:
        sched = self.schedulers[c.sched]
        self.polling.discard(c.sched)
        self.next_poll[c.sched] = time.monotonic() + sched.next_poll()
        if c.error is not None:
            log.warning("cannot poll %s: %s", c.sched, c.error)
            return
        for job_id, st in c.result.items():
            if job_id not in self.active:
                continue  # ended meanwhile (pidfd, cancel)
            if st.state.final:
                self.finish(job_id, st)
                continue
            row = self.journal.get(job_id)
            if row and row["state"] != st.state.value:
                self.journal.update(job_id, state=st.state, reason=st.reason,
                                    started=time.time() if st.state == JobState.RUNNING
                                    else row["started"], seen=max(st.seen, row["seen"]))
            elif row and st.seen - row["seen"] >= SEEN_EVERY:
                self.journal.update(job_id, seen=st.seen)

    def due_in(self, now: float) -> float:
        """Seconds until :meth:`tick` has something to start (for the loop's poll timeout)."""
        due = [st.retry_at for st in self.starting.values() if st.retry_at]
        due += [r[0] for r in self.retries] + self.workers.due()
        due += [self.next_poll.get(n, 0.0) for n, s in self.schedulers.items()
                if n not in self.polling and (s.pending_work() or
                                              any(v[0] == n for v in self.active.values()))]
        return max(0.0, min(due) - now) if due else 3600.0

    def stop(self) -> None:
        self.workers.stop()
