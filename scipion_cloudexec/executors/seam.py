"""Where the plugin meets pyworkflow: ``Protocol.setStepsExecutor``.

pyworkflow's protocol process picks a steps executor with fixed rules and hands it to
``protocol.setStepsExecutor`` right before ``protocol.run()``; the process has imported every
plugin by then. :func:`install` (called from the plugin's ``__init__``) wraps that method once:
when the protocol was launched with "Use queue" on a host whose queue system is named
``cloudexec`` (hosts.conf ``NAME = cloudexec``), the executor is replaced by a
:class:`~.cloud.CloudStepExecutor` for the cluster named by the chosen queue, keeping the
threads and GPUs pyworkflow chose. Every other protocol keeps pyworkflow's executor untouched.

Queue parameters read (all optional except QUEUE_FOR_JOBS, which must be ``Y`` so that the
protocol itself runs on the desktop and only its jobs go out):

    QUEUE_FOR_JOBS = Y     CLOUD_TIME = 04:00:00 (SLURM wall time per job)
    CLOUD_POOL = 8         single-rank steps go to an mpi4py worker pool of 8 ranks
    CLOUD_RETRIES = 2      tries after an infrastructure failure (lost cluster, node, agent)
    CLOUD_RECONNECT = 30   seconds a step tries to reach its cluster again after losing
                           contact (its job goes on there) before it moves elsewhere
    CLOUD_JOBS = 16        at most 16 of the protocol's jobs on the cluster(s) at once
                           (empty or 0: as many as the clusters' slots take); the form's
                           threads bound only the steps running on the desktop

The queue name is a cluster of the clusters file, a ``[group NAME]`` of it, several cluster
names joined by commas, or ``all``: a
protocol's jobs are then shared between them (scheduling/) and fail over between them.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

logger = logging.getLogger(__name__)

QUEUE_SYSTEM = "cloudexec"
_MARK = "_cloudexec_wrapped"


def cloud_choice(protocol) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(queue name, queue params) when *protocol* was sent to a cloudexec queue, else None.

    Raises:
        ValueError: it was sent to a cloudexec queue but its choice cannot be read: such a
            protocol must fail, never quietly run on the desktop.
    """
    if not protocol.useQueue():
        return None
    host = protocol.getHostConfig()
    qs = host.getQueueSystem() if host is not None else None
    if qs is None or not qs.hasName() or qs.getName() != QUEUE_SYSTEM:
        return None
    try:
        queue, params = protocol.getQueueParams()
        return str(queue), dict(params or {})
    except Exception as e:
        raise ValueError("the protocol was sent to a cloudexec queue of host %s, but its queue "
                         "choice cannot be read (%s: %s): choose the queue again in the form's "
                         "queue dialog" % (host.getLabel(), type(e).__name__, e)) from e


def make_executor(protocol, stock, queue: str, params: Dict[str, Any]):
    """The cloud executor replacing *stock*, with its threads and GPUs."""
    from ..config import ConfigError, load_clusters, load_groups
    from .cloud import CloudStepExecutor
    # pyworkflow logs INFO into the protocol's log: paramiko's "Connected (version 2.0 ...)",
    # "Authentication (publickey) successful!" lines are not the user's business
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    threads = getattr(stock, "numberOfProcs", 1)
    gpus = getattr(stock, "gpuList", None)
    host = getattr(stock, "hostConfig", None)
    try:
        clusters = load_clusters()
        groups = load_groups()
        names = list(clusters) if queue == "all" else groups[queue] if queue in groups else [
            n.strip() for n in queue.replace("+", ",").split(",") if n.strip()]
        unknown = [n for n in names if n not in clusters]
        if unknown or not names:
            raise ConfigError("queue %r of hosts.conf names no cluster of %s (defined: %s; "
                              "'all' or 'a,b' name several)"
                              % (queue, next(iter(clusters.values())).source,
                                 ", ".join(clusters)))
        retries = int(params.get("CLOUD_RETRIES") or 2)
        reconnect = float(params.get("CLOUD_RECONNECT") or 30)
    except (ConfigError, ValueError) as e:
        return _Refusing(host, str(e))
    try:
        pool = int(params.get("CLOUD_POOL") or 0)
    except ValueError:
        return _Refusing(host, "queue parameter CLOUD_POOL=%r is not a number of ranks"
                         % params.get("CLOUD_POOL"))
    try:
        jobs = int(params.get("CLOUD_JOBS") or 0)
        if jobs < 0:
            raise ValueError
    except ValueError:
        return _Refusing(host, "queue parameter CLOUD_JOBS=%r is not a number of jobs (empty or "
                         "0: as many as the clusters' slots take)" % params.get("CLOUD_JOBS"))
    return CloudStepExecutor(host, threads, [clusters[n] for n in names], gpuList=gpus,
                             wall_time=str(params.get("CLOUD_TIME", "") or ""), pool_ranks=pool,
                             retries=retries, reconnect_for=reconnect, jobs=jobs)


def install() -> None:
    """Wrap ``Protocol.setStepsExecutor`` once (idempotent)."""
    from pyworkflow.protocol.protocol import Protocol
    original = Protocol.setStepsExecutor
    if getattr(original, _MARK, False):
        return

    def setStepsExecutor(self, executor=None):
        try:
            choice = cloud_choice(self) if executor is not None else None
        except ValueError as e:
            executor = _Refusing(getattr(executor, "hostConfig", None), str(e))
            choice = None
        if choice is not None:
            executor = make_executor(self, executor, *choice)
            logger.info("scipion-cloudexec: steps of %s go to %s", self.getRunName(), executor)
        return original(self, executor)

    setattr(setStepsExecutor, _MARK, True)
    setStepsExecutor.__doc__ = original.__doc__
    Protocol.setStepsExecutor = setStepsExecutor


class _Refusing:
    """Stand-in executor when the clusters file is wrong: every runJob fails with the reason,
    so the step (not the whole protocol process) reports it."""

    def __new__(cls, host, reason: str):
        from pyworkflow.protocol.executor import ThreadStepExecutor

        class Refusing(ThreadStepExecutor):
            def runJob(self, *args, **kwargs):
                raise RuntimeError("scipion-cloudexec: %s" % reason)
        return Refusing(host, 1)
