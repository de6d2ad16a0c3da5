"""Jobs in flight bounded by the cluster, not the desktop (issue 13): a step waiting on its
cluster job lends its desktop thread, so more jobs run at once than the form's threads; the
queue parameter CLOUD_JOBS caps them, and by default the clusters' slots do. The outputs are
those of a local run."""
import threading
import time

from scipion_cloudexec.executors.slots import DesktopSlots
from scipion_cloudexec.tests.harness import assert_same_run
from scipion_cloudexec.tests.test_executor import launch, logs, provenance
from scipion_cloudexec.tests.test_trustworthy import run_locally, shell

STEP = "sleep 2; echo {i} > extra/f_{i}.txt"


def most_at_once(records):
    """The most jobs running at once, from the agent's start and end times of each job."""
    events = sorted([(r["started"], 1) for r in records] + [(r["ended"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def cloud_and_local(project, cluster, **queue):
    params = dict(numberOfThreads=3, fanCopies=12, fan=STEP)  # 2 desktop threads
    local = run_locally(project, **params)  # its threads do not matter: only the cloud's
    cloud = launch(project, shell(project, "cloud", **params), cluster, **queue)
    assert cloud.isFinished(), logs(cloud)
    return local, cloud


def test_cloud_jobs_lets_more_jobs_run_than_the_desktop_threads(make_cluster, clusters_env,
                                                                new_project):
    c = make_cluster("local", slots=8)
    clusters_env(c)
    project = new_project("jobs6")
    local, cloud = cloud_and_local(project, c, CLOUD_JOBS="6")
    records = provenance(cloud)
    assert len(records) == 12
    most = most_at_once(records)
    assert 2 < most <= 6, "jobs at once: %d (2 desktop threads, CLOUD_JOBS 6)" % most
    assert "jobs on the cluster(s) at once: 6" in logs(cloud)
    assert_same_run(local, cloud)


def test_by_default_the_clusters_free_slots_bound_the_jobs(make_cluster, clusters_env,
                                                           new_project):
    c = make_cluster("local", slots=4)
    clusters_env(c)
    project = new_project("jobsdefault")
    local, cloud = cloud_and_local(project, c)
    most = most_at_once(provenance(cloud))
    assert 2 < most <= 4, "jobs at once: %d (2 desktop threads, 4 slots)" % most
    assert "as many as the slots take (4)" in logs(cloud)
    assert_same_run(local, cloud)


def test_two_protocols_on_one_cluster_share_its_slots(make_cluster, clusters_env,
                                                      new_project):
    """Two protocols run at once on one cluster of 2 slots: each may send 2 jobs, but no
    more than 2 run there in all (the agent holds the others, in order); both leave what a
    local run leaves. Before, each counted the slots alone: 4 ran at once."""
    from scipion_cloudexec.tests.test_executor import wait_done
    c = make_cluster("local", slots=2)
    clusters_env(c)
    project = new_project("twoprots")
    params = dict(numberOfThreads=3, fanCopies=4, fan="sleep 0.7; echo {i} > extra/f_{i}.txt")
    local = run_locally(project, **params)
    clouds = [launch(project, shell(project, "cloud %s" % n, **params), c, wait=False)
              for n in "ab"]
    clouds = [wait_done(project, p) for p in clouds]
    for p in clouds:
        assert p.isFinished(), logs(p)
    records = provenance(clouds[0]) + provenance(clouds[1])
    assert len(records) == 8
    assert most_at_once(records) == 2, "jobs at once on the 2-slot cluster: %d" % \
        most_at_once(records)
    assert "behind other protocols' jobs (waiting for slots: 2 of 2 in use" in \
        logs(clouds[0]) + logs(clouds[1])
    for p in clouds:
        assert_same_run(local, p)


def test_a_step_coming_back_from_its_cluster_goes_before_new_steps():
    wake = threading.Event()
    desk = DesktopSlots(1, wake)
    assert desk.take_free() == 1 and desk.take_free() == 0
    desk.lend()  # the step waits on its job: its slot may start another step
    assert wake.is_set() and desk.take_free() == 1
    back = threading.Thread(target=desk.take_back)
    back.start()  # its job ended: it waits for a slot...
    time.sleep(0.2)
    assert back.is_alive()
    desk.give()  # ...the other step ends
    back.join(5)
    assert not back.is_alive()
    assert desk.take_free() == 0, "the slot went to the returning step"
    desk.give()
    assert desk.take_free() == 1 and desk.used == 1 and desk.lent == 0


class _Count:
    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


class _FakeProtocol:
    lastStatus = None

    def __init__(self, folder):
        self.folder = folder

    def getProject(self):
        return None

    def getWorkingDir(self):
        return self.folder

    def getObjId(self):
        return 1

    def getRunName(self):
        return "fake"

    def iterInputAttributes(self):
        return iter(())

    def appendJobId(self, ref):
        pass

    def removeJobId(self, ref):
        pass

    def _store(self, *args):
        pass


def test_local_code_stays_bounded_by_the_desktop_threads_while_jobs_go_beyond(
        cluster, tmp_path, monkeypatch):
    """Each step runs local code, a job, local code again: the local parts never exceed the
    desktop's 2 threads, the jobs reach the clusters' 4 slots (CLOUD_JOBS 0) and every step's
    code after its job runs (the thread came back)."""
    from dataclasses import replace

    from pyworkflow.protocol.protocol import FunctionStep

    from scipion_cloudexec.executors.cloud import CloudStepExecutor
    monkeypatch.chdir(tmp_path)
    local, remote, after = _Count(), _Count(), []

    class FakeRunner:
        bytes_in_place = 0
        connected = True

        def run_job(self, *args, **kwargs):
            with remote:
                time.sleep(0.6)
            return {}

        def close(self):
            pass

    ex = CloudStepExecutor(None, 2, replace(cluster, slots=4))
    ex.protocol = _FakeProtocol(str(tmp_path / "Runs" / "000001_Fake"))
    ex._runner = lambda name: FakeRunner()

    def work(i):
        with local:
            time.sleep(0.1)
        ex.runJob(None, "prog", "")
        with local:
            time.sleep(0.1)
            after.append(i)

    steps = []
    for i in range(12):
        s = FunctionStep(work, "work", i)
        s.setObjId(i + 1)
        s.setIndex(i + 1)
        steps.append(s)
    ex.runSteps(steps, lambda s: None, lambda s: True, lambda: None, stepsCheckSecs=1)
    assert sorted(after) == list(range(12)) and all(s.isFinished() for s in steps)
    assert local.most <= 2, "local code of %d steps at once on 2 desktop threads" % local.most
    assert 2 < remote.most <= 4, "jobs at once: %d (4 slots)" % remote.most
    assert ex.most_in_flight == remote.most and ex._desktop.used == 0


def test_cloud_jobs_caps_jobs_below_the_slots(cluster, tmp_path, monkeypatch):
    from dataclasses import replace

    from pyworkflow.protocol.protocol import FunctionStep

    from scipion_cloudexec.executors.cloud import CloudStepExecutor
    monkeypatch.chdir(tmp_path)
    remote = _Count()

    class FakeRunner:
        bytes_in_place = 0
        connected = True

        def run_job(self, *args, **kwargs):
            with remote:
                time.sleep(0.4)
            return {}

    ex = CloudStepExecutor(None, 1, replace(cluster, slots=16), jobs=3)
    ex.protocol = _FakeProtocol(str(tmp_path / "Runs" / "000001_Fake"))
    ex._runner = lambda name: FakeRunner()
    ex._drop_runner = lambda name, only=None: None
    steps = []
    for i in range(9):
        s = FunctionStep(lambda: ex.runJob(None, "prog", ""), "work")
        s.setObjId(i + 1)
        s.setIndex(i + 1)
        steps.append(s)
    ex.runSteps(steps, lambda s: None, lambda s: True, lambda: None, stepsCheckSecs=1)
    assert all(s.isFinished() for s in steps)
    assert remote.most == 3, "CLOUD_JOBS 3, 1 desktop thread, 16 slots: %d" % remote.most


def test_a_step_starts_only_after_the_ends_of_its_prerequisites_are_recorded(
        cluster, tmp_path, monkeypatch):
    """A step whose prerequisites ended must wait until the protocol has recorded those ends:
    an output step started earlier writes the project database while the loop still records
    its siblings' ends ("Recursive use of cursors not allowed", seen in CI). The recording is
    slowed down here, and parallel steps end while it runs; 5 rounds."""
    from dataclasses import replace

    from pyworkflow.protocol.protocol import FunctionStep

    from scipion_cloudexec.executors.cloud import CloudStepExecutor
    monkeypatch.chdir(tmp_path)
    for _ in range(5):
        ex = CloudStepExecutor(None, 8, replace(cluster, slots=8))
        ex.protocol = _FakeProtocol(str(tmp_path / "Runs" / "000001_Fake"))
        ex._drop_runner = lambda name, only=None: None
        recorded, early = set(), []
        steps = []
        for i in range(8):
            s = FunctionStep(time.sleep, "work", 0.02 * (i % 4))
            s.setObjId(i + 1)
            s.setIndex(i + 1)
            steps.append(s)
        out = FunctionStep(lambda: None, "createOutputStep")
        out.setObjId(9)
        out.setIndex(9)
        out.addPrerequisites(*range(1, 9))
        steps.append(out)

        def started(step):
            if step is out:
                early.extend(sorted(set(range(1, 9)) - recorded))

        def finished(step):
            time.sleep(0.03)  # a database write
            recorded.add(step.getObjId())
            return True

        ex.runSteps(steps, started, finished, lambda: None, stepsCheckSecs=1)
        assert out.isFinished()
        assert not early, "the output step started before the ends of steps %s were " \
            "recorded" % early


def test_the_queue_parameter_reaches_the_executor_or_refuses(make_cluster, clusters_env):
    import pytest

    from scipion_cloudexec.executors.seam import make_executor

    class Stock:
        numberOfProcs, gpuList, hostConfig = 3, None, None

    c = make_cluster("local", slots=8)
    clusters_env(c)
    ex = make_executor(None, Stock(), c.name, {"QUEUE_FOR_JOBS": "Y", "CLOUD_JOBS": "6"})
    assert ex.jobs == 6 and ex.numberOfProcs == 3 and "jobs=6" in str(ex)
    assert make_executor(None, Stock(), c.name, {"CLOUD_JOBS": ""}).jobs == 0
    for bad in ("six", "-1"):
        refusing = make_executor(None, Stock(), c.name, {"CLOUD_JOBS": bad})
        with pytest.raises(RuntimeError, match="CLOUD_JOBS"):
            refusing.runJob(None, "prog", "")


def test_a_job_starts_on_the_freed_slot_while_the_last_one_is_still_gathered(
        make_cluster, new_project, monkeypatch):
    """A step's cluster slot is given back when its job has ended, not after its gather:
    on a 1-slot cluster, while step A's gather is held (the first gather waits, here, for
    the next one), step B's job runs and ends on the slot A's job left. Real cluster, real
    project and protocol folder, the executor in this process; the outputs come back."""
    import os
    from dataclasses import replace

    from pyworkflow.protocol.protocol import FunctionStep

    from scipion_cloudexec.executors.cloud import CloudStepExecutor
    from scipion_cloudexec.executors.runner import ClusterRunner
    from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps

    c = replace(make_cluster("local"), slots=1)
    project = new_project("heldgather")
    prot = project.newProtocol(ProtCloudShellSteps, objLabel="held gather")
    project.saveProtocol(prot)
    prot.makePathsAndClean()
    gathers, other_gathered, held = [], threading.Event(), {}
    real_gather = ClusterRunner.stage_out

    def first_gather_waits_for_the_next(self, say, since=None):
        gathers.append(threading.current_thread().name)
        if len(gathers) == 1:  # step A's job ended: hold its gather until B's job ended too
            held["next_job_ran"] = other_gathered.wait(20)
        else:
            other_gathered.set()
        return real_gather(self, say, since=since)
    monkeypatch.setattr(ClusterRunner, "stage_out", first_gather_waits_for_the_next)

    ex = CloudStepExecutor(None, 2, c)  # 2 desktop threads: both steps start at once
    ex.protocol = prot

    def work(name):
        ex.runJob(None, "/bin/sh", "-c 'echo %s > extra/%s.txt'" % (name, name),
                  cwd=prot._getPath())

    steps = []
    for i, name in enumerate(("a", "b")):
        s = FunctionStep(work, "work", name)
        s.setObjId(i + 1)
        s.setIndex(i + 1)
        steps.append(s)
    ex.runSteps(steps, lambda s: None, lambda s: True, lambda: None, stepsCheckSecs=1)
    assert all(s.isFinished() for s in steps)
    assert held.get("next_job_ran"), \
        "no job ran on the 1-slot cluster while the ended job's gather waited"
    records = provenance(prot)
    assert len(records) == 2 and most_at_once(records) == 1, "1 slot: one job at a time"
    for name in ("a", "b"):
        with open(os.path.join(prot._getPath("extra"), "%s.txt" % name)) as f:
            assert f.read() == name + "\n"
    assert ex.most_in_flight == 1
    assert [(s["busy"], s["done"]) for s in ex.dispatcher.status()] == [(0, 2)]
