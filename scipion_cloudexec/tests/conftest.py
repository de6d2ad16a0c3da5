"""Fixtures: the local test bed (real sshd, OpenMPI, SLURM) and clusters on it.

The test bed starts once per session in ``$CLOUDEXEC_TESTBED`` (default
/tmp/cloudexec-testbed-<pid>) and is stopped at the end, daemons by pid. Each test
that needs an agent gets its own cluster workdir, hence its own agent, stopped
by pid when the test ends.
"""
from __future__ import annotations

from conftest import SCIPION_ROOT  # noqa: F401  (the root conftest set pyworkflow up)

import json
import os
import signal
import sys
import time
from dataclasses import replace
from typing import Callable, Iterator, List

import pytest

from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.testbed import LocalTestbed, TestbedError
from scipion_cloudexec.testbed.local import _alive

PYTHON = sys.executable


def pytest_collection_modifyitems(items) -> None:
    """Mark ``bed`` every test that needs the test bed (sshd, SLURM, namespaces), through
    any of its fixtures: ``-m "not bed"`` is the logic alone, in seconds."""
    for item in items:
        if "testbed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.bed)


@pytest.fixture(scope="session")
def testbed() -> Iterator[LocalTestbed]:
    root = os.environ.get("CLOUDEXEC_TESTBED") or "/tmp/cloudexec-testbed"
    tb = LocalTestbed(root, python=PYTHON)
    want_slurm = os.environ.get("CLOUDEXEC_TEST_SLURM", "1") != "0"
    users = os.path.join(root, "users")  # pytest sessions sharing this test bed
    os.makedirs(users, exist_ok=True)
    me = os.path.join(users, str(os.getpid()))
    with open(me, "w"):
        pass
    was_running = tb.sshd_running()
    try:
        tb.up(slurm=want_slurm and tb.slurm_available())
    except TestbedError as e:
        pytest.fail("the test bed did not start (run scripts/setup.sh first): %s" % e)
    started = os.path.join(users, "started-by-tests")
    if not was_running:
        with open(started, "w"):
            pass
    yield tb
    os.unlink(me)
    others = [p for p in os.listdir(users) if p.isdigit() and os.path.exists("/proc/" + p)]
    if not others and os.path.exists(started):  # the last session out stops what tests started;
        os.unlink(started)  # a test bed started by hand (the demo) is left as it was
        tb.down()


def _stop_agent(workdir: str) -> None:
    try:
        with open(os.path.join(workdir, "agent", "agent.json")) as f:
            pid = int(json.load(f)["pid"])
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(250):  # 5 s, then SIGKILL
        if not _alive(pid):  # a zombie is gone: init may take seconds to reap it
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_cluster(testbed: LocalTestbed, tmp_path) -> Iterator[Callable[..., ClusterConfig]]:
    """``make_cluster(launcher, **overrides)``: a cluster on the test bed with its own workdir."""
    workdirs: List[str] = []

    def make(launcher: str = "local", **overrides) -> ClusterConfig:
        if launcher == "slurm" and not testbed.slurm_running():
            pytest.skip("SLURM is not running in the test bed (needs root and slurm-wlm; "
                        "CLOUDEXEC_TEST_SLURM=0 turns it off)")
        workdir = str(tmp_path / ("remote-%d" % len(workdirs)))
        workdirs.append(workdir)
        values = dict(
            name="%s%d" % (launcher, len(workdirs)), host="127.0.0.1", port=testbed.sshd_port,
            user=testbed.user, identity_file=testbed.client_key, known_hosts=testbed.known_hosts,
            workdir=workdir, python=PYTHON, launcher=launcher, slots=4,
            # 1 s beats: a loss is seen within 3 s, and a 2 s stall of this loaded 2-core
            # machine is not taken for one (tests about losses set their own)
            heartbeat=1.0, connect_timeout=10.0, source="<test>",
            mpirun=("mpirun", "--oversubscribe", "--bind-to", "none"),
            srun=("srun", "--mpi=pmix"))
        values.update(overrides)
        return ClusterConfig(**values)

    yield make
    for w in workdirs:
        _stop_agent(w)


@pytest.fixture
def cluster(make_cluster) -> ClusterConfig:
    return make_cluster("local")


def clusters_file_text(*clusters: ClusterConfig) -> str:
    """A clusters file holding *clusters* (as the user would write it)."""
    out = []
    for c in clusters:
        out.append("[cluster %s]" % c.name)
        for key in ("host", "port", "user", "identity_file", "known_hosts", "workdir", "python",
                    "launcher", "slots", "heartbeat", "time"):
            value = getattr(c, key)
            if value not in ("", None):
                out.append("%s = %s" % (key, value))
        out.append("mpirun = %s" % " ".join(c.mpirun))
        out.append("srun = %s" % " ".join(c.srun))
        if c.gpus:
            out.append("gpus = %s" % ",".join(map(str, c.gpus)))
    return "\n".join(out) + "\n"


@pytest.fixture
def clusters_env(tmp_path, monkeypatch):
    """``clusters_env(*clusters)``: write a clusters file and point the protocol processes
    (through $SCIPION_CLOUDEXEC_CONFIG) at it; returns its path."""
    def write(*clusters: ClusterConfig) -> str:
        path = tmp_path / "cloudexec.conf"
        path.write_text(clusters_file_text(*clusters))
        monkeypatch.setenv("SCIPION_CLOUDEXEC_CONFIG", str(path))
        return str(path)
    return write


