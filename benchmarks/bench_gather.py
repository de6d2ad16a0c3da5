#!/usr/bin/env python
"""Gather benchmark (issue 9): the time to bring back a run folder of 10,000 files of which
10 changed on the cluster, through the loopback sshd, with the connection already open (as
inside a protocol). Interleaved rounds, median and range.

    .venv/bin/python benchmarks/bench_gather.py [--files 10000] [--changed 10] [--rounds 5]

With ``PYTHONPATH`` pointing at another checkout, it measures that checkout's code (its
``stage_out`` with a baseline when it has no ``gather``): run it once for each and compare.
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=10000)
    p.add_argument("--changed", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    from scipion_cloudexec.config import ClusterConfig
    from scipion_cloudexec.cluster.stager import Stager
    from scipion_cloudexec.testbed import LocalTestbed
    from scipion_cloudexec.cluster.ssh import SSHConnection, Target
    import scipion_cloudexec
    root = tempfile.mkdtemp(prefix="cloudexec-bench-gather-")
    tb = LocalTestbed(os.path.join(root, "testbed"), python=sys.executable)
    tb.up(slurm=False)
    try:
        c = ClusterConfig(name="loop", host="127.0.0.1", port=tb.sshd_port, user=tb.user,
                          identity_file=tb.client_key, known_hosts=tb.known_hosts,
                          workdir=os.path.join(root, "remote"), python=sys.executable,
                          launcher="local", slots=2, source="<bench>")
        proj, run = os.path.join(root, "proj"), "Runs/000002_ProtBench"
        for i in range(a.files):
            d = os.path.join(proj, run, "extra", "d%02d" % (i % 50))
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "f%05d.txt" % i), "wb") as f:
                f.write(os.urandom(200))
        ssh = SSHConnection(Target.of(c))
        ssh.connect()
        st = Stager(ssh, c, hash_cache=os.path.join(root, "hashes.sqlite"))
        new = hasattr(st, "gather")
        if new:
            base = {}
            r = st.stage_in(proj, [run], "proj", run_dir=run, base=base)
            base.update(r.agreed)
        else:
            r = st.stage_in(proj, [run], "proj")
            base = dict(r.hashes)
        mirror = os.path.join(c.workdir, "projects", "proj", run)
        times = []
        for rnd in range(a.rounds):
            for i in range(a.changed):  # a job rewrites a few files
                n = (rnd * a.changed + i) * 97 % a.files
                with open(os.path.join(mirror, "extra", "d%02d" % (n % 50), "f%05d.txt" % n),
                          "wb") as f:
                    f.write(os.urandom(200))
            t0 = time.perf_counter()
            if new:
                got = st.gather(proj, "proj", run, base, exclude=[run + "/logs"])
                base.update(got.agreed)
            else:
                got = st.stage_out(proj, "proj", run, baseline=base)
                base.update(got.hashes)
            times.append(time.perf_counter() - t0)
            assert len(got.fetched) == a.changed, got.fetched
        st.close()
        ssh.close()
    finally:
        tb.down()
        shutil.rmtree(root, ignore_errors=True)
    print("code: %s (%s)" % (os.path.dirname(scipion_cloudexec.__file__),
                             "gather" if new else "stage_out"))
    print("machine: %s, %d cores, Python %s" % (platform.platform(), os.cpu_count(),
                                                platform.python_version()))
    print("gather of %d files, %d changed: median %.3f s [%.3f-%.3f] over %d rounds"
          % (a.files, a.changed, statistics.median(times), min(times), max(times), a.rounds))


if __name__ == "__main__":
    main()
