"""The agent bundle: the agent's own modules zipped, shipped by the client.

The zip is deterministic (fixed timestamps, sorted entries), so its SHA-256 names
exactly the code inside. The agent reports that hash as its version, which is
how the client knows the agent it talks to runs the client's own code.
"""
from __future__ import annotations

import hashlib
import io
import os
import shlex
import zipfile
from functools import lru_cache
from typing import Tuple

from ..config import ClusterConfig
from .errors import AgentStartError
from .ssh import SSHConnection
from ..version import __version__

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: what ships: version.py and every module of remote/ (stdlib + pyzmq only, and they import
#: nothing of the package but remote/ and version), so adding a module there ships it
_REMOTE = os.path.join(_PKG, "remote")
MODULES = ("version.py",) + tuple(sorted(
    "remote/" + f for f in os.listdir(_REMOTE) if f.endswith(".py") and f != "__init__.py"))
_INITS = ("__init__.py", "remote/__init__.py")
_MAIN = b"""import os, sys
if sys.version_info < (3, 9):
    sys.exit("cloudexec agent: Python 3.9 or newer is needed, this is %s" % sys.version.split()[0])
if sys.argv[1:2] == ["stage"]:  # stdlib only: starts fast, even under python -S
    from scipion_cloudexec.remote.stage_server import main
    sys.exit(main(sys.argv[2:]))
import platform
# packages put there by the desktop when this Python lacked them (cluster/provision.py)
PYLIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0]))), "pylib",
                     "py%d%d-%s" % (sys.version_info[0], sys.version_info[1], platform.machine()))
if sys.argv[1:2] == ["unpack"]:  # a wheel is a zip: unpacked beside, renamed into place
    import shutil, zipfile
    into = os.path.join(PYLIB, sys.argv[3])
    part = "%s.part-%d" % (into, os.getpid())
    with zipfile.ZipFile(sys.argv[2]) as z:
        z.extractall(part)
    if os.path.isdir(into):
        shutil.rmtree(part)
    else:
        os.rename(part, into)
    sys.exit(0)
for package in ("pyzmq", "mpi4py"):
    if os.path.isdir(os.path.join(PYLIB, package)):
        sys.path.insert(0, os.path.join(PYLIB, package))


def lacks(module, package):
    try:
        __import__(module)
        return False
    except ImportError:
        import importlib.util, json
        print("NOMODULE " + json.dumps({
            "package": package, "python": sys.executable, "machine": platform.machine(),
            "version": "%d.%d" % sys.version_info[:2], "pylib": os.path.join(PYLIB, package),
            "libc": " ".join(platform.libc_ver()).strip(),
            "pip": importlib.util.find_spec("pip") is not None}), flush=True)
        return True


if sys.argv[1:2] == ["has"]:  # has MODULE PACKAGE
    sys.exit(3 if lacks(sys.argv[2], sys.argv[3]) else 0)
if lacks("zmq", "pyzmq"):
    sys.exit("cloudexec agent: No module named 'zmq': install pyzmq for %s" % sys.executable)
if sys.argv[1:2] == ["pool"]:
    from scipion_cloudexec.remote.pool import main
    sys.exit(main(sys.argv[2:]))
from scipion_cloudexec.remote.server import main
sys.exit(main())
"""


@lru_cache(maxsize=1)
def build() -> Tuple[bytes, str]:
    """Return (zip bytes, version ``<release>+<sha256[:12]>``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        add("__main__.py", _MAIN)
        for rel in sorted(_INITS + MODULES):
            data = b"" if rel in _INITS else open(os.path.join(_PKG, rel), "rb").read()
            add("scipion_cloudexec/" + rel, data)
    data = buf.getvalue()
    return data, "%s+%s" % (__version__, hashlib.sha256(data).hexdigest()[:12])


class BundleError(AgentStartError):
    """The bundle could not be put on the cluster (so no agent, no staging server starts)."""


def remote_path(cluster: ClusterConfig) -> str:
    """Where the bundle of this client's version lives on the cluster."""
    return "%s/agent/bundles/agent-%s.zip" % (cluster.workdir.rstrip("/"),
                                               build()[1].split("+")[1])


def intact(cluster: ClusterConfig) -> str:
    """Shell test: the cluster's bundle is there with this client's exact bytes (a damaged
    or altered zip is never run; without sha256sum, presence alone is checked)."""
    z = shlex.quote(remote_path(cluster))
    return ('{ test -s %s && { ! command -v sha256sum >/dev/null || '
            '[ "$(sha256sum < %s | cut -c1-64)" = %s ]; }; }'
            % (z, z, hashlib.sha256(build()[0]).hexdigest()))


NO_BUNDLE = "CLOUDEXEC-NO-BUNDLE"  # what :func:`if_intact` prints when it runs nothing
NO_WORKDIR = 96  # the exit status of :func:`if_intact` when the workdir cannot be made


def _make_workdir(cluster: ClusterConfig) -> str:
    """Shell: create the workdir private (0700: it holds the agent's secret and the jobs'
    files) and the bundle's folder."""
    q = shlex.quote
    return "(umask 077 && mkdir -p %s %s)" % (q(cluster.workdir),
                                              q(os.path.dirname(remote_path(cluster))))


def if_intact(cluster: ClusterConfig, cmd: str) -> str:
    """Shell: make the workdir (private) and run *cmd* if the bundle is there intact; else
    print :data:`NO_BUNDLE` and run nothing (then :func:`upload`, and *cmd*); exit
    :data:`NO_WORKDIR` if the workdir cannot be made (its error on stderr)."""
    return "%s || exit %d\n%s || { echo %s; exit 97; }\n%s" % (
        _make_workdir(cluster), NO_WORKDIR, intact(cluster), NO_BUNDLE, cmd)


def ensure_uploaded(ssh: SSHConnection, cluster: ClusterConfig) -> str:
    """Upload the bundle unless the cluster has it intact; return its remote path. The
    workdir is created private (0700): it holds the agent's secret and the jobs' files."""
    zpath = remote_path(cluster)
    res = ssh.run("%s && %s" % (_make_workdir(cluster), intact(cluster)),
                  timeout=cluster.connect_timeout * 2)
    if res.exit_status != 0:
        if res.stderr.strip():
            raise no_workdir(cluster, res.stderr)
        upload(ssh, cluster)
    return zpath


def no_workdir(cluster: ClusterConfig, stderr: bytes) -> "BundleError":
    return BundleError("cannot create %s on %s: %s" % (
        os.path.dirname(remote_path(cluster)), cluster.name,
        stderr.decode(errors="replace").strip()))


def upload(ssh: SSHConnection, cluster: ClusterConfig) -> None:
    """Write the bundle over SFTP into its folder, which exists (a ``.part``, renamed)."""
    zpath = remote_path(cluster)
    sftp = ssh.sftp()
    with sftp.open(zpath + ".part", "wb") as f:
        f.write(build()[0])
    sftp.posix_rename(zpath + ".part", zpath)


def command(cluster: ClusterConfig, *args: str, flags: Tuple[str, ...] = ()) -> str:
    """Shell command running the bundle with *args* on the cluster, after env_setup;
    *flags* go to the Python interpreter."""
    env = cluster.env_setup.strip() + "\n" if cluster.env_setup.strip() else ""
    return env + " ".join(shlex.quote(a) for a in
                          (cluster.python,) + tuple(flags) + (remote_path(cluster),) + args)
