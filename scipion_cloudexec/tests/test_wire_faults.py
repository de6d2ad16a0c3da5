"""Faults on the wire, caused for real against a real agent through the real sshd: a peer
on the head node (a plain ZeroMQ DEALER on the agent's loopback port, as another local user
could open) flooding forged messages or sending an oversized one, replayed authentic
frames, and an agent of another protocol version left running on the cluster."""
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from scipion_cloudexec.cluster import bundle
from scipion_cloudexec.cluster.errors import JobCancelled, VersionMismatch
from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.remote.server import Agent
from scipion_cloudexec.tests.test_agent import agent_state, alive, collect, wait_until
from scipion_cloudexec.remote import messages as m
from scipion_cloudexec.version import PROTOCOL_VERSION

PY = sys.executable
#: the other release's protocol: 1, the one before this (2 when run on protocol-1 code)
OTHER = 1 if PROTOCOL_VERSION != 1 else 2


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def peer(port, curve=None):
    """A DEALER on the agent's port from the head node, without the message secret; with
    *curve* (the agent's CURVE key, which only the agent's user can read) past the socket's
    handshake, so that what it sends reaches the agent's message checks."""
    from scipion_cloudexec.remote.transport import connect_curve
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect_curve(sock, curve)
    sock.connect("tcp://127.0.0.1:%d" % port)
    return sock


def agent_log(cluster):
    with open(os.path.join(cluster.workdir, "agent", "agent.log")) as f:
        return f.read()


def test_flood_and_oversized_message_from_a_head_node_peer(make_cluster, reliability):
    """200 MB in one frame and 100,000 forged messages from a peer past the socket's CURVE
    handshake (it knows the agent's key, not the message secret), while an honest client's
    job runs: the agent's memory stays bounded, the client loses nothing, the log shows the
    drops once (rate limited)."""
    # heartbeat 1 s (lost after 3 s): a busy CI machine made 0.5 s (1.5 s) too tight once
    c = make_cluster("local", heartbeat=1.0)
    lines = 4000
    expected = "".join("line %d\n" % i for i in range(lines))
    with ClusterSession(c) as client:
        pid, port = client.welcome.pid, int(client.agent_state["port"])
        before = rss_kib(pid)
        out = {}
        gate = os.path.join(c.workdir, "gate")
        fut = client.submit(["/bin/sh", "-c", "i=0; while [ $i -lt %d ]; do echo line $i; "
                             "i=$((i+1)); [ $((i %% 500)) = 0 ] && sleep 0.2; done; "
                             "while [ ! -e %s ]; do sleep 0.05; done" % (lines, gate)],
                            on_output=collect(out))
        wait_until(lambda: fut.running(), 10, "job running")
        stop = threading.Event()
        worst = {"rss": before, "gap": 0.0}

        def watch():  # agent memory and the client's silence, sampled during the faults
            while not stop.is_set():
                worst["rss"] = max(worst["rss"], rss_kib(pid))
                worst["gap"] = max(worst["gap"], time.monotonic() - client.agent.last_heard)
                time.sleep(0.02)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            big = peer(port, client.agent._curve)
            big.send_multipart([m.header(PROTOCOL_VERSION), b"\0" * 32, b"x" * (200 << 20)])
            flood = peer(port, client.agent._curve)
            forged = m.encode(m.Submit(spec={"job_id": "evil", "argv": ["true"]}), b"n" * 32)
            t0 = time.monotonic()
            for _ in range(100000):
                flood.send_multipart(forged)  # blocks while the agent's queue is full
            sent = time.monotonic() - t0
            # one connection's messages are read in order: the agent has read every forged
            # one when it answers an authentic ping queued behind them (the test knows the
            # secret; the flooding peer would not)
            flood.send_multipart(m.encode(m.Ping(seq=1), client.agent._secret))
            assert flood.poll(60000), "the agent answers after the flood"
            assert isinstance(m.decode(flood.recv_multipart(), client.agent._secret), m.Pong)
            drained = time.monotonic() - t0
            big.close()
            flood.close()
        finally:
            stop.set()
            watcher.join()
        open(gate, "w").close()
        result = fut.result(60)
        assert client.submit(["echo", "after"]).result(30).exit_code == 0
        names = [r["job_id"] for r in client.jobs()]
    print("flood: 100000 forged messages sent in %.2f s, drained in %.2f s; agent RSS %d KiB "
          "before, %d KiB at most; longest client silence %.2f s (heartbeat %.1f s, lost "
          "after %.1f s)" % (sent, drained, before, worst["rss"], worst["gap"], c.heartbeat,
                            3 * c.heartbeat))
    assert result.exit_code == 0 and out["stdout"].decode() == expected, "all output, in order"
    assert "evil" not in names
    assert worst["rss"] - before < 64 << 10, "the 200 MB frame is never buffered"
    reliability(fault="100,000 forged messages and one 200 MB frame from a head-node peer "
                "that has the agent's CURVE key (its user or root)", when="while a job runs",
                seen="nothing: the job completes with all its output; agent.log: "
                "rate-limited drop lines", recover_s="none needed",
                worst_gap_s=round(worst["gap"], 2), lost=0, twice=0)
    os.kill(pid, signal.SIGTERM)  # a stopping agent logs the drops it still counts
    wait_until(lambda: not alive(pid), 30, "agent stopped")
    log = agent_log(c)
    warnings = [line for line in log.splitlines() if "dropped" in line]
    assert len(warnings) == 2, warnings[:5]
    assert "dropped a message from peer" in warnings[0] and "authentication failed" in warnings[0]
    assert "dropped 99999 more message(s) from peer" in warnings[1], "every one read, dropped"


