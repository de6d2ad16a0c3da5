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
from scipion_cloudexec.tests.conftest import _stop_agent
from scipion_cloudexec.tests.harness import assert_same_run
from scipion_cloudexec.tests.test_executor import launch, logs, wait_done

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
        _stop_agent(str(tmp_path / ("remote-" + name)))


def wait_started(ledger, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(ledger) and open(ledger).read().count("start") >= n:
            return
        time.sleep(0.1)
    raise AssertionError("the jobs never started")


def kill_sshd(hosts, name):
    """SIGKILL every sshd of a namespaced host, listener and sessions; its agent and jobs go
    on."""
    import signal
    import subprocess
    for pid in subprocess.run(["ip", "netns", "pids", "cx-" + name], capture_output=True,
                              text=True).stdout.split():
        try:
            if open("/proc/%s/comm" % pid).read().strip() == "sshd":
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def start_sshd(hosts, name):
    pidfile = os.path.join(hosts.root, name, "sshd.pid")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    hosts._start_sshd(name, "cx-" + name, hosts.address(name))


def run_with_cut(project, queue, ledger, copies, seconds, cut_s, hosts, cut, wait_for_starts,
                 sshd_down=False, **queue_params):
    """Launch the logged fan on *queue*; once *wait_for_starts* commands started, cut
    *cut*'s link for *cut_s* seconds (with *sshd_down*, stop its sshd instead: every attempt
    to reach it is refused at once). Returns (protocol, seconds from the restore to the
    end, seconds in all)."""
    prot = shell(project, "cloud", logged_step(ledger, seconds), copies, 5)
    prot._useQueue.set(True)
    prot.setQueueParams([queue, dict(QUEUE_FOR_JOBS="Y", **queue_params)])
    t0 = time.monotonic()
    project.launchProtocol(prot, wait=False)
    wait_started(ledger, wait_for_starts)
    if sshd_down:
        kill_sshd(hosts, cut)
    else:
        hosts.link(cut, False)
    time.sleep(cut_s)
    if sshd_down:
        start_sshd(hosts, cut)
    else:
        hosts.link(cut, True)
    back = time.monotonic()
    prot = wait_done(project, prot, timeout=400)
    done = time.monotonic()
    return prot, round(done - back, 1), round(done - t0, 1)


def local_run(project, tmp_path, copies):
    local = launch(project, shell(project, "local", logged_step(str(tmp_path / "local.log"), 0),
                                  copies, 5))
    assert local.isFinished(), logs(local)
    return local


@pytest.mark.parametrize("n_clusters", [1, 2])
def test_a_short_link_cut_mid_job_runs_no_step_twice(netns_cluster, hosts, clusters_env,
                                                     new_project, tmp_path, reliability,
                                                     n_clusters):
    """The link to a cluster drops for 5 s while its jobs run. They go on there; the
    desktop reaches the cluster again and attaches to them: no job moves, each command
    completes once, and the run folder is what a local run leaves."""
    clusters = [netns_cluster(n, slots=2) for n in hosts.names()[:n_clusters]]
    clusters_env(*clusters)
    cut = clusters[-1].name
    project = new_project("cutjob")
    local = local_run(project, tmp_path, 4)
    ledger = str(tmp_path / "cloud.log")
    prot, recover, total = run_with_cut(project, "all", ledger, 4, 8, 5, hosts, cut, 3)
    text = logs(prot)
    assert prot.isFinished(), text
    assert "lost contact with cluster %s" % cut in text
    assert "in contact with %s again" % cut in text
    assert "failed this job" not in text, "nothing moved"
    assert ends(ledger) == {i: 1 for i in range(4)}, "a step's command completed twice"
    assert_same_run(local, prot)
    reliability(fault="link to %s cut for 5 s" % ("the only cluster" if n_clusters == 1 else
                                                   "one of two clusters"),
                when="mid-job", seen="'lost contact with cluster %s (AgentLost ...); trying to "
                "reach it again for up to 30 s: its job goes on there meanwhile', then 'in "
                "contact with %s again after N s'" % (cut, cut),
                recover_s=recover, total_s=total, lost=0, twice=0)


@pytest.mark.matrix  # minutes: benchmarks/reliability.py runs it, not the default run
def test_a_long_link_cut_moves_the_jobs_and_stops_those_left(netns_cluster, hosts,
                                                            clusters_env, new_project,
                                                            tmp_path, reliability):
    """One of two clusters cannot be reached for longer than CLOUD_RECONNECT (its sshd and
    every SSH session killed; its agent and jobs go on): its jobs run again on the other. When the lost cluster takes work of this run again (after 30 s),
    the jobs left running there are stopped first and its mirror emptied: nothing of them
    reaches the project and no step's command completes twice."""
    names = hosts.names()
    c1, c2 = netns_cluster(names[0], slots=2), netns_cluster(names[1], slots=2)
    clusters_env(c1, c2)
    project = new_project("cuttwo")
    local = local_run(project, tmp_path, 6)
    ledger = str(tmp_path / "cloud.log")
    prot, recover, total = run_with_cut(project, "all", ledger, 6, 60, 12, hosts, c2.name, 3,
                                        sshd_down=True, CLOUD_RECONNECT="4")
    text = logs(prot)
    assert prot.isFinished(), text
    assert "lost contact with cluster %s" % c2.name in text
    assert "cluster %s failed this job (HostUnreachable" % c2.name in text
    assert "left on %s when it was lost were stopped" % c2.name in text
    assert ends(ledger) == {i: 1 for i in range(6)}, "a step's command completed twice"
    assert_same_run(local, prot)
    reliability(fault="one of two clusters unreachable for 12 s (> CLOUD_RECONNECT=4 s): its "
                "sshd and SSH sessions killed, then started again",
                when="mid-job", seen="'lost contact with cluster %s ...', then 'cluster %s failed "
                "this job (HostUnreachable ...); it goes to another cluster'; when %s takes work "
                "again: 'N job(s) of this run left on %s "
                "when it was lost were stopped: their steps run again'"
                % (c2.name, c2.name, c2.name, c2.name),
                recover_s=recover, total_s=total, lost=0, twice=0)


def namespace_pids(hosts, name):
    """Processes running in a namespaced host, but its sshd listener."""
    import subprocess
    sshd = open(os.path.join(hosts.root, name, "sshd.pid")).read().strip()
    pids = subprocess.run(["ip", "netns", "pids", "cx-" + name], capture_output=True,
                          text=True).stdout.split()
    return [int(p) for p in pids if p != sshd]


def one_cluster_run(netns_cluster, hosts, clusters_env, new_project, tmp_path, label, fan,
                    copies, fault, wait_for, prepare=lambda prot: None):
    """Run *fan* locally, then on one namespaced cluster calling ``fault(cluster)`` once
    ``wait_for()`` is true; ``prepare(prot)`` readies each protocol's run folder. Returns
    (local, cloud, seconds from the fault's end to the protocol's end, seconds in all)."""
    c = netns_cluster(hosts.names()[0], slots=2)
    clusters_env(c)
    project = new_project(label)
    local = shell(project, "local", fan(str(tmp_path / "local.log")), copies, 3)
    prepare(local)
    local = launch(project, local)
    assert local.isFinished(), logs(local)
    prot = shell(project, "cloud", fan(str(tmp_path / "cloud.log")), copies, 3)
    prepare(prot)
    prot._useQueue.set(True)
    prot.setQueueParams([c.name, {"QUEUE_FOR_JOBS": "Y"}])
    t0 = time.monotonic()
    project.launchProtocol(prot, wait=False)
    deadline = time.monotonic() + 120
    while not wait_for():
        assert time.monotonic() < deadline, "the fault's moment never came"
        time.sleep(0.1)
    fault(c)
    back = time.monotonic()
    prot = wait_done(project, prot, timeout=300)
    done = time.monotonic()
    assert prot.isFinished(), logs(prot)
    return local, prot, round(done - back, 1), round(done - t0, 1)


@pytest.mark.parametrize("cut_s", [pytest.param(5, marks=pytest.mark.matrix), 20])
def test_link_cut_mid_gather_brings_every_byte_once(netns_cluster, hosts, clusters_env,
                                                    new_project, tmp_path, reliability, cut_s):
    """Each step writes 24 MB that come back through a 40 Mbit/s link; the link drops while
    they travel. 5 s: TCP rides it out, the transfer stalls and goes on. 20 s (longer than
    the dead-link timer): the gather fails, the cluster is reached again and the gather
    starts over. Either way the bytes are the local run's and no command runs twice."""
    import subprocess
    ledger = str(tmp_path / "cloud.log")
    fan = lambda log: (  # noqa: E731
        "echo start {i} >> %s; python3 -c 'import random, sys; random.seed({i}); "
        "sys.stdout.buffer.write(random.randbytes(24 << 20))' > extra/big_{i}.bin; "
        "echo end {i} >> %s" % (log, log))
    ns, dev = "cx-" + hosts.names()[0], "cx-%s-n" % hosts.names()[0]
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", "40mbit", "burst", "64kbit", "latency", "400ms"], check=True)

    def cut(c):
        hosts.link(c.name, False)
        time.sleep(cut_s)
        hosts.link(c.name, True)
    try:
        local, cloud, recover, total = one_cluster_run(
            netns_cluster, hosts, clusters_env, new_project, tmp_path, "cutgather", fan, 2,
            cut, lambda: os.path.exists(ledger) and open(ledger).read().count("end") >= 1
            and not time.sleep(1.5))
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                       check=False)
    text = logs(cloud)
    if cut_s > 12:  # the dead-link timer (staging/channels.py)
        assert "lost contact with cluster" in text, text
    assert ends(ledger) == {0: 1, 1: 1}, "a step's command completed twice"
    assert_same_run(local, cloud)
    reliability(fault="link cut for %d s" % cut_s, when="mid-gather (2 x 24 MB at 40 Mbit/s)",
                seen="nothing: the transfer stalls, then goes on" if cut_s <= 12 else
                "'lost contact with cluster ...; trying to reach it again', then the job's "
                "result is reused and its outputs gathered again", recover_s=recover,
                total_s=total, lost=0, twice=0)


