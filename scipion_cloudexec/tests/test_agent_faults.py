"""Faults and bad input on the agent's side (issue 10), made for real where they can be:
two login nodes sharing one workdir (network, UTS and mount namespaces), a planted symlink,
a job writing a gigabyte at its end, SLURM stalled while a cancel is pending. A fork that
fails with EAGAIN cannot be caused without starving the whole machine, so that one is a
named fake (``_FORK_FAULT``) inside a real agent process.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import pytest

from scipion_cloudexec.agent.client import AgentClient, AgentStartError, JobCancelled, JobLost
from scipion_cloudexec.agent.jobs import JobState
from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.tests.test_agent import alive, collect, wait_until

PY = sys.executable


def agent_json(workdir: str) -> dict:
    with open(os.path.join(workdir, "agent", "agent.json")) as f:
        return json.load(f)


def agent_log(workdir: str) -> str:
    with open(os.path.join(workdir, "agent", "agent.log")) as f:
        return f.read()


def stop_agent_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL after 5 s: an agent this test started, by its pid."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


# ---- secrets: agent.json through a fresh O_EXCL|O_NOFOLLOW name --------------------------

def test_state_file_never_follows_a_planted_symlink(make_cluster, tmp_path):
    """Before: agent.json.tmp was opened O_CREAT|O_TRUNC, so a symlink planted there got the
    secret written through it (and agent.json became that symlink)."""
    c = make_cluster("local")
    agent_dir = os.path.join(c.workdir, "agent")
    os.makedirs(agent_dir)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    planted = os.path.join(agent_dir, "agent.json.tmp")
    os.symlink(str(victim), planted)
    old_umask = os.umask(0o022)
    try:
        with AgentClient(c) as client:
            assert client.submit(["true"]).result(30).exit_code == 0
            st = os.lstat(os.path.join(agent_dir, "agent.json"))
            secret = agent_json(c.workdir)["secret"]
    finally:
        os.umask(old_umask)
    assert victim.read_text() == "precious\n", "the secret went through the planted link"
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert os.readlink(planted) == str(victim), "the planted link is left alone"
    assert len(secret) == 64
    leftovers = [n for n in os.listdir(agent_dir) if n.endswith(".tmp") and
                 os.path.join(agent_dir, n) != planted]
    assert not leftovers, leftovers


# ---- several login nodes behind one name ------------------------------------------------

@pytest.fixture(scope="module")
def login_nodes(testbed):
    """Two login nodes (own network, host name and mount namespace, sshd each) that share
    the desktop's file system, as login nodes share an NFS home. Names n7/n8: addresses
    10.79.0.17/18, apart from the private_host fixture's p1 (10.79.0.11)."""
    from scipion_cloudexec.testbed.private import PrivateHost
    reason = PrivateHost.unavailable()
    if reason:
        pytest.skip(reason)
    nodes = [PrivateHost(testbed, name) for name in ("n7", "n8")]
    try:
        for n in nodes:
            n.up()
    except Exception as e:  # noqa: BLE001
        for n in nodes:
            n.down()
        pytest.fail("the login nodes did not come up: %s" % e)
    yield nodes
    for n in nodes:
        n.down()


def node_cluster(node, testbed, workdir: str, lease: float) -> ClusterConfig:
    return ClusterConfig(
        name="login-" + node.name, host=node.address, port=22, user=testbed.user,
        identity_file=testbed.client_key, known_hosts=node.known_hosts, workdir=workdir,
        python=testbed.python, launcher="local", slots=4, heartbeat=0.5, connect_timeout=5.0,
        source="<test>", env_setup="export CLOUDEXEC_AGENT_LEASE=%g" % lease)


