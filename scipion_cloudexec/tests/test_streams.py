"""Large files in chunks over parallel OpenSSH streams (issue 13), on the test bed's real
sshd with real bytes: identical arrival, per-chunk resume after a cut link, and a corrupted
chunk caught by the whole-file hash before anything enters the cache."""
from __future__ import annotations

import hashlib
import os

import pytest

from scipion_cloudexec.cluster import streams
from scipion_cloudexec.cluster.stager import Stager, StagingError
from scipion_cloudexec.testbed.link import Link

MB = 1 << 20


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """2 MB chunks for files from 4 MB: many chunks from a few MB of test data."""
    monkeypatch.setattr(streams, "CHUNK", 2 * MB)
    monkeypatch.setattr(streams, "CHUNKED_MIN", 4 * MB)
    monkeypatch.setattr(streams, "INTERVAL", 0.3)


def _project(tmp_path, size):
    proj = tmp_path / "proj"
    (proj / "movies").mkdir(parents=True)
    big = os.urandom(size)
    (proj / "movies" / "big.mrcs").write_bytes(big)
    (proj / "movies" / "small.star").write_bytes(b"data_\n" * 100)
    return proj, big


def _mirrored(c, rel):
    with open(os.path.join(c.workdir, "projects", "proj", rel), "rb") as f:
        return f.read()


def _object(c, data):
    sha = hashlib.sha256(data).hexdigest()
    return os.path.join(c.workdir, "cache", "objects", sha[:2], sha)


@pytest.mark.parametrize("n", ["4", "7"])
def test_multi_chunk_upload_over_n_streams_arrives_identical(make_cluster, tmp_path, stager_for, n):
    c = make_cluster("local", streams=n, transfer="openssh")
    proj, big = _project(tmp_path, 21 * MB + 12345)  # 11 chunks, the last one short
    st = stager_for(c)
    r = st.stage_in(str(proj), ["movies"], "proj")
    assert st.streams_used == int(n)
    assert _mirrored(c, "movies/big.mrcs") == big
    assert _mirrored(c, "movies/small.star") == b"data_\n" * 100
    assert r.bytes_sent == len(big) + 600
    assert os.listdir(os.path.join(c.workdir, "cache", "chunks")) == []  # published, no leftovers
    again = stager_for(c).stage_in(str(proj), ["movies"], "proj")
    assert again.bytes_sent == 0 and again.unchanged == 2


def test_auto_starts_at_four_streams_and_adds_while_throughput_grows(make_cluster, tmp_path,
                                                                     stager_for):
    c = make_cluster("local", transfer="openssh")  # streams = auto
    proj, big = _project(tmp_path, 60 * MB)
    st = stager_for(c)
    st.stage_in(str(proj), ["movies"], "proj")
    assert streams.START <= st.streams_used <= streams.CAP
    assert _mirrored(c, "movies/big.mrcs") == big


@pytest.mark.slow
def test_link_reset_mid_transfer_then_staging_again_resends_only_missing_chunks(
        make_cluster, tmp_path, stager_for):
    c = make_cluster("local", streams="4", transfer="openssh")
    proj, big = _project(tmp_path, 40 * MB)
    with Link((c.host, c.port), delay_ms=10, rate_mbit=400) as link:
        far = link.cluster(c)
        link.reset_after(16 * MB)
        with pytest.raises(StagingError, match="lost|stopped") as err:
            stager_for(far).stage_in(str(proj), ["movies"], "proj")
        assert c.name in str(err.value)
        assert link.stats()["resets"] >= 1
        done = [n for n in os.listdir(os.path.join(c.workdir, "cache", "chunks"))
                if n.endswith(".done")]
        assert done, "chunks written whole before the cut are recorded"
        r = stager_for(far).stage_in(str(proj), ["movies"], "proj")
    assert 0 < r.bytes_sent < len(big), "resumed per chunk: %d bytes sent again" % r.bytes_sent
    assert _mirrored(c, "movies/big.mrcs") == big


