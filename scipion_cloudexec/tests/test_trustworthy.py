"""A protocol run on a cluster leaves exactly what a local run leaves: parallel steps writing
into one folder, Restart, Continue after a failure or a Stop, several clusters. Each test runs
the same protocol locally and through the cloud executor and compares the run folders (every
path, type and byte, but logs/) with tests/harness.py."""
import os
import sys
import time

import pytest

from pyworkflow.protocol.constants import MODE_RESTART

from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps
from scipion_cloudexec.tests.harness import assert_same_run, run_tree
from scipion_cloudexec.tests.test_executor import (launch, logs, provenance, twin_threads,
                                                   wait_done, wait_for)


# every scenario once in every run, twice more with -m repeat: races show up over
# repetitions, not once (the repetitions would take the default run past 20 minutes)
AGAIN = (pytest.mark.slow, pytest.mark.repeat)
REPEAT = pytest.mark.parametrize("repeat", [0, pytest.param(1, marks=AGAIN),
                                            pytest.param(2, marks=AGAIN)])


def shell(project, label, **params):
    return project.newProtocol(ProtCloudShellSteps, objLabel=label, **params)


def run_locally(project, **params):
    """The shell protocol run locally, as the twin of a cloud run (see twin_threads)."""
    threads = twin_threads(params.get("numberOfThreads", 2), params.get("fan", ""),
                           params.get("fanCopies", 1))
    local = launch(project, shell(project, "local", **dict(params, numberOfThreads=threads)))
    assert local.isFinished(), logs(local)
    return local