def test_head_node_reboot_runs_the_killed_steps_again_once(netns_cluster, hosts,
                                                           clusters_env, new_project, tmp_path,
                                                           reliability):
    """Everything on the head node is killed (SIGKILL: the agent and its jobs, as a reboot
    does; the workdir stays). A new agent finds the jobs gone; each step runs again once."""
    import signal
    ledger = str(tmp_path / "cloud.log")

    def reboot(c):
        for pid in namespace_pids(hosts, c.name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    local, cloud, recover, total = one_cluster_run(
        netns_cluster, hosts, clusters_env, new_project, tmp_path, "reboot",
        lambda log: logged_step(log, 6), 2, reboot,
        lambda: os.path.exists(ledger) and open(ledger).read().count("start") >= 2)
    text = logs(cloud)
    assert "lost contact with cluster" in text, text
    assert ends(ledger) == {0: 1, 1: 1}, "a step's command completed twice (or never)"
    assert_same_run(local, cloud)
    reliability(fault="head node 'reboot' (agent and jobs SIGKILLed)", when="mid-job",
                seen="'lost contact with cluster ...', then 'job ... had ended lost before: the "
                "step runs again as job ....2'", recover_s=recover, total_s=total, lost=0,
                twice=0)


def test_sshd_restart_mid_job_reattaches(netns_cluster, hosts, clusters_env, new_project,
                                         tmp_path, reliability):
    """The head node's sshd and every SSH session are killed and sshd starts again 2 s
    later; the agent and jobs go on: the desktop reconnects and attaches to them."""
    ledger = str(tmp_path / "cloud.log")

    def restart_sshd(c):
        kill_sshd(hosts, c.name)
        time.sleep(2)
        start_sshd(hosts, c.name)
    local, cloud, recover, total = one_cluster_run(
        netns_cluster, hosts, clusters_env, new_project, tmp_path, "sshd",
        lambda log: logged_step(log, 6), 2, restart_sshd,
        lambda: os.path.exists(ledger) and open(ledger).read().count("start") >= 2)
    text = logs(cloud)
    assert "lost contact with cluster" in text and "again after" in text, text
    assert ends(ledger) == {0: 1, 1: 1}, "a step's command completed twice"
    assert_same_run(local, cloud)
    reliability(fault="sshd restarted, every SSH session killed", when="mid-job",
                seen="'lost contact with cluster ...', then 'in contact with ... again after "
                "N s'", recover_s=recover, total_s=total, lost=0, twice=0)


def test_agent_sigkill_mid_job_reattaches(netns_cluster, hosts, clusters_env, new_project,
                                          tmp_path, reliability):
    """The agent is killed (SIGKILL) while a protocol's jobs run: its jobs go on, a new
    agent adopts them and the desktop attaches to them again."""
    import json
    import signal
    ledger = str(tmp_path / "cloud.log")
    state = str(tmp_path / ("remote-" + hosts.names()[0]) / "agent" / "agent.json")

    def kill_agent(c):
        with open(state) as f:
            os.kill(int(json.load(f)["pid"]), signal.SIGKILL)
    local, cloud, recover, total = one_cluster_run(
        netns_cluster, hosts, clusters_env, new_project, tmp_path, "agentkill",
        lambda log: logged_step(log, 6), 2, kill_agent,
        lambda: os.path.exists(ledger) and open(ledger).read().count("start") >= 2)
    text = logs(cloud)
    assert "lost contact with cluster" in text and "again after" in text, text
    assert ends(ledger) == {0: 1, 1: 1}, "a step's command completed twice"
    assert_same_run(local, cloud)
    reliability(fault="agent SIGKILL", when="mid-job", seen="'lost contact with cluster ...', "
                "then 'in contact with ... again after N s'", recover_s=recover,
                total_s=total, lost=0, twice=0)


def spectra_inputs(project, tmp_path):
    """Three imported 2048 x 2048 micrographs (48 MB, copied into the project): inputs
    that have to travel."""
    from pwem.protocols import ProtImportMicrographs
    from scipion_cloudexec.tests.datagen import write_micrographs
    write_micrographs(str(tmp_path / "mics"), 3, shape=(2048, 2048), seed=5)
    prot = project.newProtocol(ProtImportMicrographs, filesPath=str(tmp_path / "mics"),
                               filesPattern="mic_*.mrc", samplingRate=1.25, voltage=300.0,
                               sphericalAberration=2.7, amplitudeContrast=0.1,
                               magnification=50000, copyFiles=True)
    project.launchProtocol(prot, wait=True)
    assert prot.isFinished()
    return prot


def spectra(project, imported, cluster=None):
    from scipion_cloudexec.protocols import ProtCloudPowerSpectra
    prot = project.newProtocol(ProtCloudPowerSpectra, downsample=4, boxSize=256,
                               numberOfThreads=3)
    prot.inputMicrographs.set(imported.outputMicrographs)
    if cluster is not None:
        prot._useQueue.set(True)
        prot.setQueueParams([cluster.name, {"QUEUE_FOR_JOBS": "Y"}])
    return prot


def jobs_run(cluster):
    """The job ids the cluster's agent ran, and whether any was a second attempt."""
    from scipion_cloudexec.cluster.session import ClusterSession
    with ClusterSession(cluster) as client:
        return [j["job_id"] for j in client.jobs()]


@pytest.fixture
def shaped(hosts):
    """``shaped(name)``: the desktop-to-cluster direction of *name*'s link at 40 Mbit/s."""
    import subprocess
    devs = []

    def shape(name):
        devs.append("cx-%s-h" % name)
        subprocess.run(["tc", "qdisc", "add", "dev", devs[-1], "root", "tbf", "rate", "40mbit",
                        "burst", "64kbit", "latency", "400ms"], check=True)
    yield shape
    for dev in devs:
        subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], check=False)


