"""Launchers: how a job's command becomes an MPI (or plain) start command.

A launcher only rewrites argv; it never starts anything. Where the command then
runs (a process on the head node, a SLURM batch job) is a scheduler's business
(:mod:`.schedulers`). This is Parsl's provider/launcher split.

Shipped to the cluster with the agent: standard library only.
"""
from __future__ import annotations

import abc
from typing import List

from .jobs import JobFiles, JobSpec

# Runs "$@" once per rank in the background; the first non-zero exit code wins.
_LOCAL_RANKS = r'''n=$1; shift; pids=""; i=0
while [ $i -lt $n ]; do CLOUDEXEC_RANK=$i CLOUDEXEC_SIZE=$n "$@" & pids="$pids $!"; i=$((i+1)); done
rc=0; for p in $pids; do wait $p; r=$?; [ $rc -eq 0 ] && rc=$r; done; exit $rc'''


class Launcher(abc.ABC):
    """Turns a job's argv into the command that starts its ranks."""

    #: the ``launcher`` value of the clusters file this class serves
    kind = ""
    #: the scheduler that runs its jobs: ``process`` (on the head node), ``slurm``, ``pool``
    scheduler = "process"
    #: a value users may give in the clusters file (not so the worker pool's)
    configurable = True

    @abc.abstractmethod
    def command(self, spec: JobSpec, files: JobFiles) -> List[str]:
        """Return the argv that starts ``spec.argv`` as ``spec.ranks`` ranks.

        May write helper files (a hostfile) into ``files.dir``.
        """


class LocalLauncher(Launcher):
    """Plain processes on the head node: one, or ``ranks`` copies side by side."""
    kind = "local"

    def command(self, spec: JobSpec, files: JobFiles) -> List[str]:
        if spec.ranks == 1:
            return list(spec.argv)
        return ["/bin/sh", "-c", _LOCAL_RANKS, "cloudexec-ranks", str(spec.ranks)] + list(spec.argv)


class MpirunLauncher(Launcher):
    """``mpirun -np N`` with the configured prefix, and a hostfile for several nodes."""
    kind = "mpirun"

    def command(self, spec: JobSpec, files: JobFiles) -> List[str]:
        argv = list(spec.launcher.mpirun) + ["-np", str(spec.ranks)]
        if spec.launcher.hosts:
            with open(files.hostfile, "w") as f:
                for h in spec.launcher.hosts:
                    name, _, slots = h.partition(":")
                    f.write("%s slots=%s\n" % (name, slots) if slots else "%s\n" % name)
            argv += ["--hostfile", files.hostfile]
        if spec.threads > 1:
            argv += ["-x", "OMP_NUM_THREADS"]
        if spec.gpus:
            argv += ["-x", "CUDA_VISIBLE_DEVICES"]
        return argv + list(spec.argv)


class SrunLauncher(Launcher):
    """``srun`` inside a SLURM batch job; the ranks come from the allocation."""
    kind = "slurm"
    scheduler = "slurm"

    def command(self, spec: JobSpec, files: JobFiles) -> List[str]:
        return list(spec.launcher.srun) + list(spec.argv)


class PoolLauncher(Launcher):
    """A job for a worker pool: one rank, started by the pool itself (see pool.py)."""
    kind = "pool"
    scheduler = "pool"
    configurable = False

    def command(self, spec: JobSpec, files: JobFiles) -> List[str]:
        return list(spec.argv)


#: the one registry of launchers: the clusters file, job validation, the scheduler that runs
#: a job and the command line's ``--launcher`` all read it
LAUNCHERS = {cls.kind: cls for cls in (MpirunLauncher, SrunLauncher, LocalLauncher, PoolLauncher)}


def launcher_for(kind: str) -> Launcher:
    """The launcher for a clusters-file ``launcher`` value."""
    try:
        return LAUNCHERS[kind]()
    except KeyError:
        raise ValueError("unknown launcher %r (use %s)" % (kind, ", ".join(LAUNCHERS))) from None
