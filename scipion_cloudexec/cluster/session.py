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
import logging
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional, Sequence, Union

from ..config import ClusterConfig
from ..remote import messages as m
from ..remote.jobs import JobSpec, LauncherSpec
from ..version import PROTOCOL_VERSION
from . import bundle, endpoints
from .agent_start import ensure, replace_agent, start_agent
from .agent_client import AgentClient, JobFuture, OutputCallback
from .errors import AgentNotAnswering, InfraError, LinkLost, VersionMismatch
from .ssh import SSHConnection, Target
from .local_files import Progress, StageReport
from .stager import Stager

log = logging.getLogger(__name__)

#: seconds a known agent gets to answer before it is started over SSH instead (which finds
#: it again if it only was slow)
KNOWN_AGENT_WAIT = 5.0


def _new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


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
        self._start_lock = threading.Lock()  # two first submits start one agent

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
        if self.ssh.active:
            return
        if self._started:  # the agent's tunnel went with it: no quiet new connection
            raise LinkLost("connection to %s lost" % self.cluster.name)
        with self._boundary():
            self.ssh.connect()

    def start(self, stage: bool = False) -> m.Welcome:
        """Connect, start or reuse the agent, open the tunnel and shake hands. *stage*:
        start the staging server at once too (it starts while the agent does).

        Raises:
            InfraError: the SSH errors of :meth:`connect`, ``AgentStartError``,
                ``VersionMismatch``, ``AgentLost``.
        """
        with self._boundary():
            self.ssh.connect()
            welcome = self._known_agent()
            if welcome is not None:
                return welcome
            if stage:
                self.stager.prepare()
            # the early server found no bundle: another, while the agent starts
            again = (lambda: self.stager.prepare(again=True)) if stage else (lambda: None)
            for _attempt in range(2):
                state = start_agent(self, again)
                if state.get("protocol") != PROTOCOL_VERSION:
                    continue  # an agent of another protocol started in between: ours retires it
                welcome = self.agent.connect(state)
                if welcome.version == self.version:
                    self.agent.welcome = welcome
                    self._started = True
                    self.stager.use_endpoint(state.get("stage"), welcome.version, state)
                    return welcome
                replace_agent(self, welcome)
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

    def _known_agent(self) -> Optional[m.Welcome]:
        """Reach the agent this desktop reached last (its state as :mod:`.endpoints` kept
        it) with no remote command: no shell start-up, no Python start on the cluster.
        None when none is known or it is gone or not ours; the caller then starts one."""
        state = endpoints.load_agent(self.cluster, self.version)
        if state is None:
            return None
        why, forget = "", True
        port = int(state["port"])
        try:
            # a refused forward says "gone" in one round trip; the handshake would wait
            t0 = time.monotonic()
            self.ssh._require().open_channel("direct-tcpip", ("127.0.0.1", port),
                                             ("127.0.0.1", 0),
                                             timeout=self.cluster.connect_timeout).close()
            # the handshake takes a few round trips: on a slow link, more than the default
            wait = max(KNOWN_AGENT_WAIT, 10 * (time.monotonic() - t0))
            welcome = self.agent.connect(state, timeout=min(wait, self.cluster.connect_timeout))
            if welcome.version != self.version or welcome.pid != state.get("pid") or \
                    welcome.workdir.rstrip("/") != self.cluster.workdir.rstrip("/"):
                why = "another agent answers there (pid %s)" % welcome.pid
        except AgentNotAnswering as e:  # slow, maybe: the start over SSH finds it again
            why, forget = str(e), False
        except Exception as e:  # noqa: BLE001  (paramiko's ChannelException is no OSError)
            why = str(e) or type(e).__name__
        if why:
            log.info("%s: the agent last reached (pid %s) is not reachable as it was (%s): "
                     "starting it over SSH", self.cluster.name, state.get("pid"), why)
            self.agent.disconnect()
            self.ssh.drop_forwards(port)
            if forget:
                self.stager.use_endpoint(None)
            return None
        self.agent.welcome = welcome
        self._started = True
        self.stager.endpoint = state.get("stage")
        return welcome

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

    # ---- jobs -----------------------------------------------------------------------------

    def launcher_spec(self) -> LauncherSpec:
        """How this cluster starts jobs, from its config."""
        c = self.cluster
        return LauncherSpec(kind=c.launcher, mpirun=list(c.mpirun), hosts=list(c.hosts),
                            srun=list(c.srun), partition=c.partition, account=c.account,
                            time=c.time)

    def job(self, argv: Sequence[str], *, ranks: int = 1, threads: int = 1,
            gpus: Sequence[int] = (), env: Optional[Dict[str, str]] = None,
            env_prepend: Optional[Dict[str, str]] = None, cwd: str = "",
            job_id: Optional[str] = None, label: str = "", launcher: Optional[str] = None,
            pool: str = "") -> JobSpec:
        """A :class:`JobSpec` for this cluster (its launcher and ``env_setup``), the arguments
        named as JobSpec's fields; *launcher* overrides the cluster's (``local``, ``mpirun``,
        ``slurm``), *pool* sends the job to a worker pool started by :meth:`start_pool`."""
        spec = JobSpec(job_id=job_id or _new_job_id(), argv=[str(a) for a in argv], ranks=ranks,
                       threads=threads, gpus=list(gpus), env=dict(env or {}),
                       env_prepend=dict(env_prepend or {}), cwd=cwd, label=label)
        return self.for_cluster(spec, launcher, pool)

    def for_cluster(self, spec: JobSpec, launcher: Optional[str] = None, pool: str = ""
                    ) -> JobSpec:
        """*spec* (as ``translate`` makes it) with this cluster's launcher, ``env_setup`` and
        this client's name filled in; *launcher* and *pool* as for :meth:`job`."""
        spec.env_setup, spec.launcher, spec.client = (self.cluster.env_setup,
                                                       self.launcher_spec(), self.agent.client_name)
        # shared by every client's jobs on the head node (the agent keeps count)
        spec.slots, spec.gpu_pool = self.cluster.slots, list(self.cluster.gpus)
        if launcher:
            spec.launcher.kind = launcher
        if pool:
            spec.launcher.kind, spec.launcher.pool = "pool", pool
        return spec

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
        """Start an mpi4py worker pool of *ranks* ranks through the cluster's launcher; then
        ``submit(..., pool=name)`` queues single-rank jobs on it without an ``mpirun`` each.
        Cancel its future's job to stop it. When the cluster's python lacks mpi4py, it is
        installed first as pyzmq is (:mod:`.provision`).

        Raises:
            AgentStartError: mpi4py is missing and cannot be installed (says how to fix).
        """
        with self._boundary():
            self._ensure_started()
            ensure(self, "mpi4py", "mpi4py")
        pool_dir = "%s/pools/%s" % (self.cluster.workdir.rstrip("/"), name)
        return self.submit(self.job([self.cluster.python, bundle.remote_path(self.cluster),
                                     "pool", "--dir", pool_dir], ranks=ranks,
                                    job_id=job_id or "pool-" + name,
                                    label="worker pool %s" % name))

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
        with self._start_lock:
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
