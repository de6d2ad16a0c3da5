r"""One cluster seen from the desktop: :class:`ClusterSession`.

::

    ClusterSession(cluster)             configures only; nothing connects before use
      connect()    SSH (host key checked, key auth)                      ssh.py
      start()      + bundle upload, agent ``start`` (READY / BUSY line),  bundle.py
                   pyzmq provided when the cluster's python lacks it      provision.py
                   port forward, ZeroMQ Hello/Welcome, an agent of
                   another version replaced when idle
      submit(JobSpec) -> JobFuture       the agent's message pump          agent_client.py
      stage_in / stage_out / fetch       the staging server's streams      stager.py
      status() / close()

Every failure of the cluster or the link leaves the session as an
:class:`~.errors.InfraError` (see there): the lower layers' own errors are of that family,
and what they let through raw (``EOFError``, ``ConnectionError``, ``TimeoutError``, an
``OSError`` on a connection closed under a caller) is wrapped into :class:`LinkLost` here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Dict, Iterator, List, Optional, Sequence, Union

from ..config import ClusterConfig
from ..remote import messages as m
from ..remote.jobs import JobSpec
from ..version import PROTOCOL_VERSION
from . import bundle, provision
from .agent_client import AgentClient, JobFuture, OutputCallback
from .errors import AgentStartError, InfraError, LinkLost, VersionMismatch
from .ssh import SSHConnection, Target
from .stager import Progress, StageReport, Stager

log = logging.getLogger(__name__)

#: an executor's client name: ``scipion:<mirror>:<protocol id>`` (status shows what each
#: protocol staged through its mirror's name)
EXECUTOR_PREFIX = "scipion:"


def executor_client_name(mirror: str, prot_id: int) -> str:
    """The client name an executor's session gives the agent."""
    return "%s%s:%s" % (EXECUTOR_PREFIX, mirror, prot_id)


def mirror_of(client_name: str) -> Optional[str]:
    """The mirror an executor's client stages to, None for other clients."""
    if not client_name.startswith(EXECUTOR_PREFIX):
        return None
    return client_name[len(EXECUTOR_PREFIX):].split(":", 1)[0]


