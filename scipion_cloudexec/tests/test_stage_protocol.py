"""The staging wire protocol (issue 11): typed requests, and a version in the handshake that
is reported as such on both sides. The server is the real one, run as a local process on
pipes (the same byte stream an SSH exec channel carries)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import scipion_cloudexec
from scipion_cloudexec.cluster.channels import ServerChannel
from scipion_cloudexec.cluster.errors import VersionMismatch
from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.remote import stage_protocol as sp

PKG = os.path.dirname(os.path.abspath(scipion_cloudexec.__file__))


def release(tmp_path, protocol: int) -> str:
    """What a bundle of staging protocol *protocol* holds: remote/ and version.py under an
    empty package (as bundle.py zips them)."""
    root = tmp_path / ("release-%d" % protocol)
    pkg = root / "scipion_cloudexec"
    shutil.copytree(os.path.join(PKG, "remote"), str(pkg / "remote"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(PKG, "version.py"), str(pkg / "version.py"))
    (pkg / "__init__.py").write_text("")
    proto = pkg / "remote" / "stage_protocol.py"
    text = proto.read_text()
    assert "STAGE_PROTOCOL = %d" % sp.STAGE_PROTOCOL in text
    proto.write_text(text.replace("STAGE_PROTOCOL = %d" % sp.STAGE_PROTOCOL,
                                  "STAGE_PROTOCOL = %d" % protocol))
    return str(root)


def server(root: str, workdir: str) -> subprocess.Popen:
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from scipion_cloudexec.remote.stage_server import main\n"
            "sys.exit(main(sys.argv[1:]))" % root)
    return subprocess.Popen([sys.executable, "-S", "-c", code, "serve", "--workdir", workdir],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


class PipeChannel(ServerChannel):
    """A carrier whose stream is a local server process's stdin and stdout."""

    kind = "pipe"

    def __init__(self, cluster: ClusterConfig, proc: subprocess.Popen):
        super().__init__(cluster)
        self.proc = proc
        self.out = proc.stdout
        self.send(sp.Hello())

    def sendall(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def exit_status(self):
        return self.proc.poll()

    def stderr(self) -> str:
        return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_every_request_travels_as_one_typed_line():
    for request in (sp.Hello(), sp.StageIn(mirror="projects/p", files=[["a", 1, "x" * 64]],
                                           dirs=["d"], check=True, stall=5.0),
                    sp.ListTree(root="/r", dir="d", exclude=["logs"]),
                    sp.Send(root="/r", paths=["a"]), sp.Reset(mirror="projects/p", dir="d"),
                    sp.Remove(mirror="projects/p", paths=[["a", "x"]]),
                    sp.CacheInfo(gc=True, min_age=1.0), sp.Mirrors(),
                    sp.ChunkPlan(sha256="a" * 64, size=3 << 20, chunk=1 << 20),
                    sp.Chunk(sha256="a" * 64, size=3 << 20, chunk=1 << 20, index=2, stall=5.0),
                    sp.Publish(sha256="a" * 64, size=3 << 20, chunk=1 << 20)):
        line = request.encode()
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line)["cmd"] == request.CMD
        assert sp.decode(line) == request
    for bad in (b"not json\n", b'{"cmd": "format"}\n', b'{"cmd": "list", "rot": "/"}\n'):
        with pytest.raises(sp.BadRequest, match="not a staging request"):
            sp.decode(bad)


def test_the_server_answers_a_hello_of_its_own_protocol_and_serves(tmp_path):
    proc = server(os.path.dirname(PKG), str(tmp_path / "work"))
    out, _err = proc.communicate(sp.Hello().encode() + sp.Mirrors().encode(), timeout=30)
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert lines == [{"ok": True, "protocol": sp.STAGE_PROTOCOL}, {"mirrors": []}]


def test_the_server_runs_in_process_on_any_byte_stream(tmp_path):
    """No SSH, no subprocess: the server's handlers answer on the stream they are given."""
    import io
    from scipion_cloudexec.remote.stage_server import serve
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f.txt").write_bytes(b"hello")
    r, w = os.pipe()
    os.write(w, sp.Hello().encode() + sp.ListTree(root=str(tree), dir="d").encode()
             + sp.Send(root=str(tree), paths=["d/f.txt"]).encode())
    os.close(w)
    out = io.BytesIO()
    try:
        assert serve(str(tmp_path / "work"), stdin_fd=r, stdout=out) == 0
    finally:
        os.close(r)
    lines = out.getvalue().split(b"\n")
    assert json.loads(lines[0]) == {"ok": True, "protocol": sp.STAGE_PROTOCOL}
    listing = json.loads(lines[1])
    assert [f[0] for f in listing["files"]] == ["d/f.txt"] and listing["exists"]
    assert json.loads(lines[2]) == {"path": "d/f.txt", "size": 5}
    assert lines[3].startswith(b"hello") and b"sha256" in lines[3]


def test_the_server_refuses_a_request_before_the_hello(tmp_path):
    proc = server(os.path.dirname(PKG), str(tmp_path / "work"))
    out, _err = proc.communicate(sp.Mirrors().encode(), timeout=30)
    answer = json.loads(out.splitlines()[0])
    assert answer["error"] == "failed" and "first request must be hello" in answer["detail"]


