"""A real pyworkflow project whose protocol runs its runJob steps on the test bed's cluster."""
import json
import os

import pytest

from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps


def launch(project, prot, cluster=None, wait=True):
    if cluster is not None:  # what the form's "Use queue?" + queue dialog store
        prot._useQueue.set(True)
        prot.setQueueParams([cluster.name, {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(prot, wait=wait)
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
        fan="echo fan {i} > extra/fan_{i}.txt; echo $CLOUDEXEC_JOB_ID >> extra/fan_{i}.txt",
        fanCopies=3, numberOfThreads=3)
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot = launch(project, prot, c)
    assert prot.isFinished(), logs(prot)
    extra = prot._getExtraPath()
    assert open(os.path.join(extra, "chain.txt")).read().splitlines()[1] == "second"
    for i in range(3):
        lines = open(os.path.join(extra, "fan_%d.txt" % i)).read().splitlines()
        assert lines[0] == "fan %d" % i and lines[1], "ran remotely as a cloudexec job"
    text = logs(prot)
    assert "cloudexec: job" in text and "on cluster %s" % c.name in text
    records = provenance(prot)
    assert len(records) == 5 and {r["cluster"] for r in records} == {c.name}
    assert all(r["exit_code"] == 0 and r["launcher_id"] and r["ended"] >= r["started"]
               for r in records)
    assert any("extra/fan_0.txt" in k for r in records for k in r["outputs"])
    assert not prot.getJobIds(), "finished jobs leave the protocol's job list"


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
                               chain="echo $CUDA_VISIBLE_DEVICES > extra/gpus.txt")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot = launch(project, prot, c)
    assert prot.isFinished(), logs(prot)
    # the protocol's two GPU slots, as the cluster's GPUs 4 and 5
    assert open(os.path.join(prot._getExtraPath(), "gpus.txt")).read().strip() == "4,5"
