"""The staging server's listing from inotify (remote/tree_watch.py): after any change, a
tracked listing applied to the desktop's copy gives exactly what a whole walk of the tree
gives; writes through a mapping are seen once their job ends; whatever the watch cannot
vouch for ends in a whole walk. Real files, real processes, a real job folder."""
import os
import random
import shutil
import stat
import subprocess
import sys
import time

import pytest

from scipion_cloudexec.remote import inotify
from scipion_cloudexec.remote.hashing import HashCache
from scipion_cloudexec.remote.listing import Listings, scan

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")


class Desktop:
    """The desktop's copy of the cluster's run folder, kept from tracked listings as
    cluster/remote_tree.py keeps it."""

    def __init__(self, listings, root, sub, hashes):
        self.listings, self.root, self.sub, self.hashes = listings, root, sub, hashes
        self.token = ""
        self.tree = {}

    def sync(self):
        out = self.listings.list(self.root, self.sub, [], self.hashes, track=True,
                                 since=self.token)
        if not out.get("delta"):
            self.tree = {}
        for rel in out.get("gone", []):
            self.tree.pop(rel, None)
        for rel, size, mtime, digest in out["files"]:
            self.tree[rel] = (size, mtime, digest)
        for rel in out["dirs"]:
            self.tree[rel] = "d"
        for rel, target in out["links"]:
            self.tree[rel] = "l:" + target
        self.token = out["token"]
        return out

    def walked(self):
        entries, refused, skipped, _ = scan(self.root, self.sub, [], self.hashes)
        return entries, sorted(map(list, refused)), sorted(map(list, skipped))


@pytest.fixture
def cluster_dirs(tmp_path):
    workdir = tmp_path / "work"
    root = workdir / "projects" / "p"
    (root / "Runs" / "run1").mkdir(parents=True)
    hashes = HashCache(str(workdir / "cache" / "hashes.sqlite"))
    listings = Listings(watch=True)
    yield str(workdir), str(root), listings, hashes
    listings.close()
    hashes.close()


def _watched(listings):
    return list(listings._watches.values())


def _mode(path):
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _random_change(rng, top, outside):
    """One change anywhere in *top*: what jobs and stage-ins do to a run folder."""
    folders = [top] + [os.path.join(d, n) for d, ds, _ in os.walk(top) for n in ds]
    files = [os.path.join(d, n) for d, _, fs in os.walk(top) for n in fs]
    d = rng.choice(folders)
    name = "n%d" % rng.randrange(30)
    op = rng.randrange(14)
    try:
        if op <= 2 and not stat.S_ISFIFO(_mode(os.path.join(d, name))):  # new or rewritten
            with open(os.path.join(d, name), "wb") as f:
                f.write(os.urandom(rng.randrange(0, 3000)))
        elif op == 3 and files:  # same size, other bytes, mtime put back (a racy rewrite)
            p = rng.choice(files)
            st = os.lstat(p)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "r+b") as f:
                    f.write(os.urandom(st.st_size))
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif op == 4 and files:
            os.unlink(rng.choice(files))
        elif op == 5:
            os.makedirs(os.path.join(d, name, "sub"), exist_ok=True)
            with open(os.path.join(d, name, "sub", "f"), "w") as f:
                f.write(name)
        elif op == 6 and len(folders) > 1:
            shutil.rmtree(rng.choice(folders[1:]), ignore_errors=True)
        elif op == 7 and files:  # a link inside, one outside
            os.symlink(os.path.relpath(rng.choice(files), d), os.path.join(d, "l" + name))
            os.symlink(outside, os.path.join(d, "o" + name))
        elif op == 8 and files:
            os.link(rng.choice(files), os.path.join(d, "h" + name))
        elif op == 9:
            os.mkfifo(os.path.join(d, "fifo" + name))
        elif op == 10 and files:  # a file renamed over another
            os.replace(rng.choice(files), os.path.join(d, name))
        elif op == 11 and len(folders) > 1:  # a folder becomes a file
            victim = rng.choice(folders[1:])
            shutil.rmtree(victim, ignore_errors=True)
            with open(victim, "w") as f:
                f.write("was a folder")
        elif op == 13 and files:  # a new folder holding a new link to a file
            os.makedirs(os.path.join(d, "hd" + name))
            os.link(rng.choice(files), os.path.join(d, "hd" + name, "h"))
        elif op == 12 and files:  # a file becomes a folder
            victim = rng.choice(files)
            os.unlink(victim)
            os.makedirs(os.path.join(victim, "inner"))
    except OSError:  # a change that does not apply here (exists, not empty, a folder...)
        pass


@pytest.mark.parametrize("seed", range(8))
def test_listings_from_the_watch_rebuild_exactly_what_a_walk_lists(cluster_dirs, tmp_path,
                                                                      seed):
    workdir, root, listings, hashes = cluster_dirs
    rng = random.Random(seed)
    top = os.path.join(root, "Runs", "run1")
    outside = str(tmp_path / "outside")
    open(outside, "w").close()
    desk = Desktop(listings, root, "Runs/run1", hashes)
    desk.sync()
    assert len(_watched(listings)) == 1, "a tree on %s is watched" % inotify.filesystem_type(top)
    deltas = 0
    for _ in range(40):
        for _ in range(rng.randrange(1, 12)):
            _random_change(rng, top, outside)
        out = desk.sync()
        deltas += bool(out.get("delta"))
        entries, refused, skipped = desk.walked()
        assert desk.tree == entries
        assert sorted(out["refused"]) == refused and sorted(out["skipped"]) == skipped
    assert deltas == 40, "every listing after the first was a delta"
    watch = _watched(listings)[0]
    for rel in watch._always:
        st = os.lstat(os.path.join(root, rel))
        assert stat.S_ISLNK(st.st_mode) or st.st_nlink > 1, \
            "only links and hard-linked files are looked at every time: %s" % rel