def test_a_head_node_peer_without_the_agents_key_gets_no_frame_in(make_cluster, reliability):
    """Before the agent's socket required CURVE, any process on the head node could make the
    agent assemble a message of up to 4 x 8 MiB per connection before its HMAC check dropped
    it (agent.log then said so). A peer without the agent's key now completes no handshake:
    nothing it sends reaches the agent, and the agent answers it nothing."""
    c = make_cluster("local")
    with ClusterSession(c) as client:
        port = int(client.agent_state["port"])
        assert client.agent._curve, "the agent's state line carries its CURVE key"
        socks = [peer(port) for _ in range(4)]
        for sock in socks:
            try:  # queued on the peer's side until a handshake that never completes
                sock.send_multipart([m.header(PROTOCOL_VERSION), b"\0" * 32] +
                                    [b"x" * ((8 << 20) - 64)] * 2, flags=zmq.NOBLOCK)
                sock.send_multipart(m.encode(m.Submit(spec={"job_id": "evil",
                                                            "argv": ["true"]}), b"n" * 32),
                                    flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        time.sleep(3)  # before CURVE, each drop was logged within milliseconds
        assert all(sock.poll(0) == 0 for sock in socks), "the agent answered a peer"
        for sock in socks:
            sock.close()
        assert "evil" not in [r["job_id"] for r in client.jobs()]
        assert client.submit(["true"]).result(30).exit_code == 0, "real clients still served"
    assert "dropped" not in agent_log(c), "a frame of a peer without the key reached the agent"
    reliability(fault="2 x 8 MB frames and a forged Submit from each of 4 head-node peers "
                "without the agent's CURVE key", when="while the agent serves",
                seen="nothing: no handshake completes, nothing reaches the agent (no drop line "
                "in agent.log), no answer", recover_s="none needed", lost=0, twice=0)


def test_drop_warnings_are_rate_limited_per_peer(tmp_path, caplog):
    """One warning at once, then one per peer per minute with the count and the reason
    (the clock is the loop's, passed in: no waiting a minute)."""
    agent = Agent(str(tmp_path))
    caplog.set_level(logging.WARNING, logger="cloudexec.agent")
    for i in range(1000):
        agent._dropped(b"\x01", "authentication failed", 100.0 + i * 0.01)
    agent._dropped(b"\x02", "not a cloudexec message", 105.0)
    assert [r.getMessage() for r in caplog.records] == [
        "dropped a message from peer 01: authentication failed",
        "dropped a message from peer 02: not a cloudexec message"]
    caplog.clear()
    agent._dropped(b"\x01", "malformed body", 161.0)  # a minute after peer 01's warning
    agent._flush_drops(170.0)  # peer 02 had nothing more: forgotten
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 1000 more message(s) from peer 01 in the last 61 s; last reason: "
        "malformed body"]
    caplog.clear()
    agent._flush_drops(300.0)
    agent._dropped(b"\x01", "authentication failed", 301.0)  # quiet since: at once again
    for i in range(500):  # many peers (one connection each): bounded bookkeeping and log
        agent._dropped(bytes([3]) + i.to_bytes(2, "big"), "authentication failed", 302.0)
    assert len(caplog.records) == 1 + 64 and len(agent._drops) <= 65
    assert caplog.records[-1].getMessage().startswith("dropped a message from other peers")


