"""Staging through the real sshd: missing-only, dedupe, resume, verify, disk full, path guards."""
import os
import time
import subprocess

import pytest

from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.cluster.stager import NoSpace, Stager, StagingError
from scipion_cloudexec.remote.stage_protocol import ListTree

NAMES = ["mic 001 é.mrc", "empty.bin", "sub dir/ñ-micrograph.mrc", "big.mrc"]


def make_project(root, sizes=(200_000, 0, 50_000, 3_000_000)):
    extra = root / "Runs" / "000002_ProtImportMicrographs" / "extra"
    data = {}
    for name, size in zip(NAMES, sizes):
        path = extra / name
        path.parent.mkdir(parents=True, exist_ok=True)
        content = os.urandom(size)
        path.write_bytes(content)
        data["Runs/000002_ProtImportMicrographs/extra/" + name] = content
    return data


def mirror_file(cluster, project, rel):
    return os.path.join(cluster.workdir, "projects", project, rel)


def test_stage_in_sends_only_what_is_missing_and_dedupes(make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    proj = tmp_path / "proj"
    data = make_project(proj)
    before = {p: os.stat(proj / p).st_mtime_ns for p in data}
    st = stager_for(c)
    first = st.stage_in(str(proj), ["Runs"], "proj")
    assert first.files == 4 and first.bytes_sent == sum(map(len, data.values()))
    for rel, content in data.items():
        with open(mirror_file(c, "proj", rel), "rb") as f:
            assert f.read() == content, rel
    again = st.stage_in(str(proj), ["Runs"], "proj")
    assert again.bytes_sent == 0 and again.unchanged == 4 and again.linked == 0
    other = st.stage_in(str(proj), ["Runs"], "proj-copy")  # a second project, same content
    assert other.bytes_sent == 0 and other.linked == 4
    rel = "Runs/000002_ProtImportMicrographs/extra/big.mrc"
    assert os.stat(mirror_file(c, "proj", rel)).st_ino == \
        os.stat(mirror_file(c, "proj-copy", rel)).st_ino, "stored once per cluster"
    assert {p: os.stat(proj / p).st_mtime_ns for p in data} == before, "local files untouched"


def test_changed_file_is_sent_again(make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    proj = tmp_path / "proj"
    data = make_project(proj)
    st = stager_for(c)
    st.stage_in(str(proj), ["Runs"], "proj")
    rel = "Runs/000002_ProtImportMicrographs/extra/mic 001 é.mrc"
    (proj / rel).write_bytes(b"new content")
    r = st.stage_in(str(proj), ["Runs"], "proj")
    assert r.bytes_sent == len(b"new content") and r.linked == 1
    with open(mirror_file(c, "proj", rel), "rb") as f:
        assert f.read() == b"new content"
    del data


def write_movie(proj, size):
    big = proj / "movies" / "movie.tiff"
    big.parent.mkdir(parents=True)
    content = os.urandom(size)
    big.write_bytes(content)
    return content


def assert_resumed(stager, proj, content):
    """The next staging sends only what had not arrived, and the mirror has the bytes."""
    r = stager.stage_in(str(proj), ["movies"], "proj")
    assert 0 < r.bytes_sent <= len(content) - (4 << 20), "resumed, not restarted"
    with open(mirror_file(stager.cluster, "proj", "movies/movie.tiff"), "rb") as f:
        assert f.read() == content


@pytest.mark.parametrize("transfer", ["paramiko", "openssh"])
def test_upload_cut_mid_file_resumes_without_resending(make_cluster, stager_for, tmp_path,
                                                       transfer):
    c = make_cluster("local", transfer=transfer)
    proj = tmp_path / "proj"
    content = write_movie(proj, 24 << 20)
    st = stager_for(c)

    def cut(done, total, i, n):
        if done >= 8 << 20:  # the connection dies mid-file
            if transfer == "paramiko":
                st.ssh.transport.close()
            else:
                assert st._bulk_chan is not None, "a large file travels through OpenSSH"
                st._bulk_chan.proc.kill()

    with pytest.raises(StagingError, match="lost|stopped"):
        st.stage_in(str(proj), ["movies"], "proj", progress=cut)
    assert_resumed(stager_for(c), proj, content)


@pytest.mark.slow
@pytest.mark.parametrize("transfer", ["paramiko", "openssh"])
def test_link_down_mid_file_then_up_resumes(hosts, testbed, stager_for, tmp_path, transfer,
                                            reliability):
    """The cluster's network link goes down (its namespace's interface, so sshd on the
    cluster sees nothing): the upload fails with a clear error; with the link back, the
    next staging sends only what had not arrived."""
    name = hosts.names()[0]
    c = ClusterConfig(name=name, host=hosts.address(name), port=22, user=testbed.user,
                      identity_file=testbed.client_key, known_hosts=hosts.known_hosts,
                      workdir=str(tmp_path / "remote"), python=testbed.python,
                      launcher="local", slots=1, heartbeat=0.5, connect_timeout=5.0,
                      transfer=transfer)
    proj = tmp_path / "proj"
    content = write_movie(proj, 48 << 20)
    st = stager_for(c)

    def cut(done, total, i, n):
        if done >= 8 << 20:
            hosts.link(name, False)

    try:
        with pytest.raises(StagingError, match="lost|no answer|stopped") as err:
            st.stage_in(str(proj), ["movies"], "proj", progress=cut)
    finally:
        hosts.link(name, True)
    assert name in str(err.value)
    t0 = time.monotonic()
    assert_resumed(stager_for(c), proj, content)
    reliability(fault="link down mid-file (staging API, %s)" % transfer, when="mid-upload",
                seen="StagingError naming the cluster: '%s'" % str(err.value).splitlines()[0],
                recover_s="the next staging sends only the rest: %.1f s"
                % (time.monotonic() - t0), lost=0, twice=0)


def test_corrupted_cache_entry_is_detected_and_repaired(make_cluster, stager_for, tmp_path,
                                                        reliability):
    c = make_cluster("local")
    proj = tmp_path / "proj"
    data = make_project(proj)
    st = stager_for(c)
    st.stage_in(str(proj), ["Runs"], "proj")
    rel = "Runs/000002_ProtImportMicrographs/extra/big.mrc"
    path = mirror_file(c, "proj", rel)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:  # bit rot, or a program writing into its input
        f.seek(1000)
        f.write(b"CORRUPT")
    r = st.stage_in(str(proj), ["Runs"], "proj")
    assert r.repaired == 1 and r.bytes_sent == len(data[rel])
    with open(path, "rb") as f:
        assert f.read() == data[rel]
    reliability(fault="corrupted cache object on the cluster", when="between two stagings",
                seen="nothing: the next staging finds the hash wrong and sends the file again",
                recover_s="within that staging (%.2f s)" % r.seconds, lost=0, twice=0)


def test_file_changing_during_upload_is_not_recorded(make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    proj = tmp_path / "proj"
    path = proj / "mics" / "growing.mrc"
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(6 << 20))
    st = stager_for(c)
    touched = []

    def writer(done, total, i, n):
        if done >= 2 << 20 and not touched:
            with open(path, "r+b") as f:  # the microscope is still writing it
                f.seek(5 << 20)
                f.write(os.urandom(1 << 20))
            touched.append(True)

    with pytest.raises(StagingError, match="growing.mrc changed during the upload"):
        st.stage_in(str(proj), ["mics"], "proj", progress=writer)
    assert not os.path.exists(mirror_file(c, "proj", "mics/growing.mrc"))
    r = st.stage_in(str(proj), ["mics"], "proj")  # staged again once written: the new content
    with open(mirror_file(c, "proj", "mics/growing.mrc"), "rb") as f:
        assert f.read() == path.read_bytes()
    assert r.linked == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_is_refused_before_sending(make_cluster, stager_for, tmp_path, reliability):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        c = make_cluster("local", workdir=str(small / "w"))
        proj = tmp_path / "proj"
        (proj / "movies").mkdir(parents=True)
        (proj / "movies" / "m.tiff").write_bytes(os.urandom(12 << 20))
        st = stager_for(c)
        with pytest.raises(NoSpace) as e:
            st.stage_in(str(proj), ["movies"], "proj")
        assert e.value.needed == 12 << 20 and e.value.free < 8 << 20
        assert "needs 12.6 MB" in str(e.value)
        objects = os.path.join(c.workdir, "cache", "objects")
        partial = os.path.join(c.workdir, "cache", "partial")
        assert not any(files for _, _, files in os.walk(objects))
        assert not os.listdir(partial)
        reliability(fault="cluster disk full (8 MB tmpfs workdir)", when="before an upload",
                    seen="NoSpace: 'needs 12.6 MB ...' naming the cluster and its free space; "
                    "nothing half-written in its cache", recover_s="refused before sending",
                    lost=0, twice=0)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_stage_out_gathers_changes_and_refuses_escapes(make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    proj = tmp_path / "proj"
    make_project(proj)
    st = stager_for(c)
    st.stage_in(str(proj), ["Runs"], "proj")
    run = "Runs/000005_ProtCloudPowerSpectra"
    remote_run = mirror_file(c, "proj", run)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(os.path.join(remote_run, "extra"))
    with open(os.path.join(remote_run, "extra", "psd 1.mrc"), "wb") as f:
        f.write(b"psd" * 1000)
    open(os.path.join(remote_run, "extra", "zero.txt"), "wb").close()
    os.symlink("/etc/passwd", os.path.join(remote_run, "extra", "evil"))
    os.symlink(str(outside), os.path.join(remote_run, "evildir"))
    os.symlink("../../000002_ProtImportMicrographs/extra/big.mrc",
               os.path.join(remote_run, "extra", "input.mrc"))
    local_run = proj / run
    local_run.mkdir(parents=True)
    (local_run / "logs").mkdir()
    (local_run / "logs" / "run.stdout").write_text("local log, not on the cluster")
    os.symlink("psd 1.mrc", os.path.join(remote_run, "extra", "same.mrc"))
    r = st.gather(str(proj), "proj", run, base={}, exclude=[run + "/logs"])
    assert sorted(r.fetched) == sorted([run + "/extra/psd 1.mrc", run + "/extra/zero.txt",
                                        run + "/extra/same.mrc"])
    assert (local_run / "extra" / "psd 1.mrc").read_bytes() == b"psd" * 1000
    assert (local_run / "extra" / "zero.txt").read_bytes() == b""
    assert os.readlink(local_run / "extra" / "same.mrc") == "psd 1.mrc"
    # links are checked against the run folder, not the project: another run's files are
    # out of reach (a planted link once made a gather overwrite another run's set)
    assert {rel for rel, _ in r.refused} == {run + "/extra/evil", run + "/evildir",
                                             run + "/extra/input.mrc"}
    assert not os.path.lexists(local_run / "extra" / "evil")
    assert not os.path.lexists(local_run / "evildir")
    assert not os.path.lexists(local_run / "extra" / "input.mrc")
    assert (local_run / "logs" / "run.stdout").read_text() == "local log, not on the cluster"
    again = st.gather(str(proj), "proj", run, base=r.agreed, exclude=[run + "/logs"])
    assert again.bytes_sent == 0 and again.fetched == [] and not again.agreed
    assert sorted(os.listdir(local_run / "extra")) == ["psd 1.mrc", "same.mrc", "zero.txt"]


def test_stage_out_never_writes_through_a_local_symlink(make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    proj = tmp_path / "proj"
    (proj / "Runs").mkdir(parents=True)
    st = stager_for(c)
    run = "Runs/000006_X"
    remote = mirror_file(c, "proj", run)
    os.makedirs(os.path.join(remote, "sub"))
    with open(os.path.join(remote, "sub", "f.txt"), "w") as f:
        f.write("data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (proj / run).mkdir()
    os.symlink(str(elsewhere), proj / run / "sub")  # planted locally, points outside
    r = st.gather(str(proj), "proj", run, base={})
    assert r.fetched == [] and run + "/sub/f.txt" in [rel for rel, _ in r.refused]
    assert not list(elsewhere.iterdir())


class LyingStager(Stager):
    """FAKE of a compromised cluster: its listing names paths no real walk produces."""

    def __init__(self, *a, listing, **k):
        super().__init__(*a, **k)
        self.listing = listing

    def _ask(self, request, bulk=False):
        if isinstance(request, ListTree):
            return None, self.listing
        return super()._ask(request, bulk)


def test_lying_cluster_cannot_write_outside_the_run_folder(make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    st = stager_for(c)
    proj = tmp_path / "proj"
    (proj / "Runs" / "000007_X").mkdir(parents=True)
    evil = {"files": [["Runs/000007_X/../../../evil1", 4, 0, "0" * 64],
                      ["/tmp/evil2", 4, 0, "0" * 64],
                      ["Runs/000008_Other/evil3", 4, 0, "0" * 64]],
            "links": [["Runs/000007_X/l", "../../../../../../etc"]], "refused": []}
    lying = LyingStager(st.ssh, c, hash_cache=st.hash_cache_path, listing=evil)
    r = lying.gather(str(proj), "proj", "Runs/000007_X", base={})
    assert len(r.refused) == 4 and r.fetched == []
    assert not (tmp_path / "evil1").exists() and not os.path.exists("/tmp/evil2")
    assert not (proj / "Runs" / "000008_Other").exists()
    assert not os.path.lexists(proj / "Runs" / "000007_X" / "l")


def test_cache_listing_and_gc(make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    proj = tmp_path / "proj"
    data = make_project(proj)
    st = stager_for(c)
    st.stage_in(str(proj), ["Runs"], "proj")
    info = st.cache_info()
    assert info["entries"] == 4 and info["bytes"] == sum(map(len, data.values()))
    import shutil
    shutil.rmtree(os.path.join(c.workdir, "projects", "proj"))  # the project mirror is deleted
    info = st.cache_info(gc=True)
    assert info["dropped"] == 0 and info["entries"] == 4, "too young: may be being linked"
    info = st.cache_info(gc=True, min_age=0)
    assert info["dropped"] == 4 and info["entries"] == 0


def test_bytes_received_are_counted_per_mirror(make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    proj = tmp_path / "proj"
    data = make_project(proj)
    st = stager_for(c)
    st.stage_in(str(proj), ["Runs"], "proj")
    st.stage_in(str(proj), ["Runs"], "proj")  # nothing new
    st.stage_in(str(proj), ["Runs"], "other")  # deduplicated: nothing new either
    counts = st.mirrors()
    assert counts["proj"]["bytes"] == sum(map(len, data.values()))
    assert counts["proj"]["files"] == 4 and counts["other"]["bytes"] == 0


def _fake_ssh(folder, text):
    """FAKE: an `ssh` that cannot log in (a broken client or refused login cannot be caused
    here while paramiko, with the same key, still logs in)."""
    folder.mkdir()
    fake = folder / "ssh"
    fake.write_text("#!/bin/sh\necho '%s' >&2\nexit 255\n" % text)
    fake.chmod(0o755)
    return str(folder)


def test_auto_transfer_falls_back_to_paramiko_when_ssh_cannot_log_in(
        make_cluster, stager_for, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", _fake_ssh(tmp_path / "bin", "Permission denied (publickey)")
                       + os.pathsep + os.environ["PATH"])
    import scipion_cloudexec.cluster.stager as sc
    monkeypatch.setattr(sc, "BULK_START", 8 << 20)  # so that 20 MB try the bulk stream first
    c = make_cluster("local", transfer="auto")
    proj = tmp_path / "proj"
    big = proj / "movies" / "m.tiff"
    big.parent.mkdir(parents=True)
    content = os.urandom(20 << 20)
    big.write_bytes(content)
    st = stager_for(c)
    r = st.stage_in(str(proj), ["movies"], "proj")
    assert r.bytes_sent == len(content)
    with open(mirror_file(c, "proj", "movies/m.tiff"), "rb") as f:
        assert f.read() == content
    assert "OpenSSH transfers to %s unavailable, using paramiko" % c.name in caplog.text
    assert "Permission denied" in caplog.text


@pytest.mark.parametrize("ssh_gone_first", [False, True])
def test_openssh_transfer_that_cannot_log_in_is_a_clear_error(
        make_cluster, stager_for, tmp_path, monkeypatch, ssh_gone_first):
    monkeypatch.setenv("PATH", _fake_ssh(tmp_path / "bin", "Permission denied (publickey)")
                       + os.pathsep + os.environ["PATH"])
    if ssh_gone_first:  # a busy desktop writes its request after ssh has exited: EPIPE
        from scipion_cloudexec.cluster import channels
        start = channels.OpenSSHChannel.__init__

        def start_then_wait(self, *a, **kw):
            start(self, *a, **kw)
            self.proc.wait(30)
        monkeypatch.setattr(channels.OpenSSHChannel, "__init__", start_then_wait)
    c = make_cluster("local", transfer="openssh")
    proj = tmp_path / "proj"
    (proj / "movies").mkdir(parents=True)
    (proj / "movies" / "m.tiff").write_bytes(os.urandom(20 << 20))
    with pytest.raises(StagingError, match="%s did not start \\(openssh\\): Permission denied"
                       % c.name):
        stager_for(c).stage_in(str(proj), ["movies"], "proj")


def test_large_outputs_come_back_through_openssh(make_cluster, stager_for, tmp_path):
    c = make_cluster("local", transfer="openssh")
    st = stager_for(c)
    run = "Runs/000009_ProtBig"
    remote_run = os.path.join(c.workdir, "projects", "proj", run)
    os.makedirs(os.path.join(remote_run, "extra"))
    maps = {"extra/map %d.mrc" % i: os.urandom(6 << 20) for i in range(3)}  # 18 MB in all
    for rel, data in maps.items():
        with open(os.path.join(remote_run, rel), "wb") as f:
            f.write(data)
    proj = tmp_path / "proj"
    (proj / run).mkdir(parents=True)
    r = st.gather(str(proj), "proj", run, base={})
    assert st._bulk_chan is not None and st._chan is not None, "control + bulk streams"
    assert r.bytes_sent == 18 << 20
    for rel, data in maps.items():
        assert (proj / run / rel).read_bytes() == data


def test_hash_memo_is_shared_by_processes_writing_at_once(tmp_path):
    """Two protocols stage at once: both write new hashes into the same memo."""
    import sys
    memo = tmp_path / "hashes.sqlite"
    code = ("import os, sys\n"
            "from scipion_cloudexec.remote.hashing import HashCache, sha256_file\n"
            "d = sys.argv[1]; os.makedirs(d)\n"
            "for round in range(30):\n"
            "    paths = []\n"
            "    for i in range(20):\n"
            "        p = os.path.join(d, '%d_%d' % (round, i))\n"
            "        open(p, 'wb').write(os.urandom(100))\n"
            "        paths.append(p)\n"
            "    m = HashCache(sys.argv[2], racy_seconds=-1)  # remember even new files\n"
            "    got = m.get_many([(p, os.stat(p)) for p in paths])\n"
            "    assert got == [sha256_file(p) for p in paths]\n"
            "    m.close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / name), str(memo)],
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    import sqlite3
    with sqlite3.connect(str(memo)) as db:
        assert db.execute("SELECT count(*) FROM hashes").fetchone()[0] == 2 * 30 * 20