def test_with_paramiko_as_the_carrier_chunks_go_over_several_channels_both_ways(
        make_cluster, tmp_path, stager_for):
    """transfer = paramiko (no OpenSSH client on the desktop): the chunks travel over
    several exec channels of the one paramiko connection, each with its own window; a cut
    upload and a cut download resume per chunk as with OpenSSH. Before: one channel."""
    c = make_cluster("local", streams="4", transfer="paramiko")
    proj, big = _project(tmp_path, 30 * MB)
    with Link((c.host, c.port), delay_ms=10, rate_mbit=400) as link:
        far = link.cluster(c)
        link.reset_after(12 * MB)
        with pytest.raises(StagingError, match="lost|stopped|ended|did not start"):
            stager_for(far).stage_in(str(proj), ["movies"], "proj")
        st = stager_for(far)
        r = st.stage_in(str(proj), ["movies"], "proj")
        assert 0 < r.bytes_sent < len(big), "resumed per chunk: %d bytes again" % r.bytes_sent
        assert st.streams_used == 4
        assert _mirrored(c, "movies/big.mrcs") == big
        back = tmp_path / "back"
        link.reset_after(12 * MB, direction="down")
        with pytest.raises(StagingError, match="lost|stopped|ended|did not start"):
            stager_for(far).fetch("projects/proj/movies/big.mrcs", str(back))
        st = stager_for(far)
        r = st.fetch("projects/proj/movies/big.mrcs", str(back))
    assert 0 < r.bytes_sent < len(big), "resumed per chunk: %d bytes again" % r.bytes_sent
    assert st.streams_used == 4
    assert (back / "big.mrcs").read_bytes() == big
    assert os.listdir(back) == ["big.mrcs"]
    assert st._bulk_refused, "paramiko only: no OpenSSH stream was started"


def test_a_corrupted_chunk_is_caught_by_the_whole_file_hash_and_not_published(
        make_cluster, tmp_path, stager_for):
    c = make_cluster("local", streams="4", transfer="openssh")
    proj, big = _project(tmp_path, 9 * MB)
    st = stager_for(c)

    def corrupting(ch, local, end, start, tick):
        if start == streams.CHUNK:  # chunk 1: one byte flipped on the way
            with open(local, "rb") as f:
                f.seek(start)
                data = bytearray(f.read(end - start))
            data[1000] ^= 0xFF
            ch.sendall(bytes(data))
            tick(len(data))
        else:
            Stager._send_file(ch, local, end, start, tick)

    st._send_file = corrupting  # the uploader sends the chunks with it
    with pytest.raises(StagingError, match="corrupted"):
        st.stage_in(str(proj), ["movies"], "proj")
    assert not os.path.exists(_object(c, big))
    assert not os.path.exists(os.path.join(c.workdir, "projects", "proj", "movies",
                                           "big.mrcs"))
    assert _mirrored(c, "movies/small.star") == b"data_\n" * 100
    r = stager_for(c).stage_in(str(proj), ["movies"], "proj")
    assert r.bytes_sent == len(big)  # the bad chunks were dropped: all sent again
    assert _mirrored(c, "movies/big.mrcs") == big
    assert os.path.exists(_object(c, big))


@pytest.mark.parametrize("n", ["4", "auto"])
def test_a_large_file_fetched_over_n_streams_arrives_identical(make_cluster, tmp_path, stager_for,
                                                               n):
    c = make_cluster("local", streams=n, transfer="openssh")
    out = os.path.join(c.workdir, "projects", "proj", "Runs", "000002_X")
    os.makedirs(out)
    big = os.urandom(19 * MB + 333)  # 10 chunks, the last one short
    with open(os.path.join(out, "big.mrcs"), "wb") as f:
        f.write(big)
    with open(os.path.join(out, "small.star"), "wb") as f:
        f.write(b"data_\n")
    st = stager_for(c)
    dest = tmp_path / "back"
    r = st.fetch("projects/proj/Runs/000002_X", str(dest))
    assert (dest / "000002_X" / "big.mrcs").read_bytes() == big
    assert (dest / "000002_X" / "small.star").read_bytes() == b"data_\n"
    assert sorted(r.fetched) == ["000002_X/big.mrcs", "000002_X/small.star"]
    assert st.streams_used >= 4
    assert not [p for p in os.listdir(dest / "000002_X") if p.startswith(".")], "no temporaries"


