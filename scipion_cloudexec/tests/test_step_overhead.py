"""Per-step overhead (issue 13): the shortcuts that spare a step its round trips and
scans must never miss a change. Each test makes the change a shortcut could miss and
checks that it arrives (or is hashed anew): the hash memo answered from memory, the base
kept in memory, no stage-in request when nothing changed, and concurrent steps sharing
one stage-in walk or one gather."""
import hashlib
import os
import threading
import time

from scipion_cloudexec.cluster.sync import SyncState
from scipion_cloudexec.remote.hashing import HashCache
from scipion_cloudexec.tests.test_sync import RUN, sync_in as _sync_in


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rewrite_keeping_stat(path, data: bytes) -> None:
    """Same size, same inode, the same mtime to the nanosecond: only the bytes differ (a
    rewrite within the filesystem's mtime granularity looks like this)."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_the_memo_in_memory_never_hides_a_same_size_rewrite(tmp_path):
    f = tmp_path / "out.txt"
    f.write_bytes(b"first")
    db = str(tmp_path / "hashes.sqlite")
    racy = HashCache(db, racy_seconds=3600)  # the file was just written: racy
    assert racy.get(str(f)) == sha(b"first")
    rewrite_keeping_stat(str(f), b"later")
    assert racy.get(str(f)) == sha(b"later"), "a racy file is hashed again, never remembered"
    again = HashCache(db, racy_seconds=3600)  # another instance shares the memory: same rule
    assert again.get_many([(str(f), os.stat(f))]) == [sha(b"later")]
    racy.close()
    again.close()
    settled = HashCache(db, racy_seconds=0)  # old enough: remembered...
    assert settled.get(str(f)) == sha(b"later")
    f.write_bytes(b"third, longer")  # ...until size, mtime or inode move
    assert settled.get_many([(str(f), os.stat(f))]) == [sha(b"third, longer")]
    os.replace(tmp_path / "out.txt", tmp_path / "gone.txt")
    (tmp_path / "out.txt").write_bytes(b"fifth")  # another inode at the same path
    assert settled.get(str(f)) == sha(b"fifth")
    settled.close()


def test_the_base_in_memory_is_what_was_committed(tmp_path):
    logs = str(tmp_path / "logs")
    one = SyncState(logs)
    assert one.base("c1") == {}
    one.update("c1", {RUN + "/a": sha(b"a"), RUN + "/d": "d"})
    one.update("c1", {RUN + "/a": "", RUN + "/b": sha(b"b")})
    one.update("c2", {RUN + "/x": sha(b"x")})
    want = {RUN + "/d": "d", RUN + "/b": sha(b"b")}
    assert one.base("c1") == want == SyncState(logs).base("c1")
    got = one.base("c1")
    got[RUN + "/z"] = "d"  # a caller's copy: the base itself is untouched
    assert one.base("c1") == want
    one.abandon("c1")
    assert one.base("c1") == {} == SyncState(logs).base("c1")
    assert one.base("c2") == {RUN + "/x": sha(b"x")} == SyncState(logs).base("c2")


def test_no_stage_in_request_when_nothing_changed_but_every_change_goes(
        make_cluster, stager_for, tmp_path):
    c = make_cluster("local")
    st = stager_for(c)
    proj = tmp_path / "proj"
    (proj / RUN / "extra").mkdir(parents=True)
    (proj / RUN / "extra" / "a.txt").write_bytes(b"aaaa")
    (proj / RUN / "extra" / "b.txt").write_bytes(b"bbbb")
    base = {}
    _sync_in(st, proj, base)
    asked = []
    real = st._send_check
    st._send_check = lambda project, batch, *rest: (asked.append(batch),
                                                    real(project, batch, *rest))
    _sync_in(st, proj, base)
    assert asked == [], "the run folder is as the base has it: no request"
    mirror = os.path.join(c.workdir, "projects", "proj", RUN, "extra")
    (proj / RUN / "extra" / "b.txt").unlink()  # a deletion alone still travels
    _sync_in(st, proj, base)
    assert not os.path.exists(os.path.join(mirror, "b.txt"))
    rewrite_keeping_stat(str(proj / RUN / "extra" / "a.txt"), b"AAAA")  # a rewrite too
    (proj / RUN / "extra" / "new").mkdir()  # and an empty folder
    _sync_in(st, proj, base)
    with open(os.path.join(mirror, "a.txt"), "rb") as f:
        assert f.read() == b"AAAA"
    assert os.path.isdir(os.path.join(mirror, "new"))


def _runner(make_cluster, tmp_path):
    from scipion_cloudexec.executors.runner import ClusterRunner, ProtocolRun
    c = make_cluster("local")
    project = tmp_path / "proj"
    run_dir = project / RUN
    (run_dir / "extra").mkdir(parents=True)
    run = ProtocolRun(str(project), "proj", str(run_dir), 10)
    runner = ClusterRunner(c, run)
    runner.connect()
    return c, runner, run_dir, os.path.join(c.workdir, "projects", run.mirror, RUN)


def test_a_change_made_during_a_shared_stage_in_is_not_skipped(make_cluster, tmp_path):
    """Steps waiting for the stage lock share the stage-in under way only if it began after
    their need arose: a file written while a stage-in runs (after its walk) goes with the
    next one."""
    c, runner, run_dir, mirror = _runner(make_cluster, tmp_path)
    try:
        real = runner.session.stage_in
        written = {}

        def walk_then_write(*args, **kwargs):
            report = real(*args, **kwargs)  # the walk is over
            if not written:
                (run_dir / "extra" / "late.txt").write_bytes(b"written during a stage-in")
                written["at"] = time.monotonic()
            return report
        runner.session.stage_in = walk_then_write
        runner.stage_in(lambda s: None, since=time.monotonic())
        assert not os.path.exists(os.path.join(mirror, "extra", "late.txt"))
        runner.stage_in(lambda s: None, since=written["at"])
        with open(os.path.join(mirror, "extra", "late.txt"), "rb") as f:
            assert f.read() == b"written during a stage-in"
        # and steps whose need predates a clean stage-in share it: one walk for many
        calls = []
        runner.session.stage_in = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        since = time.monotonic()
        (run_dir / "extra" / "mine.txt").write_bytes(b"mine")
        threads = [threading.Thread(target=runner.stage_in, args=(lambda s: None, since))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 1 <= len(calls) <= 4
        with open(os.path.join(mirror, "extra", "mine.txt"), "rb") as f:
            assert f.read() == b"mine"
    finally:
        runner.close()


def test_a_job_ended_during_a_shared_gather_is_gathered(make_cluster, tmp_path):
    """A gather covers a job only if it began listing after that job was seen to end: an
    output written while a gather runs (after its listing) comes with the next one."""
    c, runner, run_dir, mirror = _runner(make_cluster, tmp_path)
    try:
        runner.stage_in(lambda s: None, since=time.monotonic())
        real = runner.session.stage_out
        ended = {}

        def list_then_job_ends(*args, **kwargs):
            report = real(*args, **kwargs)  # the listing is over
            if not ended:
                with open(os.path.join(mirror, "extra", "out.txt"), "wb") as f:
                    f.write(b"a job's output")
                ended["at"] = time.monotonic()
            return report
        runner.session.stage_out = list_then_job_ends
        runner.stage_out(lambda s: None, since=time.monotonic())
        assert not (run_dir / "extra" / "out.txt").exists()
        runner.stage_out(lambda s: None, since=ended["at"])
        assert (run_dir / "extra" / "out.txt").read_bytes() == b"a job's output"
    finally:
        runner.close()


def test_the_listing_names_every_path_as_relpath_does(tmp_path):
    """The listing computes each path from its folder's (not one relpath per file): the
    same names, folders, links and files, at the top and deep down, as from a plain walk."""
    import io
    import json
    from scipion_cloudexec.remote.stage_protocol import ListTree
    from scipion_cloudexec.remote.listing import Listings
    from scipion_cloudexec.remote.stage_server import cmd_list
    top = tmp_path / "proj" / RUN
    (top / "extra" / "deep" / "er").mkdir(parents=True)
    (top / "logs").mkdir()
    (top / "logs" / "run.log").write_bytes(b"never listed")
    (top / "top.txt").write_bytes(b"t")
    (top / "extra" / "deep" / "er" / "x.txt").write_bytes(b"x")
    os.symlink("deep/er", top / "extra" / "linked")  # a link to a folder: listed as a link
    os.symlink("../top.txt", top / "extra" / "t.txt")

    class Out:
        def __init__(self):
            self.buf = io.BytesIO()

        def line(self, obj):
            self.buf.write(json.dumps(obj).encode())
    out = Out()
    memo = HashCache(str(tmp_path / "h.sqlite"))
    cmd_list(Listings(), memo, ListTree(root=str(tmp_path / "proj"), dir=RUN, exclude=["logs"]),
             out)
    got = json.loads(out.buf.getvalue())
    root = os.path.realpath(tmp_path / "proj")
    want_dirs, want_files = [], []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d != "logs" or dirpath != str(top)]
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                want_dirs.append(os.path.relpath(os.path.join(dirpath, d), root))
        want_files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                       if not os.path.islink(os.path.join(dirpath, f))]
    assert sorted(got["dirs"]) == sorted(want_dirs)
    assert sorted(f[0] for f in got["files"]) == sorted(want_files)
    assert sorted(got["links"]) == [[RUN + "/extra/linked", "deep/er"],
                                    [RUN + "/extra/t.txt", "../top.txt"]]
    whole = Out()  # a listing of the root itself (``fetch`` of the workdir) names paths alike
    cmd_list(Listings(), memo, ListTree(root=str(top / "extra"), dir="."), whole)
    assert sorted(f[0] for f in json.loads(whole.buf.getvalue())["files"]) == ["deep/er/x.txt"]
    memo.close()


def test_placements_kept_in_memory_answer_as_the_file_does(tmp_path):
    """Where each job went is read once per process, then kept in step with what this
    process places: Continue attaches to, or renews, the same attempt either way."""
    from scipion_cloudexec.executors.protocol_run import ProtocolRun
    run_dir = tmp_path / "proj" / RUN
    run_dir.mkdir(parents=True)
    earlier = ProtocolRun(str(tmp_path / "proj"), "proj.v2", str(run_dir), 10)
    a, b = earlier.job_id(1), earlier.job_id(2)
    earlier.place(a, "c1")
    earlier.place(earlier.next_attempt(a), "c2")  # a.2, after a failover
    now = ProtocolRun(str(tmp_path / "proj"), "proj.v2", str(run_dir), 10)  # Continue
    assert now.latest(a) == (a + ".2", "c2") and now.latest_on(a, "c1") == a
    assert now.latest(b) is None
    now.place(b, "c1")
    third = now.next_attempt(a)
    now.place(third, "c1")
    assert third == a + ".3"
    assert now.latest(a) == (third, "c1") and now.latest(b) == (b, "c1")
    assert now.placed_on("c1") == [a, b, third] and now.placed_on("c2") == [a + ".2"]
    again = ProtocolRun(str(tmp_path / "proj"), "proj.v2", str(run_dir), 10)
    for job in (a, b):
        assert again.latest(job) == now.latest(job)
        assert again.next_attempt(job) == now.next_attempt(job)
    assert again.placed_on("c1") == now.placed_on("c1")
