"""The agent's staging endpoint: a new process stages through a port forward, with no remote
shell; both sides prove the token; a stale or foreign endpoint costs a fallback, never data
or a secret. Real sshd, agent and endpoint process; the foreign listener is a real process
on the cluster's loopback."""
import json
import os
import signal
import socket
import threading
import time

import pytest

from scipion_cloudexec.cluster import endpoints
from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.cluster.ssh import SSHConnection, Target
from scipion_cloudexec.cluster.stager import Stager
from scipion_cloudexec.remote.daemon import _alive as alive
from scipion_cloudexec.remote.stage_endpoint import proof

pytestmark = pytest.mark.bed


def agent_state(c) -> dict:
    with open(os.path.join(c.workdir, "agent", "agent.json")) as f:
        return json.load(f)


def assert_mirror(c, data) -> None:
    """The cluster's mirror holds exactly *data*'s bytes."""
    for rel, content in data.items():
        with open(os.path.join(c.workdir, "projects", "proj", rel), "rb") as f:
            assert f.read() == content, rel


def endpoint_pid(port: int) -> int:
    """The pid listening on 127.0.0.1:port (from /proc: the endpoint's own process)."""
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1].endswith(":%04X" % port) and parts[3] == "0A":
                inode = parts[9]
    assert inode, "nothing listens on port %d" % port
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir("/proc/%s/fd" % pid):
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) == "socket:[%s]" % inode:
                    return int(pid)
        except OSError:
            continue
    raise AssertionError("no process owns port %d" % port)


def project(tmp_path, n=20):
    root = tmp_path / "proj"
    data = {}
    for i in range(n):
        rel = "Runs/000002_ProtImport/extra/mic%03d.mrc" % i
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data[rel] = os.urandom(1000 + 37 * i)
        p.write_bytes(data[rel])
    return root, data


def agent_up(c, tmp_path) -> dict:
    """Start the cluster's agent as a protocol run does (the desktop then knows it); its
    agent.json."""
    with ClusterSession(c, hash_cache=str(tmp_path / "h0.sqlite")):
        return agent_state(c)


def new_stager(c, tmp_path):
    ssh = SSHConnection(Target.of(c))
    ssh.connect()
    return Stager(ssh, c, hash_cache=str(tmp_path / "hashes.sqlite"))


def test_a_new_process_stages_through_the_endpoint_with_no_remote_shell(make_cluster, tmp_path):
    c = make_cluster("local")
    root, data = project(tmp_path)
    with ClusterSession(c, hash_cache=str(tmp_path / "h0.sqlite")) as s:
        s.start(stage=True)
        stage = agent_state(c)["stage"]
        assert "stage" not in s.agent_state, "the token stays out of the public state"
        pid = endpoint_pid(stage["port"])
        s.stage_in(str(root), ["Runs"], "proj")
    # the next process: what the desktop remembered is enough, no agent start, no exec
    st = new_stager(c, tmp_path)
    sessions = []
    transport = st.ssh._require()
    real_open = transport.open_session
    transport.open_session = lambda *a, **k: (sessions.append(1), real_open(*a, **k))[1]
    try:
        assert st.endpoint == {"port": stage["port"], "token": stage["token"]}
        r = st.stage_in(str(root), ["Runs"], "proj")
        assert st._chan.kind == "endpoint"
        assert r.bytes_sent == 0 and r.unchanged == len(data)
        (root / "Runs/000002_ProtImport/extra/new.mrc").write_bytes(b"x" * 5000)
        r = st.stage_in(str(root), ["Runs"], "proj")
        assert r.bytes_sent == 5000 and st._chan.kind == "endpoint"
        assert sessions == [], "a remote command ran"
    finally:
        st.close()
        st.ssh.close()
    assert_mirror(c, data)
    log = open(os.path.join(c.workdir, "agent", "agent.log")).read()
    assert stage["token"] not in log and "staging endpoint pid %d" % pid in log
    mode = os.stat(os.path.join(endpoints.folder())).st_mode & 0o777
    assert mode == 0o700
    for name in os.listdir(endpoints.folder()):
        assert os.stat(os.path.join(endpoints.folder(), name)).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_the_endpoint_stops_with_its_agent_and_a_stale_one_costs_a_fallback(make_cluster,
                                                                             tmp_path, sig):
    c = make_cluster("local")
    root, data = project(tmp_path)
    state = agent_up(c, tmp_path)
    port = state["stage"]["port"]
    pid = endpoint_pid(port)
    os.kill(int(state["pid"]), sig)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the endpoint outlived its agent"
    st = new_stager(c, tmp_path)
    try:
        assert st.endpoint is not None, "remembered from the session"
        r = st.stage_in(str(root), ["Runs"], "proj")
        assert r.files == len(data) and st._chan.kind == "paramiko"
        assert st.endpoint is None and not os.path.exists(endpoints._path(c)), "forgotten"
    finally:
        st.close()
        st.ssh.close()
    assert_mirror(c, data)


