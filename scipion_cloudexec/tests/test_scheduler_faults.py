"""Faults and bad input around the schedulers, against the real test bed (sshd, SLURM, OpenMPI).

SLURM faults are made for real: slurmctld is stalled with SIGSTOP (and always resumed), a job
is scancel'd behind the agent's back, and "SLURM forgot the job" is made by pointing the
journal of a stopped agent at SLURM ids that are unknown or belong to another job, which is
what a purge or a controller that lost its state leaves behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List

import pytest

from scipion_cloudexec.cluster.errors import JobCancelled, JobFailed, JobLost
from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.remote.jobs import JobFiles, JobSpec, JobState, LauncherSpec
from scipion_cloudexec.remote.slurm import SlurmScheduler
from scipion_cloudexec.tests.test_agent import wait_until

PY = sys.executable


def collect(out: Dict[str, bytearray]) -> Callable[[str, bytes], None]:
    return lambda stream, data: out.setdefault(stream, bytearray()).extend(data)


def alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def slurm(testbed, *argv: str) -> subprocess.CompletedProcess:
    """A SLURM command on the test bed's cluster, as an administrator would type it."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SLURM_CONF=testbed.slurm_conf))


@contextlib.contextmanager
def slurmctld_stalled(testbed) -> Iterator[None]:
    """slurmctld frozen (SIGSTOP): every squeue, sbatch, scancel hangs, then times out."""
    with open(os.path.join(testbed.slurm_dir, "slurmctld.pid")) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:  # the test bed is shared: slurmctld always comes back
        os.kill(pid, signal.SIGCONT)


def jobs_by_id(client: ClusterSession) -> Dict[str, dict]:
    return {r["job_id"]: r for r in client.jobs()}


def stop_agent(workdir: str) -> None:
    """Stop the workdir's agent by pid; its jobs keep running."""
    with open(os.path.join(workdir, "agent", "agent.json")) as f:
        pid = int(json.load(f)["pid"])
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), 20, "agent %d stopped" % pid)


# ---- (a) slurmctld stalls while jobs run -------------------------------------------------

@pytest.mark.slurm
# both lengths in -m matrix: the default run has the same fault in the 25 s stall test below
# (heartbeats, a submit during it) and the 30 s outage test (no job lost); these add jobs
# ending during the stall, and take 90 s and more, mostly SLURM's own clean-up after it
@pytest.mark.parametrize("stall", [pytest.param(20, marks=pytest.mark.matrix), pytest.param(
    60, marks=(pytest.mark.slow, pytest.mark.matrix))])
def test_slurmctld_stall_loses_no_job_and_heartbeats_keep_flowing(make_cluster, testbed,
                                                                  tmp_path, reliability, stall):
    """slurmctld frozen for *stall* seconds (-m matrix, for docs/RELIABILITY.md)."""
    c = make_cluster("slurm")
    runs = tmp_path / "late-runs"
    outs: List[Dict[str, bytearray]] = [{} for _ in range(4)]
    with ClusterSession(c) as client:
        # two end during the stall (only their rc files can tell), one after it
        futs = [client.submit(["/bin/sh", "-c", "echo up; sleep %d; echo out-%d" % (d, i)],
                              job_id="stall-%d" % i, on_output=collect(outs[i]))
                for i, d in enumerate((8, 14, 32))]
        # each job's srun step launched (it needs the controller) before the stall
        wait_until(lambda: all(o.get("stdout") for o in outs[:3]), 60, "3 SLURM jobs running")
        worst, pings = 0.0, 0
        t0 = time.monotonic()
        with slurmctld_stalled(testbed):
            while time.monotonic() - t0 < stall:
                worst = max(worst, client.ping(timeout=10))
                pings += 1
                if len(futs) == 3 and time.monotonic() - t0 > 5:  # a submit SLURM cannot take
                    futs.append(client.submit(["/bin/sh", "-c", "echo run >> %s; echo out-3"
                                               % runs], job_id="stall-3",
                                              on_output=collect(outs[3])))
                time.sleep(0.2)
        print("\nslurmctld stalled %d s: %d pings, worst round trip %.1f ms (client bound "
              "%.1f s)" % (stall, pings, worst * 1000, 3 * c.heartbeat))
        results = [f.result(180) for f in futs]
    with open(os.path.join(c.workdir, "agent", "agent.log")) as f:
        print("".join(line for line in f if "WARNING" in line))
    assert [r.state for r in results] == [JobState.DONE] * 4, [r.reason for r in results]
    assert [bytes(o.get("stdout", b"")).decode() for o in outs] == [
        "up\nout-%d\n" % i for i in range(3)] + ["out-3\n"]
    assert runs.read_text() == "run\n", "the submit made during the stall ran exactly once"
    assert worst < 3 * c.heartbeat
    reliability(fault="slurmctld stopped (SIGSTOP) %d s: every squeue/sbatch hangs" % stall,
                when="mid-job, and a submit during it", seen="nothing: heartbeats flow, the "
                "jobs end DONE, the submit made during the stall runs once after it",
                recover_s="none needed", worst_ping_ms=round(worst * 1000, 1), lost=0, twice=0)


