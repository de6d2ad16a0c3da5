"""A cluster host that shares no files with the desktop by accident.

Its own network namespace (``cxp-<name>``, 10.79.0.1x on bridge ``cxpbr0``, apart from
:mod:`.netns`'s so both can run at once), its own host name (``cx-private-<name>``) and a
private mount namespace in which each ``hide`` folder is covered by an empty tmpfs and the
work area ``/srv/cx-private-<name>`` is a tmpfs only the host sees. sshd runs inside, so every
login, agent and MPI job there sees the same world: a file gets to or from it only over SSH.
The rest of the filesystem (``/usr``, the venv, the test bed's keys) stays shared.
Needs root, ``ip netns``, ``unshare`` and ``nsenter``. Every process is stopped by pid.
"""
from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, List, Optional, Sequence, Tuple

from .local import SSHD, SSHD_CONFIG, LocalTestbed, TestbedError, _read_pid, _stop_pid

BRIDGE = "cxpbr0"
NET = "10.79.0"
WORK_SIZE = "2g"  # tmpfs only takes memory for what is written


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def lease_name(root: str, prefix: str, count: int = 9) -> Tuple[str, Callable[[], None]]:
    """A host name ``<prefix>1`` .. ``<prefix><count>`` that no live process holds, and the
    function that frees it. Test sessions running at once (CI, a developer, helpers) each
    get their own host: ``PrivateHost.up`` clears a host of that name first."""
    folder = os.path.join(root, "private-leases")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for i in range(1, count + 1):
            path = os.path.join(folder, "%s%d" % (prefix, i))
            holder = _read_pid(path)  # None when absent or its process is gone
            if holder is not None and holder != os.getpid():
                continue
            with open(path, "w") as f:
                f.write(str(os.getpid()))

            def release(path: str = path) -> None:
                if _read_pid(path) == os.getpid():
                    os.unlink(path)
            return "%s%d" % (prefix, i), release
    raise TestbedError("all %d private hosts %s1..%s%d are held by running sessions (%s)"
                       % (count, prefix, prefix, count, folder))