def test_a_cut_download_resumes_with_the_chunks_it_lacks(make_cluster, tmp_path, stager_for):
    """A link reset mid-download leaves the partial file and its record of whole chunks
    (hidden names, never walked); the next fetch asks only for the others, and the file
    lands identical with nothing else left beside it. Before: fetched again from byte 0."""
    c = make_cluster("local", streams="4", transfer="openssh")
    out = os.path.join(c.workdir, "data")
    os.makedirs(out)
    big = os.urandom(40 * MB + 77)
    with open(os.path.join(out, "big.mrcs"), "wb") as f:
        f.write(big)
    back = tmp_path / "back"
    with Link((c.host, c.port), delay_ms=10, rate_mbit=400) as link:
        far = link.cluster(c)
        link.reset_after(16 * MB, direction="down")
        with pytest.raises(StagingError, match="lost|stopped|ended|did not start"):
            stager_for(far).fetch("data/big.mrcs", str(back))
        assert link.stats()["resets"] >= 1
        assert not (back / "big.mrcs").exists()
        left = sorted(os.listdir(back))
        assert len(left) == 2 and left[1] == left[0] + ".chunks", left
        assert left[0].startswith(".cloudexec-part-")
        r = stager_for(far).fetch("data/big.mrcs", str(back))
    assert 0 < r.bytes_sent < len(big) - 8 * MB, "resumed: %d bytes again" % r.bytes_sent
    assert (back / "big.mrcs").read_bytes() == big
    assert os.listdir(back) == ["big.mrcs"], "the partial file and its record are gone"


def test_a_partial_download_whose_record_lies_is_fetched_again_whole(make_cluster, tmp_path,
                                                                     stager_for):
    """The whole-file hash decides: chunks recorded whole but holding other bytes (a crash
    between write-back and record, a damaged disk) cost one full fetch, never a file."""
    from scipion_cloudexec.cluster import gather
    c = make_cluster("local", streams="4", transfer="openssh")
    out = os.path.join(c.workdir, "data")
    os.makedirs(out)
    big = os.urandom(9 * MB)
    with open(os.path.join(out, "big.mrcs"), "wb") as f:
        f.write(big)
    back = tmp_path / "back"
    back.mkdir()
    part = gather._part_path(str(back / "big.mrcs"), hashlib.sha256(big).hexdigest())
    with open(part, "wb") as f:
        f.write(b"\0" * len(big))  # every chunk "done", every byte wrong
    with open(part + ".chunks", "w") as f:
        f.write("chunk %d\n0\n1\n2\n3\n4\n" % streams.CHUNK)
    with pytest.raises(StagingError, match="corrupted"):
        stager_for(c).fetch("data/big.mrcs", str(back))
    assert os.listdir(back) == [], "the lying partial is dropped"
    r = stager_for(c).fetch("data/big.mrcs", str(back))
    assert r.bytes_sent == len(big)
    assert (back / "big.mrcs").read_bytes() == big


def test_a_fetched_file_not_matching_the_listing_is_not_kept(make_cluster, tmp_path, stager_for,
                                                            monkeypatch):
    c = make_cluster("local", streams="4", transfer="openssh")
    out = os.path.join(c.workdir, "data")
    os.makedirs(out)
    with open(os.path.join(out, "big.mrcs"), "wb") as f:
        f.write(os.urandom(9 * MB))
    st = stager_for(c)
    real = streams.StreamPool.download

    def flipping(self, remote_root, files, tick, **kw):
        real(self, remote_root, files, tick, **kw)
        with open(files[0][1], "r+b") as f:  # one byte changed after arrival
            f.seek(5)
            b = f.read(1)
            f.seek(5)
            f.write(bytes([b[0] ^ 1]))
    monkeypatch.setattr(streams.StreamPool, "download", flipping)
    with pytest.raises(StagingError, match="corrupted"):
        st.fetch("data/big.mrcs", str(tmp_path / "back"))
    assert os.listdir(tmp_path / "back") == [], "no partial of a corrupted file is kept"


