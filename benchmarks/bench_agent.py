#!/usr/bin/env python
"""Agent benchmarks (issue 2), measured side by side in one run on the loopback sshd.

  (a) ping through the agent vs a bare ZeroMQ echo through the same SSH tunnel
  (b) a no-op job (``true``, local launcher) through a warm agent vs ``ssh host true``
  (c) throughput of 1,000 no-op jobs through a warm agent

    .venv/bin/python benchmarks/bench_agent.py [--root /tmp/cloudexec-bench] [--jobs 1000]

Starts its own test bed (sshd only) and stops it, with every process it started.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import zmq

from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.config import load_clusters
from scipion_cloudexec.testbed import LocalTestbed

ECHO = """
import os, sys, threading, zmq
# ends when its SSH channel closes (stdin at EOF): closing a channel kills nothing by itself
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
s = zmq.Context().socket(zmq.ROUTER)
port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""


def med_us(samples):
    return statistics.median(samples) * 1e6


def bench_ping_vs_echo(client, py, n, rounds=10):
    """Interleaved rounds of agent pings and bare echoes, so drift hits both alike."""
    chan = client.ssh.transport.open_session()
    chan.exec_command("exec %s -c '%s'" % (py, ECHO.replace("'", "'\\''")))
    port = int(chan.makefile("r").readline())
    fwd = client.ssh.forward(port)  # the same SSH connection and forwarder the agent uses
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fwd.address)
    payload = b"x" * 200  # about the size of an authenticated ping
    pings, echoes = [], []
    for r in range(rounds + 1):
        batch_p, batch_e = [], []
        for _ in range(n // rounds):
            t0 = time.perf_counter()
            client.ping()
            batch_p.append(time.perf_counter() - t0)
        for _ in range(n // rounds):
            t0 = time.perf_counter()
            sock.send(payload)
            sock.recv()
            batch_e.append(time.perf_counter() - t0)
        if r:  # round 0 warms both up
            pings += batch_p
            echoes += batch_e
    sock.close()
    fwd.close()
    chan.shutdown_write()  # EOF on the echo server's stdin: it exits
    chan.close()
    return pings, echoes


def bench_noop_job(client, n):
    for _ in range(10):
        client.submit(["true"], launcher="local").result()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.submit(["true"], launcher="local").result()
        samples.append(time.perf_counter() - t0)
    return samples


def bench_ssh_true(cluster, n):
    argv = ["ssh", "-p", str(cluster.port), "-i", cluster.identity_file, "-o",
            "UserKnownHostsFile=%s" % cluster.known_hosts, "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "%s@%s" % (cluster.user, cluster.host), "true"]
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
        samples.append(time.perf_counter() - t0)
    return samples


def bench_throughput(client, jobs):
    t0 = time.perf_counter()
    futs = [client.submit(["true"], launcher="local") for _ in range(jobs)]
    for f in futs:
        f.result()
    return jobs / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/cloudexec-bench")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--n", type=int, default=2000, help="samples for (a)")
    a = p.parse_args()
    tb = LocalTestbed(a.root)
    try:
        cluster = load_clusters(tb.up(slurm=False))["local"]
        with ClusterSession(cluster) as client:
            ping, echo = bench_ping_vs_echo(client, cluster.python, a.n)
            job = bench_noop_job(client, 100)
            ssh = bench_ssh_true(cluster, 20)
            rate = bench_throughput(client, a.jobs)
            rate2 = bench_throughput(client, a.jobs)
    finally:
        tb.down()
    print("machine: %s, %d cores, Python %s" % (platform.platform(), os.cpu_count(),
                                                platform.python_version()))
    print("| benchmark | ours | baseline | ratio | goal |")
    print("|---|---|---|---|---|")
    print("| (a) ping round trip, median | %.0f us (agent) | %.0f us (bare ZMQ echo, same tunnel) "
          "| %.2fx | within 2x |" % (med_us(ping), med_us(echo), med_us(ping) / med_us(echo)))
    print("| (b) no-op job, median | %.2f ms (warm agent) | %.1f ms (`ssh host true`) | %.1fx faster "
          "| >= 10x |" % (med_us(job) / 1e3, med_us(ssh) / 1e3, med_us(ssh) / med_us(job)))
    print("| (c) %d no-op jobs | %.0f jobs/s (second run %.0f jobs/s) | - | - | >= 200 jobs/s |"
          % (a.jobs, rate, rate2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
