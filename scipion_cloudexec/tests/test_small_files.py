"""Many small files over several OpenSSH streams at once (issue 13), on the test bed's real
sshd with real bytes: identical arrival, a cut in the middle (the next staging sends only
what is missing, nothing wrong is published), a file changing while sent, checks in flight
when the cluster lacks the bundle, and the fallback to paramiko in ``auto`` mode."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from scipion_cloudexec.cluster import batches, bundle, local_files, stager as stager_mod
from scipion_cloudexec.cluster.stager import StagingError
from scipion_cloudexec.testbed.link import Link

from .test_staging import _fake_ssh


@pytest.fixture(autouse=True)
def small_requests(monkeypatch):
    """Streams from 1 MB of new content, 8 files per request, a first batch of 16 files:
    many requests (and checks) from a few MB of test data."""
    monkeypatch.setattr(batches, "START_AT", 1 << 20)
    monkeypatch.setattr(batches, "SUB_FILES", 8)
    monkeypatch.setattr(local_files, "FIRST_BATCH", 16)
    monkeypatch.setattr(local_files, "BATCH", 64)


def _project(tmp_path, n=240, size=20_000):
    """*n* files of about *size* bytes (distinct contents, one empty) in nested folders."""
    proj = tmp_path / "proj"
    data = {}
    for i in range(n):
        rel = "mics/%02d/mic_%04d.mrc" % (i % 7, i)
        content = b"" if i == 5 else os.urandom(size + i)
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_bytes(content)
        data[rel] = content
    return proj, data


def _mirror(c, rel):
    return os.path.join(c.workdir, "projects", "proj", rel)


def _objects(c):
    """{sha: content} of every object in the cluster's cache."""
    out = {}
    for dirpath, _dirs, names in os.walk(os.path.join(c.workdir, "cache", "objects")):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[name] = f.read()
    return out


def _nothing_wrong(c, data):
    """Every cache object holds the content its name says; every mirror file present
    holds its local file's bytes."""
    for sha, content in _objects(c).items():
        assert hashlib.sha256(content).hexdigest() == sha
    for rel, content in data.items():
        if os.path.exists(_mirror(c, rel)):
            with open(_mirror(c, rel), "rb") as f:
                assert f.read() == content, rel


def _servers_gone(c, timeout=30.0):
    """Wait until no staging server of *c* runs on the cluster (one still reading what
    reached it before a cut may publish a file after the client saw the error)."""
    key = ("--workdir\0%s\0" % c.workdir).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if key in f.read() + b"\0":
                        alive.append(pid)
            except OSError:
                continue
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError("staging servers of %s still running: %s" % (c.workdir, alive))


def _all_there(c, data):
    for rel, content in data.items():
        with open(_mirror(c, rel), "rb") as f:
            assert f.read() == content, rel


def _streams_seen(monkeypatch):
    """The stream indexes that served requests, as the uploader's workers report them."""
    seen = set()
    serve = batches.BatchUploader._serve

    def counting(self, i, *rest):
        seen.add(i)
        return serve(self, i, *rest)
    monkeypatch.setattr(batches.BatchUploader, "_serve", counting)
    return seen


def test_many_small_files_over_several_streams_arrive_identical(make_cluster, tmp_path,
                                                                 stager_for, monkeypatch):
    c = make_cluster("local", streams="3", transfer="openssh")
    proj, data = _project(tmp_path)
    seen = _streams_seen(monkeypatch)
    r = stager_for(c).stage_in(str(proj), ["mics"], "proj")
    _all_there(c, data)
    assert r.files == len(data) and r.linked == len(data)
    assert r.bytes_sent == sum(map(len, data.values())), "each file sent once"
    assert len(seen) >= 2, "requests went over several streams: %s" % seen
    again = stager_for(c).stage_in(str(proj), ["mics"], "proj")
    assert again.bytes_sent == 0 and again.unchanged == len(data)


