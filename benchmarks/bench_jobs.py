#!/usr/bin/env python
"""Jobs in flight bounded by the cluster, not the desktop (issue 13).

N independent single-rank steps of S seconds (``sleep S``) on a test cluster of SLOTS
slots (the ``local`` launcher: processes on the loopback head node), with a protocol of
THREADS Scipion threads (pyworkflow keeps one: THREADS - 1 step threads). Reports the wall
time of the protocol against the ideal N * S / SLOTS, the most jobs running at once (from the
agent's start and end times of each job; their mean is the jobs' seconds over the span from
the first start to the last end) and the run without the change's effect
(``CLOUD_JOBS`` = the step threads, as the desktop's threads capped it before).

    .venv/bin/python benchmarks/bench_jobs.py [--steps 1000] [--seconds 1] [--slots 64]
                                              [--threads 4] [--capped] [--fan COMMAND]

``--fan`` replaces each step's ``sleep S`` by COMMAND (``{i}``: the step's number), e.g. one
that writes outputs, so the gathers take time. The mean phases of a step (stage-in, submit,
job, gather; the step's provenance) are printed too.

Starts its own sshd test bed and Scipion folders under --root and removes them after.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_executor import finish, setup_scipion  # noqa: E402

ROOT = "/tmp/cloudexec-bench-jobs"


def most_at_once(records):
    events = sorted([(r["started"], 1) for r in records] + [(r["ended"], -1) for r in records])
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--threads", type=int, default=4, help="Scipion threads (step threads + 1)")
    p.add_argument("--fan", default="", help="each step's command ({i}: its number); "
                   "default: sleep SECONDS")
    p.add_argument("--capped", action="store_true",
                   help="also run with CLOUD_JOBS = the step threads (the old bound)")
    a = p.parse_args()
    shutil.rmtree(a.root, ignore_errors=True)
    setup_scipion(a.root)
    from pyworkflow.project import Manager
    from scipion_cloudexec.protocols import ProtCloudShellSteps
    from scipion_cloudexec.testbed import LocalTestbed
    tb = LocalTestbed(os.path.join(a.root, "testbed"))
    rows = []
    try:
        clusters = tb.up(slurm=False)
        text = open(clusters).read()
        section = text[text.index("[cluster local]"):].split("\n\n")[0]
        wide = "\n".join("slots = %d" % a.slots if line.startswith("slots") else line
                         for line in section.replace("[cluster local]", "[cluster wide]")
                         .splitlines())
        if "slots" not in wide:
            wide += "\nslots = %d" % a.slots
        with open(clusters, "a") as f:
            f.write("\n" + wide + "\n")
        os.environ["SCIPION_CLOUDEXEC_CONFIG"] = clusters
        project = Manager().createProject("bench", location=a.root)
        os.chdir(project.path)
        ideal = max(a.steps * a.seconds / a.slots, 1e-9)  # --seconds 0: the overhead alone
        cases = [("default (the cluster's slots)", {})]
        if a.capped:
            cases.append(("CLOUD_JOBS = %d (the old bound: step threads)" % (a.threads - 1),
                          {"CLOUD_JOBS": str(a.threads - 1)}))
        for label, queue in cases:
            prot = project.newProtocol(ProtCloudShellSteps, objLabel=label,
                                       fan=a.fan or "sleep %g" % a.seconds,
                                       fanCopies=a.steps,
                                       numberOfThreads=a.threads)
            prot._useQueue.set(True)
            prot.setQueueParams(["wide", dict(QUEUE_FOR_JOBS="Y", **queue)])
            t0 = time.perf_counter()
            project.launchProtocol(prot, wait=True)
            dt = time.perf_counter() - t0
            prot = project.getProtocol(prot.getObjId())
            if not prot.isFinished():
                raise SystemExit("%s did not finish: see %s" % (label, prot.getStdoutLog()))
            with open(os.path.join(prot.getWorkingDir(), "logs", "cloudexec.jsonl")) as f:
                records = [json.loads(line) for line in f]
            span = max(r["ended"] for r in records) - min(r["started"] for r in records)
            busy = sum(r["ended"] - r["started"] for r in records)
            rows.append((label, "%.1f s" % dt, "%.1f s" % span, "%.1f s" % ideal,
                         "%.2fx" % (dt / ideal), "%.2fx" % (span / ideal),
                         "%d (mean %.1f)" % (most_at_once(records), busy / span)))
            print(rows[-1], flush=True)
            print("mean phases (s): " + ", ".join(
                "%s %.3f" % (k, sum(r["phases"][k] for r in records) / len(records))
                for k in ("stage_in", "submit", "job", "gather")) +
                "; shared: stage-ins %d, gathers %d" % tuple(
                    sum(k in r.get("shared", ()) for r in records)
                    for k in ("stage_in", "gather")), flush=True)
    finally:
        finish(tb, a.root)
    print("%d steps of sleep %g s, %d slots, %d Scipion threads (%d step threads)"
          % (a.steps, a.seconds, a.slots, a.threads, a.threads - 1))
    print("| case | protocol wall time | first job start to last job end | ideal N*S/slots "
          "| ratio (wall) | ratio (jobs) | jobs at once: most (mean) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s |" % " | ".join(r))


if __name__ == "__main__":
    main()
