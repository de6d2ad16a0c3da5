"""The remote agent through the real sshd: MPI jobs, failures, reattach, faults, security."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from scipion_cloudexec.cluster import bundle
from scipion_cloudexec.cluster.errors import (AgentLost, JobCancelled, JobFailed, RequestRefused,
                                              VersionMismatch)
from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.remote.jobs import JobState
from scipion_cloudexec.remote import messages as m

PY = sys.executable
MPI_HELLO = ("from mpi4py import MPI; import sys; c = MPI.COMM_WORLD; "
             "t = c.allreduce(c.rank); print('rank %d of %d sum %d' % (c.rank, c.size, t)); "
             "sys.stderr.write('note from %d\\n' % c.rank)")


def collect(out):
    return lambda stream, data: out.setdefault(stream, bytearray()).extend(data)


def agent_state(cluster):
    with open(os.path.join(cluster.workdir, "agent", "agent.json")) as f:
        return json.load(f)


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("%s not reached within %.0f s" % (what, timeout))


@pytest.mark.parametrize("launcher", ["mpirun", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_four_rank_mpi4py_job_streams_output_and_exit_code(make_cluster, launcher):
    c = make_cluster(launcher)
    out = {}
    with ClusterSession(c) as client:
        result = client.submit([PY, "-c", MPI_HELLO], ranks=4, on_output=collect(out)).result(120)
    assert result.state == JobState.DONE and result.exit_code == 0
    lines = sorted(out["stdout"].decode().splitlines())
    assert lines == ["rank %d of 4 sum 6" % r for r in range(4)]
    assert sorted(out["stderr"].decode().splitlines()) == ["note from %d" % r for r in range(4)]
    if launcher == "slurm":
        assert result.launcher_id.isdigit(), "the SLURM job id is kept"


@pytest.mark.parametrize("launcher", ["local", "mpirun",
                                      pytest.param("slurm", marks=pytest.mark.slurm)])
def test_failing_command_exit_code_and_stderr_reach_the_caller(make_cluster, launcher):
    c = make_cluster(launcher)
    with ClusterSession(c) as client:
        fut = client.submit(["/bin/sh", "-c", "echo 'reconstruction diverged' >&2; exit 3"])
        with pytest.raises(JobFailed) as e:
            fut.result(120)
    assert e.value.result.exit_code == 3
    assert "reconstruction diverged" in e.value.result.stderr_tail
    assert "reconstruction diverged" in str(e.value)


def test_missing_program_gives_a_clear_error(make_cluster):
    with ClusterSession(make_cluster("local")) as client:
        with pytest.raises(JobFailed) as e:
            client.submit(["relion_refine_mpi_nonexistent", "--o", "x"]).result(60)
    assert e.value.result.exit_code == 127
    assert "relion_refine_mpi_nonexistent: not found" in e.value.result.stderr_tail


def test_same_job_id_is_never_run_twice(make_cluster, tmp_path):
    marker = tmp_path / "runs"
    with ClusterSession(make_cluster("local")) as client:
        argv = ["/bin/sh", "-c", "echo run >> %s" % marker]
        first = client.submit(argv, job_id="step-7").result(30)
        again = client.submit(argv, job_id="step-7")
        second = again.result(30)
    assert again.existed and first.exit_code == second.exit_code == 0
    assert marker.read_text() == "run\n"


def test_invalid_job_is_refused_at_submit(make_cluster):
    with ClusterSession(make_cluster("local")) as client:
        with pytest.raises(ValueError, match="job_id"):
            client.submit(["true"], job_id="../../etc")
        with pytest.raises(RequestRefused, match="no job nope"):
            client.attach("nope").result(10)


def test_killed_client_reattaches_and_gets_the_result(make_cluster, tmp_path, testbed):
    c = make_cluster("mpirun")
    conf = tmp_path / "clusters.conf"
    conf.write_text("[cluster t]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = %s\n"
                    "known_hosts = %s\nworkdir = %s\npython = %s\nlauncher = mpirun\nslots = 4\n"
                    "mpirun = mpirun --oversubscribe --bind-to none\nheartbeat = 0.5\n"
                    % (c.port, c.user, c.identity_file, c.known_hosts, c.workdir, PY))
    gate = tmp_path / "gate"
    script = ("import os, time, sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
              "print('started', c.rank, flush=True)\n"
              "while not os.path.exists(%r): time.sleep(0.05)\n"
              "print('finished', c.rank, flush=True)\nsys.exit(7 if c.rank == 0 else 0)\n" % str(gate))
    cli = [sys.executable, "-m", "scipion_cloudexec.cli", "--config", str(conf)]
    proc = subprocess.Popen(cli + ["run", "t", "--np", "2", "--job-id", "survivor", "--",
                                   PY, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline() + proc.stdout.readline()
        assert first.count(b"started") == 2, proc.stderr.read() if proc.poll() is not None else ""
    finally:
        proc.kill()  # the desktop dies: no chance to cancel anything
        proc.wait()
    agent_log = os.path.join(c.workdir, "agent", "agent.log")
    wait_until(lambda: "went silent; its jobs keep running" in open(agent_log).read(), 30,
               "the agent noticing the client is gone")
    gate.write_text("go")
    again = subprocess.run(cli + ["attach", "t", "survivor"], capture_output=True, timeout=120)
    assert again.returncode == 7, again.stderr
    out = again.stdout.decode()
    assert out.count("started") == 2 and out.count("finished") == 2, "whole output on reattach"
    with ClusterSession(c) as client:
        rows = [r for r in client.jobs() if r["job_id"] == "survivor"]
    assert len(rows) == 1 and rows[0]["state"] == "failed" and rows[0]["exit_code"] == 7


@pytest.mark.slow
def test_killed_agent_is_reported_within_the_heartbeat_bound_and_jobs_survive(make_cluster,
                                                                              tmp_path,
                                                                              reliability):
    c = make_cluster("local", heartbeat=0.5)
    gate = tmp_path / "gate"
    with ClusterSession(c) as client:
        fut = client.submit(["/bin/sh", "-c", "while [ ! -e %s ]; do sleep 0.05; done; echo done"
                             % gate], job_id="long")
        wait_until(lambda: fut.running(), 10, "job running")
        pid = agent_state(c)["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(AgentLost, match="no heartbeat|closed") as e:
            fut.result(timeout=30)
        waited = time.monotonic() - t0
    assert e.value.cluster == c.name
    print("agent loss noticed after %.2f s (bound %.1f s)" % (waited, 3 * c.heartbeat))
    gate.write_text("go")
    # a new client starts a new agent, which adopts the job from the journal
    out = {}
    with ClusterSession(c) as client:
        assert client.welcome.pid != pid
        result = client.attach("long", on_output=collect(out)).result(30)
    assert result.exit_code == 0 and out["stdout"] == b"done\n"
    reliability(fault="agent SIGKILL (client level)", when="mid-job",
                seen="AgentLost naming the cluster; a new client's agent adopts the job and "
                "its output and exit code arrive", recover_s="noticed after %.2f s (bound %.1f "
                "s)" % (waited, 3 * c.heartbeat), lost=0, twice=0)


def test_forged_message_is_dropped_and_logged(make_cluster):
    """A peer past the socket's CURVE handshake (it has the agent's key: only the agent's
    user, or root) but without the message secret."""
    from scipion_cloudexec.remote.transport import connect_curve
    c = make_cluster("local")
    with ClusterSession(c) as client:
        fwd = client.ssh.forward(int(client.agent_state["port"]))
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        connect_curve(sock, client.agent._curve)
        sock.connect(fwd.address)
        forged = m.encode(m.Submit(spec={"job_id": "evil", "argv": ["touch", "/tmp/pwned"]}),
                          b"not the secret" * 3)
        sock.send_multipart(forged)
        sock.send_multipart([b"garbage"])
        assert sock.poll(1500) == 0, "the agent must not answer a forged message"
        sock.close()
        assert "evil" not in [r["job_id"] for r in client.jobs()]
        assert client.submit(["true"]).result(30).exit_code == 0, "real clients still served"
    with open(os.path.join(c.workdir, "agent", "agent.log")) as f:
        log = f.read()
    # the first drop from a peer is logged at once, the next ones counted (rate limit)
    assert log.count("dropped a message") == 1 and "authentication failed" in log


def test_agent_listens_on_loopback_only(make_cluster):
    c = make_cluster("local")
    with ClusterSession(c):
        pid = agent_state(c)["pid"]
        ss = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    mine = [line.split()[3] for line in ss.splitlines() if "pid=%d," % pid in line]
    assert mine, "the agent's listening socket must show in ss"
    assert all(addr.startswith("127.0.0.1:") for addr in mine), mine


def test_state_file_holding_the_secret_is_private(make_cluster):
    c = make_cluster("local")
    with ClusterSession(c):
        mode = os.stat(os.path.join(c.workdir, "agent", "agent.json")).st_mode & 0o777
        cmdline = open("/proc/%d/cmdline" % agent_state(c)["pid"]).read()
    assert mode == 0o600
    assert agent_state(c)["secret"] not in cmdline


def test_client_reuses_agent_of_its_version_and_replaces_an_idle_other(make_cluster, monkeypatch):
    c = make_cluster("local")
    with ClusterSession(c) as client:
        first_pid = client.welcome.pid
    with ClusterSession(c) as client:
        assert client.welcome.pid == first_pid, "a warm agent of the same version is reused"
    data, version = bundle.build()
    other = data + b"\n"  # another client's code: still a valid zip, another hash
    other_version = "%s+%s" % (version.split("+")[0], hashlib.sha256(other).hexdigest()[:12])
    with monkeypatch.context() as mp:  # that client starts its agent and a job that stays
        mp.setattr(bundle, "build", lambda: (other, other_version))
        old = ClusterSession(c)
        old.start()
        old_pid = old.welcome.pid
    assert old.welcome.version != version and old_pid != first_pid
    busy = old.submit(["sleep", "30"], job_id="busy")
    wait_until(lambda: busy.running(), 10, "busy job running")
    with pytest.raises(VersionMismatch, match="runs agent version .* with 1 job"):
        ClusterSession(c).start()
    old.cancel("busy")
    with pytest.raises(JobCancelled):
        busy.result(30)
    old.close()
    with ClusterSession(c) as client:  # idle now: replaced by ours
        assert client.welcome.version == version and client.welcome.pid != old_pid
    assert not alive(old_pid)


def test_cancel_stops_mpirun_and_its_ranks(make_cluster, tmp_path):
    c = make_cluster("mpirun")
    pids = tmp_path / "pids"
    script = ("import os, time\nfrom mpi4py import MPI\n"
              "open(%r, 'a').write('%%d\\n' %% os.getpid())\ntime.sleep(120)\n" % str(pids))
    with ClusterSession(c) as client:
        fut = client.submit([PY, "-c", script], ranks=2)
        wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, 60, "ranks up")
        client.cancel(fut.job_id)
        with pytest.raises(JobCancelled):
            fut.result(60)
    for pid in map(int, pids.read_text().split()):
        wait_until(lambda: not alive(pid), 15, "rank %d gone" % pid)


@pytest.mark.slurm
def test_cancel_scancels_a_slurm_job(make_cluster):
    c = make_cluster("slurm")
    with ClusterSession(c) as client:
        fut = client.submit(["sleep", "300"])
        wait_until(lambda: client.jobs()[0]["state"] == "running", 60, "SLURM job running")
        slurm_id = client.jobs()[0]["launcher_id"]
        client.cancel(fut.job_id)
        with pytest.raises(JobCancelled):
            fut.result(60)
    squeue = subprocess.run(["squeue", "-h", "-j", slurm_id, "-o", "%T"], capture_output=True,
                            text=True, env=dict(os.environ, SLURM_CONF=_slurm_conf())).stdout
    assert "RUNNING" not in squeue and "PENDING" not in squeue


def _slurm_conf():
    root = os.environ.get("CLOUDEXEC_TESTBED") or "/tmp/cloudexec-testbed"
    return os.path.join(root, "slurm", "slurm.conf")


@pytest.mark.slow
def test_idle_agent_exits_by_itself(make_cluster):
    c = make_cluster("local", agent_idle_timeout=1.0, heartbeat=0.3)
    with ClusterSession(c) as client:
        pid = client.welcome.pid
        client.submit(["true"]).result(30)
    wait_until(lambda: not alive(pid), 20, "idle agent exit")
    assert not os.path.exists(os.path.join(c.workdir, "agent", "agent.json"))


def test_worker_pool_runs_many_small_jobs_without_an_mpirun_each(make_cluster):
    c = make_cluster("mpirun")
    with ClusterSession(c) as client:
        pool = client.start_pool("p1", ranks=3)
        outs = [{} for _ in range(12)]
        futs = [client.submit(["/bin/sh", "-c", "echo task %d on rank $CLOUDEXEC_POOL_RANK; "
                               "echo ${OMPI_COMM_WORLD_SIZE:-no-mpi}" % i], pool="p1",
                              on_output=collect(outs[i])) for i in range(12)]
        bad = client.submit(["/bin/sh", "-c", "echo broken >&2; exit 9"], pool="p1")
        results = [f.result(60) for f in futs]
        with pytest.raises(JobFailed) as e:
            bad.result(60)
        client.cancel(pool.job_id)
        with pytest.raises(JobCancelled):
            pool.result(30)
    assert all(r.exit_code == 0 and r.launcher_id == "pool:p1" for r in results)
    ranks = set()
    for i, out in enumerate(outs):
        first, second = out["stdout"].decode().splitlines()
        assert first.startswith("task %d on rank " % i)
        ranks.add(first.split()[-1])
        assert second == "no-mpi", "a pool job is a plain process, not part of an MPI world"
    assert ranks <= {"1", "2"} and ranks, "the two worker ranks took the jobs"
    assert e.value.result.exit_code == 9 and "broken" in e.value.result.stderr_tail


def test_cancelled_worker_pool_leaves_no_process_behind(make_cluster):
    c = make_cluster("mpirun")
    with ClusterSession(c) as client:
        pool = client.start_pool("p2", ranks=3)
        assert client.submit(["true"], pool="p2").result(60).exit_code == 0
        client.cancel(pool.job_id)
        with pytest.raises(JobCancelled):
            pool.result(30)
    pool_dir = os.path.join(c.workdir, "pools", "p2")

    def leftovers():
        out = subprocess.run(["pgrep", "-f", pool_dir], capture_output=True, text=True).stdout
        return out.split()
    wait_until(lambda: not leftovers(), 20, "pool processes gone")
