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

from scipion_cloudexec.cluster.errors import JobCancelled, JobLost

from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.remote.jobs import JobState
from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.tests.test_agent import alive, collect, wait_until
from scipion_cloudexec.tests.test_bad_input import start_error

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
        with ClusterSession(c) as client:
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
    the desktop's file system, as login nodes share an NFS home. On a bridge of their own
    (cxlbr0, 10.80.0.17/18; namespaces cxp-n7/cxp-n8), apart from the private_host fixture's
    (cxpbr0), which another session may take down meanwhile."""
    from scipion_cloudexec.testbed.private import PrivateHost
    reason = PrivateHost.unavailable()
    if reason:
        pytest.skip(reason)
    nodes = [PrivateHost(testbed, name, bridge="cxlbr0", net="10.80.0") for name in ("n7", "n8")]
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
                                                                       tmp_path, reliability):
    """Before: `start` on node B saw the recorded pid/port not answering there and started a
    second agent on the same journal."""
    a, b = login_nodes
    workdir = str(tmp_path / "nfs-home" / "cloudexec")  # seen by both nodes
    ca, cb = node_cluster(a, testbed, workdir, 4), node_cluster(b, testbed, workdir, 4)
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    out: Dict[str, bytearray] = {}
    with ClusterSession(ca) as client_a:
        assert client_a.welcome.host == a.hostname
        pid_a = client_a.welcome.pid
        fut = client_a.submit(["/bin/sh", "-c", "while [ ! -e %s ]; do sleep 0.05; done; "
                               "echo $(hostname) >> %s; echo finished" % (gate, runs)],
                              job_id="on-a", on_output=collect(out))
        wait_until(fut.running, 20, "job running on node A")
        text = start_error(cb)
        gate.write_text("go")
        result = fut.result(60)
    print("\nnode B's start refused:\n" + text)
    assert "runs on login node %s (pid %d)" % (a.hostname, pid_a) in text
    assert "reached login node %s" % b.hostname in text
    assert "'host ='" in text and "workdir of its own" in text
    assert result.state == JobState.DONE and out["stdout"] == b"finished\n"
    assert runs.read_text() == a.hostname + "\n", "the job ran once, on node A"
    assert agent_log(workdir).count("listening on") == 1, "no second agent was started"

    # node A dies (agent and job SIGKILLed, nothing cleaned up): once its lease has run
    # out, node B takes the workdir over and declares A's job lost
    client_a = ClusterSession(ca)
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
    with ClusterSession(cb) as client_b:
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
    reliability(fault="a second login node behind one name, one shared workdir",
                when="a client reaches node B while node A's agent runs",
                seen="AgentStartError: 'the agent for workdir W runs on login node A (pid P), "
                "but this connection reached login node B ... point host = ... or give each "
                "login node a workdir of its own'; A's job ends DONE",
                recover_s="node A dead: node B serves the workdir %.1f s later (lease 4 s in "
                "the test, 60 s by default)" % took_over, lost=0, twice=0)


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
from scipion_cloudexec.remote.server import main
main(sys.argv[1:])
'''


class RawClient:
    """The wire protocol over a plain DEALER on the agent's loopback port (this fake agent
    runs from the source tree, so the SSH client, which wants the bundle's version, is not
    used)."""

    def __init__(self, workdir: str):
        import zmq
        from scipion_cloudexec.remote import messages as m
        self.m = m
        state = agent_json(workdir)
        self.secret = bytes.fromhex(state["secret"])
        from scipion_cloudexec.remote.transport import connect_curve
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        connect_curve(self.sock, state.get("curve"))
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
    from scipion_cloudexec.remote.jobs import JobSpec, LauncherSpec
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


def test_fork_and_thread_failures_are_retried_and_the_job_runs_once(tmp_path, reliability):
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
    reliability(fault="fork fails with EAGAIN 3x, thread start fails 2x (named fake in a real "
                "agent)", when="a submit", seen="a short delay; agent.log 'trying again'",
                recover_s="the job runs once after the retries", worst_ping_ms=round(
                    worst * 1000, 1), lost=0, twice=0)
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
def test_gigabyte_written_at_once_streams_in_order_with_bounded_agent_memory(make_cluster,
                                                                            reliability):
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

    with ClusterSession(c) as client:
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
    reliability(fault="1 GiB of stdout written at once", when="a job's end",
                seen="every byte in order, then the end; agent memory peak %d MiB"
                % (peak[0] >> 20), recover_s="streamed in %.1f s" % took, lost=0, twice=0)
    os.unlink(out_file)


# ---- a cancelled worker pool ----------------------------------------------------------------

def test_cancelled_worker_pool_ends_its_jobs_cancelled_at_once(make_cluster, tmp_path):
    """Before: the pool's running and queued jobs waited for its heartbeat to go stale
    (15 s), then ended LOST."""
    c = make_cluster("mpirun")
    token = "cx-doomed-%s" % tmp_path.name
    sleeper = [PY, "-c", "import time; time.sleep(120)", token]
    with ClusterSession(c) as client:
        pool = client.start_pool("doomed", ranks=2)  # rank 0 hands out, rank 1 runs
        assert client.submit(["true"], pool="doomed").result(60).exit_code == 0
        running = client.submit(sleeper, pool="doomed")
        queued = [client.submit(sleeper, pool="doomed") for _ in range(2)]
        wait_until(lambda: {r["job_id"]: r["state"] for r in client.jobs()}[running.job_id]
                   == "running", 30, "pool job running")
        t0 = time.monotonic()
        client.cancel(pool.job_id)
        with pytest.raises(JobCancelled):
            pool.result(30)
        ends = []
        for fut in [running] + queued:
            with pytest.raises(JobCancelled) as e:
                fut.result(60)
            ends.append(e.value.result.reason)
        took = time.monotonic() - t0
    print("\npool cancelled -> its 3 jobs cancelled after %.1f s: %s" % (took, ends[0]))
    assert all("worker pool doomed was cancelled" in r for r in ends), ends

    def leftovers() -> List[str]:
        return subprocess.run(["pgrep", "-f", token], capture_output=True,
                              text=True).stdout.split()
    wait_until(lambda: not leftovers(), 20, "the pool's jobs' processes gone")


# ---- SLURM: what a stopped agent leaves pending ------------------------------------------

class SlurmLink:
    """The agent's own view of SLURM: ``SLURM_CONF`` (set in the cluster's env_setup) is a
    copy of the test bed's; ``cut()`` points it at a controller port where nothing listens,
    so the agent's scancel/squeue fail within 2 s ("Unable to contact slurm controller"), as
    on a login node cut off from the controller, while slurmctld (shared with the other
    sessions) runs on untouched."""

    def __init__(self, testbed, folder):
        self.real = testbed.slurm_conf
        self.folder = str(folder)
        os.makedirs(self.folder, exist_ok=True)
        for name in os.listdir(os.path.dirname(self.real)):
            if name.endswith(".conf") and name != "slurm.conf":
                with open(os.path.join(os.path.dirname(self.real), name)) as f:
                    text = f.read()
                with open(os.path.join(self.folder, name), "w") as f:
                    f.write(text)
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.restore()

    def _write(self, text: str) -> None:
        with open(self.conf + ".new", "w") as f:
            f.write(text)
        os.replace(self.conf + ".new", self.conf)  # commands never read half a file

    def cut(self) -> None:
        with open(self.real) as f:
            text = f.read()
        assert "SlurmctldPort=6817" in text
        # port 9 (discard) is closed; the client retries connecting for MessageTimeout s
        self._write(text.replace("SlurmctldPort=6817", "SlurmctldPort=9") +
                    "\nMessageTimeout=2\n")

    def restore(self) -> None:
        with open(self.real) as f:
            self._write(f.read())


def slurm_cmd(testbed, *argv: str) -> subprocess.CompletedProcess:
    from scipion_cloudexec.tests.test_scheduler_faults import slurm
    return slurm(testbed, *argv)


def kill_agent_group(pid: int) -> None:
    """The agent dies at once with the commands it runs: SIGKILL to its process group (its
    own session; jobs run in sessions of their own, SLURM jobs under slurmd)."""
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    wait_until(lambda: not alive(pid), 10, "agent %d killed" % pid)


def slurm_state(testbed, slurm_id: str) -> str:
    return slurm_cmd(testbed, "squeue", "-h", "-t", "all", "-j", slurm_id,
                     "-o", "%T").stdout.strip()


def journal_seen(workdir: str, job_id: str) -> Optional[float]:
    """When SLURM last reported the job, as the journal keeps it (None: a journal without
    the column, as before the fix)."""
    import sqlite3
    db = sqlite3.connect(os.path.join(workdir, "agent", "journal.sqlite"))
    try:
        row = db.execute("SELECT seen FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return float(row[0]) if row else 0.0
    except sqlite3.OperationalError:  # no such column (before the fix)
        return None
    finally:
        db.close()


@pytest.mark.slurm
def test_scancel_pending_when_the_agent_dies_is_issued_by_the_next_agent(make_cluster, testbed,
                                                                         tmp_path, reliability):
    """Before: the pending scancel lived in the agent's memory only; the next agent adopted
    the job as running and the SLURM job ran on, unobserved."""
    link = SlurmLink(testbed, tmp_path / "slurm-view")
    c = make_cluster("slurm", env_setup="export SLURM_CONF=%s" % link.conf)
    with ClusterSession(c) as client:
        client.submit(["sleep", "300"], job_id="cancel-me")
        wait_until(lambda: client.jobs()[0]["state"] == "running", 60, "SLURM job running")
        slurm_id = client.jobs()[0]["launcher_id"]
        agent_pid = client.welcome.pid
    try:
        with ClusterSession(c) as client:
            link.cut()
            assert client.cancel("cancel-me") == "running"
            wait_until(lambda: "scancel %s failed, will retry" % slurm_id
                       in agent_log(c.workdir), 30, "the scancel failing")
            kill_agent_group(agent_pid)
        link.restore()
        assert slurm_state(testbed, slurm_id) == "RUNNING", "the cancel never reached SLURM"
        t0 = time.monotonic()
        with ClusterSession(c) as again:
            with pytest.raises(JobCancelled) as e:
                again.attach("cancel-me").result(30)
        took = time.monotonic() - t0
    finally:
        link.restore()
        slurm_cmd(testbed, "scancel", slurm_id)
    wait_until(lambda: slurm_state(testbed, slurm_id) in ("CANCELLED", ""), 30, "scancel'd")
    print("\nagent killed with a scancel pending; the next agent had the job cancelled "
          "%.1f s after its client connected" % took)
    log = agent_log(c.workdir)
    assert "scancel(s) left pending by the previous agent, issued again: scancel" in log
    assert e.value.result.state == JobState.CANCELLED
    assert "outside cloudexec" not in e.value.result.reason
    reliability(fault="agent killed with a scancel pending (slurmctld unreachable)",
                when="a cancel", seen="the cancel answers at once; the next agent issues the "
                "scancel again ('1 scancel(s) left pending by the previous agent, issued "
                "again')", recover_s="%.1f s after the next client connected" % took,
                lost=0, twice=0)


@pytest.mark.slurm
def test_lost_grace_period_runs_on_across_an_agent_restart(make_cluster, testbed, tmp_path):
    """Before: an adopting agent started the grace period afresh, so a job SLURM had not
    reported for longer than CLOUDEXEC_SLURM_LOST_AFTER got another full period."""
    link = SlurmLink(testbed, tmp_path / "slurm-view")
    grace = 8.0
    c = make_cluster("slurm", env_setup="export SLURM_CONF=%s\nexport CLOUDEXEC_SLURM_LOST_"
                     "AFTER=%g" % (link.conf, grace))
    failures = "SLURM did not answer (1 in a row)"
    try:
        with ClusterSession(c) as client:
            client.submit(["sleep", "300"], job_id="silent")
            wait_until(lambda: client.jobs()[0]["state"] == "running", 60, "SLURM job running")
            slurm_id = client.jobs()[0]["launcher_id"]
            wait_until(lambda: journal_seen(c.workdir, "silent") != 0, 30, "seen recorded")
            seen = journal_seen(c.workdir, "silent") or time.time()
            link.cut()
            wait_until(lambda: failures in agent_log(c.workdir), 30, "the agent cut off")
            kill_agent_group(client.welcome.pid)  # before its grace ran out
        time.sleep(max(0.0, seen + grace + 1 - time.time()))  # no agent, no answer
        with ClusterSession(c) as again:
            fut = again.attach("silent")
            wait_until(lambda: agent_log(c.workdir).count(failures) == 2, 30,
                       "the new agent's first squeue failing")
            link.restore()  # SLURM answers again: a restarted grace would see the job run on
            with pytest.raises(JobLost) as e:
                fut.result(30)
    finally:
        link.restore()
        slurm_cmd(testbed, "scancel", slurm_id)
    print("\n" + e.value.result.reason)
    assert "SLURM did not answer about job %s" % slurm_id in e.value.result.reason
    silent = float(e.value.result.reason.split(" for ")[1].split(" s ")[0])
    assert silent > grace, "the silence counts from when SLURM last reported the job"
    wait_until(lambda: slurm_state(testbed, slurm_id) in ("CANCELLED", ""), 30,
               "the given-up job scancel'd")


def test_a_submit_to_an_agent_that_stopped_answering_learns_of_the_loss_at_once(make_cluster):
    # a step waits up to 6 x connect_timeout for its job's acceptance (to learn whether it
    # had run before): a future failed by the lost agent did not end that wait, so each
    # step whose Submit went to a dying agent waited 30 s before it even tried to reconnect
    from scipion_cloudexec.cluster.errors import AgentLost
    from scipion_cloudexec.cluster.session import ClusterSession
    c = make_cluster("local")
    session = ClusterSession(c)
    pid = 0
    try:
        session.start()
        pid = int(agent_json(c.workdir)["pid"])
        os.kill(pid, signal.SIGSTOP)  # alive, silent: as a killed agent before its socket goes
        fut = session.submit(["true"])
        assert fut.accepted.wait(c.heartbeat * 8), "the loss did not end the acceptance wait"
        assert not fut.existed
        with pytest.raises(AgentLost):
            fut.result(timeout=0)
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        session.close()
        if pid:
            stop_agent_pid(pid)
