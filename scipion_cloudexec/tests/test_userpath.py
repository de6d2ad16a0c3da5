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
    assert "1970" not in shown.stdout
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