def _slurm_state(testbed, lid: str) -> str:
    out = slurm(testbed, "squeue", "-h", "-t", "all", "-j", lid, "-o", "%T").stdout.strip()
    return out or "GONE"


@pytest.mark.slurm
def test_a_doubtful_sbatch_never_runs_a_job_twice_nor_touches_another_agents_job(
        make_cluster, testbed, tmp_path, monkeypatch):
    """The agent's SLURM scheduler driven directly against the real slurmctld.

    FAKE: the job that a timed-out ``sbatch`` makes when SLURM carries it out late is made by
    hand (the very ``sbatch -H`` the scheduler sends), at the worst moment: after the retry's
    lookup found nothing. Before held submission, that job ran beside the retry (the 60 s
    stall test above caught it end to end); before the lookup and the abandon matched the
    job's folder, another agent's job of the same name was taken for ours, or scancel'd."""
    make_cluster("slurm")  # skips without SLURM
    monkeypatch.setenv("SLURM_CONF", testbed.slurm_conf)
    runs = tmp_path / "runs"

    def job(root, job_id: str):
        files = JobFiles(str(root), job_id)
        os.makedirs(files.dir)
        with open(files.script, "w") as f:
            f.write("#!/bin/sh\necho %s >> %s\necho 0 > %s\n" % (root.name, runs, files.rc))
        return JobSpec(job_id=job_id, argv=["true"], launcher=LauncherSpec(kind="slurm")), files

    made: List[str] = []

    def by_hand(files: JobFiles, name: str) -> str:  # held: nothing runs until we say so
        r = slurm(testbed, "sbatch", "--parsable", "-H", "-J", name, "-o", files.stdout,
                  "-e", files.stderr, "-D", files.dir, files.script)
        assert r.returncode == 0, r.stderr
        made.append(r.stdout.strip().split(";")[0])
        return made[-1]

    spec, files = job(tmp_path / "ours", "doubt-1")
    _, theirs = job(tmp_path / "theirs", "doubt-1")  # another agent: same job id, other folder
    their_lid = by_hand(theirs, "cx-doubt-1")
    sched = SlurmScheduler()
    try:
        sched._uncertain.add(spec.job_id)  # FAKE: its first sbatch timed out
        lid, _ = sched.submit(spec, files)
        assert lid != their_lid, "another agent's job of the same name was taken for ours"
        late = by_hand(files, "cx-doubt-1")  # the timed-out sbatch, carried out now
        deadline = time.monotonic() + 120
        while True:
            st = sched.status({spec.job_id: (lid, files)}).get(spec.job_id)
            if st is not None and st.state.final:
                break
            assert time.monotonic() < deadline, "job %s did not end" % lid
            time.sleep(sched.next_poll())
        assert st.state == JobState.DONE, st
        wait_until(lambda: _slurm_state(testbed, late) in ("CANCELLED", "GONE"), 30,
                   "the late job of the timed-out sbatch cancelled")
        assert runs.read_text() == "ours\n", "ran exactly once, and only ours"

        # a submit given up while in doubt: what SLURM made of it goes, in its folder only
        spec2, files2 = job(tmp_path / "ours", "doubt-2")
        _, theirs2 = job(tmp_path / "theirs", "doubt-2")
        stray, their2 = by_hand(files2, "cx-doubt-2"), by_hand(theirs2, "cx-doubt-2")
        sched.abandon(spec2.job_id, files2)
        wait_until(lambda: (sched.status({}), _slurm_state(testbed, stray))[1]
                   in ("CANCELLED", "GONE"), 30, "the abandoned job's stray cancelled")
        assert _slurm_state(testbed, their2) == "PENDING"
        assert _slurm_state(testbed, their_lid) == "PENDING"
        assert runs.read_text() == "ours\n"
    finally:  # the test bed is shared: leave no held job behind (scancel -n takes one name)
        slurm(testbed, "scancel", *made)
        for lid in made:
            wait_until(lambda: _slurm_state(testbed, lid) != "PENDING", 30, "%s gone" % lid)