class ClusterSession:
    """The SSH connection to one cluster, its agent and its staging streams.

    The constructor only stores the config. :meth:`connect` opens SSH (enough for
    staging), :meth:`start` also starts the agent; both are called on first use.
    Thread-safe as its parts are: submits, stagings and requests may come from any thread.

    Args:
        cluster: the cluster's config from the clusters file.
        client_name: how the agent lists this client (default ``user@host/pid``).
        hash_cache: the local hash memo's path (default under ~/.cache).
    """

    def __init__(self, cluster: ClusterConfig, client_name: str = "",
                 hash_cache: Optional[str] = None):
        self.cluster = cluster
        self.ssh = SSHConnection(Target.of(cluster))
        self.agent = AgentClient(cluster, self.ssh, client_name)
        self.stager = Stager(self.ssh, cluster, hash_cache)
        self.closed = False  # by close(): a call still under way fails as LinkLost
        self.provisioned = ""  # what was installed on the cluster for the agent, if anything
        self._started = False

    # ---- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> "ClusterSession":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def welcome(self) -> Optional[m.Welcome]:
        """The agent's Welcome (version, pid, host, workdir...), once started."""
        return self.agent.welcome

    @property
    def agent_state(self) -> Dict:
        """The agent's ``READY`` line (pid, port, version, protocol), without its secret."""
        return self.agent.agent_state

    @property
    def started(self) -> bool:
        """Whether the agent was reached."""
        return self._started

    def connect(self) -> None:
        """Open the SSH connection (if not open yet).

        Raises:
            InfraError: ``HostUnreachable``, ``UnknownHostKey``, ``HostKeyChanged``,
                ``AuthRefused``, ``SSHError``.
        """
        if not self.ssh.active:
            with self._boundary():
                self.ssh.connect()

    def start(self) -> m.Welcome:
        """Connect, start or reuse the agent, open the tunnel and shake hands.

        Raises:
            InfraError: the SSH errors of :meth:`connect`, ``AgentStartError``,
                ``VersionMismatch``, ``AgentLost``.
        """
        with self._boundary():
            self.ssh.connect()
            for _attempt in range(2):
                state = self._start_agent()
                if state.get("protocol") != PROTOCOL_VERSION:
                    continue  # an agent of another protocol started in between: ours retires it
                welcome = self.agent.connect(state)
                if welcome.version == self.version:
                    self.agent.welcome = welcome
                    self._started = True
                    return welcome
                self._replace_agent(welcome)
            if state.get("protocol") != PROTOCOL_VERSION:
                raise VersionMismatch(
                    "cluster %s still runs an agent of protocol %s (version %s, pid %s) after "
                    "trying to replace it; this client speaks protocol %d (version %s). "
                    "Another client of that release keeps starting it: use one "
                    "scipion-cloudexec release for all clients of %s:%s" % (
                        self.cluster.name, state.get("protocol"), state.get("version"),
                        state.get("pid"), PROTOCOL_VERSION, self.version, self.cluster.host,
                        self.cluster.workdir))
            raise VersionMismatch("agent on %s still runs version %s after a restart; expected "
                                  "%s" % (self.cluster.name, welcome.version, self.version))

    def close(self) -> None:
        """Disconnect. Remote jobs keep running; futures still pending fail with AgentLost;
        a staging under way in another thread fails with LinkLost."""
        self.closed = True
        for part in (self.stager, self.agent, self.ssh):
            try:
                part.close()
            except Exception as e:  # a broken link fails its close too: closed all the same
                log.debug("closing %s of %s: %s", type(part).__name__, self.cluster.name, e)

    @property
    def version(self) -> str:
        """This client's agent version: the bundle's release and hash."""
        return bundle.build()[1]

    # ---- starting the agent ---------------------------------------------------------------

    def _start_agent(self) -> Dict:
        """Upload the bundle if missing and run its ``start``; return the agent's state."""
        c = self.cluster
        try:
            bundle.ensure_uploaded(self.ssh, c)
        except bundle.BundleError as e:
            raise AgentStartError(str(e)) from None
        cmd = bundle.command(c, "start", "--workdir", c.workdir, "--idle-timeout",
                             "%g" % c.agent_idle_timeout, "--heartbeat", "%g" % c.heartbeat)
        res = self.ssh.run(cmd, timeout=60)
        remote = provision.RemotePython.from_output(res.stdout.decode(errors="replace"))
        if res.exit_status != 0 and remote is not None:  # its python lacks pyzmq: add it
            try:
                self.provisioned = provision.provide_pyzmq(self.ssh, c, remote)
            except (provision.ProvisionError, OSError) as e:
                raise AgentStartError(str(e)) from None
            log.info("%s: %s", c.name, self.provisioned)
            res = self.ssh.run(cmd, timeout=60)
        out = res.stdout.decode(errors="replace")
        err = res.stderr.decode(errors="replace").strip()
        if "BUSY " in out:  # a busy agent of another protocol: left alone (remote/server.py)
            raise self._busy_other_protocol(json.loads(out.split("BUSY ", 1)[1].splitlines()[0]))
        if res.exit_status != 0 or "READY " not in out:
            raise AgentStartError(self._explain_start_failure(res.exit_status, err or out))
        return json.loads(out.split("READY ", 1)[1].splitlines()[0])

    def _busy_other_protocol(self, state: Dict) -> VersionMismatch:
        c = self.cluster
        jobs = state.get("jobs", [])
        listed = "; ".join("%s (%s%s)" % (j.get("job_id"), j.get("state"),
                                          ", " + j["label"] if j.get("label") else "")
                           for j in jobs[:10]) + ("; ..." if len(jobs) > 10 else "")
        return VersionMismatch(
            "cluster %s runs the cloudexec agent of protocol %s (version %s, pid %s) with %d "
            "active job(s): %s. This client speaks protocol %d (version %s) and cannot talk to "
            "it. Those jobs are left running: let them end, following them with the "
            "scipion-cloudexec release that started them (scipion-cloudexec jobs %s), then "
            "run again: an idle agent of another protocol is replaced automatically."
            % (c.name, state.get("protocol"), state.get("version"), state.get("pid"),
               len(jobs), listed, PROTOCOL_VERSION, self.version, c.name))

    def _explain_start_failure(self, status: int, text: str) -> str:
        c = self.cluster
        if status == 127 or "not found" in text or "No such file" in text:
            return ("python %r not found on cluster %s: set 'python' in [cluster %s] of %s to "
                    "the remote interpreter (it needs pyzmq).\n%s"
                    % (c.python, c.name, c.name, c.source, text))
        if "pyzmq" in text or "No module named 'zmq'" in text:
            return ("the remote python %s on %s lacks pyzmq: install it there "
                    "(%s -m pip install pyzmq).\n%s" % (c.python, c.name, c.python, text))
        return "the agent did not start on %s (exit %d):\n%s" % (c.name, status, text)

    def _replace_agent(self, welcome: m.Welcome) -> None:
        """Stop an idle agent of another version, or refuse if it is busy."""
        reply = self.agent.request(m.Shutdown(only_if_idle=True))
        if not reply.ok:  # type: ignore[attr-defined]
            raise VersionMismatch(
                "cluster %s runs agent version %s (pid %d) with %s; this client needs version %s. "
                "Wait for those jobs to end (scipion-cloudexec jobs %s), or install the agent's "
                "version here." % (self.cluster.name, welcome.version, welcome.pid,
                                   reply.detail, self.version, self.cluster.name))  # type: ignore
        log.info("replaced idle agent %s on %s", welcome.version, self.cluster.name)
        self.agent.disconnect()
        pid = int(welcome.pid)
        for _ in range(100):
            if self.ssh.run("kill -0 %d" % pid).exit_status != 0:
                return
            time.sleep(0.1)

    # ---- jobs -----------------------------------------------------------------------------

    def job(self, argv: Sequence[str], *, ranks: int = 1, threads: int = 1,
            gpus: Sequence[int] = (), env: Optional[Dict[str, str]] = None,
            env_prepend: Optional[Dict[str, str]] = None, cwd: str = "",
            job_id: Optional[str] = None, label: str = "", launcher: Optional[str] = None,
            pool: str = "") -> JobSpec:
        """A :class:`JobSpec` for this cluster: its launcher and ``env_setup``.

        Args:
            argv: program and arguments, as on the cluster (no shell).
            ranks, threads: MPI ranks and threads per rank.
            gpus: GPU numbers for ``CUDA_VISIBLE_DEVICES``.
            env: extra environment variables.
            env_prepend: values put in front of the cluster's own (``PATH``-like variables).
            cwd: working directory on the cluster (default: the job's folder).
            job_id: a stable id makes the submit idempotent (a second submit attaches).
            label: shown by ``scipion-cloudexec jobs``.
            launcher: override the cluster's launcher (``local``, ``mpirun``, ``slurm``, or
                ``pool`` with *pool*: a worker pool started with :meth:`start_pool`).
            pool: the worker pool's name, for ``launcher="pool"``.
        """
        return self.agent.job(argv, ranks=ranks, threads=threads, gpus=gpus, env=env,
                              env_prepend=env_prepend, cwd=cwd, job_id=job_id, label=label,
                              launcher=launcher, pool=pool)

    def submit(self, job: Union[JobSpec, Sequence[str]], *,
               on_output: Optional[OutputCallback] = None, **fields) -> JobFuture:
        """Start a job on the cluster; return its future at once (the agent started first
        if need be).

        Args:
            job: a :class:`JobSpec`, or an argv with *fields* as :meth:`job` takes them.
            on_output: called as ``on_output(stream, data)`` from the IO thread.

        Raises:
            InfraError: the cluster cannot be reached (``AgentLost`` also by ``result()``).
            ValueError: an invalid job (bad id, empty argv).
        """
        spec = job if isinstance(job, JobSpec) else self.job(job, **fields)
        spec.validate()  # an invalid job is refused before any connection
        with self._boundary():
            self._ensure_started()
            return self.agent.submit(spec, on_output)

    def attach(self, job_id: str, on_output: Optional[OutputCallback] = None,
               out_offset: int = 0, err_offset: int = 0) -> JobFuture:
        """Follow a job submitted earlier (by this or another client); output from the
        offsets."""
        with self._boundary():
            self._ensure_started()
            return self.agent.attach(job_id, on_output, out_offset, err_offset)

    def start_pool(self, name: str, ranks: int, job_id: Optional[str] = None) -> JobFuture:
        """Start an mpi4py worker pool of *ranks* ranks (see :meth:`AgentClient.start_pool`)."""
        with self._boundary():
            self._ensure_started()
            return self.agent.start_pool(name, ranks, job_id)

    def cancel(self, job_id: str) -> str:
        """Cancel a job on the cluster; returns its state when asked."""
        with self._boundary():
            self._ensure_started()
            return self.agent.cancel(job_id)

    def jobs(self, limit: int = 100) -> List[Dict]:
        """The agent's journal, newest first."""
        with self._boundary():
            self._ensure_started()
            return self.agent.jobs(limit)

    def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the agent, in seconds."""
        with self._boundary():
            self._ensure_started()
            return self.agent.ping(timeout)

    def shutdown_agent(self, only_if_idle: bool = True) -> bool:
        """Ask the agent to exit (refused while jobs run when ``only_if_idle``)."""
        with self._boundary():
            self._ensure_started()
            return self.agent.shutdown_agent(only_if_idle)

    # ---- staging ----------------------------------------------------------------------------

    def mirror_root(self, project: str) -> str:
        """The project's mirror on the cluster (an absolute path there)."""
        return self.stager.mirror_root(project)

    def reset(self, project: str, run_dir: str) -> None:
        """Empty *run_dir* in the mirror (a run starting afresh on this cluster)."""
        with self._boundary():
            self.connect()
            self.stager.reset(project, run_dir)

    def stage_in(self, project_root: str, paths: Sequence[str], project: str,
                 **options) -> StageReport:
        """Make *paths* present in the cluster's mirror of *project* (see
        :meth:`Stager.stage_in` for *options*)."""
        with self._boundary():
            self.connect()
            return self.stager.stage_in(project_root, paths, project, **options)

    def stage_out(self, project_root: str, project: str, run_dir: str, base: Dict[str, str],
                  exclude: Sequence[str] = (), progress: Optional[Progress] = None
                  ) -> StageReport:
        """Bring what changed in the mirror's *run_dir* since *base* back here (see
        :meth:`Stager.gather`)."""
        with self._boundary():
            self.connect()
            return self.stager.gather(project_root, project, run_dir, base, exclude, progress)

    def fetch(self, remote_path: str, to: str, progress: Optional[Progress] = None
              ) -> StageReport:
        """Copy a file or folder under the workdir (relative to it) into folder *to*."""
        with self._boundary():
            self.connect()
            return self.stager.fetch(remote_path, to, progress)

    def cache_info(self, gc: bool = False, min_age: float = 3600.0) -> dict:
        """The cluster's staging cache (see :meth:`Stager.cache_info`)."""
        with self._boundary():
            self.connect()
            return self.stager.cache_info(gc, min_age)

    # ---- status -----------------------------------------------------------------------------

    def status(self) -> dict:
        """What ``scipion-cloudexec status`` shows of the cluster: its agent, jobs by state,
        cores in use, active clients, the cache and what each executor staged.

        Raises:
            InfraError: the cluster cannot be reached.
        """
        with self._boundary():
            self._ensure_started()
            jobs = self.agent.jobs(1000)
            out: dict = {"agent": self.agent.welcome.version}  # type: ignore[union-attr]
            active = [j for j in jobs if j["state"] in ("running", "queued", "submitted")]
            out["used"] = sum(j["cores"] for j in active if j["state"] == "running")
            for state in ("queued", "running", "done", "failed", "cancelled", "lost"):
                out[state] = sum(1 for j in jobs if j["state"] == state)
            out["clients"] = sorted({j["client"] for j in active})
            out["cached"] = self.stager.cache_info()["bytes"]
            staged = self.stager.mirrors()
            out["staged"] = {c: staged.get(mirror_of(c) or "", {}).get("bytes", 0)
                             for c in out["clients"] if mirror_of(c) is not None}
            return out

    # ---- the boundary -----------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if not self._started:
            self.start()

    @contextlib.contextmanager
    def _boundary(self) -> Iterator[None]:
        """Wrap what the lower layers let through raw into :class:`LinkLost`; a closed
        session refuses at once (a sibling job found the cluster lost and closed it)."""
        if self.closed:
            raise LinkLost("the connection to %s was closed: the cluster was found lost"
                           % self.cluster.name)
        try:
            yield
        except InfraError:
            raise
        except (EOFError, ConnectionError, TimeoutError) as e:
            raise LinkLost("connection to %s lost: %s: %s" % (
                self.cluster.name, type(e).__name__, e)) from e
        except OSError as e:
            if not self.closed:  # a local file error, say: the caller's own
                raise
            # e.g. paramiko's "Socket is closed": the session was closed under this call
            raise LinkLost("the connection to %s was closed under this job: the cluster was "
                           "found lost (%s)" % (self.cluster.name, e)) from e
