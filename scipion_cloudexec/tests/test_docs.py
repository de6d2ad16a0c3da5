"""The examples of docs/ARCHITECTURE.md ("Extending") run as they stand there: a launcher, a
scheduler and a scheduling policy, each added through its one registry or hook."""
import os
import re
import time

import pytest

import scipion_cloudexec
from scipion_cloudexec.config import parse_clusters
from scipion_cloudexec.remote.jobs import JobFiles, JobSpec, JobState, LauncherSpec, job_script
from scipion_cloudexec.remote.launchers import LAUNCHERS, launcher_for
from scipion_cloudexec.remote.schedulers import SCHEDULERS, scheduler_kind
from scipion_cloudexec.scheduling.dispatcher import MultiClusterDispatcher
from scipion_cloudexec.scheduling.policy import JobRequest

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(scipion_cloudexec.__file__))),
                   "docs", "ARCHITECTURE.md")


def example(n: int) -> dict:
    """Run the *n*-th Python block of the "Extending" section; return what it defined."""
    text = open(DOC).read()
    section = text[text.index("## Extending"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(blocks[n], "%s (example %d)" % (DOC, n + 1), "exec"), namespace)
    return namespace


@pytest.fixture
def registries():
    """What the examples register is taken out again."""
    launchers, schedulers = dict(LAUNCHERS), dict(SCHEDULERS)
    yield
    LAUNCHERS.clear()
    LAUNCHERS.update(launchers)
    SCHEDULERS.clear()
    SCHEDULERS.update(schedulers)


def test_a_launcher_is_one_class_in_one_registry(registries, tmp_path):
    example(0)
    spec = JobSpec(job_id="j-1", argv=["prog", "a b"], ranks=4,
                   launcher=LauncherSpec(kind="mpiexec"))
    spec.validate()  # the job spec knows it
    files = JobFiles(str(tmp_path), spec.job_id)
    assert launcher_for("mpiexec").command(spec, files) == ["mpiexec", "-n", "4", "prog", "a b"]
    assert scheduler_kind("mpiexec") == "process"
    clusters = parse_clusters("[cluster c]\nhost = h\nuser = u\nidentity_file = /k\n"
                              "workdir = /w\npython = python3\nlauncher = mpiexec\nslots = 4\n",
                              "clusters.conf")
    assert clusters["c"].launcher == "mpiexec"  # the clusters file knows it


def test_a_scheduler_runs_the_job_script_its_way(registries, tmp_path):
    example(1)
    assert scheduler_kind("nice") == "nice"
    scheduler = SCHEDULERS["nice"](str(tmp_path))
    spec = JobSpec(job_id="j-2", argv=["/bin/sh", "-c", "echo niceness $(nice)"],
                   launcher=LauncherSpec(kind="nice"))
    spec.validate()
    files = JobFiles(str(tmp_path / "jobs"), spec.job_id)
    os.makedirs(files.dir)
    with open(files.script, "w") as f:
        f.write(job_script(spec, files, launcher_for("nice").command(spec, files)))
    _lid, state = scheduler.submit(spec, files)
    assert state == JobState.RUNNING
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = scheduler.reap(spec.job_id)
        if status is not None:
            break
        time.sleep(0.05)
    assert status is not None and status.state == JobState.DONE, status
    with open(files.stdout) as f:
        assert f.read().strip() == "niceness 19"


def test_a_scheduling_policy_sends_gpu_jobs_to_gpu_clusters():
    policy = example(2)["GpuJobsToGpuClusters"]()
    d = MultiClusterDispatcher([("cpu", 8, ()), ("gpu", 2, (0, 1))], policy=policy)
    where = [d.run(JobRequest(gpus=(0,)), lambda n, a: n, lambda e: False) for _ in range(5)]
    assert where == ["gpu"] * 5
    assert d.run(JobRequest(), lambda n, a: n, lambda e: False) == "cpu", "the bigger one"
