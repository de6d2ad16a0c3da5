"""A link model for the test bed: a TCP proxy adding one-way delay and a rate limit, with
faults (blackhole, reset). This kernel has no ``netem``; this is the user-space substitute.

::

    client (ssh, scp, rsync, the stager)                          target (an sshd)
        |  connect 127.0.0.1:link.port                                 ^
        v                                                              |
    [proxy process] --- up pipe:   queue of (due, bytes), FIFO ------->|
                    <-- down pipe: queue of (due, bytes), FIFO --------'
    each chunk read at time t leaves at due = max(t, end of the previous chunk's
    serialisation) + len * 8 / rate  +  delay   (one serialiser per direction, shared by
    every connection: N streams share the rate as on a real link)

    with Link(("127.0.0.1", 2222), delay_ms=50, rate_mbit=1000) as link:   # 100 ms RTT
        cluster = link.cluster(cluster)     # same cluster, reached through the link
        ...
        link.blackhole()                    # the link goes silent (sockets stay open)
        link.blackhole(False)
        link.reset()                        # every connection gets a TCP RST, both sides
        link.reset_after(8 << 20)           # ... once 8 MB more have gone up
        link.set(delay_ms=75)               # change the model while connections run

The proxy is a separate process (its own interpreter: the GIL of a test or benchmark does
not slow it down), one asyncio loop with no threads; :class:`Link` talks to it through its
stdin and stdout (one JSON line each way per command: a command has taken effect when
its method returns). The process ends when its stdin closes, so it never outlives the
:class:`Link` that started it, and :meth:`Link.close` stops it by its pid.

What it models, and what it does not:

- Delay and rate apply to the bytes of a TCP stream as they cross the proxy, per direction;
  application-level round trips (an SSH channel's window, a request and its answer) see the
  full RTT, and a single SSH channel is capped near its window / RTT as on a real link.
- A new connection pays the TCP handshake: the target accepts it 1.5 RTT after the client
  connected, and what the client sent meanwhile leaves after 1 RTT (the client's own
  ``connect`` returns at once, the proxy being on loopback).
- TCP's own dynamics on the long link are not modelled: the proxy terminates TCP at both
  ends, so the client's congestion window and the kernel's buffer autotuning run at
  loopback speed. In front of the rate limit at most ``buffer_bytes`` wait (a bottleneck
  router's buffer; default 10 ms at the rate, at least 512 kB); beyond that the proxy stops
  reading and the sender's own TCP stalls, so the claimed rate is not exceeded and the
  queueing delay stays bounded.
  A real long link can only be slower for one stream (slow start, loss, the kernel's
  buffer limits): what parallel streams gain here, they gain at least as much there.
- No loss, no reordering, no jitter.

``calibrate(delay_ms, rate_mbit)`` measures what a link with those parameters delivers
(RTT of small exchanges, rate of 100 MB one way): benchmarks print it beside their figures.

Run alone (commands are read as JSON lines on stdin, e.g. ``{"cmd": "blackhole", "on": true}``)::

    python -m scipion_cloudexec.testbed.link --target 127.0.0.1:2222 --delay-ms 50 \
        --rate-mbit 1000 [--listen 127.0.0.1:0]

This module uses the standard library only (the proxy runs it as a script). Over 400
lines: the proxy process and the ``Link`` that drives it speak one small command protocol,
kept in one file so that the script the proxy runs is this very module.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional, Tuple

__all__ = ["Link", "LinkError", "calibrate"]

READ_SIZE = 256 << 10  # bytes per read (asyncio's selector transports read at most this)
BUFFER_S = 0.010  # default buffer in front of the rate limit, as time at the rate
UNLIMITED_QUEUE = 64 << 20  # bytes in flight per direction when there is no rate limit
LATE_OK = 0.0005  # chunks due within this are sent in the same pass
_EOF, _CLOSE = b"", None  # queue markers: the source half-closed / closed its socket


class LinkError(RuntimeError):
    """The proxy did not start, or did not answer a command."""


# ---- the engine (runs in the proxy process) -----------------------------------------------

class _Model:
    """The link's parameters, shared by every pipe; changed by commands."""

    def __init__(self, delay_ms: float, rate_mbit: float, buffer_bytes: Optional[int]):
        self.blackholed = False
        self.buffer_asked = buffer_bytes
        self.set(delay_ms, rate_mbit)

    def set(self, delay_ms: float, rate_mbit: float) -> None:
        self.delay = max(0.0, delay_ms) / 1e3
        self.rate = max(0.0, rate_mbit) * 1e6 / 8  # bytes per second; 0: unlimited
        # bytes waiting for the rate limit (the pipes stop reading beyond)
        self.buffer = self.buffer_asked or max(2 * READ_SIZE, int(self.rate * BUFFER_S))
        # a bound on all bytes queued (waiting, then travelling the delay)
        self.limit = int(self.rate * self.delay) + self.buffer + 2 * READ_SIZE \
            if self.rate else UNLIMITED_QUEUE