@contextlib.contextmanager
def slurmctld_down(testbed) -> Iterator[None]:
    """slurmctld stopped (SIGTERM, its state saved): squeue, sbatch, scancel fail at once
    ("Unable to contact slurm controller"); jobs go on under slurmd. Then restarted, as an
    administrator would, recovering its state."""
    pidfile = os.path.join(testbed.slurm_dir, "slurmctld.pid")
    with open(pidfile) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), 30, "slurmctld stopped")
    try:
        yield
    finally:  # the test bed is shared: slurmctld always comes back
        subprocess.run(["slurmctld", "-f", testbed.slurm_conf], check=True, timeout=60,
                       env=dict(os.environ, SLURM_CONF=testbed.slurm_conf))
        wait_until(lambda: slurm(testbed, "squeue", "-h").returncode == 0, 60,
                   "slurmctld answers again")


@pytest.mark.slurm
def test_slurmctld_down_30s_fails_every_query_yet_no_job_is_lost(make_cluster, testbed,
                                                                 tmp_path, reliability):
    """With slurmctld down, every squeue fails at once for 30 s: a failed query is not a
    job gone. The jobs, running or ending meanwhile, end DONE with their output, once."""
    c = make_cluster("slurm")
    runs = tmp_path / "runs"
    outs: List[Dict[str, bytearray]] = [{} for _ in range(3)]
    with ClusterSession(c) as client:
        futs = [client.submit(["/bin/sh", "-c", "echo %d >> %s; sleep %d; echo out-%d"
                               % (i, runs, d, i)], job_id="down-%d" % i,
                              on_output=collect(outs[i]))
                for i, d in enumerate((5, 15, 45))]
        # each job's srun step launched (it needs the controller) before it goes
        wait_until(lambda: runs.exists() and len(runs.read_text().split()) == 3, 60,
                   "3 SLURM jobs running")
        worst = 0.0
        t0 = time.monotonic()
        with slurmctld_down(testbed):
            while time.monotonic() - t0 < 30:
                worst = max(worst, client.ping(timeout=10))
                time.sleep(0.2)
            failing = slurm(testbed, "squeue", "-h")
        back = time.monotonic()
        results = [f.result(240) for f in futs]
        done = time.monotonic()
    assert failing.returncode != 0, "squeue really failed while slurmctld was down"
    assert [r.state for r in results] == [JobState.DONE] * 3, [r.reason for r in results]
    assert [o["stdout"].decode() for o in outs] == ["out-%d\n" % i for i in range(3)]
    assert sorted(runs.read_text().split()) == ["0", "1", "2"], "each job ran once"
    assert worst < 3 * c.heartbeat
    reliability(fault="slurmctld down 30 s (every squeue/sacct fails at once)",
                when="mid-job", seen="nothing: jobs stay running, then end DONE with their "
                "output; agent.log notes the failed queries", recover_s=round(done - back, 1),
                worst_ping_ms=round(worst * 1000, 1), lost=0, twice=0)