def _movies(tmp_path, n, size):
    """*n* large files of distinct contents, a copy of the first at another path, and a
    few small files."""
    proj = tmp_path / "proj"
    (proj / "movies").mkdir(parents=True)
    data = {}
    for i in range(n):
        data["movies/m%d.mrcs" % i] = os.urandom(size + i * 1000)
    data["movies/copy_of_m0.mrcs"] = data["movies/m0.mrcs"]
    for i in range(5):
        data["movies/m%d.star" % i] = b"data_\n" * (100 + i)
    for rel, content in data.items():
        (proj / rel).write_bytes(content)
    return proj, data


def _unique_bytes(data):
    return sum(len(v) for v in {hashlib.sha256(v).hexdigest(): v for v in data.values()}.values())


def _cache_sound(c):
    """Every object in the cluster's cache holds the content its name says."""
    from .test_small_files import _objects
    for sha, content in _objects(c).items():
        assert hashlib.sha256(content).hexdigest() == sha


def test_many_large_files_keep_every_stream_busy_across_file_ends(make_cluster, tmp_path,
                                                                  stager_for, monkeypatch):
    """A stream that is free at the end of one file takes the next file's chunks while the
    first one's last chunks travel and the cluster hashes it: no pause per file. Content at
    two paths travels once; everything arrives identical."""
    from scipion_cloudexec.cluster import batches, channels, local_files
    from scipion_cloudexec.cluster import stager as stager_mod
    monkeypatch.setattr(batches, "START_AT", 1 * MB)  # the uploader runs from the walk
    monkeypatch.setattr(local_files, "FIRST_BATCH_BYTES", 1 * MB)  # a check per large file
    monkeypatch.setattr(local_files, "BATCH_BYTES", 1 * MB)
    monkeypatch.setattr(stager_mod, "BATCH_BYTES", 4 * MB)  # and a transfer per large file
    c = make_cluster("local", streams="3", transfer="openssh")
    proj, data = _movies(tmp_path, 6, 5 * MB)  # 3 chunks each
    order = {hashlib.sha256(v).hexdigest(): rel for rel, v in data.items()}
    sent, send = [], channels.ServerChannel.send

    def recording(self, request):
        if type(request).__name__ in ("Chunk", "Publish"):
            sent.append((type(request).__name__, order[request.sha256]))
        return send(self, request)
    monkeypatch.setattr(channels.ServerChannel, "send", recording)
    with Link((c.host, c.port), delay_ms=1, rate_mbit=300) as link:  # the walk runs ahead
        r = stager_for(link.cluster(c)).stage_in(str(proj), ["movies"], "proj")
    for rel, content in data.items():
        assert _mirrored(c, rel) == content, rel
    assert r.bytes_sent == _unique_bytes(data), "the copy of m0 travelled once"
    assert r.linked == len(data)
    assert os.listdir(os.path.join(c.workdir, "cache", "chunks")) == []
    assert sum(kind == "Publish" for kind, _f in sent) == 6
    # a pause: a chunk sent once every file begun before it was published
    pauses = [n for n, (kind, _f) in enumerate(sent) if kind == "Chunk" and n and
              {f for _k, f in sent[:n]} == {f for k, f in sent[:n] if k == "Publish"}]
    assert not pauses, "the streams waited for a publish at %s: %s" % (pauses, sent)