class _Pipe:
    """One direction of one connection: a FIFO of (due, bytes) drained on time."""

    def __init__(self, proxy: "_Proxy", conn: "_Conn", direction: str):
        self.proxy, self.conn = proxy, conn
        self.direction = direction  # "up" (client -> target) or "down"
        self.src: Optional[asyncio.Transport] = None
        self.dst: Optional[asyncio.Transport] = None
        self.queue: "collections.deque[Tuple[float, Optional[bytes]]]" = collections.deque()
        self.queued = 0
        self.not_before = 0.0  # the source cannot send before (the handshake's round trip)
        self.last_due = 0.0
        self.src_paused = False
        self.dst_paused = False
        self.timer: Optional[asyncio.TimerHandle] = None
        self.resume_timer: Optional[asyncio.TimerHandle] = None
        self.closed = False
        self.eof_sent = False

    def push(self, data: Optional[bytes]) -> None:
        """Data read from the source, or _EOF (it half-closed), or _CLOSE (it closed: the
        destination is closed once what precedes is delivered)."""
        m, link = self.proxy.model, self.proxy.free_at
        now = time.monotonic()
        if data and m.rate:  # one serialiser per direction, shared by all connections
            link[self.direction] = max(now, link[self.direction]) + len(data) / m.rate
            due = link[self.direction] + m.delay
        else:
            due = max(now, self.not_before) + m.delay
        due = max(due, self.last_due)  # FIFO even when the delay was lowered
        self.last_due = due
        self.queue.append((due, data))
        if data:
            self.queued += len(data)
            if not self.src_paused and self.src is not None and self.full(now, m.buffer):
                self.src_paused = True
                self.src.pause_reading()
                self.arm_resume()
        self.schedule()

    def full(self, now: float, buffer: float) -> bool:
        m = self.proxy.model
        backlog = (self.proxy.free_at[self.direction] - now) * m.rate
        return self.queued >= m.limit or bool(m.rate) and backlog > buffer

    def arm_resume(self) -> None:
        """Read again when the rate limit has worked half its buffer off."""
        m = self.proxy.model
        if m.rate and self.resume_timer is None and not self.closed:
            at = self.proxy.free_at[self.direction] - m.buffer / 2 / m.rate
            self.resume_timer = self.proxy.loop.call_at(at, self.try_resume)

    def try_resume(self) -> None:
        self.resume_timer = None
        m = self.proxy.model
        if not self.src_paused or m.blackholed or self.closed or self.src is None:
            return
        if self.full(time.monotonic(), m.buffer / 2):
            self.arm_resume()  # (a full queue is retried by flush)
            return
        self.src_paused = False
        self.src.resume_reading()

    def schedule(self) -> None:
        if self.timer is not None or not self.queue or self.closed:
            return
        if self.dst is None or self.dst_paused or self.proxy.model.blackholed:
            return  # resumed by connection_made / resume_writing / the end of the blackhole
        self.timer = self.proxy.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        self.timer = None
        if self.closed or self.dst is None:
            return
        m = self.proxy.model
        limit = time.monotonic() + LATE_OK
        while self.queue and self.queue[0][0] <= limit and not self.dst_paused \
                and not m.blackholed:
            _due, data = self.queue.popleft()
            if data is _CLOSE:
                self.dst.close()  # after its write buffer drains
                self.stop()
                return
            if self.dst.is_closing():
                self.queued -= len(data)
                continue
            if data is _EOF:
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                self.eof_sent = True
                if self.conn.up.eof_sent and self.conn.down.eof_sent:
                    self.conn.finish()  # both ends said goodbye: close both sockets
                    return
                continue
            self.queued -= len(data)
            self.dst.write(data)
            self.proxy.count(self.direction, len(data))
            if self.closed:  # count() may have reset the connection
                return
        self.try_resume()
        self.schedule()

    def stop(self) -> None:
        self.closed = True
        for t in (self.timer, self.resume_timer):
            if t is not None:
                t.cancel()
        self.timer = self.resume_timer = None
        self.queue.clear()