def test_a_folder_moved_inside_the_tree_ends_in_a_whole_walk_that_is_right(cluster_dirs):
    workdir, root, listings, hashes = cluster_dirs
    top = os.path.join(root, "Runs", "run1")
    os.makedirs(top + "/a/b")
    open(top + "/a/b/f", "w").close()
    desk = Desktop(listings, root, "Runs/run1", hashes)
    desk.sync()
    first = _watched(listings)[0]
    os.rename(top + "/a", top + "/z")
    open(top + "/z/b/f", "w").write("after the move")
    out = desk.sync()
    assert not out.get("delta") and desk.tree == desk.walked()[0]
    assert "Runs/run1/z/b/f" in desk.tree and "Runs/run1/a" not in desk.tree
    assert _watched(listings)[0] is not first, "a new watch after the whole walk"


def test_events_lost_to_an_overflow_end_in_a_whole_walk_that_is_right(cluster_dirs):
    workdir, root, listings, hashes = cluster_dirs
    top = os.path.join(root, "Runs", "run1")
    desk = Desktop(listings, root, "Runs/run1", hashes)
    desk.sync()
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        limit = int(f.read())
    if limit > 200_000:
        pytest.skip("max_queued_events %d: too many files to overflow it" % limit)
    for k in range(limit // 2 + 10):  # a create and a close-write each
        with open(os.path.join(top, "f%d" % k), "w"):
            pass
    out = desk.sync()
    assert not out.get("delta"), "the overflow was seen: the whole listing was sent"
    assert desk.tree == desk.walked()[0] and len(desk.tree) == limit // 2 + 10


MAP_WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "map_writer.py")


def _job(argv):
    """A job's program, started as the agent's job script starts it."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("started", ["after the watch", "before the watch"])
def test_a_file_written_through_a_mapping_after_its_close_is_listed_once_its_writer_exits(
        cluster_dirs, tmp_path, started):
    # the mapping holds the file open: its IN_CLOSE_WRITE comes when the process exits
    workdir, root, listings, hashes = cluster_dirs
    top = os.path.join(root, "Runs", "run1")
    target, go = os.path.join(top, "m.bin"), str(tmp_path / "go")
    desk = Desktop(listings, root, "Runs/run1", hashes)
    if started == "after the watch":
        desk.sync()
    job = _job([sys.executable, MAP_WRITER, target, "by mmap\n", "--go", go])
    try:
        assert job.stdout.readline() == "mapped\n"
        desk.sync()  # its events read, its content (zeros) listed
        other = _job(["/bin/sh", "-c", "echo other > %s/other.txt" % top])
        assert other.wait(10) == 0
        desk.sync()  # another job's gather while this one still writes through its mapping
        assert desk.tree["Runs/run1/m.bin"][2] == hashes.get(target)
        open(go, "w").close()
        assert job.wait(10) == 0
    finally:
        job.kill()
        job.wait()
    out = desk.sync()
    assert out.get("delta")
    assert desk.tree == desk.walked()[0]
    with open(target, "rb") as f:
        assert f.read(8) == b"by mmap\n"
    assert desk.tree["Runs/run1/m.bin"][2] == hashes.get(target)
    assert not _watched(listings)[0]._always, "the file is not stat'ed at every listing"


MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /srv/data rw,relatime shared:2 - nfs4 server:/data rw,vers=4.2
31 30 0:41 / /srv/data/scratch rw - tmpfs tmpfs rw
32 22 0:42 / /srv/with\040space rw - lustre 10.0.0.1@tcp:/fs rw
"""


def test_only_filesystems_written_through_this_kernel_are_watched(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    fstype = lambda p: inotify.filesystem_type(p, str(info))  # noqa: E731
    assert fstype("/home/u/work") == "ext4"
    assert fstype("/srv/data/projects/p") == "nfs4"
    assert fstype("/srv/data/scratch/x") == "tmpfs"
    assert fstype("/srv/with space/p") == "lustre"
    assert fstype("/srv/database") == "ext4", "a prefix of a name is not its mount"
    assert not inotify.local_filesystem("/srv/data/projects/p", str(info))
    assert not inotify.local_filesystem("/srv/with space/p", str(info))
    assert inotify.local_filesystem("/srv/data/scratch/x", str(info))
    assert not inotify.local_filesystem("/srv", str(info)), "an NFS mount below it"
    assert inotify.local_filesystem("/home/u", str(info))
    assert inotify.filesystem_type(str(tmp_path)) in inotify.LOCAL_FILESYSTEMS  # this host


def test_with_inotify_off_the_listing_walks_and_is_the_same(cluster_dirs, monkeypatch):
    workdir, root, listings, hashes = cluster_dirs
    monkeypatch.setenv("CLOUDEXEC_INOTIFY", "0")
    top = os.path.join(root, "Runs", "run1")
    desk = Desktop(listings, root, "Runs/run1", hashes)
    desk.sync()
    open(os.path.join(top, "a"), "w").write("a")
    out = desk.sync()
    assert out.get("delta") and not _watched(listings)
    assert desk.tree == desk.walked()[0]
