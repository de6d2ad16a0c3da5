"""The sync model between a run folder and its mirror, through the real sshd: what changed on
one side since the last sync goes to the other, deletions and empty folders included; what
changed on both is a conflict, never overwritten; run-folder files in the mirror are private
copies a job may rewrite without touching the shared cache."""
import hashlib
import os
import time
import socket
import stat

import pytest

from scipion_cloudexec.cluster.stager import Stager
from scipion_cloudexec.remote.stage_protocol import ListTree

RUN = "Runs/000010_ProtX"


def mirror(cluster, rel=""):
    return os.path.join(cluster.workdir, "projects", "proj", RUN, rel)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def run_folder(tmp_path):
    proj = tmp_path / "proj"
    extra = proj / RUN / "extra"
    (extra / "empty").mkdir(parents=True)
    (extra / "a.txt").write_bytes(b"a from the desktop\n")
    (extra / "b.txt").write_bytes(b"b from the desktop\n")
    other = proj / "Runs" / "000002_Import" / "extra"
    other.mkdir(parents=True)
    (other / "stack.mrcs").write_bytes(b"particles" * 1000)
    os.symlink("../../000002_Import/extra/stack.mrcs", extra / "input.mrcs")
    return proj


def sync_in(st, proj, base):
    r = st.stage_in(str(proj), [RUN], "proj", run_dir=RUN, base=base)
    base.update(r.agreed)
    for k in [k for k, v in base.items() if not v]:
        del base[k]
    return r


def gather(st, proj, base):
    r = st.gather(str(proj), "proj", RUN, base)
    base.update(r.agreed)
    for k in [k for k, v in base.items() if not v]:
        del base[k]
    return r


def test_changes_travel_both_ways_and_conflicts_are_never_overwritten(
        make_cluster, stager_for, run_folder):  # noqa: F811
    c = make_cluster("local")
    st = stager_for(c)
    proj, base = run_folder, {}
    first = sync_in(st, proj, base)
    assert not first.conflicts
    assert os.path.isdir(mirror(c, "extra/empty")), "empty folders travel"
    a = mirror(c, "extra/a.txt")
    assert os.stat(a).st_nlink == 1 and os.stat(a).st_mode & stat.S_IWUSR, \
        "a private, writable copy: not a hard link into the cache"
    assert os.stat(mirror(c, "extra/input.mrcs")).st_nlink >= 2, \
        "an input linked into the run folder is shared from the cache, not copied"
    # a job on the cluster rewrites a file in place, deletes one, makes folders and a file
    with open(a, "r+b") as f:
        f.write(b"A")
    os.unlink(mirror(c, "extra/b.txt"))
    os.makedirs(mirror(c, "extra/new/empty"))
    with open(mirror(c, "extra/new/c.txt"), "wb") as f:
        f.write(b"c from a job\n")
    obj = os.path.join(c.workdir, "cache", "objects", sha(b"a from the desktop\n")[:2],
                       sha(b"a from the desktop\n"))
    with open(obj, "rb") as f:
        assert f.read() == b"a from the desktop\n", "the cache object is untouched"
    (proj / RUN / "extra" / "d.txt").write_bytes(b"d from a local step\n")
    back = gather(st, proj, base)
    assert not back.conflicts
    extra = proj / RUN / "extra"
    assert (extra / "a.txt").read_bytes() == b"A from the desktop\n"
    assert not (extra / "b.txt").exists(), "what a job deleted is deleted here"
    assert (extra / "new" / "empty").is_dir() and (extra / "new" / "c.txt").exists()
    assert (extra / "d.txt").read_bytes() == b"d from a local step\n", "local change kept"
    up = sync_in(st, proj, base)
    assert up.bytes_sent == len(b"d from a local step\n"), "only the local change travels"
    # both sides change c.txt: neither side is overwritten, the path is named
    (extra / "new" / "c.txt").write_bytes(b"c changed on the desktop\n")
    with open(mirror(c, "extra/new/c.txt"), "wb") as f:
        f.write(b"c changed by a job\n")
    clash = gather(st, proj, base)
    assert [p for p, _why in clash.conflicts] == [RUN + "/extra/new/c.txt"]
    assert (extra / "new" / "c.txt").read_bytes() == b"c changed on the desktop\n"
    clash = sync_in(st, proj, base)
    assert [p for p, _why in clash.conflicts] == [RUN + "/extra/new/c.txt"]
    with open(mirror(c, "extra/new/c.txt"), "rb") as f:
        assert f.read() == b"c changed by a job\n"
    # what a local step deleted is deleted in the mirror before the next job
    (extra / "a.txt").unlink()
    (extra / "empty").rmdir()
    sync_in(st, proj, base)
    assert not os.path.lexists(a) and not os.path.exists(mirror(c, "extra/empty"))