_counter = [0]


@pytest.fixture
def new_project(tmp_path):
    """``new_project()``: a fresh pyworkflow project (real project.sqlite); cwd moves into it."""
    from pyworkflow.project import Manager
    old = os.getcwd()
    made = []

    def make(name: str = "proj"):
        _counter[0] += 1
        project = Manager().createProject("%s_%d_%d" % (name, os.getpid(), _counter[0]),
                                          location=str(tmp_path))
        os.chdir(project.path)
        made.append(project)
        return project
    yield make
    os.chdir(old)


def with_changes(cluster: ClusterConfig, **changes) -> ClusterConfig:
    return replace(cluster, **changes)


@pytest.fixture(scope="session")
def hosts(testbed):
    """Three fake cluster hosts in network namespaces, each with its own sshd, behind links
    the tests can cut (``hosts.link(name, False)``)."""
    from scipion_cloudexec.testbed.netns import NetnsClusters
    if not NetnsClusters.available():
        pytest.skip("network namespaces need root and iproute2 (ip netns)")
    n = NetnsClusters(testbed, 3)
    # sessions using the namespaces (their names are fixed): the last one out takes them down
    users = os.path.join(testbed.root, "netns-users")
    os.makedirs(users, exist_ok=True)
    me = os.path.join(users, str(os.getpid()))
    open(me, "w").close()

    def others():
        return [p for p in os.listdir(users) if p.isdigit() and p != str(os.getpid())
                and os.path.exists("/proc/" + p)]
    try:
        n.up()  # reuses what another session made
    except Exception as e:
        os.unlink(me)
        if not others():
            n.down()
        pytest.fail("network namespaces did not come up: %s" % e)
    yield n
    os.unlink(me)
    if not others():
        n.down()


@pytest.fixture(scope="session")
def private_host(testbed, tmp_path_factory):
    """A cluster host (``PrivateHost``) with its own network, host name and mount namespace,
    that sees the pytest base temporary folder, hence every test's tmp_path and project,
    empty: what a test needs there has to travel over SSH."""
    from scipion_cloudexec.testbed.private import PrivateHost
    reason = PrivateHost.unavailable()
    if reason:
        pytest.skip(reason)
    yield from leased_private_host(testbed, "p", hide=[str(tmp_path_factory.getbasetemp())])


def leased_private_host(testbed, prefix: str, **kw):
    """A ``PrivateHost`` named ``<prefix>N`` that no other running test session holds (each
    hides its own pytest folder), up for the caller's scope, then down and freed."""
    from scipion_cloudexec.testbed.private import PrivateHost, lease_name
    name, release = lease_name(testbed.root, prefix)
    host = PrivateHost(testbed, name, **kw)
    try:
        try:
            host.up()
        except Exception as e:
            host.down()
            pytest.fail("the private host %s did not come up: %s" % (name, e))
        yield host
        host.down()
    finally:
        release()


@pytest.fixture
def private_cluster(private_host, testbed, tmp_path) -> Iterator[ClusterConfig]:
    """A ``ClusterConfig`` (mpirun) on the private host, its workdir in the host's own work
    area (named after this test's tmp_path, so unique); its agent is stopped and its workdir
    deleted afterwards."""
    # pytest-N/test-name: two sessions sharing the private host never share a workdir
    workdir = "%s/%s-%s" % (private_host.work, tmp_path.parent.name, tmp_path.name)
    yield ClusterConfig(
        name="private", host=private_host.address, port=22, user=testbed.user,
        identity_file=testbed.client_key, known_hosts=private_host.known_hosts,
        workdir=workdir, python=testbed.python, launcher="mpirun", slots=4, heartbeat=0.5,
        connect_timeout=5.0, source="<test>",
        mpirun=("mpirun", "--oversubscribe", "--bind-to", "none"))
    if private_host.pid is not None:  # set-up and clean-up may look inside; tests may not
        _stop_agent(private_host.path(workdir))
        import shutil
        shutil.rmtree(private_host.path(workdir), ignore_errors=True)


@pytest.fixture
def reliability(request):
    """``reliability(fault=..., when=..., seen=..., recover_s=..., lost=0, twice=0)``: a
    measured row of docs/RELIABILITY.md. Written (JSON lines, with the test's id) to
    ``$CLOUDEXEC_RELIABILITY_OUT`` when set (benchmarks/reliability.py sets it), else
    dropped: the test's assertions are what it checks."""
    out = os.environ.get("CLOUDEXEC_RELIABILITY_OUT")

    def record(**row) -> None:
        if out:
            row["test"] = request.node.nodeid
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return record


@pytest.fixture
def stager_for(tmp_path) -> Iterator[Callable[[ClusterConfig], object]]:
    """``stager_for(cluster)``: a connected Stager, closed (with its OpenSSH clients, by
    their processes) at the end of the test."""
    from scipion_cloudexec.cluster.ssh import SSHConnection, Target
    from scipion_cloudexec.cluster.stager import Stager
    opened = []

    def make(cluster: ClusterConfig) -> "Stager":
        ssh = SSHConnection(Target.of(cluster))
        ssh.connect()
        st = Stager(ssh, cluster, hash_cache=str(tmp_path / "hashes.sqlite"))
        opened.append(st)
        return st
    yield make
    for st in opened:
        st.close()
        st.ssh.close()