class _End(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes into *pipe_in*; it is the
    destination of *pipe_out*."""

    def __init__(self, conn: "_Conn", pipe_in: _Pipe, pipe_out: _Pipe):
        self.conn, self.pipe_in, self.pipe_out = conn, pipe_in, pipe_out
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=1 << 20)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a link adds no Nagle wait (ssh and sshd ask for none either)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pipe_in.src = transport
        self.pipe_out.dst = transport
        pipe = self.pipe_in
        if self.conn.proxy.model.blackholed:  # a dead link carries nothing either way
            pipe.src_paused = True
            transport.pause_reading()
        elif pipe.not_before > time.monotonic():  # the client's connect has not returned
            pipe.src_paused = True  # on the modelled link yet: it cannot send
            transport.pause_reading()
            pipe.resume_timer = self.conn.proxy.loop.call_at(pipe.not_before, pipe.try_resume)
        self.pipe_out.schedule()

    def data_received(self, data: bytes) -> None:
        self.pipe_in.push(data)

    def eof_received(self):
        self.pipe_in.push(_EOF)
        return True  # keep the other direction open (half close)

    def pause_writing(self) -> None:
        self.pipe_out.dst_paused = True

    def resume_writing(self) -> None:
        self.pipe_out.dst_paused = False
        self.pipe_out.schedule()

    def connection_lost(self, exc) -> None:
        self.pipe_out.stop()  # nothing more can reach this socket
        self.conn.lost(self)


class _Conn:
    """A client's connection and the proxy's connection to the target."""

    def __init__(self, proxy: "_Proxy"):
        self.proxy = proxy
        self.up, self.down = _Pipe(proxy, self, "up"), _Pipe(proxy, self, "down")
        self.client: Optional[_End] = None
        self.server: Optional[_End] = None
        self.task: Optional[asyncio.Task] = None
        self.done = False

    def lost(self, end: _End) -> None:
        """*end*'s socket closed: the other one is closed once what was queued for it is
        delivered (a close travels with the delay like the data before it)."""
        other = self.server if end is self.client else self.client
        if not self.done:
            end.pipe_in.push(_CLOSE)
        if other is None and self.task is not None and not self.done:
            return  # still dialling the target: what the client sent goes there, then closes
        if other is None or other.transport is None or other.transport.is_closing() \
                or self.done:
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        for end in (self.client, self.server):
            if end is not None and end.transport is not None and not end.transport.is_closing():
                end.transport.close()
        self.up.stop()
        self.down.stop()
        if self.task is not None:
            self.task.cancel()
        self.proxy.conns.discard(self)

    def abort(self) -> None:
        """TCP RST on both sockets (SO_LINGER 0), like a crashed middlebox."""
        for end in (self.client, self.server):
            t = end.transport if end is not None else None
            if t is None:
                continue
            sock = t.get_extra_info("socket")
            try:
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            t.abort()
        self.finish()


class _Proxy:
    """The listening socket, the connections, the control commands."""

    def __init__(self, target: Tuple[str, int], model: _Model):
        self.target = target
        self.model = model
        self.loop = asyncio.get_running_loop()
        self.conns: set = set()
        self.stats: Dict[str, int] = {"up": 0, "down": 0, "connections": 0, "resets": 0}
        self.reset_at: Optional[Tuple[str, int]] = None  # (direction, total bytes)
        #: per direction, when the rate limit can start the next chunk (the link's rate is
        #: shared by every connection crossing it)
        self.free_at: Dict[str, float] = {"up": 0.0, "down": 0.0}
        self.blackhole_lifted = asyncio.Event()
        self.blackhole_lifted.set()

    def count(self, direction: str, n: int) -> None:
        self.stats[direction] += n
        if self.reset_at is not None and self.reset_at[0] == direction \
                and self.stats[direction] >= self.reset_at[1]:
            self.reset_at = None
            self.loop.call_soon(self.reset)  # after this write went out

    def reset(self) -> int:
        n = len(self.conns)
        for c in list(self.conns):
            c.abort()
        self.stats["resets"] += n
        return n

    def blackhole(self, on: bool) -> None:
        self.model.blackholed = on
        for c in self.conns:
            for pipe in (c.up, c.down):
                if on:
                    if pipe.timer is not None:
                        pipe.timer.cancel()
                        pipe.timer = None
                    if pipe.src is not None and not pipe.src_paused:
                        pipe.src_paused = True
                        pipe.src.pause_reading()
                else:  # what was due goes at once; reading resumes
                    pipe.try_resume()
                    pipe.schedule()
        if on:
            self.blackhole_lifted.clear()
        else:
            self.blackhole_lifted.set()

    def accepted(self) -> _End:
        conn = _Conn(self)
        self.conns.add(conn)
        self.stats["connections"] += 1
        conn.client = _End(conn, conn.up, conn.down)
        # the client may send once the handshake's first round trip is over
        conn.up.not_before = time.monotonic() + 2 * self.model.delay
        conn.task = self.loop.create_task(self.dial(conn))
        return conn.client

    async def dial(self, conn: _Conn) -> None:
        """Reach the target when the modelled handshake would (1.5 RTT: SYN, SYN-ACK, ACK);
        a blackholed link holds the connection until it is lifted."""
        try:
            await asyncio.sleep(3 * self.model.delay)
            await self.blackhole_lifted.wait()
            conn.server = _End(conn, conn.down, conn.up)
            await self.loop.create_connection(lambda: conn.server, *self.target)
        except asyncio.CancelledError:
            return
        except OSError:  # the target refuses: so does the link (the client sees a reset)
            conn.abort()
            return
        conn.task = None
        if conn.done:  # reset meanwhile
            conn.server.transport.abort()

    def command(self, req: dict) -> dict:
        cmd = req.get("cmd")
        m = self.model
        if cmd == "set":
            m.set(req.get("delay_ms", m.delay * 1e3), req.get("rate_mbit", m.rate * 8 / 1e6))
        elif cmd == "blackhole":
            self.blackhole(bool(req.get("on", True)))
        elif cmd == "reset":
            return {"ok": True, "reset": self.reset()}
        elif cmd == "reset_after":
            d = req.get("direction", "up")
            self.reset_at = (d, self.stats[d] + int(req["bytes"]))
        elif cmd != "stats":
            return {"ok": False, "error": "unknown command %r" % cmd}
        return dict(self.stats, ok=True, open=len(self.conns), delay_ms=m.delay * 1e3,
                    rate_mbit=m.rate * 8 / 1e6, buffer_bytes=m.buffer, blackholed=m.blackholed)


async def _serve(listen: Tuple[str, int], target: Tuple[str, int], model: _Model,
                 control_in, control_out) -> None:
    proxy = _Proxy(target, model)
    loop = proxy.loop
    server = await loop.create_server(proxy.accepted, *listen, backlog=256)
    host, port = server.sockets[0].getsockname()[:2]
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), control_in)

    def reply(obj: dict) -> None:
        control_out.write(json.dumps(obj) + "\n")
        control_out.flush()

    reply({"ok": True, "listen": [host, port], "pid": os.getpid()})
    while True:
        line = await reader.readline()
        if not line:  # the owner went away: so does the link
            break
        try:
            reply(proxy.command(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:
            reply({"ok": False, "error": str(e)})
    server.close()
    proxy.reset()


def _hostport(s: str) -> Tuple[str, int]:
    host, port = s.rsplit(":", 1)
    return host, int(port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", type=_hostport, required=True, help="HOST:PORT (an sshd)")
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0))
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    p.add_argument("--rate-mbit", type=float, default=0.0, help="rate limit, each direction")
    p.add_argument("--buffer-bytes", type=int, default=0)
    a = p.parse_args(argv)
    model = _Model(a.delay_ms, a.rate_mbit, a.buffer_bytes or None)
    try:
        asyncio.run(_serve(a.listen, a.target, model, sys.stdin, sys.stdout))
    except KeyboardInterrupt:
        pass
    return 0


# ---- the handle (runs in the test or benchmark) -------------------------------------------

class Link:
    """A link model between this machine's clients and *target*: one proxy process.

    Args:
        target: (host, port) of what the link leads to (an sshd on loopback or in a
            namespace).
        delay_ms: one-way delay added in each direction (RTT = 2 x delay_ms on top of the
            path's own).
        rate_mbit: rate limit in each direction, in Mbit/s (0: none).
        listen: where the proxy listens; port 0 picks a free port (see :attr:`address`).
        buffer_bytes: bytes that may wait for the rate limit in each direction before the
            proxy stops reading (default: 10 ms at the rate, at least 512 kB).

    Constructing it starts nothing; :meth:`start` (or ``with``) starts the proxy.

    Raises:
        LinkError: the proxy did not start or stopped answering.
    """

    def __init__(self, target: Tuple[str, int], delay_ms: float = 0.0, rate_mbit: float = 0.0,
                 listen: Tuple[str, int] = ("127.0.0.1", 0), buffer_bytes: int = 0):
        self.target = (target[0], int(target[1]))
        self.delay_ms, self.rate_mbit = float(delay_ms), float(rate_mbit)
        self.listen, self.buffer_bytes = listen, int(buffer_bytes)
        self.proc: Optional[subprocess.Popen] = None
        self.address: Optional[Tuple[str, int]] = None
        self._dir: Optional[tempfile.TemporaryDirectory] = None

    # -- life ---------------------------------------------------------------------------
    def start(self) -> "Link":
        if self.proc is not None:
            return self
        argv = [sys.executable, "-S", os.path.abspath(__file__),
                "--target", "%s:%d" % self.target, "--listen", "%s:%d" % self.listen,
                "--delay-ms", repr(self.delay_ms), "--rate-mbit", repr(self.rate_mbit),
                "--buffer-bytes", str(self.buffer_bytes)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        hello = self._read()
        self.address = (hello["listen"][0], int(hello["listen"][1]))
        return self

    def close(self) -> None:
        """Stop the proxy (its connections are reset) and delete what :meth:`cluster` wrote."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()  # the proxy exits at the end of its input
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "Link":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def port(self) -> int:
        return self.address[1]

    # -- commands (each has taken effect when it returns) -------------------------------
    def set(self, delay_ms: Optional[float] = None, rate_mbit: Optional[float] = None) -> dict:
        """Change the delay and/or the rate; chunks already queued keep their times."""
        req = {"cmd": "set"}
        if delay_ms is not None:
            req["delay_ms"] = self.delay_ms = float(delay_ms)
        if rate_mbit is not None:
            req["rate_mbit"] = self.rate_mbit = float(rate_mbit)
        return self._ask(req)

    def blackhole(self, on: bool = True) -> dict:
        """Silence the link (on) or bring it back (off). Silent: nothing is forwarded either
        way and the proxy stops reading, so senders stall; sockets stay open and nothing
        is lost; new connections are held, unanswered. Back: what waited is delivered."""
        return self._ask({"cmd": "blackhole", "on": bool(on)})

    def reset(self) -> int:
        """Reset every open connection (TCP RST to both ends); returns how many."""
        return self._ask({"cmd": "reset"})["reset"]

    def reset_after(self, nbytes: int, direction: str = "up") -> dict:
        """Reset every open connection once *nbytes* more have been delivered in
        *direction* ("up": towards the target), counted over all connections; once."""
        if direction not in ("up", "down"):
            raise ValueError("direction is 'up' or 'down', not %r" % direction)
        return self._ask({"cmd": "reset_after", "bytes": int(nbytes), "direction": direction})

    def stats(self) -> dict:
        """Bytes delivered ("up", "down"), connections ("connections" so far, "open"),
        "resets", and the model in force."""
        return self._ask({"cmd": "stats"})

    # -- reaching a cluster through the link --------------------------------------------
    def cluster(self, cluster):
        """*cluster* (a ``ClusterConfig`` whose host and port are this link's target) as
        reached through the link: same host key, checked against a known_hosts file
        naming the link's address (written here, deleted by :meth:`close`)."""
        import dataclasses
        if (cluster.host, int(cluster.port)) != self.target:
            raise ValueError("cluster %s is at %s:%d, the link leads to %s:%d"
                             % ((cluster.name, cluster.host, cluster.port) + self.target))
        known = self.known_hosts(cluster.known_hosts)
        return dataclasses.replace(cluster, host=self.address[0], port=self.address[1],
                                   known_hosts=known)

    def known_hosts(self, known_hosts: str) -> str:
        """A known_hosts file holding the target's keys from *known_hosts* under the link's
        address; returns its path."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="cloudexec-link-")
        name = self.target[0] if self.target[1] == 22 else "[%s]:%d" % self.target
        alias = "[%s]:%d" % self.address
        lines = []
        with open(os.path.expanduser(known_hosts)) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and not line.startswith("#") \
                        and name in fields[0].split(","):
                    lines.append("%s %s\n" % (alias, " ".join(fields[1:])))
        if not lines:
            raise LinkError("%s holds no key for %s" % (known_hosts, name))
        path = os.path.join(self._dir.name, "known_hosts")
        with open(path, "w") as f:
            f.writelines(lines)
        return path

    # -- the control stream -------------------------------------------------------------
    def _ask(self, req: dict) -> dict:
        if self.proc is None:
            raise LinkError("the link is not started")
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise LinkError("the link proxy went away: %s" % e) from None
        reply = self._read()
        if not reply.get("ok"):
            raise LinkError("the link proxy refused %r: %s" % (req, reply.get("error")))
        return reply

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise LinkError("the link proxy (pid %d) stopped: %s" % (self.proc.pid,
                                                                     err.strip() or "no output"))
        return json.loads(line)

    def cpu_seconds(self) -> float:
        """CPU time the proxy process has used so far (user + system)."""
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def calibrate(delay_ms: float, rate_mbit: float, nbytes: int = 100 << 20,
              pings: int = 20) -> dict:
    """Measure what a link with these parameters delivers, through a fresh proxy to a
    loopback server of this process: the median round trip of *pings* 100-byte exchanges
    (ms) and the rate of *nbytes* sent one way (Mbit/s, first to last byte at the far end,
    so the delay does not count). Returns {"rtt_ms", "rate_mbit", "proxy_cpu_s"}."""
    import statistics
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    got = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def serve() -> None:
        for mode in ("echo", "sink"):
            c, _ = srv.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with c, contextlib.suppress(OSError):  # the link resets it when it closes
                while True:
                    d = c.recv(1 << 20)
                    if not d:
                        break
                    if mode == "echo":
                        c.sendall(d)
                        continue
                    now = time.perf_counter()
                    got["first"] = got["first"] or now
                    got["n"] += len(d)
                    if got["n"] >= nbytes:
                        got["last"] = now
                        done.set()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with Link(srv.getsockname(), delay_ms=delay_ms, rate_mbit=rate_mbit) as link:
            rtts = []
            with socket.create_connection(link.address) as c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(pings):
                    t0 = time.perf_counter()
                    c.sendall(b"p" * 100)
                    n = 0
                    while n < 100:
                        n += len(c.recv(100))
                    rtts.append(time.perf_counter() - t0)
            with socket.create_connection(link.address) as c:
                block, left = os.urandom(1 << 20), nbytes
                while left:
                    c.sendall(block[:min(left, len(block))])
                    left -= min(left, len(block))
                if not done.wait(120):
                    raise LinkError("calibration: %d of %d bytes arrived" % (got["n"], nbytes))
            cpu = link.cpu_seconds()
    finally:
        srv.close()
    return {"rtt_ms": statistics.median(rtts) * 1e3,
            "rate_mbit": nbytes * 8 / 1e6 / (got["last"] - got["first"]), "proxy_cpu_s": cpu}


if __name__ == "__main__":
    sys.exit(main())
