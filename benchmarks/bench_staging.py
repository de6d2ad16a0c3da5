#!/usr/bin/env python
"""Staging benchmarks (issue 3), side by side in one run over the same loopback sshd.

  (1) 2 GB in 4 files   (2) 10,000 files of 100 kB   (3) the same set again, unchanged
  (4) the same set with 1% of the files changed
  ours (stage_in) vs ``scp -r`` and ``rsync -a -e ssh`` (rsync's second run for 3 and 4);
  peak client memory of ours at 10,000 and 100,000 small files.

    .venv/bin/python benchmarks/bench_staging.py [--root /tmp/cloudexec-bench] [--scale 1.0]

--scale shrinks the data sets for a quick look; --rounds N (3) runs the contenders
interleaved N times, each round to fresh destinations, and reports the median ratio and its
range (this machine is noisy: the same rsync run varies by up to 1.6x between rounds). Starts its own sshd test bed, stops it, and
deletes the data it wrote.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import statistics
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


def ours(conf, project_root, paths, project, hash_cache, workdir, warm=False):
    """Stage in a fresh process; returns (seconds, bytes sent, peak RSS in MB). Cold: the
    time includes the SSH connection and the start of the staging server, as a CLI run
    pays; warm: both are up already, as inside Scipion where the executor holds them."""
    code = (
        "import dataclasses, json, resource, sys, time\n"
        "from scipion_cloudexec.config import load_clusters\n"
        "from scipion_cloudexec.cluster.ssh import SSHConnection, Target\n"
        "from scipion_cloudexec.cluster.stager import Stager\n"
        "from scipion_cloudexec.remote.stage_protocol import Mirrors\n"
        "c = dataclasses.replace(load_clusters(%r)['local'], workdir=%r)\n"
        "ssh = SSHConnection(Target.of(c))\n"
        "t0 = time.perf_counter(); ssh.connect()\n"
        "st = Stager(ssh, c, hash_cache=%r)\n"
        "if %r:\n"
        "    st._ask(Mirrors()); st._ask(Mirrors(), bulk=True)\n"
        "    t0 = time.perf_counter()\n"
        "r = st.stage_in(%r, %r, %r, keep_hashes=False)\n"
        "dt = time.perf_counter() - t0\n"
        "st.close()\n"
        "print(json.dumps([dt, r.bytes_sent, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))\n"
        % (conf, workdir, hash_cache, warm, project_root, paths, project))
    settle()
    c0 = cpu_busy()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=HERE)
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


def spread(values):
    """median [min-max] of a list of ratios."""
    v = sorted(values)
    return "%.2fx [%.2f-%.2f]" % (statistics.median(v), v[0], v[-1])


def touch_one_percent(folder, n, start):
    for i in range(start, n, 100):
        with open(os.path.join(folder, "f%06d.mrc" % i), "r+b") as f:
            f.seek(5000)
            f.write(os.urandom(100))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/cloudexec-bench")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="contenders run interleaved this many times; ratios are per round")
    a = p.parse_args()
    from scipion_cloudexec.config import load_clusters
    from scipion_cloudexec.testbed import LocalTestbed
    tb = LocalTestbed(a.root)
    data = os.path.join(a.root, "data")
    rows = []
    R = {k: [] for k in ("1", "2", "3c", "3w", "4c", "4w")}
    detail = {k: [] for k in R}
    try:
        conf = tb.up(slurm=False)
        c = load_clusters(conf)["local"]
        remote = os.path.join(a.root, "remote")
        big_n, big_size = 4, int(500e6 * a.scale)
        small_n, small_size = int(10000 * a.scale), 100_000
        mb = big_n * big_size / 1e6
        small = os.path.join(data, "small")
        make_files(os.path.join(data, "big"), big_n, big_size)
        make_files(small, small_n, small_size)
        for r in range(a.rounds):
            # fresh destinations each round: a cluster cache, a hash memo, scp and rsync folders
            wd = os.path.join(remote, "ours%d" % r)
            hc = os.path.join(a.root, "hashes%d.sqlite" % r)
            rs = os.path.join(remote, "rsync%d" % r)
            os.makedirs(rs)
            os.makedirs(os.path.join(remote, "scp%d" % r))
            # (1) large files
            t_scp = scp(c, os.path.join(data, "big"), os.path.join(remote, "scp%d" % r, "big"))
            t_rs = rsync(c, os.path.join(data, "big"), rs)
            cpu_rs = CPU["rsync"]
            t_us, _, _ = ours(conf, data, ["big"], "p1", hc, wd)
            R["1"].append(min(t_scp, t_rs) / t_us)
            detail["1"].append("ours %.1f s (%.0f MB/s, %.0f CPU-s), scp %.1f s (%.0f MB/s), "
                               "rsync %.1f s (%.0f MB/s, %.0f CPU-s)"
                               % (t_us, mb / t_us, CPU["ours"], t_scp, mb / t_scp, t_rs,
                                  mb / t_rs, cpu_rs))
            # (2) many small files (scp, one round trip per file, only in the first round)
            if r == 0:
                t_scp = scp(c, small, os.path.join(remote, "scp%d" % r, "small"))
            t_rs = rsync(c, small, rs)
            cpu_rs = CPU["rsync"]
            t_us, _, rss_small = ours(conf, data, ["small"], "p1", hc, wd)
            R["2"].append(t_rs / t_us)
            detail["2"].append("ours %.2f s (%.0f CPU-s), rsync %.2f s (%.0f CPU-s)%s"
                               % (t_us, CPU["ours"], t_rs, cpu_rs,
                                  ", scp %.1f s" % t_scp if r == 0 else ""))
            # (3) the same set again, unchanged
            t_rs = rsync(c, small, rs)
            t_cold, sent_c, _ = ours(conf, data, ["small"], "p1", hc, wd)
            t_warm, sent_w, _ = ours(conf, data, ["small"], "p1", hc, wd, warm=True)
            R["3c"].append(t_cold / t_rs)
            R["3w"].append(t_warm / t_rs)
            detail["3c"].append("ours cold %.2f s / warm %.2f s, %d content bytes; rsync %.2f s"
                                % (t_cold, t_warm, sent_c + sent_w, t_rs))
            # (4) 1% of the files changed: one 1% for the cold run, another for the warm one
            for start, warm, key in ((r * 10 + 1, False, "4c"), (r * 10 + 5, True, "4w")):
                touch_one_percent(small, small_n, start)
                t_rs = rsync(c, small, rs)
                t_us, sent, _ = ours(conf, data, ["small"], "p1", hc, wd, warm=warm)
                R[key].append(t_us / t_rs)
                detail[key].append("ours %s %.2f s (%.1f MB sent), rsync %.2f s"
                                   % ("warm" if warm else "cold", t_us, sent / 1e6, t_rs))
        # memory at 10x more (tiny) files
        make_files(os.path.join(data, "tiny"), small_n * 10, 1000)
        _, _, rss_tiny = ours(conf, data, ["tiny"], "p2", os.path.join(a.root, "h.sqlite"),
                              os.path.join(remote, "ours0"))
    finally:
        tb.down()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(os.path.join(a.root, "remote"), ignore_errors=True)
    print("machine: %s, %d cores, Python %s, scale %.2f, %d rounds" % (
        platform.platform(), os.cpu_count(), platform.python_version(), a.scale, a.rounds))
    print("| case | ratio, median [min-max] over rounds | goal |\n|---|---|---|")
    print("| (1) %d files of %.0f MB: ours vs the faster of scp/rsync (speed) | %s | >= 0.9x |"
          % (big_n, big_size / 1e6, spread(R["1"])))
    print("| (2) %d files of 100 kB: ours vs rsync (speed) | %s | >= 1.5x |"
          % (small_n, spread(R["2"])))
    print("| (3) unchanged, cold: ours vs rsync's 2nd run (time) | %s | <= 1x |" % spread(R["3c"]))
    print("| (3) unchanged, warm | %s | <= 1x |" % spread(R["3w"]))
    print("| (4) 1%% changed, cold: ours vs rsync's 2nd run (time) | %s | <= 1x |"
          % spread(R["4c"]))
    print("| (4) 1%% changed, warm | %s | <= 1x |" % spread(R["4w"]))
    print("| peak client memory, %d vs %d files | %.0f MB vs %.0f MB | flat |"
          % (small_n, small_n * 10, rss_small, rss_tiny))
    print("\nper round:")
    for k, lines in detail.items():
        for i, line in enumerate(lines):
            print("  (%s) round %d: %s" % (k, i + 1, line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