def sent_mb(text):
    return sum(float(m) for m in re.findall(r"([\d.]+) MB sent to", text))


def upload_under_way(c, clusters_env, new_project, tmp_path, shaped, label):
    """A local power-spectra run of imported micrographs, then the same protocol launched on
    *c* behind a 40 Mbit/s link, returned 4 s into its upload: (project, local, cloud
    protocol, its start time)."""
    clusters_env(c)
    project = new_project(label)
    imported = spectra_inputs(project, tmp_path)
    local = launch(project, spectra(project, imported))
    assert local.isFinished(), logs(local)
    shaped(c.name)
    prot = spectra(project, imported, c)
    state = str(tmp_path / ("remote-" + c.name) / "agent" / "agent.json")
    t0 = time.monotonic()
    project.launchProtocol(prot, wait=False)
    deadline = time.monotonic() + 60
    while not os.path.exists(state):
        assert time.monotonic() < deadline, "the agent never started"
        time.sleep(0.1)
    time.sleep(4)  # the upload is under way
    return project, local, prot, t0


@pytest.mark.matrix  # minutes: benchmarks/reliability.py runs it, not the default run
def test_link_cut_mid_upload_resumes_and_sends_the_rest_once(netns_cluster, hosts, shaped,
                                                             clusters_env, new_project,
                                                             tmp_path, reliability):
    """48 MB of inputs travel through a 40 Mbit/s link, which drops for 20 s (longer than
    the dead-link timer) in the middle: the staging fails, the cluster is reached again and
    the staging resumes where it stopped; the run is the local run's."""
    c = netns_cluster(hosts.names()[0], slots=4)
    project, local, prot, t0 = upload_under_way(c, clusters_env, new_project, tmp_path, shaped,
                                                "cutupload")
    hosts.link(c.name, False)
    time.sleep(20)
    hosts.link(c.name, True)
    back = time.monotonic()
    prot = wait_done(project, prot, timeout=300)
    done = time.monotonic()
    text = logs(prot)
    assert prot.isFinished(), text
    assert "lost contact with cluster" in text, text
    assert_same_run(local, prot)
    ids = jobs_run(c)
    assert not [j for j in ids if re.search(r"\.\d+$", j)], "a step ran again: %s" % ids
    reliability(fault="link cut for 20 s", when="mid-upload (48 MB at 40 Mbit/s)",
                seen="'lost contact with cluster ...; trying to reach it again', then the "
                "staging resumes: %.1f MB sent after the cut" % sent_mb(text),
                recover_s=round(done - back, 1), total_s=round(done - t0, 1), lost=0, twice=0)