@pytest.mark.parametrize("fault", ["one stream killed", "link reset"])
def test_a_cut_in_the_middle_then_staging_again_sends_only_what_is_missing(
        make_cluster, tmp_path, stager_for, fault):
    c = make_cluster("local", streams="3", transfer="openssh")
    proj, data = _project(tmp_path, n=300, size=30_000)
    total = sum(map(len, data.values()))
    with Link((c.host, c.port), delay_ms=2, rate_mbit=200) as link:
        far = link.cluster(c)
        st = stager_for(far)
        send, sent = st._send_file, [0]

        def cut(ch, local, size, offset, tick):
            sent[0] += size - offset
            if sent[0] >= total // 3 and fault == "one stream killed":
                ch.proc.kill()  # the stream carrying this file; the others go on
            return send(ch, local, size, offset, tick)
        st._send_file = cut
        if fault == "link reset":
            link.reset_after(total // 3)
        # a stream still logging in when the link is cut did not start: said so
        with pytest.raises(StagingError, match="lost|stopped|did not start") as err:
            st.stage_in(str(proj), ["mics"], "proj")
        assert c.name in str(err.value)
        st.close()
        _servers_gone(c)
        _nothing_wrong(c, data)
        have = _objects(c)
        missing = sum(len(v) for v in data.values()
                      if hashlib.sha256(v).hexdigest() not in have)
        assert 0 < missing < total, "cut in the middle: %d of %d bytes missing" % (
            missing, total)
        r = stager_for(far).stage_in(str(proj), ["mics"], "proj")
    assert r.bytes_sent == missing, "only what had not arrived is sent again"
    _all_there(c, data)


def test_a_file_changing_while_sent_over_the_streams_is_not_linked(make_cluster, tmp_path,
                                                                   stager_for):
    c = make_cluster("local", streams="3", transfer="openssh")
    proj, data = _project(tmp_path, n=80)
    victim = "mics/03/mic_0010.mrc"
    st = stager_for(c)
    send = st._send_file

    def changing(ch, local, size, offset, tick):
        if local.endswith(victim):  # the microscope rewrites it while it is read
            with open(local, "r+b") as f:
                f.write(b"new!")
        return send(ch, local, size, offset, tick)
    st._send_file = changing
    with pytest.raises(StagingError, match="mic_0010.mrc changed during the upload"):
        st.stage_in(str(proj), ["mics"], "proj")
    assert not os.path.exists(_mirror(c, victim))
    _nothing_wrong(c, data)
    rest = {k: v for k, v in data.items() if k != victim}
    _all_there(c, rest)
    r = stager_for(c).stage_in(str(proj), ["mics"], "proj")
    assert r.bytes_sent == len(data[victim]) and r.linked == 1
    with open(_mirror(c, victim), "rb") as f:
        assert f.read() == (proj / victim).read_bytes()


@pytest.mark.parametrize("transfer", ["paramiko", "openssh"])
def test_checks_in_flight_are_sent_again_once_the_missing_bundle_is_uploaded(
        make_cluster, tmp_path, stager_for, monkeypatch, transfer):
    monkeypatch.setattr(local_files, "FIRST_BATCH", 2)  # several checks before the answer
    c = make_cluster("local", transfer=transfer)
    assert not os.path.exists(bundle.remote_path(c)), "a new cluster: no bundle yet"
    # with openssh, 1.8 MB of new content: the streams start (and exit) before the upload
    proj, data = _project(tmp_path, n=60, size=2_000 if transfer == "paramiko" else 30_000)
    sent = []
    check = stager_mod.Stager._check_request
    monkeypatch.setattr(stager_mod.Stager, "_check_request",
                        lambda self, p, b: sent.append(b) or check(self, p, b))
    r = stager_for(c).stage_in(str(proj), ["mics"], "proj")
    _all_there(c, data)
    assert r.files == len(data) and r.bytes_sent == sum(map(len, data.values()))
    assert len(sent) > len({id(b) for b in sent}) > 1, "checks in flight were sent again"


def test_auto_falls_back_to_paramiko_for_small_files_when_ssh_cannot_log_in(
        make_cluster, tmp_path, stager_for, monkeypatch, caplog):
    monkeypatch.setenv("PATH", _fake_ssh(tmp_path / "bin", "Permission denied (publickey)")
                       + os.pathsep + os.environ["PATH"])
    c = make_cluster("local", transfer="auto")
    proj, data = _project(tmp_path, n=120)
    r = stager_for(c).stage_in(str(proj), ["mics"], "proj")
    _all_there(c, data)
    assert r.bytes_sent == sum(map(len, data.values()))
    assert "OpenSSH transfers to %s unavailable, using paramiko" % c.name in caplog.text
    assert "Permission denied" in caplog.text


def test_small_and_large_files_in_one_staging_all_arrive(make_cluster, tmp_path, stager_for,
                                                         monkeypatch):
    """Large files go in chunks over the same streams once the small files' requests are
    answered; then the small ones go on."""
    from scipion_cloudexec.cluster import streams
    monkeypatch.setattr(streams, "CHUNK", 2 << 20)
    monkeypatch.setattr(streams, "CHUNKED_MIN", 4 << 20)
    monkeypatch.setattr(local_files, "BATCH_BYTES", 6 << 20)  # a transfer between batches
    c = make_cluster("local", streams="3", transfer="openssh")
    proj, data = _project(tmp_path, n=150)
    for i in (1, 2):
        big = os.urandom((5 << 20) + i)
        (proj / "mics" / ("big%d.mrcs" % i)).write_bytes(big)
        data["mics/big%d.mrcs" % i] = big
    r = stager_for(c).stage_in(str(proj), ["mics"], "proj")
    _all_there(c, data)
    assert r.bytes_sent == sum(map(len, data.values())) and r.linked == len(data)


def test_a_run_folder_synced_over_the_streams_gets_private_copies(make_cluster, tmp_path,
                                                                  stager_for):
    c = make_cluster("local", streams="3", transfer="openssh")
    proj, data = _project(tmp_path, n=100)
    r = stager_for(c).stage_in(str(proj), ["mics"], "proj", run_dir="mics", base={})
    _all_there(c, data)
    for rel in data:
        st = os.stat(_mirror(c, rel))
        assert st.st_nlink == 1 and st.st_mode & 0o200, "a private, writable copy: %s" % rel
    assert {k: v for k, v in r.agreed.items() if k in data} == {
        rel: hashlib.sha256(content).hexdigest() for rel, content in data.items()}
    assert not r.conflicts


def test_a_file_cut_mid_way_on_a_stream_resumes_from_what_arrived(make_cluster, tmp_path,
                                                                   stager_for):
    """A file under the chunked size but over the cluster's in-memory size goes whole in a
    request; cut in its middle, the next staging sends only its rest."""
    c = make_cluster("local", streams="2", transfer="openssh")
    proj, data = _project(tmp_path, n=40)
    movie = os.urandom(12 << 20)
    (proj / "mics" / "movie.tiff").write_bytes(movie)
    data["mics/movie.tiff"] = movie
    st = stager_for(c)
    send = st._send_file

    def cut(ch, local, size, offset, tick):
        def counted(n):
            tick(n)
            counted.done += n
            if local.endswith("movie.tiff") and counted.done >= 5 << 20:
                ch.proc.kill()  # the stream dies with 5 MB of the movie sent
        counted.done = 0
        return send(ch, local, size, offset, counted)
    st._send_file = cut
    with pytest.raises(StagingError, match="lost|stopped"):
        st.stage_in(str(proj), ["mics"], "proj")
    st.close()
    _servers_gone(c)
    _nothing_wrong(c, data)
    partial = os.path.join(c.workdir, "cache", "partial", hashlib.sha256(movie).hexdigest())
    arrived = os.path.getsize(partial)
    assert 0 < arrived < len(movie), "part of the movie arrived and is kept for resume"
    have = _objects(c)
    others = sum(len(v) for k, v in data.items()
                 if k != "mics/movie.tiff" and hashlib.sha256(v).hexdigest() not in have)
    r = stager_for(c).stage_in(str(proj), ["mics"], "proj")
    _all_there(c, data)
    assert r.bytes_sent == len(movie) - arrived + others, "the movie resumed where it was cut"
