"""Stage-ins that look only at what changed in the local run folder, learnt from inotify
(issue 13), through the real sshd and a real ClusterRunner: every local change still
reaches the cluster (written by this Python between two runJobs, through ``mmap`` without
a write event, deleted, a folder replaced by a file, a new tree), and whenever the watch
cannot vouch for the run folder (events lost, a link to a folder) a full walk does it."""
import hashlib
import mmap
import os
import sys

import pytest

from scipion_cloudexec.cluster.watch import RunFolderWatch
from scipion_cloudexec.tests.test_step_overhead import _runner

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify: Linux")


def say(_s):
    pass


class Walks:
    """Counts the full walks of the runner's stager (the watch's changes are no walk)."""

    def __init__(self, runner):
        self.n = 0
        st = runner.session.stager
        real = st.walk

        def walk(*a, **k):
            self.n += 1
            return real(*a, **k)
        st.walk = walk


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_local_changes_between_run_jobs_reach_the_cluster_without_a_walk(make_cluster,
                                                                        tmp_path):
    c, runner, run_dir, mirror = _runner(make_cluster, tmp_path)
    try:
        extra = run_dir / "extra"
        (extra / "gone.txt").write_bytes(b"to be deleted")
        (extra / "folder").mkdir()
        (extra / "folder" / "inside.txt").write_bytes(b"inside")
        runner.connect()
        walks = Walks(runner)
        runner.stage_in(say)  # the first: a full walk, the watch set up before it
        assert walks.n == 1 and read(os.path.join(mirror, "extra", "gone.txt"))
        # what a protocol's own Python does between two runJobs
        with open(extra / "made_here.txt", "w") as f:
            f.write("by the protocol's Python\n")
        (extra / "gone.txt").unlink()
        (extra / "folder" / "inside.txt").unlink()
        (extra / "folder").rmdir()
        (extra / "folder").write_bytes(b"a file where a folder was")
        (extra / "deep" / "er").mkdir(parents=True)
        (extra / "deep" / "er" / "x.txt").write_bytes(b"x")
        r = runner.stage_in(say)
        assert walks.n == 1, "the watch named the changes: no walk"
        assert not r.conflicts
        assert read(os.path.join(mirror, "extra", "made_here.txt")) == b"by the protocol's Python\n"
        assert not os.path.exists(os.path.join(mirror, "extra", "gone.txt"))
        assert read(os.path.join(mirror, "extra", "folder")) == b"a file where a folder was"
        assert read(os.path.join(mirror, "extra", "deep", "er", "x.txt")) == b"x"
        base = runner.run.sync.base(c.name)
        assert RUN_REL(run_dir, "extra/folder/inside.txt") not in base
        # a gather's own writes come back as events: nothing travels for them
        with open(os.path.join(mirror, "extra", "from_job.txt"), "wb") as f:
            f.write(b"from a job")
        assert runner.stage_out(say).fetched == [RUN_REL(run_dir, "extra/from_job.txt")]
        again = runner.stage_in(say)
        assert walks.n == 1 and again.bytes_sent == 0 and not again.agreed, again.agreed
    finally:
        runner.close()


def RUN_REL(run_dir, rel):
    return os.path.relpath(run_dir / rel, run_dir.parent.parent)


def test_a_file_written_through_mmap_is_staged_though_no_event_says_so(make_cluster, tmp_path):
    """numpy.memmap closes its descriptor at once and writes through the mapping later:
    no event for those writes until the mapping goes. A file this process maps shared and
    writable is stat'ed at every stage-in."""
    c, runner, run_dir, mirror = _runner(make_cluster, tmp_path)
    try:
        path = run_dir / "extra" / "map.bin"
        path.write_bytes(bytes(4096))
        runner.connect()
        walks = Walks(runner)
        runner.stage_in(say)
        with open(path, "r+b") as f:  # the descriptor closes, the mapping stays open
            m = mmap.mmap(f.fileno(), 4096)
        runner.stage_in(say)
        m[:5] = b"later"  # no event: only the file's mtime moves
        m.flush()
        runner.stage_in(say)  # still mapped: no close event either
        assert walks.n == 1
        assert read(os.path.join(mirror, "extra", "map.bin"))[:5] == b"later"
        m.close()
    finally:
        runner.close()


