"""SSH to a cluster's head node with paramiko: key auth, host key checked, no prompts.

An unknown host key is refused with its fingerprint and the exact known_hosts line to add
once checked; a changed key is refused as a possible attack. Nothing is accepted silently.

Over 400 lines: the connection and its port forward share paramiko's transport and its
threading rules; apart, each would re-explain the other.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import paramiko

from .errors import InfraError

log = logging.getLogger(__name__)


class _QuietRefusals(logging.Filter):
    """paramiko logs every refused forward; ZeroMQ retries a dead agent's port many times a
    second, and PortForward already says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "open FAILED" not in record.getMessage()


logging.getLogger("paramiko.transport").addFilter(_QuietRefusals())

# Fast AEAD ciphers first: on loopback aes128-gcm moved 360 MB/s vs 250 MB/s for aes128-ctr.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr",
                     "aes256-ctr")


class SSHError(ConnectionError, InfraError):
    """Base of the SSH failures; ``str()`` says what happened and what to do."""
    down = True  # the cluster's link: not one job


class HostUnreachable(SSHError):
    """No TCP connection, or no SSH server answering, at host:port."""
    lasting = True  # but a reconnect tries it again: an outage ends (executors/cloud.py)


class UnknownHostKey(SSHError):
    """The host key is not in known_hosts; refused until the user adds it."""
    lasting = True


class HostKeyChanged(SSHError):
    """known_hosts holds another key for this host: refused (possible attack)."""
    lasting = True


class AuthRefused(SSHError):
    """The server refused the user's key."""
    lasting = True


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class Target:
    """Where and as whom to connect (the SSH part of a cluster's config)."""
    host: str
    port: int
    user: str
    identity_file: str
    known_hosts: str
    connect_timeout: float = 15.0

    @classmethod
    def of(cls, cluster) -> "Target":
        """The SSH part of a cluster's config (a ``ClusterConfig``)."""
        return cls(cluster.host, cluster.port, cluster.user, cluster.identity_file,
                   cluster.known_hosts, cluster.connect_timeout)

    @property
    def hostkey_name(self) -> str:
        """The name known_hosts uses: ``host``, or ``[host]:port`` off port 22."""
        return self.host if self.port == 22 else "[%s]:%d" % (self.host, self.port)


#: OpenSSH names of the ciphers to prefer for bulk data (AES-NI GCM first).
OPENSSH_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"


def openssh_argv(target: Target, command: str, alive_interval: float = 5.0,
                 alive_count: int = 3, ssh: str = "ssh",
                 forward: Optional[int] = None) -> List[str]:
    """The system OpenSSH client running *command* on *target*, held to the same rules as
    :class:`SSHConnection`: the key only (no password, no agent prompts), the host key
    checked against the same known_hosts and never added, no forwarding of any kind.
    A link silent for ``alive_interval * alive_count`` seconds ends the command. With
    *forward*, no command: its stdin/stdout are a connection to that port of the cluster's
    loopback (``-W``; no remote shell)."""
    where = ["-W", "127.0.0.1:%d" % forward] if forward else []
    return [ssh, "-T", "-x", "-a", "-p", str(target.port), "-l", target.user,
            "-i", target.identity_file, "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            # quoted: a path with spaces would be read as several files
            "-o", 'UserKnownHostsFile="%s"' % target.known_hosts,
            "-o", "GlobalKnownHostsFile=/dev/null",
            # older clients append IP entries or rotated keys to known_hosts on their own
            "-o", "CheckHostIP=no", "-o", "UpdateHostKeys=no",
            "-o", "ConnectTimeout=%d" % max(1, round(target.connect_timeout)),
            "-o", "ServerAliveInterval=%d" % max(1, round(alive_interval)),
            "-o", "ServerAliveCountMax=%d" % alive_count, "-o", "ClearAllForwardings=yes",
            "-o", "Ciphers=^%s" % OPENSSH_CIPHERS, "-o", "LogLevel=ERROR",
            "-F", "/dev/null"] + where + ["--", target.host] + ([] if forward else [command])


@dataclass
class Completed:
    """Result of :meth:`SSHConnection.run`."""
    command: str
    exit_status: int
    stdout: bytes
    stderr: bytes