@pytest.mark.matrix  # minutes: benchmarks/reliability.py runs it, not the default run
def test_desktop_killed_mid_upload_continues_without_resending(netns_cluster, hosts, shaped,
                                                               clusters_env, new_project,
                                                               tmp_path, reliability):
    """The desktop's protocol process is killed (SIGKILL) while 48 MB of inputs travel
    through a 40 Mbit/s link; Continue resumes the upload and finishes the run, which is
    the local run's."""
    import signal
    import psutil
    c = netns_cluster(hosts.names()[0], slots=4)
    project, local, prot, _t0 = upload_under_way(c, clusters_env, new_project, tmp_path, shaped,
                                                 "deskkill")
    tree = psutil.Process(prot.getPid())
    for proc in tree.children(recursive=True) + [tree]:
        proc.send_signal(signal.SIGKILL)
    assert not jobs_run(c), "killed before any job was sent"
    t0 = time.monotonic()
    prot = project.getProtocol(prot.getObjId())
    project.launchProtocol(prot, wait=True)  # Continue
    prot = project.getProtocol(prot.getObjId())
    done = time.monotonic()
    text = logs(prot)
    assert prot.isFinished(), text
    assert_same_run(local, prot)
    assert 0 < sent_mb(text) < 48, "Continue sent the whole input again: %.1f MB" % sent_mb(text)
    ids = jobs_run(c)
    assert not [j for j in ids if re.search(r"\.\d+$", j)], "a step ran again: %s" % ids
    reliability(fault="desktop protocol process SIGKILL", when="mid-upload (48 MB at 40 Mbit/s)",
                seen="the protocol shows failed; Continue resumes the upload (%.1f MB of 48 MB "
                "sent after it) and finishes" % sent_mb(text),
                recover_s="Continue to finished: %.1f s" % (done - t0), lost=0, twice=0)