@pytest.mark.slow
def test_second_login_node_refuses_clearly_then_takes_over_a_dead_node(login_nodes, testbed,
                                                                       tmp_path):
    """Before: `start` on node B saw the recorded pid/port not answering there and started a
    second agent on the same journal."""
    a, b = login_nodes
    workdir = str(tmp_path / "nfs-home" / "cloudexec")  # seen by both nodes
    ca, cb = node_cluster(a, testbed, workdir, 4), node_cluster(b, testbed, workdir, 4)
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    out: Dict[str, bytearray] = {}
    with AgentClient(ca) as client_a:
        assert client_a.welcome.host == a.hostname
        pid_a = client_a.welcome.pid
        fut = client_a.submit(["/bin/sh", "-c", "while [ ! -e %s ]; do sleep 0.05; done; "
                               "echo $(hostname) >> %s; echo finished" % (gate, runs)],
                              job_id="on-a", on_output=collect(out))
        wait_until(fut.running, 20, "job running on node A")
        other = AgentClient(cb)
        try:
            with pytest.raises(AgentStartError) as refused:
                other.start()
        finally:
            other.close()
        gate.write_text("go")
        result = fut.result(60)
    text = str(refused.value)
    print("\nnode B's start refused:\n" + text)
    assert "runs on login node %s (pid %d)" % (a.hostname, pid_a) in text
    assert "reached login node %s" % b.hostname in text
    assert "'host ='" in text and "workdir of its own" in text
    assert result.state == JobState.DONE and out["stdout"] == b"finished\n"
    assert runs.read_text() == a.hostname + "\n", "the job ran once, on node A"
    assert agent_log(workdir).count("listening on") == 1, "no second agent was started"

    # node A dies (agent and job SIGKILLed, nothing cleaned up): once its lease has run
    # out, node B takes the workdir over and declares A's job lost
    client_a = AgentClient(ca)
    client_a.start()
    try:
        doomed = client_a.submit(["sleep", "300"], job_id="dies-with-a")
        wait_until(doomed.running, 20, "second job running on node A")
        row = [r for r in client_a.jobs() if r["job_id"] == "dies-with-a"][0]
        job_pid = int(row["launcher_id"].split(":")[0])
        agent_pid = client_a.welcome.pid
        os.kill(agent_pid, signal.SIGKILL)
        os.killpg(job_pid, signal.SIGKILL)
        t_dead = time.monotonic()
    finally:
        client_a.close()
    wait_until(lambda: agent_json(workdir)["lease_until"] < time.time(), 30, "lease run out")
    hostname_out: Dict[str, bytearray] = {}
    with AgentClient(cb) as client_b:
        took_over = time.monotonic() - t_dead
        try:
            assert client_b.welcome.host == b.hostname and client_b.welcome.pid != agent_pid
            with pytest.raises(JobLost) as lost:
                client_b.attach("dies-with-a").result(30)
            done = client_b.submit(["hostname"], on_output=collect(hostname_out)).result(30)
        finally:
            stop_agent_pid(client_b.welcome.pid)
    print("node A dead -> node B serving the workdir after %.1f s (lease 4 s)" % took_over)
    assert "the job's process is gone" in lost.value.result.reason
    assert done.state == JobState.DONE and hostname_out["stdout"].decode().strip() == b.hostname
    log = agent_log(workdir)
    assert "taking workdir %s over from login node %s (agent pid %d)" % (
        workdir, a.hostname, agent_pid) in log


# ---- fork / thread creation failing (EAGAIN) ----------------------------------------------

#: the named fake: a real agent process whose fork (subprocess's _fork_exec) raises EAGAIN
#: for its first $CX_FAKE_FORK_FAILS calls and whose thread creation raises "can't start new
#: thread" for its first $CX_FAKE_THREAD_FAILS, as under a full pids.max or RLIMIT_NPROC,
#: which cannot be made for real without starving the machine the test bed shares
_FORK_FAULT = r'''
import errno, os, subprocess, sys, threading
fork_left = [int(os.environ.get("CX_FAKE_FORK_FAILS", "0"))]
thread_left = [int(os.environ.get("CX_FAKE_THREAD_FAILS", "0"))]
real_fork_exec, real_start = subprocess._fork_exec, threading._start_new_thread

def fork_exec(*a, **k):
    if fork_left[0] > 0:
        fork_left[0] -= 1
        sys.stderr.write("FAKE: fork fails with EAGAIN\n")
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    return real_fork_exec(*a, **k)

def start_new_thread(*a, **k):
    if thread_left[0] > 0:
        thread_left[0] -= 1
        sys.stderr.write("FAKE: thread creation fails\n")
        raise RuntimeError("can't start new thread")
    return real_start(*a, **k)

subprocess._fork_exec, threading._start_new_thread = fork_exec, start_new_thread
from scipion_cloudexec.agent.server import main
main(sys.argv[1:])
'''


