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
                    sp.CacheInfo(gc=True, min_age=1.0), sp.Mirrors()):
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
