#!/usr/bin/env python
"""Per-step overhead (issue 13), in one run on the loopback cluster.

  (a) 20 dependent then 100 independent ``true`` steps: pyworkflow's stock serial
      executor (1 thread, local) against ours on the cluster (1 and --threads threads),
      interleaved over --rounds rounds;
  (b) the curve: protocols of N independent steps, each writing 3 small files into the
      run folder (N = --curve), on the cluster: wall time per step, and the overhead of
      one step (its runJob's wall time minus the job's own run time, from the phases in
      ``logs/cloudexec.jsonl``), median over the first and the last tenth of the steps.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_steps.py [--rounds 3]
        [--curve 100,500,1000,2000,5000] [--threads 3] [--skip-a] [--skip-curve]

Starts its own sshd test bed and Scipion folders under --root and removes them after.
"""
import argparse
import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_executor import finish, run, setup_scipion  # noqa: E402

ROOT = "/tmp/cloudexec-bench-steps"
WRITE3 = "for k in 1 2 3; do echo step {i} file $k > out_{i}_$k.txt; done"


def overheads(prot):
    """Per-step overhead (ms) in step order: runJob's wall time minus the job's own."""
    path = os.path.join(prot._getPath(), "logs", "cloudexec.jsonl")
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            ph = r.get("phases")
            if not ph:
                continue
            own = max(0.0, (r.get("ended") or 0) - (r.get("started") or 0))
            out.append((r["staged_at"], 1000 * (sum(ph.values()) - own), ph,
                        r.get("shared", [])))
    out.sort()
    return out


def tenth(values, last):
    n = max(1, len(values) // 10)
    part = values[-n:] if last else values[:n]
    return statistics.median(v[1] for v in part)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=3, help="Scipion threads of the cloud runs")
    p.add_argument("--curve", default="100,500,1000,2000,5000")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-curve", action="store_true")
    a = p.parse_args()
    shutil.rmtree(a.root, ignore_errors=True)
    setup_scipion(a.root)
    from pyworkflow.project import Manager
    from scipion_cloudexec.protocols import ProtCloudShellSteps
    from scipion_cloudexec.testbed import LocalTestbed
    tb = LocalTestbed(os.path.join(a.root, "testbed"))
    rows_a, rows_c = [], []
    try:
        os.environ["SCIPION_CLOUDEXEC_CONFIG"] = tb.up(slurm=False)
        project = Manager().createProject("bench", location=a.root)
        os.chdir(project.path)
        chain = "\n".join(["true"] * 20)
        for rnd in range(1, 0 if a.skip_a else a.rounds + 1):
            t = {}
            for where, threads in (("local", 1), ("cloud", 1), ("cloud", a.threads)):
                prot = project.newProtocol(ProtCloudShellSteps, chain=chain, fan="true",
                                           fanCopies=100, numberOfThreads=threads,
                                           objLabel="a %s %d r%d" % (where, threads, rnd))
                t[(where, threads)] = run(project, prot, "local" if where == "cloud" else None)
                o = overheads(project.getProtocol(prot.getObjId())) if where == "cloud" else []
                t[(where, threads, "o")] = statistics.median(v[1] for v in o) if o else 0
                if o:  # code before issue 13 does not record phases
                    print("  %s %d threads: median phases (ms) %s" % (where, threads, {
                        k: round(1000 * statistics.median(v[2][k] for v in o), 1)
                        for k in o[0][2]}), flush=True)
            rows_a.append((rnd, t))
            print("round %d: local serial %.2f s; cloud 1 thread %.2f s (%.2fx, %.0f ms/step "
                  "overhead); cloud %d threads %.2f s (%.2fx)" % (
                      rnd, t[("local", 1)], t[("cloud", 1)], t[("cloud", 1)] / t[("local", 1)],
                      t[("cloud", 1, "o")], a.threads, t[("cloud", a.threads)],
                      t[("cloud", a.threads)] / t[("local", 1)]), flush=True)
        for n in ([] if a.skip_curve else [int(x) for x in a.curve.split(",")]):
            prot = project.newProtocol(ProtCloudShellSteps, fan=WRITE3, fanCopies=n,
                                       numberOfThreads=a.threads, objLabel="curve %d" % n)
            wall = run(project, prot, "local")
            prot = project.getProtocol(prot.getObjId())
            o = overheads(prot)
            files = sum(len(fs) for _d, _s, fs in os.walk(prot._getPath()))
            if not o:  # code before issue 13: wall time only
                o = [(0, float("nan"), {}, [])]
            last = o[-max(1, len(o) // 10):]
            phases = {k: 1000 * statistics.median(v[2][k] for v in last) for k in last[0][2]}
            shared = {k: sum(k in v[3] for v in o) for k in ("stage_in", "gather")}
            rows_c.append((n, wall, tenth(o, False), tenth(o, True), phases, files, shared))
            print("curve %d steps: %.1f s, %.1f ms/step wall; overhead first tenth %.1f ms, "
                  "last tenth %.1f ms; last tenth phases %s; %d files; shared %s" % (
                      n, wall, 1000 * wall / n, tenth(o, False), tenth(o, True),
                      {k: round(v, 1) for k, v in phases.items()}, files, shared), flush=True)
    finally:
        finish(tb, a.root)
    if rows_a:
        print("| round | local serial | cloud, 1 thread (ratio) | cloud, %d threads (ratio) |"
              "\n|---|---|---|---|" % a.threads)
        for rnd, t in rows_a:
            print("| %d | %.2f s | %.2f s (%.2fx) | %.2f s (%.2fx) |" % (
                rnd, t[("local", 1)], t[("cloud", 1)], t[("cloud", 1)] / t[("local", 1)],
                t[("cloud", a.threads)], t[("cloud", a.threads)] / t[("local", 1)]))
    if rows_c:
        print("| steps | wall | per step (wall) | overhead per step, first tenth | last tenth |"
              " files | stage-ins, gathers shared |\n|---|---|---|---|---|---|---|")
        for n, wall, first, last, _ph, files, shared in rows_c:
            print("| %d | %.1f s | %.1f ms | %.1f ms | %.1f ms | %d | %d, %d |"
                  % (n, wall, 1000 * wall / n, first, last, files, shared["stage_in"],
                     shared["gather"]))


if __name__ == "__main__":
    main()
