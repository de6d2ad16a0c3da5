"""A cluster whose Python lacks pyzmq (or mpi4py, for the worker pool) gets it without
anyone installing anything by hand.

The agent bundle, started with a Python that cannot import ``zmq`` (or asked ``has mpi4py``),
prints one ``NOMODULE {...}`` line describing that Python (version, machine, C library,
whether it has pip) and exits. :func:`provide` then puts the package into
``<workdir>/agent/pylib/<tag>/<package>`` on the cluster, a folder the bundle adds to
``sys.path`` at start:

1. from the cluster's own package index (``python -m pip install --target``), when the
   cluster's Python has pip and the ``packages`` key allows it;
2. else from wheels for the cluster's platform, taken from the ``wheelhouse`` folder on the
   desktop or downloaded there with ``pip download``, uploaded over SFTP and unpacked by the
   bundle itself (a wheel is a zip: no pip needed on the cluster).

The same release as the desktop's is asked for. mpi4py's binary wheels load the cluster's
own MPI library at run time. Nothing is written outside the
workdir, and a second client doing the same at once does no harm (each unpacks into its own
folder and renames it into place).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

from ..config import ClusterConfig
from ..transport.ssh import SSHConnection
from . import bundle

log = logging.getLogger("cloudexec.provision")

MARK = "NOMODULE "
#: where wheels downloaded for clusters are kept on the desktop
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "scipion-cloudexec", "wheels")


class ProvisionError(RuntimeError):
    """A package could not be made available on the cluster; the message says what to do."""


@dataclass(frozen=True)
class RemotePython:
    """What the bundle reported about the cluster's Python and the package it lacks."""
    package: str     # "pyzmq", "mpi4py"
    python: str      # sys.executable there
    version: str     # "3.11"
    machine: str     # "x86_64"
    libc: str        # "glibc 2.36", "" when unknown (musl)
    pip: bool
    pylib: str       # where the package goes

    @classmethod
    def from_output(cls, out: str) -> Optional["RemotePython"]:
        """The report in the bundle's output, or None when it did not give one."""
        if MARK not in out:
            return None
        d = json.loads(out.split(MARK, 1)[1].splitlines()[0])
        return cls(d["package"], d["python"], d["version"], d["machine"], d.get("libc", ""),
                   bool(d.get("pip")), d["pylib"])

    def platforms(self) -> List[str]:
        """pip ``--platform`` tags this Python can load (manylinux only)."""
        kind, _, ver = self.libc.partition(" ")
        if kind != "glibc" or not ver.startswith("2."):
            return []
        minor = int(ver.split(".")[1])
        return (["manylinux_2_%d_%s" % (m, self.machine) for m in range(minor, 4, -1)]
                + ["manylinux%s_%s" % (t, self.machine) for t in ("2014", "2010", "1")])


#: the module each package provides
MODULES = {"pyzmq": "zmq", "mpi4py": "mpi4py"}


def wanted(package: str) -> str:
    """The requirement: the desktop's own release, so both ends behave alike."""
    try:
        return "%s==%s" % (package, __import__(MODULES[package]).__version__)
    except ImportError:
        return package


def provide(ssh: SSHConnection, cluster: ClusterConfig, remote: RemotePython) -> str:
    """Make ``remote.package`` importable by the bundle on *cluster*; return what was done,
    for the user.

    Raises:
        ProvisionError: naming what was tried and the fix.
    """
    how, pkg = cluster.packages, remote.package
    if how == "no":
        raise ProvisionError(
            "the remote python %s on %s lacks %s and 'packages = no' forbids installing "
            "it: install it there (%s -m pip install %s), or set 'packages = auto' in "
            "[cluster %s] of %s" % (remote.python, cluster.name, pkg, remote.python, pkg,
                                    cluster.name, cluster.source))
    tried = []
    if how in ("auto", "index"):
        if remote.pip:
            err = _from_index(ssh, cluster, remote)
            if err is None:
                return ("installed %s for %s into %s from the cluster's package index"
                        % (wanted(pkg), remote.python, remote.pylib))
            tried.append("the cluster's package index: %s" % err)
        else:
            tried.append("the cluster's package index: %s has no pip" % remote.python)
        if how == "index":
            raise ProvisionError(_failed(cluster, remote, tried))
    try:
        wheel = _wheel_for(cluster, remote)
    except ProvisionError as e:
        tried.append(str(e))
        raise ProvisionError(_failed(cluster, remote, tried)) from None
    _upload_and_unpack(ssh, cluster, remote, wheel)
    return ("installed %s for %s into %s from %s, uploaded from this desktop"
            % (wanted(pkg), remote.python, remote.pylib, os.path.basename(wheel)))


