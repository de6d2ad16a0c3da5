"""What a job is, on both sides of the wire: its spec, its states, its folder and script.

Shipped to the cluster with the agent: standard library only.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class JobState(str, enum.Enum):
    """Where a job is. The client reacts to the final ones as documented here."""

    SUBMITTED = "submitted"
    """In the journal, not started yet."""
    QUEUED = "queued"
    """Handed to the batch system, waiting for resources (SLURM PENDING)."""
    RUNNING = "running"
    """Started: its process (or batch job) is alive."""
    DONE = "done"
    """Final: the command exited 0."""
    FAILED = "failed"
    """Final: the command exited non-zero. The program's own failure: never retried blindly."""
    CANCELLED = "cancelled"
    """Final: cancelled by a client (or by an administrator through the batch system)."""
    TIMEOUT = "timeout"
    """Final: the batch system's wall time ran out. Not the program's fault: it may be retried."""
    LOST = "lost"
    """Final: the job vanished without an exit code (node lost, agent host rebooted).
    An infrastructure failure: safe to retry elsewhere."""

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED,
                          JobState.TIMEOUT, JobState.LOST})

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class LauncherSpec:
    """How the cluster starts jobs: the launcher part of a cluster's config."""
    kind: str = "local"
    mpirun: List[str] = field(default_factory=lambda: ["mpirun"])
    hosts: List[str] = field(default_factory=list)
    srun: List[str] = field(default_factory=lambda: ["srun"])
    partition: str = ""
    account: str = ""
    time: str = ""
    pool: str = ""  # kind "pool": the worker pool that takes the job


@dataclass
class JobSpec:
    """One command to run on a cluster.

    Attributes:
        job_id: unique name chosen by the client; submitting the same id twice
            returns the existing job instead of starting a second one.
        argv: the program and its arguments (no shell).
        ranks: MPI ranks (local launcher: that many plain processes).
        threads: threads per rank (``OMP_NUM_THREADS``, SLURM ``--cpus-per-task``).
        gpus: GPU numbers, exported as ``CUDA_VISIBLE_DEVICES``.
        env: extra environment variables.
        env_prepend: entries put in front of the cluster's own value (PATH-like variables).
        cwd: working directory on the cluster; empty means the job's own folder.
        env_setup: shell lines run first (``module load ...``).
        launcher: how to start it.
        client: who submitted it (shown by ``jobs``).
        label: a human label (protocol and step).
        slots: the cluster's slots (its config). With the head node's own launchers (local,
            mpirun), the agent starts the job once the ranks x threads of the jobs running
            there, of every client, leave room for its own; until then it waits, in order.
            A job larger than the slots runs alone. 0: no limit (a batch system's own).
        gpu_pool: the cluster's GPUs (its config). With the head node's own launchers, a job
            whose ``gpus`` another job holds gets free ones of the pool instead (the command
            names them 0..k-1: see ``CUDA_VISIBLE_DEVICES``), or waits for them.
    """
    job_id: str
    argv: List[str]
    ranks: int = 1
    threads: int = 1
    gpus: List[int] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    env_prepend: Dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    env_setup: str = ""
    launcher: LauncherSpec = field(default_factory=LauncherSpec)
    client: str = ""
    label: str = ""
    slots: int = 0
    gpu_pool: List[int] = field(default_factory=list)

    @property
    def cores(self) -> int:
        """The slots the job takes: ranks x threads."""
        return max(1, self.ranks) * max(1, self.threads)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "JobSpec":
        d = dict(d)
        d["launcher"] = LauncherSpec(**d.get("launcher", {}))
        return cls(**d)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.job_id, str) or not JOB_ID_RE.fullmatch(self.job_id):
            raise ValueError("job_id %r: use 1-128 letters, digits, '.', '_' or '-'" % self.job_id)
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ValueError("argv must be a non-empty list of strings")
        if self.ranks < 1 or self.threads < 1:
            raise ValueError("ranks and threads must be at least 1")
        if not isinstance(self.slots, int) or self.slots < 0:
            raise ValueError("slots must be a whole number, 0 or more")
        from .launchers import LAUNCHERS  # here: launchers.py imports this module
        if self.launcher.kind not in LAUNCHERS:
            raise ValueError("launcher %r: use %s" % (self.launcher.kind, ", ".join(LAUNCHERS)))
        for k in list(self.env) + list(self.env_prepend):
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError("environment variable name %r is not valid" % k)
        for k, v in list(self.env.items()) + list(self.env_prepend.items()):
            if not isinstance(v, str) or "\0" in v:
                raise ValueError("environment variable %s: its value %r must be a string "
                                 "(without NUL)" % (k, v))


