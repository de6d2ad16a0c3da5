"""What carries the byte stream between the desktop and the cluster's staging server.

The server (``python agent.zip stage serve``) speaks the same line protocol on any byte
stream; two carriers exist:

- :class:`ParamikoChannel`: an exec channel on the SSH connection the client already
  holds. Costs no new connection: used for requests and small transfers.
- :class:`OpenSSHChannel`: the system's ``ssh`` client as a subprocess, its stdin/stdout the
  stream. Its ciphers run in C (~330 MB/s here vs ~185 MB/s for paramiko), so large
  uploads and downloads go this way when the cluster's ``transfer`` setting allows.

Both send a Hello at once and read its answer with the first request's answer, so the
remote shell and Python start while the desktop is still walking its files.
"""
from __future__ import annotations

import hmac
import io
import json
import os
import select
import socket
import subprocess
import tempfile
import threading
import time
from typing import Optional

from . import bundle
from ..config import ClusterConfig
from .ssh import SSHConnection, Target, openssh_argv
from ..remote.hashing import BLOCK
from ..remote.stage_protocol import STAGE_PROTOCOL, Hello, Request
from .errors import LinkLost, StagingError, VersionMismatch

WINDOW = 16 << 20  # SSH window: keeps a long or slow link busy
NO_BUNDLE = 97  # exit status of the start command when this version's bundle is missing


class NoBundle(Exception):
    """The cluster lacks this client's agent bundle: upload it, then start again."""


def server_command(cluster: ClusterConfig) -> str:
    """Shell command starting the staging server, or exiting NO_BUNDLE (one SSH session)."""
    return "%s || exit %d\n%s" % (
        bundle.intact(cluster), NO_BUNDLE,
        # -S: the server needs the standard library only, and site-packages cost start-up time
        bundle.command(cluster, "stage", "serve", "--workdir", cluster.workdir, flags=("-S",)))


def dead_link_seconds(cluster: ClusterConfig) -> float:
    """No progress for this long means a dead link (a cut link drops packets silently)."""
    return max(10.0, 6 * cluster.heartbeat)


class EndpointRefused(Exception):
    """The cluster's staging endpoint cannot be used (gone, or not ours): start a server."""


class ServerChannel:
    """One running staging server and the stream to it."""

    kind = ""

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster
        self.out: io.BufferedIOBase
        self._greeted = False

    # -- what a carrier provides ---------------------------------------------------------
    def sendall(self, data: bytes) -> None:
        raise NotImplementedError

    def send_file(self, f, offset: int, count: int) -> int:
        """Send up to *count* bytes of open file *f* from *offset*; returns bytes read
        (fewer than asked when the file shrank)."""
        f.seek(offset)
        block = f.read(min(BLOCK, count))
        if block:
            self.sendall(block)
        return len(block)

    def exit_status(self) -> Optional[int]:
        raise NotImplementedError

    def stderr(self) -> str:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    PROVE_SECONDS = 10.0

    def _proof_line(self, deadline: float) -> bytes:
        """One line of the endpoint's handshake by *deadline*, of at most MAX_LINE bytes."""
        raise NotImplementedError

    def _prove(self, token: bytes, seconds: float = PROVE_SECONDS) -> None:
        """The staging endpoint's handshake (docs/PROTOCOL.md): both sides prove they hold
        *token* before the client sends anything else.

        Raises:
            EndpointRefused: it is not our endpoint, or it did not answer in *seconds*.
        """
        from ..remote.stage_endpoint import ENDPOINT_PROTOCOL, proof
        import secrets
        deadline = time.monotonic() + seconds
        try:
            first = json.loads(self._proof_line(deadline))
            if not isinstance(first, dict) or first.get("endpoint") != ENDPOINT_PROTOCOL:
                raise EndpointRefused("it does not speak endpoint protocol %d"
                                      % ENDPOINT_PROTOCOL)
            ns, nc = str(first.get("nonce")), secrets.token_hex(16)
            self.sendall(json.dumps({"nonce": nc, "proof": proof(token, "client", ns, nc)})
                         .encode() + b"\n")
            answer = json.loads(self._proof_line(deadline))
            if not (isinstance(answer, dict) and hmac.compare_digest(
                    str(answer.get("proof")), proof(token, "server", ns, nc))):
                raise EndpointRefused("it did not prove it holds the token")
        except (OSError, EOFError, ValueError) as e:
            raise EndpointRefused(str(e) or type(e).__name__) from None

    # -- the protocol --------------------------------------------------------------------
    def send(self, request: Request) -> None:
        """Send one request (its answer comes from :meth:`line`)."""
        self.sendall(request.encode())

    def _readline(self) -> bytes:
        try:
            return self.out.readline()
        except socket.timeout:
            raise LinkLost("no answer from %s for %.0f s: link or cluster down"
                               % (self.cluster.name, dead_link_seconds(self.cluster))) from None

    def line(self) -> dict:
        """The next answer; the first call also reads the answer to the start-up Hello.

        Raises:
            VersionMismatch: the server speaks another staging protocol.
            LinkLost: the server did not start, or stopped.
            StagingError: it failed the request.
        """
        self.greet()
        while True:
            raw = self._readline()
            if not raw:
                raise LinkLost("the staging server on %s stopped: %s" % (
                    self.cluster.name, self.stderr() or "connection lost"))
            reply = json.loads(raw)
            if not (isinstance(reply, dict) and reply.keys() == {"alive"}):
                break  # else: the server is working (hashing, copying), the link is up
        if isinstance(reply, dict) and reply.get("error") == "failed":
            raise StagingError("staging on %s failed: %s" % (self.cluster.name, reply["detail"]))
        return reply

    def greet(self) -> None:
        """Read the answer to the start-up Hello, once (:meth:`line` does it too): before
        sending bulk bytes, so that a server that did not start is told from a link cut
        during the bytes.

        Raises:
            NoBundle, VersionMismatch, LinkLost: as :meth:`line`.
        """
        if self._greeted:
            return
        raw = self._readline()
        if not raw:
            if self.exit_status() == NO_BUNDLE:
                raise NoBundle()
            raise LinkLost("the staging server on %s did not start (%s): %s"
                           % (self.cluster.name, self.kind, self.stderr() or "no answer"))
        self._check_greeting(json.loads(raw))
        self._greeted = True

    def _check_greeting(self, greeting: dict) -> None:
        theirs = greeting.get("protocol") if isinstance(greeting, dict) else None
        if theirs != STAGE_PROTOCOL:
            detail = greeting.get("detail") if isinstance(greeting, dict) else None
            raise VersionMismatch(
                "cluster %s: the staging server speaks staging protocol %s, this client %d%s"
                % (self.cluster.name, theirs, STAGE_PROTOCOL, ": %s" % detail if detail else ""))