@pytest.mark.slurm
def test_submit_while_slurmctld_stalls_runs_the_job_exactly_once(make_cluster, testbed,
                                                                  tmp_path):
    """sbatch times out ("Socket timed out") yet slurmctld creates the job once it resumes:
    the agent must neither fail the job nor submit it twice."""
    c = make_cluster("slurm")
    runs = tmp_path / "runs"
    out: Dict[str, bytearray] = {}
    with ClusterSession(c) as client:
        client.ping()
        with slurmctld_stalled(testbed):
            fut = client.submit(["/bin/sh", "-c", "echo run >> %s; echo ran" % runs],
                                job_id="patient", on_output=collect(out))
            t0 = time.monotonic()
            worst = 0.0
            while time.monotonic() - t0 < 25:
                worst = max(worst, client.ping(timeout=10))
                time.sleep(0.2)
            assert not fut.done()
        result = fut.result(120)
    with open(os.path.join(c.workdir, "agent", "agent.log")) as f:
        retries = [line.strip() for line in f if "trying again" in line]
    print("\nsubmit during a 25 s stall: %s after %d retries (%s); worst ping %.1f ms"
          % (result.state.value, len(retries), retries[:1], worst * 1000))
    assert result.state == JobState.DONE and out["stdout"] == b"ran\n"
    assert runs.read_text() == "run\n", "one SLURM job, whatever sbatch said"
    assert retries, "the timed-out sbatch was retried (looked up by name first)"


@pytest.mark.slurm
def test_squeue_interval_is_fast_after_a_submit_and_slows_for_a_long_job(testbed, tmp_path,
                                                                         monkeypatch):
    from scipion_cloudexec.remote.jobs import JobFiles, JobSpec, LauncherSpec, job_script
    from scipion_cloudexec.remote.launchers import launcher_for
    from scipion_cloudexec.remote.slurm import SlurmScheduler
    monkeypatch.setenv("SLURM_CONF", testbed.slurm_conf)
    spec = JobSpec(job_id="adaptive-%d" % os.getpid(), argv=["sleep", "60"],
                   launcher=LauncherSpec(kind="slurm", srun=["srun"]))
    files = JobFiles(str(tmp_path), spec.job_id)
    os.makedirs(files.dir)
    with open(files.script, "w") as f:
        f.write(job_script(spec, files, launcher_for("slurm").command(spec, files)))
    sched = SlurmScheduler()
    calls: List[float] = []
    run = sched._run

    def counting(argv, timeout):
        if argv[0] == "squeue":
            calls.append(time.monotonic())
        return run(argv, timeout)
    monkeypatch.setattr(sched, "_run", counting)
    lid, _ = sched.submit(spec, files)
    states = set()
    try:
        t0 = time.monotonic()
        # 30 s: the interval (a sixth of the time since the last change) passes 3 s at 18 s
        while time.monotonic() - t0 < 30:  # as the agent does: status when next_poll says
            time.sleep(sched.next_poll())
            states |= {st.state for st in sched.status({spec.job_id: (lid, files)}).values()}
    finally:
        sched.cancel(lid, files)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    print("\n%d squeue calls in 30 s (a fixed 0.5 s poll: 60); gaps %s"
          % (len(calls), " ".join("%.1f" % g for g in gaps)))
    assert states <= {JobState.QUEUED, JobState.RUNNING} and JobState.RUNNING in states
    assert gaps[0] <= 1.0 and gaps[-1] >= 3.0 and len(calls) <= 35


# ---- (b) SLURM forgets a job ---------------------------------------------------------------

