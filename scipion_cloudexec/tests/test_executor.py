"""A real pyworkflow project whose protocol runs its runJob steps on the test bed's cluster."""
import json
import os

import pytest

from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps
from scipion_cloudexec.tests.harness import assert_same_run


def launch(project, prot, cluster=None, wait=True, **queue_params):
    if cluster is not None:  # what the form's "Use queue?" + queue dialog store
        prot._useQueue.set(True)
        prot.setQueueParams([cluster.name, dict(QUEUE_FOR_JOBS="Y", **queue_params)])
    project.launchProtocol(prot, wait=wait)
    return project.getProtocol(prot.getObjId())


def twin_threads(threads, fan="", fanCopies=1):
    """Threads for the local twin of a shell protocol: one per independent step. Scipion's
    ThreadStepExecutor sleeps 3 s whenever a loop turn starts no step, so 100 steps on 6
    threads took 17 such turns (56 s) where one does. A shell protocol's run folder does not
    depend on its thread count (the cloud run keeps the test's own)."""
    fans = len([ln for ln in (fan or "").splitlines() if ln.strip()])
    return max(threads, fans * max(1, fanCopies) + 1)


def local_twin(project, prot, fails=False):
    """The same protocol (a copy of its form) run locally, for assert_same_run; *fails*: the
    local run must fail as well (the cloud run of a failing protocol leaves what it leaves)."""
    twin = project.copyProtocol(prot)
    twin.setObjLabel("local twin of %s" % prot.getObjLabel())
    twin._useQueue.set(False)
    if isinstance(twin, ProtCloudShellSteps):  # other protocols may pass threads to programs
        twin.numberOfThreads.set(twin_threads(twin.numberOfThreads.get(), twin.fan.get(),
                                              twin.fanCopies.get()))
    twin = launch(project, twin)
    assert (twin.isFailed() if fails else twin.isFinished()), logs(twin)
    return twin


def wait_done(project, prot, timeout=180):
    """Wait for a protocol launched with wait=False, then refresh it as wait=True would."""
    import psutil
    try:
        psutil.Process(prot.getPid()).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    project._updateProtocol(prot)
    return project.getProtocol(prot.getObjId())


def logs(prot):
    out = []
    for name in ("run.stdout", "run.stderr"):
        path = os.path.join(prot.getWorkingDir(), "logs", name)
        if os.path.exists(path):
            out.append(open(path).read())
    return "\n".join(out)


