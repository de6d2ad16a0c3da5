"""Three fake clusters on separate hosts (network namespaces, each with its own sshd and
OpenMPI), one protocol's jobs shared between them, and a link cut in the middle."""
import os
import subprocess

import pytest

from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps
from scipion_cloudexec.tests.conftest import _stop_agent
from scipion_cloudexec.tests.harness import assert_same_run
from scipion_cloudexec.tests.test_executor import local_twin, logs, provenance, wait_done

pytestmark = pytest.mark.slow


@pytest.fixture
def netns_clusters(hosts, testbed, tmp_path, clusters_env):
    def make(slots=(1, 2, 4)):
        out = []
        for name, s in zip(hosts.names(), slots):
            out.append(ClusterConfig(
                name=name, host=hosts.address(name), port=22, user=testbed.user,
                identity_file=testbed.client_key, known_hosts=hosts.known_hosts,
                workdir=str(tmp_path / ("remote-" + name)), python=testbed.python,
                launcher="mpirun", slots=s, heartbeat=0.5, connect_timeout=5.0,
                mpirun=("mpirun", "--oversubscribe", "--bind-to", "none")))
        clusters_env(*out)
        return out
    yield make
    for name in hosts.names():
        hosts.link(name, True)
        _stop_agent(str(tmp_path / ("remote-" + name)))


def fan_protocol(project, copies, seconds, ledger):
    """Steps writing what a local run writes; where each ran goes to *ledger*, outside the
    project (the namespaces share the desktop's filesystem), so a local twin can compare."""
    prot = project.newProtocol(ProtCloudShellSteps, numberOfThreads=8, fanCopies=copies,
                               fan="sleep %s; echo 'step {i}' > extra/out_{i}.txt; "
                                   "echo \"{i} $CLOUDEXEC_JOB_ID $(hostname -I)\" >> %s" % (seconds, ledger))
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot._useQueue.set(True)
    prot.setQueueParams(["all", {"QUEUE_FOR_JOBS": "Y"}])
    return prot


def ran_on(ledger):
    """copy -> [(job id, addresses of the host)], one per run of its command."""
    where = {}
    for line in open(ledger).read().splitlines():
        i, job, *addresses = line.split()
        where.setdefault(int(i), []).append((job, set(addresses)))
    return where


def test_split_follows_capacity_with_a_slow_link(netns_clusters, hosts, new_project, tmp_path):
    c1, c2, c3 = netns_clusters()
    ledger = str(tmp_path / "where.txt")
    # c2 behind a 2 Mbit/s token bucket (this kernel has no netem)
    subprocess.run(["tc", "qdisc", "add", "dev", "cx-c2-h", "root", "tbf", "rate", "2mbit",
                    "burst", "32kbit", "latency", "400ms"], check=True)
    try:
        project = new_project("split3")
        prot = fan_protocol(project, 21, 0.5, ledger)
        project.launchProtocol(prot, wait=True)
        prot = project.getProtocol(prot.getObjId())
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "cx-c2-h", "root"], check=False)
    assert prot.isFinished(), logs(prot)
    where = [r["cluster"] for r in provenance(prot)]
    counts = {c.name: where.count(c.name) for c in (c1, c2, c3)}
    assert len(where) == 21 and min(counts.values()) > 0, counts
    assert counts[c3.name] == max(counts.values()) and counts[c3.name] > counts[c1.name], counts
    where = ran_on(ledger)  # each copy ran once, on the host of the cluster it is recorded on
    assert sorted(where) == list(range(21)) and all(len(w) == 1 for w in where.values()), where
    host = {r["job_id"]: hosts.address(r["cluster"]) for r in provenance(prot)}
    assert all({host[job]} == addresses for (job, addresses), in where.values()), where
    assert_same_run(local_twin(project, prot), prot)


