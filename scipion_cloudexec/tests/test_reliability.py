"""Faults produced for real while a protocol runs, each measured for docs/RELIABILITY.md:
what the user sees, how long recovery takes, and that no output is lost and no step's
command completes twice. Every command appends its start and end to a log outside the
project (the namespaced hosts share the desktop's filesystem), so a step run twice shows."""
import collections
import os
import re
import time

import pytest

from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps
from scipion_cloudexec.tests.harness import assert_same_run
from scipion_cloudexec.tests.test_executor import launch, logs, provenance, wait_done

pytestmark = pytest.mark.slow


def logged_step(ledger, seconds):
    """A fan command that records its start and end in *ledger* around *seconds* of work."""
    return ("echo start {i} >> %s; sleep %s; echo {i} > extra/out_{i}.txt; "
            "echo end {i} >> %s" % (ledger, seconds, ledger))


def ends(ledger):
    """How many times each step's command completed."""
    with open(ledger) as f:
        return collections.Counter(int(m.group(1)) for m in re.finditer(r"^end (\d+)$", f.read(),
                                                                       re.M))


def shell(project, label, fan, copies, threads):
    prot = project.newProtocol(ProtCloudShellSteps, objLabel=label, numberOfThreads=threads,
                               fanCopies=copies, chain="mkdir -p extra", fan=fan)
    return prot


@pytest.fixture
def netns_cluster(hosts, testbed, tmp_path, clusters_env):
    """``netns_cluster(name)``: a cluster on one of the namespaced hosts (link can be cut)."""
    made = []

    def make(name, slots=4):
        made.append(name)
        return ClusterConfig(
            name=name, host=hosts.address(name), port=22, user=testbed.user,
            identity_file=testbed.client_key, known_hosts=hosts.known_hosts,
            workdir=str(tmp_path / ("remote-" + name)), python=testbed.python,
            launcher="mpirun", slots=slots, heartbeat=0.5, connect_timeout=5.0,
            mpirun=("mpirun", "--oversubscribe", "--bind-to", "none"))
    yield make
    for name in made:
        hosts.link(name, True)


def wait_started(ledger, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(ledger) and open(ledger).read().count("start") >= n:
            return
        time.sleep(0.1)
    raise AssertionError("the jobs never started")


def test_link_cut_mid_job_on_the_only_cluster_runs_no_step_twice(netns_cluster, hosts,
                                                                 clusters_env, new_project,
                                                                 tmp_path, reliability):
    """The link to the only cluster drops for 5 s while its jobs run. The jobs go on
    there; when the link is back the protocol attaches to them again: each command
    completes once, and the run folder is what a local run leaves."""
    c = netns_cluster(hosts.names()[0])
    clusters_env(c)
    project = new_project("cutjob")
    local_ledger, ledger = str(tmp_path / "local.log"), str(tmp_path / "cloud.log")
    local = launch(project, shell(project, "local", logged_step(local_ledger, 0), 4, 4))
    assert local.isFinished(), logs(local)
    prot = shell(project, "cloud", logged_step(ledger, 8), 4, 4)
    prot._useQueue.set(True)
    prot.setQueueParams([c.name, {"QUEUE_FOR_JOBS": "Y"}])
    t0 = time.monotonic()
    project.launchProtocol(prot, wait=False)
    wait_started(ledger, 4)
    hosts.link(c.name, False)
    cut = time.monotonic()
    time.sleep(5)  # > 3 heartbeats: the desktop takes the cluster for lost
    hosts.link(c.name, True)
    back = time.monotonic()
    prot = wait_done(project, prot, timeout=240)
    done = time.monotonic()
    assert prot.isFinished(), logs(prot)
    assert "failed this job (AgentLost" in logs(prot)
    assert ends(ledger) == {i: 1 for i in range(4)}, "a step's command completed twice"
    assert_same_run(local, prot)
    assert {r["cluster"] for r in provenance(prot)} == {c.name}
    reliability(fault="link to the only cluster cut for 5 s", when="mid-job",
                seen="'cluster %s failed this job (AgentLost ...); it is tried there again'; "
                     "the protocol then attaches to the running jobs and finishes" % c.name,
                recover_s=round(done - back, 1), total_s=round(done - t0, 1),
                cut_s=round(back - cut, 1), lost=0, twice=0)
