"""The remote agent: a small daemon on the cluster's head node.

It binds one ZeroMQ ROUTER socket on the remote loopback only; clients reach it
through an SSH tunnel. Its state lives in ``<workdir>/agent/``::

    agent.json     pid, port, version and the message secret (mode 0600)
    agent.log      what it did, including dropped (unauthenticated) messages
    journal.sqlite every job and its state (see journal.py)
    start.lock     held while an agent starts, so two clients start one agent

and each job in ``<workdir>/jobs/<job_id>/`` (script, stdout, stderr, rc). Jobs
run in their own sessions with their output in files, so they outlive the agent
and the client; a new agent adopts them from the journal.

Main loop: poll the socket, the jobs' exit fds and the scheduler threads' pipe, then run
named phases: ``process_messages``, ``collect_results``, ``reap_exits``,
``poll_schedulers``, ``stream_outputs``, ``expire_clients``, ``check_idle``. Scheduler
calls (sbatch, squeue, scancel...) never run on the loop (supervisor.py), so heartbeats
and requests are answered whatever SLURM does.

Shipped to the cluster: standard library and pyzmq only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from typing import Dict, List, Optional

import zmq

from ..transport import messages as m
from ..version import PROTOCOL_VERSION, __version__
from .daemon import AgentPaths, start_daemon
from .jobs import JobFiles, JobSpec, JobState
from .journal import Journal
from .schedulers import PoolScheduler, ProcessScheduler, Scheduler, scheduler_kind
from .slurm import SlurmScheduler
from .supervisor import Supervisor

log = logging.getLogger("cloudexec.agent")

CHUNK = 256 * 1024        # largest output chunk per message
STREAM_EVERY = 0.05       # seconds between output reads while someone watches
MISSED_BEATS = 3          # a client silent for this many heartbeats is gone


def agent_version() -> str:
    """``<release>+<sha256 of the agent bundle>``; ``+src`` when run from a source tree."""
    path = sys.argv[0] if sys.argv else ""
    if path.endswith(".zip") and os.path.isfile(path):
        with open(path, "rb") as f:
            return "%s+%s" % (__version__, hashlib.sha256(f.read()).hexdigest()[:12])
    return "%s+src" % __version__


class Agent:
    """Serves clients and runs jobs until idle for ``idle_timeout`` seconds."""

    def __init__(self, workdir: str, idle_timeout: float = 3600.0, heartbeat: float = 2.0):
        self.paths = AgentPaths(workdir)
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self.version = agent_version()
        self.secret = secrets.token_bytes(32)
        self.schedulers: Dict[str, Scheduler] = {
            "process": ProcessScheduler(), "slurm": SlurmScheduler(),
            "pool": PoolScheduler(os.path.join(workdir, "pools"))}
        self.clients: Dict[bytes, float] = {}            # identity -> last message (monotonic)
        self.watchers: Dict[str, Dict[bytes, List[int]]] = {}  # job -> identity -> [out, err]
        self.jobs: Optional[Supervisor] = None  # with the journal, in bind()
        self.idle_since = time.monotonic()
        self.next_stream = 0.0  # when the output files are read next
        self.running = True
        self.journal: Optional[Journal] = None
        self.sock: Optional[zmq.Socket] = None
        self.port = 0

    # ---- life cycle -------------------------------------------------------------------

    def bind(self) -> int:
        """Bind the ROUTER socket on 127.0.0.1 at a port the kernel picks."""
        os.makedirs(self.paths.dir, exist_ok=True)
        os.makedirs(self.paths.jobs, exist_ok=True)
        self.journal = Journal(self.paths.journal)
        self.jobs = Supervisor(self.journal, self.paths.jobs, self.schedulers, self._job_ended)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100000)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        return self.port

    def write_state(self) -> None:
        state = {"pid": os.getpid(), "port": self.port, "version": self.version,
                 "protocol": PROTOCOL_VERSION, "secret": self.secret.hex(),
                 "host": socket.gethostname(), "started": time.time()}
        tmp = self.paths.state + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.paths.state)

    def serve(self) -> None:
        """Run the main loop until shut down or idle."""
        if self.sock is None:
            self.bind()
        assert self.jobs is not None
        self.jobs.adopt()
        self.write_state()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        log.info("agent %s pid %d listening on 127.0.0.1:%d", self.version, os.getpid(), self.port)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.jobs.workers.fileno(), zmq.POLLIN)
        registered: Dict[int, str] = {}
        try:
            while self.running:
                fds = self.jobs.exit_fds()
                for fd in set(fds) - set(registered):
                    poller.register(fd, zmq.POLLIN)
                for fd in set(registered) - set(fds):
                    poller.unregister(fd)
                registered = fds
                now = time.monotonic()
                timeout = max(0.0, self.next_stream - now) if self.watched_running() else \
                    min(self.heartbeat, 1.0)
                timeout = min(timeout, self.jobs.due_in(now))
                events = dict(poller.poll(int(timeout * 1000)))
                if self.sock in events:
                    self.process_messages()
                self.collect_results()  # before reaping: a new job's pidfd may be ready
                ready = [registered[fd] for fd in registered if fd in events]
                if ready:
                    self.reap_exits(ready)
                self.poll_schedulers()
                now = time.monotonic()
                if now >= self.next_stream:  # every STREAM_EVERY, not on every message: the
                    self.next_stream = now + STREAM_EVERY  # scan stats each watched job's files
                    self.stream_outputs()
                self.expire_clients()
                self.check_idle()
        finally:
            self.cleanup()

    def _on_sigterm(self, signum, frame) -> None:
        log.info("SIGTERM: stopping; jobs keep running and a new agent adopts them")
        self.running = False

    def cleanup(self) -> None:
        try:
            with open(self.paths.state) as f:
                if json.load(f).get("pid") == os.getpid():
                    os.unlink(self.paths.state)
        except (OSError, ValueError):
            pass
        if self.jobs is not None:
            self.jobs.stop()
        if self.sock is not None:
            self.sock.close(0)
        if self.journal is not None:
            self.journal.close()
        log.info("agent %d stopped", os.getpid())

    # ---- phases -----------------------------------------------------------------------

    def process_messages(self) -> None:
        assert self.sock is not None
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # cheaper than catching Again
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            identity, body = m.split_identity(frames)
            try:
                msg = m.decode(body, self.secret)
            except m.BadMessage as e:
                log.warning("dropped a message from peer %s: %s", identity.hex(), e)
                continue
            self.clients[identity] = time.monotonic()
            handler = getattr(self, "on_" + msg.TYPE, None)
            if handler is None:
                self.send(identity, m.Error(rid=msg.rid, kind="unsupported",
                                            detail="agent cannot handle %s" % msg.TYPE))
                continue
            try:
                handler(identity, msg)
            except Exception as e:  # a bad request must not kill the agent
                log.exception("request %s failed", msg.TYPE)
                self.send(identity, m.Error(rid=msg.rid, kind="internal", detail=str(e)))

    def collect_results(self) -> None:
        """Apply what the scheduler threads finished (submits, states, cancels)."""
        assert self.jobs is not None
        self.jobs.collect()

    def reap_exits(self, job_ids: List[str]) -> None:
        assert self.jobs is not None
        self.jobs.reap(job_ids)

    def poll_schedulers(self) -> None:
        """Hand due status calls and submit retries to the scheduler threads."""
        assert self.jobs is not None
        self.jobs.tick(time.monotonic())

    def stream_outputs(self, job_ids: Optional[List[str]] = None, final: bool = False) -> None:
        """Send each watcher the bytes its job wrote since its last offsets."""
        for job_id in job_ids if job_ids is not None else list(self.watchers):
            watchers = self.watchers.get(job_id)
            if not watchers:
                continue
            files = JobFiles(self.paths.jobs, job_id)
            for identity, offsets in list(watchers.items()):
                for i, (stream, path) in enumerate((("stdout", files.stdout),
                                                    ("stderr", files.stderr))):
                    self._send_new_bytes(identity, job_id, stream, path, offsets, i, final)

    def _send_new_bytes(self, identity: bytes, job_id: str, stream: str, path: str,
                        offsets: List[int], i: int, final: bool) -> None:
        try:
            size = os.path.getsize(path)
        except OSError:
            return
        if size <= offsets[i]:
            return
        with open(path, "rb") as f:
            f.seek(offsets[i])
            while True:
                data = f.read(CHUNK)
                if not data:
                    break
                self.send(identity, m.Output(job_id=job_id, stream=stream, offset=offsets[i],
                                             blob=data))
                offsets[i] += len(data)
                if not final:
                    break

    def expire_clients(self) -> None:
        limit = time.monotonic() - MISSED_BEATS * self.heartbeat - 1.0
        for identity, seen in list(self.clients.items()):
            if seen < limit:
                del self.clients[identity]
                for watchers in self.watchers.values():
                    watchers.pop(identity, None)
                log.info("client %s went silent; its jobs keep running", identity.hex())

    def check_idle(self) -> None:
        now = time.monotonic()
        if self.clients or (self.jobs is not None and self.jobs.busy()):
            self.idle_since = now
        elif now - self.idle_since > self.idle_timeout:
            log.info("idle for %.0f s with no client and no job: exiting", self.idle_timeout)
            self.running = False

    # ---- job life ----------------------------------------------------------------------

    def watched_running(self) -> bool:
        return self.jobs is not None and any(self.watchers.get(j) for j in self.jobs.active)

    def _job_ended(self, job_id: str, row: Dict) -> None:
        """The supervisor recorded a job's end: flush its output to watchers, then the end."""
        self.stream_outputs([job_id], final=True)
        for identity in self.watchers.pop(job_id, {}):
            self.send(identity, self._ended(row))

    @staticmethod
    def _ended(row: Dict) -> m.Ended:
        return m.Ended(job_id=row["job_id"], state=row["state"], exit_code=row["exit_code"],
                       reason=row["reason"], launcher_id=row["launcher_id"],
                       started=row["started"], ended=row["ended"])

    # ---- requests ----------------------------------------------------------------------

    def send(self, identity: bytes, msg: m.Message) -> None:
        assert self.sock is not None
        try:
            # zero-copy pays off for output chunks only; small frames are faster copied
            self.sock.send_multipart([identity] + m.encode(msg, self.secret),
                                     copy=msg.blob is None or len(msg.blob) < 65536)
        except zmq.ZMQError as e:
            log.warning("cannot send %s to %s: %s", msg.TYPE, identity.hex(), e)

    def on_Hello(self, identity: bytes, msg: m.Hello) -> None:
        log.info("client %s (%s, %s) connected", identity.hex(), msg.client, msg.version)
        self.send(identity, m.Welcome(
            rid=msg.rid, version=self.version, protocol=PROTOCOL_VERSION, pid=os.getpid(),
            host=socket.gethostname(), python=sys.version.split()[0],
            workdir=self.paths.workdir, disk_free=shutil.disk_usage(self.paths.workdir).free,
            active_jobs=self.jobs.count() if self.jobs else 0))

    def on_Ping(self, identity: bytes, msg: m.Ping) -> None:
        self.send(identity, m.Pong(rid=msg.rid, seq=msg.seq,
                                   active_jobs=self.jobs.count() if self.jobs else 0))

    def on_Submit(self, identity: bytes, msg: m.Submit) -> None:
        assert self.journal is not None
        try:
            spec = JobSpec.from_dict(msg.spec)
            spec.validate()
        except (TypeError, ValueError) as e:
            self.send(identity, m.Error(rid=msg.rid, kind="bad_job", detail=str(e)))
            return
        new = self.journal.add(spec, scheduler_kind(spec.launcher.kind))
        row = self.journal.get(spec.job_id)
        self.send(identity, m.Accepted(rid=msg.rid, job_id=spec.job_id, state=row["state"],
                                       existed=not new))
        if msg.watch:
            self.on_Watch(identity, m.Watch(rid=msg.rid, job_id=spec.job_id))
        if new:
            self.jobs.start(spec)  # type: ignore[union-attr]

    def _known_job(self, identity: bytes, msg) -> Optional[Dict]:
        """The journal row of ``msg.job_id``, or None after telling the client it is unknown."""
        assert self.journal is not None
        row = self.journal.get(msg.job_id)
        if row is None:
            self.send(identity, m.Error(rid=msg.rid, kind="unknown_job",
                                        detail="no job %s on this cluster" % msg.job_id))
        return row

    def on_Watch(self, identity: bytes, msg: m.Watch) -> None:
        row = self._known_job(identity, msg)
        if row is None:
            return
        self.watchers.setdefault(msg.job_id, {})[identity] = [msg.out_offset, msg.err_offset]
        if JobState(row["state"]).final:
            self.stream_outputs([msg.job_id], final=True)
            self.watchers.pop(msg.job_id, None)
            self.send(identity, self._ended(row))

    def on_Cancel(self, identity: bytes, msg: m.Cancel) -> None:
        """Recorded at once; the scheduler is asked on its thread and the end follows."""
        assert self.jobs is not None
        row = self._known_job(identity, msg)
        if row is None:
            return
        if msg.job_id in self.jobs.active or msg.job_id in self.jobs.starting:
            self.jobs.cancel(msg.job_id)
        self.send(identity, m.Done(rid=msg.rid, ok=True, detail=row["state"]))

    def on_ListJobs(self, identity: bytes, msg: m.ListJobs) -> None:
        assert self.journal is not None
        self.send(identity, m.Jobs(rid=msg.rid, jobs=self.journal.recent(msg.limit)))

    def on_Shutdown(self, identity: bytes, msg: m.Shutdown) -> None:
        active = self.jobs.count() if self.jobs else 0
        if msg.only_if_idle and active:
            self.send(identity, m.Done(rid=msg.rid, ok=False,
                                       detail="%d job(s) still active" % active))
            return
        self.send(identity, m.Done(rid=msg.rid, ok=True, detail="shutting down"))
        self.running = False


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="cloudexec-agent", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["start", "serve", "version"])
    p.add_argument("--workdir", required=False, default="")
    p.add_argument("--idle-timeout", type=float, default=3600.0)
    p.add_argument("--heartbeat", type=float, default=2.0)
    a = p.parse_args(argv)
    if a.command == "version":
        print(agent_version())
        return 0
    if not a.workdir.startswith("/"):
        p.error("--workdir must be an absolute path")
    if a.command == "start":
        return start_daemon(a.workdir, lambda paths: Agent(paths.workdir, a.idle_timeout,
                                                           a.heartbeat).serve())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Agent(a.workdir, a.idle_timeout, a.heartbeat).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
