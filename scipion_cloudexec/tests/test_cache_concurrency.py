"""Several staging servers on one workdir at once: the content cache driven from real
processes (fork), no sshd. A published object is never modified, nor deleted while good;
its record always matches it; each upload consumes exactly its bytes from its stream."""
import hashlib
import io
import multiprocessing
import os
import time

import pytest

from scipion_cloudexec.remote import cache as cachemod
from scipion_cloudexec.remote.cache import SMALL, Cache, StageError

CTX = multiprocessing.get_context("fork")
TRAILER = b"NEXT REQUEST"  # follows the content in each stream: must be left unread
REPEATS = 20
MB = 1 << 20


class Paced(io.RawIOBase):
    """Bytes in memory handed out in pieces, a pause before each, as from a network:
    uploads started together overlap instead of running one after the other."""

    def __init__(self, data: bytes, piece: int = 256 << 10, pause: float = 0.002,
                 cut: int = -1, hang: float = 0.0):
        self.data, self.pos, self.piece, self.pause = memoryview(data), 0, piece, pause
        self.cut, self.hang = cut, hang  # at *cut* bytes, nothing for *hang* s, then the end

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos == self.cut:  # a cut link: the server gives up after its stall time
            time.sleep(self.hang)
            self.hang = 0
            return 0
        end = len(self.data) if self.cut < 0 else self.cut
        n = min(len(b), self.piece, end - self.pos)
        if n:
            time.sleep(self.pause)
            b[:n] = self.data[self.pos:self.pos + n]
            self.pos += n
        return n


def stream(data: bytes, **pace) -> io.BufferedReader:
    return io.BufferedReader(Paced(data + TRAILER, **pace), MB)


def upload(name, start, results, workdir, sha, size, offset, data, pace=None, delay=0.0):
    """A staging server receiving *data* (the bytes from *offset*) for *sha*, *delay*
    seconds after the others start."""
    cache = Cache(workdir)
    s = stream(data, **(pace or {}))
    start.wait()
    time.sleep(delay)
    t0 = time.monotonic()
    try:
        why = cache.receive(sha, size, offset, s)
    except BaseException as e:  # reported to the test, which fails on it
        why = "raised %r" % e
    results.put((name, why, s.read(), time.monotonic() - t0))


def watch(name, start, results, workdir, sha, size, stop):
    """What cmd_in does while others publish: records(), then present() on them; then
    checks that an object, once there, has its record."""
    cache = Cache(workdir)
    deleted = mismatched = checks = 0
    start.wait()
    while not stop.is_set():
        record = cache.records([sha]).get(sha)
        deleted += cache.present(sha, size, record)[1]
        try:
            st = os.stat(cache.path(sha))
        except FileNotFoundError:
            continue
        if cache.records([sha]).get(sha) != (st.st_size, st.st_mtime_ns, st.st_ino):
            mismatched += 1  # an object seen without its record (or with another's)
        checks += 1
    results.put((name, deleted, mismatched, checks))


def run(*workers, stop=None, timeout: float = 60.0) -> dict:
    """Run workers ``(function, name, args...)`` in processes released at once; when all
    but the watchers are done, set *stop*. Returns each one's result, by name."""
    start, results = CTX.Barrier(len(workers)), CTX.Queue()
    procs = [CTX.Process(target=f, args=(name, start, results) + tuple(args))
             for f, name, *args in workers]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + timeout
    uploads = sum(f is upload for f, *_ in workers)
    try:
        while len(got) < len(procs):
            item = results.get(timeout=max(0.1, deadline - time.monotonic()))
            got[item[0]] = item[1:]
            if stop is not None and sum(n.startswith("up") for n in got) == uploads:
                stop.set()
        for p in procs:
            p.join(timeout=10)
            assert p.exitcode == 0, "a process died"
    finally:
        for p in procs:  # a hung one: stopped, so that the test fails instead of hanging
            if p.is_alive():
                p.terminate()
                p.join()
    return got


def assert_sound(workdir: str, sha: str, size: int) -> None:
    """One object, with the right bytes, read-only, matching its record; no partial file."""
    cache = Cache(workdir)
    path = cache.path(sha)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha, "the object's bytes changed"
    st = os.stat(path)
    assert st.st_size == size and not st.st_mode & 0o222
    assert cache.records([sha]) == {sha: (st.st_size, st.st_mtime_ns, st.st_ino)}
    assert [n for _d, _s, names in os.walk(cache.objects) for n in names] == [sha]
    assert os.listdir(cache.partial) == []
    assert cache.present(sha, size, cache.records([sha])[sha]) == (True, False)
    cache.db.close()


