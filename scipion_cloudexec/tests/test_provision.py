"""A cluster whose Python has no pyzmq works with nothing installed by hand (issue 12).

The bare Python is the system's ``/usr/bin/python3`` (no pyzmq, no mpi4py). The wheels come
from ``.venv/wheelhouse``, which ``scripts/setup.sh`` fills for that Python: the tests
themselves reach no package index beyond this machine.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from scipion_cloudexec.cluster.errors import AgentStartError
from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.remote.jobs import JobState

BARE = "/usr/bin/python3"
WHEELHOUSE = os.path.join(sys.prefix, "wheelhouse")  # the venv's: .venv/wheelhouse


@pytest.fixture(scope="module")
def bare_python() -> str:
    if not os.access(BARE, os.X_OK):
        pytest.fail("%s is missing: these tests need the system's Python 3" % BARE)
    has = subprocess.run([BARE, "-c", "import zmq"], capture_output=True).returncode == 0
    assert not has, "%s has pyzmq (python3-zmq installed?): nothing would be tested" % BARE
    if not any(n.startswith("pyzmq-") for n in os.listdir(WHEELHOUSE)
               if os.path.isdir(WHEELHOUSE)):
        pytest.fail("no pyzmq wheel in %s: run scripts/setup.sh" % WHEELHOUSE)
    return BARE


def _hello(client: ClusterSession) -> bytes:
    out = {}
    fut = client.submit(["/bin/sh", "-c", "echo hello from $(hostname)"],
                        on_output=lambda s, d: out.setdefault(s, bytearray()).extend(d))
    assert fut.result(60).state == JobState.DONE
    return bytes(out.get("stdout", b""))


def test_bare_private_host_gets_pyzmq_uploaded_from_the_desktop(private_cluster, private_host,
                                                                 bare_python):
    """The private host sees no package index and not the desktop's files: the wheel
    travels over SFTP and the bundle unpacks it in the workdir."""
    c = dataclasses.replace(private_cluster, python=bare_python, packages="upload",
                            wheelhouse=WHEELHOUSE)
    with ClusterSession(c) as client:
        assert client.welcome.python == subprocess.run(
            [BARE, "-c", "import platform; print(platform.python_version())"],
            capture_output=True, text=True).stdout.strip()
        assert "from pyzmq-" in client.provisioned and "uploaded from this desktop" in \
            client.provisioned, client.provisioned
        assert b"hello from" in _hello(client)
    pylib = private_host.path("%s/agent/pylib" % c.workdir)
    assert any(n.startswith("py3") and "part" not in n for n in os.listdir(pylib))
    with ClusterSession(c) as client:  # already there: nothing installed twice
        assert client.provisioned == ""


def test_bare_cluster_uses_its_own_package_index(make_cluster, bare_python):
    """The cluster's pip, pointed by env_setup at a local index (a folder of wheels), does
    the install; nothing is uploaded."""
    c = make_cluster("local", python=bare_python, packages="index",
                     env_setup="export PIP_NO_INDEX=1 PIP_FIND_LINKS=%s" % WHEELHOUSE)
    with ClusterSession(c) as client:
        assert "from the cluster's package index" in client.provisioned, client.provisioned
        assert b"hello from" in _hello(client)
    assert not os.path.exists(os.path.join(c.workdir, "agent", "wheels"))


def test_bare_cluster_with_packages_no_says_how_to_fix(make_cluster, bare_python):
    c = make_cluster("local", python=bare_python, packages="no")
    with pytest.raises(AgentStartError, match=r"lacks pyzmq and 'packages = no' forbids "
                       r"installing it: install it there \(%s -m pip install pyzmq\)"
                       % bare_python):
        ClusterSession(c).start()


def test_no_wheel_anywhere_names_what_was_tried_and_the_fix(make_cluster, bare_python,
                                                            tmp_path, monkeypatch):
    """No index (pip finds nothing), an empty wheelhouse, and a desktop download that fails
    (FAKE: pip pointed at an empty local index, as on a desktop without network)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    from scipion_cloudexec.cluster import provision
    monkeypatch.setattr(provision, "CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    c = make_cluster("local", python=bare_python, packages="auto", wheelhouse=str(empty),
                     env_setup="export PIP_NO_INDEX=1 PIP_FIND_LINKS=%s" % empty)
    with pytest.raises(AgentStartError) as e:
        ClusterSession(c).start()
    text = str(e.value)
    assert "cannot make pyzmq available to %s on %s" % (bare_python, c.name) in text
    assert "the cluster's package index:" in text and "pip download of pyzmq==" in text
    assert "'wheelhouse' in [cluster %s]" % c.name in text


def test_worker_pool_on_a_bare_python_gets_mpi4py_too(make_cluster, bare_python):
    """The pool needs mpi4py: it is added like pyzmq before the pool starts (its binary
    wheel loads the cluster's own Open MPI at run time)."""
    c = make_cluster("mpirun", python=bare_python, packages="upload", wheelhouse=WHEELHOUSE)
    with ClusterSession(c) as client:
        assert "from pyzmq-" in client.provisioned
        pool = client.start_pool("bare", ranks=2)
        assert "from mpi4py-" in client.provisioned, client.provisioned
        out = {}
        fut = client.submit(["/bin/sh", "-c", "echo on rank $CLOUDEXEC_POOL_RANK"],
                            pool="bare", on_output=lambda s, d: out.setdefault(
                                s, bytearray()).extend(d))
        assert fut.result(120).exit_code == 0
        assert bytes(out["stdout"]).startswith(b"on rank ")
        client.cancel(pool.job_id)