class ParamikoChannel(ServerChannel):
    """The server on an exec channel of an open paramiko connection."""

    kind = "paramiko"

    def __init__(self, ssh: SSHConnection, cluster: ClusterConfig):
        super().__init__(cluster)
        self.chan = ssh._require().open_session(window_size=WINDOW, max_packet_size=32768)
        self.chan.settimeout(dead_link_seconds(cluster))
        self.chan.exec_command(server_command(cluster))
        self._start_io()
        self.send(Hello())

    def _start_io(self) -> None:
        """The reader of the open channel, and the watch on its writes."""
        self.out = self.chan.makefile("rb", BLOCK)
        self._sending: Optional[float] = None
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name="cloudexec-watch", daemon=True).start()

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), self.PIECE):
            self._sending = time.monotonic()
            try:
                self.chan.sendall(view[i:i + self.PIECE])
            finally:
                self._sending = None

    PIECE = 256 << 10  # one send taking dead_link_seconds means the link is dead

    def _watch(self) -> None:
        """paramiko never times out a write to a dead TCP link: shut its socket down, which
        ends the transport (the agent client on it sees the same dead link)."""
        limit = dead_link_seconds(self.cluster)
        while not self._closed.wait(1.0):
            started = self._sending
            if started is not None and time.monotonic() - started > limit:
                transport = self.chan.get_transport()
                try:
                    transport.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return

    def exit_status(self) -> Optional[int]:
        return self.chan.recv_exit_status()

    def stderr(self) -> str:
        if self.chan.recv_stderr_ready():
            return self.chan.recv_stderr(65536).decode(errors="replace").strip()
        return ""

    @property
    def alive(self) -> bool:
        return not self.chan.closed and not self.chan.exit_status_ready()

    def close(self) -> None:
        def close() -> None:
            try:
                self.chan.shutdown_write()
                self.chan.close()
            except (OSError, EOFError):
                pass
        self._closed.set()
        # on a dead link paramiko can block for minutes sending the close: don't wait
        t = threading.Thread(target=close, name="cloudexec-close", daemon=True)
        t.start()
        t.join(2.0)


