#!/usr/bin/env python
"""Staging benchmarks (issue 3), side by side in one run over the same loopback sshd.

  (1) 2 GB in 4 files   (2) 10,000 files of 100 kB   (3) the same set again, unchanged
  (4) the same set with 1% of the files changed
  ours (stage_in) vs ``scp -r`` and ``rsync -a -e ssh`` (rsync's second run for 3 and 4);
  peak client memory of ours at 10,000 and 100,000 small files.

    .venv/bin/python benchmarks/bench_staging.py [--root /tmp/cloudexec-bench] [--scale 1.0]

--scale shrinks the data sets for a quick look. Starts its own sshd test bed, stops it, and
deletes the data it wrote.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def make_files(folder, count, size):
    os.makedirs(folder, exist_ok=True)
    block = os.urandom(min(size, 1 << 20))
    for i in range(count):
        with open(os.path.join(folder, "f%06d.mrc" % i), "wb") as f:
            left = size
            f.write(i.to_bytes(8, "little"))  # distinct content per file
            left -= 8
            while left > 0:
                f.write(block[:left])
                left -= len(block[:left])


def ours(conf, project_root, paths, project, hash_cache, warm=False):
    """Stage in a fresh process; returns (seconds, bytes sent, peak RSS in MB). Cold: the
    time includes the SSH connection and the start of the staging server, as a CLI run
    pays; warm: both are up already, as inside Scipion where the executor holds them."""
    code = (
        "import json, resource, sys, time\n"
        "from scipion_cloudexec.config import load_clusters\n"
        "from scipion_cloudexec.transport.ssh import SSHConnection, Target\n"
        "from scipion_cloudexec.staging.client import Stager\n"
        "c = load_clusters(%r)['local']\n"
        "ssh = SSHConnection(Target.of(c))\n"
        "t0 = time.perf_counter(); ssh.connect()\n"
        "st = Stager(ssh, c, hash_cache=%r)\n"
        "if %r:\n"
        "    st._ask({'cmd': 'ping'}); st._ask({'cmd': 'ping'}, bulk=True)\n"
        "    t0 = time.perf_counter()\n"
        "r = st.stage_in(%r, %r, %r, keep_hashes=False)\n"
        "dt = time.perf_counter() - t0\n"
        "st.close()\n"
        "print(json.dumps([dt, r.bytes_sent, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))\n"
        % (conf, hash_cache, warm, project_root, paths, project))
    settle()
    c0 = cpu_busy()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    CPU["ours"] = cpu_busy() - c0  # includes Python start-up and imports
    return json.loads(out.stdout.strip().splitlines()[-1])


def ssh_opts(c):
    return ["-o", "UserKnownHostsFile=%s" % c.known_hosts, "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-i", c.identity_file]


CPU = {}  # CPU seconds of the whole machine during the last timed run, by who ran


def cpu_busy():
    """Busy CPU seconds of the whole machine so far (all processes: ssh, sshd, both sides)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def settle():
    """Write back what earlier runs left dirty, so each run starts from the same state
    (ext4 skips recently freed inodes while their table is dirty, which taxes new files)."""
    subprocess.run(["sync"], check=True)


def timed(argv):
    settle()
    c0, t0 = cpu_busy(), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    CPU[argv[0]] = cpu_busy() - c0
    return time.perf_counter() - t0


def scp(c, src, dest):
    return timed(["scp", "-q", "-r", "-P", str(c.port)] + ssh_opts(c) + [
        src, "%s@%s:%s" % (c.user, c.host, dest)])