class PrivateHost:
    """One private host sharing the local test bed's user key. Constructing it starts nothing.

    Args:
        testbed: gives the authorized key (its sshd is started for the keys) and the python.
        name: short (it names the namespace and veth, 15 characters at most); its digits pick
            the address (``p1`` -> 10.79.0.11).
        hide: desktop folders the host sees empty (each under its own tmpfs).
        bridge, net: the bridge and /24 the host is on (hosts of one test on a bridge of
            their own are not cut off when another session's host goes down).
    """

    def __init__(self, testbed: LocalTestbed, name: str = "p1", hide: Sequence[str] = (),
                 bridge: str = BRIDGE, net: str = NET):
        self.tb = testbed
        self.bridge, self.net = bridge, net
        self.name = name
        self.hide: List[str] = [os.path.abspath(h) for h in hide]
        self.ns = "cxp-" + name
        self.veth = self.ns + "-h"
        self.hostname = "cx-private-" + name
        self.work = "/srv/cx-private-" + name
        self.address = "%s.%d" % (net, 10 + int(re.sub(r"\D", "", name) or 1))
        self.root = os.path.join(testbed.root, "private", name)
        self.pidfile = os.path.join(self.root, "sshd.pid")
        self.known_hosts = os.path.join(self.root, "known_hosts")
        if len(self.veth) > 15:
            raise ValueError("host name %r is too long for an interface name" % name)
        needed = (os.path.abspath(testbed.python), self.root, testbed.sshd_dir, "/usr")
        for h in self.hide:  # sshd and the agent must still find these inside
            clash = [p for p in needed if _inside(p, h) or h == "/"]
            if clash:
                raise ValueError("hiding %s would hide %s from the host" % (h, clash[0]))

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why this machine cannot make a private host, or None when it can."""
        if os.geteuid() != 0:
            return "a private host needs root (network and mount namespaces)"
        missing = [t for t in ("ip", "unshare", "nsenter", SSHD) if not shutil.which(t)]
        if missing:
            return "a private host needs %s" % ", ".join(missing)
        if _ip("netns", "list", check=False).returncode != 0:
            return "`ip netns` does not work here"
        return None

    @property
    def pid(self) -> Optional[int]:
        """The host's sshd, alive; its namespaces are the host's."""
        return _read_pid(self.pidfile)

    def path(self, path: str) -> str:
        """*path* as the host sees it, readable from the desktop through its sshd's root:
        for test set-up and clean-up only, never for what a test proves."""
        if self.pid is None:
            raise TestbedError("the private host %s is down" % self.name)
        return "/proc/%d/root%s" % (self.pid, os.path.abspath(path))

    def up(self) -> str:
        """Create the namespaces and start sshd; returns the address (port 22)."""
        self.down()  # leftovers of an interrupted run: a stale mount namespace cannot be reused
        self.tb.start_sshd()  # the user key and authorized_keys
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        if _ip("link", "show", self.bridge, check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", self.net + ".1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.ns + "-n")
        _ip("link", "set", self.ns + "-n", "netns", self.ns)
        _ip("link", "set", self.veth, "master", self.bridge, "up")
        _ip("-n", self.ns, "addr", "add", self.address + "/24", "dev", self.ns + "-n")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        _ip("-n", self.ns, "link", "set", self.ns + "-n", "up")
        key = os.path.join(self.root, "ssh_host_ed25519_key")
        if not os.path.exists(key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        conf, log = os.path.join(self.root, "sshd_config"), os.path.join(self.root, "sshd.log")
        with open(conf, "w") as f:
            f.write(SSHD_CONFIG.format(
                port=22, hostkey=key, pid=self.pidfile, user=self.tb.user,
                auth=os.path.join(self.tb.sshd_dir, "authorized_keys"),
                env="OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
                .replace("ListenAddress 127.0.0.1", "ListenAddress " + self.address))
        q = shlex.quote
        script = ["set -e", "hostname " + q(self.hostname)]
        for h in self.hide:
            script.append("mkdir -p %s && mount -t tmpfs -o size=1m,mode=0755 cx-hidden %s"
                          % (q(h), q(h)))
        script.append("mkdir -p %s && mount -t tmpfs -o size=%s,mode=0755 cx-work %s"
                      % (q(self.work), WORK_SIZE, q(self.work)))
        script.append("exec %s -f %s -E %s" % (SSHD, q(conf), q(log)))
        # sshd daemonizes from inside the private mount + UTS namespaces: it and every session
        # it forks stay there; propagation private keeps the tmpfs mounts off the desktop
        r = subprocess.run(["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts",
                            "--propagation", "private", "sh", "-c", "\n".join(script)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise TestbedError("the private host %s did not start: %s" % (self.name, r.stderr))
        with open(key + ".pub") as f:
            kind, b64 = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write("%s %s %s\n" % (self.address, kind, b64))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.address, 22), 0.5).close()
                return self.address
            except OSError:
                if time.monotonic() > deadline:
                    raise TestbedError("sshd of %s does not answer on %s:22 (see %s)"
                                       % (self.name, self.address, log)) from None
                time.sleep(0.1)

    def link(self, up: bool) -> None:
        """Cut (or restore) the host's link: its packets are dropped, nothing is reset."""
        _ip("link", "set", self.veth, "up" if up else "down")

    def _pids(self) -> List[int]:
        out = _ip("netns", "pids", self.ns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def down(self) -> None:
        """Stop sshd and every process in the namespace (agents, jobs), by pid, then delete
        the veth, the namespace and, when no other host uses it, the bridge."""
        _stop_pid(self.pidfile)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            for pid in self._pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self._pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        _ip("link", "del", self.veth, check=False)
        _ip("netns", "del", self.ns, check=False)
        if not _ip("-o", "link", "show", "master", self.bridge, check=False).stdout.strip():
            _ip("link", "del", self.bridge, check=False)
        try:  # the mount point left on the desktop; its tmpfs went with the last process
            os.rmdir(self.work)
        except OSError:
            pass
