"""Schedulers: where a job script runs and how its state is learnt.

``ProcessScheduler`` runs the script as a process on the head node (launchers
``local`` and ``mpirun``); ``SlurmScheduler`` hands it to ``sbatch``. Each maps its
own states to :class:`JobState` in one table, and raises :class:`SubmitError`
(never returns a false id) when the job cannot start.

Shipped to the cluster with the agent: standard library only.
"""
from __future__ import annotations

import abc
import json
import os
import re
import signal
import subprocess
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

from .jobs import JobFiles, JobSpec, JobState


class SubmitError(RuntimeError):
    """The job could not be started; keeps what the launch command printed."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message + ("\n" + output.strip() if output.strip() else ""))
        self.output = output


class Status(NamedTuple):
    """A job's state as a scheduler sees it."""
    state: JobState
    exit_code: Optional[int] = None
    reason: str = ""


class Scheduler(abc.ABC):
    """Starts job scripts and reports their states."""

    #: seconds between two :meth:`status` calls for this scheduler's jobs
    poll_interval = 1.0

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

    def exit_fds(self) -> Dict[int, str]:
        """File descriptors readable when a job ends ({fd: job_id}), for event-driven reaping."""
        return {}

    def reap(self, job_id: str) -> Optional[Status]:
        """Collect a job whose exit fd became readable."""
        return None


def _proc_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of *pid*, to tell a live job from a recycled pid."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _final_from_rc(rc: Optional[int]) -> Optional[Status]:
    if rc is None:
        return None
    return Status(JobState.DONE if rc == 0 else JobState.FAILED, rc)


class ProcessScheduler(Scheduler):
    """The job script as a process in its own session on the head node.

    Launcher id: ``<pid>:<start time>``. The script outlives the agent; its exit
    code then comes from the ``rc`` file it writes.
    """

    poll_interval = 1.0
    grace = 5.0

    def __init__(self) -> None:
        self._procs: Dict[str, subprocess.Popen] = {}
        self._fds: Dict[int, str] = {}

    def submit(self, spec: JobSpec, files: JobFiles) -> Tuple[str, JobState]:
        try:
            with open(files.stdout, "ab") as out, open(files.stderr, "ab") as err:
                proc = subprocess.Popen(["/bin/sh", files.script], stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, close_fds=True,
                                        start_new_session=True)
        except OSError as e:
            raise SubmitError("cannot start the job script %s: %s" % (files.script, e)) from None
        self._procs[spec.job_id] = proc
        try:
            fd = os.pidfd_open(proc.pid)
            self._fds[fd] = spec.job_id
        except (AttributeError, OSError):
            pass  # no pidfd: status() polls instead
        return "%d:%s" % (proc.pid, _proc_start_time(proc.pid) or "?"), JobState.RUNNING

    def exit_fds(self) -> Dict[int, str]:
        return self._fds

    def reap(self, job_id: str) -> Optional[Status]:
        proc = self._procs.get(job_id)
        if proc is None or proc.poll() is None:
            return None
        self._forget(job_id)
        return self._exit_status(proc.returncode)

    def _forget(self, job_id: str) -> None:
        self._procs.pop(job_id, None)
        for fd, jid in list(self._fds.items()):
            if jid == job_id:
                os.close(fd)
                del self._fds[fd]

    @staticmethod
    def _exit_status(returncode: int) -> Status:
        if returncode < 0:  # the job script itself was killed, not only the program: the
            # node, the OOM killer or an administrator stopped the job (a cancel says so first)
            return Status(JobState.LOST, None, "the job script was killed by signal %d"
                          % -returncode)
        return Status(JobState.DONE if returncode == 0 else JobState.FAILED, returncode)

    def status(self, jobs: Dict[str, Tuple[str, JobFiles]]) -> Dict[str, Status]:
        result = {}
        for job_id, (launcher_id, files) in jobs.items():
            proc = self._procs.get(job_id)
            if proc is not None:
                st = self.reap(job_id)
                if st is not None:
                    result[job_id] = st
                continue
            # adopted from an earlier agent: not our child, so read its rc file
            pid, _, started = launcher_id.partition(":")
            alive = pid.isdigit() and _proc_start_time(int(pid)) == started
            rc = files.read_rc()
            if rc is not None:
                result[job_id] = _final_from_rc(rc)  # type: ignore[assignment]
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
        subprocess.Popen(["/bin/sh", "-c", "sleep %g; kill -KILL -- -%d 2>/dev/null"
                          % (self.grace, int(pid))], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)


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


