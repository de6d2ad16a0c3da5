"""Faults a new user met on the way (issue 12): what provenance, check, the protocol's log and
``jobs`` show, each seen through a real project, agent and sshd."""
import os
import subprocess
import sys
import time

import pytest

from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps
from scipion_cloudexec.tests.test_cli import conf  # noqa: F401  (fixture)
from scipion_cloudexec.tests.test_executor import launch, logs, provenance

PY = sys.executable


def cli(*args, timeout=180):
    return subprocess.run([PY, "-m", "scipion_cloudexec.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("how", ["pool", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_provenance_shows_when_each_step_started_and_its_files_with_v(make_cluster,
                                                                      clusters_env,
                                                                      new_project, how):
    # short jobs never seen running by the agent (a pool's, or SLURM's between two polls)
    # were recorded with start time 0: "1970-01-01 00:00:00, 1796004542.8 s"
    c = make_cluster("mpirun" if how == "pool" else "slurm")
    clusters_env(c)
    project = new_project("starts")
    prot = project.newProtocol(ProtCloudShellSteps, numberOfThreads=3, fanCopies=4,
                               fan="echo {i} > extra/f_{i}.txt")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    t0 = time.time()
    prot = launch(project, prot, c, **({"CLOUD_POOL": "2"} if how == "pool" else {}))
    assert prot.isFinished(), logs(prot)
    records = provenance(prot)
    assert len(records) == 4
    for r in records:
        assert t0 - 1 < r["started"] <= r["ended"] < time.time() + 1, r
    # as the README documents it: -v after the run folder
    shown = cli("provenance", prot.getWorkingDir(), "-v")
    assert shown.returncode == 0, shown.stderr
    assert "1970-01-01" not in shown.stdout  # not "1970": launcher ids reach it
    assert shown.stdout.count("      output  ") == 4 and "extra/f_3.txt" in shown.stdout
    assert cli("provenance", prot.getWorkingDir()).stdout.count("      output  ") == 0


def test_check_local_says_it_ran_two_plain_processes_not_an_mpi_job(conf):
    # was: "MPI job ok 2 ranks through local: rank 0/1 on h; rank 0/1 on h"
    r = cli("--config", conf("local"), "check", "c")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MPI job    " not in r.stdout and "rank 0/1" not in r.stdout
    line = [ln for ln in r.stdout.splitlines() if "processes" in ln][0]
    assert line.startswith("  processes  ok    2 single processes through launcher local "
                           "(it starts plain processes, not an MPI job): process ")
    assert line.count("process ") == 2 and "c: ready" in r.stdout


def test_the_protocol_log_holds_cloudexec_lines_not_paramikos(make_cluster, clusters_env,
                                                              new_project):
    c = make_cluster("local")
    clusters_env(c)
    project = new_project("quietlog")
    prot = launch(project, project.newProtocol(ProtCloudShellSteps, chain="echo hi"), c)
    assert prot.isFinished(), logs(prot)
    text = logs(prot)
    assert "cloudexec: job" in text and "hi" in text
    for paramiko_line in ("Connected (version", "Authentication (publickey) successful",
                          "Opened sftp connection", "paramiko.transport"):
        assert paramiko_line not in text


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpirun", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_after_stop_the_log_provenance_and_jobs_say_what_happened(make_cluster, clusters_env,
                                                                  new_project, tmp_path,
                                                                  launcher):
    c = make_cluster(launcher)
    conf_path = clusters_env(c)
    project = new_project("stopped")
    started = tmp_path / "started"
    prot = project.newProtocol(ProtCloudShellSteps, chain="echo before\n"
                               "touch %s; sleep 300" % started)
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot._useQueue.set(True)
    prot.setQueueParams([c.name, {"QUEUE_FOR_JOBS": "Y"}])
    project.launchProtocol(prot, wait=False)
    _wait_for(started.exists)
    prot = project.getProtocol(prot.getObjId())
    project._updateProtocol(prot)  # its run.db: the jobs it runs
    (job_ref,) = prot.getJobIds()
    job = job_ref.split(":", 1)[1]
    project.stopProtocol(prot)  # Scipion's Stop button (cwd: the project, as in the GUI)
    text = logs(project.getProtocol(prot.getObjId()))
    assert "cloudexec: cancel sent to job %s on %s (Scipion's Stop)" % (job, c.name) in text

    # the journal: cancelled, with no exit code of a program that was killed
    def cancelled():
        rows = cli("--config", conf_path, "jobs", c.name).stdout.splitlines()
        return any(job in ln and "cancelled" in ln for ln in rows)
    _wait_for(cancelled, 30)
    row = [ln for ln in cli("--config", conf_path, "jobs", c.name).stdout.splitlines()
           if job in ln][0]
    assert row.split()[1:3] == ["cancelled", "-"], row  # was "cancelled 0"

    shown = cli("provenance", prot.getWorkingDir())
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any("done on %s" % c.name in ln for ln in lines), "the first step, done"
    stopped = [ln for ln in lines if job in ln]
    assert len(stopped) == 1 and "cancelled on %s" % c.name in stopped[0], shown.stdout
    assert "exit -" in stopped[0] and "1970-01-01" not in stopped[0]


def test_transfer_progress_in_a_log_is_plain_lines_at_most_every_interval():
    from scipion_cloudexec.progress import TransferProgress
    lines = []
    progress = TransferProgress("cloudexec: staging to hpc", say=lines.append, every=0.2)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:  # a 1 s upload of 4 files, called very often
        done = int((time.monotonic() - t0) * 10e6)
        progress(min(done, 10_000_000), 10_000_000, done * 4 // 10_000_000, 4)
    progress.end()
    assert 2 <= len(lines) <= 6, lines  # about one per 0.2 s, the first after 0.2 s
    for line in lines:
        assert line.startswith("cloudexec: staging to hpc: ") and "MB / 10.0MB" in line
        assert ", file " in line and " of 4, " in line and "B/s" in line and "left" in line
        assert "\r" not in line and "\x1b" not in line


def test_stage_to_a_pipe_writes_no_terminal_control_characters(conf, tmp_path):
    (tmp_path / "p" / "Runs").mkdir(parents=True)
    (tmp_path / "p" / "Runs" / "mic.mrc").write_bytes(os.urandom(3_000_000))
    r = cli("--config", conf("local"), "stage", "c", "Runs", "--project-root",
            str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert "1 file(s), 3.0 MB: 3.0 MB sent" in r.stdout
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