def local_and_cloud(project, cluster, **params):
    """The same shell protocol run locally, then on *cluster* (a name or a ClusterConfig)."""
    local = run_locally(project, **params)
    cloud = shell(project, "cloud", **params)
    cloud._useQueue.set(True)
    cloud.setQueueParams([getattr(cluster, "name", cluster), {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(cloud, wait=True)
    return local, project.getProtocol(cloud.getObjId())


# Each step makes its file empty first, writes it later, then reads it back: a stage-in of a
# sibling step that pushed the desktop's (empty) copy over it made the read come back empty.
SHARED_FOLDER_STEP = ("touch extra/shared/a_{i}.txt; sleep 0.3; echo {i} > extra/shared/a_{i}.txt;"
                      " sleep 0.2; cat extra/shared/a_{i}.txt > extra/shared/b_{i}.txt;"
                      " echo scratch > extra/shared/t_{i}.tmp; mkdir -p extra/dirs/d_{i};"
                      " rm extra/shared/t_{i}.tmp")


@pytest.mark.parametrize("steps,repeat", [(100, 0), pytest.param(100, 1, marks=AGAIN),
                                          pytest.param(100, 2, marks=AGAIN),
                                          pytest.param(400, 0, marks=AGAIN)])
def test_parallel_steps_writing_into_one_folder_match_a_local_run(make_cluster, clusters_env,
                                                                  new_project, steps, repeat):
    c = make_cluster("local", slots=6)
    clusters_env(c)
    project = new_project("parallel")
    local, cloud = local_and_cloud(project, c, numberOfThreads=7, fanCopies=steps,
                                   chain="mkdir -p extra/shared", fan=SHARED_FOLDER_STEP)
    assert cloud.isFinished(), logs(cloud)
    tree = run_tree(cloud.getWorkingDir())
    assert sum(1 for p in tree if p.startswith("extra/shared/b_")) == steps
    assert_same_run(local, cloud)
    assert "staged" not in logs(cloud), "outputs of earlier steps never travel back up"


@REPEAT
def test_parallel_steps_running_scripts_they_just_wrote_match_a_local_run(
        make_cluster, clusters_env, new_project, repeat):
    """Each step writes its script on the desktop, then runs it on the cluster: steps in
    flight share stage-ins (issue 13), and none may run before its own script is there."""
    c = make_cluster("local", slots=6)
    clusters_env(c)
    project = new_project("scripts")
    local, cloud = local_and_cloud(project, c, numberOfThreads=5, fanCopies=60, scripts=True,
                                   chain="mkdir -p extra/out",
                                   fan="cp extra/scripts/step_f{i}.sh extra/out/copy_{i}.txt")
    assert cloud.isFinished(), logs(cloud)
    assert len(os.listdir(os.path.join(cloud._getExtraPath(), "out"))) == 60
    assert_same_run(local, cloud)


MAP_WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "map_writer.py")


@REPEAT
def test_parallel_steps_writing_through_mappings_match_a_local_run(make_cluster, clusters_env,
                                                                   new_project, repeat):
    """Each step's program writes its file through a mapping after closing it (no event of
    its own until the program exits), while sibling steps' gathers list the folder: the
    cluster's listing from inotify (remote/tree_watch.py) must still bring every final
    byte back."""
    c = make_cluster("local", slots=6)
    clusters_env(c)
    project = new_project("mapped")
    local, cloud = local_and_cloud(
        project, c, numberOfThreads=7, fanCopies=40, chain="mkdir -p extra/maps",
        fan="%s %s extra/maps/m_{i}.bin 'step {i} through a mapping' --sleep 0.4"
            % (sys.executable, MAP_WRITER))
    assert cloud.isFinished(), logs(cloud)
    with open(os.path.join(cloud._getExtraPath(), "maps", "m_7.bin"), "rb") as f:
        assert f.read(25) == b"step 7 through a mapping\0"
    assert_same_run(local, cloud)


@REPEAT
def test_restart_with_fewer_iterations_brings_nothing_of_the_previous_run(
        make_cluster, clusters_env, new_project, repeat):
    c = make_cluster("local")
    clusters_env(c)
    project = new_project("restart")
    iterations = "mkdir -p extra; for i in $(seq 1 %d); do echo it $i > extra/iter_$i.txt; done"
    cloud = shell(project, "cloud", chain=iterations % 5)
    cloud = launch(project, cloud, c)
    assert cloud.isFinished(), logs(cloud)
    assert os.path.exists(os.path.join(cloud._getExtraPath(), "iter_5.txt"))
    cloud.chain.set(iterations % 2)  # the user asks for fewer iterations and restarts
    cloud.runMode.set(MODE_RESTART)
    cloud = launch(project, cloud, c)
    assert cloud.isFinished(), logs(cloud)
    local = launch(project, shell(project, "local", chain=iterations % 2))
    assert sorted(os.listdir(cloud._getExtraPath())) == ["iter_1.txt", "iter_2.txt"]
    assert_same_run(local, cloud)


@REPEAT
def test_continue_after_a_fixed_failure_runs_the_step_again(make_cluster, clusters_env,
                                                            new_project, tmp_path, repeat):
    c = make_cluster("local")
    clusters_env(c)
    project = new_project("fixed")
    flag = tmp_path / "input-ready"
    chain = "mkdir -p extra; echo one > extra/one.txt\n" \
            "test -e %s || { echo 'input not ready' >&2; exit 7; }; echo two > extra/two.txt" % flag
    cloud = launch(project, shell(project, "cloud", chain=chain), c)
    assert cloud.isFailed()
    error = cloud.getErrorMessage()
    assert "exit code 7" in error and "input not ready" in error and "test -e" in error
    flag.write_text("fixed")  # the user fixes the cause, then presses Continue
    cloud = launch(project, cloud, c)
    assert cloud.isFinished(), logs(cloud)
    assert "runs again as job" in logs(cloud)
    steps = [r["step"] for r in provenance(cloud)]
    assert steps.count(max(steps)) == 2, "the failed step ran again, as a new job"
    local = launch(project, shell(project, "local", chain=chain))
    assert_same_run(local, cloud)


@pytest.mark.slow
def test_stop_then_continue_runs_the_cancelled_step_again(make_cluster, clusters_env,
                                                          new_project, tmp_path):
    c = make_cluster("local")
    clusters_env(c)
    project = new_project("stopcont")
    started, go = tmp_path / "started", tmp_path / "go"
    chain = "mkdir -p extra; echo one > extra/one.txt\n" \
            "touch %s; test -e %s || sleep 300; echo two > extra/two.txt" % (started, go)
    cloud = shell(project, "cloud", chain=chain)
    cloud._useQueue.set(True)
    cloud.setQueueParams([c.name, {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(cloud, wait=False)
    wait_for(started)
    project.stopProtocol(project.getProtocol(cloud.getObjId()))
    cloud = wait_done(project, cloud)
    assert not cloud.isFinished()
    go.write_text("go")
    cloud = launch(project, cloud, c)  # Continue
    assert cloud.isFinished(), logs(cloud)
    local = launch(project, shell(project, "local", chain=chain))
    assert_same_run(local, cloud)


@REPEAT
def test_two_clusters_see_each_others_folders_and_deletions(make_cluster, clusters_env,
                                                            new_project, repeat):
    a, b = make_cluster("local", slots=1), make_cluster("local", slots=1)
    clusters_env(a, b)
    project = new_project("twofolders")
    local, cloud = local_and_cloud(
        project, "all", numberOfThreads=3, fanCopies=8,
        chain="mkdir -p extra/parts extra/empty; echo x > extra/gone.txt\nrm extra/gone.txt",
        fan="sleep 0.3; echo {i} > extra/parts/p_{i}.txt; mkdir -p extra/made_{i}")
    assert cloud.isFinished(), logs(cloud)
    assert {r["cluster"] for r in provenance(cloud)} == {a.name, b.name}, "both clusters ran"
    assert_same_run(local, cloud)


@REPEAT
def test_a_sibling_lost_job_retries_alone(make_cluster, clusters_env, new_project, tmp_path,
                                          repeat):
    """A job killed under the agent (its node lost) runs again as a new attempt; its sibling on
    the same cluster goes on and is not run twice."""
    import json
    import signal
    c = make_cluster("local", slots=2)
    clusters_env(c)
    project = new_project("lostone")
    pids = tmp_path / "pids"
    fan = ("mkdir -p extra; if [ {i} = 0 ] && [ ! -e %s ]; then echo $$ > %s; sleep 300; fi; "
           "sleep 2; echo {i} >> extra/f_{i}.txt" % (pids, pids))
    cloud = shell(project, "cloud", numberOfThreads=3, fanCopies=2, fan=fan)
    cloud._useQueue.set(True)
    cloud.setQueueParams([c.name, {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(cloud, wait=False)
    wait_for(pids)
    time.sleep(0.3)
    import psutil
    program = psutil.Process(int(pids.read_text()))
    script = [p for p in program.parents() if p.cmdline()[-1:] and
              p.cmdline()[-1].endswith("job.sh")][0]
    tree = script.children(recursive=True)
    script.send_signal(signal.SIGKILL)  # the job script first: it writes no exit code,
    for proc in tree:  # as when the job's node is lost
        proc.send_signal(signal.SIGKILL)
    cloud = wait_done(project, cloud)
    text = logs(cloud)
    assert cloud.isFinished(), text
    records = provenance(cloud)
    assert sorted(r["state"] for r in records).count("done") == 2, json.dumps(records)
    assert "it is tried again" in text and "the step runs again as job" in text
    assert "failed this job" not in text, "the cluster was not dropped for one lost job"
    local = launch(project, shell(project, "local", numberOfThreads=3, fanCopies=2,
                                  fan=fan.replace(str(pids), str(tmp_path / "nothing"))
                                  .replace("sleep 300", "true")))
    assert_same_run(local, cloud)


def test_on_a_host_that_cannot_see_the_project_runs_match_local_runs(private_cluster,
                                                                     clusters_env, new_project,
                                                                     tmp_path):
    """Everything a job reads and writes has to travel: the host sees the desktop's project
    folder (the whole pytest temporary folder) empty."""
    from scipion_cloudexec.protocols import ProtCloudPowerSpectra
    from scipion_cloudexec.tests.test_executor import import_micrographs
    clusters_env(private_cluster)
    project = new_project("private")
    local, cloud = local_and_cloud(project, private_cluster, numberOfThreads=4, fanCopies=20,
                                   chain="mkdir -p extra/shared", fan=SHARED_FOLDER_STEP)
    assert cloud.isFinished(), logs(cloud)
    assert_same_run(local, cloud)
    # inputs are links to originals outside the project, which the host cannot see either
    imported = import_micrographs(project, tmp_path / "microscope", copy=False)
    runs = []
    for cluster in (None, private_cluster):
        prot = project.newProtocol(ProtCloudPowerSpectra, downsample=2, boxSize=128,
                                   numberOfThreads=3)
        prot.inputMicrographs.set(imported.outputMicrographs)
        runs.append(launch(project, prot, cluster))
    assert runs[1].isFinished(), logs(runs[1])
    assert {r["host"] for r in provenance(runs[1])} == {private_cluster.host}
    assert_same_run(*runs)


@REPEAT
def test_streaming_protocol_with_steps_inserted_as_files_arrive(make_cluster, clusters_env,
                                                                new_project, tmp_path, repeat):
    import threading
    from scipion_cloudexec.protocols import ProtCloudShellStream
    c = make_cluster("local", slots=3)
    clusters_env(c)
    project = new_project("stream")
    runs = []
    for cluster in (None, c):
        watch = tmp_path / ("watch-%d" % len(runs))
        watch.mkdir()
        prot = project.newProtocol(ProtCloudShellStream, watch=str(watch), numberOfThreads=4,
                                   command="sleep 0.2; tr a-z A-Z < extra/in/{name} > "
                                           "extra/out/{name}; wc -c < extra/in/{name} "
                                           ">> extra/out/{name}")
        if cluster is not None:
            prot._useQueue.set(True)
            prot.setQueueParams([cluster.name, {"QUEUE_FOR_JOBS": "Y"}])

        def feed(folder=watch):
            for i in range(8):  # files arrive while the protocol runs
                (folder / ("movie_%d.txt" % i)).write_text("frame %d\n" % i * (i + 1))
                time.sleep(0.4)
            (folder / "END").write_text("")
        feeder = threading.Thread(target=feed)
        project.launchProtocol(prot, wait=False)
        feeder.start()
        feeder.join()
        runs.append(wait_done(project, prot, timeout=240))
    local, cloud = runs
    assert local.isFinished(), logs(local)
    assert cloud.isFinished(), logs(cloud)
    assert len(provenance(cloud)) == 8
    merged = open(os.path.join(cloud._getExtraPath(), "merged.txt")).read()
    assert merged.count("FRAME") == sum(range(1, 9))
    assert_same_run(local, cloud)


@REPEAT
def test_two_protocols_staging_the_same_inputs_at_once(make_cluster, clusters_env, new_project,
                                                       tmp_path, repeat):
    from scipion_cloudexec.protocols import ProtCloudPowerSpectra
    from scipion_cloudexec.tests.test_executor import import_micrographs
    c = make_cluster("local", slots=4)
    clusters_env(c)
    project = new_project("sameinputs")
    imported = import_micrographs(project, tmp_path / "mics", n=6, copy=True)

    def spectra(label):
        prot = project.newProtocol(ProtCloudPowerSpectra, objLabel=label, downsample=2,
                                   boxSize=128, numberOfThreads=3)
        prot.inputMicrographs.set(imported.outputMicrographs)
        return prot
    local = launch(project, spectra("local"))
    clouds = []
    for label in ("first", "second"):  # both stage the same micrographs at the same time
        prot = spectra(label)
        prot._useQueue.set(True)
        prot.setQueueParams([c.name, {"QUEUE_FOR_JOBS": "Y"}])
        project.launchProtocol(prot, wait=False)
        clouds.append(prot)
    for prot in clouds:
        prot = wait_done(project, prot)
        assert prot.isFinished(), logs(prot)
        assert_same_run(local, prot)


def test_mirror_names_tell_desktops_apart(monkeypatch, tmp_path, reliability):
    import socket
    from scipion_cloudexec.executors.runner import ProtocolRun
    run = tmp_path / "proj" / "Runs" / "000002_X"
    one = ProtocolRun(str(tmp_path / "proj"), "proj", str(run), 2).mirror
    monkeypatch.setattr(socket, "gethostname", lambda: "another-workstation")
    other = ProtocolRun(str(tmp_path / "proj"), "proj", str(run), 2).mirror
    assert one != other and one.startswith("proj-") and other.startswith("proj-")
    reliability(fault="two desktops with the same user, project path and name on one "
                "cluster workdir", when="any time", seen="nothing: each desktop gets its own "
                "mirror (named after user@host:path); they share the agent and the content "
                "cache safely", recover_s="none needed (checked on the mirror names)",
                lost=0, twice=0)


def _twin_steps(prot, ex, commands):
    """One FunctionStep per shell command, run by *ex* in *prot*'s folder, in parallel."""
    from pyworkflow.protocol.protocol import FunctionStep

    def work(command):
        ex.runJob(None, "/bin/sh", "-c '%s'" % command, cwd=prot._getPath())
    steps = []
    for i, command in enumerate(commands):
        s = FunctionStep(work, "work", command, needsGPU=False)
        s.setObjId(i + 1)
        s.setIndex(i + 1)
        steps.append(s)
    return steps


def test_a_job_that_ended_in_a_mirror_emptied_since_runs_again(make_cluster, new_project,
                                                                monkeypatch, reliability):
    """Seen in the soak: a step's job ended on s1, contact was lost before its gather, s1
    was abandoned meanwhile (another step failed over from it) and the next contact emptied
    its mirror; the job was then attached to again, its result reused, and the gather found
    nothing: the step finished without its output. A job placed before a reset of its
    cluster's mirror must run again. The fault (the link lost in the gather, the abandon by
    a sibling's failover) is injected at the gather; cluster, agent, project and protocol
    are real. The run folder is compared with the same steps run by pyworkflow's own
    (serial) executor."""
    from pyworkflow.protocol.executor import StepExecutor

    from scipion_cloudexec.cluster.errors import LinkLost
    from scipion_cloudexec.executors.cloud import CloudStepExecutor
    from scipion_cloudexec.executors.runner import ClusterRunner

    commands = ["mkdir -p extra; echo a > extra/a.txt",
                "mkdir -p extra; sleep 1; echo b > extra/b.txt"]
    c = make_cluster("local", slots=2)
    project = new_project("voided")
    prots = []
    for label in ("local", "cloud"):
        prot = shell(project, label)
        project.saveProtocol(prot)
        prot.makePathsAndClean()
        prots.append(prot)
    local, cloud = prots
    # serial: the threaded one joins every thread of this process, pytest's too
    stock = StepExecutor(project.getHostConfig("localhost"))
    stock.setProtocol(local)
    steps = _twin_steps(local, stock, commands)
    stock.runSteps(steps, lambda s: None, lambda s: True, lambda: None, stepsCheckSecs=1)
    assert all(s.isFinished() for s in steps)

    faults = []
    real_gather = ClusterRunner.stage_out

    def first_gather_of_a_lost(self, say, since=None):
        if not faults:
            faults.append(time.monotonic())
            self.run.sync.abandon(self.cluster.name)  # a sibling failed over from it
            raise LinkLost("injected: the link went down as the gather began")
        return real_gather(self, say, since=since)
    monkeypatch.setattr(ClusterRunner, "stage_out", first_gather_of_a_lost)
    ex = CloudStepExecutor(None, 2, c)
    ex.protocol = cloud
    steps = _twin_steps(cloud, ex, commands)
    ex.runSteps(steps, lambda s: None, lambda s: True, lambda: None, stepsCheckSecs=1)
    assert faults and all(s.isFinished() for s in steps), [s.getErrorMessage() for s in steps]
    assert run_tree(cloud._getPath()) == run_tree(local._getPath())
    recover = time.monotonic() - faults[0]
    done = [r["job_id"] for r in provenance(cloud) if r["state"] == "done"]
    assert len(done) == 2 and any(j.endswith(".2") for j in done), done
    reliability(fault="link lost as a gather began, the cluster left meanwhile (a sibling "
                "failed over; both injected)", when="after the job completed",
                seen="the next contact empties the cluster's copy of the run folder, then "
                "'job ... went to %s before its copy of the run folder was emptied (the run "
                "had left it): the step runs again as job ....2'" % c.name,
                recover_s=round(recover, 1), lost="0 (before: every step of the run finished "
                "without its output)", twice="up to %d, by design: run again as new attempts "
                "(what their jobs wrote went with the mirror)"
                % sum("." in j.rsplit("-", 1)[1] for j in done))


def test_a_job_voided_by_a_reset_stays_void_after_continue(tmp_path):
    """The reset is kept with the placements: after Continue (a new process reading the
    file), a job placed before the reset is still void there, even once placed again,
    and not on other clusters nor after its new attempt."""
    from scipion_cloudexec.executors.protocol_run import ProtocolRun
    run_dir = tmp_path / "proj" / "Runs" / "000010_P"
    run_dir.mkdir(parents=True)
    run = ProtocolRun(str(tmp_path / "proj"), "proj", str(run_dir), 10)
    a, b = run.job_id(1), run.job_id(2)
    run.place(a, "s1")
    run.place(b, "s2")
    assert not run.voided(a, "s1")
    run.mirror_reset("s1")
    assert run.voided(a, "s1") and not run.voided(b, "s2")
    run.place(a, "s1")  # a resumed step attaches where it went: still void
    renewed = run.next_attempt(a)
    run.place(renewed, "s1")
    again = ProtocolRun(str(tmp_path / "proj"), "proj", str(run_dir), 10)  # Continue
    assert again.voided(a, "s1") and not again.voided(renewed, "s1")
    assert not again.voided(b, "s2") and not again.voided(a, "s2")
    assert again.latest(a) == (renewed, "s1") and again.placed_on("s1") == [a, renewed]
