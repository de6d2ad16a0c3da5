"""Schedulers: where a job script runs and how its state is learnt.

``ProcessScheduler`` runs the script as a process on the head node (launchers
``local`` and ``mpirun``); ``SlurmScheduler`` (slurm.py) hands it to ``sbatch``;
``PoolScheduler`` queues it on a worker pool (pool.py). Each maps its own states to
:class:`JobState` in one table, and raises :class:`SubmitError` (never returns a false
id) when the job cannot start.

The agent runs each scheduler's ``submit``, ``status`` and ``cancel`` on a thread of its
own (supervisor.py), one call at a time, so they may block; ``exit_fds``/``reap`` run on
the agent's loop and must not.

Shipped to the cluster with the agent: standard library only.
"""
from __future__ import annotations

import abc
import errno
import json
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from .jobs import JobFiles, JobSpec, JobState
from .launchers import LAUNCHERS
from .pool import request_cancel

log = logging.getLogger("cloudexec.agent")

#: errnos of a fork, exec or open that may work a moment later: the system (or the user's
#: limits) ran short of processes, memory or file descriptors
RESOURCE_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})


def resource_shortage(e: BaseException) -> bool:
    """True for an OSError that says "not now" rather than "never"."""
    return isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS


def retry_for(default: float) -> float:
    """Seconds a transient submit failure is retried ($CLOUDEXEC_SUBMIT_RETRY_FOR)."""
    try:
        return float(os.environ.get("CLOUDEXEC_SUBMIT_RETRY_FOR") or default)
    except ValueError:
        return default


class SubmitError(RuntimeError):
    """The job could not be started; keeps what the launch command printed.

    ``transient``: the scheduler itself did not answer (timeout, controller down), so a
    later try may work, and the job may even have been created.
    """

    def __init__(self, message: str, output: str = "", transient: bool = False):
        super().__init__(message + ("\n" + output.strip() if output.strip() else ""))
        self.output = output
        self.transient = transient


class Status(NamedTuple):
    """A job's state as a scheduler sees it; ``seen``: when the scheduler itself last
    reported the job (wall clock), 0 when it does not tell."""
    state: JobState
    exit_code: Optional[int] = None
    reason: str = ""
    seen: float = 0.0


class Scheduler(abc.ABC):
    """Starts job scripts and reports their states."""

    #: seconds between two :meth:`status` calls for this scheduler's jobs
    poll_interval = 1.0
    #: seconds a transient :class:`SubmitError` is retried before the job is given up
    submit_for = 0.0
    #: seconds before the first retry of a transient submit failure (doubling, 30 s at most)
    retry_first = 2.0

    @abc.abstractmethod
    def submit(self, spec: JobSpec, files: JobFiles) -> Tuple[str, JobState]:
        """Start ``files.script``; return (launcher id, RUNNING or QUEUED).

        Raises:
            SubmitError: with the launch command's output.
        """

    @abc.abstractmethod
    def status(self, jobs: Dict[str, Tuple[str, JobFiles]]) -> Dict[str, Status]:
        """States of {job_id: (launcher id, files)}; jobs whose state is unknown are left out."""

    @abc.abstractmethod
    def cancel(self, launcher_id: str, files: JobFiles) -> None:
        """Ask the job to stop; its end is then seen through :meth:`status`."""

    def next_poll(self) -> float:
        """Seconds from now to the next :meth:`status` call."""
        return self.poll_interval

    def pending_work(self) -> bool:
        """True while the scheduler has chores of its own (e.g. a cancel to retry), for which
        :meth:`status` must keep being called even with no job."""
        return False

    def abandon(self, job_id: str, files: JobFiles) -> None:
        """A submit whose outcome is unknown was given up: make sure nothing of it runs."""

    def unrecorded(self, files: JobFiles) -> str:
        """The launcher id of a job an earlier agent started but did not record, found
        from the job's own files, or "" (unknown: not adoptable)."""
        return ""

    def restore(self, journal_path: str) -> None:
        """Take over what an earlier agent left pending (called once, on the agent's loop,
        before any call on the scheduler's thread)."""

    def adopt(self, job_id: str, launcher_id: str, seen: float) -> None:
        """An earlier agent's job; *seen*: when the scheduler last reported it (wall clock,
        as recorded in the journal). Called on the agent's loop at start."""

    def exit_fds(self) -> Dict[int, str]:
        """File descriptors readable when a job ends ({fd: job_id}), for event-driven reaping.
        Called on the agent's loop."""
        return {}

    def reap(self, job_id: str) -> Optional[Status]:
        """Collect a job whose exit fd became readable (on the agent's loop)."""
        return None