def provenance(prot):
    path = os.path.join(prot.getWorkingDir(), "logs", "cloudexec.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_shell_protocol_runs_on_the_cluster_and_outputs_come_back(make_cluster, clusters_env,
                                                                  new_project):
    c = make_cluster("mpirun")
    clusters_env(c)
    project = new_project("shell")
    prot = project.newProtocol(
        ProtCloudShellSteps, objLabel="on the cluster",
        chain="hostname > extra/chain.txt\necho second >> extra/chain.txt",
        fan="echo fan {i} > extra/fan_{i}.txt; echo ran as job $CLOUDEXEC_JOB_ID",
        fanCopies=3, numberOfThreads=3)
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot = launch(project, prot, c)
    assert prot.isFinished(), logs(prot)
    extra = prot._getExtraPath()
    assert open(os.path.join(extra, "chain.txt")).read().splitlines()[1] == "second"
    for i in range(3):
        assert open(os.path.join(extra, "fan_%d.txt" % i)).read() == "fan %d\n" % i
    text = logs(prot)
    for r in provenance(prot)[2:]:  # the job's output streamed into the step's log
        assert "ran as job %s" % r["job_id"] in text, "ran remotely as a cloudexec job"
    assert "cloudexec: job" in text and "on cluster %s" % c.name in text
    records = provenance(prot)
    assert len(records) == 5 and {r["cluster"] for r in records} == {c.name}
    assert all(r["exit_code"] == 0 and r["launcher_id"] and r["ended"] >= r["started"]
               for r in records)
    assert any("extra/fan_0.txt" in k for r in records for k in r["outputs"])
    assert not prot.getJobIds(), "finished jobs leave the protocol's job list"
    import subprocess
    import sys
    shown = subprocess.run([sys.executable, "-m", "scipion_cloudexec.cli", "-v", "provenance",
                            prot.getWorkingDir()], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("done on %s (mpirun" % c.name) == 5
    assert "command: /bin/sh -c 'hostname > extra/chain.txt'" in shown.stdout
    assert "extra/fan_0.txt" in shown.stdout


def test_failing_step_fails_the_protocol_with_the_remote_error(make_cluster, clusters_env,
                                                               new_project):
    c = make_cluster("local")
    clusters_env(c)
    project = new_project("fail")
    prot = project.newProtocol(ProtCloudShellSteps, chain="true\necho 'CTF estimation blew up' >&2;"
                               " exit 42\necho never", numberOfThreads=2)
    prot = launch(project, prot, c)
    assert prot.isFailed()
    assert "exit code 42" in prot.getErrorMessage()
    assert "CTF estimation blew up" in prot.getErrorMessage()
    assert "CTF estimation blew up" in logs(prot)
    assert len(provenance(prot)) == 2, "the step after the failure never ran"
    assert_same_run(local_twin(project, prot, fails=True), prot)


def test_a_sibling_ending_after_a_failure_leaves_the_protocol_failed(make_cluster, clusters_env,
                                                                   new_project):
    c = make_cluster("local")
    clusters_env(c)
    project = new_project("sibling")
    prot = project.newProtocol(ProtCloudShellSteps, numberOfThreads=3, fanCopies=2,
                               fan="if [ {i} = 0 ]; then exit 3; fi; sleep 2; "
                                   "echo {i} > extra/f_{i}.txt")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot = launch(project, prot, c)
    assert prot.isFailed(), "the slower sibling's success must not hide the failure"
    assert "exit code 3" in prot.getErrorMessage()
    assert os.listdir(prot._getExtraPath()) == ["f_1.txt"], "the sibling's output is kept"
    assert_same_run(local_twin(project, prot, fails=True), prot)


def test_protocols_not_sent_to_a_cloud_queue_run_as_before(make_cluster, clusters_env,
                                                           new_project):
    clusters_env(make_cluster("local"))
    project = new_project("local")
    prot = project.newProtocol(ProtCloudShellSteps, chain="echo here > extra/local.txt")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot = launch(project, prot)  # no queue: pyworkflow's own executor
    assert prot.isFinished(), logs(prot)
    assert not os.path.exists(os.path.join(prot.getWorkingDir(), "logs", "cloudexec.jsonl"))
    text = logs(prot)
    assert "cloudexec: job" not in text and "CloudStepExecutor" not in text
    assert "ThreadStepExecutor" in text, "pyworkflow's own executor, untouched"


def test_gpus_reach_the_job_as_cuda_visible_devices(make_cluster, clusters_env, new_project):
    c = make_cluster("local", gpus=(4, 5))
    clusters_env(c)
    project = new_project("gpu")
    prot = project.newProtocol(ProtCloudShellSteps, gpuSteps=True, gpuList="0 1",
                               chain="echo $CUDA_VISIBLE_DEVICES %(GPU)s > extra/gpus.txt")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot = launch(project, prot, c)
    assert prot.isFinished(), logs(prot)
    # the protocol's two GPU slots, as the cluster's GPUs 4 and 5, which the job sees as its
    # devices 0 and 1 (the command line's %(GPU)s, as pyworkflow's queue path writes it)
    assert open(os.path.join(prot._getExtraPath(), "gpus.txt")).read().strip() == "4,5 0 1"


def test_two_protocols_asking_for_the_same_gpu_run_on_different_ones(make_cluster,
                                                                      clusters_env, new_project,
                                                                      tmp_path):
    """Both protocols' GPU slot 0 is the cluster's GPU 4; they run at once: one runs on GPU 4,
    the other on GPU 5, and its provenance record and log say so."""
    c = make_cluster("local", gpus=(4, 5))
    clusters_env(c)
    project = new_project("gpus2")
    go = tmp_path / "go"
    go.mkdir()
    prots = []
    for tag in ("a", "b"):  # each waits until both have started: they overlap
        prot = project.newProtocol(
            ProtCloudShellSteps, objLabel=tag, gpuSteps=True, gpuList="0",
            chain="echo $CUDA_VISIBLE_DEVICES > extra/gpu.txt; touch %s/%s; n=0; while "
                  "[ ! -e %s/a ] || [ ! -e %s/b ]; do sleep 0.05; n=$((n+1)); [ $n -gt 400 ] "
                  "&& break; done; true" % (go, tag, go, go))
        os.makedirs(prot._getExtraPath(), exist_ok=True)
        prots.append(launch(project, prot, c, wait=False))
    prots = [wait_done(project, p) for p in prots]
    seen = {}
    for prot in prots:
        assert prot.isFinished(), logs(prot)
        seen[prot.getObjId()] = open(os.path.join(prot._getExtraPath(), "gpu.txt")).read()
    assert sorted(seen.values()) == ["4\n", "5\n"], seen
    moved = [p for p in prots if seen[p.getObjId()] == "5\n"][0]
    assert provenance(moved)[0]["gpus"] == [5]
    assert "ran on GPUs 5 of %s (4 were in use by another protocol)" % c.name in logs(moved)


# ---- the plugin's own protocols: identical results locally and on a cluster ----------------

def import_micrographs(project, folder, n=4, copy=False):
    from pwem.protocols import ProtImportMicrographs
    from scipion_cloudexec.tests.datagen import write_micrographs
    write_micrographs(str(folder), n, shape=(256, 256), seed=11)
    prot = project.newProtocol(ProtImportMicrographs, filesPath=str(folder),
                               filesPattern="mic_*.mrc", samplingRate=1.25, voltage=300.0,
                               sphericalAberration=2.7, amplitudeContrast=0.1,
                               magnification=50000, copyFiles=copy)
    project.launchProtocol(prot, wait=True)
    assert prot.isFinished()
    return prot


def files_by_name(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def test_power_spectra_identical_locally_and_on_the_cluster(make_cluster, clusters_env,
                                                            new_project, tmp_path):
    from scipion_cloudexec.protocols import ProtCloudPowerSpectra
    c = make_cluster("mpirun")
    clusters_env(c)
    project = new_project("same")
    # not copied: the set points at symbolic links to originals outside the project
    imported = import_micrographs(project, tmp_path / "microscope", copy=False)
    runs = []
    for cluster in (None, c):
        prot = project.newProtocol(ProtCloudPowerSpectra, downsample=2, boxSize=128,
                                   numberOfThreads=3)
        prot.inputMicrographs.set(imported.outputMicrographs)
        runs.append(launch(project, prot, cluster))
    local, cloud = runs
    assert local.isFinished() and cloud.isFinished(), logs(cloud)
    assert os.path.exists(os.path.join(cloud.getWorkingDir(), "logs", "cloudexec.jsonl"))
    lo, cl = local.outputMicrographs, cloud.outputMicrographs
    assert lo.getSize() == cl.getSize() == 4
    assert lo.getSamplingRate() == cl.getSamplingRate() == pytest.approx(2.5)
    assert [os.path.basename(m.getFileName()) for m in lo] == \
        [os.path.basename(m.getFileName()) for m in cl]
    local_files = files_by_name(local._getExtraPath())
    assert len(local_files) == 8
    assert files_by_name(cloud._getExtraPath()) == local_files, "byte-identical outputs"
    assert_same_run(local, cloud)


def test_mpi_average_on_the_cluster_matches_local(make_cluster, clusters_env, new_project,
                                                  tmp_path):
    from scipion_cloudexec.protocols import ProtCloudAverageSpectrum
    c = make_cluster("mpirun")
    clusters_env(c)
    project = new_project("mpi")
    imported = import_micrographs(project, tmp_path / "mics", copy=True)
    runs = []
    for cluster, ranks in ((None, 1), (c, 2)):
        prot = project.newProtocol(ProtCloudAverageSpectrum, boxSize=128, numberOfMpi=ranks)
        prot.inputMicrographs.set(imported.outputMicrographs)
        runs.append(launch(project, prot, cluster))
    local, cloud = runs
    assert cloud.isFinished(), logs(cloud)
    assert "2 rank(s)" in logs(cloud)
    assert files_by_name(cloud._getExtraPath())["average_psd.mrc"] == \
        files_by_name(local._getExtraPath())["average_psd.mrc"]
    assert cloud.outputAverageSpectrum.getSamplingRate() == pytest.approx(1.25)


# ---- resume and stop -------------------------------------------------------------------

def wait_for(path, timeout=60):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        time.sleep(0.1)
    raise AssertionError("%s never appeared" % path)


@pytest.mark.slow
@pytest.mark.parametrize("n_clusters", [1, 2])
def test_killed_protocol_continues_without_running_any_job_twice(make_cluster, clusters_env,
                                                                 new_project, tmp_path,
                                                                 n_clusters, reliability):
    import signal
    clusters = [make_cluster("local", slots=1) for _ in range(n_clusters)]
    c = clusters[0]
    clusters_env(*clusters)
    project = new_project("resume")
    gate, started = tmp_path / "gate", tmp_path / "started"
    chain = "\n".join([
        "echo one >> extra/runs1.txt",
        "echo two >> extra/runs2.txt; touch %s; while [ ! -e %s ]; do sleep 0.1; done" % (
            started, gate),
        "echo three >> extra/runs3.txt"])
    prot = project.newProtocol(ProtCloudShellSteps, chain=chain)
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot._useQueue.set(True)
    prot.setQueueParams([",".join(x.name for x in clusters), {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(prot, wait=False)
    wait_for(started)
    import psutil
    tree = psutil.Process(prot.getPid())
    for proc in tree.children(recursive=True) + [tree]:  # the desktop's Scipion dies mid-step
        proc.send_signal(signal.SIGKILL)
    gate.write_text("go")
    prot = project.getProtocol(prot.getObjId())
    project.launchProtocol(prot, wait=True)  # continue (resume mode)
    prot = project.getProtocol(prot.getObjId())
    assert prot.isFinished(), logs(prot)
    extra = prot._getExtraPath()
    for i, word in enumerate(("one", "two", "three"), 1):
        assert open(os.path.join(extra, "runs%d.txt" % i)).read() == word + "\n"
    assert "had already run" in logs(prot) or "reused" in logs(prot)
    from scipion_cloudexec.cluster.session import ClusterSession
    jobs = []
    for cluster in clusters:  # on resume, the running job is found where it was sent
        with ClusterSession(cluster) as client:
            jobs += client.jobs()
    assert len(jobs) == 3, [j["job_id"] for j in jobs]
    assert_same_run(local_twin(project, prot), prot)
    reliability(fault="desktop protocol process SIGKILL (%d cluster%s)"
                % (n_clusters, "s" if n_clusters > 1 else ""), when="mid-job",
                seen="the protocol shows failed; Continue attaches to the running job ('had "
                "already run ... its result is reused') and finishes", recover_s="-",
                lost=0, twice=0)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpirun", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_stopping_a_protocol_cancels_its_remote_jobs(make_cluster, clusters_env, new_project,
                                                     tmp_path, launcher):
    c = make_cluster(launcher)
    clusters_env(c)
    project = new_project("stop")
    started = tmp_path / "pids"
    prot = project.newProtocol(ProtCloudShellSteps, numberOfMpi=2,
                               chain="echo $$ >> %s; sleep 300" % started)
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot._useQueue.set(True)
    prot.setQueueParams([c.name, {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(prot, wait=False)
    import time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (started.exists() and
                                               len(started.read_text().split()) == 2):
        time.sleep(0.1)
    prot = project.getProtocol(prot.getObjId())
    project.stopProtocol(prot)  # Scipion's Stop button
    pids = [int(p) for p in started.read_text().split()]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(os.path.exists("/proc/%d" % p) for p in pids):
        time.sleep(0.1)
    assert not any(os.path.exists("/proc/%d" % p) for p in pids), "remote ranks still running"
    if launcher == "slurm":
        import subprocess
        conf = os.path.join(os.environ.get("CLOUDEXEC_TESTBED") or "/tmp/cloudexec-testbed",
                            "slurm", "slurm.conf")
        queue = subprocess.run(["squeue", "-h", "-o", "%j %T"], capture_output=True, text=True,
                               env=dict(os.environ, SLURM_CONF=conf)).stdout
        assert "RUNNING" not in queue and "PENDING" not in queue, queue
    from scipion_cloudexec.cluster.session import ClusterSession
    with ClusterSession(c) as client:  # SLURM may still be ending it (COMPLETING): seconds
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and client.jobs()[0]["state"] == "running":
            time.sleep(0.2)
        assert [j["state"] for j in client.jobs()] == ["cancelled"]


def test_many_small_steps_run_on_a_worker_pool(make_cluster, clusters_env, new_project):
    c = make_cluster("mpirun")
    clusters_env(c)
    project = new_project("pool")
    prot = project.newProtocol(ProtCloudShellSteps, numberOfThreads=4, fanCopies=12,
                               fan="echo {i} > extra/out_{i}.txt; "
                                   "echo step {i} on pool rank $CLOUDEXEC_POOL_RANK")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot = launch(project, prot, c, CLOUD_POOL="3")
    assert prot.isFinished(), logs(prot)
    import re
    ranks = dict(re.findall(r"^step (\d+) on pool rank (\S*)$", logs(prot), re.M))
    assert sorted(map(int, ranks)) == list(range(12)), logs(prot)
    assert set(ranks.values()) <= {"1", "2"}, "every step ran on a worker rank of the pool"
    assert {r["launcher"] for r in provenance(prot)} == {"pool"}
    assert "worker pool" in logs(prot)
    from scipion_cloudexec.cluster.session import ClusterSession
    with ClusterSession(c) as client:
        pools = [j for j in client.jobs() if j["label"].startswith("worker pool")]
    assert len(pools) == 1 and pools[0]["state"] in ("cancelled", "done"), "stopped at the end"
    assert_same_run(local_twin(project, prot), prot)


# ---- several clusters ----------------------------------------------------------------

def test_jobs_are_shared_between_clusters_by_capacity(make_cluster, clusters_env, new_project):
    small, big = make_cluster("local", slots=1), make_cluster("local", slots=3)
    clusters_env(small, big)
    project = new_project("split")
    prot = project.newProtocol(ProtCloudShellSteps, numberOfThreads=5, fanCopies=16,
                               fan="sleep 0.4; echo {i} > extra/out_{i}.txt")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    with open(os.environ["SCIPION_CLOUDEXEC_CONFIG"], "a") as f:  # a named group of them
        f.write("\n[group pair]\nclusters = %s, %s\n" % (small.name, big.name))
    prot._useQueue.set(True)
    prot.setQueueParams(["pair", {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(prot, wait=True)
    prot = project.getProtocol(prot.getObjId())
    assert prot.isFinished(), logs(prot)
    where = [r["cluster"] for r in provenance(prot)]
    assert len(where) == 16 and where.count(big.name) > where.count(small.name) > 0, where
    for i in range(16):
        assert open(os.path.join(prot._getExtraPath(), "out_%d.txt" % i)).read() == "%d\n" % i
    assert_same_run(local_twin(project, prot), prot)


@pytest.mark.slow
def test_losing_a_cluster_mid_protocol_moves_its_jobs(make_cluster, clusters_env, new_project,
                                                       tmp_path):
    import signal
    import time
    doomed, other = make_cluster("local", slots=2), make_cluster("local", slots=2)
    clusters_env(doomed, other)
    project = new_project("failover")
    prot = project.newProtocol(ProtCloudShellSteps, numberOfThreads=5, fanCopies=12,
                               fan="sleep 1; echo {i} >> extra/out_{i}.txt")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot._useQueue.set(True)
    prot.setQueueParams(["all", {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(prot, wait=False)
    state = os.path.join(doomed.workdir, "agent", "agent.json")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not os.path.exists(state):
        time.sleep(0.1)
    time.sleep(0.5)
    with open(state) as f:
        os.kill(json.load(f)["pid"], signal.SIGKILL)  # the cluster's agent dies mid-protocol
    prot = wait_done(project, prot)
    assert prot.isFinished(), logs(prot)
    for i in range(12):  # every output present, once
        assert open(os.path.join(prot._getExtraPath(), "out_%d.txt" % i)).read() == "%d\n" % i
    assert "lost contact with cluster" in logs(prot)  # then attached to again, or moved
    records = provenance(prot)
    assert len(records) == 12 and len({r["step"] for r in records}) == 12
    assert any(r["cluster"] == other.name for r in records)
    assert_same_run(local_twin(project, prot), prot)


def test_two_protocols_at_once_on_shared_clusters(make_cluster, clusters_env, new_project):
    a, b = make_cluster("local", slots=2), make_cluster("local", slots=2)
    clusters_env(a, b)
    project = new_project("two")
    prots = []
    for tag in ("left", "right"):
        prot = project.newProtocol(ProtCloudShellSteps, objLabel=tag, numberOfThreads=3,
                                   fanCopies=6, fan="sleep 0.2; echo %s {i} > extra/%s_{i}.txt"
                                   % (tag, tag))
        os.makedirs(prot._getExtraPath(), exist_ok=True)
        prot._useQueue.set(True)
        prot.setQueueParams(["all", {"QUEUE_FOR_JOBS": "Y"}])
        project.launchProtocol(prot, wait=False)
        prots.append(prot)
    prots = [wait_done(project, prot) for prot in prots]
    for prot, tag in ((prots[0], "left"), (prots[1], "right")):
        assert prot.isFinished(), logs(prot)
        names = sorted(os.listdir(prot._getExtraPath()))
        assert names == sorted("%s_%d.txt" % (tag, i) for i in range(6)), names
        records = provenance(prot)
        assert len(records) == 6
        assert all("-%d-" % prot.getObjId() in r["job_id"] for r in records), "its own jobs only"
        assert_same_run(local_twin(project, prot), prot)


def test_a_queue_naming_no_cluster_fails_the_step_with_the_fix(make_cluster, clusters_env,
                                                               new_project):
    clusters_env(make_cluster("local"))
    project = new_project("badqueue")
    prot = project.newProtocol(ProtCloudShellSteps, chain="true")
    prot._useQueue.set(True)
    prot.setQueueParams(["no-such-cluster", {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(prot, wait=True)
    prot = project.getProtocol(prot.getObjId())
    assert prot.isFailed()
    assert "queue 'no-such-cluster' of hosts.conf names no cluster" in prot.getErrorMessage()


def test_a_cloud_queue_choice_that_cannot_be_read_fails_never_runs_locally(make_cluster,
                                                                          clusters_env,
                                                                          new_project):
    """A protocol sent to a cloudexec queue whose queue choice cannot be read gets an
    executor that fails each step with the reason: it never quietly runs on the desktop
    (before, any error there meant "not ours": pyworkflow's own executor ran it locally)."""
    from pyworkflow.protocol.executor import ThreadStepExecutor
    from scipion_cloudexec.executors.seam import cloud_choice
    clusters_env(make_cluster("local"))
    project = new_project("unreadable")
    prot = project.newProtocol(ProtCloudShellSteps, chain="true")
    project._setHostConfig(prot)  # as the protocol process does before it runs
    prot._useQueue.set(True)
    prot._queueParams.set("{not json")  # e.g. a damaged project database
    with pytest.raises(ValueError, match="queue choice cannot be read"):
        cloud_choice(prot)
    prot.setStepsExecutor(ThreadStepExecutor(prot.getHostConfig(), 2))
    with pytest.raises(RuntimeError, match="queue choice cannot be read"):
        prot._stepsExecutor.runJob(None, "touch", "ran-on-the-desktop")
    assert type(prot._stepsExecutor).__name__ == "Refusing"
