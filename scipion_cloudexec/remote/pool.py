"""An mpi4py worker pool: one MPI job that runs many small single-rank jobs, one after
another on each rank, so that each pays a process start and not an ``mpirun`` start.

Started by the client as an ordinary job (``python agent.zip pool --dir D`` under the
cluster's launcher, N ranks). The agent's ``PoolScheduler`` hands it jobs through files::

    D/queue/<job_id>     a job to run: its job script, output and rc files (JSON)
    D/running/<job_id>   the pid of its process group while it runs (written atomically)
    D/cancel/<job_id>    the agent wants the job cancelled (see request_cancel)
    D/heartbeat          touched every second by rank 0, also while it runs a job itself
    D/stop               the pool exits once it has nothing left to run

Each job ends with an ``rc`` file, which is how the agent learns the end: the job script
writes it, or the pool does when the script was killed (128 + signal, as a shell would).
Rank 0 hands out work and, when alone, runs it too, without blocking: its loop goes on
beating. Shipped with the agent (stdlib + mpi4py).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional, Tuple

from .jobs import read_rc

POLL = 0.02  # seconds between looks at the queue when idle
SPAWN_TRIES = 6  # a job whose fork fails (EAGAIN, ENOMEM...) is tried 0.1 .. 3.2 s apart
_RESOURCE_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
_STOP = threading.Event()


def write_rc(path: str, code: int) -> None:
    """Write an exit code file atomically (the agent must never read half of it)."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write("%d\n" % code)
    os.replace(tmp, path)


def _rc_path(task: dict) -> str:
    return task.get("rc") or os.path.join(os.path.dirname(task["script"]), "rc")


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def request_cancel(pool_dir: str, job_id: str, rc_path: str) -> None:
    """The agent's half of a cancel. With :func:`start_task`'s half, a job is stopped at
    any moment: the agent leaves a note, then looks for the job queued or running; the
    pool writes the running marker, then looks for the note. One of them sees the other's
    write, so a job taken from the queue in between is stopped all the same."""
    cancel_dir = os.path.join(pool_dir, "cancel")
    os.makedirs(cancel_dir, exist_ok=True)
    open(os.path.join(cancel_dir, job_id), "w").close()
    try:
        os.unlink(os.path.join(pool_dir, "queue", job_id))  # not taken yet: never will be
        write_rc(rc_path, 143)
        return
    except FileNotFoundError:
        pass
    try:
        with open(os.path.join(pool_dir, "running", job_id)) as f:
            _killpg(int(f.read().strip()))
    except (OSError, ValueError):
        pass  # not started yet (start_task sees the note) or already ended


def _cancelled(pool_dir: str, task: dict) -> bool:
    return os.path.exists(os.path.join(pool_dir, "cancel", task["job_id"]))


def start_task(task: dict, pool_dir: str, rank: int) -> Optional[subprocess.Popen]:
    """Start one job script in its own session, its pid visible for cancelling; None when
    it was cancelled before it started or could not be started (its rc says so)."""
    if _cancelled(pool_dir, task):
        end_task(task, pool_dir, -signal.SIGTERM)
        return None
    env = dict(os.environ, CLOUDEXEC_POOL_RANK=str(rank))
    for k in [k for k in env if k.startswith(("OMPI_", "PMIX_", "PMI_"))]:
        del env[k]  # the job is not part of the pool's MPI world
    for i in range(SPAWN_TRIES):  # the rank keeps its task: a failed fork is tried again
        try:
            with open(task["stdout"], "ab") as out, open(task["stderr"], "ab") as err:
                proc = subprocess.Popen(["/bin/sh", task["script"]], stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, env=env, start_new_session=True)
            break
        except OSError as e:
            if e.errno in _RESOURCE_ERRNOS and i < SPAWN_TRIES - 1:
                time.sleep(0.1 * 2 ** i)
                continue
            try:  # the job's own stderr says why it never ran
                with open(task["stderr"], "a") as f:
                    f.write("cloudexec: the worker pool cannot start the job: %s\n" % e)
            except OSError:
                pass
            end_task(task, pool_dir, 126)  # as a shell says "cannot execute"
            return None
    marker = os.path.join(pool_dir, "running", task["job_id"])
    with open(marker + ".tmp", "w") as f:
        f.write("%d\n" % proc.pid)
    os.replace(marker + ".tmp", marker)
    if _cancelled(pool_dir, task):  # the cancel came while it started: the agent may
        _killpg(proc.pid)           # have missed the marker
    return proc


