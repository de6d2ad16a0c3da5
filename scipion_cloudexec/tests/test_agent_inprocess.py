"""The agent's logic without sshd (issue 11): the real Agent on a thread of this process, the
real AgentClient connected to its port directly. Seconds, not a test bed; the SSH path
stays covered by test_agent.py."""
import json
import os
import sys
import threading
import time

import pytest

from scipion_cloudexec.cluster.agent_client import AgentClient
from scipion_cloudexec.cluster.errors import JobCancelled, JobFailed, RequestRefused
from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.remote.jobs import JobSpec, LauncherSpec
from scipion_cloudexec.remote.server import Agent


class InProcess:
    """Agents on threads of this process, each on a workdir; clients connected straight to
    their port (what the SSH forward gives the real path)."""

    def __init__(self):
        self.agents = []
        self.clients = []

    def start(self, workdir: str):
        agent = Agent(workdir, idle_timeout=60.0, heartbeat=0.5)
        # serve() binds on its own thread: the journal's sqlite connection belongs to it
        thread = threading.Thread(target=agent.serve, name="agent-in-process", daemon=True)
        state_path = os.path.join(workdir, "agent", "agent.json")
        if os.path.exists(state_path):
            os.unlink(state_path)  # the previous agent's: wait for this one's
        thread.start()
        deadline = time.monotonic() + 10
        while not os.path.exists(state_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(state_path) as f:
            state = json.load(f)
        cluster = ClusterConfig(name="inproc", host="127.0.0.1", user="u", identity_file="",
                                python=sys.executable, launcher="local", slots=2,
                                workdir=workdir, heartbeat=0.5)
        c = AgentClient(cluster, client_name="test")
        c.connect(state, address="tcp://127.0.0.1:%d" % state["port"])
        self.agents.append((agent, thread))
        self.clients.append(c)
        return c

    def stop_agent(self, index: int = -1) -> None:
        agent, thread = self.agents[index]
        agent.running = False
        thread.join(10)

    def close(self):
        for c in self.clients:
            c.close()
        for i in range(len(self.agents)):
            self.stop_agent(i)


@pytest.fixture
def inproc():
    ip = InProcess()
    yield ip
    ip.close()


@pytest.fixture
def go(tmp_path):
    """A file that jobs waiting on it see at the test's end at the latest (a failed
    assertion must not leave them running)."""
    path = tmp_path / "go"
    yield path
    path.write_text("")


@pytest.fixture
def client(inproc, tmp_path):
    return inproc.start(str(tmp_path / "work"))


def spec(job_id: str, shell: str, ranks: int = 1) -> JobSpec:
    return JobSpec(job_id=job_id, argv=["/bin/sh", "-c", shell], ranks=ranks,
                   launcher=LauncherSpec(kind="local"), client="test")


def test_a_job_runs_and_streams_its_output(client):
    out = bytearray()
    fut = client.submit(spec("j-1", "echo rank $CLOUDEXEC_RANK of $CLOUDEXEC_SIZE", ranks=2),
                        on_output=lambda stream, data: out.extend(data))
    assert fut.result(30).exit_code == 0
    assert sorted(out.decode().split("\n")[:2]) == ["rank 0 of 2", "rank 1 of 2"]


def test_a_failed_job_and_a_resubmit_that_attaches(client):
    with pytest.raises(JobFailed, match="exit code 3"):
        client.submit(spec("j-2", "echo oops >&2; exit 3")).result(30)
    again = client.submit(spec("j-2", "echo never runs"))  # the same id: attached, not rerun
    with pytest.raises(JobFailed) as e:
        again.result(30)
    assert again.existed and "oops" in e.value.result.stderr_tail
    assert [j["job_id"] for j in client.jobs()] == ["j-2"]


def test_an_unknown_job_is_refused_and_a_bad_spec_never_leaves(client):
    with pytest.raises(RequestRefused, match="no job nope"):
        client.attach("nope").result(10)
    with pytest.raises(ValueError, match="job_id"):
        client.submit(spec("../../etc", "true"))
    assert client.jobs() == []


def test_cancel_ends_the_job_and_its_processes(client, tmp_path):
    pid_file = tmp_path / "pid"
    fut = client.submit(spec("j-3", "echo $$ > %s; exec sleep 120" % pid_file))
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert client.cancel("j-3") in ("running", "cancelled")
    with pytest.raises(JobCancelled):
        fut.result(30)
    deadline = time.monotonic() + 15
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists("/proc/%d" % pid), "the job's process survived its cancel"


def test_a_new_agent_on_the_workdir_adopts_a_running_job(inproc, tmp_path):
    workdir = str(tmp_path / "work")
    first = inproc.start(workdir)
    go = tmp_path / "go"
    first.submit(spec("j-4", "while [ ! -e %s ]; do sleep 0.05; done; echo finished" % go))
    time.sleep(0.5)
    inproc.stop_agent()  # the agent ends; its job does not
    second = inproc.start(workdir)
    out = bytearray()
    fut = second.attach("j-4", on_output=lambda stream, data: out.extend(data))
    go.write_text("")
    assert fut.result(30).exit_code == 0
    assert b"finished" in bytes(out)


def _started_unrecorded(workdir: str, job: JobSpec):
    """What an agent killed between starting a job and recording its start leaves: the
    job in the journal as submitted, its script running (started as the agent starts it)."""
    import subprocess
    from scipion_cloudexec.remote.jobs import JobFiles, job_script
    from scipion_cloudexec.remote.journal import Journal
    from scipion_cloudexec.remote.launchers import launcher_for
    os.makedirs(os.path.join(workdir, "agent"), exist_ok=True)
    journal = Journal(os.path.join(workdir, "agent", "journal.sqlite"))
    journal.add(job, "process")
    journal.close()
    files = JobFiles(os.path.join(workdir, "jobs"), job.job_id)
    os.makedirs(files.dir)
    with open(files.script, "w") as f:
        f.write(job_script(job, files, launcher_for("local").command(job, files)))
    proc = subprocess.Popen(["/bin/sh", files.script], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while not files.read_started_pid() and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc, files


@pytest.mark.parametrize("when", ["still running", "ended"])
def test_a_job_started_but_not_recorded_by_a_killed_agent_is_adopted_not_run_again(
        inproc, tmp_path, when):
    # the new agent called it lost ("the agent stopped before the job started") and the
    # step ran again: its command completed twice (the soak, an agent SIGKILLed mid-submit)
    workdir = str(tmp_path / "work")
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    job = spec("j-unrecorded", "echo ran >> %s; while [ ! -e %s ]; do sleep 0.05; done; "
                               "echo finished" % (ledger, go))
    proc, files = _started_unrecorded(workdir, job)
    try:
        if when == "ended":
            go.write_text("")
            proc.wait(10)
        agent = inproc.start(workdir)
        fut = agent.submit(job)  # the client's retry after the loss: attached, not run
        go.write_text("")
        result = fut.result(30)
        assert result.exit_code == 0 and result.state.value == "done"
        assert fut.existed
    finally:
        go.write_text("")
        proc.wait(10)
    assert ledger.read_text() == "ran\n", "the command ran once"


# ---- the head node's slots, shared by every client (JobSpec.slots) ----------------------

def _another_client(workdir: str, name: str) -> AgentClient:
    """A second client (another protocol, another desktop) of the agent on *workdir*."""
    with open(os.path.join(workdir, "agent", "agent.json")) as f:
        state = json.load(f)
    cluster = ClusterConfig(name="inproc", host="127.0.0.1", user="u", identity_file="",
                            python=sys.executable, launcher="local", slots=2,
                            workdir=workdir, heartbeat=0.5)
    c = AgentClient(cluster, client_name=name)
    c.connect(state, address="tcp://127.0.0.1:%d" % state["port"])
    return c


def _timed(job_id: str, ledger, seconds: float, slots: int, threads: int = 1) -> JobSpec:
    """A job writing its start and end times to *ledger*."""
    s = spec(job_id, "echo \"start $(date +%%s.%%N)\" >> %s; sleep %s; "
                     "echo \"end $(date +%%s.%%N)\" >> %s" % (ledger, seconds, ledger))
    s.slots, s.threads = slots, threads
    return s


def _most_at_once(ledger) -> int:
    events = sorted((float(t), 1 if kind == "start" else -1)
                    for kind, t in (line.split() for line in ledger.read_text().splitlines()))
    most = now = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        now += d
        most = max(most, now)
    return most


def test_two_clients_share_the_head_nodes_slots(inproc, tmp_path):
    """Two protocols on one cluster of 2 slots: each may send 2 jobs at once, but the agent
    runs at most 2 in all; the others wait in order and all end done. Before, each client
    counted the slots alone and 4 ran at once."""
    workdir = str(tmp_path / "work")
    first = inproc.start(workdir)
    second = _another_client(workdir, "other-protocol")
    try:
        ledger = tmp_path / "ledger"
        futs = [c.submit(_timed("%s-%d" % (name, i), ledger, 0.6, slots=2))
                for i in range(2) for c, name in ((first, "a"), (second, "b"))]
        deadline = time.monotonic() + 10  # the two clients' submits arrive in any order
        while (len(first.jobs()) < 4 or
               len([j for j in first.jobs() if j["state"] != "submitted"]) < 2) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        waiting = [j for j in first.jobs() if j["state"] == "submitted"]
        assert len(waiting) == 2 and all("waiting for slots: 2 of 2 in use" in j["reason"]
                                         for j in waiting), first.jobs()
        # the submit's answer already said so (the step's log tells the user)
        assert sorted(bool(f.accepted_reason) for f in futs) == [False, False, True, True]
        assert all(f.result(30).state.value == "done" for f in futs)
    finally:
        second.close()
    assert _most_at_once(ledger) == 2
    assert [line.split()[0] for line in ledger.read_text().splitlines()].count("end") == 4


def test_a_job_larger_than_the_slots_runs_alone(client, tmp_path):
    ledger = tmp_path / "ledger"
    small = client.submit(_timed("small", ledger, 0.5, slots=2))
    big = client.submit(_timed("big", ledger, 0.1, slots=2, threads=3))
    assert small.result(30).state.value == "done" and big.result(30).state.value == "done"
    assert _most_at_once(ledger) == 1, "the 3-slot job waited for the other, then ran alone"


def test_a_waiting_job_cancelled_never_runs_and_the_next_takes_its_turn(client, tmp_path, go):
    ledger = tmp_path / "ledger"
    running = spec("hold-1", "while [ ! -e %s ]; do sleep 0.05; done" % go)
    running.slots = 1
    first = client.submit(running)
    second = client.submit(_timed("hold-2", ledger, 0, slots=1))
    third = client.submit(_timed("hold-3", ledger, 0, slots=1))
    time.sleep(0.3)
    assert client.cancel("hold-2") == "submitted"
    with pytest.raises(JobCancelled, match="cancelled while waiting for slots"):
        second.result(10)
    go.write_text("")
    assert first.result(30).state.value == "done" and third.result(30).state.value == "done"
    assert not os.path.exists(os.path.join(tmp_path, "work", "jobs", "hold-2", "started"))
    assert ledger.read_text().count("start") == 1, "only hold-3 ran"


def test_a_waiting_job_survives_an_agent_restart_and_runs_once(inproc, tmp_path, go):
    """The agent stops while one job runs and another waits for its slot: the new agent
    adopts the first and keeps the second waiting (it never ran: not lost), then runs it."""
    workdir = str(tmp_path / "work")
    ledger = tmp_path / "ledger"
    first = inproc.start(workdir)
    running = spec("r-1", "while [ ! -e %s ]; do sleep 0.05; done; echo \"end $(date +%%s.%%N)\""
                          " >> %s" % (go, ledger))
    running.slots = 1
    first.submit(running)
    first.submit(_timed("r-2", ledger, 0, slots=1))
    time.sleep(0.5)
    inproc.stop_agent()
    second = inproc.start(workdir)
    waiting = {j["job_id"]: j for j in second.jobs()}
    assert waiting["r-2"]["state"] == "submitted", waiting
    fut = second.attach("r-2")
    go.write_text("")
    assert fut.result(30).state.value == "done"
    lines = ledger.read_text().split()
    assert lines.count("start") == 1 and lines.count("end") == 2
    assert float(lines[1]) <= float(lines[3]), "r-2 started after r-1 ended: %s" % lines


def test_two_clients_asking_for_the_same_gpu_get_different_ones_or_wait(inproc, tmp_path, go):
    """Three protocols' first GPU slot is the cluster's GPU 4: the second protocol's job
    gets GPU 5 (free in the cluster's pool), the third's waits until one is free. A job
    without GPUs does not wait behind it, and a protocol's own steps may share a GPU. Each
    job records the CUDA_VISIBLE_DEVICES it saw. Before, all ran on GPU 4 at once."""
    workdir = str(tmp_path / "work")
    first = inproc.start(workdir)
    second = _another_client(workdir, "other-protocol")
    try:
        def gpu_job(job_id: str, wait: bool, client: str) -> JobSpec:
            s = spec(job_id, "echo $CUDA_VISIBLE_DEVICES > %s/%s.gpu; %s" % (
                tmp_path, job_id, "while [ ! -e %s ]; do sleep 0.05; done" % go if wait
                else "true"))
            s.gpus, s.gpu_pool, s.slots, s.client = [4], [4, 5], 8, client  # as sessions do
            return s
        def started(job_id: str) -> None:  # two clients' submits may arrive in any order
            deadline = time.monotonic() + 10
            while not (tmp_path / ("%s.gpu" % job_id)).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        a = first.submit(gpu_job("g-a", True, "p1"))
        started("g-a")
        b = second.submit(gpu_job("g-b", True, "p2"))
        started("g-b")
        c = second.submit(gpu_job("g-c", False, "p3"))  # a third protocol
        time.sleep(0.3)
        waiting = {j["job_id"]: j for j in second.jobs()}["g-c"]
        assert waiting["state"] == "submitted" and \
            "waiting for GPUs: 4,5 held by other protocols' jobs" in waiting["reason"], waiting
        cpu = spec("g-cpu", "true")
        cpu.slots = 8
        assert second.submit(cpu).result(10).state.value == "done"
        own = first.submit(gpu_job("g-own", False, "p1"))
        assert own.result(10).state.value == "done"
        go.write_text("")
        assert all(f.result(30).state.value == "done" for f in (a, b, c))
        # the result says where it ran (the step's provenance record takes it)
        assert a.result().gpus == (4,) and b.result().gpus == (5,)
    finally:
        second.close()
    seen = {j: (tmp_path / ("%s.gpu" % j)).read_text().strip()
            for j in ("g-a", "g-b", "g-c", "g-own")}
    assert seen["g-a"] == "4" and seen["g-b"] == "5" and seen["g-own"] == "4", seen
    assert seen["g-c"] in ("4", "5"), seen


def test_a_stale_held_marker_does_not_make_a_started_job_run_again(inproc, tmp_path):
    """A job that started though its 'held' marker is still there (its removal failed):
    the new agent adopts the running job and does not start it a second time."""
    from scipion_cloudexec.remote.jobs import JobFiles
    workdir = str(tmp_path / "work")
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    job = spec("j-stale", "echo ran >> %s; while [ ! -e %s ]; do sleep 0.05; done"
               % (ledger, go))
    job.slots = 1
    proc, files = _started_unrecorded(workdir, job)
    open(JobFiles(os.path.join(workdir, "jobs"), job.job_id).held, "w").close()
    try:
        agent = inproc.start(workdir)
        fut = agent.submit(job)
        go.write_text("")
        assert fut.result(30).state.value == "done" and fut.existed
    finally:
        go.write_text("")
        proc.wait(10)
    assert ledger.read_text() == "ran\n", "the command ran once"


def test_a_worker_pool_does_not_count_against_the_slots():
    """A protocol's pool holds its ranks for the whole protocol and runs that protocol's
    single-rank jobs: counting it could make its own MPI steps wait for it forever."""
    from scipion_cloudexec.remote.supervisor import Supervisor
    pool = JobSpec(job_id="p", argv=[sys.executable, "/w/agent.zip", "pool", "--dir", "/w/p"],
                   ranks=3, slots=4)
    step = JobSpec(job_id="s", argv=["relion_refine_mpi"], ranks=2, slots=4)
    assert not Supervisor._limited(pool, "process") and Supervisor._limited(step, "process")
