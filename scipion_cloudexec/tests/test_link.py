"""The test bed's link model (testbed/link.py): it delivers the delay and the rate it claims
(measured as ratios, this machine being shared and noisy), blackholes and resets; and
staging through it at high latency resumes after a reset mid-file."""
import os
import socket
import statistics
import threading
import time

import pytest

from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.cluster.stager import Stager, StagingError
from scipion_cloudexec.remote.stage_protocol import Mirrors
from scipion_cloudexec.testbed.link import Link, LinkError
from scipion_cloudexec.cluster.ssh import SSHConnection, Target


class _Server:
    """A loopback TCP server in threads: "echo" sends back what it reads; "sink" counts
    what it reads and notes when the count reaches ``expect``."""

    def __init__(self, mode: str, expect: int = 0):
        self.mode, self.expect = mode, expect
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.received = 0
        self.done = threading.Event()
        self.first_at = self.done_at = 0.0
        self.errors = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with c:
                while True:
                    d = c.recv(1 << 20)
                    if not d:
                        return
                    if self.mode == "echo":
                        c.sendall(d)
                        continue
                    with self.lock:
                        if not self.received:
                            self.first_at = time.perf_counter()
                        self.received += len(d)
                        if self.expect and self.received >= self.expect:
                            self.done_at = time.perf_counter()
                            self.done.set()
        except OSError as e:
            self.errors.append(e)

    def close(self):
        self.sock.close()


@pytest.fixture
def echo():
    s = _Server("echo")
    yield s
    s.close()


def _exchange(sock, n=100):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    sock.sendall(b"p" * n)
    got = 0
    while got < n:
        d = sock.recv(n - got)
        assert d, "the link closed the connection"
        got += len(d)
    return time.perf_counter() - t0


def test_round_trip_is_twice_the_delay_and_a_connection_pays_the_handshake(echo):
    with Link(echo.address, delay_ms=20) as link:
        t0 = time.perf_counter()
        with socket.create_connection(link.address) as s:
            _exchange(s)
            first = time.perf_counter() - t0
            rtts = [_exchange(s) for _ in range(15)]
        assert link.stats()["connections"] == 1
    rtt = statistics.median(rtts)
    assert 0.95 <= rtt / 0.040 <= 1.25, "median RTT %.1f ms for 40 ms claimed" % (rtt * 1e3)
    # the handshake's round trip, then the exchange's: 80 ms on the modelled link
    assert 0.95 <= first / 0.080 <= 1.4, "first exchange %.1f ms, 80 expected" % (first * 1e3)


