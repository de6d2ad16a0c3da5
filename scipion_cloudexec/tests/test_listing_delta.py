"""Gathers whose listings send only what changed on the cluster (issue 13), through the real
sshd: every change still comes back (a rewrite of the same size and mtime, a deletion, a
folder replaced by a file), and a staging server that does not hold the desktop's listing
(restarted, another process) answers with the whole listing, never a delta from nothing."""
import os

from scipion_cloudexec.remote import inotify
from scipion_cloudexec.remote.hashing import HashCache
from scipion_cloudexec.remote.listing import KEEP, Listings
from scipion_cloudexec.remote.stage_protocol import ListTree

from .test_sync import RUN, gather, mirror, run_folder, sync_in  # noqa: F401 (a fixture)


def spied(st):
    """Record the answers of the listings *st* asks for."""
    answers = []
    ask = st._ask

    def _ask(request, bulk=False):
        ch, answer = ask(request, bulk)
        if isinstance(request, ListTree):
            answers.append(answer)
        return ch, answer
    st._ask = _ask
    return answers


def listed(answer):
    return sorted([f[0] for f in answer["files"]] + answer["dirs"]
                  + [rel for rel, _t in answer["links"]])


def rewrite_keeping_size_and_mtime(path, data):
    """Other bytes, same size and mtime (through a new inode, as an editor or a job that
    writes a temporary file and renames it would)."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.utime(path + ".tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(path + ".tmp", path)


def test_listings_send_only_changes_and_every_change_comes_back(make_cluster, stager_for,
                                                                run_folder):  # noqa: F811
    c = make_cluster("local")
    st = stager_for(c)
    proj, base = run_folder, {}
    answers = spied(st)
    sync_in(st, proj, base)
    assert not gather(st, proj, base).fetched
    assert "delta" not in answers[-1], "the first listing is whole"
    rewrite_keeping_size_and_mtime(mirror(c, "extra/a.txt"), b"A FROM THE CLUSTER\n")
    os.unlink(mirror(c, "extra/b.txt"))
    os.rmdir(mirror(c, "extra/empty"))
    with open(mirror(c, "extra/empty"), "wb") as f:  # a folder replaced by a file
        f.write(b"now a file\n")
    os.makedirs(mirror(c, "extra/new"))
    with open(mirror(c, "extra/new/c.txt"), "wb") as f:
        f.write(b"c\n")
    r = gather(st, proj, base)
    assert not r.conflicts and not r.refused
    assert answers[-1]["delta"] and listed(answers[-1]) == sorted(
        [RUN + "/extra/a.txt", RUN + "/extra/empty", RUN + "/extra/new", RUN + "/extra/new/c.txt"])
    assert answers[-1]["gone"] == [RUN + "/extra/b.txt"]
    assert answers[-1].get("watched"), "a mirror on %s: its changes come from inotify" % (
        inotify.filesystem_type(mirror(c, "extra")))
    extra = proj / RUN / "extra"
    assert (extra / "a.txt").read_bytes() == b"A FROM THE CLUSTER\n"
    assert not (extra / "b.txt").exists()
    assert (extra / "empty").read_bytes() == b"now a file\n"
    assert (extra / "new" / "c.txt").read_bytes() == b"c\n"
    assert (extra / "input.mrcs").read_bytes() == b"particles" * 1000
    # nothing changed: an empty delta, nothing moves
    again = gather(st, proj, base)
    assert answers[-1]["delta"] and listed(answers[-1]) == [] and answers[-1]["gone"] == []
    assert not again.fetched and not again.agreed
    # a file replaced by a folder, and a change the desktop also made (a conflict, as ever)
    os.unlink(mirror(c, "extra/empty"))
    os.makedirs(mirror(c, "extra/empty/sub"))
    with open(mirror(c, "extra/new/c.txt"), "wb") as f:
        f.write(b"c from the cluster\n")
    (extra / "new" / "c.txt").write_bytes(b"c from the desktop\n")
    r = gather(st, proj, base)
    assert [p for p, _why in r.conflicts] == [RUN + "/extra/new/c.txt"]
    assert (extra / "empty" / "sub").is_dir()
    assert (extra / "new" / "c.txt").read_bytes() == b"c from the desktop\n"


def test_inotify_turned_off_in_env_setup_walks_and_brings_the_same(make_cluster, stager_for,
                                                                    run_folder):  # noqa: F811
    c = make_cluster("local", env_setup="export CLOUDEXEC_INOTIFY=0")
    st = stager_for(c)
    proj, base = run_folder, {}
    answers = spied(st)
    sync_in(st, proj, base)
    gather(st, proj, base)
    rewrite_keeping_size_and_mtime(mirror(c, "extra/a.txt"), b"A FROM THE CLUSTER\n")
    gather(st, proj, base)
    assert answers[-1]["delta"] and not answers[-1].get("watched"), "a walk, as asked"
    assert listed(answers[-1]) == [RUN + "/extra/a.txt"]
    assert (proj / RUN / "extra" / "a.txt").read_bytes() == b"A FROM THE CLUSTER\n"


def test_a_new_staging_server_answers_with_the_whole_listing(make_cluster, stager_for,
                                                             run_folder):  # noqa: F811
    """The server that kept the desktop's listing is gone (the channel dropped, the link
    lost): the next one does not know the token, so it sends everything, and what changed
    meanwhile, deletions included, comes back."""
    c = make_cluster("local")
    st = stager_for(c)
    proj, base = run_folder, {}
    answers = spied(st)
    sync_in(st, proj, base)
    gather(st, proj, base)
    st._drop(st._chan)  # its staging server exits with its channel
    os.unlink(mirror(c, "extra/b.txt"))
    rewrite_keeping_size_and_mtime(mirror(c, "extra/a.txt"), b"A FROM THE CLUSTER\n")
    r = gather(st, proj, base)
    assert "delta" not in answers[-1] and RUN + "/extra/input.mrcs" in listed(answers[-1])
    assert not r.conflicts
    assert not (proj / RUN / "extra" / "b.txt").exists()
    assert (proj / RUN / "extra" / "a.txt").read_bytes() == b"A FROM THE CLUSTER\n"
    gather(st, proj, base)
    assert answers[-1]["delta"], "and deltas again from there"


def test_a_token_the_server_does_not_hold_gets_the_whole_listing(tmp_path):
    """Another token, an untracked listing in between, or a tree pushed out by KEEP others:
    the whole listing, never a delta against something the desktop does not hold."""
    top = tmp_path / "proj" / RUN
    top.mkdir(parents=True)
    (top / "a.txt").write_bytes(b"a")
    memo = HashCache(str(tmp_path / "h.sqlite"))
    srv = Listings()
    root = str(tmp_path / "proj")
    first = srv.list(root, RUN, [], memo, track=True)
    assert "delta" not in first and [f[0] for f in first["files"]] == [RUN + "/a.txt"]
    assert srv.list(root, RUN, [], memo, track=True, since="0" * 24).get("delta") is None
    last = srv.list(root, RUN, [], memo, track=True)
    assert srv.list(root, RUN, [], memo, track=True, since=first["token"]).get("delta") is None
    token = srv.list(root, RUN, [], memo, track=True, since=last["token"])["token"]
    for i in range(KEEP):  # other trees (fetches, other runs) push this one out
        (tmp_path / "proj" / str(i)).mkdir()
        srv.list(root, str(i), [], memo, track=True)
    assert srv.list(root, RUN, [], memo, track=True, since=token).get("delta") is None
    memo.close()