def test_a_cut_with_chunks_of_several_files_in_flight_resumes_each_file(make_cluster,
                                                                        tmp_path, stager_for,
                                                                        monkeypatch):
    from scipion_cloudexec.cluster import batches
    monkeypatch.setattr(batches, "START_AT", 1 * MB)
    c = make_cluster("local", streams="3", transfer="openssh")
    proj, data = _movies(tmp_path, 4, 5 * MB)
    total = _unique_bytes(data)
    with Link((c.host, c.port), delay_ms=2, rate_mbit=400) as link:
        far = link.cluster(c)
        link.reset_after(total // 2)
        with pytest.raises(StagingError, match="lost|stopped|did not start") as err:
            stager_for(far).stage_in(str(proj), ["movies"], "proj")
        assert c.name in str(err.value)
        _cache_sound(c)
        r = stager_for(far).stage_in(str(proj), ["movies"], "proj")
    assert 0 < r.bytes_sent < total, "resumed: %d of %d bytes sent again" % (r.bytes_sent,
                                                                            total)
    for rel, content in data.items():
        assert _mirrored(c, rel) == content, rel
    _cache_sound(c)
    assert os.listdir(os.path.join(c.workdir, "cache", "chunks")) == []


def test_auto_sends_large_files_over_paramiko_channels_when_ssh_cannot_log_in(
        make_cluster, tmp_path, stager_for, monkeypatch, caplog):
    from scipion_cloudexec.cluster import batches

    from .test_staging import _fake_ssh
    monkeypatch.setattr(batches, "START_AT", 1 * MB)
    monkeypatch.setenv("PATH", _fake_ssh(tmp_path / "bin", "Permission denied (publickey)")
                       + os.pathsep + os.environ["PATH"])
    c = make_cluster("local", transfer="auto")
    proj, data = _movies(tmp_path, 3, 5 * MB)
    st = stager_for(c)
    r = st.stage_in(str(proj), ["movies"], "proj")
    for rel, content in data.items():
        assert _mirrored(c, rel) == content, rel
    assert r.bytes_sent == _unique_bytes(data)
    assert "OpenSSH transfers to %s unavailable, using paramiko" % c.name in caplog.text
    assert st._bulk_refused


def test_a_stream_cut_during_its_first_chunk_is_a_lost_link_not_a_refused_login(
        make_cluster, tmp_path, stager_for, monkeypatch, caplog):
    """transfer = auto: OpenSSH that cannot log in at all falls back to paramiko; a stream
    that logged in and broke mid-chunk is a cut link (stage again: only what is missing
    goes), not a reason to give up OpenSSH."""
    from scipion_cloudexec.cluster import batches, channels
    monkeypatch.setattr(batches, "START_AT", 1 * MB)
    c = make_cluster("local", streams="3", transfer="auto")
    proj = tmp_path / "proj"
    (proj / "movies").mkdir(parents=True)
    data = {"movies/m%d.mrcs" % i: os.urandom(5 * MB + i) for i in range(2)}
    for rel, content in data.items():
        (proj / rel).write_bytes(content)
    st = stager_for(c)
    first, send_request = {}, channels.ServerChannel.send

    def recording(self, request):
        if type(request).__name__ != "Hello":
            first.setdefault(self, type(request).__name__)
        return send_request(self, request)
    monkeypatch.setattr(channels.ServerChannel, "send", recording)
    send, killed, seen = st._send_file, [], set()

    def cut(ch, local, size, offset, tick):
        # the bytes of a stream whose first request is this chunk, once another stream
        # sent some: before, its server had not been heard from yet
        if not killed and first.get(ch) == "Chunk" and seen - {ch}:
            killed.append(ch)
            ch.proc.kill()
            ch.proc.wait()
        seen.add(ch)
        return send(ch, local, size, offset, tick)
    st._send_file = cut
    with pytest.raises(StagingError, match="lost|stopped") as err:
        st.stage_in(str(proj), ["movies"], "proj")
    assert c.name in str(err.value) and killed
    assert "unavailable, using paramiko" not in caplog.text
    assert not st._bulk_refused
    r = stager_for(c).stage_in(str(proj), ["movies"], "proj")
    assert r.bytes_sent < _unique_bytes(data), "what arrived before the cut is kept"
    for rel, content in data.items():
        assert _mirrored(c, rel) == content, rel


def test_a_large_file_removed_while_staged_is_named(make_cluster, tmp_path, stager_for,
                                                    monkeypatch):
    from scipion_cloudexec.cluster import batches
    monkeypatch.setattr(batches, "START_AT", 1 * MB)
    c = make_cluster("local", streams="3", transfer="openssh")
    proj, data = _movies(tmp_path, 4, 5 * MB)
    st = stager_for(c)
    send, gone = st._send_file, proj / "movies" / "m3.mrcs"

    def removing(ch, local, size, offset, tick):
        if gone.exists() and local != str(gone):
            gone.unlink()  # after the walk hashed it, before its chunks are read
        return send(ch, local, size, offset, tick)
    st._send_file = removing
    with pytest.raises(StagingError, match="went away") as err:
        st.stage_in(str(proj), ["movies"], "proj")
    assert "m3.mrcs" in str(err.value) and c.name in str(err.value)
    _cache_sound(c)