def test_replayed_messages_run_nothing_twice_and_do_no_harm(make_cluster, tmp_path,
                                                            monkeypatch, reliability):
    """Authentic frames captured from the client (as root could) and sent again verbatim by
    another peer: Submit attaches (existed), Cancel and Shutdown(only_if_idle) change
    nothing for the jobs that run."""
    c = make_cluster("local")
    sent = []
    encode = m.encode
    monkeypatch.setattr(m, "encode", lambda msg, *a, **k: sent.append(
        (msg.TYPE, encode(msg, *a, **k))) or sent[-1][1])
    captured = lambda kind: [f for t, f in sent if t == kind][-1]  # noqa: E731
    marker = tmp_path / "runs"
    gate = tmp_path / "gate"
    with ClusterSession(c) as client:
        secret = client.agent._secret
        assert client.submit(["/bin/sh", "-c", "echo run >> %s" % marker],
                             job_id="once").result(30).exit_code == 0
        victim = client.submit(["sleep", "60"], job_id="victim")
        wait_until(lambda: victim.running(), 10, "job running")
        client.cancel("victim")
        with pytest.raises(JobCancelled):
            victim.result(30)
        out = {}
        busy = client.submit(["/bin/sh", "-c", "echo start; while [ ! -e %s ]; do sleep 0.05; "
                              "done; echo end" % gate], job_id="busy", on_output=collect(out))
        wait_until(lambda: busy.running(), 10, "job running")
        assert client.shutdown_agent(only_if_idle=True) is False
        pid = client.welcome.pid

        sock = peer(int(client.agent_state["port"]), client.agent._curve)  # root reads it too

        def replay(frames, want):
            sock.send_multipart(frames)
            while True:  # read as root would (with the secret) what the agent answers
                assert sock.poll(10000), "no answer to the replayed %s" % want.__name__
                reply = m.decode(sock.recv_multipart(), secret)
                if isinstance(reply, want):  # (the watched job's output comes too)
                    return reply
        submits = [f for t, f in sent if t == "Submit"]
        for frames, job_id in ((submits[0], "once"), (submits[-1], "busy")):
            accepted = replay(frames, m.Accepted)
            assert accepted.job_id == job_id and accepted.existed is True
        assert replay(captured("Cancel"), m.Done).detail == "cancelled", "its own job only"
        assert replay(captured("Shutdown"), m.Done).ok is False, "refused: a job is active"
        sock.close()
        gate.write_text("go")
        result = busy.result(30)
        rows = {r["job_id"]: r for r in client.jobs()}
        assert client.ping() >= 0 and client.welcome.pid == pid == agent_state(c)["pid"]
    assert marker.read_text() == "run\n", "the replayed Submit did not run the job again"
    assert result.exit_code == 0 and out["stdout"] == b"start\nend\n"
    assert [rows[j]["state"] for j in ("once", "victim", "busy")] == [
        "done", "cancelled", "done"]
    assert len(rows) == 3
    reliability(fault="replayed authentic Submit, Cancel and Shutdown frames", when="any time",
                seen="nothing: Submit answered 'existed', the Cancel changes nothing, Shutdown "
                "refused while busy", recover_s="none needed", lost=0, twice=0)


def test_agent_answers_a_hello_of_another_protocol_so_that_its_client_can_read_it(
        make_cluster):
    """A client of protocol 1 (the envelope without frame lengths) or of a later version
    gets an explicit Error(kind="protocol") in its own envelope, not silence (once past the
    socket's CURVE handshake: clients before protocol 3 have no CURVE, and read the state
    line's protocol before they connect)."""
    import hashlib
    import hmac
    c = make_cluster("local")
    with ClusterSession(c) as client:
        secret = client.agent._secret
        sock = peer(int(client.agent_state["port"]), client.agent._curve)
        this, later_version = PROTOCOL_VERSION, PROTOCOL_VERSION + 1
        body = (b'{"rid":5,"client":"old desktop","version":"0.0.9+abc","protocol":1,'
                b'"t":"Hello","v":1}')
        sock.send_multipart([b"CX", hmac.new(secret, body, hashlib.sha256).digest(), body])
        assert sock.poll(10000), "the agent answers a protocol-1 Hello"
        head, mac, answer = sock.recv_multipart()
        # what a protocol-1 client checks before it reads an Error
        assert head == b"CX" and hmac.compare_digest(
            mac, hmac.new(secret, answer, hashlib.sha256).digest())
        assert b'"t":"Error"' in answer and b'"kind":"protocol"' in answer
        assert b'"rid":5' in answer and \
            b"speaks protocol %d and this client protocol 1" % this in answer
        later = m.encode(m.Hello(rid=6, client="new desktop"), secret, protocol=later_version)
        sock.send_multipart(later)
        assert sock.poll(10000), "and a later protocol's Hello"
        error = m.decode(sock.recv_multipart(), secret, protocol=later_version)
        assert (error.kind, error.rid) == ("protocol", 6) and \
            "protocol %d" % later_version in error.detail
        sock.close()
        assert client.ping() >= 0
    log = agent_log(c)
    assert "speaks protocol 1, this agent %d: refused" % PROTOCOL_VERSION in log
    assert "speaks protocol %d, this agent %d: refused" % (PROTOCOL_VERSION + 1,
                                                           PROTOCOL_VERSION) in log