class ForwardedChannel(ParamikoChannel):
    """The agent's staging endpoint (``remote/stage_endpoint.py``) through a port forward of
    the open paramiko connection: no remote shell, no Python start. Both sides prove they
    hold the endpoint's token before any request is sent.

    Raises:
        EndpointRefused: nothing listens there, or it is not our endpoint.
    """

    kind = "endpoint"

    def __init__(self, ssh: SSHConnection, cluster: ClusterConfig, endpoint: dict):
        ServerChannel.__init__(self, cluster)
        import paramiko
        try:
            self.chan = ssh._require().open_channel(
                "direct-tcpip", ("127.0.0.1", int(endpoint["port"])), ("127.0.0.1", 0),
                window_size=WINDOW, max_packet_size=32768,
                timeout=dead_link_seconds(cluster))
        except paramiko.ChannelException as e:
            raise EndpointRefused("nothing listens at its port (%s)" % e) from None
        self._start_io()
        try:
            self._prove(bytes.fromhex(endpoint["token"]))
        except BaseException:
            self.close()
            raise
        self.chan.settimeout(dead_link_seconds(cluster))
        self.send(Hello())

    def _proof_line(self, deadline: float) -> bytes:
        """One line of the handshake, bounded in size and by the handshake's *deadline*: a
        stranger on a stale port can neither hold the client nor fill its memory."""
        from ..remote.stage_endpoint import MAX_LINE
        left = deadline - time.monotonic()
        if left <= 0:
            raise EndpointRefused("no proof within %.0f s" % self.PROVE_SECONDS)
        self.chan.settimeout(left)
        try:
            line = self.out.readline(MAX_LINE)
        except socket.timeout:
            raise EndpointRefused("no proof within %.0f s" % self.PROVE_SECONDS) from None
        if not line.endswith(b"\n"):
            raise EndpointRefused("it closed the connection, or sent no line")
        return line

    def exit_status(self) -> Optional[int]:
        return None  # a forwarded connection has none

    def stderr(self) -> str:
        return ""

    @property
    def alive(self) -> bool:
        return not self.chan.closed and not self.chan.eof_received


class OpenSSHChannel(ServerChannel):
    """The server behind the system's ``ssh`` client (same key, same known_hosts, host key
    checked, never added). Starting it returns at once."""

    kind = "openssh"

    def __init__(self, cluster: ClusterConfig, ssh: str = "ssh",
                 endpoint: Optional[dict] = None):
        super().__init__(cluster)
        beat = max(1.0, cluster.heartbeat)
        if endpoint is not None:  # the agent's staging endpoint: no remote shell (ssh -W)
            self.kind = "openssh endpoint"
        argv = openssh_argv(Target.of(cluster), server_command(cluster), alive_interval=beat,
                            alive_count=max(3, int(dead_link_seconds(cluster) / beat)), ssh=ssh,
                            forward=int(endpoint["port"]) if endpoint is not None else None)
        self._err = tempfile.TemporaryFile()  # a pipe could fill and stall ssh
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, bufsize=0, start_new_session=True)
        self._in = self.proc.stdin.fileno()
        self.out = io.BufferedReader(self.proc.stdout, BLOCK)
        self._sendfile = hasattr(os, "sendfile")
        if endpoint is not None:  # the login, then the proofs: this waits, in a stream's thread
            try:
                self._prove(bytes.fromhex(endpoint["token"]),
                            cluster.connect_timeout + self.PROVE_SECONDS)
            except BaseException as e:
                self.proc.kill()  # its stderr says why (a refused forward, a failed login)
                self.proc.wait()
                said = self.stderr()
                self.close()
                if isinstance(e, EndpointRefused) and said:
                    raise EndpointRefused("%s (ssh: %s)" % (e, said)) from None
                raise
        try:
            self.send(Hello())
        except OSError:
            pass  # ssh already exited: the first answer reports why, from its stderr

    def _proof_line(self, deadline: float) -> bytes:
        """Read from the pipe itself, before its buffered reader has taken anything: nothing
        follows a handshake line until we send the next."""
        from ..remote.stage_endpoint import MAX_LINE
        fd = self.proc.stdout.fileno()
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or len(buf) >= MAX_LINE:
                raise EndpointRefused("no proof line in time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            block = os.read(fd, MAX_LINE - len(buf))
            if not block:
                raise EndpointRefused("the connection closed")
            buf += block
        line, rest = buf.split(b"\n", 1)
        if rest:
            raise EndpointRefused("it sent more than its handshake line")
        return line + b"\n"

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._in, view):]

    def send_file(self, f, offset: int, count: int) -> int:
        if self._sendfile:
            try:  # straight from the page cache into the pipe, no copy through Python
                return os.sendfile(self._in, f.fileno(), offset, min(count, 8 * BLOCK))
            except OSError as e:
                if e.errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not here
                    raise
                self._sendfile = False
        return super().send_file(f, offset, count)

    def exit_status(self) -> Optional[int]:
        try:
            return self.proc.wait(timeout=dead_link_seconds(self.cluster))
        except subprocess.TimeoutExpired:
            return None

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read(65536).decode(errors="replace").strip()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the server exits at end of input
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self._err.close()