def end_task(task: dict, pool_dir: str, returncode: int) -> int:
    """Clear a job's marker and make sure its rc file exists; return its exit code."""
    for sub in ("running", "cancel"):
        try:
            os.unlink(os.path.join(pool_dir, sub, task["job_id"]))
        except FileNotFoundError:
            pass
    code = 128 - returncode if returncode < 0 else returncode
    if read_rc(_rc_path(task)) is None:  # killed before (or while) the script wrote it
        write_rc(_rc_path(task), code)
    return code


def run_task(task: dict, pool_dir: str, rank: int) -> int:
    """Run one job to its end (worker ranks)."""
    proc = start_task(task, pool_dir, rank)
    return -1 if proc is None else end_task(task, pool_dir, proc.wait())


def take_next(pool_dir: str) -> Optional[dict]:
    """The oldest queued task, removed from the queue (None when empty)."""
    queue = os.path.join(pool_dir, "queue")
    names = sorted(os.listdir(queue), key=lambda n: os.stat(os.path.join(queue, n)).st_mtime_ns
                   if os.path.exists(os.path.join(queue, n)) else 0)
    for name in names:
        path = os.path.join(queue, name)
        try:
            with open(path) as f:
                task = json.load(f)
            os.unlink(path)
            return task
        except (OSError, ValueError):
            continue
    return None


def serve(pool_dir: str) -> int:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank != 0:
        while True:
            task = comm.recv(source=0)
            if task is None:
                return 0
            comm.send(run_task(task, pool_dir, rank), dest=0)
    for sub in ("queue", "running", "cancel"):
        os.makedirs(os.path.join(pool_dir, sub), exist_ok=True)
    idle: List[int] = list(range(1, size))
    busy: Dict[int, str] = {}
    local: Optional[Tuple[dict, subprocess.Popen]] = None  # the job rank 0 runs when alone
    beat = 0.0
    while True:
        now = time.monotonic()
        if now - beat > 1.0:
            with open(os.path.join(pool_dir, "heartbeat"), "w") as f:
                f.write("%d %d\n" % (os.getpid(), size))
            beat = now
        while comm.Iprobe(source=MPI.ANY_SOURCE):
            status = MPI.Status()
            comm.recv(source=MPI.ANY_SOURCE, status=status)
            busy.pop(status.Get_source(), None)
            idle.append(status.Get_source())
        if local is not None and local[1].poll() is not None:
            end_task(local[0], pool_dir, local[1].returncode)
            local = None
        can_take = idle if size > 1 else local is None
        task = take_next(pool_dir) if can_take and not _STOP.is_set() else None
        if task is not None:
            if size == 1:
                proc = start_task(task, pool_dir, 0)
                local = (task, proc) if proc is not None else None
            else:
                worker = idle.pop(0)
                busy[worker] = task["job_id"]
                comm.send(task, dest=worker)
            continue
        if local is None and (_STOP.is_set() or
                              (not busy and os.path.exists(os.path.join(pool_dir, "stop")))):
            break
        time.sleep(POLL)
    for worker in range(1, size):
        comm.send(None, dest=worker)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="cloudexec-pool")
    p.add_argument("--dir", required=True)
    a = p.parse_args(argv)
    # rank 0 stops handing out work and releases the workers; workers stuck in recv wait
    # for that (the launcher's SIGKILL ends whatever still hangs)
    signal.signal(signal.SIGTERM, lambda *_: _STOP.set())
    return serve(a.dir)