def test_special_files_are_skipped_with_their_kind(make_cluster, stager_for,  # noqa: F811
                                                   run_folder):
    c = make_cluster("local")
    st = stager_for(c)
    base = {}
    sync_in(st, run_folder, base)
    os.mkfifo(mirror(c, "extra/pipe"))  # opening it would hang the listing
    sock = socket.socket(socket.AF_UNIX)
    here = os.getcwd()
    os.chdir(mirror(c, "extra"))  # a socket path must be short
    try:
        sock.bind("sock")
    finally:
        os.chdir(here)
    try:
        with open(mirror(c, "extra/out.txt"), "wb") as f:
            f.write(b"out")
        r = gather(st, run_folder, base)
    finally:
        sock.close()
    assert sorted(r.skipped) == [(RUN + "/extra/pipe", "FIFO"), (RUN + "/extra/sock", "socket")]
    assert (run_folder / RUN / "extra" / "out.txt").read_bytes() == b"out"
    assert not os.path.lexists(run_folder / RUN / "extra" / "pipe")


class WriterDuringSend(Stager):
    """A job still writing: the file grows between the listing and its sending."""

    def _receive(self, remote_root, wanted, report, progress):
        for rel, _dest, _size, _sha in wanted:
            with open(os.path.join(remote_root, rel), "ab") as f:
                f.write(b" and more")
        return super()._receive(remote_root, wanted, report, progress)


def test_a_file_changed_while_sent_waits_for_the_next_gather(make_cluster, stager_for,  # noqa
                                                             run_folder, tmp_path):
    c = make_cluster("local")
    st = stager_for(c)
    base = {}
    sync_in(st, run_folder, base)
    with open(mirror(c, "extra/growing.txt"), "wb") as f:
        f.write(b"half")
    writer = WriterDuringSend(st.ssh, c, hash_cache=str(tmp_path / "h2.sqlite"))
    try:
        r = gather(writer, run_folder, base)
    finally:
        writer.close()
    assert r.deferred == [RUN + "/extra/growing.txt"] and not r.fetched
    assert not (run_folder / RUN / "extra" / "growing.txt").exists(), "never half-written"
    assert RUN + "/extra/growing.txt" not in base
    r = gather(st, run_folder, base)  # the writer's job ended: the next gather brings it
    assert (run_folder / RUN / "extra" / "growing.txt").read_bytes() == b"half and more"
    assert not [n for n in os.listdir(run_folder / RUN / "extra") if n.startswith(".cloudexec")]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_desktop_disk_full_during_a_gather_loses_nothing(make_cluster, stager_for,  # noqa
                                                         tmp_path, reliability):
    import subprocess
    from scipion_cloudexec.cluster.stager import DesktopFull
    c = make_cluster("local")
    st = stager_for(c)
    proj = tmp_path / "proj"
    proj.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(proj)], check=True)
    try:
        (proj / RUN / "extra").mkdir(parents=True)
        base = {}
        sync_in(st, proj, base)
        outputs = {"extra/a.mrc": os.urandom(1 << 20), "extra/b.mrc": os.urandom(5 << 20)}
        for rel, data in outputs.items():
            with open(mirror(c, rel), "wb") as f:
                f.write(data)
        with pytest.raises(DesktopFull, match="no space left on the desktop.*Continue"):
            gather(st, proj, base)
        names = os.listdir(proj / RUN / "extra")
        assert not [n for n in names if n.startswith(".cloudexec")], "no partial file left"
        assert RUN + "/extra/b.mrc" not in base and "b.mrc" not in names
        with open(mirror(c, "extra/b.mrc"), "rb") as f:
            assert f.read() == outputs["extra/b.mrc"], "the cluster keeps the output"
        subprocess.run(["mount", "-o", "remount,size=16m", str(proj)], check=True)
        t0 = time.monotonic()
        gather(st, proj, base)  # space freed: the next gather brings everything
        for rel, data in outputs.items():
            assert (proj / RUN / rel).read_bytes() == data
        reliability(fault="desktop disk full (4 MB tmpfs)", when="mid-gather",
                    seen="DesktopFull: 'no space left on the desktop ... Continue'; no partial "
                    "file left, the cluster keeps the output", recover_s="the next gather "
                    "after space is freed: %.2f s" % (time.monotonic() - t0), lost=0, twice=0)
    finally:
        subprocess.run(["umount", "-l", str(proj)], check=False)


