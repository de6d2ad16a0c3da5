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
from scipion_cloudexec.cluster.errors import JobFailed
from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.remote.jobs import JobSpec, LauncherSpec
from scipion_cloudexec.remote.server import Agent


@pytest.fixture
def client(tmp_path):
    workdir = str(tmp_path / "work")
    agent = Agent(workdir, idle_timeout=60.0, heartbeat=0.5)
    # serve() binds on its own thread: the journal's sqlite connection belongs to it
    thread = threading.Thread(target=agent.serve, name="agent-in-process", daemon=True)
    thread.start()
    state_path = os.path.join(workdir, "agent", "agent.json")
    deadline = time.monotonic() + 10
    while not os.path.exists(state_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(state_path) as f:
        state = json.load(f)
    cluster = ClusterConfig(name="inproc", host="127.0.0.1", user="u", identity_file="",
                            python=sys.executable, launcher="local", slots=2, workdir=workdir,
                            heartbeat=0.5)
    c = AgentClient(cluster, client_name="test")
    c.connect(state, address="tcp://127.0.0.1:%d" % state["port"])
    yield c
    c.close()
    agent.running = False
    thread.join(10)


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
