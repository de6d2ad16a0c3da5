"""The one family of infrastructure failures, as the desktop sees a cluster.

Every failure of the cluster or of the link to it reaches the executor and the CLI as an
:class:`InfraError` (the lower layers' own types subclass it, or the session wraps what
they let through: ``EOFError``, ``ConnectionError``, ``TimeoutError``). Anything else is
the program's or the desktop's own failure. Two class attributes say how to react:

======================  ==========  ===========  ==========================================
error                    ``down``    ``lasting``  what it means
======================  ==========  ===========  ==========================================
``SSHError``             yes         no           the SSH connection failed or broke
``HostUnreachable``      yes         yes *        no SSH server answers (an outage once the
                                                  cluster has worked: waited for)
``UnknownHostKey``,      yes         yes          the host key is not known or changed, the
``HostKeyChanged``,                               key is refused
``AuthRefused``
``AgentStartError``      yes         yes          no python, no pyzmq, the agent cannot start
``VersionMismatch``      yes         yes          a busy agent of another version or protocol
``AgentLost``            yes         no           heartbeats missed: its jobs may still run
``LinkLost``             yes         no           a staging stream broke, or the connection
                                                  was closed under a job
``JobLost``              no          no           one job lost (node, wall time): retried
``StagingError``,        no          no           staging of one job failed (a file changed
``NoSpace``                                       while sent, the cluster's disk is full)
======================  ==========  ===========  ==========================================

``*`` ``HostUnreachable`` is lasting for :func:`cannot_use` but a reconnect still tries it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Type

from ..remote.jobs import JobState


class InfraError(Exception):
    """A failure of a cluster or of the link to it, not of the program: the job may be
    retried, there or elsewhere.

    Attributes:
        down: the whole cluster (its link, its agent) failed, not one job: it gets no
            work for a while and its connection is dropped.
        lasting: trying again soon will not cure it (a refused key, no pyzmq there).
    """

    down = False
    lasting = False


# ---- the agent and its jobs ---------------------------------------------------------------

class AgentError(RuntimeError):
    """Base of the client's errors about the agent (not about a job's program)."""


class AgentStartError(AgentError, InfraError):
    """The agent could not be started on the cluster; the message says why and what to fix."""
    down = lasting = True


class AgentNotAnswering(AgentStartError):
    """The agent started (or was found) but did not answer the handshake in time: a busy
    or restarting head node, tried again within ``CLOUD_RECONNECT``, not given up at once."""
    lasting = False


class VersionMismatch(AgentError, InfraError):
    """A busy agent of another version (or wire protocol) runs on the cluster."""
    down = lasting = True


class AgentLost(AgentError, InfraError):
    """The agent stopped answering (heartbeats missed, SSH connection gone).

    Jobs keep running on the cluster; a new client can attach to them.
    """
    down = True

    def __init__(self, cluster: str, host: str, detail: str):
        super().__init__("agent on cluster %s (%s) lost: %s" % (cluster, host, detail))
        self.cluster = cluster
        self.host = host


class RequestRefused(AgentError):
    """The agent refused a request (unknown job, invalid job spec...)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


@dataclass
class JobResult:
    """How a job ended. Times are the cluster's clock (seconds since the epoch)."""
    job_id: str
    cluster: str
    state: JobState
    exit_code: Optional[int]
    reason: str = ""
    launcher_id: str = ""
    started: float = 0.0
    ended: float = 0.0
    stderr_tail: str = ""
    gpus: Tuple[int, ...] = ()  # the GPUs it ran on (the agent may give others than asked)


class JobError(Exception):
    """A job did not end well; ``result`` says how. Base of the three below."""

    def __init__(self, result: JobResult):
        self.result = result
        super().__init__(self._describe())

    def _describe(self) -> str:
        r = self.result
        text = "job %s on %s %s" % (r.job_id, r.cluster, r.state.value)
        if r.exit_code is not None:
            text += " with exit code %d" % r.exit_code
        if r.reason:
            text += " (%s)" % r.reason
        if r.stderr_tail.strip():
            text += ":\n" + r.stderr_tail.rstrip()
        return text


class JobFailed(JobError):
    """The program exited non-zero: its own error, ``stderr_tail`` holds the end of its stderr."""


class JobCancelled(JobError):
    """The job was cancelled."""


class JobLost(JobError, InfraError):
    """The job ended for infrastructure reasons (lost node, wall time): may be retried."""


_ERRORS = {JobState.FAILED: JobFailed, JobState.CANCELLED: JobCancelled,
           JobState.TIMEOUT: JobLost, JobState.LOST: JobLost}


def job_error(state: JobState) -> Optional[Type[JobError]]:
    """The error a job that ended in *state* raises (None: it succeeded)."""
    return _ERRORS.get(state)




# ---- staging ------------------------------------------------------------------------------

class StagingError(InfraError):
    """Staging failed; the message names the files and what to do."""


class LinkLost(StagingError):
    """The link or the staging server went away (the cluster may be down), or the
    connection was closed under a caller: what arrived is kept, staging again resumes."""
    down = True


class NoSpace(StagingError):
    """The cluster lacks the space the upload needs."""

    def __init__(self, cluster: str, needed: int, free: int):
        super().__init__("not enough space on cluster %s: the upload needs %s, %s are free in "
                         "its workdir; free some (scipion-cloudexec cache %s --gc) or point "
                         "workdir at a larger disk" % (cluster, human_bytes(needed),
                                                       human_bytes(free), cluster))
        self.needed, self.free = needed, free


class InputMissing(RuntimeError):
    """A file to stage does not exist on the desktop: not the cluster's fault."""


class DesktopFull(RuntimeError):
    """The desktop's disk filled up during a gather (not the cluster's fault: no retry
    elsewhere). What arrived complete is in place; nothing half-written is left."""

    def __init__(self, cluster: str, folder: str, needed: int):
        super().__init__("no space left on the desktop in %s while gathering %s from %s: free "
                         "some space there, then Continue the protocol (the cluster keeps the "
                         "job's outputs; they are gathered then)" % (folder, human_bytes(needed),
                                                                      cluster))


def human_bytes(n: float) -> str:
    """``12 B``, ``3.4 kB``, ``1.2 GB``: sizes in messages and progress lines (SI units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000
    return ""


# ---- how to react ---------------------------------------------------------------------------

def is_infra(error: BaseException) -> bool:
    """A failure of the cluster or the link (retried elsewhere), not of the program or of
    the desktop's own input."""
    return isinstance(error, InfraError)


def cluster_down(error: BaseException) -> bool:
    """An infrastructure failure of the whole cluster, not of one job (a SLURM TIMEOUT or
    a lost node, a file that changed while it was staged: that job alone is retried)."""
    return isinstance(error, InfraError) and error.down


def cannot_use(error: BaseException) -> bool:
    """A failure that retrying soon will not cure: no SSH server there, a host key unknown
    or changed, a refused key, an agent that cannot start (no python, no pyzmq)."""
    return isinstance(error, InfraError) and error.lasting


def first_line(error: BaseException) -> str:
    """The first line of an error's message; paramiko raises EOFError() with none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "(no message)"