class SlurmScheduler(Scheduler):
    """``sbatch`` the job script; states from ``squeue``, then ``scontrol``/``sacct``."""

    poll_interval = 0.5

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout

    def _run(self, argv: List[str]) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=self.timeout)
        except FileNotFoundError:
            raise SubmitError("%s not found on the cluster: is SLURM installed, or does "
                              "env_setup need a 'module load slurm'?" % argv[0]) from None
        except subprocess.TimeoutExpired:
            raise SubmitError("%s did not answer within %.0f s" % (argv[0], self.timeout)) from None

    def submit(self, spec: JobSpec, files: JobFiles) -> Tuple[str, JobState]:
        argv = ["sbatch", "--parsable", "-J", "cx-" + spec.job_id, "-o", files.stdout,
                "-e", files.stderr, "-n", str(spec.ranks), "-c", str(spec.threads),
                "-D", files.dir]
        for opt, value in (("-p", spec.launcher.partition), ("-A", spec.launcher.account),
                           ("-t", spec.launcher.time)):
            if value:
                argv += [opt, value]
        p = self._run(argv + [files.script])
        m = re.match(r"^(\d+)", p.stdout.strip())
        if p.returncode != 0 or not m:
            raise SubmitError("sbatch refused the job (exit %d)" % p.returncode,
                              p.stderr + p.stdout)
        return m.group(1), JobState.QUEUED

    def status(self, jobs: Dict[str, Tuple[str, JobFiles]]) -> Dict[str, Status]:
        if not jobs:
            return {}
        ids = ",".join(lid for lid, _ in jobs.values())
        p = self._run(["squeue", "-h", "-t", "all", "-j", ids, "-o", "%i|%T|%r"])
        queued: Dict[str, Tuple[str, str]] = {}
        for line in p.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                queued[parts[0]] = (parts[1], parts[2])
        result = {}
        for job_id, (lid, files) in jobs.items():
            state, reason = queued.get(lid, ("", ""))
            ours = SLURM_STATES.get(state, JobState.RUNNING) if state else None
            if ours is not None and not ours.final:
                result[job_id] = Status(ours, None, "" if reason in ("None", "") else reason)
                continue
            final = self._final(lid, files, ours)
            if final is not None:
                result[job_id] = final
        return result

    def _final(self, lid: str, files: JobFiles, squeue_state: Optional[JobState]) -> Optional[Status]:
        rc = files.read_rc()
        if rc is not None:
            return _final_from_rc(rc)
        p = self._run(["scontrol", "-o", "show", "job", lid])
        m = re.search(r"JobState=(\S+)", p.stdout)
        state = m.group(1) if m else ""
        if not state:
            p = self._run(["sacct", "-n", "-X", "-P", "-j", lid, "-o", "State,ExitCode"])
            line = p.stdout.strip().splitlines()[0] if p.stdout.strip() else ""
            state = line.split("|")[0].split()[0] if line else ""
        ours = SLURM_STATES.get(state) if state else squeue_state
        if ours is None:
            if squeue_state is None and not state:
                return Status(JobState.LOST, None, "SLURM job %s is unknown to squeue, "
                              "scontrol and sacct and left no exit code" % lid)
            return None
        if not ours.final:
            return Status(ours)
        m = re.search(r"ExitCode=(\d+):(\d+)", p.stdout)
        code = int(m.group(1)) if m else None
        return Status(ours, code, "SLURM state %s" % state if ours != JobState.DONE else "")

    def cancel(self, launcher_id: str, files: JobFiles) -> None:
        self._run(["scancel", launcher_id])


class PoolScheduler(Scheduler):
    """Hands single-rank jobs to a running worker pool (see pool.py) through its queue folder.

    Launcher id: ``pool:<pool folder>``. A job waits as QUEUED until a rank takes it; a pool
    whose heartbeat stopped for ``dead_after`` seconds loses its unfinished jobs (LOST: they
    may be retried elsewhere).
    """

    poll_interval = 0.05
    dead_after = 15.0

    def __init__(self, pools_root: str):
        self.pools_root = pools_root

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
        os.makedirs(queue, exist_ok=True)
        tmp = os.path.join(pool, ".%s.tmp" % spec.job_id)
        with open(tmp, "w") as f:
            f.write(json.dumps({"job_id": spec.job_id, "script": files.script,
                                "stdout": files.stdout, "stderr": files.stderr}))
        os.replace(tmp, os.path.join(queue, spec.job_id))
        return "pool:%s" % spec.launcher.pool, JobState.QUEUED

    def status(self, jobs: Dict[str, Tuple[str, JobFiles]]) -> Dict[str, Status]:
        result = {}
        for job_id, (lid, files) in jobs.items():
            rc = files.read_rc()
            if rc is not None:
                result[job_id] = _final_from_rc(rc)  # type: ignore[assignment]
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
        pool = self.pool_dir(launcher_id.split(":", 1)[1])
        job_id = os.path.basename(files.dir)
        try:
            os.unlink(os.path.join(pool, "queue", job_id))  # not started: never will
            with open(files.rc, "w") as f:
                f.write("143\n")
            return
        except FileNotFoundError:
            pass
        try:
            with open(os.path.join(pool, "running", job_id)) as f:
                os.killpg(int(f.read().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def scheduler_kind(launcher_kind: str) -> str:
    """Which scheduler serves a launcher: ``slurm``, ``pool`` or ``process``."""
    return launcher_kind if launcher_kind in ("slurm", "pool") else "process"