@pytest.mark.slurm
def test_job_scancelled_behind_the_agents_back_ends_cancelled_with_the_reason(make_cluster,
                                                                             testbed):
    c = make_cluster("slurm")
    with ClusterSession(c) as client:
        fut = client.submit(["sleep", "300"], job_id="victim")
        wait_until(lambda: jobs_by_id(client)["victim"]["state"] == "running", 60, "running")
        slurm_id = jobs_by_id(client)["victim"]["launcher_id"]
        assert slurm(testbed, "scancel", slurm_id).returncode == 0
        t0 = time.monotonic()
        with pytest.raises(JobCancelled) as e:
            fut.result(60)
        print("\nscancel behind the agent's back seen after %.1f s: %s"
              % (time.monotonic() - t0, e.value.result.reason))
    assert "SLURM job %s was cancelled outside cloudexec" % slurm_id in e.value.result.reason


@pytest.mark.slurm
def test_a_command_killed_by_its_own_signal_fails_with_that_code(make_cluster):
    """rc 143 from a command that SIGTERMs itself is the program's failure, not a cancel:
    SLURM is asked which (a scancel's rc is 143 too), and says the job ended by itself."""
    c = make_cluster("slurm")
    with ClusterSession(c) as client:
        fut = client.submit(["/bin/sh", "-c", "echo going; kill -TERM $$"], job_id="selfkill")
        with pytest.raises(JobFailed) as e:
            fut.result(60)
    assert e.value.result.exit_code == 143


@pytest.mark.slurm
def test_jobs_slurm_forgot_end_lost_with_a_reason_and_the_others_carry_on(make_cluster,
                                                                         testbed):
    c = make_cluster("slurm")
    with ClusterSession(c) as client:
        for name, argv in (("reused", ["sleep", "300"]), ("purged", ["sleep", "300"]),
                           ("live", ["/bin/sh", "-c", "sleep 8; echo still here"])):
            client.submit(argv, job_id=name)
        wait_until(lambda: all(r["state"] == "running" for r in jobs_by_id(client).values()),
                   60, "3 SLURM jobs running")
        ids = {j: r["launcher_id"] for j, r in jobs_by_id(client).items()}
    stop_agent(c.workdir)
    # SLURM loses two jobs: one id is reused by somebody else's job, one is gone for good
    other = slurm(testbed, "sbatch", "--parsable", "-J", "someone-else", "-o", "/dev/null",
                  "--wrap", "sleep 120").stdout.strip()
    assert other.isdigit()
    for j in ("reused", "purged"):
        slurm(testbed, "scancel", ids[j])
    db = sqlite3.connect(os.path.join(c.workdir, "agent", "journal.sqlite"))
    db.execute("UPDATE jobs SET launcher_id=? WHERE job_id='reused'", (other,))
    db.execute("UPDATE jobs SET launcher_id='99999999' WHERE job_id='purged'")
    db.commit()
    db.close()
    try:
        out: Dict[str, bytearray] = {}
        with ClusterSession(c) as client:  # a new agent adopts the three
            futs = {j: client.attach(j, on_output=collect(out) if j == "live" else None)
                    for j in ids}
            t0 = time.monotonic()
            errors = {}
            for j in ("reused", "purged"):
                with pytest.raises(JobLost) as e:
                    futs[j].result(60)
                errors[j] = e.value.result
            waited = time.monotonic() - t0
            live = futs["live"].result(60)
    finally:
        slurm(testbed, "scancel", other)
    print("\nforgotten jobs ended after %.1f s: %s" % (
        waited, "; ".join("%s: %s" % (j, r.reason) for j, r in errors.items())))
    assert live.state == JobState.DONE and out["stdout"] == b"still here\n"
    assert errors["reused"].state == JobState.LOST
    assert "now belongs to another job (someone-else)" in errors["reused"].reason
    assert errors["purged"].state == JobState.LOST
    assert "SLURM no longer knows job 99999999" in errors["purged"].reason


# ---- grace period: SLURM silent for longer than lost_after ---------------------------------