class RawClient:
    """The wire protocol over a plain DEALER on the agent's loopback port (this fake agent
    runs from the source tree, so the SSH client, which wants the bundle's version, is not
    used)."""

    def __init__(self, workdir: str):
        import zmq
        from scipion_cloudexec.transport import messages as m
        self.m = m
        state = agent_json(workdir)
        self.secret = bytes.fromhex(state["secret"])
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect("tcp://127.0.0.1:%d" % state["port"])
        self.rid = 0
        self.inbox: List = []

    def send(self, msg) -> int:
        self.rid += 1
        msg.rid = self.rid
        self.sock.send_multipart(self.m.encode(msg, self.secret))
        return self.rid

    def receive(self, timeout: float):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.m.decode(self.sock.recv_multipart(), self.secret)

    def ping(self, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        rid = self.send(self.m.Ping())
        while time.monotonic() - t0 < timeout:
            msg = self.receive(timeout - (time.monotonic() - t0))
            if msg is None:
                break
            if msg.TYPE == "Pong" and msg.rid == rid:
                return time.monotonic() - t0
            self.inbox.append(msg)
        raise AssertionError("the agent did not answer a ping within %.0f s" % timeout)

    def close(self) -> None:
        self.sock.close(0)


def start_fake_agent(workdir: str, log_path: str, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([PY, "-c", _FORK_FAULT, "serve", "--workdir", workdir,
                             "--heartbeat", "0.5"],
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env))
    wait_until(lambda: os.path.exists(os.path.join(workdir, "agent", "agent.json"))
               or proc.poll() is not None, 20, "fake agent up")
    assert proc.poll() is None, open(log_path).read()
    return proc


def run_job_while_pinging(client: RawClient, argv: List[str], job_id: str, timeout: float):
    """Submit, then ping every 0.1 s until the job's Ended comes; returns (Ended, pings,
    worst ping)."""
    from scipion_cloudexec.agent.jobs import JobSpec, LauncherSpec
    spec = JobSpec(job_id=job_id, argv=argv, launcher=LauncherSpec(kind="local"))
    client.send(client.m.Submit(spec=spec.to_dict(), watch=True))
    t0, pings, worst = time.monotonic(), 0, 0.0
    while time.monotonic() - t0 < timeout:
        worst = max(worst, client.ping())
        pings += 1
        for msg in client.inbox:
            if msg.TYPE == "Ended" and msg.job_id == job_id:
                return msg, pings, worst
        time.sleep(0.1)
    raise AssertionError("job %s did not end within %.0f s" % (job_id, timeout))


def test_fork_and_thread_failures_are_retried_and_the_job_runs_once(tmp_path):
    """Before: the thread that could not start left its scheduler's queue without a
    worker (the job hung), and EAGAIN from fork failed the job for good."""
    workdir, log_path = str(tmp_path / "wd"), str(tmp_path / "agent.out")
    runs = tmp_path / "runs"
    proc = start_fake_agent(workdir, log_path, CX_FAKE_FORK_FAILS="3",
                            CX_FAKE_THREAD_FAILS="2")
    client = RawClient(workdir)
    try:
        ended, pings, worst = run_job_while_pinging(
            client, ["/bin/sh", "-c", "echo run >> %s" % runs], "through-eagain", 60)
        again, _, _ = run_job_while_pinging(client, ["true"], "after-eagain", 30)
        assert proc.poll() is None, "the agent is alive"
    finally:
        client.close()
        stop_agent_pid(proc.pid)
        proc.wait(10)
    log = open(log_path).read()
    print("\n%d pings answered during the faults, worst %.1f ms" % (pings, worst * 1000))
    print("".join(line + "\n" for line in log.splitlines()
                  if "FAKE" in line or "trying again" in line))
    assert log.count("FAKE: fork fails") == 3 and log.count("FAKE: thread creation fails") == 2
    assert (ended.state, ended.exit_code) == ("done", 0), ended
    assert runs.read_text() == "run\n", "the job ran exactly once"
    assert (again.state, again.exit_code) == ("done", 0)
    assert "cannot start the process scheduler's thread" in log
    assert log.count("Resource temporarily unavailable; trying again in") == 3


def test_fork_failing_for_good_fails_the_job_clearly_and_the_agent_stays(tmp_path):
    workdir, log_path = str(tmp_path / "wd"), str(tmp_path / "agent.out")
    proc = start_fake_agent(workdir, log_path, CX_FAKE_FORK_FAILS="1000000",
                            CLOUDEXEC_SUBMIT_RETRY_FOR="3")
    client = RawClient(workdir)
    try:
        ended, pings, _ = run_job_while_pinging(client, ["true"], "never-forks", 60)
        client.ping()
        assert proc.poll() is None, "the agent is alive"
    finally:
        client.close()
        stop_agent_pid(proc.pid)
        proc.wait(10)
    print("\nended %s: %s" % (ended.state, ended.reason))
    assert ended.state == "lost" and ended.exit_code is None
    assert "cannot start the job script" in ended.reason
    assert "Resource temporarily unavailable" in ended.reason and "tried" in ended.reason
    with open(os.path.join(workdir, "jobs", "never-forks", "stderr")) as f:
        assert "Resource temporarily unavailable" in f.read(), "the job's stderr says why"


# ---- a job's huge output at its end -------------------------------------------------------

def vm_rss(pid: int) -> int:
    """Resident memory of *pid* in bytes (0 once gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
def test_gigabyte_written_at_once_streams_in_order_with_bounded_agent_memory(make_cluster):
    """Before: at the job's end the agent queued its whole unsent stdout into zmq at once
    (the RSS of the agent grew by about the backlog, ~1 GB here)."""
    c = make_cluster("local")
    size = 1 << 30
    writer = ("import sys, hashlib\nblock = b''.join(hashlib.sha256(str(i).encode()).digest() "
              "for i in range(1 << 15))\nfor i in range(%d):\n"
              "    sys.stdout.buffer.write(block)\n" % (size // (32 << 15)))
    got = hashlib.sha256()
    n = [0]
    peak = [0]
    stop = threading.Event()

    def on_output(stream: str, data: bytes) -> None:
        if stream == "stdout":
            got.update(data)
            n[0] += len(data)

    with AgentClient(c) as client:
        pid = client.welcome.pid
        base = vm_rss(pid)

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], vm_rss(pid))
                time.sleep(0.02)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            result = client.submit([PY, "-c", writer], job_id="firehose",
                                   on_output=on_output).result(600)
        finally:
            stop.set()
            sampler.join()
        took = time.monotonic() - t0
    out_file = os.path.join(c.workdir, "jobs", "firehose", "stdout")
    wrote = hashlib.sha256()
    with open(out_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            wrote.update(block)
    print("\n%d MiB streamed in %.1f s (%.0f MiB/s); agent RSS %d MiB before, peak %d MiB"
          % (n[0] >> 20, took, (n[0] >> 20) / took, base >> 20, peak[0] >> 20))
    assert result.state == JobState.DONE and result.exit_code == 0
    assert os.path.getsize(out_file) == size
    assert n[0] == size and got.hexdigest() == wrote.hexdigest(), "every byte, in order"
    assert peak[0] < 300 << 20, "agent RSS peaked at %d MiB" % (peak[0] >> 20)
    os.unlink(out_file)