class SSHConnection:
    """One SSH transport to a head node. Constructing it connects nothing.

    Example::

        with SSHConnection(target) as ssh:
            print(ssh.run("hostname").stdout)
    """

    def __init__(self, target: Target):
        self.target = target
        self.transport: Optional[paramiko.Transport] = None
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._forwards: List["PortForward"] = []

    def __enter__(self) -> "SSHConnection":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def active(self) -> bool:
        return self.transport is not None and self.transport.is_active()

    def connect(self) -> None:
        """Open the transport, verify the host key, authenticate with the key file.

        Raises:
            HostUnreachable, UnknownHostKey, HostKeyChanged, AuthRefused, SSHError.
        """
        t = self.target
        known = self._known_keys()
        try:
            sock = socket.create_connection((t.host, t.port), timeout=t.connect_timeout)
        except OSError as e:
            raise HostUnreachable("cannot reach %s:%d: %s. Check host and port in the clusters "
                                  "file and that the cluster is up." % (t.host, t.port,
                                                                        e.strerror or e)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        # paramiko's own defaults (15 s banner and handshake, 30 s auth) would let a link
        # that dies after the TCP connect hold a reconnect well past connect_timeout
        transport.banner_timeout = transport.handshake_timeout = t.connect_timeout
        transport.auth_timeout = t.connect_timeout
        opts = transport.get_security_options()
        opts.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in opts.ciphers) + tuple(
            c for c in opts.ciphers if c not in PREFERRED_CIPHERS)
        if known:  # ask for the key type known_hosts holds, as OpenSSH does
            types = [k for k in opts.key_types if k in known] + [
                k for k in opts.key_types if k not in known]
            opts.key_types = tuple(types)
        why = ""
        try:
            transport.start_client(timeout=t.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            why = str(e) or type(e).__name__
        # start_client returns quietly when its time is up, handshake or not; the banner
        # wait may run out first and raise: either way, one message
        if why or not transport.is_active() or not transport.initial_kex_done:
            transport.close()
            raise HostUnreachable("%s:%d accepted the connection but did not complete the SSH "
                                  "handshake within %.0f s (connect_timeout)%s: is it an SSH "
                                  "server, and is the link to it up?"
                                  % (t.host, t.port, t.connect_timeout,
                                     " (%s)" % why if why else "")) from None
        try:
            self._check_host_key(transport.get_remote_server_key(), known)
            self._authenticate(transport)
        except BaseException:
            transport.close()
            raise
        transport.set_keepalive(15)
        self.transport = transport

    def _known_keys(self) -> dict:
        path = os.path.expanduser(self.target.known_hosts)
        try:
            keys = paramiko.HostKeys(path)
        except FileNotFoundError:
            return {}
        except (OSError, paramiko.SSHException) as e:
            raise SSHError("cannot read known_hosts file %s: %s" % (path, e)) from None
        return dict(keys.lookup(self.target.hostkey_name) or {})

    def _check_host_key(self, key: paramiko.PKey, known: dict) -> None:
        t = self.target
        expected = known.get(key.get_name())
        if expected is None:
            line = "%s %s %s" % (t.hostkey_name, key.get_name(), key.get_base64())
            raise UnknownHostKey(
                "host key of %s is not in %s (offered %s key %s). Check this fingerprint with the "
                "cluster's administrators, then add this line to %s:\n%s"
                % (t.hostkey_name, t.known_hosts, key.get_name(), fingerprint(key),
                   t.known_hosts, line))
        if expected.asbytes() != key.asbytes():
            raise HostKeyChanged(
                "HOST KEY CHANGED for %s: %s holds %s but the server offered %s. Someone may be "
                "intercepting the connection. If the cluster was reinstalled, check the new key "
                "with its administrators and replace the entry: ssh-keygen -f %s -R '%s'"
                % (t.hostkey_name, t.known_hosts, fingerprint(expected), fingerprint(key),
                   t.known_hosts, t.hostkey_name))

    def _authenticate(self, transport: paramiko.Transport) -> None:
        t = self.target
        path = os.path.expanduser(t.identity_file)
        try:
            pkey = paramiko.PKey.from_path(path)
        except FileNotFoundError:
            raise AuthRefused("identity_file %s does not exist; point identity_file at your "
                              "private key (e.g. ~/.ssh/id_ed25519)" % path) from None
        except paramiko.PasswordRequiredException:
            raise AuthRefused("identity_file %s is protected by a passphrase; use a key without "
                              "one for cloudexec, or decrypt a copy (ssh-keygen -p)" % path) from None
        except (paramiko.SSHException, OSError, ValueError) as e:
            raise AuthRefused("cannot load identity_file %s: %s" % (path, e)) from None
        try:
            transport.auth_publickey(t.user, pkey)
        except paramiko.AuthenticationException:
            raise AuthRefused("%s@%s refused the key %s (%s). Add its public key to "
                              "~/.ssh/authorized_keys on the cluster, or fix user/identity_file."
                              % (t.user, t.hostkey_name, path, fingerprint(pkey))) from None
        except paramiko.SSHException as e:
            raise AuthRefused("authentication with %s failed: %s" % (path, e)) from None

    def _require(self) -> paramiko.Transport:
        if not self.active:
            raise SSHError("the SSH connection to %s is closed" % self.target.hostkey_name)
        return self.transport  # type: ignore[return-value]

    def run(self, command: str, stdin: bytes = b"", timeout: Optional[float] = 120.0) -> Completed:
        """Run a shell command on the head node; collect its output and exit status.

        Raises:
            SSHError: the connection broke; TimeoutError: *timeout* seconds passed.
        """
        try:
            chan = self._require().open_session(timeout=self.target.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:  # "Timeout opening channel."
            raise SSHError("connection to %s lost: cannot open a channel (%s)"
                           % (self.target.hostkey_name, e or type(e).__name__)) from None
        try:
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready():
                    break
                else:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError("%r did not finish within %.0f s" % (command, timeout))
                    if chan.closed and not self.active:
                        raise SSHError("connection to %s lost while running %r"
                                       % (self.target.hostkey_name, command))
                    select.select([chan], [], [], 0.1)
            return Completed(command, chan.recv_exit_status(), bytes(out), bytes(err))
        finally:
            chan.close()

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP client (opened once)."""
        if self._sftp is None:
            try:
                self._sftp = paramiko.SFTPClient.from_transport(self._require())
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise SSHError("connection to %s lost: cannot open SFTP (%s)"
                               % (self.target.hostkey_name, e or type(e).__name__)) from None
        return self._sftp  # type: ignore[return-value]

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> "PortForward":
        """Forward a new local loopback port to ``remote_host:remote_port`` on the cluster."""
        fwd = PortForward(self._require(), remote_host, remote_port)
        self._forwards.append(fwd)
        return fwd

    def drop_forwards(self, remote_port: int) -> None:
        """Close the forwards to *remote_port* (an agent found gone there)."""
        for fwd in [f for f in self._forwards if f.remote[1] == remote_port]:
            fwd.close()
            self._forwards.remove(fwd)

    def close(self) -> None:
        for fwd in self._forwards:
            fwd.close()
        self._forwards.clear()
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class PortForward:
    """A listening socket on 127.0.0.1 whose connections are piped through SSH
    ``direct-tcpip`` channels to a port on the cluster's loopback.

    The listening socket stays bound for the forward's life, so no other process
    can take the port between choosing and using it.
    """

    def __init__(self, transport: paramiko.Transport, remote_host: str, remote_port: int):
        self.transport = transport
        self.remote = (remote_host, remote_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.local_port: int = self.listener.getsockname()[1]
        self.refused = 0
        self._closed = threading.Event()
        self._pairs: List[Tuple[socket.socket, paramiko.Channel]] = []
        self._thread = threading.Thread(target=self._accept, name="cloudexec-forward",
                                        daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return "tcp://127.0.0.1:%d" % self.local_port

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                chan = self.transport.open_channel("direct-tcpip", self.remote, peer, timeout=15)
            except (paramiko.SSHException, OSError) as e:
                if not self.refused:  # ZeroMQ reconnects in a loop: say it once
                    log.warning("SSH forward to %s:%d refused: %s", *self.remote, e)
                self.refused += 1
                conn.close()
                continue
            self._pairs.append((conn, chan))
            threading.Thread(target=self._pump, args=(conn, chan), daemon=True,
                             name="cloudexec-pump").start()

    def _pump(self, conn: socket.socket, chan: paramiko.Channel) -> None:
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([conn, chan], [], [], 1.0)
                if conn in readable:
                    data = conn.recv(262144)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in readable:
                    data = chan.recv(262144)
                    if not data:
                        break
                    conn.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            try:
                chan.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the SSH connection is already gone
            conn.close()
            try:  # a long session reconnects many times: forget the closed pair
                self._pairs.remove((conn, chan))
            except ValueError:
                pass

    def close(self) -> None:
        self._closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        try:
            self.listener.close()
        except OSError:
            pass
        for conn, chan in list(self._pairs):
            chan.close()
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