class Impostor:
    """Another user's process that took the endpoint's port: it records what it is sent."""

    def __init__(self, port: int):
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(4)
        self.got = b""
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            conn.sendall(b'{"endpoint": 1, "nonce": "00112233445566778899aabbccddeeff"}\n')
            conn.settimeout(2)
            try:
                while True:
                    b = conn.recv(65536)
                    if not b:
                        break
                    self.got += b
                    if self.got.count(b"\n") == 1:  # answers the client's proof with a guess
                        conn.sendall(b'{"proof": "%s"}\n' % (b"0" * 64))
            except OSError:
                pass
            conn.close()

    def close(self):
        self.srv.close()


def test_an_impostor_on_the_port_gets_no_request_and_the_staging_goes_on(make_cluster,
                                                                         tmp_path):
    c = make_cluster("local")
    root, data = project(tmp_path)
    state = agent_up(c, tmp_path)
    token = state["stage"]["token"]
    os.kill(int(state["pid"]), signal.SIGTERM)
    port = state["stage"]["port"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            impostor = Impostor(port)
            break
        except OSError:  # the endpoint is still going
            time.sleep(0.05)
    else:
        pytest.fail("port %d never freed" % port)
    try:
        st = new_stager(c, tmp_path)
        try:
            r = st.stage_in(str(root), ["Runs"], "proj")
            assert r.files == len(data) and st._chan.kind == "paramiko"
        finally:
            st.close()
            st.ssh.close()
    finally:
        impostor.close()
    assert impostor.got, "the client reached the impostor"
    assert impostor.got.count(b"\n") == 1, "a request after the failed proof: %r" % impostor.got
    assert token.encode() not in impostor.got and b"mic0" not in impostor.got
    assert_mirror(c, data)


def test_a_client_without_the_token_is_closed_unserved(make_cluster, tmp_path):
    c = make_cluster("local")
    with ClusterSession(c, hash_cache=str(tmp_path / "h0.sqlite")):  # started
        stage = agent_state(c)["stage"]
        token = bytes.fromhex(stage["token"])

        def attempt(key: bytes):
            with socket.create_connection(("127.0.0.1", stage["port"]), timeout=10) as k:
                f = k.makefile("rb")
                ns = json.loads(f.readline())["nonce"]
                k.sendall(json.dumps({"nonce": "ab" * 16,
                                      "proof": proof(key, "client", ns, "ab" * 16)})
                          .encode() + b"\n" + b'{"cmd": "hello", "protocol": 0}\n')
                try:
                    return ns, f.read()  # until the server closes
                except ConnectionResetError:  # closed with our hello unread
                    return ns, b""

        _ns, refused = attempt(b"\x01" * 32)
        assert refused == b"", "served without the token: %r" % refused
        ns, served = attempt(token)
        lines = served.splitlines()
        assert json.loads(lines[0]) == {"proof": proof(token, "server", ns, "ab" * 16)}
        assert json.loads(lines[1])["error"] == "protocol", served  # then staging: protocol 0


RELAY = r"""
import socket, sys, threading
up = int(sys.argv[1])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
a, _ = srv.accept()
b = socket.create_connection(("127.0.0.1", up))
def pipe(x, y):
    try:
        while True:
            d = x.recv(65536)
            if not d:
                break
            y.sendall(d)
    except OSError:
        pass
    for s in (x, y):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
t = threading.Thread(target=pipe, args=(b, a))
t.start()
pipe(a, b)
t.join()
"""


def children_of(pid: int) -> list:
    out = []
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, task)) as f:
            out += f.read().split()
    return out


