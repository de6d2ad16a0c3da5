"""Fake clusters as network namespaces: separate hosts whose links can be cut.

Bridge ``cxbr0`` (10.78.0.1/24) in the root namespace; namespaces ``cx-c1``.. with
10.78.0.11.. on a veth each, and an OpenMPI-capable sshd (port 22) in each with its own host
key. No route leaves 10.78.0.0/24. Needs root (``ip netns``). Every daemon is stopped by pid.
"""
from __future__ import annotations

import os
import subprocess
import time
from typing import Dict, List

from .local import SSHD, SSHD_CONFIG, LocalTestbed, TestbedError, _read_pid, _stop_pid

BRIDGE = "cxbr0"
NET = "10.78.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class NetnsClusters:
    """``n`` fake clusters in namespaces, sharing the local test bed's keys."""

    def __init__(self, testbed: LocalTestbed, n: int = 3, prefix: str = "c", net: str = NET,
                 bridge: str = BRIDGE):
        # another prefix, net and bridge: a set of hosts of its own, which test sessions
        # using the default set cannot take down
        self.tb = testbed
        self.n = n
        self.prefix, self.net, self.bridge = prefix, net, bridge
        self.root = os.path.join(testbed.root, "netns" if prefix == "c" else "netns-" + prefix)

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and subprocess.run(["ip", "netns", "list"],
                                                    capture_output=True).returncode == 0

    def names(self) -> List[str]:
        return ["%s%d" % (self.prefix, i) for i in range(1, self.n + 1)]

    def address(self, name: str) -> str:
        return "%s.%d" % (self.net, 10 + int(name[len(self.prefix):]))

    def up(self) -> Dict[str, str]:
        """Create namespaces and start their sshds; returns {name: address}."""
        self.tb.start_sshd()  # keys and known_hosts
        if _ip("link", "show", self.bridge, check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", "%s.1/24" % self.net, "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        known = []
        for name in self.names():
            ns, addr = "cx-" + name, self.address(name)
            if _ip("netns", "pids", ns, check=False).returncode != 0:
                _ip("netns", "add", ns)
                _ip("link", "add", ns + "-h", "type", "veth", "peer", "name", ns + "-n")
                _ip("link", "set", ns + "-n", "netns", ns)
                _ip("link", "set", ns + "-h", "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", addr + "/24", "dev", ns + "-n")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", ns + "-n", "up")
            _ip("link", "set", ns + "-h", "up")  # a run stopped mid-test may have cut it
            known.append(self._start_sshd(name, ns, addr))
        with open(self.known_hosts, "w") as f:
            f.write("".join(known))
        for name in self.names():  # wait until each sshd answers through the bridge
            deadline = time.monotonic() + 10
            while subprocess.run(["bash", "-c", "exec 3<>/dev/tcp/%s/22" % self.address(name)],
                                 capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    raise TestbedError("sshd of %s did not answer on %s:22"
                                       % (name, self.address(name)))
                time.sleep(0.1)
        return {n: self.address(n) for n in self.names()}

    @property
    def known_hosts(self) -> str:
        return os.path.join(self.root, "known_hosts")

    def _start_sshd(self, name: str, ns: str, addr: str) -> str:
        d = os.path.join(self.root, name)
        os.makedirs(d, mode=0o700, exist_ok=True)
        key = os.path.join(d, "ssh_host_ed25519_key")
        if not os.path.exists(key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        pidfile = os.path.join(d, "sshd.pid")
        if _read_pid(pidfile) is None:
            auth = os.path.join(self.tb.sshd_dir, "authorized_keys")
            conf = os.path.join(d, "sshd_config")
            with open(conf, "w") as f:
                f.write(SSHD_CONFIG.format(port=22, hostkey=key, pid=pidfile, auth=auth,
                                           user=self.tb.user,
                                           env="OMPI_ALLOW_RUN_AS_ROOT=1 "
                                               "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
                        .replace("ListenAddress 127.0.0.1", "ListenAddress " + addr))
            subprocess.run(["ip", "netns", "exec", ns, SSHD, "-f", conf, "-E",
                            os.path.join(d, "sshd.log")], check=True)
        with open(key + ".pub") as f:
            kind, b64 = f.read().split()[:2]
        return "%s %s %s\n" % (addr, kind, b64)

    def link(self, name: str, up: bool) -> None:
        """Cut (or restore) a cluster's link: its packets are dropped, nothing is reset."""
        _ip("link", "set", "cx-%s-h" % name, "up" if up else "down")

    def down(self) -> None:
        for name in self.names():
            ns = "cx-" + name
            _stop_pid(os.path.join(self.root, name, "sshd.pid"))
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # agents and jobs started in the namespace
                try:
                    os.kill(int(pid), 15)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("link", "del", ns + "-h", check=False)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)