def test_long_work_on_the_cluster_is_not_taken_for_a_dead_link(make_cluster, stager_for,  # noqa
                                                               monkeypatch):
    """Hashing a large new output takes the cluster longer than the dead-link timer: keep-
    alive lines from the staging server tell the client the link is up."""
    import time
    from scipion_cloudexec.cluster import channels
    monkeypatch.setattr(channels, "dead_link_seconds", lambda cluster: 1.5)
    c = make_cluster("local", transfer="paramiko")
    st = stager_for(c)
    os.makedirs(mirror(c, "extra"))
    with open(mirror(c, "extra/big.mrc"), "wb") as f:
        f.truncate(3 << 29)  # 1.5 GB, sparse: hashing it takes a few seconds here
    t0 = time.monotonic()
    _ch, listing = st._ask(ListTree(root=st.mirror_root("proj"), dir=RUN))
    took = time.monotonic() - t0
    zeros = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(3 << 9):
        zeros.update(block)
    assert listing["files"] == [[RUN + "/extra/big.mrc", 3 << 29, listing["files"][0][2],
                                 zeros.hexdigest()]]
    assert took > 1.5, "the test means something only if the work outlasts the timer"


def test_a_stage_in_never_sends_another_clusters_gather_in_progress(make_cluster, stager_for,  # noqa
                                                                     run_folder):
    """Two clusters share one run folder: a gather from c1 writes each file to a temporary
    ``.cloudexec-*`` file beside it, then renames it. A stage-in to c2 walking the folder
    meanwhile must not send such a file, nor take its disappearance for a lost link (the
    soak found both: c2 was declared lost and its jobs ran twice)."""
    import threading
    c1, c2 = make_cluster("local"), make_cluster("local")
    st1, st2 = stager_for(c1), stager_for(c2)
    proj, base1, base2 = run_folder, {}, {}
    sync_in(st1, proj, base1)
    (proj / RUN / "extra" / ".cloudexec-inflight").write_bytes(b"half a gathered file")
    sync_in(st2, proj, base2)
    assert not os.path.exists(mirror(c2, "extra/.cloudexec-inflight"))
    assert not any(".cloudexec-" in k for k in base2)
    os.unlink(proj / RUN / "extra" / ".cloudexec-inflight")
    # the race itself: c1's jobs keep writing outputs that are gathered while c2 stages in
    errors, stop = [], threading.Event()

    def gathers():
        try:
            for i in range(60):
                for j in range(20):
                    with open(mirror(c1, "extra/out_%d_%d.txt" % (i, j)), "wb") as f:
                        f.write(b"output %d %d\n" % (i, j) * 200)
                gather(st1, proj, base1)
        except Exception as e:  # noqa: BLE001  (reported by the test)
            errors.append(e)
        finally:
            stop.set()
    t = threading.Thread(target=gathers)
    t.start()
    rounds = 0
    try:
        while not stop.is_set():
            sync_in(st2, proj, base2)
            rounds += 1
    finally:
        t.join()
    assert not errors, errors
    sent = [n for n in os.listdir(mirror(c2, "extra")) if n.startswith(".cloudexec-")]
    assert not sent, sent
    assert rounds > 1
