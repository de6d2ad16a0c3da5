"""translate(): a runJob call on the desktop becomes the cluster's JobSpec (pure, no I/O)."""
import sys

from pyworkflow.constants import RUN_JOB_GPU_PARAM_SEARCH

from scipion_cloudexec.executors.translate import PathMapper, RunJobCall, shown, translate
from scipion_cloudexec.remote.jobs import JobSpec

PROJECT = "/home/ana/ScipionUserData/projects/p1"
MIRROR = "/scratch/cx/projects/p1-abc"


def mapper(**kw):
    return PathMapper(PROJECT, MIRROR, python="python3", local_python=sys.executable, **kw)


def test_a_relion_call_becomes_one_spec_with_paths_and_resources_of_the_cluster():
    call = RunJobCall("relion_refine_mpi",
                      "--i %s/Runs/000002_Import/particles.star --o Runs/000010_Class2D/extra/"
                      " --gpu %s" % (PROJECT, RUN_JOB_GPU_PARAM_SEARCH),
                      ranks=3, threads=2, gpus=(0, 1), cwd=PROJECT)
    spec = translate(call, project_root=PROJECT, mapper=mapper(), cluster_gpus=[4, 5, 6])
    assert isinstance(spec, JobSpec)
    assert spec.argv[:2] == ["/bin/sh", "-c"]
    assert shown(spec) == ("relion_refine_mpi --i %s/Runs/000002_Import/particles.star "
                           "--o Runs/000010_Class2D/extra/ --gpu 0 1" % MIRROR)
    # the job sees GPUs 4 and 5 only (CUDA_VISIBLE_DEVICES), as devices 0 and 1: "--gpu 4 5"
    # asked for devices it could not see
    assert (spec.ranks, spec.threads, spec.gpus, spec.cwd) == (3, 2, [4, 5], MIRROR)
    assert spec.job_id == "" and spec.label == ""  # the session's and the runner's to fill


def test_a_program_setting_cuda_visible_devices_itself_sets_the_jobs_gpus():
    call = RunJobCall("CUDA_VISIBLE_DEVICES=%s ctffind" % RUN_JOB_GPU_PARAM_SEARCH, "--gpu %s"
                      % RUN_JOB_GPU_PARAM_SEARCH, gpus=(1,), cwd=PROJECT)
    spec = translate(call, project_root=PROJECT, mapper=mapper(), cluster_gpus=[4, 5, 6])
    assert shown(spec) == 'CUDA_VISIBLE_DEVICES="$CUDA_VISIBLE_DEVICES" ctffind --gpu 0'
    assert spec.gpus == [5]
    two = translate(RunJobCall("prog", "--gpu %s" % RUN_JOB_GPU_PARAM_SEARCH, gpus=(0, 1)),
                    project_root=PROJECT, mapper=mapper(), cluster_gpus=[4])
    assert two.gpus == [4] and shown(two) == "prog --gpu 0", "two slots on one GPU: it, once"


def test_only_the_environment_the_plugin_added_travels_and_paths_inside_it_are_mapped():
    local = {"PATH": "/usr/bin:/bin", "HOME": "/home/ana", "LANG": "C"}
    env = dict(local, PATH="%s/bin:/usr/bin:/bin" % PROJECT, RELION_QSUB_EXTRA1="x",
               HOME="/elsewhere")
    spec = translate(RunJobCall("true", "", env=env), project_root=PROJECT, mapper=mapper(),
                     local_env=local)
    assert spec.env == {"RELION_QSUB_EXTRA1": "x"}
    assert spec.env_prepend == {"PATH": "%s/bin" % MIRROR}


def test_a_list_of_params_is_quoted_as_pyworkflow_does_and_the_desktop_python_is_renamed():
    spec = translate(RunJobCall(sys.executable, ["-c", "print(1)"]), project_root=PROJECT,
                     mapper=mapper())
    assert shown(spec) == 'python3 "-c" "print(1)"'
    assert (spec.ranks, spec.threads, spec.gpus) == (1, 1, [])


def test_shown_quotes_an_argv_that_is_not_a_shell_line():
    assert shown(JobSpec(job_id="j", argv=["echo", "a b"])) == "echo 'a b'"
