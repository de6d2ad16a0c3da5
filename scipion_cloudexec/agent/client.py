r"""The client half of the agent protocol: remote jobs as ``concurrent.futures`` futures.

::

    caller threads                 IO thread (owns the ZMQ socket)          cluster
    submit() -> JobFuture ---> outbox --> DEALER --SSH port forward--> ROUTER agent
    future.result() <------ futures <-- Accepted / Output / Ended <------ jobs
                                     \-- Ping every heartbeat; silence for
                                         3 beats fails every future (AgentLost)

Example::

    with AgentClient(cluster) as client:
        fut = client.submit(["python", "-c", "print(42)"], ranks=2)
        print(fut.result().exit_code)      # raises JobFailed on a non-zero exit
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import zmq

from ..config import ClusterConfig
from ..transport import messages as m
from ..transport.ssh import SSHConnection, Target
from ..version import PROTOCOL_VERSION
from . import bundle, provision
from .jobs import JobSpec, JobState, LauncherSpec

log = logging.getLogger(__name__)

OutputCallback = Callable[[str, bytes], None]
STDERR_TAIL = 64 * 1024
RECEIVE_BATCH = 200  # most messages handled per IO loop turn


class AgentError(RuntimeError):
    """Base of the client's errors about the agent (not about a job's program)."""


class AgentStartError(AgentError):
    """The agent could not be started on the cluster; the message says why and what to fix."""


class VersionMismatch(AgentError):
    """A busy agent of another version runs on the cluster."""


class AgentLost(AgentError):
    """The agent stopped answering (heartbeats missed, SSH connection gone).

    Jobs keep running on the cluster; a new client can attach to them.
    """

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


class JobLost(JobError):
    """The job ended for infrastructure reasons (lost node, wall time): may be retried."""


_ERRORS = {JobState.FAILED: JobFailed, JobState.CANCELLED: JobCancelled,
           JobState.TIMEOUT: JobLost, JobState.LOST: JobLost}


class JobFuture(concurrent.futures.Future):
    """A remote job. ``result()`` returns a :class:`JobResult` or raises a :class:`JobError`
    (or :class:`AgentLost`)."""

    def __init__(self, job_id: str, cluster: str, on_output: Optional[OutputCallback] = None):
        super().__init__()
        self.job_id = job_id
        self.cluster = cluster
        self.on_output = on_output
        self.offsets = {"stdout": 0, "stderr": 0}
        self.stderr_tail = bytearray()
        self.accepted = threading.Event()
        self.existed = False  # the agent had the job before this submit
        self.accepted_state = ""  # its state then (a final one: it had ended)
        self.submit_rid = 0  # the Submit's request id: an Error to it fails this future


def _new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


class AgentClient:
    """Connection to one cluster's agent. The constructor only stores the config;
    :meth:`start` connects (SSH, agent, tunnel, handshake)."""

    def __init__(self, cluster: ClusterConfig, client_name: str = ""):
        self.cluster = cluster
        self.client_name = client_name or "%s@%s/%d" % (os.environ.get("USER", "user"),
                                                        socket.gethostname(), os.getpid())
        self.ssh = SSHConnection(Target.of(cluster))
        self.welcome: Optional[m.Welcome] = None
        self.agent_state: Dict = {}
        self._secret = b""
        self._rids = itertools.count(1)
        self._requests: Dict[int, concurrent.futures.Future] = {}
        self._submits: Dict[int, str] = {}  # rid of a Submit -> its job id
        self._jobs: Dict[str, JobFuture] = {}
        self._outbox: "queue.Queue[m.Message]" = queue.Queue()
        self._wake_r, self._wake_w = -1, -1
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._broken: Optional[AgentLost] = None
        self._lock = threading.Lock()
        self.last_heard = 0.0
        self.provisioned = ""  # what was installed on the cluster for the agent, if anything

    # ---- life cycle -------------------------------------------------------------------

    def __enter__(self) -> "AgentClient":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> m.Welcome:
        """Connect over SSH, start or reuse the agent, open the tunnel and shake hands.

        Raises:
            SSHError (and subclasses), AgentStartError, VersionMismatch, AgentLost.
        """
        self.ssh.connect()
        for _attempt in range(2):
            state = self._start_agent()
            if state.get("protocol") != PROTOCOL_VERSION:
                continue  # an agent of another protocol started in between: ours retires it
            welcome = self._connect(state)
            if welcome.version == self._version:
                self.welcome = welcome
                return welcome
            self._replace_agent(welcome)
        if state.get("protocol") != PROTOCOL_VERSION:
            raise VersionMismatch(
                "cluster %s still runs an agent of protocol %s (version %s, pid %s) after "
                "trying to replace it; this client speaks protocol %d (version %s). Another "
                "client of that release keeps starting it: use one scipion-cloudexec release "
                "for all clients of %s:%s" % (
                    self.cluster.name, state.get("protocol"), state.get("version"),
                    state.get("pid"), PROTOCOL_VERSION, self._version, self.cluster.host,
                    self.cluster.workdir))
        raise VersionMismatch("agent on %s still runs version %s after a restart; expected %s"
                              % (self.cluster.name, welcome.version, self._version))

    @property
    def _version(self) -> str:
        return bundle.build()[1]

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
                self.provisioned = provision.provide(self.ssh, c, remote)
            except (provision.ProvisionError, OSError) as e:
                raise AgentStartError(str(e)) from None
            log.info("%s: %s", c.name, self.provisioned)
            res = self.ssh.run(cmd, timeout=60)
        out = res.stdout.decode(errors="replace")
        err = res.stderr.decode(errors="replace").strip()
        if "BUSY " in out:  # a busy agent of another protocol: left alone (server.py)
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
               len(jobs), listed, PROTOCOL_VERSION, self._version, c.name))

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

    def _connect(self, state: Dict) -> m.Welcome:
        self._close_channel()
        self._secret = bytes.fromhex(state["secret"])
        self.agent_state = {k: v for k, v in state.items() if k != "secret"}
        fwd = self.ssh.forward(int(state["port"]))
        self._broken = None
        self._stop.clear()
        self._wake_r, self._wake_w = os.pipe()
        self.last_heard = time.monotonic()
        self._thread = threading.Thread(target=self._io_loop, args=(fwd.address,),
                                        name="cloudexec-io-%s" % self.cluster.name, daemon=True)
        self._thread.start()
        hello = m.Hello(client=self.client_name, version=self._version, protocol=PROTOCOL_VERSION)
        try:
            welcome = self.request(hello, timeout=self.cluster.connect_timeout)
        except RequestRefused as e:
            if e.kind != "protocol":
                raise
            raise VersionMismatch("cluster %s: %s" % (self.cluster.name, e)) from None
        except (AgentLost, concurrent.futures.TimeoutError):
            raise AgentStartError("the agent on %s (pid %s, port %s) does not answer; see %s/agent/"
                                  "agent.log on the cluster" % (self.cluster.name, state.get("pid"),
                                                                state.get("port"),
                                                                self.cluster.workdir)) from None
        return welcome  # type: ignore[return-value]

    def _replace_agent(self, welcome: m.Welcome) -> None:
        """Stop an idle agent of another version, or refuse if it is busy."""
        reply = self.request(m.Shutdown(only_if_idle=True))
        if not reply.ok:  # type: ignore[attr-defined]
            raise VersionMismatch(
                "cluster %s runs agent version %s (pid %d) with %s; this client needs version %s. "
                "Wait for those jobs to end (scipion-cloudexec jobs %s), or install the agent's "
                "version here." % (self.cluster.name, welcome.version, welcome.pid,
                                   reply.detail, self._version, self.cluster.name))  # type: ignore
        log.info("replaced idle agent %s on %s", welcome.version, self.cluster.name)
        self._close_channel()
        pid = int(welcome.pid)
        for _ in range(100):
            if self.ssh.run("kill -0 %d" % pid).exit_status != 0:
                return
            time.sleep(0.1)

    def _close_channel(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake()
            self._thread.join(5)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def close(self) -> None:
        """Disconnect. Remote jobs keep running; futures still pending fail with AgentLost."""
        self._close_channel()
        self._fail_all(AgentLost(self.cluster.name, self.cluster.host, "client closed"))
        self.ssh.close()

    # ---- public API ---------------------------------------------------------------------

    def launcher_spec(self) -> LauncherSpec:
        c = self.cluster
        return LauncherSpec(kind=c.launcher, mpirun=list(c.mpirun), hosts=list(c.hosts),
                            srun=list(c.srun), partition=c.partition, account=c.account,
                            time=c.time)

    def submit(self, argv: Sequence[str], *, ranks: int = 1, threads: int = 1,
               gpus: Sequence[int] = (), env: Optional[Dict[str, str]] = None,
               env_prepend: Optional[Dict[str, str]] = None, cwd: str = "",
               job_id: Optional[str] = None, label: str = "", launcher: Optional[str] = None,
               pool: str = "", on_output: Optional[OutputCallback] = None) -> JobFuture:
        """Start ``argv`` on the cluster as ``ranks`` MPI ranks; return its future at once.

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
            on_output: called as ``on_output(stream, data)`` from the IO thread.

        Raises:
            AgentLost: the agent is gone (also raised later by ``result()``).
            ValueError: an invalid job (bad id, empty argv).
        """
        spec = JobSpec(job_id=job_id or _new_job_id(), argv=[str(a) for a in argv], ranks=ranks,
                       threads=threads, gpus=list(gpus), env=dict(env or {}),
                       env_prepend=dict(env_prepend or {}), cwd=cwd,
                       env_setup=self.cluster.env_setup, launcher=self.launcher_spec(),
                       client=self.client_name, label=label)
        if launcher:
            spec.launcher.kind = launcher
        if pool:
            spec.launcher.kind, spec.launcher.pool = "pool", pool
        spec.validate()
        fut = self._register(spec.job_id, on_output)
        rid = next(self._rids)
        self._submits[rid] = spec.job_id
        fut.submit_rid = rid
        self._send(m.Submit(rid=rid, spec=spec.to_dict(), watch=True))
        return fut

    def attach(self, job_id: str, on_output: Optional[OutputCallback] = None,
               out_offset: int = 0, err_offset: int = 0) -> JobFuture:
        """Follow a job submitted earlier (by this or another client); output from the offsets."""
        fut = self._register(job_id, on_output)
        fut.offsets = {"stdout": out_offset, "stderr": err_offset}
        rid = next(self._rids)
        self._requests[rid] = concurrent.futures.Future()
        self._requests[rid].add_done_callback(lambda f: self._watch_refused(fut, f))
        self._send(m.Watch(rid=rid, job_id=job_id, out_offset=out_offset, err_offset=err_offset))
        return fut

    @staticmethod
    def _watch_refused(fut: JobFuture, req: concurrent.futures.Future) -> None:
        exc = req.exception()
        if exc is not None and not fut.done():
            fut.set_exception(exc)

    def start_pool(self, name: str, ranks: int, job_id: Optional[str] = None) -> JobFuture:
        """Start an mpi4py worker pool of *ranks* ranks through the cluster's launcher; then
        ``submit(..., pool=name)`` queues single-rank jobs on it without an ``mpirun`` each.
        Cancel its future's job to stop it. When the cluster's python lacks mpi4py, it is
        installed first as pyzmq is (:mod:`.provision`).

        Raises:
            AgentStartError: mpi4py is missing and cannot be installed (says how to fix).
        """
        self.ensure("mpi4py", "mpi4py")
        pool_dir = "%s/pools/%s" % (self.cluster.workdir.rstrip("/"), name)
        return self.submit([self.cluster.python, bundle.remote_path(self.cluster), "pool",
                            "--dir", pool_dir], ranks=ranks, job_id=job_id or "pool-" + name,
                           label="worker pool %s" % name)

    def ensure(self, module: str, package: str) -> None:
        """Make *module* importable by the agent's python on the cluster, installing
        *package* into the workdir if it is missing (see :mod:`.provision`)."""
        c = self.cluster
        res = self.ssh.run(bundle.command(c, "has", module, package), timeout=60)
        remote = provision.RemotePython.from_output(res.stdout.decode(errors="replace"))
        if res.exit_status == 0 or remote is None:
            return  # there (or the probe itself failed: the job will say why)
        try:
            done = provision.provide(self.ssh, c, remote)
        except (provision.ProvisionError, OSError) as e:
            raise AgentStartError(str(e)) from None
        log.info("%s: %s", c.name, done)
        self.provisioned = "; ".join(filter(None, (self.provisioned, done)))

    def jobs(self, limit: int = 100) -> List[Dict]:
        """The agent's journal, newest first (dicts with job_id, state, exit_code...)."""
        return self.request(m.ListJobs(limit=limit)).jobs  # type: ignore[attr-defined]

    def cancel(self, job_id: str) -> str:
        """Cancel a job on the cluster; returns its state when asked. Its future then fails
        with :class:`JobCancelled`."""
        return self.request(m.Cancel(job_id=job_id)).detail  # type: ignore[attr-defined]

    def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the agent, in seconds."""
        t0 = time.perf_counter()
        self.request(m.Ping(), timeout=timeout)
        return time.perf_counter() - t0

    def shutdown_agent(self, only_if_idle: bool = True) -> bool:
        """Ask the agent to exit (refused while jobs run when ``only_if_idle``)."""
        return bool(self.request(m.Shutdown(only_if_idle=only_if_idle)).ok)  # type: ignore

    def request(self, msg: m.Message, timeout: Optional[float] = 30.0) -> m.Message:
        """Send a request and wait for its reply.

        Raises:
            RequestRefused: the agent answered with an error; AgentLost; TimeoutError.
        """
        msg.rid = next(self._rids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._requests[msg.rid] = fut
        self._send(msg)
        try:
            return fut.result(timeout)
        finally:
            self._requests.pop(msg.rid, None)

    # ---- plumbing ---------------------------------------------------------------------

    def _register(self, job_id: str, on_output: Optional[OutputCallback]) -> JobFuture:
        fut = JobFuture(job_id, self.cluster.name, on_output)
        with self._lock:
            if self._broken is not None:
                raise self._broken
            self._jobs[job_id] = fut
        return fut

    def _send(self, msg: m.Message) -> None:
        if self._broken is not None:
            raise self._broken
        self._outbox.put(msg)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _io_loop(self, address: str) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 250)  # a dead agent's port is not hammered
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDHWM, 100000)
        sock.setsockopt(zmq.RCVHWM, 100000)
        sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_REPLY_FRAME)
        sock.connect(address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        hb = self.cluster.heartbeat
        next_ping = time.monotonic() + hb
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(int(max(0.0, next_ping - time.monotonic()) * 1000) + 1))
                if self._wake_r in events:
                    os.read(self._wake_r, 65536)
                while True:
                    try:
                        msg = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        frames = m.encode(msg, self._secret)
                    except (TypeError, ValueError) as e:  # one bad message fails its own
                        self._refuse(msg.rid, ValueError(  # future, not the IO thread
                            "%s cannot be sent: %s" % (msg.TYPE, e)))
                        continue
                    size = max(len(f) for f in frames)
                    if size > m.MAX_REQUEST_FRAME:  # the agent would drop the connection
                        self._refuse(msg.rid, ValueError(
                            "%s cannot be sent: %d bytes, the agent takes at most %d (a huge "
                            "argv or environment?)" % (msg.TYPE, size, m.MAX_REQUEST_FRAME)))
                        continue
                    sock.send_multipart(frames)
                if sock in events:
                    self._receive(sock)
                now = time.monotonic()
                if now >= next_ping:
                    sock.send_multipart(m.encode(m.Ping(), self._secret))
                    next_ping = now + hb
                silent = now - self.last_heard
                if silent > 3 * hb or not self.ssh.active:
                    why = ("SSH connection closed" if not self.ssh.active else
                           "no heartbeat for %.1f s (bound %.1f s)" % (silent, 3 * hb))
                    self._fail_all(AgentLost(self.cluster.name, self.cluster.host, why))
                    return
        finally:
            sock.close(0)

    def _receive(self, sock: zmq.Socket) -> None:
        """Handle at most :data:`RECEIVE_BATCH` messages: pings and the heartbeat check run
        between batches whatever the agent sends."""
        for _ in range(RECEIVE_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = m.decode(frames, self._secret)
            except m.OtherProtocol as e:
                log.warning("dropped a message from the agent on %s: it speaks %s (this "
                            "client %d)", self.cluster.name, e, PROTOCOL_VERSION)
                continue
            except m.BadMessage as e:
                log.warning("dropped a message from the agent on %s: %s", self.cluster.name, e)
                continue
            self.last_heard = time.monotonic()
            try:
                self._dispatch(msg)
            except Exception:  # a callback's error must not stop the IO thread
                log.exception("handling %s from %s failed", msg.TYPE, self.cluster.name)

    def _dispatch(self, msg: m.Message) -> None:
        if isinstance(msg, m.Output):
            fut = self._jobs.get(msg.job_id)
            if fut is not None and msg.blob is not None:
                if msg.offset + len(msg.blob) <= fut.offsets[msg.stream]:
                    return  # already seen (two watches of one job)
                data = msg.blob[max(0, fut.offsets[msg.stream] - msg.offset):]
                fut.offsets[msg.stream] += len(data)
                if msg.stream == "stderr":
                    fut.stderr_tail += data
                    del fut.stderr_tail[:-STDERR_TAIL]
                if fut.on_output is not None:
                    fut.on_output(msg.stream, data)
            return
        if isinstance(msg, m.Ended):
            self._end_job(msg)
            return
        if isinstance(msg, m.Error) and self._refuse(msg.rid,
                                                     RequestRefused(msg.kind, msg.detail)):
            return
        self._submits.pop(msg.rid, None)
        if isinstance(msg, m.Accepted):
            fut = self._jobs.get(msg.job_id)
            if fut is not None:
                fut.existed = msg.existed
                fut.accepted_state = msg.state
                fut.accepted.set()
                if not fut.done():
                    fut.set_running_or_notify_cancel()
        req = self._requests.pop(msg.rid, None)
        if req is None:
            return
        if isinstance(msg, m.Error):
            req.set_exception(RequestRefused(msg.kind, msg.detail))
        elif not req.done():
            req.set_result(msg)

    def _refuse(self, rid: int, error: Exception) -> bool:
        """Fail whatever waits on request *rid* (a submitted job, even after its Accepted,
        or a request); True if something did."""
        job_id = self._submits.pop(rid, None)
        futs = [f for f in self._jobs.values() if f.submit_rid == rid]
        if job_id is not None and job_id in self._jobs:
            futs.append(self._jobs[job_id])
        for fut in futs:
            self._jobs.pop(fut.job_id, None)
            if not fut.done():
                fut.set_exception(error)
        req = self._requests.pop(rid, None)
        if req is not None and not req.done():
            req.set_exception(error)
        return bool(futs) or req is not None

    def _end_job(self, msg: m.Ended) -> None:
        fut = self._jobs.pop(msg.job_id, None)
        if fut is None or fut.done():
            return
        result = JobResult(job_id=msg.job_id, cluster=self.cluster.name,
                           state=JobState(msg.state), exit_code=msg.exit_code, reason=msg.reason,
                           launcher_id=msg.launcher_id, started=msg.started, ended=msg.ended,
                           stderr_tail=fut.stderr_tail.decode(errors="replace"))
        if not fut.running():
            fut.set_running_or_notify_cancel()
        error = _ERRORS.get(result.state)
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error(result))

    def _fail_all(self, exc: AgentLost) -> None:
        with self._lock:
            self._broken = exc
            pending = list(self._jobs.values()) + list(self._requests.values())
            self._jobs.clear()
            self._requests.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
