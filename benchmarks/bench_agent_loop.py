#!/usr/bin/env python
"""Agent loop under SLURM load (issue 10): heartbeats and dispatch with 500 queued SLURM jobs
and a squeue that takes 5 s per call, against an idle agent, measured from a client.

Two agents on the test bed's loopback sshd and SLURM, each with its own workdir:

* loaded: 500 SLURM jobs submitted through it (``#SBATCH --begin=now+1hour``, so they stay
  PENDING), which it tracks and polls with one ``squeue`` for all of them;
* idle: no SLURM job.

Both see the same ``squeue`` first in their PATH: a wrapper that sleeps 5 s, then execs the
real squeue. That delay is the one fake part (a slow slurmctld, which cannot be made on
demand without stalling the test bed's SLURM for everyone); sbatch and squeue are real.

Rounds alternate idle/loaded (the order flips every round). Per agent and round:

* heartbeats only (``--beat-seconds``): the client's own pings every ``heartbeat`` s; the
  worst gap between two Pongs arriving (the client declares the agent lost at 3 beats);
* probes (``--probe-seconds``): ping round trips and a trivial job on the process launcher
  (``true``): submit -> Accepted, and submit -> Ended.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_agent_loop.py [--jobs 500] [--rounds 4]

Uses the shared test bed in $CLOUDEXEC_TESTBED (default /tmp/cloudexec-testbed) with the
reference counting of the tests' fixture; scancels every job it queued and stops both agents
by pid at the end.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

from scipion_cloudexec.cluster.agent_client import AgentClient
from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.testbed import LocalTestbed

WRAPPER = """#!/bin/sh
# benchmark fake: the real squeue, 5 s late (a slow slurmctld); each call logged
echo "start $(date +%s.%N)" >> {log}
sleep {delay}
{real} "$@"
rc=$?
echo "end $(date +%s.%N)" >> {log}
exit $rc
"""


class _TimedAgent(AgentClient):
    """An agent client that notes when each message from the agent arrives."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.heard: List[Tuple[float, str]] = []

    def _dispatch(self, msg):
        self.heard.append((time.monotonic(), msg.TYPE))
        super()._dispatch(msg)


class TimedClient(ClusterSession):
    """A session whose agent client notes when each message arrives."""

    def __init__(self, cluster):
        super().__init__(cluster)
        self.agent = _TimedAgent(cluster, self.ssh)

    @property
    def heard(self) -> List[Tuple[float, str]]:
        return self.agent.heard


def worst_gap(times: List[float], t0: float, t1: float) -> float:
    marks = [t0] + sorted(t for t in times if t0 <= t <= t1) + [t1]
    return max(b - a for a, b in zip(marks, marks[1:]))


def beats(client: TimedClient, seconds: float) -> float:
    """Worst gap between Pongs while only heartbeats flow."""
    t0 = time.monotonic()
    time.sleep(seconds)
    t1 = time.monotonic()
    return worst_gap([t for t, kind in list(client.heard) if kind == "Pong"], t0, t1)


def probes(client: TimedClient, seconds: float) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {"ping": [], "accepted": [], "ended": []}
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        out["ping"].append(client.ping())
        t0 = time.perf_counter()
        fut = client.submit(["true"], launcher="local")
        if not fut.accepted.wait(30):
            raise RuntimeError("no Accepted within 30 s")
        out["accepted"].append(time.perf_counter() - t0)
        fut.result(60)
        out["ended"].append(time.perf_counter() - t0)
        time.sleep(0.2)
    return out