def test_lost_events_mean_a_full_walk(make_cluster, tmp_path):
    """More events than the kernel queues (max_queued_events): the queue overflows, the
    watch says so, and a full walk (the watch set up again before it) finds the change."""
    c, runner, run_dir, mirror = _runner(make_cluster, tmp_path)
    try:
        runner.connect()
        walks = Walks(runner)
        runner.stage_in(say)
        with open("/proc/sys/fs/inotify/max_queued_events") as f:
            limit = int(f.read())
        fds = [os.open(run_dir / "extra" / n, os.O_WRONLY | os.O_CREAT) for n in ("f1", "f2")]
        for i in range(limit + 10):  # one IN_MODIFY each (alternating: never coalesced)
            os.write(fds[i % 2], b"x")
        for fd in fds:
            os.close(fd)
        (run_dir / "extra" / "after.txt").write_bytes(b"after the flood")
        runner.stage_in(say)
        assert walks.n == 2, "a full walk"
        assert read(os.path.join(mirror, "extra", "after.txt")) == b"after the flood"
        assert len(read(os.path.join(mirror, "extra", "f1"))) == (limit + 11) // 2
        (run_dir / "extra" / "next.txt").write_bytes(b"next")
        runner.stage_in(say)
        assert walks.n == 2, "watched again from that walk on"
        assert read(os.path.join(mirror, "extra", "next.txt")) == b"next"
    finally:
        runner.close()


def test_a_link_to_a_folder_means_full_walks(make_cluster, tmp_path):
    """A folder linked into the run folder is walked through the link: its content is not
    watched, so every stage-in walks; a change in it still goes."""
    c, runner, run_dir, mirror = _runner(make_cluster, tmp_path)
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "o.txt").write_bytes(b"one")
        runner.connect()
        walks = Walks(runner)
        runner.stage_in(say)
        os.symlink(outside, run_dir / "extra" / "linked")
        runner.stage_in(say)
        (outside / "o.txt").write_bytes(b"two")
        runner.stage_in(say)
        assert walks.n == 3
        assert read(os.path.join(mirror, "extra", "linked", "o.txt")) == b"two"
    finally:
        runner.close()


def test_the_watch_alone(tmp_path):
    """Events name what changed, the logs never; nothing changed names nothing."""
    run = tmp_path / "R"
    (run / "logs").mkdir(parents=True)
    (run / "extra").mkdir()
    w = RunFolderWatch(str(tmp_path), "R", ["R/logs/"])
    assert w.changes() is None, "not started: walk"
    w.start()
    (run / "logs" / "run.log").write_text("pyworkflow's")
    (run / "extra" / "a.txt").write_text("a")
    (run / "new" / "sub").mkdir(parents=True)
    (run / "new" / "sub" / "f").write_text("f")
    paths, folders = w.changes()
    assert paths == {"R/extra/a.txt", "R/new"} and folders == {"R/new"}
    assert [rel for rel, _e in w.entries(paths, folders)] == [
        "R/extra/a.txt", "R/new", "R/new/sub", "R/new/sub/f"]
    assert w.changes() == ({"R/extra/a.txt"}, set()), "written here: named every time"
    (run / "new" / "sub" / "g").write_text("g")  # watched from the walk of its folder on
    assert w.changes()[0] == {"R/extra/a.txt", "R/new/sub/g"}
    os.rename(run / "new", run / "moved")
    assert w.changes() is None, "a folder moved: its watches name old paths"
    w.close()