def _failed(cluster: ClusterConfig, remote: RemotePython, tried: List[str]) -> str:
    pkg = remote.package
    return ("cannot make %s available to %s on %s. Tried: %s. Fix: install it there "
            "(%s -m pip install %s), or put a %s wheel for Python %s on %s (%s) in the "
            "folder named by 'wheelhouse' in [cluster %s] of %s"
            % (pkg, remote.python, cluster.name, "; ".join(tried), remote.python, pkg, pkg,
               remote.version, remote.machine, remote.libc or "unknown C library",
               cluster.name, cluster.source))


def _from_index(ssh: SSHConnection, cluster: ClusterConfig, remote: RemotePython
                ) -> Optional[str]:
    """pip on the cluster installs into a private folder renamed into place; None if it
    worked, else pip's last words."""
    q = shlex.quote
    env = cluster.env_setup.strip() + "\n" if cluster.env_setup.strip() else ""
    target = remote.pylib
    cmd = (env + "P=%s.part-$$ && rm -rf \"$P\" && %s -m pip install --disable-pip-version-check "
           "--no-input --no-warn-script-location --retries 1 --timeout 20 --only-binary=:all: "
           "--target \"$P\" %s >&2 && { [ -d %s ] && rm -rf \"$P\" || mv \"$P\" %s; }"
           % (q(target), q(remote.python), q(wanted(remote.package)), q(target), q(target)))
    log.info("installing %s on %s with its pip", wanted(remote.package), cluster.name)
    res = ssh.run(cmd, timeout=600)
    if res.exit_status == 0:
        return None
    lines = res.stderr.decode(errors="replace").strip().splitlines()
    return (lines[-1] if lines else "exit %d" % res.exit_status)[:300]


def _wheel_for(cluster: ClusterConfig, remote: RemotePython) -> str:
    """A wheel of the package for the cluster's platform: from the wheelhouse, else pip
    download."""
    platforms = remote.platforms()
    if not platforms:
        raise ProvisionError("no wheel can be chosen for C library %r on %s"
                             % (remote.libc or "unknown", remote.machine))
    pyver = remote.version.replace(".", "")
    folders = [cluster.wheelhouse] if cluster.wheelhouse else []
    for folder in folders + [CACHE]:
        found = _matching(folder, remote.package, pyver, platforms)
        if found:
            return found
    if cluster.wheelhouse:
        log.info("no %s wheel for cp%s %s in %s: downloading one", remote.package, pyver,
                 remote.machine, cluster.wheelhouse)
    os.makedirs(CACHE, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
            "--only-binary=:all:", "--no-deps", "--python-version", remote.version,
            "--implementation", "cp", "-d", CACHE]
    for p in platforms:
        argv += ["--platform", p]
    try:
        p = subprocess.run(argv + [wanted(remote.package)], capture_output=True, text=True,
                           timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ProvisionError("pip download on this desktop failed: %s" % e) from None
    found = _matching(CACHE, remote.package, pyver, platforms)
    if p.returncode != 0 or not found:
        last = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
        raise ProvisionError("pip download of %s for Python %s on %s failed on this desktop: "
                             "%s" % (wanted(remote.package), remote.version, remote.machine,
                                     last))
    return found


def _matching(folder: str, package: str, pyver: str, platforms: List[str]) -> Optional[str]:
    """The *package* wheel in *folder* for CPython *pyver* on one of *platforms*."""
    version = wanted(package).partition("==")[2]
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for name in names:
        parts = name[:-4].split("-") if name.endswith(".whl") else []
        if len(parts) != 5 or parts[0] != package or (version and parts[1] != version):
            continue
        py, abi, plat = parts[2], parts[3], parts[4]
        py_ok = "cp%s" % pyver in py.split(".") or (abi == "abi3" and py <= "cp%s" % pyver)
        if py_ok and set(plat.split(".")) & set(platforms):
            return os.path.join(folder, name)
    return None


def _upload_and_unpack(ssh: SSHConnection, cluster: ClusterConfig, remote: RemotePython,
                       wheel: str) -> None:
    dest = "%s/agent/wheels/%s" % (cluster.workdir.rstrip("/"), os.path.basename(wheel))
    res = ssh.run("umask 077 && mkdir -p %s" % shlex.quote(os.path.dirname(dest)), timeout=60)
    if res.exit_status != 0:
        raise ProvisionError("cannot create %s on %s: %s" % (
            os.path.dirname(dest), cluster.name, res.stderr.decode(errors="replace").strip()))
    log.info("uploading %s to %s", os.path.basename(wheel), cluster.name)
    sftp = ssh.sftp()
    sftp.put(wheel, dest + ".part")
    sftp.posix_rename(dest + ".part", dest)
    res = ssh.run(bundle.command(cluster, "unpack", dest, remote.package), timeout=300)
    if res.exit_status != 0:
        raise ProvisionError("unpacking %s on %s failed: %s" % (
            os.path.basename(wheel), cluster.name,
            res.stderr.decode(errors="replace").strip() or "exit %d" % res.exit_status))