def test_the_server_names_another_staging_protocol_and_stops(tmp_path):
    """A client of another protocol is told so, not served requests it would misread."""
    proc = server(os.path.dirname(PKG), str(tmp_path / "work"))
    hello = sp.Hello(protocol=sp.STAGE_PROTOCOL + 1)
    out, _err = proc.communicate(hello.encode() + sp.Mirrors().encode(), timeout=30)
    answers = [json.loads(ln) for ln in out.splitlines()]
    assert len(answers) == 1, "nothing after the refusal: %s" % answers
    assert answers[0]["error"] == "protocol"
    assert "staging protocol %d, this staging server speaks %d" % (
        sp.STAGE_PROTOCOL + 1, sp.STAGE_PROTOCOL) in answers[0]["detail"]
    assert proc.returncode == 3


def test_the_client_reports_a_server_of_another_staging_protocol_as_version_mismatch(tmp_path):
    other = sp.STAGE_PROTOCOL + 1
    cluster = ClusterConfig(name="c", host="h", user="u", identity_file="", python=sys.executable,
                            launcher="local", slots=1, workdir=str(tmp_path / "work"))
    ch = PipeChannel(cluster, server(release(tmp_path, other), str(tmp_path / "work")))
    try:
        ch.send(sp.Mirrors())
        with pytest.raises(VersionMismatch) as e:
            ch.line()
    finally:
        ch.close()
    text = str(e.value)
    assert "cluster c" in text
    assert "staging protocol %d, this client %d" % (other, sp.STAGE_PROTOCOL) in text
    assert "this staging server speaks %d" % other in text


def _serve_bytes(workdir, data: bytes) -> list:
    """Run the server in-process on *data*; its answers (keep-alives left out)."""
    import io
    import threading
    from scipion_cloudexec.remote.stage_server import serve
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    out = io.BytesIO()
    try:
        serve(workdir, stdin_fd=r, stdout=out)
    finally:
        writer.join()
        os.close(r)
    return [a for a in map(json.loads, out.getvalue().splitlines()) if a != {"alive": 1}]


def test_chunks_written_by_two_servers_out_of_order_are_published_once_whole(tmp_path):
    """Protocol 2: chunks land at their offsets whichever server writes them; Publish says
    what is missing until every chunk is recorded, then hashes and publishes the file."""
    import hashlib
    mb = 1 << 20
    data = os.urandom(3 * mb + 17)
    sha = hashlib.sha256(data).hexdigest()
    work = str(tmp_path / "work")
    plan = dict(sha256=sha, size=len(data), chunk=mb)

    def chunk(i):
        return sp.Chunk(index=i, **plan).encode() + data[i * mb:(i + 1) * mb]

    first = _serve_bytes(work, sp.Hello().encode() + chunk(3) + chunk(1)
                         + sp.Publish(**plan).encode())
    assert first[1:] == [{"ok": True}, {"ok": True}, {"missing": [0, 2]}]
    second = _serve_bytes(work, sp.Hello().encode() + sp.ChunkPlan(**plan).encode() + chunk(0)
                          + chunk(2) + sp.Publish(**plan).encode() + sp.ChunkPlan(**plan).encode())
    assert second[1:] == [{"present": False, "have": [1, 3]}, {"ok": True}, {"ok": True},
                          {"ok": True}, {"present": True, "have": []}]
    with open(os.path.join(work, "cache", "objects", sha[:2], sha), "rb") as f:
        assert f.read() == data
    assert os.listdir(os.path.join(work, "cache", "chunks")) == []


def test_a_file_of_another_hash_is_not_published_and_its_chunks_are_dropped(tmp_path):
    import hashlib
    mb = 1 << 20
    data = os.urandom(2 * mb)
    sha = hashlib.sha256(data).hexdigest()
    bad = bytearray(data)
    bad[mb + 5] ^= 1
    work = str(tmp_path / "work")
    plan = dict(sha256=sha, size=len(data), chunk=mb)
    answers = _serve_bytes(work, sp.Hello().encode()
                           + sp.Chunk(index=0, **plan).encode() + bytes(bad[:mb])
                           + sp.Chunk(index=1, **plan).encode() + bytes(bad[mb:])
                           + sp.Publish(**plan).encode() + sp.ChunkPlan(**plan).encode())
    assert answers[3] == {"bad": hashlib.sha256(bad).hexdigest()}
    assert answers[4] == {"present": False, "have": []}
    assert not os.path.exists(os.path.join(work, "cache", "objects", sha[:2], sha))


def test_safe_rel_refuses_every_path_that_leaves_its_root_and_normalizes_as_normpath():
    """The server's guard on every path a client names; its fast path for clean paths must
    agree with the normpath rule it shortcuts, on hostile paths and random ones."""
    import os
    import random
    from scipion_cloudexec.remote.cache import StageError
    from scipion_cloudexec.remote.stage_server import safe_rel

    def rule(rel):
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm == ".." or norm.startswith("../") or "\0" in rel \
                or not rel:
            return None
        return norm

    rng = random.Random(13)
    parts = ["a", "b", ".", "..", "", "...", "..a", "a..", "é", "\0", " "]
    cases = ["../x", "a/../../x", "/etc/passwd", "a/\0b", "", "..", "a//b", "./a/./b/",
             "a/b/../../..", "Runs/000007_X/../../../evil1"]
    cases += ["/".join(rng.choice(parts) for _ in range(rng.randint(1, 5)))
              for _ in range(5000)]
    for rel in cases:
        want = rule(rel)
        try:
            got = safe_rel(rel)
        except StageError:
            got = None
        assert got == want, rel
    for hostile in ("../x", "a/../../x", "/etc/passwd", "a/\0b", "", ".."):
        with pytest.raises(StageError):
            safe_rel(hostile)