def test_a_relay_run_by_another_user_is_closed_before_any_server_or_nonce(make_cluster,
                                                                          tmp_path):
    """Another user relaying to the endpoint (as from another login node to this one) would
    pass both proofs through unchanged and then read the staging stream: the endpoint serves
    only connections whose other end is its own user's."""
    import shutil
    import subprocess
    python, setpriv = "/usr/bin/python3", shutil.which("setpriv")
    if os.getuid() != 0 or not setpriv or not os.path.exists(python):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to run a relay as nobody")
    c = make_cluster("local")
    with ClusterSession(c, hash_cache=str(tmp_path / "h0.sqlite")):  # started
        stage = agent_state(c)["stage"]
        listener = endpoint_pid(stage["port"])
        before = children_of(listener)
        relay = subprocess.Popen([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                                  python, "-c", RELAY, str(stage["port"])],
                                 stdout=subprocess.PIPE, text=True)
        try:
            port = int(relay.stdout.readline())
            with socket.create_connection(("127.0.0.1", port), timeout=10) as k:
                try:
                    got = k.recv(4096)
                except ConnectionResetError:
                    got = b""
            assert got == b"", "the endpoint answered a relay of another user: %r" % got
            assert children_of(listener) == before, "a server was forked for the relay"
        finally:
            relay.kill()
            relay.wait()
        # our own user's connection is still served
        with socket.create_connection(("127.0.0.1", stage["port"]), timeout=10) as k:
            assert json.loads(k.makefile("rb").readline())["endpoint"] == 1
    log = open(os.path.join(c.workdir, "agent", "agent.log")).read()
    assert "connection(s) refused" in log and "peer uid 65534" in log


def test_an_endpoint_that_died_is_replaced_and_a_remembered_agent_that_is_not_ours_is_left(
        make_cluster, tmp_path):
    c = make_cluster("local", heartbeat=0.5)
    root, data = project(tmp_path)
    old = agent_up(c, tmp_path)["stage"]
    os.kill(endpoint_pid(old["port"]), signal.SIGKILL)
    deadline = time.monotonic() + 20  # the agent looks at each lease renewal
    while agent_state(c).get("stage", {}).get("port") in (None, old["port"]):
        assert time.monotonic() < deadline, "the dead endpoint was not replaced"
        time.sleep(0.1)
    new = agent_state(c)["stage"]
    assert new["token"] != old["token"]
    # the desktop remembers an agent whose pid is not the one answering: not trusted
    path = endpoints._path(c)
    with open(path) as f:
        entry = json.load(f)
    entry["agent"]["pid"] += 1
    with open(path, "w") as f:
        json.dump(entry, f)
    s = ClusterSession(c, hash_cache=str(tmp_path / "h1.sqlite"))
    try:
        ran = []
        real = s.ssh.run
        s.ssh.run = lambda cmd, **k: (ran.append(cmd), real(cmd, **k))[1]
        s.start(stage=True)
        assert len(ran) == 1, "the agent was not started over SSH: %s" % ran
        s.stage_in(str(root), ["Runs"], "proj")
    finally:
        s.close()
    with open(path) as f:
        entry = json.load(f)
    assert entry["agent"]["pid"] == agent_state(c)["pid"] and entry["stage"] == new
    st = new_stager(c, tmp_path)
    try:
        r = st.stage_in(str(root), ["Runs"], "proj")
        assert st._chan.kind == "endpoint" and r.unchanged == len(data)
    finally:
        st.close()
        st.ssh.close()


def test_parallel_openssh_streams_reach_the_endpoint_with_no_remote_shell(make_cluster,
                                                                          tmp_path):
    """Large and many files go over several OpenSSH streams: each is an ``ssh -W`` to the
    endpoint (a login, no shell, no Python start) once the endpoint is known."""
    from scipion_cloudexec.cluster import streams
    c = make_cluster("local", streams="3", transfer="openssh")
    root, data = project(tmp_path, n=40)
    big = "Runs/000002_ProtImport/extra/movie.mrcs"
    data[big] = os.urandom(streams.CHUNKED_MIN + (3 << 20))
    (root / big).write_bytes(data[big])
    with ClusterSession(c, hash_cache=str(tmp_path / "h0.sqlite")):
        pass  # the agent started, its endpoint remembered
    st = new_stager(c, tmp_path)
    try:
        r = st.stage_in(str(root), ["Runs"], "proj")
        kinds = {ch.kind for ch in st._pool.channels}
        n = len(st._pool.channels)
        assert r.bytes_sent == sum(map(len, data.values()))
    finally:
        st.close()
        st.ssh.close()
    assert kinds == {"openssh endpoint"} and n >= 2, (kinds, n)
    assert_mirror(c, data)
