"""``scipion-cloudexec``: check clusters, run and follow jobs, from a terminal.

    scipion-cloudexec [--config FILE] check NAME
    scipion-cloudexec [--config FILE] run NAME [--np N] [--threads T] [--gpus LIST] -- CMD ARGS...
    scipion-cloudexec [--config FILE] jobs NAME
    scipion-cloudexec [--config FILE] attach NAME JOB_ID
    scipion-cloudexec [--config FILE] cancel NAME JOB_ID
    scipion-cloudexec [--config FILE] agent NAME [--stop]
    scipion-cloudexec [--config FILE] stage NAME PATH... [--project-root DIR]
    scipion-cloudexec [--config FILE] fetch NAME REMOTE_PATH... --to DIR
    scipion-cloudexec [--config FILE] cache NAME [--gc]
    scipion-cloudexec [--config FILE] status [NAME...]
    scipion-cloudexec provenance RUN_DIR [--json] [-v]
    scipion-cloudexec [--config FILE] hostsconf [--write [HOSTS_CONF]] [--host NAME]
    scipion-cloudexec demo [--root DIR] [--keep]
    scipion-cloudexec testbed up|down|status [--root DIR]

Exit codes: ``run``/``attach`` exit with the job's own code; 2 for a wrong
command line or clusters file; 255 when the cluster or its agent cannot be reached.

Over 400 lines: one short function per command and the parser that lists them all; each
talks to a cluster only through :class:`~.cluster.session.ClusterSession`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
from typing import Iterator, List, Optional

from .config import LAUNCHERS, ClusterConfig, ConfigError, load_clusters
from .version import __version__

EXIT_CONFIG = 2
EXIT_UNREACHABLE = 255
EXIT_CANCELLED = 130


def _client(cluster: ClusterConfig):
    from .cluster.session import ClusterSession
    return ClusterSession(cluster)


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _write(stream: str, data: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


def _gpus(text: str) -> List[int]:
    try:
        return [int(g) for g in text.replace(" ", "").split(",") if g]
    except ValueError:
        raise argparse.ArgumentTypeError("GPU list like 0,1 expected, got %r" % text) from None


# ---- commands ---------------------------------------------------------------------------

def _capture(client, argv: List[str], timeout: float = 300, **kw):
    """Run a job, return (ok, stdout text, error text)."""
    from .cluster.errors import JobError
    out = bytearray()
    fut = client.submit(argv, label="check", on_output=lambda stream, data: out.extend(
        data if stream == "stdout" else b""), **kw)
    try:
        fut.result(timeout)
        return True, out.decode(errors="replace"), ""
    except JobError as e:
        lines = e.result.stderr_tail.strip().splitlines() or [str(e).splitlines()[0]]
        return False, out.decode(errors="replace"), lines[-1]


def cmd_check(cluster: ClusterConfig, args) -> int:
    """Connect, start the agent, probe the cluster, run a 2-rank mpi4py job (launcher
    local: 2 plain processes, said as such)."""
    from .cluster.ssh import fingerprint
    print("cluster %s: %s (launcher %s, %d slots)"
          % (cluster.name, cluster.address, cluster.launcher, cluster.slots))
    t0 = time.monotonic()
    with _client(cluster) as client:
        key = client.ssh.transport.get_remote_server_key()  # type: ignore[union-attr]
        print("  ssh        ok    host key %s verified; key auth as %s (%.2f s)"
              % (fingerprint(key), cluster.user, time.monotonic() - t0))
        w = client.welcome
        print("  agent      ok    version %s, pid %d on %s, %d active job(s)"
              % (w.version, w.pid, w.host, w.active_jobs))
        print("  python     ok    %s (%s)" % (w.python, cluster.python))
        if client.provisioned:
            print("  pyzmq      ok    %s" % client.provisioned)
        print("  workdir    ok    %s, %.1f GB free" % (w.workdir, w.disk_free / 1e9))
        ok = True
        probes = [
            ("OpenMPI", 'v=$(%s --version 2>&1) || { echo "$v" >&2; exit 1; }; '
                        'echo "$v" | head -n 1' % shlex.quote(cluster.mpirun[0]),
             cluster.launcher == "mpirun"),
            ("SLURM", "sinfo --version", cluster.launcher == "slurm"),
            ("mpi4py", "%s -c 'import mpi4py; print(\"mpi4py\", mpi4py.__version__)'"
             % cluster.python, cluster.launcher != "local"),
        ]
        for label, shell, required in probes:
            good, out, err = _capture(client, ["/bin/sh", "-c", shell], 60, launcher="local")
            text = (out.strip().splitlines() or [""])[0] if good else err
            print("  %-10s %s %s" % (label, "ok   " if good else "FAIL " if required else "--   ",
                                     text))
            ok &= good or not required
        t1 = time.monotonic()
        if cluster.launcher == "local":  # plain processes, no MPI: say so
            code = ("import os, socket; "
                    "print('process %d on %s' % (os.getpid(), socket.gethostname()))")
            good, out, err = _capture(client, [cluster.python, "-c", code], ranks=2)
            procs = sorted(ln for ln in out.splitlines() if ln.startswith("process"))
            good = good and len(procs) == 2
            print("  processes  %s 2 single processes through launcher local (it starts plain "
                  "processes, not an MPI job): %s (%.2f s)"
                  % ("ok   " if good else "FAIL ", "; ".join(procs) or err,
                     time.monotonic() - t1))
        else:
            code = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
                    "print('rank %d/%d on %s' % (c.rank, c.size, MPI.Get_processor_name()))")
            good, out, err = _capture(client, [cluster.python, "-c", code], ranks=2)
            ranks = sorted(ln for ln in out.splitlines() if ln.startswith("rank"))
            good = good and len(ranks) == 2 and all("/2 " in ln for ln in ranks)
            print("  MPI job    %s 2 ranks through %s: %s (%.2f s)"
                  % ("ok   " if good else "FAIL ", cluster.launcher, "; ".join(ranks) or err,
                     time.monotonic() - t1))
        ok &= good
    print("%s: %s" % (cluster.name, "ready" if ok else "NOT ready (see FAIL above)"))
    return 0 if ok else 1


def cmd_run(cluster: ClusterConfig, args) -> int:
    if not args.command:
        _say("scipion-cloudexec run: give the command after --, e.g. run %s -- hostname"
             % cluster.name)
        return EXIT_CONFIG
    with _client(cluster) as client:
        fut = client.submit(args.command, ranks=args.np, threads=args.threads, gpus=args.gpus,
                            job_id=args.job_id, launcher=args.launcher, cwd=args.cwd,
                            on_output=_write)
        if not args.quiet:
            _say("cloudexec: job %s on %s (follow again: scipion-cloudexec attach %s %s)"
                 % (fut.job_id, cluster.name, cluster.name, fut.job_id))
        return _wait(client, fut, args.quiet)


def _wait(client, fut, quiet: bool) -> int:
    from .cluster.errors import JobCancelled, JobError
    try:
        result = fut.result()
        return result.exit_code or 0
    except KeyboardInterrupt:
        _say("cloudexec: interrupted: cancelling job %s" % fut.job_id)
        client.cancel(fut.job_id)
        return EXIT_CANCELLED
    except JobCancelled:
        _say("cloudexec: job %s was cancelled" % fut.job_id)
        return EXIT_CANCELLED
    except JobError as e:
        r = e.result
        if not quiet or r.exit_code is None:
            _say("cloudexec: job %s %s%s%s" % (r.job_id, r.state.value,
                                               "" if r.exit_code is None else
                                               " with exit code %d" % r.exit_code,
                                               " (%s)" % r.reason if r.reason else ""))
        return r.exit_code if r.exit_code is not None else EXIT_UNREACHABLE


def cmd_attach(cluster: ClusterConfig, args) -> int:
    with _client(cluster) as client:
        return _wait(client, client.attach(args.job_id, on_output=_write), quiet=False)


def cmd_jobs(cluster: ClusterConfig, args) -> int:
    with _client(cluster) as client:
        rows = client.jobs(args.limit)
    print("%-28s %-10s %5s %-16s %-19s %s" % ("JOB", "STATE", "EXIT", "LAUNCHER ID", "SUBMITTED",
                                             "LABEL"))
    for r in rows:
        print("%-28s %-10s %5s %-16s %-19s %s" % (
            r["job_id"], r["state"], "-" if r["exit_code"] is None else r["exit_code"],
            r["launcher_id"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["submitted"])),
            r["label"]))
    return 0


def cmd_cancel(cluster: ClusterConfig, args) -> int:
    from .runrecords import find_run_dir, note_cancel
    with _client(cluster) as client:
        state = client.cancel(args.job_id)
        # Scipion's Stop runs this in the project folder: the run's log and provenance say so
        run_dir = find_run_dir(args.job_id)
        row = next((r for r in client.jobs(1000) if r["job_id"] == args.job_id), None) \
            if run_dir else None
    print("cancel sent to job %s (was %s)" % (args.job_id, state))
    if run_dir:
        note_cancel(run_dir, args.job_id, cluster.name, state, row)
    return 0


def cmd_agent(cluster: ClusterConfig, args) -> int:
    with _client(cluster) as client:
        w = client.welcome
        print("agent %s pid %d on %s: %d active job(s), workdir %s"
              % (w.version, w.pid, w.host, w.active_jobs, w.workdir))
        if args.stop:
            ok = client.shutdown_agent(only_if_idle=not args.force)
            print("agent stopping" if ok else "agent NOT stopped: jobs still active (--force "
                                              "stops it anyway; jobs keep running)")
            return 0 if ok else 1
    return 0


def cmd_demo(args) -> int:
    from .testbed import LocalTestbed
    root = os.path.abspath(args.root)
    _say("### starting the local test bed in %s (loopback sshd, OpenMPI, SLURM)" % root)
    tb = LocalTestbed(root)
    try:
        clusters_file = tb.up(slurm=tb.slurm_available())
        clusters = load_clusters(clusters_file)
        _say("### clusters file %s: %s" % (clusters_file, ", ".join(clusters)))
        code = 0
        for name in ("mpi", "slurm"):
            if name not in clusters:
                continue
            _say("\n### scipion-cloudexec --config %s check %s" % (clusters_file, name))
            code |= cmd_check(clusters[name], args)
            demo = ("from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD; "
                    "x = c.allreduce(np.arange(4.0) * c.rank); "
                    "print('rank', c.rank, 'of', c.size, 'sum', x)")
            _say("\n### scipion-cloudexec --config %s run %s --np 4 -- python -c ..."
                 % (clusters_file, name))
            ns = argparse.Namespace(command=[clusters[name].python, "-c", demo], np=4, threads=1,
                                    gpus=[], job_id=None, launcher=None, cwd="", quiet=False)
            rc = cmd_run(clusters[name], ns)
            _say("### exit code %d" % rc)
            code |= rc
        return code
    finally:
        if not args.keep:
            tb.down()
            _say("### test bed stopped (use --keep to leave it running)")


def _human(n: float) -> str:
    from .cluster.errors import human_bytes
    return human_bytes(n)


def cmd_stage(cluster: ClusterConfig, args) -> int:
    from .cluster.errors import InputMissing, StagingError
    from .progress import for_terminal
    root = os.path.abspath(args.project_root)
    project = args.project or os.path.basename(root)
    with _staging(cluster) as session:
        bar = for_terminal("staging to %s" % cluster.name)
        try:
            r = session.stage_in(root, args.paths, project, progress=bar, keep_hashes=False)
        except (StagingError, InputMissing) as e:
            bar.end()
            _say("scipion-cloudexec: %s" % e)
            return 1
        bar.end()
    print("%d file(s), %s: %s sent (%s/s), %d linked, %d already in place%s; mirror %s/projects/%s"
          % (r.files, _human(r.bytes_total), _human(r.bytes_sent), _human(r.rate), r.linked,
             r.unchanged, ", %d corrupt cache entries repaired" % r.repaired if r.repaired else "",
             cluster.workdir, project))
    return 0


def cmd_fetch(cluster: ClusterConfig, args) -> int:
    from .cluster.errors import StagingError
    from .progress import for_terminal
    code = 0
    with _staging(cluster) as session:
        for path in args.remote_paths:
            bar = for_terminal("fetching %s" % path)
            try:
                r = session.fetch(path, args.to, progress=bar)
            except StagingError as e:
                bar.end()
                _say("scipion-cloudexec: %s" % e)
                code = 1
                continue
            bar.end()
            print("%s: %d file(s), %s fetched, %d unchanged" % (path, len(r.fetched),
                                                               _human(r.bytes_sent), r.unchanged))
            for rel, why in r.refused:
                _say("refused %s: %s" % (rel, why))
                code = 1
    return code


def cmd_cache(cluster: ClusterConfig, args) -> int:
    with _staging(cluster) as session:
        info = session.cache_info(gc=args.gc)
    if args.gc:
        print("dropped %d entr%s no mirror uses, %s freed" % (
            info["dropped"], "y" if info["dropped"] == 1 else "ies", _human(info["freed"])))
    print("cache of %s: %d entries, %s (+%s of unfinished uploads); %s free in %s" % (
        cluster.name, info["entries"], _human(info["bytes"]), _human(info["partial_bytes"]),
        _human(info["free"]), cluster.workdir))
    return 0


@contextlib.contextmanager
def _staging(cluster: ClusterConfig) -> Iterator:
    """A session to the cluster for staging only: SSH, no agent."""
    from .cluster.session import ClusterSession
    session = ClusterSession(cluster)
    try:
        session.connect()
        yield session
    finally:
        session.close()


def cmd_provenance(args) -> int:
    """Where each remote step of a protocol run ran, from Runs/<id>/logs/cloudexec.jsonl."""
    import json
    from .runrecords import read_records
    records = read_records(args.run_dir)
    if not records:
        _say("scipion-cloudexec: %s not found: no step of %s ran on a cluster"
             % (os.path.join(args.run_dir, "logs", "cloudexec.jsonl"), args.run_dir))
        return 1
    if args.json:
        print(json.dumps(records, indent=1, sort_keys=True))
        return 0
    for r in records:
        start, end = r.get("started") or 0, r.get("ended") or 0
        when = ("%s, %.1f s" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
                                end - start) if start and end else
                "started %s" % time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
                if start else "never started")
        print("step %s  job %s  %s on %s (%s, launcher id %s)  %s, exit %s"
              % (r.get("step"), r["job_id"], r.get("state"), r["cluster"], r.get("launcher"),
                 r.get("launcher_id"), when, "-" if r.get("exit_code") is None
                 else r.get("exit_code")))
        if r.get("reason"):
            print("    %s" % r["reason"])
        print("    command: %s" % r.get("command"))
        print("    %d input file(s) staged, %d output file(s) gathered"
              % (len(r.get("inputs", {})), len(r.get("outputs", {}))))
        if args.verbose or args.files:
            for kind in ("inputs", "outputs"):
                for rel, sha in sorted(r.get(kind, {}).items()):
                    print("      %-7s %s  %s" % (kind[:-1], sha[:16], rel))
    return 0


def cluster_status(cluster: ClusterConfig) -> dict:
    """What ``status`` shows of one cluster (connects; never raises)."""
    out = {"name": cluster.name, "slots": cluster.slots, "reachable": False}
    try:
        with _client(cluster) as session:
            out.update(session.status(), reachable=True)
    except Exception as e:  # status reports, it does not fail
        out["error"] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0])
    return out


def cmd_status(args) -> int:
    from concurrent.futures import ThreadPoolExecutor
    clusters = load_clusters(args.config)
    names = args.names or list(clusters)
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        rows = list(pool.map(cluster_status, [clusters[n] for n in names]))
    print("%-16s %-11s %11s %7s %8s %6s %6s %9s  %s" % (
        "CLUSTER", "REACHABLE", "SLOTS USED", "QUEUED", "RUNNING", "DONE", "FAILED", "CACHED",
        "ACTIVE CLIENTS (protocols: bytes staged)"))
    for r in rows:
        if not r["reachable"]:
            print("%-16s %-11s %11s  %s" % (r["name"], "NO", "-/%d" % r["slots"], r["error"]))
            continue
        print("%-16s %-11s %11s %7d %8d %6d %6d %9s  %s" % (
            r["name"], "yes", "%d/%d" % (r["used"], r["slots"]), r["queued"], r["running"],
            r["done"], r["failed"], _human(r["cached"]),
            ", ".join("%s (%s staged)" % (c, _human(r["staged"][c])) if c in r["staged"] else c
                      for c in r["clients"]) or "-"))
    return 0 if all(r["reachable"] for r in rows) else 1


def cmd_hostsconf(args) -> int:
    """Print (or merge into Scipion's hosts.conf) the cloudexec queues of the clusters file."""
    from . import hostsconf
    from .config import default_config_path, load_groups
    path = os.path.abspath(default_config_path(args.config))
    clusters, groups = load_clusters(path), load_groups(path)
    values = hostsconf.host_values(clusters, groups, config_path=path)
    if args.write is None:
        sys.stdout.write(hostsconf.merge("", values, args.host, path))
        return 0
    target = os.path.abspath(args.write or hostsconf.scipion_hosts_path())
    try:
        changed, backup = hostsconf.write(target, values, args.host, path)
    except hostsconf.HostsConfError as e:
        _say("scipion-cloudexec: %s: %s" % (target, e))
        return EXIT_CONFIG
    print("%s: %s [%s] with queues %s%s" % (
        target, "wrote" if changed else "already up to date:", args.host,
        ", ".join(hostsconf.queues(clusters, groups)),
        " (previous file kept as %s)" % backup if backup else ""))
    try:
        default = os.path.abspath(default_config_path())
    except ConfigError:
        default = ""
    sys.stdout.flush()
    if default != path:  # the executor in Scipion's protocol processes reads the default
        _say("note: Scipion's protocols read the clusters file %s; to use %s, set "
             "SCIPION_CLOUDEXEC_CONFIG = %s in Scipion's config (scipion.conf)"
             % (default or "from $SCIPION_CLOUDEXEC_CONFIG or $SCIPION_HOME/config/cloudexec.conf",
                path, path))
    return 0


def cmd_queue_submit(args) -> int:
    """hosts.conf SUBMIT_COMMAND: Scipion tried to send a whole protocol to a cloudexec
    queue; say what to pick instead and fail (exit 1)."""
    from . import hostsconf
    from .config import load_groups
    try:
        clusters = list(load_clusters(args.config))
        known = clusters + [g for g in load_groups(args.config) if g not in clusters] + (
            ["all"] if len(clusters) > 1 else [])
    except ConfigError as e:
        known = []
        _say("scipion-cloudexec: %s" % e)
    text = hostsconf.refuse_submit(args.queue, args.steps, known)
    sys.stderr.write(text + ("\n" if sys.stderr.isatty() else ""))  # Scipion shows it as is
    return 1


def cmd_testbed(args) -> int:
    from .testbed import LocalTestbed
    tb = LocalTestbed(os.path.abspath(args.root))
    if args.action == "up":
        print(tb.up(slurm=not args.no_slurm and tb.slurm_available()))
    elif args.action == "down":
        tb.down()
    else:
        print("sshd %s, SLURM %s, clusters file %s" % (
            "running" if tb.sshd_running() else "stopped",
            "running" if tb.slurm_running() else "stopped", tb.clusters_file))
    return 0


# ---- parsing ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scipion-cloudexec", description="Run Scipion work on "
                                "remote clusters over SSH. " + __doc__.split("\n\n")[2])
    p.add_argument("--config", help="clusters file (default: $SCIPION_CLOUDEXEC_CONFIG, "
                                    "else $SCIPION_HOME/config/cloudexec.conf)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    p.add_argument("--version", action="version", version="scipion-cloudexec " + __version__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("check", help="connect, start the agent, probe, run a 2-rank MPI job")
    s.add_argument("name", help="cluster name in the clusters file")
    s = sub.add_parser("run", help="run a command as an MPI job, streaming its output")
    s.add_argument("name")
    s.add_argument("--np", type=int, default=1, help="MPI ranks (default 1)")
    s.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    s.add_argument("--gpus", type=_gpus, default=[], help="GPUs, e.g. 0,1 (CUDA_VISIBLE_DEVICES)")
    s.add_argument("--launcher", choices=LAUNCHERS,
                   help="override the cluster's launcher")
    s.add_argument("--job-id", help="a stable id: running the same id again attaches to it")
    s.add_argument("--cwd", default="", help="working directory on the cluster")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the job's output")
    s.add_argument("command", nargs="*", help="-- COMMAND ARGS... (everything after --)")
    s = sub.add_parser("attach", help="follow a job: its output so far, then until it ends")
    s.add_argument("name")
    s.add_argument("job_id")
    s = sub.add_parser("jobs", help="list the agent's jobs, newest first")
    s.add_argument("name")
    s.add_argument("--limit", type=int, default=50)
    s = sub.add_parser("cancel", help="cancel a job (NAME JOB_ID, or NAME:JOB_ID as Scipion's "
                                          "Stop passes it)")
    s.add_argument("name")
    s.add_argument("job_id", nargs="?")
    s = sub.add_parser("agent", help="show (or stop) the cluster's agent")
    s.add_argument("name")
    s.add_argument("--stop", action="store_true", help="stop it if no job is active")
    s.add_argument("--force", action="store_true", help="with --stop: even with active jobs")
    s = sub.add_parser("stage", help="upload files or folders to the cluster's project mirror")
    s.add_argument("name")
    s.add_argument("paths", nargs="+", help="files or folders, relative to the project or absolute")
    s.add_argument("--project-root", default=".", help="local project folder (default: here)")
    s.add_argument("--project", help="mirror name (default: the project folder's name)")
    s = sub.add_parser("fetch", help="copy files or folders from the cluster's workdir")
    s.add_argument("name")
    s.add_argument("remote_paths", nargs="+", help="paths relative to the cluster's workdir")
    s.add_argument("--to", required=True, help="local folder to write into")
    s = sub.add_parser("cache", help="show (or clean) the cluster's staging cache")
    s.add_argument("name")
    s.add_argument("--gc", action="store_true", help="drop entries no project mirror uses")
    s = sub.add_parser("status", help="every cluster: reachable, slots used, jobs, cache")
    s.add_argument("names", nargs="*", help="clusters (default: all in the clusters file)")
    s = sub.add_parser("provenance", help="where each remote step of a protocol run ran")
    s.add_argument("run_dir", help="the protocol's run folder, e.g. Runs/000123_ProtRelionRefine3D")
    s.add_argument("--json", action="store_true", help="the raw records")
    s.add_argument("-v", "--verbose", dest="files", action="store_true",
                   help="also each input and output file with its hash")
    s = sub.add_parser("hostsconf", help="the cloudexec part of Scipion's hosts.conf, from the "
                                         "clusters file (printed, or merged with --write)")
    s.add_argument("--write", nargs="?", const="", metavar="HOSTS_CONF",
                   help="merge into this hosts.conf (default: the one Scipion reads), keeping "
                        "a backup; running it again changes nothing")
    s.add_argument("--host", default="localhost", help="host section (default localhost)")
    s = sub.add_parser("queue-submit", help="hosts.conf SUBMIT_COMMAND: refuses, explaining "
                                            "what to pick in the queue dialog")
    s.add_argument("--queue", default="")
    s.add_argument("--steps", default="")
    s.add_argument("script", nargs="?")
    s = sub.add_parser("demo", help="start a local test bed and run check and an MPI job on it")
    s.add_argument("--root", default=os.path.join(os.getcwd(), ".testbed"),
                   help="test bed folder (default ./.testbed)")
    s.add_argument("--keep", action="store_true", help="leave the test bed running")
    s = sub.add_parser("testbed", help="start, stop or show the local test bed")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--root", default=os.path.join(os.getcwd(), ".testbed"))
    s.add_argument("--no-slurm", action="store_true", help="sshd only")
    return p


COMMANDS = {"check": cmd_check, "run": cmd_run, "attach": cmd_attach, "jobs": cmd_jobs,
            "cancel": cmd_cancel, "agent": cmd_agent, "stage": cmd_stage, "fetch": cmd_fetch,
            "cache": cmd_cache}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: List[str] = []
    if "--" in argv:  # everything after -- is the remote command, options included
        command = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = build_parser().parse_args(argv)
    if args.cmd == "run":
        args.command = list(args.command) + command
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    from .cluster.errors import AgentError, InfraError
    try:
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "testbed":
            return cmd_testbed(args)
        if args.cmd == "provenance":
            return cmd_provenance(args)
        if args.cmd == "status":
            return cmd_status(args)
        if args.cmd == "hostsconf":
            return cmd_hostsconf(args)
        if args.cmd == "queue-submit":
            return cmd_queue_submit(args)
        clusters = load_clusters(args.config)
        if getattr(args, "job_id", "") is None and ":" in args.name:
            args.name, args.job_id = args.name.split(":", 1)
        if args.name not in clusters:
            _say("scipion-cloudexec: no cluster '%s' in %s; defined: %s"
                 % (args.name, next(iter(clusters.values())).source, ", ".join(clusters)))
            return EXIT_CONFIG
        return COMMANDS[args.cmd](clusters[args.name], args)
    except ConfigError as e:
        _say("scipion-cloudexec: %s" % e)
        return EXIT_CONFIG
    except (InfraError, AgentError, TimeoutError) as e:  # TimeoutError: a job's result(timeout)
        _say("scipion-cloudexec: %s: %s" % (type(e).__name__, e))
        return EXIT_UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
