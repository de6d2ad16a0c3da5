"""An mpi4py worker pool: one MPI job that runs many small single-rank jobs, one after
another on each rank, so that each pays a process start and not an ``mpirun`` start.

Started by the client as an ordinary job (``python agent.zip pool --dir D`` under the
cluster's launcher, N ranks). The agent's ``PoolScheduler`` hands it jobs through files::

    D/queue/<job_id>     a job to run: its job script and output files (JSON)
    D/running/<job_id>   the pid of its process group while it runs
    D/heartbeat          touched every second by rank 0
    D/stop               the pool exits once it has nothing left to run

Each job script writes its own ``rc`` file, which is how the agent learns the end.
Rank 0 hands out work and, when alone, runs it too. Shipped with the agent (stdlib + mpi4py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional

POLL = 0.02  # seconds between looks at the queue when idle
_STOP = threading.Event()


def run_task(task: dict, pool_dir: str, rank: int) -> int:
    """Run one job script in its own session; its pid is visible for cancelling."""
    env = dict(os.environ, CLOUDEXEC_POOL_RANK=str(rank))
    for k in [k for k in env if k.startswith(("OMPI_", "PMIX_", "PMI_"))]:
        del env[k]  # the job is not part of the pool's MPI world
    with open(task["stdout"], "ab") as out, open(task["stderr"], "ab") as err:
        proc = subprocess.Popen(["/bin/sh", task["script"]], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=env, start_new_session=True)
    marker = os.path.join(pool_dir, "running", task["job_id"])
    with open(marker, "w") as f:
        f.write("%d\n" % proc.pid)
    try:
        return proc.wait()
    finally:
        os.unlink(marker)


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
    for sub in ("queue", "running"):
        os.makedirs(os.path.join(pool_dir, sub), exist_ok=True)
    idle: List[int] = list(range(1, size))
    busy: Dict[int, str] = {}
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
        task = take_next(pool_dir) if (idle or size == 1) else None
        if task is not None:
            if size == 1:
                run_task(task, pool_dir, 0)
            else:
                worker = idle.pop(0)
                busy[worker] = task["job_id"]
                comm.send(task, dest=worker)
            continue
        if _STOP.is_set() or (not busy and os.path.exists(os.path.join(pool_dir, "stop"))):
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