def rsync(c, src, dest):
    e = " ".join(["ssh", "-p", str(c.port)] + ssh_opts(c))
    return timed(["rsync", "-a", "-e", e, src, "%s@%s:%s" % (c.user, c.host, dest)])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/cloudexec-bench")
    p.add_argument("--scale", type=float, default=1.0)
    a = p.parse_args()
    from scipion_cloudexec.config import load_clusters
    from scipion_cloudexec.testbed import LocalTestbed
    tb = LocalTestbed(a.root)
    data = os.path.join(a.root, "data")
    rows = []
    try:
        conf = tb.up(slurm=False)
        c = load_clusters(conf)["local"]
        remote = c.workdir
        hc = os.path.join(a.root, "hashes.sqlite")
        big_n, big_size = 4, int(500e6 * a.scale)
        small_n, small_size = int(10000 * a.scale), 100_000
        make_files(os.path.join(data, "big"), big_n, big_size)
        make_files(os.path.join(data, "small"), small_n, small_size)
        os.makedirs(os.path.join(remote, "scp"), exist_ok=True)
        os.makedirs(os.path.join(remote, "rsync"), exist_ok=True)
        # (1) large files
        t_scp = scp(c, os.path.join(data, "big"), os.path.join(remote, "scp", "big"))
        t_rs = rsync(c, os.path.join(data, "big"), os.path.join(remote, "rsync"))
        t_us, sent, rss = ours(conf, data, ["big"], "p1", hc)
        mb = big_n * big_size / 1e6
        rows.append(("(1) %d files of %.0f MB" % (big_n, big_size / 1e6),
                     "%.2f s (%.0f MB/s), %.1f CPU-s" % (t_us, mb / t_us, CPU["ours"]),
                     "scp %.2f s (%.0f MB/s), rsync %.2f s (%.0f MB/s, %.1f CPU-s)"
                     % (t_scp, mb / t_scp, t_rs, mb / t_rs, CPU["rsync"]),
                     "%.2fx the faster" % (min(t_scp, t_rs) / t_us), ">= 0.9x"))
        # (2) many small files
        t_scp = scp(c, os.path.join(data, "small"), os.path.join(remote, "scp", "small"))
        t_rs = rsync(c, os.path.join(data, "small"), os.path.join(remote, "rsync"))
        t_us, sent, rss_small = ours(conf, data, ["small"], "p1", hc)
        rows.append(("(2) %d files of 100 kB" % small_n, "%.2f s (peak RSS %.0f MB), %.1f CPU-s"
                     % (t_us, rss_small, CPU["ours"]), "scp %.2f s, rsync %.2f s (%.1f CPU-s)"
                     % (t_scp, t_rs, CPU["rsync"]),
                     "%.2fx faster than rsync" % (t_rs / t_us), ">= 1.5x rsync"))
        # (3) unchanged
        t_rs = rsync(c, os.path.join(data, "small"), os.path.join(remote, "rsync"))
        t_us, sent, _ = ours(conf, data, ["small"], "p1", hc)
        t_warm, sent_warm, _ = ours(conf, data, ["small"], "p1", hc, warm=True)
        rows.append(("(3) same set, unchanged", "cold %.2f s, warm %.2f s, %d content bytes sent"
                     % (t_us, t_warm, sent + sent_warm), "rsync 2nd run %.2f s" % t_rs,
                     "cold %.2fx, warm %.2fx rsync's time" % (t_us / t_rs, t_warm / t_rs),
                     "<= 1x rsync, 0 bytes"))
        # (4) 1% changed: one 1% for the cold run, another for the warm one
        t_rs4, t_us4, sent4 = [], [], []
        for start, warm in ((0, False), (50, True)):
            for i in range(start, small_n, 100):
                with open(os.path.join(data, "small", "f%06d.mrc" % i), "r+b") as f:
                    f.seek(5000)
                    f.write(os.urandom(100))
            t_rs4.append(rsync(c, os.path.join(data, "small"), os.path.join(remote, "rsync")))
            t, sent, _ = ours(conf, data, ["small"], "p1", hc, warm=warm)
            t_us4.append(t)
            sent4.append(sent)
        rows.append(("(4) 1%% changed (%d files)" % (small_n // 100),
                     "cold %.2f s, warm %.2f s, %.1f / %.1f MB sent"
                     % (t_us4[0], t_us4[1], sent4[0] / 1e6, sent4[1] / 1e6),
                     "rsync 2nd run %.2f s / %.2f s" % tuple(t_rs4),
                     "cold %.2fx, warm %.2fx rsync's time"
                     % (t_us4[0] / t_rs4[0], t_us4[1] / t_rs4[1]), "<= 1x rsync"))
        # memory at 10x more (tiny) files
        make_files(os.path.join(data, "tiny"), small_n * 10, 1000)
        t_us, sent, rss_tiny = ours(conf, data, ["tiny"], "p2", hc)
        rows.append(("memory: %d vs %d files" % (small_n, small_n * 10),
                     "peak RSS %.0f MB vs %.0f MB" % (rss_small, rss_tiny), "-",
                     "%.2fx" % (rss_tiny / rss_small), "flat"))
    finally:
        tb.down()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(os.path.join(a.root, "remote"), ignore_errors=True)
    print("machine: %s, %d cores, Python %s, scale %.2f" % (
        platform.platform(), os.cpu_count(), platform.python_version(), a.scale))
    print("| case | ours | baseline | ratio | goal |\n|---|---|---|---|---|")
    for r in rows:
        print("| %s |" % " | ".join(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