def assert_received(results: dict, names=None) -> None:
    for name, (why, rest, _secs) in results.items():
        if names is None or name in names:
            assert why is None, "%s: %s" % (name, why)
            assert rest == TRAILER, "%s left the stream out of step" % name


@pytest.mark.slow
@pytest.mark.parametrize("size", [6 * MB, 1 * MB], ids=["large", "small"])
def test_same_content_uploaded_by_four_at_once(tmp_path, size, reliability):
    assert (size > SMALL) == (size == 6 * MB)
    slowest = 0.0
    for rep in range(REPEATS):
        data = os.urandom(size)
        sha = hashlib.sha256(data).hexdigest()
        workdir = str(tmp_path / ("w%d" % rep))
        got = run(*[(upload, "up%d" % i, workdir, sha, size, 0, data) for i in range(4)])
        assert_sound(workdir, sha, size)
        assert_received(got)
        slowest = max(slowest, max(secs for _w, _r, secs in got.values()))
    print("slowest upload: %.2f s" % slowest)
    reliability(fault="four desktops (or protocols) uploading the same %s file into one "
                "cluster's cache at once" % ("6 MB" if size > SMALL else "1 MB"),
                when="staging", seen="nothing: one sound cache object, each upload verified",
                recover_s="none needed (slowest upload %.2f s)" % slowest, lost=0, twice=0)


@pytest.mark.parametrize("size", [6 * MB, 1 * MB], ids=["large", "small"])
def test_present_never_deletes_what_others_publish(tmp_path, size):
    for rep in range(REPEATS):
        data = os.urandom(size)
        sha = hashlib.sha256(data).hexdigest()
        workdir = str(tmp_path / ("w%d" % rep))
        stop = CTX.Event()
        # small pieces without pauses: many publishes, close together
        pace = {"piece": 64 << 10, "pause": 0}
        got = run((watch, "watch", workdir, sha, size, stop),
                  *[(upload, "up%d" % i, workdir, sha, size, 0, data, pace) for i in range(3)],
                  stop=stop)
        deleted, mismatched, checks = got.pop("watch")
        assert (deleted, mismatched) == (0, 0), "rep %d: %d good objects deleted, %d of %d " \
            "checks saw an object without its record" % (rep, deleted, mismatched, checks)
        assert_sound(workdir, sha, size)
        assert_received(got)


@pytest.mark.slow
def test_resumed_upload_racing_a_fresh_one(tmp_path):
    """An upload cut at 2 MB; then a resume (told offset 2 MB) and an upload from 0 at
    once; and a second resume (the first one's client retrying, say) with them, a moment
    later, or once they are done. A resume that finds the partial file in other hands
    drains its bytes and is refused, unless the object is there by then."""
    size, cut = 6 * MB, 2 * MB
    outcomes = {}
    for rep in range(REPEATS):
        data = os.urandom(size)
        sha = hashlib.sha256(data).hexdigest()
        workdir = str(tmp_path / ("w%d" % rep))
        cache = Cache(workdir)
        with pytest.raises(StageError, match="stream ended"):  # the connection died
            cache.receive(sha, size, 0, io.BufferedReader(io.BytesIO(data[:cut])))
        assert cache.partial_size(sha, size) == cut
        cache.db.close()
        workers = [(upload, "up-resumed", workdir, sha, size, cut, data[cut:],
                    {"pause": 0.03}),  # 16 pieces 30 ms apart: 0.5 s
                   (upload, "up-fresh", workdir, sha, size, 0, data, {"pause": 0.01})]
        later = (None, 0.1, 0.8)[rep % 3]
        if later is not None:
            workers.append((upload, "up-resumed-again", workdir, sha, size, cut, data[cut:],
                            None, later))
        got = run(*workers)
        assert_sound(workdir, sha, size)
        assert_received(got, ["up-fresh"])
        for name in ("up-resumed", "up-resumed-again"):
            if name in got:
                why, rest, _secs = got[name]
                assert rest == TRAILER, "%s left the stream out of step" % name
                assert why is None or "could not resume" in why, why
                key = (name, later, "refused" if why else "ok")
                outcomes[key] = outcomes.get(key, 0) + 1
    print("resumes: %s" % sorted(outcomes.items(), key=str))