def stop_agent(workdir: str) -> None:
    try:
        with open(os.path.join(workdir, "agent", "agent.json")) as f:
            pid = int(json.load(f)["pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def med(x: List[float]) -> float:
    return statistics.median(x)


def p95(x: List[float]) -> float:
    return sorted(x)[min(len(x) - 1, int(0.95 * len(x)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--beat-seconds", type=float, default=20.0)
    p.add_argument("--probe-seconds", type=float, default=20.0)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--squeue-delay", type=float, default=5.0)
    a = p.parse_args()

    root = os.environ.get("CLOUDEXEC_TESTBED") or "/tmp/cloudexec-testbed"
    tb = LocalTestbed(root, python=sys.executable)
    users = os.path.join(root, "users")  # the fixture's reference counting, as a test session
    os.makedirs(users, exist_ok=True)
    me = os.path.join(users, str(os.getpid()))
    open(me, "w").close()
    was_running = tb.sshd_running()
    work = tempfile.mkdtemp(prefix="cx-bench-loop-")
    clients: List[TimedClient] = []
    names = "loopbench-%d-" % os.getpid()
    try:
        tb.up(slurm=True)
        if not was_running:
            open(os.path.join(users, "started-by-tests"), "w").close()
        if not tb.slurm_running():
            print("SLURM is not running in the test bed")
            return 1
        real = shutil.which("squeue")
        bindir = os.path.join(work, "bin")
        os.makedirs(bindir)
        calls = os.path.join(work, "squeue-calls.log")
        with open(os.path.join(bindir, "squeue"), "w") as f:
            f.write(WRAPPER.format(log=calls, delay=a.squeue_delay, real=real))
        os.chmod(os.path.join(bindir, "squeue"), 0o755)
        # first line of env_setup: an #SBATCH directive in the job script's header (a shell
        # comment when the agent starts); the wrapper first in the agent's PATH
        env_setup = "#SBATCH --begin=now+1hour\nexport PATH=%s:$PATH" % bindir

        def cluster(name: str) -> ClusterConfig:
            return ClusterConfig(
                name=name, host="127.0.0.1", port=tb.sshd_port, user=tb.user,
                identity_file=tb.client_key, known_hosts=tb.known_hosts,
                workdir=os.path.join(work, name), python=sys.executable, launcher="slurm",
                slots=4, heartbeat=a.heartbeat, connect_timeout=10.0, env_setup=env_setup,
                srun=("srun", "--mpi=pmix"), source="<bench>")
        idle, loaded = TimedClient(cluster("idle")), TimedClient(cluster("loaded"))
        clients += [idle, loaded]
        for c in clients:
            c.start()

        t0 = time.monotonic()
        futs = [loaded.submit(["true"], job_id="%s%d" % (names, i), label="queued")
                for i in range(a.jobs)]
        deadline = time.monotonic() + 600
        while True:
            rows = [r for r in loaded.jobs(limit=a.jobs + 100) if r["job_id"].startswith(names)]
            queued = [r for r in rows if r["state"] == "queued" and r["launcher_id"]]
            if len(queued) == a.jobs:
                break
            if time.monotonic() > deadline or any(f.done() for f in futs):
                raise RuntimeError("not all jobs queued: %d of %d" % (len(queued), a.jobs))
            time.sleep(1)
        submit_s = time.monotonic() - t0
        env = dict(os.environ, SLURM_CONF=tb.slurm_conf)
        reasons = subprocess.run([real, "-h", "-o", "%j %T %r"], env=env, capture_output=True,
                                 text=True).stdout.split("\n")
        pending = [ln for ln in reasons if ln.startswith("cx-" + names) and "PENDING" in ln
                   and "BeginTime" in ln]
        print("%d jobs queued in SLURM through the agent in %.1f s; %d PENDING (BeginTime)"
              % (a.jobs, submit_s, len(pending)), flush=True)

        res: Dict[str, Dict[str, list]] = {k: {"gap": [], "ping": [], "accepted": [],
                                               "ended": [], "rounds": []}
                                           for k in ("idle", "loaded")}
        calls_before = open(calls).read().count("end ")
        for r in range(a.rounds):
            order = (("idle", idle), ("loaded", loaded))
            for name, client in (order if r % 2 == 0 else order[::-1]):
                gap = beats(client, a.beat_seconds)
                pr = probes(client, a.probe_seconds)
                res[name]["gap"].append(gap)
                for k in ("ping", "accepted", "ended"):
                    res[name][k] += pr[k]
                res[name]["rounds"].append({k: med(v) for k, v in pr.items()})
                print("round %d %-6s worst Pong gap %.3f s; median ping %.2f ms, submit->"
                      "Accepted %.2f ms, submit->Ended %.2f ms (%d jobs)"
                      % (r + 1, name, gap, med(pr["ping"]) * 1e3, med(pr["accepted"]) * 1e3,
                         med(pr["ended"]) * 1e3, len(pr["ended"])), flush=True)
        with open(calls) as f:
            text = f.read()
        starts = [float(x.split()[1]) for x in text.splitlines() if x.startswith("start")]
        ends = [float(x.split()[1]) for x in text.splitlines() if x.startswith("end")]
        durations = [e - s for s, e in zip(starts, ends)]
        print("squeue calls during the rounds: %d (each %.1f-%.1f s)"
              % (len(ends) - calls_before, min(durations), max(durations)))

        print("\nmachine: %s, %d cores (%s), Python %s" % (
            platform.platform(), os.cpu_count(), cpu_model(), platform.python_version()))
        print("| measure | idle agent | loaded agent (%d queued, squeue %.0f s) | ratio |"
              % (a.jobs, a.squeue_delay))
        print("|---|---|---|---|")
        i, lo = res["idle"], res["loaded"]
        print("| worst gap between Pongs, heartbeat %.1f s (rounds: %s / %s) | %.3f s | %.3f s "
              "| %.2fx |" % (a.heartbeat, " ".join("%.2f" % g for g in i["gap"]),
                             " ".join("%.2f" % g for g in lo["gap"]), max(i["gap"]),
                             max(lo["gap"]), max(lo["gap"]) / max(i["gap"])))
        for k, label in (("ping", "ping round trip"), ("accepted", "submit -> Accepted"),
                         ("ended", "submit -> Ended (`true`, process launcher)")):
            ratios = [x[k] / y[k] for x, y in zip(lo["rounds"], i["rounds"])]
            print("| %s, median [p95] of %d / %d | %.2f ms [%.2f] | %.2f ms [%.2f] | %.2fx "
                  "(per round %s) |" % (label, len(i[k]), len(lo[k]), med(i[k]) * 1e3,
                                        p95(i[k]) * 1e3, med(lo[k]) * 1e3, p95(lo[k]) * 1e3,
                                        med(lo[k]) / med(i[k]),
                                        " ".join("%.2f" % x for x in ratios)))
        return 0
    finally:
        cleanup(clients, names, tb, work)
        os.unlink(me)
        others = [x for x in os.listdir(users) if x.isdigit() and os.path.exists("/proc/" + x)]
        started = os.path.join(users, "started-by-tests")
        if not others and os.path.exists(started):
            os.unlink(started)
            tb.down()


def cleanup(clients: List[TimedClient], names: str, tb: LocalTestbed, work: str) -> None:
    """Cancel every job queued here (through the agent, then whatever SLURM still lists
    under our names, directly), stop both agents by pid."""
    env = dict(os.environ, SLURM_CONF=tb.slurm_conf)
    real = "/usr/bin/squeue" if os.path.exists("/usr/bin/squeue") else "squeue"
    for c in clients:
        try:
            if c.welcome is not None:
                ours = [r["job_id"] for r in c.jobs(limit=100000)
                        if r["job_id"].startswith(names) and r["state"] in ("queued", "running",
                                                                           "submitted")]
                for j in ours:
                    c.cancel(j)
                deadline = time.monotonic() + 120
                while ours and time.monotonic() < deadline and any(
                        r["state"] not in ("cancelled", "done", "failed", "lost")
                        for r in c.jobs(limit=100000) if r["job_id"].startswith(names)):
                    time.sleep(1)
        except Exception as e:  # noqa: BLE001  (the sweep below catches what is left)
            print("cancel through the agent: %s" % e)
        c.close()
    left = [ln.split()[0] for ln in subprocess.run(
        [real, "-h", "-o", "%i %j"], env=env, capture_output=True, text=True).stdout.splitlines()
        if len(ln.split()) == 2 and ln.split()[1].startswith("cx-" + names)]
    if left:
        subprocess.run(["scancel"] + left, env=env)
    print("left in SLURM after the agent's cancels: %d (scancel'd directly)" % len(left))
    for c in clients:
        stop_agent(c.cluster.workdir)
    shutil.rmtree(work, ignore_errors=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