def _proc_start_wall(start: str) -> float:
    """A process's start time (``/proc/PID/stat`` field 22, clock ticks since boot) as a
    wall-clock time."""
    try:
        with open("/proc/stat") as f:
            boot = next(float(ln.split()[1]) for ln in f if ln.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return 0.0
    return boot + int(start) / os.sysconf("SC_CLK_TCK")


def _proc_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of *pid*, to tell a live job from a recycled pid."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def final_from_rc(rc: Optional[int]) -> Optional[Status]:
    if rc is None:
        return None
    return Status(JobState.DONE if rc == 0 else JobState.FAILED, rc)


class ProcessScheduler(Scheduler):
    """The job script as a process in its own session on the head node.

    Launcher id: ``<pid>:<start time>``. The script outlives the agent; its exit
    code then comes from the ``rc`` file it writes. Its own children are reaped on the
    agent's loop as soon as their pidfd becomes readable; ``submit`` runs on the
    scheduler's thread, hence the lock.
    """

    poll_interval = 1.0
    grace = 5.0
    retry_first = 0.25

    def __init__(self) -> None:
        self._procs: Dict[str, subprocess.Popen] = {}
        self._fds: Dict[int, str] = {}
        self._lock = threading.Lock()
        # a fork failing for want of processes or memory is retried this long
        self.submit_for = retry_for(60.0)

    def submit(self, spec: JobSpec, files: JobFiles) -> Tuple[str, JobState]:
        try:
            with open(files.stdout, "ab") as out, open(files.stderr, "ab") as err:
                proc = subprocess.Popen(self.argv(files), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, close_fds=True,
                                        start_new_session=True)
        except OSError as e:  # nothing of the job ran: a fork or exec that failed
            raise SubmitError("cannot start the job script %s: %s" % (files.script, e),
                              transient=resource_shortage(e)) from None
        with self._lock:
            self._procs[spec.job_id] = proc
            try:
                self._fds[os.pidfd_open(proc.pid)] = spec.job_id
            except (AttributeError, OSError):
                pass  # no pidfd: status() polls instead
        return "%d:%s" % (proc.pid, _proc_start_time(proc.pid) or "?"), JobState.RUNNING

    def argv(self, files: JobFiles) -> List[str]:
        """The command that runs the job script (a subclass may put ``nice`` in front)."""
        return ["/bin/sh", files.script]

    def unrecorded(self, files: JobFiles) -> str:
        """The job script's pid from ``started``, if that process still runs and began when
        the file was written (not a pid used again since)."""
        pid = files.read_started_pid()
        if pid <= 0:
            return ""
        start = _proc_start_time(pid)
        if start is None or abs(_proc_start_wall(start) - files.read_started()) > 2.0:
            return ""
        return "%d:%s" % (pid, start)

    def exit_fds(self) -> Dict[int, str]:
        with self._lock:
            return dict(self._fds)

    def reap(self, job_id: str) -> Optional[Status]:
        with self._lock:
            proc = self._procs.get(job_id)
            if proc is None or proc.poll() is None:
                return None
            self._procs.pop(job_id, None)
            for fd, jid in list(self._fds.items()):
                if jid == job_id:
                    os.close(fd)
                    del self._fds[fd]
        return self._exit_status(proc.returncode)

    @staticmethod
    def _exit_status(returncode: int) -> Status:
        if returncode < 0:  # the job script itself was killed, not only the program: the
            # node, the OOM killer or an administrator stopped the job (a cancel says so first)
            return Status(JobState.LOST, None, "the job script was killed by signal %d"
                          % -returncode)
        return Status(JobState.DONE if returncode == 0 else JobState.FAILED, returncode)

    def status(self, jobs: Dict[str, Tuple[str, JobFiles]]) -> Dict[str, Status]:
        result = {}
        with self._lock:
            watched = set(self._fds.values())
            ours = set(self._procs)
        for job_id, (launcher_id, files) in jobs.items():
            if job_id in watched:
                continue  # its pidfd tells the loop; closing it here would race the poll
            if job_id in ours:
                st = self.reap(job_id)
                if st is not None:
                    result[job_id] = st
                continue
            # adopted from an earlier agent: not our child, so read its rc file
            pid, _, started = launcher_id.partition(":")
            alive = pid.isdigit() and _proc_start_time(int(pid)) == started
            rc = files.read_rc()
            if rc is not None:
                result[job_id] = final_from_rc(rc)  # type: ignore[assignment]
            elif not alive:
                result[job_id] = Status(JobState.LOST, None,
                                        "the job's process is gone and left no exit code")
        return result

    @staticmethod
    def _signal(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self, launcher_id: str, files: JobFiles) -> None:
        pid, _, started = launcher_id.partition(":")
        if not pid.isdigit() or _proc_start_time(int(pid)) != started:
            return
        self._signal(int(pid), signal.SIGTERM)
        # whatever of the group outlives the grace (an mpirun waiting on stuck ranks) is
        # killed by a watcher of its own: the job script may be gone long before that
        try:
            subprocess.Popen(["/bin/sh", "-c", "sleep %g; kill -KILL -- -%d 2>/dev/null"
                              % (self.grace, int(pid))], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        except OSError as e:  # no process to spare: a timer in the agent does it instead
            log.warning("cannot start the SIGKILL watcher of job %s (%s): the agent sends it",
                        launcher_id, e)
            timer = threading.Timer(self.grace, self._signal, (int(pid), signal.SIGKILL))
            timer.daemon = True
            timer.start()  # RuntimeError if not even a thread: the cancel is tried again


# SLURM state -> ours, in one place. Anything not listed counts as RUNNING.
SLURM_STATES = {
    "PENDING": JobState.QUEUED, "CONFIGURING": JobState.QUEUED, "REQUEUED": JobState.QUEUED,
    "REQUEUE_HOLD": JobState.QUEUED, "REQUEUE_FED": JobState.QUEUED, "RESV_DEL_HOLD": JobState.QUEUED,
    "SUSPENDED": JobState.QUEUED, "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING, "SIGNALING": JobState.RUNNING, "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.DONE, "FAILED": JobState.FAILED, "OUT_OF_MEMORY": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED, "TIMEOUT": JobState.TIMEOUT, "DEADLINE": JobState.TIMEOUT,
    "PREEMPTED": JobState.LOST, "NODE_FAIL": JobState.LOST, "BOOT_FAIL": JobState.LOST,
    "REVOKED": JobState.LOST,
}


class PoolScheduler(Scheduler):
    """Hands single-rank jobs to a running worker pool (see pool.py) through its queue folder.

    Launcher id: ``pool:<pool folder>``. A job waits as QUEUED until a rank takes it; a pool
    whose heartbeat (touched every second) stopped for ``dead_after`` seconds
    (``$CLOUDEXEC_POOL_DEAD_AFTER``, 15 by default) loses its unfinished jobs (LOST: they
    may be retried elsewhere).
    """

    poll_interval = 0.05
    retry_first = 0.25

    def __init__(self, pools_root: str):
        self.pools_root = pools_root
        self.dead_after = float(os.environ.get("CLOUDEXEC_POOL_DEAD_AFTER") or 15.0)
        self.submit_for = retry_for(60.0)  # a queue file not written for want of fds

    def pool_dir(self, pool: str) -> str:
        if not pool or "/" in pool or pool.startswith("."):
            raise SubmitError("invalid pool name %r" % pool)
        return os.path.join(self.pools_root, pool)

    def submit(self, spec: JobSpec, files: JobFiles) -> Tuple[str, JobState]:
        if spec.ranks != 1:
            raise SubmitError("a worker pool runs single-rank jobs; this one asks for %d ranks"
                              % spec.ranks)
        pool = self.pool_dir(spec.launcher.pool)
        queue = os.path.join(pool, "queue")
        try:
            os.makedirs(queue, exist_ok=True)
            tmp = os.path.join(pool, ".%s.tmp" % spec.job_id)
            with open(tmp, "w") as f:
                f.write(json.dumps({"job_id": spec.job_id, "script": files.script,
                                    "stdout": files.stdout, "stderr": files.stderr,
                                    "rc": files.rc}))
            os.replace(tmp, os.path.join(queue, spec.job_id))
        except OSError as e:
            raise SubmitError("cannot queue the job on worker pool %s: %s"
                              % (spec.launcher.pool, e), transient=resource_shortage(e)) from None
        return "pool:%s" % spec.launcher.pool, JobState.QUEUED

    def status(self, jobs: Dict[str, Tuple[str, JobFiles]]) -> Dict[str, Status]:
        result = {}
        for job_id, (lid, files) in jobs.items():
            rc = files.read_rc()
            if rc is not None:
                result[job_id] = final_from_rc(rc)  # type: ignore[assignment]
                continue
            pool = self.pool_dir(lid.split(":", 1)[1])
            if os.path.exists(os.path.join(pool, "running", job_id)):
                result[job_id] = Status(JobState.RUNNING)
            try:
                age = time.time() - os.path.getmtime(os.path.join(pool, "heartbeat"))
            except OSError:
                continue  # the pool has not started yet (e.g. waiting in SLURM's queue)
            if age > self.dead_after:
                result[job_id] = Status(JobState.LOST, None, "worker pool %s stopped "
                                        "(no heartbeat for %.0f s)" % (lid, age))
        return result

    def cancel(self, launcher_id: str, files: JobFiles) -> None:
        # queued, being taken or running: see pool.request_cancel for the handshake
        request_cancel(self.pool_dir(launcher_id.split(":", 1)[1]), os.path.basename(files.dir),
                       files.rc)


def _slurm(workdir: str) -> Scheduler:
    from .slurm import SlurmScheduler  # slurm.py imports this module
    return SlurmScheduler()


#: the one registry of schedulers: name -> factory given the agent's workdir; a launcher's
#: ``scheduler`` names one, and the agent makes one of each
SCHEDULERS: Dict[str, Callable[[str], Scheduler]] = {
    "process": lambda workdir: ProcessScheduler(),
    "slurm": _slurm,
    "pool": lambda workdir: PoolScheduler(os.path.join(workdir, "pools")),
}


def scheduler_kind(launcher_kind: str) -> str:
    """Which scheduler serves a launcher: ``slurm``, ``pool`` or ``process``."""
    launcher = LAUNCHERS.get(launcher_kind)
    return launcher.scheduler if launcher is not None else "process"
