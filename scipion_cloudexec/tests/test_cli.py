"""The command line as a person uses it: exit codes, streams, messages."""
import subprocess
import sys

import pytest

PY = sys.executable


@pytest.fixture
def conf(make_cluster, tmp_path):
    def write(launcher="mpirun", **extra):
        c = make_cluster(launcher)
        keys = dict(host=c.host, port=c.port, user=c.user, identity_file=c.identity_file,
                    known_hosts=c.known_hosts, workdir=c.workdir, python=c.python,
                    launcher=launcher, slots=4, mpirun="mpirun --oversubscribe --bind-to none",
                    srun="srun --mpi=pmix", heartbeat=0.5)
        keys.update(extra)
        path = tmp_path / ("%s.conf" % launcher)
        path.write_text("[cluster c]\n" + "".join("%s = %s\n" % kv for kv in keys.items()))
        return str(path)
    return write


def cli(*args, timeout=180):
    return subprocess.run([PY, "-m", "scipion_cloudexec.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("launcher", ["mpirun", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_check_reports_what_it_found(conf, launcher):
    r = cli("--config", conf(launcher), "check", "c")
    assert r.returncode == 0, r.stdout + r.stderr
    for part in ("host key SHA256:", "agent      ok", "OpenMPI    ok    mpirun (Open MPI)",
                 "mpi4py     ok", "2 ranks through %s: rank 0/2" % launcher, "c: ready"):
        assert part in r.stdout
    assert "free" in r.stdout and ("SLURM      ok    slurm" in r.stdout or launcher != "slurm")


def test_check_fails_when_mpirun_is_missing(conf):
    r = cli("--config", conf("mpirun", mpirun="/opt/none/mpirun"), "check", "c")
    assert r.returncode == 1
    assert "OpenMPI    FAIL" in r.stdout and "NOT ready" in r.stdout


def test_run_streams_output_and_exits_with_the_jobs_code(conf):
    r = cli("--config", conf(), "run", "c", "--np", "2", "--", "/bin/sh", "-c",
            'echo "out $OMPI_COMM_WORLD_RANK"; echo "err $OMPI_COMM_WORLD_RANK" >&2; exit 5')
    assert r.returncode == 5
    assert sorted(r.stdout.splitlines()) == ["out 0", "out 1"]
    assert "err 0" in r.stderr and "err 1" in r.stderr and "exit code 5" in r.stderr


def test_run_passes_gpus_and_threads(conf):
    r = cli("--config", conf("local"), "run", "c", "--gpus", "0,1", "--threads", "3", "-q", "--",
            "/bin/sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS"')
    assert r.returncode == 0 and r.stdout == "0,1 3\n" and r.stderr == ""


def test_unreachable_cluster_and_bad_config_exit_codes(conf, tmp_path):
    r = cli("--config", conf("local", port=1), "check", "c")
    assert r.returncode == 255 and "cannot reach 127.0.0.1:1" in r.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("[cluster c]\nhost = x\n")
    r = cli("--config", str(bad), "check", "c")
    assert r.returncode == 2 and "lacks required keys" in r.stderr
    r = cli("--config", conf("local"), "check", "other")
    assert r.returncode == 2 and "no cluster 'other'" in r.stderr


def test_jobs_lists_and_cancel_stops(conf):
    path = conf("local")
    assert cli("--config", path, "run", "c", "--job-id", "listed", "--", "true").returncode == 0
    r = cli("--config", path, "jobs", "c")
    assert r.returncode == 0 and "listed" in r.stdout and "done" in r.stdout
    r = cli("--config", path, "cancel", "c", "listed")
    assert r.returncode == 0 and "was done" in r.stdout


def test_status_shows_each_cluster_and_an_unreachable_one(make_cluster, tmp_path):
    from scipion_cloudexec.tests.conftest import clusters_file_text
    up = make_cluster("local")
    down = make_cluster("local", port=1)
    conf = tmp_path / "two.conf"
    conf.write_text(clusters_file_text(up, down))
    assert cli("--config", str(conf), "run", up.name, "--", "true").returncode == 0
    r = cli("--config", str(conf), "status")
    assert r.returncode == 1, "one cluster is unreachable"
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert " yes " in lines[up.name] and "0/4" in lines[up.name]
    assert lines[up.name].split()[5] == "1", "one job done"
    assert " NO " in lines[down.name] and "cannot reach 127.0.0.1:1" in lines[down.name]


def test_status_shows_bytes_staged_for_running_protocols(make_cluster, tmp_path):
    from scipion_cloudexec.cluster.session import ClusterSession
    from scipion_cloudexec.cli import cluster_status
    from scipion_cloudexec.cluster.stager import Stager
    c = make_cluster("local")
    (tmp_path / "p" / "Runs").mkdir(parents=True)
    (tmp_path / "p" / "Runs" / "mic.mrc").write_bytes(b"x" * 5000)
    with ClusterSession(c, client_name="scipion:myproj-abc123:7") as client:
        Stager(client.ssh, c, hash_cache=str(tmp_path / "h.sqlite")).stage_in(
            str(tmp_path / "p"), ["Runs"], "myproj-abc123")
        fut = client.submit(["sleep", "30"])
        status = cluster_status(c)
        client.cancel(fut.job_id)
    assert status["reachable"] and status["running"] == 1 and status["used"] == 1
    assert status["staged"] == {"scipion:myproj-abc123:7": 5000}
