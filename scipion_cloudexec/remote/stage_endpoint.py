"""The staging endpoint: a staging server that outlives its clients, so that a new protocol
process reaches one through its SSH connection's port forward, with no remote shell and no
Python start (``python agent.zip stage listen``, started by the agent, gone with it).

It listens on 127.0.0.1 only, at a port the kernel picks. Each connection is a forked child
serving :func:`.stage_server.serve` on the socket once both sides proved they hold the
endpoint's token (``agent.json``'s ``stage``, mode 0600, sent to clients over SSH only):

    server -> {"endpoint": 1, "nonce": NS}
    client -> {"nonce": NC, "proof": HMAC(token, "client:" NS ":" NC)}
    server -> {"proof": HMAC(token, "server:" NS ":" NC)}      then the staging protocol

The token never travels, a proof is good for one connection only, and a client checks the
server's proof before it sends a request: a process of another user that took a stale port
learns neither the token nor any path. A wrong proof closes the connection unanswered. The
stream after the proofs is not encrypted on the cluster's loopback, so a connection is only
served when its other end belongs to this user (sshd's forward for our own logins, from
/proc/net/tcp): a relay run by another user, say from another login node to this one, is
closed before any process is forked for it.

Shipped to the cluster: standard library only.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

ENDPOINT_PROTOCOL = 1
AUTH_SECONDS = 15.0      # a connection that has not proved itself by then is closed
WRITE_STALL = 3600.0     # a client that reads nothing for this long is gone
MAX_LINE = 1024
MAX_CHILDREN = 64        # connections served at once (a protocol uses a few)

log = logging.getLogger("cloudexec.stage")


def proof(token: bytes, side: str, server_nonce: str, client_nonce: str) -> str:
    """What *side* ("client" or "server") sends to prove it holds *token*."""
    msg = ("%s:%s:%s" % (side, server_nonce, client_nonce)).encode()
    return hmac.new(token, msg, hashlib.sha256).hexdigest()


def _line(sock: socket.socket, deadline: float) -> bytes:
    """One line of at most MAX_LINE bytes by *deadline* (monotonic), read byte-wise: what
    follows belongs to serve()."""
    out = bytearray()
    while len(out) < MAX_LINE:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no proof within %.0f s" % AUTH_SECONDS)
        sock.settimeout(left)
        b = sock.recv(1)
        if not b:
            break
        out += b
        if b == b"\n":
            return bytes(out)
    raise ConnectionError("no proof line")


def _tcp_key(addr) -> str:
    """An IPv4 (host, port) as /proc/net/tcp writes it."""
    host, port = addr
    return "%08X:%04X" % (int.from_bytes(socket.inet_aton(host), "little"), port)


def peer_uid(conn: socket.socket) -> Optional[int]:
    """The uid owning the other end of a loopback TCP connection (from /proc/net/tcp), or
    None when it cannot be told."""
    mine, theirs = _tcp_key(conn.getsockname()), _tcp_key(conn.getpeername())
    try:
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 7 and parts[1] == theirs and parts[2] == mine:
                    return int(parts[7])
    except (OSError, ValueError):
        pass
    return None


def handle(conn: socket.socket, workdir: str, token: bytes) -> int:
    """Serve one connection: prove, check the client's proof, then stage."""
    from .stage_server import serve  # imported here: stage_server's main imports us
    deadline = time.monotonic() + AUTH_SECONDS  # for the whole handshake, not each read
    conn.settimeout(AUTH_SECONDS)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers are small lines
    ns = secrets.token_hex(16)
    try:
        conn.sendall(json.dumps({"endpoint": ENDPOINT_PROTOCOL, "nonce": ns}).encode() + b"\n")
        hello = json.loads(_line(conn, deadline))
        nc = str(hello["nonce"])
        if not (16 <= len(nc) <= 128) or not hmac.compare_digest(
                str(hello["proof"]), proof(token, "client", ns, nc)):
            log.warning("a connection to the staging endpoint gave a wrong proof: closed")
            return 1
        conn.sendall(json.dumps({"proof": proof(token, "server", ns, nc)}).encode() + b"\n")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("a connection to the staging endpoint did not prove itself: %s", e)
        return 1
    conn.settimeout(WRITE_STALL)  # reads time out in serve(); writes wait for the client
    out = conn.makefile("wb", buffering=1 << 20)
    return serve(workdir, conn.fileno(), out)


def _die_with_parent() -> None:
    """SIGTERM when the agent that started us dies (Linux; elsewhere the loop's check)."""
    try:
        import ctypes  # here: a Python built without libffi lacks it, and the agent imports us
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (ImportError, OSError, AttributeError):
        pass