@pytest.mark.slurm
def test_job_given_up_after_the_grace_period_is_scancelled(make_cluster, testbed):
    c = make_cluster("slurm", env_setup="export CLOUDEXEC_SLURM_LOST_AFTER=8")
    with ClusterSession(c) as client:
        fut = client.submit(["sleep", "300"], job_id="abandoned")
        wait_until(lambda: jobs_by_id(client)["abandoned"]["state"] == "running", 60, "running")
        slurm_id = jobs_by_id(client)["abandoned"]["launcher_id"]
        t0 = time.monotonic()
        with slurmctld_stalled(testbed):
            with pytest.raises(JobLost) as e:
                fut.result(40)
            given_up = time.monotonic() - t0
            worst = max(client.ping(timeout=10) for _ in range(5))
        wait_until(lambda: "CANCELLED" in slurm(testbed, "squeue", "-h", "-t", "all", "-j",
                                                slurm_id, "-o", "%T").stdout, 90,
                   "the given-up SLURM job scancel'd once slurmctld answers")
    print("\ngiven up after %.1f s of silence (grace 8 s): %s; ping %.1f ms"
          % (given_up, e.value.result.reason, worst * 1000))
    assert "SLURM did not answer about job %s" % slurm_id in e.value.result.reason
    assert "scancel" in e.value.result.reason


# ---- (c), (d) worker pools -----------------------------------------------------------------

@pytest.mark.parametrize("launcher", ["local", "mpirun"])
def test_one_rank_pool_runs_a_long_job_without_losing_it(make_cluster, launcher):
    """A job longer than the pool's silence limit (5 s here, 15 s by default): rank 0 runs
    it itself and must keep the heartbeat going meanwhile."""
    c = make_cluster(launcher, env_setup="export CLOUDEXEC_POOL_DEAD_AFTER=5")
    out: Dict[str, bytearray] = {}
    with ClusterSession(c) as client:
        pool = client.start_pool("solo", ranks=1)
        result = client.submit(["/bin/sh", "-c", "sleep 9; echo finished on rank "
                                "$CLOUDEXEC_POOL_RANK"], pool="solo",
                               on_output=collect(out)).result(90)
        client.cancel(pool.job_id)
        with pytest.raises(JobCancelled):
            pool.result(30)
    assert result.state == JobState.DONE and out["stdout"] == b"finished on rank 0\n"


@pytest.mark.parametrize("launcher,ranks", [("local", 1), ("mpirun", 3)])
def test_cancel_right_after_submit_on_a_pool_never_leaves_a_job_running(make_cluster, tmp_path,
                                                                        launcher, ranks):
    c = make_cluster(launcher)
    delays = [0, 0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.4, 1.0]
    with ClusterSession(c) as client:
        pool = client.start_pool("race", ranks=ranks)
        assert client.submit(["true"], pool="race").result(60).exit_code == 0  # pool is up
        ends = {}
        for i, delay in enumerate(delays):
            token = "cx-race-%s-%d" % (tmp_path.name, i)
            fut = client.submit([PY, "-c", "import time; time.sleep(60)", token], pool="race")
            time.sleep(delay)
            client.cancel(fut.job_id)
            try:
                fut.result(15)
                ends[i] = "done"
            except JobCancelled:
                ends[i] = "cancelled"
            except Exception as e:  # noqa: BLE001  (reported below, with the others)
                ends[i] = type(e).__name__
        client.cancel(pool.job_id)
    left = subprocess.run(["pgrep", "-f", "cx-race-%s-" % tmp_path.name], capture_output=True,
                          text=True).stdout.split()
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    assert ends == {i: "cancelled" for i in range(len(delays))} and not left, (ends, left)


# ---- figures ------------------------------------------------------------------------------

def test_dispatch_round_trip(make_cluster):
    """Submit to end of a trivial job: the process scheduler's pidfd path stays immediate."""
    c = make_cluster("local")
    with ClusterSession(c) as client:
        client.submit(["true"]).result(30)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            client.submit(["true"]).result(30)
            times.append(time.perf_counter() - t0)
        pings = [client.ping() for _ in range(30)]
    print("\ndispatch round trip (local, `true`): median %.1f ms, max %.1f ms; ping median "
          "%.2f ms" % (statistics.median(times) * 1000, max(times) * 1000,
                       statistics.median(pings) * 1000))
    assert statistics.median(times) < 0.5