def _push(model, nbytes, streams=1):
    """Send *nbytes* one way into a sink through a link with *model*, over *streams*
    connections at once; the achieved rate in bytes/s, counted from the first byte's
    arrival to the last's (so the delay does not count)."""
    sink = _Server("sink", expect=nbytes)
    block = os.urandom(1 << 20)

    def send(address, left):
        with socket.create_connection(address) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            while left:
                n = min(left, len(block))
                s.sendall(block[:n])
                left -= n
            assert sink.done.wait(60), "only %d of %d bytes arrived" % (sink.received, nbytes)
    try:
        with Link(sink.address, **model) as link:
            threads = [threading.Thread(target=send, args=(link.address, nbytes // streams))
                       for _ in range(streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert link.stats()["up"] == nbytes
    finally:
        sink.close()
    return nbytes / (sink.done_at - sink.first_at)


@pytest.mark.parametrize("rate_mbit,delay_ms", [(200, 0), (200, 25)])
def test_rate_limit_is_what_it_claims(rate_mbit, delay_ms):
    claimed = rate_mbit * 1e6 / 8
    rate = _push(dict(delay_ms=delay_ms, rate_mbit=rate_mbit), int(claimed * 1.0))
    # never above the claim; below it only by what a loaded 2-core machine takes (seen 0.87)
    assert 0.7 <= rate / claimed <= 1.05, "%.1f MB/s for %.1f claimed" % (rate / 1e6,
                                                                          claimed / 1e6)


def test_parallel_connections_share_the_rate():
    """The rate is the link's, not each connection's: 4 streams together get what 1 does."""
    claimed = 200e6 / 8
    rate = _push(dict(delay_ms=10, rate_mbit=200), 24 << 20, streams=4)
    assert 0.7 <= rate / claimed <= 1.05, "%.1f MB/s for %.1f claimed" % (rate / 1e6,
                                                                          claimed / 1e6)


@pytest.mark.slow
def test_a_gigabit_link_with_delay_delivers_its_rate():
    """The case the benchmarks use: 1 Gbit/s at 50 ms one way (the proxy must keep a
    bandwidth-delay product of 6 MB in flight)."""
    claimed = 1000e6 / 8
    rate = _push(dict(delay_ms=50, rate_mbit=1000), int(claimed * 2))
    # the proxy shares 2 cores with the sender and the sink: allow some shortfall
    assert 0.7 <= rate / claimed <= 1.05, "%.1f MB/s for 125 claimed" % (rate / 1e6)


def test_blackhole_holds_everything_and_loses_nothing(echo):
    with Link(echo.address, delay_ms=5) as link:
        with socket.create_connection(link.address) as s:
            _exchange(s)
            link.blackhole()
            s.settimeout(0.5)
            s.sendall(b"held")
            with pytest.raises(socket.timeout):
                s.recv(10)
            late = socket.create_connection(link.address)  # a new connection is held too
            late.settimeout(0.5)
            late.sendall(b"x")
            with pytest.raises(socket.timeout):
                late.recv(1)
            assert link.stats()["blackholed"]
            link.blackhole(False)
            s.settimeout(5)
            late.settimeout(5)
            assert s.recv(10) == b"held"
            assert late.recv(1) == b"x"
            late.close()


def test_what_a_client_sent_before_closing_still_arrives():
    """A client that sends and closes at once (before the link's handshake is over): its
    bytes reach the target, then the close; once both ends closed, the link holds nothing."""
    sink = _Server("sink", expect=1000)
    try:
        with Link(sink.address, delay_ms=30) as link:
            with socket.create_connection(link.address) as s:
                s.sendall(b"x" * 1000)
            assert sink.done.wait(5), "%d of 1000 bytes arrived" % sink.received
            deadline = time.monotonic() + 5  # both ends closed: the link lets go of both
            while link.stats()["open"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert link.stats()["open"] == 0
    finally:
        sink.close()


def test_reset_and_reset_after_bytes(echo):
    with Link(echo.address, delay_ms=2) as link:
        s = socket.create_connection(link.address)
        _exchange(s)
        assert link.reset() == 1
        with pytest.raises(ConnectionResetError):
            s.settimeout(5)
            s.sendall(b"x")
            s.recv(1)  # the reset arrives on the next read at the latest
        s.close()
        with socket.create_connection(link.address) as s:  # the link itself stays up
            _exchange(s)
            link.reset_after(300_000)
            s.settimeout(5)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                for _ in range(100):
                    _exchange(s, 10_000)
        assert link.stats()["resets"] == 2
    with pytest.raises(LinkError, match="not started"):
        link.stats()


def test_link_process_ends_with_its_handle(echo):
    link = Link(echo.address).start()
    pid = link.pid
    link.close()
    assert not os.path.exists("/proc/%d" % pid) or \
        open("/proc/%d/stat" % pid).read().split()[2] == "Z"


# ---- staging at high latency ---------------------------------------------------------------

def _reset_mid_file_then_resume(c, tmp_path):
    """A 24 MB upload to cluster *c* through a 100 ms RTT, 400 Mbit/s link is reset once
    8 MB have gone up: the staging fails naming the cluster; staging again through the same
    link sends only what had not arrived, and the mirror holds exactly the source's bytes."""
    proj = tmp_path / "proj"
    movie = proj / "movies" / "movie.tiff"
    movie.parent.mkdir(parents=True)
    content = os.urandom(24 << 20)
    movie.write_bytes(content)
    opened = []

    def stager(cluster):
        ssh = SSHConnection(Target.of(cluster))
        ssh.connect()
        st = Stager(ssh, cluster, hash_cache=str(tmp_path / "hashes.sqlite"))
        opened.append(st)
        return st

    try:
        with Link((c.host, c.port), delay_ms=50, rate_mbit=400) as link:
            far = link.cluster(c)
            st = stager(far)
            st._ask(Mirrors())  # logged in and serving: count only the upload
            link.reset_after(8 << 20)
            with pytest.raises(StagingError, match="lost|stopped") as err:
                st.stage_in(str(proj), ["movies"], "proj")
            assert c.name in str(err.value)
            assert link.stats()["resets"] >= 1
            t0 = time.monotonic()
            r = stager(far).stage_in(str(proj), ["movies"], "proj")
            took = time.monotonic() - t0
        assert 0 < r.bytes_sent <= len(content) - (4 << 20), \
            "resumed, not restarted: %d bytes sent again" % r.bytes_sent
        with open(os.path.join(c.workdir, "projects", "proj", "movies", "movie.tiff"),
                  "rb") as f:
            assert f.read() == content
        assert took < 60, took
    finally:
        for st in opened:
            st.close()
            st.ssh.close()


@pytest.mark.slow
@pytest.mark.parametrize("transfer", ["paramiko", "openssh"])
def test_staging_reset_mid_file_at_100ms_rtt_resumes(make_cluster, tmp_path, transfer):
    """Through the link in front of the loopback sshd (see _reset_mid_file_then_resume)."""
    _reset_mid_file_then_resume(make_cluster("local", transfer=transfer), tmp_path)


@pytest.fixture(scope="module")
def far_host(testbed):
    """One namespaced host of this module's own (10.82.0.11, bridge cxbr-link: the shared
    sets of other tests stay untouched), taken down at the end."""
    from scipion_cloudexec.testbed.netns import NetnsClusters
    if not NetnsClusters.available():
        pytest.skip("network namespaces need root and iproute2 (ip netns)")
    n = NetnsClusters(testbed, 1, prefix="lk", net="10.82.0", bridge="cxbr-link")
    try:
        n.up()
    except Exception as e:
        n.down()
        pytest.fail("the namespaced host did not come up: %s" % e)
    yield n
    n.down()


@pytest.mark.slow
def test_staging_through_a_link_to_a_namespaced_cluster_resumes(far_host, testbed, tmp_path):
    """The same in front of a namespaced cluster's sshd (its own host, address and host
    key), over the system's OpenSSH."""
    name = far_host.names()[0]
    c = ClusterConfig(name=name, host=far_host.address(name), port=22, user=testbed.user,
                      identity_file=testbed.client_key, known_hosts=far_host.known_hosts,
                      workdir=str(tmp_path / "remote"), python=testbed.python,
                      launcher="local", slots=1, heartbeat=0.5, connect_timeout=5.0,
                      transfer="openssh")
    _reset_mid_file_then_resume(c, tmp_path)
