#!/usr/bin/env python
"""Executor benchmarks (issue 4), in one run on the loopback cluster.

  (a) a protocol of 20 small dependent steps then 100 small independent steps (``true``),
      pyworkflow's stock local ThreadStepExecutor vs ours (cloud, loopback), same threads;
  (b) the plugin's per-micrograph protocol on 50 micrographs, local vs cloud.

    .venv/bin/python benchmarks/bench_executor.py [--mics 50] [--size 1024] [--threads 5]

Starts its own sshd test bed and Scipion folders under --root and removes them after.
"""
import argparse
import os
import platform
import shutil
import sys
import time

ROOT = "/tmp/cloudexec-bench-exec"
HOSTS = """[localhost]
PARALLEL_COMMAND = mpirun --oversubscribe -np %_(JOB_NODES)d %_(COMMAND)s
NAME = cloudexec
MANDATORY = 0
SUBMIT_COMMAND = true
SUBMIT_TEMPLATE = #!/bin/sh
CANCEL_COMMAND = PYTHON -m scipion_cloudexec.cli cancel %_(JOB_ID)s
CHECK_COMMAND = true
QUEUES = {"local": [["QUEUE_FOR_JOBS", "Y", "Steps on the cluster", "Keep Y"]]}
"""


def setup_scipion(root):
    """pyworkflow reads its configuration at import: set it first."""
    home = os.path.join(root, "scipion")
    os.makedirs(os.path.join(home, "config"), exist_ok=True)
    os.makedirs(os.path.join(home, "userdata", "projects"), exist_ok=True)
    os.environ.update(SCIPION_DOMAIN="pwem", SCIPION_HOME=home,
                      SCIPION_USER_DATA=os.path.join(home, "userdata"),
                      SCIPION_PYTHON=sys.executable, SCIPION_NOTIFY="False",
                      OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with open(os.path.join(home, "config", "hosts.conf"), "w") as f:
        f.write(HOSTS.replace("PYTHON", sys.executable))


def finish(tb, root):
    """Stop the test bed, remove the Scipion folders, print the machine."""
    tb.down()
    os.chdir("/")
    shutil.rmtree(root, ignore_errors=True)
    print("machine: %s, %d cores, Python %s" % (platform.platform(), os.cpu_count(),
                                                platform.python_version()))


def run(project, prot, cluster):
    if cluster:
        prot._useQueue.set(True)
        prot.setQueueParams([cluster, {"QUEUE_FOR_JOBS": "Y"}])
    t0 = time.perf_counter()
    project.launchProtocol(prot, wait=True)
    dt = time.perf_counter() - t0
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        raise SystemExit("%s did not finish: see %s" % (prot.getRunName(), prot.getStdoutLog()))
    return dt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT)
    p.add_argument("--mics", type=int, default=50)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=5, help="Scipion threads (workers + 1)")
    p.add_argument("--cloud-only", action="store_true",
                   help="skip the local runs (to compare two versions of the executor)")
    a = p.parse_args()
    shutil.rmtree(a.root, ignore_errors=True)
    setup_scipion(a.root)
    from pyworkflow.project import Manager
    from pwem.protocols import ProtImportMicrographs
    from scipion_cloudexec.protocols import ProtCloudPowerSpectra, ProtCloudShellSteps
    from scipion_cloudexec.testbed import LocalTestbed
    from scipion_cloudexec.tests.datagen import write_micrographs
    tb = LocalTestbed(os.path.join(a.root, "testbed"))
    rows = []
    try:
        os.environ["SCIPION_CLOUDEXEC_CONFIG"] = tb.up(slurm=False)
        project = Manager().createProject("bench", location=a.root)
        os.chdir(project.path)
        wheres = ("cloud",) if a.cloud_only else ("local", "cloud")
        times = {"local": float("nan")}
        for where in wheres:
            prot = project.newProtocol(ProtCloudShellSteps, objLabel="steps " + where,
                                       chain="\n".join(["true"] * 20), fan="true",
                                       fanCopies=100, numberOfThreads=a.threads)
            times[where] = run(project, prot, "local" if where == "cloud" else None)
        chain = project.newProtocol(ProtCloudShellSteps, objLabel="chain", numberOfThreads=2,
                                    chain="\n".join(["true"] * 20))
        chain_t = run(project, chain, "local")
        rows.append(("(a) 20 dependent + 100 independent steps, %d threads" % a.threads,
                     "%.1f s" % times["cloud"], "%.1f s (stock ThreadStepExecutor, local)"
                     % times["local"], "%.1fx faster" % (times["local"] / times["cloud"]),
                     ">= 5x"))
        rows.append(("(a) per-step time, 20 dependent `true` steps on the cluster",
                     "%.0f ms per step (stage in + job + gather)" % (chain_t / 20 * 1000), "-",
                     "-", "< 20 ms dispatch"))
        data = os.path.join(a.root, "mics")
        write_micrographs(data, a.mics, shape=(a.size, a.size), seed=1)
        imp = project.newProtocol(ProtImportMicrographs, filesPath=data, filesPattern="mic_*.mrc",
                                  samplingRate=1.0, voltage=300.0, sphericalAberration=2.7,
                                  amplitudeContrast=0.1, magnification=50000, copyFiles=False)
        run(project, imp, None)
        ps = {"local": float("nan")}
        for where in wheres:
            prot = project.newProtocol(ProtCloudPowerSpectra, objLabel="psd " + where,
                                       downsample=2, boxSize=256, numberOfThreads=a.threads)
            prot.inputMicrographs.set(imp.outputMicrographs)
            ps[where] = run(project, prot, "local" if where == "cloud" else None)
        rows.append(("(b) power spectra of %d micrographs %dx%d, %d threads"
                     % (a.mics, a.size, a.size, a.threads), "%.1f s (cloud, staging included)"
                     % ps["cloud"], "%.1f s (local, stock executor)" % ps["local"],
                     "%.2fx" % (ps["local"] / ps["cloud"]), "report"))
    finally:
        finish(tb, a.root)
    print("| benchmark | ours | baseline | ratio | goal |\n|---|---|---|---|---|")
    for r in rows:
        print("| %s |" % " | ".join(r))


if __name__ == "__main__":
    main()