def test_cut_link_mid_protocol_reruns_its_jobs_elsewhere_then_it_comes_back(
        netns_clusters, hosts, new_project, tmp_path):
    import time
    c1, c2, c3 = netns_clusters((2, 2, 2))
    project = new_project("cut")
    ledger = str(tmp_path / "where.txt")
    prot = fan_protocol(project, 12, 2, ledger)
    project.launchProtocol(prot, wait=False)
    jobs = os.path.join(c2.workdir, "jobs")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (os.path.isdir(jobs) and os.listdir(jobs)):
        time.sleep(0.1)
    hosts.link(c2.name, False)  # c2's link goes down while it runs jobs
    prot = wait_done(project, prot)
    assert prot.isFinished(), logs(prot)
    records = provenance(prot)
    assert len(records) == 12 and len({r["step"] for r in records}) == 12, "each step once"
    assert all(r["cluster"] != c2.name for r in records), "nothing gathered from the lost one"
    assert "lost contact with cluster" in logs(prot)  # then attached to again, or moved
    ran = {job: addresses for runs in ran_on(ledger).values() for job, addresses in runs}
    for r in records:  # the job each step took its outputs from ran where it is recorded
        assert ran[r["job_id"]] == {hosts.address(r["cluster"])}, (r, ran)
    assert_same_run(local_twin(project, prot), prot)
    hosts.link(c2.name, True)
    again = fan_protocol(project, 8, 0.5, str(tmp_path / "again.txt"))
    project.launchProtocol(again, wait=True)
    again = project.getProtocol(again.getObjId())
    assert again.isFinished(), logs(again)
    assert c2.name in {r["cluster"] for r in provenance(again)}, "back: it takes work again"
    assert_same_run(local_twin(project, again), again)


def test_a_job_whose_end_was_cut_off_is_not_run_again_on_its_cluster(netns_clusters, hosts,
                                                                      new_project, tmp_path):
    """The link drops while a job runs; the job ends on the cluster but its end never
    reaches the desktop. When the cluster is back, the step takes that job's result instead
    of running it again (the soak found such steps run twice)."""
    import time
    from scipion_cloudexec.tests.test_executor import wait_for
    c1 = netns_clusters()[0]
    project = new_project("cutoff")
    ledger, flag = tmp_path / "ledger", tmp_path / "running"
    # the first run tells the test it runs, then lasts long enough for the cut to come first
    cmd = ("echo ran >> %s; echo out > extra/out.txt; if [ ! -e %s ]; then touch %s; sleep 2; "
           "fi" % (ledger, flag, flag))
    prot = project.newProtocol(ProtCloudShellSteps, chain=cmd)
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot._useQueue.set(True)
    prot.setQueueParams([c1.name, {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(prot, wait=False)
    wait_for(str(flag))
    hosts.link(c1.name, False)
    time.sleep(4)  # the job has ended there; the desktop has declared the cluster lost
    hosts.link(c1.name, True)
    prot = wait_done(project, prot)
    assert prot.isFinished(), logs(prot)
    assert "lost contact with cluster" in logs(prot)  # then attached to again, or moved
    assert ledger.read_text() == "ran\n", "the command ran once"
    assert open(os.path.join(prot._getExtraPath(), "out.txt")).read() == "out\n"
    assert [r["exit_code"] for r in provenance(prot)] == [0]
    assert_same_run(local_twin(project, prot), prot)


def test_a_command_over_a_cut_link_fails_as_a_lost_connection(netns_clusters, hosts):
    """paramiko's "Timeout opening channel." (an SSHException, which the executor did not
    know as an infrastructure failure) failed a whole protocol in the soak."""
    from scipion_cloudexec.cluster.ssh import SSHConnection, SSHError, Target
    c1 = netns_clusters()[0]
    ssh = SSHConnection(Target.of(c1))
    ssh.connect()
    hosts.link(c1.name, False)
    try:
        with pytest.raises(SSHError, match="lost"):
            ssh.run("true")
    finally:
        hosts.link(c1.name, True)
        ssh.close()
