"""The remote agent: a small daemon on the cluster's head node.

It binds one ZeroMQ ROUTER socket on the remote loopback only; clients reach it
through an SSH tunnel. Its state lives in ``<workdir>/agent/``::

    agent.json     pid, port, version, the message secret and CURVE key (mode 0600), host
                   and lease
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

Shipped to the cluster: standard library and pyzmq only. Over 400 lines: :class:`Agent`
is one event loop and the message handlers that share its state (socket, watchers,
journal, clients); starting it is daemon.py's, running jobs supervisor.py's.
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
import threading
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import zmq

from . import messages as m
from ..version import PROTOCOL_VERSION, __version__
from .daemon import (AgentPaths, _read_state, lease_term, other_node, retire_other_protocol,
                     start_daemon, write_private)
from .jobs import JobFiles, JobSpec, JobState
from .journal import Journal
from .schedulers import SCHEDULERS, Scheduler, scheduler_kind
from .stage_endpoint import Endpoint
from .supervisor import Supervisor
from .transport import serve_curve

log = logging.getLogger("cloudexec.agent")

CHUNK = 256 * 1024        # largest output chunk per message
WINDOW = 16               # output chunks in flight (not yet on the wire) per watcher and stream
STREAM_EVERY = 0.05       # seconds between output reads while someone watches
BACKLOG_EVERY = 0.005     # ... while a watcher's window is full: refill it soon
MISSED_BEATS = 3          # a client silent for this many heartbeats is gone
SEND_LAST_MS = 1000       # at exit, queued replies get this long to reach their clients
BATCH = 200               # most messages handled per loop turn
DROP_LOG_EVERY = 60.0     # seconds between two warnings about one peer's dropped messages
DROP_PEERS = 64           # peers counted apart; beyond, drops are counted together
RECV_QUEUE = 1000         # messages queued per connection before ZMQ stops reading it


def agent_version() -> str:
    """``<release>+<sha256 of the agent bundle>``; ``+src`` when run from a source tree."""
    path = sys.argv[0] if sys.argv else ""
    if path.endswith(".zip") and os.path.isfile(path):
        with open(path, "rb") as f:
            return "%s+%s" % (__version__, hashlib.sha256(f.read()).hexdigest()[:12])
    return "%s+src" % __version__


def _signal_wakeup() -> Tuple[int, int]:
    """A pipe that Python writes a byte to when a signal it handles arrives (SIGTERM): in
    the agent's poller, it ends the wait at once, where the signal alone would only be
    seen when the poll's timeout (up to a second) ran out."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    return r, w


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class Agent:
    """Serves clients and runs jobs until idle for ``idle_timeout`` seconds."""

    def __init__(self, workdir: str, idle_timeout: float = 3600.0, heartbeat: float = 2.0):
        self.paths = AgentPaths(workdir)
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self.version = agent_version()
        self.secret = secrets.token_bytes(32)
        self.curve: Optional[str] = None  # the socket's CURVE public key, set in bind()
        self.schedulers: Dict[str, Scheduler] = {name: make(workdir)
                                                 for name, make in SCHEDULERS.items()}
        self.clients: Dict[bytes, float] = {}            # identity -> last message (monotonic)
        self._drops: Dict[bytes, list] = {}  # peer -> [last warning, dropped since, reason]
        self.watchers: Dict[str, Dict[bytes, List[int]]] = {}  # job -> identity -> [out, err]
        self.ending: Dict[str, Dict] = {}  # ended job -> its row, while watchers get the rest
        # (identity, job, stream index) -> trackers of the chunks zmq still holds, oldest first
        self.inflight: Dict[Tuple[bytes, str, int], Deque[zmq.MessageTracker]] = {}
        self.backlog = False  # a watcher waits for room in its window
        self.jobs: Optional[Supervisor] = None  # with the journal, in bind()
        self.idle_since = time.monotonic()
        self.next_stream = 0.0  # when the output files are read next
        self.running = True
        self.journal: Optional[Journal] = None
        self.sock: Optional[zmq.Socket] = None
        self.port = 0
        self.host = socket.gethostname()
        self.lease = lease_term()
        self.lease_every = min(5 * heartbeat, self.lease / 4)  # renewals per lease: >= 4
        self.renewed = 0.0
        self.started = 0.0
        self._phase_logged: Dict[str, float] = {}
        self.endpoint = Endpoint()  # the staging server new clients reach without a shell

    # ---- life cycle -------------------------------------------------------------------

    def bind(self) -> int:
        """Bind the ROUTER socket on 127.0.0.1 at a port the kernel picks."""
        os.makedirs(self.paths.dir, exist_ok=True)
        os.makedirs(self.paths.jobs, exist_ok=True)
        self.journal = Journal(self.paths.journal)
        self.jobs = Supervisor(self.journal, self.paths.jobs, self.schedulers, self._job_ended)
        # its own context: terminated at exit, which is what sends the last replies
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100000)
        # bounded intake: a frame over the limit closes its sender's connection unread, and a
        # flooding connection is back-pressured after RECV_QUEUE messages
        self.sock.setsockopt(zmq.RCVHWM, RECV_QUEUE)
        self.sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_REQUEST_FRAME)
        # a peer without the key completes no handshake: none of its frames are held
        self.curve = serve_curve(self.sock)
        if self.curve is None:
            log.warning("this pyzmq lacks CURVE: messages are authenticated (HMAC) but any "
                        "process on this node can make the agent hold up to %d MiB per "
                        "connection before that check" % (4 * m.MAX_REQUEST_FRAME >> 20))
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        return self.port

    def write_state(self) -> None:
        """Write agent.json (it holds the secret: mode 0600, never through a planted link),
        with the lease renewed from now."""
        now = time.time()
        if not self.renewed:
            self.started = now
        state = {"pid": os.getpid(), "port": self.port, "version": self.version,
                 "protocol": PROTOCOL_VERSION, "secret": self.secret.hex(),
                 "curve": self.curve,
                 "host": self.host, "started": self.started, "lease": self.lease,
                 "lease_until": now + self.lease}
        stage = self.endpoint.known
        if stage is not None:
            state["stage"] = stage
        write_private(self.paths.state, json.dumps(state))
        self.renewed = time.monotonic()

    def _owns_state(self, state: Optional[Dict]) -> bool:
        return bool(state) and state.get("pid") == os.getpid() and \
            state.get("host", self.host) == self.host  # type: ignore[union-attr]

    def renew_lease(self) -> None:
        """Renew the lease on the workdir, unless an agent on another node took it over
        (this one was taken for dead): then stop, leaving the jobs to that agent."""
        if time.monotonic() - self.renewed < self.lease_every:
            return
        state = _read_state(self.paths.state)
        if state and not self._owns_state(state):
            log.error("agent %s (pid %s) on %s took this workdir over (this agent's lease had "
                      "run out): stopping here, its jobs are followed there",
                      state.get("version"), state.get("pid"), state.get("host"))
            self.running = False
            return
        self.endpoint.revive(self.paths.workdir)  # one that died is replaced, and said so
        try:
            self.write_state()
        except OSError as e:  # e.g. NFS away for a moment: try again next turn
            log.warning("cannot renew the lease in %s: %s", self.paths.state, e)

    def serve(self) -> None:
        """Run the main loop until shut down or idle."""
        self.endpoint.spawn(self.paths.workdir)  # its Python starts while we bind and adopt
        if self.sock is None:
            self.bind()
        assert self.jobs is not None
        previous = _read_state(self.paths.state) or {}
        if other_node(previous):
            log.warning("taking workdir %s over from login node %s (agent pid %s), whose lease "
                        "ran out %.0f s ago", self.paths.workdir, previous.get("host"),
                        previous.get("pid"), time.time() - float(previous.get("lease_until", 0)))
        self.jobs.adopt()
        self.endpoint.state()
        self.write_state()
        poller = zmq.Poller()
        wake: Optional[Tuple[int, int]] = None
        if threading.current_thread() is threading.main_thread():  # else: run in-process
            signal.signal(signal.SIGTERM, self._on_sigterm)
            wake = _signal_wakeup()
            poller.register(wake[0], zmq.POLLIN)
        log.info("agent %s pid %d listening on 127.0.0.1:%d", self.version, os.getpid(), self.port)
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
                if self.backlog:
                    timeout = BACKLOG_EVERY
                elif self.watched_running():
                    timeout = max(0.0, self.next_stream - now)
                else:
                    timeout = min(self.heartbeat, 1.0)
                timeout = min(timeout, self.jobs.due_in(now))
                events = dict(poller.poll(int(timeout * 1000)))
                if wake is not None and wake[0] in events:
                    _drain(wake[0])
                    if not self.running:  # SIGTERM: stop now, not at the poll's timeout
                        break
                if self.sock in events:
                    self._phase(self.process_messages)
                self._phase(self.collect_results)  # before reaping: a pidfd may be ready
                ready = [registered[fd] for fd in registered if fd in events]
                if ready:
                    self._phase(self.reap_exits, ready)
                self._phase(self.poll_schedulers)
                now = time.monotonic()
                # every STREAM_EVERY (a scan stats each watched job's files), not on every
                # message; sooner while a watcher's window waits to be refilled
                if self.backlog or now >= self.next_stream:
                    self.next_stream = now + STREAM_EVERY
                    self._phase(self.stream_outputs)
                self._phase(self.expire_clients)
                self._phase(self.renew_lease)
                self._phase(self.check_idle)
        finally:
            if wake is not None:
                signal.set_wakeup_fd(-1)
                os.close(wake[0])
                os.close(wake[1])
            self.cleanup()

    def _phase(self, phase, *args) -> None:
        """Run one loop phase; an error (a fork or open failing for want of processes,
        memory or file descriptors...) is logged, at most every 10 s per phase, and the
        loop goes on: the agent must outlive it, its jobs and clients with it."""
        try:
            phase(*args)
        except Exception:  # noqa: BLE001  (anything: the loop is all the agent has)
            now = time.monotonic()
            if now - self._phase_logged.get(phase.__name__, -60.0) >= 10.0:
                self._phase_logged[phase.__name__] = now
                log.exception("phase %s failed; the agent goes on", phase.__name__)

    def _on_sigterm(self, signum, frame) -> None:
        log.info("SIGTERM: stopping; jobs keep running and a new agent adopts them")
        self.running = False

    def cleanup(self) -> None:
        self._flush_drops(time.monotonic(), final=True)
        if self._owns_state(_read_state(self.paths.state)):  # not another node's
            try:
                os.unlink(self.paths.state)
            except OSError:
                pass
        self.endpoint.stop()
        if self.jobs is not None:
            self.jobs.stop()
        if self.sock is not None:  # a moment for the last replies (Shutdown's Done) to leave:
            self.sock.close(linger=SEND_LAST_MS)  # the daemon ends in os._exit, so wait here
            self.ctx.term()
        if self.journal is not None:
            self.journal.close()
        log.info("agent %d stopped", os.getpid())

    # ---- phases -----------------------------------------------------------------------

    def process_messages(self) -> None:
        """Handle at most :data:`BATCH` waiting messages, so that a flood cannot hold off
        heartbeats, reaping and streaming (the rest wait for the next loop turn)."""
        assert self.sock is not None
        now = time.monotonic()
        self._flush_drops(now)
        for _ in range(BATCH):
            if not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # cheaper than catching Again
                break
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            identity, body = m.split_identity(frames)
            try:
                msg = m.decode(body, self.secret)
            except m.OtherProtocol as e:
                if not self._refuse_other_protocol(identity, body):
                    self._dropped(identity, str(e), now)
                continue
            except m.BadMessage as e:
                self._dropped(identity, str(e), now)
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

    def _dropped(self, identity: bytes, reason: str, now: float) -> None:
        """Count a dropped message; warn at once for a peer's first, then at most once per
        :data:`DROP_LOG_EVERY` seconds per peer with the count since (a flood must not
        fill the disk through the log)."""
        key = identity if identity in self._drops or len(self._drops) < DROP_PEERS else b""
        entry = self._drops.get(key)
        if entry is None:
            self._drops[key] = [now, 0, reason]
            log.warning("dropped a message from %s: %s", _peer(key), reason)
            return
        entry[1] += 1
        entry[2] = reason
        if now - entry[0] >= DROP_LOG_EVERY:
            self._flush_drops(now, [key])

    def _flush_drops(self, now: float, keys: Optional[List[bytes]] = None,
                     final: bool = False) -> None:
        """Log the drops counted since each peer's last warning once that is
        :data:`DROP_LOG_EVERY` seconds old (all of them when *final*); forget peers quiet
        for as long."""
        for key in keys if keys is not None else list(self._drops):
            since, count, reason = self._drops[key]
            if now - since < DROP_LOG_EVERY and not final:
                continue
            if count:
                log.warning("dropped %d more message(s) from %s in the last %.0f s; last "
                            "reason: %s", count, _peer(key), now - since, reason)
                self._drops[key] = [now, 0, reason]
            else:
                del self._drops[key]

    def _refuse_other_protocol(self, identity: bytes, frames: List[bytes]) -> bool:
        """Answer an authentic Hello of another protocol version with an Error the sender
        can read (in its own envelope); True if it was one."""
        found = m.decode_hello(frames, self.secret)
        if found is None:
            return False
        hello, protocol = found
        log.warning("client %s (%s, %s) speaks protocol %d, this agent %d: refused",
                    identity.hex(), hello.client, hello.version, protocol, PROTOCOL_VERSION)
        detail = ("the cloudexec agent on this cluster (version %s, pid %d) speaks protocol %d "
                  "and this client protocol %d: use the same scipion-cloudexec release on "
                  "both sides (a client of protocol %d replaces this agent once it is idle)"
                  % (self.version, os.getpid(), PROTOCOL_VERSION, protocol, PROTOCOL_VERSION))
        try:
            self.sock.send_multipart([identity] + m.refusal(hello.rid, protocol, self.secret,
                                                            detail))
        except zmq.ZMQError as e:
            log.warning("cannot answer %s: %s", identity.hex(), e)
        return True

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

    def stream_outputs(self, job_ids: Optional[List[str]] = None) -> None:
        """Send each watcher the bytes its job wrote since its offsets, at most ``WINDOW``
        chunks in flight per watcher and stream, the rest on later turns (a job that wrote
        gigabytes is never held in memory); an ended job's ``Ended`` goes to each watcher
        right after its last byte."""
        if job_ids is None:  # a full pass: it tells whether any watcher still waits
            self.backlog = False
        for job_id in job_ids if job_ids is not None else list(self.watchers):
            watchers = self.watchers.get(job_id)
            row = self.ending.get(job_id)
            if not watchers:
                self.watchers.pop(job_id, None)
                self.ending.pop(job_id, None)
                continue
            files = JobFiles(self.paths.jobs, job_id)
            for identity, offsets in list(watchers.items()):
                complete = True
                for i, (stream, path) in enumerate((("stdout", files.stdout),
                                                    ("stderr", files.stderr))):
                    complete &= self._send_new_bytes(identity, job_id, stream, path, offsets, i)
                if not complete:
                    self.backlog = True
                elif row is not None:  # everything sent: the end follows in order
                    del watchers[identity]
                    self._forget_inflight(identity, job_id)
                    self.send(identity, self._ended(row))
            if row is not None and not watchers:
                self.watchers.pop(job_id, None)
                self.ending.pop(job_id, None)

    def _send_new_bytes(self, identity: bytes, job_id: str, stream: str, path: str,
                        offsets: List[int], i: int) -> bool:
        """Send what the window has room for; True when the watcher has all of the file."""
        flight = self.inflight.setdefault((identity, job_id, i), deque())
        while flight and flight[0].done:
            flight.popleft()
        try:
            size = os.path.getsize(path)
        except OSError:
            return True  # no such stream (yet)
        if size <= offsets[i]:
            return True
        if len(flight) >= WINDOW:
            return False
        try:
            f = open(path, "rb")
        except OSError as e:  # e.g. EMFILE: a later turn tries again
            if time.monotonic() - self._phase_logged.get(path, -60.0) >= 10.0:
                self._phase_logged[path] = time.monotonic()
                log.warning("cannot read %s for its watchers (trying again): %s", path, e)
            return False
        with f:
            f.seek(offsets[i])
            while len(flight) < WINDOW:
                data = f.read(CHUNK)
                if not data:
                    break
                tracker = self._send_output(identity, m.Output(
                    job_id=job_id, stream=stream, offset=offsets[i], blob=data))
                offsets[i] += len(data)
                if tracker is not None and not tracker.done:
                    flight.append(tracker)
            return offsets[i] >= os.fstat(f.fileno()).st_size

    def _send_output(self, identity: bytes, msg: m.Output) -> Optional[zmq.MessageTracker]:
        """One output chunk, zero-copy and tracked: its tracker is done once zmq has handed
        it to the connection, which is how the window learns that the watcher keeps up."""
        assert self.sock is not None
        try:
            return self.sock.send_multipart([identity] + m.encode(msg, self.secret),
                                            copy=False, track=True)
        except zmq.ZMQError as e:
            log.warning("cannot send output of %s to %s: %s", msg.job_id, identity.hex(), e)
            return None

    def _forget_inflight(self, identity: bytes, job_id: Optional[str] = None) -> None:
        for key in [k for k in self.inflight
                    if k[0] == identity and (job_id is None or k[1] == job_id)]:
            del self.inflight[key]

    def expire_clients(self) -> None:
        limit = time.monotonic() - MISSED_BEATS * self.heartbeat - 1.0
        for identity, seen in list(self.clients.items()):
            if seen < limit:
                del self.clients[identity]
                for watchers in self.watchers.values():
                    watchers.pop(identity, None)
                self._forget_inflight(identity)
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
        """The supervisor recorded a job's end: its watchers get the rest of its output,
        over as many loop turns as that takes, then the end."""
        if self.watchers.get(job_id):
            self.ending[job_id] = row
            self.stream_outputs([job_id])

    def _ended(self, row: Dict) -> m.Ended:
        spec = self.journal.spec(row["job_id"]) if self.journal is not None else None
        return m.Ended(job_id=row["job_id"], state=row["state"], exit_code=row["exit_code"],
                       reason=row["reason"], launcher_id=row["launcher_id"],
                       started=row["started"], ended=row["ended"],
                       gpus=list(spec.gpus) if spec is not None else [])

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
        if new:  # first: the answer says whether it waits for slots
            self.jobs.start(spec)  # type: ignore[union-attr]
        row = self.journal.get(spec.job_id)
        self.send(identity, m.Accepted(rid=msg.rid, job_id=spec.job_id, state=row["state"],
                                       existed=not new, reason=row["reason"] or ""))
        if msg.watch:
            self.on_Watch(identity, m.Watch(rid=msg.rid, job_id=spec.job_id))

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
        self._forget_inflight(identity, msg.job_id)
        if JobState(row["state"]).final:  # its output (from the offsets), then its end
            self.ending[msg.job_id] = row
            self.stream_outputs([msg.job_id])

    def on_Cancel(self, identity: bytes, msg: m.Cancel) -> None:
        """Recorded at once; the scheduler is asked on its thread and the end follows."""
        assert self.jobs is not None
        row = self._known_job(identity, msg)
        if row is None:
            return
        if msg.job_id in self.jobs.active or msg.job_id in self.jobs.starting or \
                msg.job_id in self.jobs.held:
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


def _peer(key: bytes) -> str:
    return "peer %s" % key.hex() if key else "other peers"


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
        busy = retire_other_protocol(a.workdir)
        if busy is not None:  # the client turns this into VersionMismatch
            sys.stdout.write("BUSY %s\n" % json.dumps(busy))
            return 3
        return start_daemon(a.workdir, lambda paths: Agent(paths.workdir, a.idle_timeout,
                                                           a.heartbeat).serve())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Agent(a.workdir, a.idle_timeout, a.heartbeat).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