@pytest.fixture
def other_protocol_release(tmp_path):
    """A copy of this package whose version.py says protocol OTHER: another release's client
    (its cli) and agent bundle (which its cli uploads and starts on the cluster)."""
    root = tmp_path / "other-release"
    here = os.path.dirname(os.path.dirname(os.path.abspath(bundle.__file__)))
    shutil.copytree(here, str(root / "scipion_cloudexec"),
                    ignore=shutil.ignore_patterns("__pycache__", "tests"))
    version = root / "scipion_cloudexec" / "version.py"
    text = version.read_text()
    assert "PROTOCOL_VERSION = %d" % PROTOCOL_VERSION in text
    version.write_text(text.replace("PROTOCOL_VERSION = %d" % PROTOCOL_VERSION,
                                    "PROTOCOL_VERSION = %d" % OTHER))
    return str(root)


def test_agent_of_another_protocol_busy_is_refused_clearly_then_replaced_once_idle(
        make_cluster, other_protocol_release, tmp_path, reliability):
    c = make_cluster("local")
    conf = tmp_path / "clusters.conf"
    conf.write_text("[cluster t]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = %s\n"
                    "known_hosts = %s\nworkdir = %s\npython = %s\nlauncher = local\nslots = 4\n"
                    "heartbeat = 0.5\n" % (c.port, c.user, c.identity_file, c.known_hosts,
                                           c.workdir, PY))
    gate = tmp_path / "gate"
    env = dict(os.environ, PYTHONPATH=other_protocol_release)
    old = subprocess.Popen([PY, "-m", "scipion_cloudexec.cli", "--config", str(conf), "run",
                            "t", "--job-id", "old-step", "--", "/bin/sh", "-c",
                            "echo started; while [ ! -e %s ]; do sleep 0.05; done; echo finished"
                            % gate], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                           cwd=str(tmp_path))  # not this tree: python -m looks in cwd first
    try:
        assert old.stdout.readline() == b"started\n", old.stderr.read() if old.poll() else ""
        old_agent = agent_state(c)
        assert old_agent["protocol"] == OTHER
        t0 = time.monotonic()
        with pytest.raises(VersionMismatch) as e:
            ClusterSession(c).start()
        refused = time.monotonic() - t0
        text = str(e.value)
        print(text)
        for part in ("cluster %s" % c.name, "protocol %d" % OTHER,
                     "protocol %d" % PROTOCOL_VERSION, "old-step",
                     "pid %d" % old_agent["pid"], "let them end", old_agent["version"]):
            assert part in text, part
        assert alive(old_agent["pid"]), "the busy agent is left alone"
        gate.write_text("go")
        rest, err = old.communicate(timeout=60)
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
    assert old.returncode == 0 and rest == b"finished\n", err
    assert agent_state(c)["pid"] == old_agent["pid"], "still there, idle"
    t0 = time.monotonic()
    with ClusterSession(c) as client:  # idle: replaced by this release's agent
        replaced = time.monotonic() - t0
        assert client.welcome.protocol == PROTOCOL_VERSION
        assert client.welcome.pid != old_agent["pid"]
        out = {}
        assert client.submit(["echo", "new"], on_output=collect(out)).result(30).exit_code == 0
        rows = {r["job_id"]: r["state"] for r in client.jobs()}
    assert out["stdout"] == b"new\n" and rows["old-step"] == "done"
    assert not alive(old_agent["pid"])
    assert "stopping idle agent pid %d (protocol %d" % (old_agent["pid"], OTHER) in agent_log(c)
    print("busy agent of protocol %d refused in %.2f s; idle one replaced, client started in "
          "%.2f s" % (OTHER, refused, replaced))
    reliability(fault="agent of another wire protocol on the cluster", when="a client starts",
                seen="busy: VersionMismatch naming the cluster, both versions, the pid and its "
                "jobs; idle: replaced, nothing to see", recover_s="refused in %.2f s; replaced "
                "in %.2f s" % (refused, replaced), lost=0, twice=0)


def test_a_request_over_the_agents_size_limit_fails_its_own_future_with_the_size(cluster):
    """The agent would close the connection of a frame over its limit, unread: the client
    refuses to send it, so that job fails at once and the connection serves the next."""
    with ClusterSession(cluster) as client:
        huge = client.submit(["true"], env={"HUGE": "x" * (m.MAX_REQUEST_FRAME + 1)})
        with pytest.raises(ValueError, match="Submit cannot be sent: .* at most %d"
                           % m.MAX_REQUEST_FRAME):
            huge.result(30)
        assert client.submit(["echo", "next"]).result(30).exit_code == 0
        assert huge.job_id not in [r["job_id"] for r in client.jobs()]