class JobFiles:
    """The folder of one job on the cluster: ``<workdir>/jobs/<job_id>/``."""

    def __init__(self, jobs_root: str, job_id: str):
        self.dir = os.path.join(jobs_root, job_id)
        self.script = os.path.join(self.dir, "job.sh")
        self.stdout = os.path.join(self.dir, "stdout")
        self.stderr = os.path.join(self.dir, "stderr")
        self.rc = os.path.join(self.dir, "rc")
        self.started = os.path.join(self.dir, "started")  # made when the job script starts
        self.held = os.path.join(self.dir, "held")  # waits for slots: never handed over yet
        self.hostfile = os.path.join(self.dir, "hostfile")

    def read_started_pid(self) -> int:
        """The pid the job script wrote into ``started`` (0: none, or not started)."""
        try:
            with open(self.started) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def read_started(self) -> float:
        """When the job script started (its ``started`` file's time), or 0 if it has not."""
        try:
            return os.stat(self.started).st_mtime
        except OSError:
            return 0.0

    def read_rc(self) -> Optional[int]:
        """The exit code the job script recorded, or None if it has not ended."""
        return read_rc(self.rc)


def read_rc(path: str) -> Optional[int]:
    """The exit code in an ``rc`` file, or None: none yet, or left empty by a script killed
    while it wrote it."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def job_script(spec: JobSpec, files: JobFiles, command: List[str]) -> str:
    """The shell script that runs *command* (already wrapped by the launcher).

    The script records the exit code in ``rc`` itself, so the code survives an
    agent restart; the command's own exit code is the script's. A script killed while it
    writes ``rc`` may leave it empty: :meth:`JobFiles.read_rc` gives None for it.
    """
    q = shlex.quote
    lines = ["#!/bin/sh", "# cloudexec job %s" % spec.job_id,
             # its time is the job's start; its pid lets a new agent adopt a job whose
             # start the agent that forked it did not live to record
             "echo $$ > %s 2>/dev/null" % q(files.started)]
    if spec.env_setup.strip():
        lines += ["# env_setup from the clusters file", spec.env_setup.strip()]
    exports = {"OMP_NUM_THREADS": str(spec.threads), "CLOUDEXEC_JOB_ID": spec.job_id}
    if spec.gpus:
        exports["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.gpus)
    exports.update(spec.env)
    lines += ["export %s=%s" % (k, q(v)) for k, v in exports.items()]
    lines += ['export %s=%s"${%s:+:$%s}"' % (k, q(v), k, k) for k, v in spec.env_prepend.items()]
    cwd = spec.cwd or files.dir
    lines += [
        "cd %s || { echo 'cloudexec: working directory %s does not exist on the cluster' >&2;"
        " echo 126 > %s; exit 126; }" % (q(cwd), cwd.replace("'", ""), q(files.rc)),
        " ".join(q(a) for a in command),
        "rc=$?",
        # one write of a few bytes: a reader sees no file, an empty one (read_rc: not ended
        # yet) or the whole code; no tmp + mv, which cost a fork and exec (1-3 ms) per job
        "echo $rc > %s" % q(files.rc),
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"
