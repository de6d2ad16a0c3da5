#!/usr/bin/env python
"""Staging over long links (issue 13): ours vs rsync, scp and N parallel ``ssh cat``
streams, side by side through the same link model (scipion_cloudexec/testbed/link.py: a TCP
proxy adding one-way delay and a rate limit) in front of the benchmark's own loopback sshd.

  (1) one large file set (4 files or --big-n; 400 MB by default, 2 GB with --full) at RTT
      0, 20, 50, 100, 150 ms and 1 Gbit/s: ours (Stager.stage_in), rsync -a, scp -r, and 4
      `ssh cat` streams
  (2) N `ssh cat` streams over the same set at one RTT (default 100 ms), N = 1, 2, 4, 8, 16:
      what parallel streams can buy (the carrier alone: byte ranges into part files)
  (3) many files of 100 kB (2,000 by default, 10,000 with --full) at 20 ms: ours vs rsync
  (4) the same set again, unchanged: ours (cold: new process and login, the cluster's agent
      up as after any protocol run, so its staging endpoint is reached through a port
      forward; cold with no endpoint: a staging server started by an exec, as before it;
      warm: connection and staging server up, as inside one protocol run) vs rsync's
      second run

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_link.py [--full] [--rounds 3]
        [--rtts 0,20,50,100,150] [--rate-mbit 1000] [--plot docs/bench_link_rtt.png]

Every run goes to a fresh destination (new folder; for ours a new cluster workdir and hash
memo), each (round, RTT) has its own link shared by the contenders, whose order rotates from
round to round; figures are medians of the rounds. Every contender pays its own SSH login(s)
through the link (ours: the paramiko control connection and the OpenSSH bulk stream).
rsync, scp and ssh use the client's default cipher; ours asks for aes128-gcm. Before the
rounds each link setting is calibrated (RTT of 100-byte exchanges, rate of 100 MB one way,
through a fresh proxy to a loopback server). The plot needs matplotlib (installed in the
development venv; not a dependency of the plugin). Starts its own sshd test bed in --root,
stops it, and deletes the data it wrote.
"""
import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_staging import make_files, settle  # noqa: E402

OURS = r"""
import json, sys, time
from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.cluster.ssh import SSHConnection, Target
from scipion_cloudexec.cluster.stager import Stager
a = json.loads(sys.argv[1])
c = ClusterConfig(**a["cluster"])
t0 = time.perf_counter()
ssh = SSHConnection(Target.of(c))
ssh.connect()
st = Stager(ssh, c, hash_cache=a["hashes"])
if not a.get("endpoint", True):
    st.endpoint = None  # as before the endpoint: a staging server started by an exec
if a["warm"]:
    from scipion_cloudexec.remote.stage_protocol import Mirrors
    st._ask(Mirrors())  # logged in and serving
    t0 = time.perf_counter()
r = st.stage_in(a["root"], a["paths"], "bench", keep_hashes=False)
dt = time.perf_counter() - t0
kind = st._chan.kind if st._chan is not None else ""
st.close()
ssh.close()
print(json.dumps({"seconds": dt, "sent": r.bytes_sent, "files": r.files,
                  "streams": st.streams_used, "kind": kind}))
"""


