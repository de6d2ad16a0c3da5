r"""The client half of the agent protocol: remote jobs as ``concurrent.futures`` futures.

::

    caller threads                 IO thread (owns the ZMQ socket)          cluster
    submit() -> JobFuture ---> outbox --> DEALER --SSH port forward--> ROUTER agent
    future.result() <------ futures <-- Accepted / Output / Ended <------ jobs
                                     \-- Ping every heartbeat; silence for
                                         3 beats fails every future (AgentLost)

Starting the agent over SSH is :class:`~.session.ClusterSession`'s; this module is the
message pump once the agent runs. Example::

    with ClusterSession(cluster) as session:
        fut = session.submit(["python", "-c", "print(42)"], ranks=2)
        print(fut.result().exit_code)      # raises JobFailed on a non-zero exit
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import socket
import threading
import time
from typing import Callable, Dict, List, Optional

import zmq

from ..config import ClusterConfig
from ..remote import messages as m
from ..remote.daemon import PRIVATE_KEYS
from ..remote.jobs import JobSpec, JobState
from ..remote.transport import connect_curve, curve_available
from ..version import PROTOCOL_VERSION
from . import bundle
from .errors import (AgentLost, AgentNotAnswering, AgentStartError, JobResult, RequestRefused,
                     VersionMismatch, job_error)
from .ssh import SSHConnection, Target

log = logging.getLogger(__name__)

OutputCallback = Callable[[str, bytes], None]
STDERR_TAIL = 64 * 1024
RECEIVE_BATCH = 200  # most messages handled per IO loop turn


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
        self.accepted_reason = ""  # why it waits on the cluster, if it does
        self.submit_rid = 0  # the Submit's request id: an Error to it fails this future

    def set_exception(self, exception: Optional[BaseException]) -> None:
        super().set_exception(exception)
        self.accepted.set()  # who waits for the acceptance learns of the failure at once


class AgentClient:
    """The message pump to one cluster's running agent. The constructor only stores the
    config; :meth:`connect` (given the agent's state line) opens the tunnel through *ssh*
    and shakes hands. :class:`~.session.ClusterSession` starts the agent first."""

    def __init__(self, cluster: ClusterConfig, ssh: Optional[SSHConnection] = None,
                 client_name: str = ""):
        self.cluster = cluster
        self.client_name = client_name or "%s@%s/%d" % (os.environ.get("USER", "user"),
                                                        socket.gethostname(), os.getpid())
        self.ssh = ssh or SSHConnection(Target.of(cluster))
        self.welcome: Optional[m.Welcome] = None
        self.agent_state: Dict = {}
        self._secret = b""
        self._curve: Optional[str] = None  # the agent socket's CURVE key, from its state
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
        self._direct = False  # connected without SSH (connect's *address*)

    # ---- life cycle -------------------------------------------------------------------

    @property
    def _version(self) -> str:
        return bundle.build()[1]

    def connect(self, state: Dict, address: str = "",
                timeout: Optional[float] = None) -> m.Welcome:
        """Open the tunnel to the agent of *state* (its ``READY`` line), start the IO
        thread and shake hands. With *address* (``tcp://127.0.0.1:PORT``), connect there
        directly instead, without SSH: an agent on this machine (tests of the agent logic).
        *timeout*: for the handshake (the cluster's ``connect_timeout`` by default).

        Raises:
            VersionMismatch: the agent refused this client's protocol.
            AgentNotAnswering: the agent does not answer (an :class:`AgentStartError`).
        """
        self.disconnect()
        self._secret = bytes.fromhex(state["secret"])
        self._curve = state.get("curve")
        if self._curve and not curve_available():
            raise AgentStartError(
                "the agent on %s asks for ZeroMQ CURVE, which this desktop's pyzmq (libzmq "
                "%s) lacks: install a pyzmq wheel from PyPI (they include it)"
                % (self.cluster.name, zmq.zmq_version()))
        self.agent_state = {k: v for k, v in state.items() if k not in PRIVATE_KEYS}
        self._direct = bool(address)
        if not address:
            address = self.ssh.forward(int(state["port"])).address
        self._broken = None
        self._stop.clear()
        self._wake_r, self._wake_w = os.pipe()
        self.last_heard = time.monotonic()
        self._thread = threading.Thread(target=self._io_loop, args=(address,),
                                        name="cloudexec-io-%s" % self.cluster.name, daemon=True)
        self._thread.start()
        hello = m.Hello(client=self.client_name, version=self._version, protocol=PROTOCOL_VERSION)
        try:
            welcome = self.request(hello, timeout=timeout or self.cluster.connect_timeout)
        except RequestRefused as e:
            if e.kind != "protocol":
                raise
            raise VersionMismatch("cluster %s: %s" % (self.cluster.name, e)) from None
        except (AgentLost, concurrent.futures.TimeoutError):
            raise AgentNotAnswering(
                "the agent on %s (pid %s, port %s) does not answer; see %s/agent/agent.log on "
                "the cluster" % (self.cluster.name, state.get("pid"), state.get("port"),
                                 self.cluster.workdir)) from None
        return welcome  # type: ignore[return-value]

    def disconnect(self) -> None:
        """Stop the IO thread (the SSH connection stays)."""
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
        self.disconnect()
        self._fail_all(AgentLost(self.cluster.name, self.cluster.host, "client closed"))

    # ---- public API ---------------------------------------------------------------------

    def submit(self, spec: JobSpec, on_output: Optional[OutputCallback] = None) -> JobFuture:
        """Send *spec* to the agent; return its future at once.

        Raises:
            AgentLost: the agent is gone (also raised later by ``result()``).
            ValueError: an invalid job (bad id, empty argv).
        """
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
        connect_curve(sock, self._curve)
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
                ssh_gone = not (self._direct or self.ssh.active)
                if silent > 3 * hb or ssh_gone:
                    why = ("SSH connection closed" if ssh_gone else
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
                fut.accepted_reason = msg.reason
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
                           stderr_tail=fut.stderr_tail.decode(errors="replace"),
                           gpus=tuple(msg.gpus))
        if not fut.running():
            fut.set_running_or_notify_cancel()
        error = job_error(result.state)
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