class _Refusals:
    """Connections refused, logged at most once a minute with their count."""

    def __init__(self) -> None:
        self.count, self.logged = 0, 0.0

    def add(self, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged >= 60:
            log.warning("staging endpoint: %d connection(s) refused in the last minute "
                        "(last: %s)", self.count, why)
            self.count, self.logged = 0, now


def listen(workdir: str, token: bytes, parent: int, ready=sys.stdout) -> int:
    """Accept connections until the agent (*parent*) is gone; print ``PORT n`` once bound."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    ready.write("PORT %d\n" % srv.getsockname()[1])
    ready.flush()
    children: set = set()
    refused = _Refusals()
    while os.getppid() == parent:
        r, _, _ = select.select([srv], [], [], 1.0)
        while children:  # reap
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if not pid:
                break
            children.discard(pid)
        if not r:
            continue
        try:
            conn, _addr = srv.accept()
        except OSError:
            continue
        # only our own user's processes (sshd's forward for our logins) get a server: a
        # relay run by another user (from another login node, say) is closed unanswered
        uid = peer_uid(conn)
        if uid != os.getuid() or len(children) >= MAX_CHILDREN:
            refused.add("peer uid %s" % uid if uid != os.getuid()
                        else "%d connections served already" % len(children))
            conn.close()
            continue
        try:
            pid = os.fork()
        except OSError as e:
            log.warning("cannot fork for a staging connection: %s", e)
            conn.close()
            continue
        if pid == 0:
            code = 1
            try:
                srv.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = handle(conn, workdir, token)
            except BaseException:  # noqa: BLE001  (the child must never return into the loop)
                log.exception("staging connection failed")
            finally:
                os._exit(code)
        children.add(pid)
        conn.close()
    return 0


def main(workdir: str, parent: int) -> int:
    """``stage listen``: the token comes on stdin (never on a command line)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s stage-endpoint %(message)s")
    token = bytes.fromhex(sys.stdin.readline().strip())
    if len(token) < 16:
        sys.stderr.write("stage listen: no token on stdin\n")
        return 2
    return listen(workdir, token, parent)


class Endpoint:
    """The agent's handle on its endpoint process: :meth:`spawn` it early, read its port
    with :meth:`state` once the agent is otherwise ready (the two start side by side)."""

    def __init__(self) -> None:
        self.proc: Optional["subprocess.Popen"] = None
        self.token = b""
        self._state: Optional[dict] = None

    def spawn(self, workdir: str) -> None:
        """Start ``stage listen``; nothing when not run from the bundle (in-process tests)."""
        zipped = sys.argv[0] if sys.argv else ""
        if not (zipped.endswith(".zip") and os.path.isfile(zipped)):
            return
        self.token = secrets.token_bytes(32)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", zipped, "stage", "listen", "--workdir", workdir,
                 "--parent", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
            self.proc.stdin.write(self.token.hex().encode() + b"\n")
            self.proc.stdin.close()
        except OSError as e:
            log.warning("staging endpoint not started: %s", e)
            self.stop()

    def state(self, wait: float = 5.0) -> Optional[dict]:
        """``{"port", "token"}`` for agent.json, or None (not started: clients then start
        a staging server per connection, as without an endpoint)."""
        if self._state is not None or self.proc is None:
            return self._state
        deadline = time.monotonic() + wait
        line = b""
        try:
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                r, _, _ = select.select([self.proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
                if not r:
                    break
                b = os.read(self.proc.stdout.fileno(), 64)
                if not b:
                    break
                line += b
            if not line.startswith(b"PORT "):
                raise OSError("no port within %.0f s (exit status %s)" % (wait, self.proc.poll()))
            self._state = {"port": int(line.split()[1]), "token": self.token.hex()}
            log.info("staging endpoint pid %d on 127.0.0.1:%d", self.proc.pid,
                     self._state["port"])
        except (OSError, ValueError) as e:
            log.warning("staging endpoint not started: %s", e)
            self.stop()
        return self._state

    @property
    def known(self) -> Optional[dict]:
        """What :meth:`state` read, without waiting."""
        return self._state

    def revive(self, workdir: str) -> bool:
        """Start the endpoint again if it exited (True then: agent.json must say so)."""
        proc = self.proc
        if proc is None or proc.poll() is None:
            return False
        log.warning("staging endpoint pid %d exited (status %s): starting another",
                    proc.pid, proc.returncode)
        self.stop()
        self._state = None
        self.spawn(workdir)
        self.state()
        return True

    def stop(self) -> None:
        """Stop the endpoint (connections being served finish on their own)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