@pytest.mark.parametrize("inotify", ["1", "0"])
def test_a_path_of_another_kind_replaces_the_old_one_on_the_cluster(make_cluster, tmp_path,
                                                                    monkeypatch, inotify):
    """A folder made a file, a file made a folder (with content), by a walk or the watch:
    the old one goes first (where the cluster still holds the base), then the new one. A
    folder the cluster added a file to stays: a conflict, its replacement held back."""
    from scipion_cloudexec.cluster.sync import SyncConflict
    monkeypatch.setenv("CLOUDEXEC_INOTIFY", inotify)
    c, runner, run_dir, mirror = _runner(make_cluster, tmp_path)
    try:
        extra = run_dir / "extra"
        (extra / "folder").mkdir()
        (extra / "folder" / "inside.txt").write_bytes(b"inside")
        (extra / "file.txt").write_bytes(b"a file")
        (extra / "busy").mkdir()
        runner.connect()
        runner.stage_in(say)
        (extra / "folder" / "inside.txt").unlink()
        (extra / "folder").rmdir()
        (extra / "folder").write_bytes(b"now a file")
        (extra / "file.txt").unlink()
        (extra / "file.txt" / "sub").mkdir(parents=True)
        (extra / "file.txt" / "sub" / "child.txt").write_bytes(b"child")
        runner.stage_in(say)
        assert read(os.path.join(mirror, "extra", "folder")) == b"now a file"
        assert read(os.path.join(mirror, "extra", "file.txt", "sub", "child.txt")) == b"child"
        base = runner.run.sync.base(c.name)
        assert base[RUN_REL(run_dir, "extra/folder")] == hashlib.sha256(b"now a file").hexdigest()
        assert RUN_REL(run_dir, "extra/folder/inside.txt") not in base
        assert base[RUN_REL(run_dir, "extra/file.txt")] == "d"
        # a job wrote into the folder the desktop now replaces by a file
        with open(os.path.join(mirror, "extra", "busy", "job.txt"), "wb") as f:
            f.write(b"from a job")
        (extra / "busy").rmdir()
        (extra / "busy").write_bytes(b"desktop's file")
        with pytest.raises(SyncConflict, match="busy"):
            runner.stage_in(say)
        assert read(os.path.join(mirror, "extra", "busy", "job.txt")) == b"from a job"
        assert runner.run.sync.base(c.name)[RUN_REL(run_dir, "extra/busy")] == "d"
    finally:
        runner.close()


def test_a_file_written_through_a_new_hard_link_reaches_the_cluster_under_its_first_name(
        make_cluster, tmp_path):
    # a new link makes no event on the file's other names: a.txt was never named again
    c, runner, run_dir, mirror = _runner(make_cluster, tmp_path)
    try:
        extra = run_dir / "extra"
        (extra / "a.txt").write_bytes(b"first")
        (extra / "c.txt").write_bytes(b"third")  # before the watch: no write of it seen
        runner.connect()
        walks = Walks(runner)
        runner.stage_in(say)
        os.link(extra / "a.txt", extra / "b.txt")
        runner.stage_in(say)
        with open(extra / "b.txt", "r+b") as f:  # same size, through the new name
            f.write(b"FIRST")
        runner.stage_in(say)
        assert walks.n == 1, "the watch named the changes: no walk"
        assert read(os.path.join(mirror, "extra", "b.txt")) == b"FIRST"
        assert read(os.path.join(mirror, "extra", "a.txt")) == b"FIRST"
        # the same through a new folder holding the new link (walked, not named by events)
        (extra / "d").mkdir()
        os.link(extra / "c.txt", extra / "d" / "c.txt")
        runner.stage_in(say)
        with open(extra / "d" / "c.txt", "r+b") as f:
            f.write(b"THIRD")
        runner.stage_in(say)
        assert walks.n == 1
        assert read(os.path.join(mirror, "extra", "c.txt")) == b"THIRD"
    finally:
        runner.close()


def test_a_watch_closed_by_another_thread_mid_stage_in_never_fails_the_stage_in(tmp_path):
    # a lost cluster's runner is closed by whichever step saw the loss, while another
    # step's stage-in reads the watch: that read failed with EBADF (and its descriptor's
    # number could meanwhile belong to a new socket)
    import random
    import socket
    import threading
    run = tmp_path / "Runs" / "r"
    (run / "extra").mkdir(parents=True)
    errors = []
    rng = random.Random(1)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # many more thread switches: the race shows in a few rounds
    try:
        for i in range(300):
            watch = RunFolderWatch(str(tmp_path), "Runs/r")
            watch.start()
            stop = threading.Event()

            def stage_ins():
                try:
                    while not stop.is_set():
                        (run / "extra" / "f.txt").write_text(str(rng.random()))
                        if watch.changes() is None:
                            return
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
            t = threading.Thread(target=stage_ins)
            t.start()
            for _ in range(rng.randrange(50)):
                pass
            watch.close()
            taken = [socket.socket() for _ in range(2)]  # the closed number, given again
            stop.set()
            t.join()
            for s in taken:
                s.close()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