@pytest.mark.slow
def test_partial_size_waits_for_a_writer_only_while_it_may_give_up(tmp_path):
    """A check (partial_size) while another server has the partial file: a live upload is
    not waited for beyond GRACE (0: not resumable now); a server whose client died (it
    writes what was on the way, then finds the stream's end) and one whose link was cut
    (nothing comes; it gives up after its stall time) are waited for, and the bytes they
    leave are offered for resume."""
    size, grace = 6 * MB, cachemod.GRACE
    data = os.urandom(size)
    sha = hashlib.sha256(data).hexdigest()
    waited = {}
    cases = [("live", {"pause": 0.2}, 0),  # 24 pieces 200 ms apart: 4.8 s
             ("client died", {"pause": 0.05, "cut": 3 * MB}, 3 * MB),
             ("link cut", {"pause": 0, "cut": 2 * MB, "hang": grace + 1}, 2 * MB)]
    for case, pace, expected in cases:
        workdir = str(tmp_path / case.replace(" ", "-"))
        cache = Cache(workdir)
        start, results = CTX.Barrier(1), CTX.Queue()
        writer = CTX.Process(target=upload, args=("up", start, results, workdir, sha, size, 0,
                                                  data, pace))
        writer.start()
        part = os.path.join(cache.partial, sha)
        want = 2 * MB if "hang" in pace else 1  # the writer has begun (or stalled)
        deadline = time.monotonic() + 10
        while not (os.path.exists(part) and os.path.getsize(part) >= want):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        offset = cache.partial_size(sha, size)
        waited[case] = round(time.monotonic() - t0, 2)
        _name, why, rest, _secs = results.get(timeout=30)
        writer.join(timeout=10)
        assert offset == expected, case
        if case == "live":
            assert why is None and rest == TRAILER
            assert waited[case] < grace + 1, "waited %.2f s for a live upload" % waited[case]
        else:
            assert why.startswith("raised StageError")  # the stream ended: gave up
            assert waited[case] < grace + 3
            assert cache.receive(sha, size, offset, stream(data[offset:])) is None
        assert_sound(workdir, sha, size)
    print("partial_size() took %s" % waited)


def test_leftovers_of_dead_servers_are_swept(tmp_path):
    workdir = str(tmp_path / "w")
    cache = Cache(workdir)
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    assert cache.receive(sha, len(data), 0, stream(data)) is None
    leftovers = {name: os.path.join(cache.partial, name) for name in (
        sha,  # a cut upload of what is now in the cache: nobody will resume it
        "ab" * 32,  # a cut upload still to resume
        "cd" * 32 + ".1.dead", "ef" * 32 + ".2.live")}  # private files, old and new
    for path in leftovers.values():
        with open(path, "wb") as f:
            f.write(b"x" * 100)
    os.utime(leftovers["cd" * 32 + ".1.dead"], (time.time() - cachemod.STALE - 60,) * 2)
    Cache(workdir)  # a server starting
    assert sorted(os.listdir(cache.partial)) == ["ab" * 32, "ef" * 32 + ".2.live"]


def test_bad_content_and_changed_objects(tmp_path):
    """Refused content leaves nothing; an object changed in place (through a mirror's
    hard link) is deleted by present() and received again."""
    workdir = str(tmp_path / "w")
    cache = Cache(workdir)
    for size in (1 * MB, 6 * MB):
        data = os.urandom(size)
        sha = hashlib.sha256(data).hexdigest()
        s = stream(data[:-1] + b"!")
        assert "changed during upload" in cache.receive(sha, size, 0, s)
        assert s.read() == TRAILER and not os.listdir(cache.partial)
        assert not os.path.exists(cache.path(sha)) and cache.records([sha]) == {}
        assert cache.receive(sha, size, 0, stream(data)) is None
        os.chmod(cache.path(sha), 0o644)
        with open(cache.path(sha), "r+b") as f:
            f.write(b"CORRUPT")
        assert cache.present(sha, size, cache.records([sha])[sha]) == (False, True)
        assert not os.path.exists(cache.path(sha)) and cache.records([sha]) == {}
        assert cache.receive(sha, size, 0, stream(data)) is None
        assert_sound(workdir, sha, size)
        os.unlink(cache.path(sha))


def test_cache_of_0_1_keeps_working(tmp_path):
    """An index without inodes: the column is added, and objects are trusted by size and
    mtime, their inode recorded on first use."""
    import sqlite3
    workdir = str(tmp_path / "w")
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    path = os.path.join(workdir, "cache", "objects", sha[:2], sha)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(data)
    st = os.stat(path)
    db = sqlite3.connect(os.path.join(workdir, "cache", "index.sqlite"))
    db.execute("CREATE TABLE objects (sha256 TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER)")
    db.execute("INSERT INTO objects VALUES (?,?,?)", (sha, st.st_size, st.st_mtime_ns))
    db.commit()
    db.close()
    cache = Cache(workdir)
    assert cache.records([sha]) == {sha: (st.st_size, st.st_mtime_ns, None)}
    assert cache.present(sha, 1000, cache.records([sha])[sha]) == (True, False)
    assert cache.records([sha]) == {sha: (st.st_size, st.st_mtime_ns, st.st_ino)}
    assert cache.receive(sha, 1000, 0, stream(data)) is None  # kept, not rewritten
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
