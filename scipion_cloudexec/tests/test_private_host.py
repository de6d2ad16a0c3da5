"""The private host really shares nothing with the desktop: it cannot see a test's project,
has its own name and files, runs MPI jobs, and staging carries files there and back."""
import hashlib
import os
import shlex
import socket

import pytest

from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.cluster.stager import Stager
from scipion_cloudexec.cluster.ssh import SSHConnection, Target

pytestmark = pytest.mark.slow


@pytest.fixture
def ssh(private_cluster):
    with SSHConnection(Target.of(private_cluster)) as s:
        yield s


def sh(ssh, command: str) -> str:
    r = ssh.run(command, timeout=30)
    assert r.exit_status == 0, (command, r.stderr)
    return r.stdout.decode()


def test_host_cannot_see_the_test_folder(ssh, tmp_path, tmp_path_factory):
    secret = tmp_path / "proj" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("desktop only")
    assert ssh.run("test -e %s" % shlex.quote(str(secret))).exit_status == 1
    base = str(tmp_path_factory.getbasetemp())
    assert sh(ssh, "ls -A %s" % shlex.quote(base)) == "", "the host sees the base folder empty"
    assert os.listdir(base), "while the desktop sees the tests' folders"


def test_host_has_its_own_name(ssh, private_host):
    name = sh(ssh, "hostname").strip()
    assert name == private_host.hostname and name != socket.gethostname()


def test_host_files_stay_on_the_host(ssh, private_cluster):
    path = private_cluster.workdir + "/only-here.txt"
    sh(ssh, "mkdir -p %s && echo host > %s" % (private_cluster.workdir, path))
    assert sh(ssh, "cat " + path) == "host\n"
    assert not os.path.exists(path) and not os.path.exists(private_cluster.workdir)


def test_mpi_job_runs_on_the_host_and_its_output_comes_back(private_cluster, private_host,
                                                            tmp_path):
    out = bytearray()
    script = "echo $(hostname) rank $OMPI_COMM_WORLD_RANK; test ! -e %s" % shlex.quote(
        str(tmp_path))
    with ClusterSession(private_cluster) as client:
        result = client.submit(["/bin/sh", "-c", script], ranks=2,
                               on_output=lambda stream, data: out.extend(data)).result(120)
        assert client.welcome.host == private_host.hostname
    assert result.exit_code == 0, result.stderr_tail
    assert sorted(out.decode().splitlines()) == \
        ["%s rank %d" % (private_host.hostname, r) for r in range(2)]


@pytest.mark.parametrize("transfer", ["paramiko", "openssh"])
def test_staging_round_trip_carries_identical_bytes(private_cluster, tmp_path, transfer):
    """Stage a file in, copy it into a run folder on the host, stage that run out (and fetch
    the mirror's folder): the bytes that come back, over the network, are the ones sent."""
    from dataclasses import replace
    c = replace(private_cluster, transfer=transfer)
    proj = tmp_path / "proj"
    rel = "Runs/000002_ProtImport/extra/mic é 1.mrc"
    content = os.urandom(3 << 20)
    (proj / rel).parent.mkdir(parents=True)
    (proj / rel).write_bytes(content)
    ssh = SSHConnection(Target.of(c))
    ssh.connect()
    st = Stager(ssh, c, hash_cache=str(tmp_path / "hashes.sqlite"))
    try:
        sent = st.stage_in(str(proj), ["Runs"], "proj")
        assert sent.files == 1 and sent.bytes_sent == len(content)
        mirror = "%s/projects/proj/%s" % (c.workdir, rel)
        assert not os.path.exists(mirror), "the mirror is only on the host"
        assert sh(ssh, "sha256sum %s" % shlex.quote(mirror)).split()[0] == \
            hashlib.sha256(content).hexdigest()
        run = "Runs/000003_ProtCloud"
        sh(ssh, "mkdir -p {r}/extra && cp {m} {r}/extra/back.mrc".format(
            r=shlex.quote("%s/projects/proj/%s" % (c.workdir, run)), m=shlex.quote(mirror)))
        back = st.gather(str(proj), "proj", run, base={})
        assert back.fetched == [run + "/extra/back.mrc"]
        assert (proj / run / "extra" / "back.mrc").read_bytes() == content
        got = st.fetch("projects/proj/" + os.path.dirname(rel), str(tmp_path / "fetched"))
        assert got.bytes_sent == len(content)
        assert (tmp_path / "fetched" / "extra" / "mic é 1.mrc").read_bytes() == content
    finally:
        st.close()
        ssh.close()
