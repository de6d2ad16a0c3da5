#!/usr/bin/env python
"""Several clusters (issue 5): makespan of 200 equal sleep jobs over three clusters with
1/2/4 slots, the 2-slot one behind a slow link, vs the ideal (total work / total capacity)
and vs sending everything to the biggest cluster; then the same with the slow cluster's
link cut at half time.

    .venv/bin/python benchmarks/bench_multicluster.py [--jobs 200] [--seconds 0.5] [--delay 0.05]

The "clusters" are three agents behind the loopback sshd; the slow link is a delaying TCP
proxy on 127.0.0.1 in front of sshd (this kernel has no netem); cutting the link closes the
proxy and its connections. Everything started here is stopped at the end.
"""
import argparse
import os
import platform
import queue
import shutil
import socket
import sys
import threading
import time
from dataclasses import replace

from scipion_cloudexec.cluster.errors import AgentLost, JobLost

from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.config import load_clusters
from scipion_cloudexec.scheduling.dispatcher import MultiClusterDispatcher
from scipion_cloudexec.scheduling.policy import JobRequest
from scipion_cloudexec.testbed import LocalTestbed
from scipion_cloudexec.cluster.ssh import SSHError


class DelayProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, each chunk held *delay* seconds."""

    def __init__(self, target: int, delay: float):
        self.target, self.delay = target, delay
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.conns = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self):
        """The link goes down: no new connection, existing ones dropped."""
        self.closed = True
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


def makespan(clusters, jobs, seconds, cut_at=None, proxy=None):
    """Run *jobs* sleeps through the dispatcher; returns (seconds, jobs per cluster, at cut)."""
    clients = {c.name: ClusterSession(c) for c in clusters}
    for cl in clients.values():
        cl.start()
    d = MultiClusterDispatcher([(c.name, c.slots, ()) for c in clusters], retries=3,
                               down_for=3600)
    todo = queue.Queue()
    for i in range(jobs):
        todo.put(i)
    counts = {c.name: 0 for c in clusters}
    lock = threading.Lock()
    done_at_cut = []

    def work(name, attempt):
        clients[name].submit(["sleep", str(seconds)], launcher="local").result()
        with lock:
            counts[name] += 1

    def worker():
        while True:
            try:
                todo.get_nowait()
            except queue.Empty:
                return
            d.run(JobRequest(), work, lambda e: isinstance(e, (AgentLost, JobLost, SSHError,
                                                                EOFError, ConnectionError)))
    threads = [threading.Thread(target=worker) for _ in range(sum(c.slots for c in clusters))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if cut_at is not None:
        time.sleep(cut_at)
        with lock:
            done_at_cut.append(sum(counts.values()))
        proxy.cut()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for cl in clients.values():
        try:
            cl.close()
        except Exception:
            pass
    return dt, counts, (done_at_cut[0] if done_at_cut else None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/cloudexec-bench-multi")
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--delay", type=float, default=0.05, help="slow link: seconds per chunk")
    a = p.parse_args()
    tb = LocalTestbed(a.root)
    rows = []
    try:
        base = load_clusters(tb.up(slurm=False))["local"]
        proxy = DelayProxy(base.port, a.delay)
        mk = lambda name, slots, port: replace(base, name=name, slots=slots, port=port,
                                               workdir=os.path.join(a.root, "remote", name))
        # the proxy is another address for the same sshd: same host key under its own port
        kh = os.path.join(a.root, "known_hosts_all")
        with open(base.known_hosts) as f:
            line = f.read().split(" ", 1)[1]
        with open(kh, "w") as f:
            f.write("[127.0.0.1]:%d %s[127.0.0.1]:%d %s" % (base.port, line, proxy.port, line))
        c1 = replace(mk("one", 1, base.port), known_hosts=kh)
        c2 = replace(mk("two-slow", 2, proxy.port), known_hosts=kh)
        c4 = replace(mk("four", 4, base.port), known_hosts=kh)
        work = a.jobs * a.seconds
        ideal = work / 7
        t_all, counts, _ = makespan([c1, c2, c4], a.jobs, a.seconds)
        t_big, _, _ = makespan([c4], a.jobs, a.seconds)
        rows.append(("%d x sleep %.1f s over 1/2/4 slots (2-slot cluster behind a %.0f ms/chunk "
                     "link)" % (a.jobs, a.seconds, a.delay * 1000), "%.1f s; jobs per cluster %s"
                     % (t_all, counts), "ideal %.1f s; all to the biggest %.1f s (measured)"
                     % (ideal, t_big), "%.2fx ideal; %.2fx faster than biggest only"
                     % (t_all / ideal, t_big / t_all), "within 15% of ideal"))
        t_cut, counts2, done = makespan([c1, c2, c4], a.jobs, a.seconds, cut_at=t_all / 2,
                                        proxy=proxy)
        ideal_rest = t_all / 2 + (a.jobs - done) * a.seconds / 5
        rows.append(("same, slow cluster's link cut at %.1f s (%d jobs done then)"
                     % (t_all / 2, done), "%.1f s; jobs per cluster %s" % (t_cut, counts2),
                     "ideal for what remains %.1f s" % ideal_rest,
                     "%.2fx that ideal" % (t_cut / ideal_rest), "within 30%"))
    finally:
        tb.down()
        shutil.rmtree(a.root, ignore_errors=True)
    print("machine: %s, %d cores, Python %s" % (platform.platform(), os.cpu_count(),
                                                platform.python_version()))
    print("| benchmark | ours | baseline | ratio | goal |\n|---|---|---|---|---|")
    for r in rows:
        print("| %s |" % " | ".join(r))


if __name__ == "__main__":
    sys.exit(main())
