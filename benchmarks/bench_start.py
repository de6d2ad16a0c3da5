#!/usr/bin/env python
"""A protocol process's first contact with a cluster: ClusterSession.start (agent, and the
staging server with it) and a first stage-in of a small run folder, on a new workdir (the
bundle uploaded), on one that has it (the agent running but unknown to this desktop: a
remote start), and on one whose agent the desktop reached before (no remote command: the
agent and its staging endpoint through port forwards); --rounds rounds, alternating.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_start.py [--rounds 5]

Starts its own loopback sshd test bed under /tmp/cloudexec-bench-start and removes it.
"""
import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import time

from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.config import load_clusters
from scipion_cloudexec.testbed.local import LocalTestbed

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=5)
a = p.parse_args()
root = "/tmp/cloudexec-bench-start"
shutil.rmtree(root, ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.path.join(root, "desktop-cache")  # not the user's
tb = LocalTestbed(os.path.join(root, "testbed"))
conf = tb.up(slurm=False)
try:
    c = list(load_clusters(conf).values())[0]
    proj = os.path.join(root, "proj")
    os.makedirs(proj + "/Runs/r/extra")
    with open(proj + "/Runs/r/extra/a.txt", "w") as f:
        f.write("a")
    try:
        from scipion_cloudexec.cluster import endpoints
    except ImportError:  # the code before the desktop remembered agents
        endpoints = None
    res = {"new": [], "there": [], "known": []}
    for i in range(a.rounds):
        for kind in res:
            cc = dataclasses.replace(c, workdir=c.workdir + ("-n%d" % i if kind == "new" else ""))
            if kind == "there" and endpoints is not None:
                endpoints.forget(cc)
            t0 = time.perf_counter()
            s = ClusterSession(cc)
            try:
                try:
                    s.start(stage=True)
                except TypeError:  # the code before the staging server started early
                    s.start()
                s.stage_in(proj, ["Runs/r"], "p")
            finally:
                s.close()
            res[kind].append(time.perf_counter() - t0)
    for k, v in res.items():
        print("%s: median %.3f s  %s" % (k, statistics.median(v), " ".join("%.3f" % x for x in v)))
    print("machine: %s, %d cores, Python %s" % (platform.platform(), os.cpu_count(),
                                                platform.python_version()))
finally:
    tb.down()
    shutil.rmtree(root, ignore_errors=True)