class Bench:
    def __init__(self, a, cluster, data, remote):
        self.a, self.base, self.data, self.remote = a, cluster, data, remote
        self.c = cluster  # through the current link
        self.n = 0

    def fresh(self, kind):
        self.n += 1
        d = os.path.join(self.remote, "%s%04d" % (kind, self.n))
        os.makedirs(d)
        return d

    def ssh_opts(self):
        c = self.c
        return ["-o", "UserKnownHostsFile=%s" % c.known_hosts, "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "GlobalKnownHostsFile=/dev/null",
                "-i", c.identity_file, "-F", "/dev/null"]

    def ssh(self):
        return ["ssh", "-p", str(self.c.port)] + self.ssh_opts() + ["%s@%s" % (self.c.user,
                                                                               self.c.host)]

    # -- contenders: each returns seconds ----------------------------------------------
    def agent_up(self, workdir):
        """Start (or reach) the workdir's agent, as a protocol run does: the desktop then
        knows its staging endpoint, which later processes use."""
        cl = dataclasses.replace(self.c, workdir=workdir)
        fields = {f.name: getattr(cl, f.name) for f in dataclasses.fields(cl)
                  if f.name in ("name", "host", "port", "user", "identity_file", "known_hosts",
                                "workdir", "python", "launcher", "slots", "heartbeat",
                                "connect_timeout")}
        code = ("import json, sys\nfrom scipion_cloudexec.config import ClusterConfig\n"
                "from scipion_cloudexec.cluster.session import ClusterSession\n"
                "with ClusterSession(ClusterConfig(**json.loads(sys.argv[1]))) as s:\n"
                "    s.start()\n")
        subprocess.run([sys.executable, "-c", code, json.dumps(fields)], check=True, cwd=HERE)

    def ours(self, paths, workdir, hashes, warm=False, endpoint=True):
        cl = dataclasses.replace(self.c, workdir=workdir)
        fields = {f.name: getattr(cl, f.name) for f in dataclasses.fields(cl)
                  if f.name in ("name", "host", "port", "user", "identity_file", "known_hosts",
                                "workdir", "python", "launcher", "slots", "heartbeat",
                                "connect_timeout", "transfer")}
        fields["streams"] = self.a.ours_streams
        if self.a.transfer:
            fields["transfer"] = self.a.transfer
        arg = json.dumps({"cluster": fields, "hashes": hashes, "warm": warm,
                          "root": self.data, "paths": paths, "endpoint": endpoint})
        settle()
        out = subprocess.run([sys.executable, "-c", OURS, arg], capture_output=True, text=True,
                             cwd=HERE)
        if out.returncode:
            raise RuntimeError("ours failed: %s" % out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        self.last_sent = r["sent"]
        self.last_streams = r.get("streams", 0)
        self.last_kind = r.get("kind", "")
        return r["seconds"]

    def timed(self, argv, **kw):
        settle()
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
        return time.perf_counter() - t0

    def rsync(self, src, dest):
        e = " ".join(self.ssh()[:-1])
        return self.timed(["rsync", "-a", "-e", e, src,
                           "%s@%s:%s/" % (self.c.user, self.c.host, dest)])

    def scp(self, src, dest):
        return self.timed(["scp", "-q", "-r", "-P", str(self.c.port)] + self.ssh_opts() +
                          [src, "%s@%s:%s/" % (self.c.user, self.c.host, dest)])

    def cat_streams(self, files, n, dest):
        """The set's bytes cut into *n* contiguous ranges, each sent by its own `ssh cat`
        into a part file: the carrier alone, what parallel streams can move."""
        total = sum(os.path.getsize(f) for f in files)
        per = -(-total // n)
        ranges = [[] for _ in range(n)]  # per stream: (file, offset, count)
        pos = 0
        for f in files:
            size, off = os.path.getsize(f), 0
            while off < size:
                k = pos // per
                take = min(size - off, (k + 1) * per - pos)
                ranges[k].append((f, off, take))
                off += take
                pos += take
        settle()
        t0 = time.perf_counter()
        procs = [subprocess.Popen(self.ssh() + ["cat > %s/part%02d" % (dest, k)],
                                  stdin=subprocess.PIPE) for k in range(n)]
        errors = []

        def feed(p, parts):
            try:
                for f, off, count in parts:
                    with open(f, "rb") as fh:
                        while count:
                            sent = os.sendfile(p.stdin.fileno(), fh.fileno(), off, count)
                            off += sent
                            count -= sent
                p.stdin.close()
            except OSError as e:
                errors.append(e)
        threads = [threading.Thread(target=feed, args=(p, r)) for p, r in zip(procs, ranges)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = [p.wait() for p in procs]
        dt = time.perf_counter() - t0
        got = sum(os.path.getsize(os.path.join(dest, x)) for x in os.listdir(dest))
        if errors or any(codes) or got != total:
            raise RuntimeError("ssh cat x%d: exit %s, %s, %d of %d bytes" % (n, codes, errors,
                                                                             got, total))
        return dt


def rm(folder):
    """Delete a destination; the cluster's staging server may still be exiting (its
    sqlite files go away under us): try again."""
    for _ in range(20):
        try:
            shutil.rmtree(folder)
            return
        except FileNotFoundError:
            continue
        except OSError:
            time.sleep(0.1)
    shutil.rmtree(folder, ignore_errors=True)


def tree_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def med(values):
    return statistics.median(values) if values else float("nan")


def plot(path, rtts, speed, rate_mb, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    styles = {"ours": ("o-", "C0"), "rsync": ("s-", "C1"), "scp": ("^-", "C2"),
              "ssh cat x4": ("d--", "C7")}
    for name, (marker, color) in styles.items():
        if name in speed:
            ax.plot(rtts, [speed[name][r] for r in rtts], marker, color=color, label=name)
    ax.axhline(rate_mb, color="k", lw=0.6, ls=":", label="link rate")
    ax.set_xlabel("round-trip time (ms), link model at %.0f MB/s" % rate_mb)
    ax.set_ylabel("throughput (MB/s), median")
    ax.set_xticks(rtts)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/cloudexec-bench-link")
    p.add_argument("--full", action="store_true",
                   help="the issue's sizes: 2 GB in 4 files, 10,000 small files")
    p.add_argument("--big-mb", type=float, help="size of each large file (MB)")
    p.add_argument("--big-n", type=int, default=4, help="number of large files")
    p.add_argument("--small", type=int, help="number of 100 kB files")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rtts", default="0,20,50,100,150")
    p.add_argument("--rate-mbit", type=float, default=1000.0)
    p.add_argument("--streams", default="1,2,4,8,16", help="stream counts for (2); '' skips")
    p.add_argument("--streams-rtt", type=float, default=100.0)
    p.add_argument("--small-rtt", type=float, default=20.0)
    p.add_argument("--plot", default=os.path.join(HERE, "..", "docs", "bench_link_rtt.png"))
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--contenders", default="ours,rsync,scp,ssh cat x4",
                   help="which run in (1), comma-separated (ours and rsync at least)")
    p.add_argument("--no-small", action="store_true", help="skip (3) and (4)")
    p.add_argument("--small-only", action="store_true", help="only (3) and (4)")
    p.add_argument("--bundle-ready", action="store_true",
                   help="(3) also for ours on a new workdir that has the agent bundle already "
                        "(as after ClusterSession.start, which uploads it before any staging)")
    p.add_argument("--agent-up", action="store_true",
                   help="(3) also for ours on a new workdir whose agent runs and is known (as "
                        "inside a protocol run): through the staging endpoint, streams by ssh -W")
    p.add_argument("--ours-streams", default="auto", help="the cluster key streams for ours")
    p.add_argument("--transfer", default="", help="the cluster key transfer for ours "
                   "(auto, openssh, paramiko)")
    a = p.parse_args()
    big_mb = a.big_mb or (500.0 if a.full else 100.0)
    small_n = a.small or (10000 if a.full else 2000)
    rtts = [] if a.small_only else [float(x) for x in a.rtts.split(",") if x]
    streams = [] if a.small_only else [int(x) for x in a.streams.split(",") if x]
    rate_mb = a.rate_mbit / 8

    from scipion_cloudexec.config import load_clusters
    from scipion_cloudexec.testbed import LocalTestbed
    from scipion_cloudexec.testbed.link import Link, calibrate
    tb = LocalTestbed(a.root)
    # the desktop's hash memos and known endpoints: the benchmark's own, not ~/.cache
    os.environ["XDG_CACHE_HOME"] = os.path.join(a.root, "desktop-cache")
    data = os.path.join(a.root, "data")
    remote = os.path.join(a.root, "remote")
    T = {}  # (case, contender, rtt) -> [seconds per round]
    proxy_cpu = []

    def note(case, who, rtt, seconds):
        T.setdefault((case, who, rtt), []).append(seconds)
        print("  %-6s %-12s rtt %5.0f ms  %7.2f s" % (case, who, rtt, seconds), flush=True)

    started = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))  # clean up
    try:
        conf = tb.up(slurm=False)
        base = load_clusters(conf)["local"]
        shutil.rmtree(remote, ignore_errors=True)
        os.makedirs(remote)
        big = os.path.join(data, "big")
        small = os.path.join(data, "small")
        if a.small_only:
            os.makedirs(big, exist_ok=True)
        elif not os.path.isdir(big) or len(os.listdir(big)) != a.big_n or \
                os.path.getsize(os.path.join(big, "f000000.mrc")) != int(big_mb * 1e6):
            shutil.rmtree(big, ignore_errors=True)
            make_files(big, a.big_n, int(big_mb * 1e6))
        if not os.path.isdir(small) or len(os.listdir(small)) != small_n:
            shutil.rmtree(small, ignore_errors=True)
            make_files(small, small_n, 100_000)
        big_files = sorted(os.path.join(big, f) for f in os.listdir(big))
        big_bytes = sum(map(os.path.getsize, big_files))
        small_bytes = tree_bytes(small)
        neg = subprocess.run(["ssh", "-v", "-p", str(base.port), "-o",
                              "UserKnownHostsFile=%s" % base.known_hosts, "-o", "BatchMode=yes",
                              "-i", base.identity_file, "-F", "/dev/null",
                              "%s@%s" % (base.user, base.host), "true"],
                             capture_output=True, text=True).stderr
        cipher = [x.split("cipher: ")[1].split()[0] for x in neg.splitlines()
                  if "server->client cipher" in x][:1]
        print("data: %d x %.0f MB, %d x 100 kB; rounds %d; link rate %.0f Mbit/s; default "
              "cipher %s" % (a.big_n, big_mb, small_n, a.rounds, a.rate_mbit, cipher),
              flush=True)

        cal = {}
        for rtt in sorted(set(rtts + [a.small_rtt] + ([a.streams_rtt] if streams else []))):
            cal[rtt] = calibrate(rtt / 2, a.rate_mbit)
            print("calibration rtt %5.0f ms: measured rtt %.1f ms, rate %.0f Mbit/s"
                  % (rtt, cal[rtt]["rtt_ms"], cal[rtt]["rate_mbit"]), flush=True)

        B = Bench(a, base, data, remote)
        for r in range(a.rounds):
            print("round %d" % (r + 1), flush=True)
            for rtt in rtts:
                with Link((base.host, base.port), delay_ms=rtt / 2, rate_mbit=a.rate_mbit) as ln:
                    B.c = ln.cluster(base)
                    cpu0 = ln.cpu_seconds()
                    t_case = time.perf_counter()

                    def run_ours():
                        wd = B.fresh("ours")
                        s = B.ours(["big"], wd, os.path.join(wd, "hashes.sqlite"))
                        assert B.last_sent == big_bytes, B.last_sent
                        rm(wd)
                        note("big", "ours", rtt, s)
                        print("         ours ended with %d streams" % B.last_streams, flush=True)

                    def run_tool(name):
                        d = B.fresh(name)
                        s = (B.rsync if name == "rsync" else B.scp)(big, d)
                        assert tree_bytes(d) == big_bytes, name
                        rm(d)
                        note("big", name, rtt, s)

                    def run_cat():
                        d = B.fresh("cat")
                        note("big", "ssh cat x4", rtt, B.cat_streams(big_files, 4, d))
                        rm(d)
                    every = {"ours": run_ours, "rsync": lambda: run_tool("rsync"),
                             "scp": lambda: run_tool("scp"), "ssh cat x4": run_cat}
                    order = [every[w] for w in a.contenders.split(",")]
                    k = r % len(order)
                    for fn in order[k:] + order[:k]:
                        fn()
                    proxy_cpu.append((ln.cpu_seconds() - cpu0,
                                      time.perf_counter() - t_case, 4 * big_bytes))

            if streams:
                rtt = a.streams_rtt
                with Link((base.host, base.port), delay_ms=rtt / 2, rate_mbit=a.rate_mbit) as ln:
                    B.c = ln.cluster(base)
                    order = streams[r % len(streams):] + streams[:r % len(streams)]
                    for n in order:
                        d = B.fresh("streams")
                        note("streams", "x%d" % n, rtt, B.cat_streams(big_files, n, d))
                        rm(d)

            if a.no_small:
                continue
            rtt = a.small_rtt
            with Link((base.host, base.port), delay_ms=rtt / 2, rate_mbit=a.rate_mbit) as ln:
                B.c = ln.cluster(base)
                wd = B.fresh("ours-small")
                hashes = os.path.join(wd, "hashes.sqlite")
                rs = B.fresh("rsync-small")

                def ours_bundle_ready():
                    from scipion_cloudexec.cluster import bundle
                    wd2 = B.fresh("ours-ready")
                    zpath = bundle.remote_path(dataclasses.replace(base, workdir=wd2))
                    os.makedirs(os.path.dirname(zpath), mode=0o700)
                    with open(zpath, "wb") as f:
                        f.write(bundle.build()[0])
                    s = B.ours(["small"], wd2, os.path.join(wd2, "hashes.sqlite"))
                    assert B.last_sent == small_bytes, B.last_sent
                    rm(wd2)
                    return s
                pairs = [("ours", lambda: B.ours(["small"], wd, hashes)),
                         ("rsync", lambda: B.rsync(small, rs))]
                if a.bundle_ready:
                    pairs.append(("ours, bundle there", lambda: ours_bundle_ready()))

                def ours_agent_up():
                    wd3 = B.fresh("ours-agent")
                    B.agent_up(wd3)  # as in a protocol run: the session starts first
                    s = B.ours(["small"], wd3, os.path.join(wd3, "hashes.sqlite"))
                    assert B.last_sent == small_bytes and B.last_kind == "endpoint", (
                        B.last_sent, B.last_kind)
                    return s
                if a.agent_up:
                    pairs.append(("ours, agent up", ours_agent_up))
                k = r % len(pairs)
                for who, fn in pairs[k:] + pairs[:k]:
                    note("small", who, rtt, fn())
                assert tree_bytes(os.path.join(rs, "small")) == small_bytes
                B.agent_up(wd)  # as after any protocol run on this cluster
                again = [("ours cold", lambda: B.ours(["small"], wd, hashes)),
                         ("ours cold, no endpoint",
                          lambda: B.ours(["small"], wd, hashes, endpoint=False)),
                         ("ours warm", lambda: B.ours(["small"], wd, hashes, warm=True)),
                         ("rsync", lambda: B.rsync(small, rs))]
                k = r % len(again)
                for who, fn in again[k:] + again[:k]:
                    note("again", who, rtt, fn())
                    if who.startswith("ours"):
                        assert B.last_sent == 0, B.last_sent
                        want = "paramiko" if "no endpoint" in who else "endpoint"
                        assert B.last_kind == want, (who, B.last_kind)
    finally:
        tb.down()
        shutil.rmtree(remote, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(os.environ["XDG_CACHE_HOME"], ignore_errors=True)

    # ---- report ---------------------------------------------------------------------------
    print("\nmachine: %s, %d cores, Python %s; %d rounds, %.0f min"
          % (platform.platform(), os.cpu_count(), platform.python_version(), a.rounds,
             (time.time() - started) / 60))
    print("calibration (per RTT setting: measured RTT, rate): " + ", ".join(
        "%g ms: %.1f ms %.0f Mbit/s" % (k, v["rtt_ms"], v["rate_mbit"]) for k, v in cal.items()))
    if proxy_cpu:
        cpu, wall, nbytes = map(sum, zip(*proxy_cpu))
        print("proxy CPU during (1): %.0f s over %.0f s (%.0f%% of one core), %.2f s per GB"
              % (cpu, wall, 100 * cpu / wall, cpu / (nbytes / 1e9)))
    mb = big_bytes / 1e6
    who_big = a.contenders.split(",") if rtts else []
    speed = {w: {rtt: mb / med(T[("big", w, rtt)]) for rtt in rtts} for w in who_big}
    if rtts:
        print("\n(1) %d files, %.0f MB in all, %.0f Mbit/s: MB/s, median of %d [min-max seconds]"
              % (a.big_n, mb, a.rate_mbit, a.rounds))
        cat = "ssh cat x4" in who_big
        print("| RTT | " + " | ".join(who_big) + " | ours / rsync |" + (" ssh cat x4 / rsync |"
                                                                       if cat else ""))
        print("|---" * (len(who_big) + 2 + cat) + "|")
        for rtt in rtts:
            cells = []
            for w in who_big:
                v = T[("big", w, rtt)]
                cells.append("%.0f [%.1f-%.1f s]" % (speed[w][rtt], min(v), max(v)))
            print("| %g ms | %s | %.2fx |" % (
                rtt, " | ".join(cells), speed["ours"][rtt] / speed["rsync"][rtt])
                + (" %.2fx |" % (speed["ssh cat x4"][rtt] / speed["rsync"][rtt]) if cat else ""))
    if streams:
        print("\n(2) N `ssh cat` streams, same set, RTT %g ms: MB/s, median of %d"
              % (a.streams_rtt, a.rounds))
        print("| N | " + " | ".join(str(n) for n in streams) + " |")
        print("|---" * (len(streams) + 1) + "|")
        print("| MB/s | " + " | ".join(
            "%.0f" % (mb / med(T[("streams", "x%d" % n, a.streams_rtt)])) for n in streams) + " |")
    if a.plot and rtts:
        try:
            plot(a.plot, rtts, speed, rate_mb, "%d files, %.0f MB, %.0f Mbit/s link model, "
                 "median of %d (benchmarks/bench_link.py)" % (a.big_n, mb, a.rate_mbit, a.rounds))
            print("plot: %s" % os.path.abspath(a.plot))
        except ImportError:
            print("no plot: matplotlib is not installed in this venv")
    if a.no_small:
        return 0
    smb = small_bytes / 1e6
    t_o, t_r = med(T[("small", "ours", a.small_rtt)]), med(T[("small", "rsync", a.small_rtt)])
    print("\n(3) %d files of 100 kB, RTT %g ms: ours %.2f s (%.0f MB/s), rsync %.2f s (%.0f MB/s):"
          " ours %.2fx rsync's speed; per round ours %s, rsync %s"
          % (small_n, a.small_rtt, t_o, smb / t_o, t_r, smb / t_r, t_r / t_o,
             T[("small", "ours", a.small_rtt)], T[("small", "rsync", a.small_rtt)]))
    if a.bundle_ready:
        t_b = med(T[("small", "ours, bundle there", a.small_rtt)])
        print("(3b) ours on a workdir with the bundle already there: %.2f s (%.0f MB/s): %.2fx "
              "rsync's speed; per round %s" % (t_b, smb / t_b, t_r / t_b,
                                              T[("small", "ours, bundle there", a.small_rtt)]))
    if a.agent_up:
        t_u = med(T[("small", "ours, agent up", a.small_rtt)])
        print("(3c) ours on a new workdir whose agent runs and is known (staging endpoint, "
              "streams by ssh -W): %.2f s (%.0f MB/s): %.2fx rsync's speed; per round %s"
              % (t_u, smb / t_u, t_r / t_u, T[("small", "ours, agent up", a.small_rtt)]))
    g = {w: med(T[("again", w, a.small_rtt)])
         for w in ("ours cold", "ours cold, no endpoint", "ours warm", "rsync")}
    print("(4) unchanged: ours cold (through the agent's staging endpoint) %.2f s (%.2fx "
          "rsync), cold with no endpoint (a server started by an exec) %.2f s (%.2fx), warm "
          "%.2f s (%.2fx), rsync 2nd run %.2f s; per round %s" % (
              g["ours cold"], g["ours cold"] / g["rsync"], g["ours cold, no endpoint"],
              g["ours cold, no endpoint"] / g["rsync"], g["ours warm"],
              g["ours warm"] / g["rsync"], g["rsync"],
              {w: T[("again", w, a.small_rtt)] for w in g}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "calibration": cal,
                       "times": {"|".join(map(str, k)): v for k, v in T.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
