"""The demo: a Scipion project on the desktop, its RELION 2D classification (MPI) and the
plugin's power spectra run on a separate cluster host through the normal Scipion path.

1. The cluster: a private host (testbed/private.py): its own network namespace, host name
   and filesystem view in which the demo's desktop folder is an empty tmpfs, with sshd and
   OpenMPI. Everything the cluster reads or writes travels by staging.
2. The desktop: hosts.conf with a ``cloudexec`` queue naming the cluster, the clusters file,
   a synthetic data set (test volume, ``relion_project``, noise), a Scipion project.
3. Imports run on the desktop; RELION 2D classification and power spectra are sent to the
   cluster by their queue parameters ("Use queue", queue = the cluster), run at the same time,
   with a progress line.
4. The report: where each step ran and how long it took, the output sets' sizes, a PNG
   montage of the class averages beside the project, the command that opens the project in
   the Scipion GUI. Then the cluster is stopped (unless ``--keep``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from typing import List

from ..testbed import LocalTestbed
from ..testbed.private import PrivateHost
from . import relion, report, synthetic

CLUSTER = "demo"  # the cluster's name in the clusters file and its queue in hosts.conf
PROJECT = "relion_demo"
ANGPIX = 3.0
HOST_NAME, BRIDGE, NET = "d1", "cxdbr0", "10.83.0"  # apart from the tests' private hosts

#: what hosts.conf holds besides the queues that `scipion-cloudexec hostsconf` writes
HOSTS_BASE = """\
; written by the scipion-cloudexec demo; the cloudexec keys below come from
; 'scipion-cloudexec hostsconf --write', as a user would run it
[localhost]
PARALLEL_COMMAND = mpirun --oversubscribe -np %_(JOB_NODES)d %_(COMMAND)s
"""


class Clock:
    """Progress on stderr: ``[  12.3 s] text`` lines; a status line rewritten in place on a
    terminal, printed when it changes (at most every 5 s) otherwise."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last, self._last_t, self._open = "", 0.0, False

    def stamp(self) -> str:
        return "[%6.1f s]" % (time.monotonic() - self.t0)

    def say(self, text: str) -> None:
        self._close()
        print("%s %s" % (self.stamp(), text), file=sys.stderr, flush=True)

    def status(self, text: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            sys.stderr.write("\r\x1b[K" + ("%s %s" % (self.stamp(), text))[:width])
            sys.stderr.flush()
            self._open = True
        elif text != self._last and time.monotonic() - self._last_t >= 5:
            print("%s %s" % (self.stamp(), text), file=sys.stderr, flush=True)
            self._last, self._last_t = text, time.monotonic()

    def _close(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            self._open = False


def _host(root: str) -> PrivateHost:
    tb = LocalTestbed(os.path.join(root, "testbed"), python=sys.executable)
    host = PrivateHost(tb, HOST_NAME, hide=[os.path.join(root, "desktop")], bridge=BRIDGE, net=NET)
    host.hostname = "cluster-demo"
    return host


def stop_cluster(root: str) -> int:
    """Stop the demo's cluster host and the loopback sshd that holds its keys (by pid)."""
    host = _host(root)
    host.down()
    host.tb.down()
    print("cluster stopped", file=sys.stderr)
    return 0


def _write_config(host: PrivateHost) -> None:
    """hosts.conf (the cluster as a cloudexec queue) and the clusters file."""
    from .. import hostsconf
    from ..config import load_clusters, load_groups
    home = os.environ["SCIPION_HOME"]
    os.makedirs(os.path.join(home, "config"), exist_ok=True)
    tb = host.tb
    clusters_file = os.environ["SCIPION_CLOUDEXEC_CONFIG"]
    with open(clusters_file, "w") as f:
        f.write("# written by the scipion-cloudexec demo: a host in its own network namespace\n"
                "[cluster %s]\nhost = %s\nport = 22\nuser = %s\nidentity_file = %s\n"
                "known_hosts = %s\nworkdir = %s/cloudexec\npython = %s\nlauncher = mpirun\n"
                "mpirun = mpirun --oversubscribe --bind-to none\nslots = 4\nheartbeat = 1\n"
                % (CLUSTER, host.address, tb.user, tb.client_key, host.known_hosts, host.work,
                   tb.python))
    hosts = os.path.join(home, "config", "hosts.conf")
    with open(hosts, "w") as f:
        f.write(HOSTS_BASE)
    hostsconf.write(hosts, hostsconf.host_values(load_clusters(clusters_file),
                                                 load_groups(clusters_file),
                                                 config_path=clusters_file),
                    source=clusters_file)


def _seen_from_cluster(host: PrivateHost, path: str) -> str:
    """What the cluster host sees at *path* (asked over SSH, as any login there would)."""
    import shlex
    import subprocess
    tb = host.tb
    try:
        r = subprocess.run(["ssh", "-i", tb.client_key, "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=" +
                            host.known_hosts, "%s@%s" % (tb.user, host.address),
                            "hostname; test -e %s && echo present || echo absent"
                            % shlex.quote(path)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "(could not ask the cluster: %s)" % e
    words = r.stdout.split()
    if r.returncode != 0 or len(words) != 2:
        return "(could not ask the cluster: %s)" % (r.stderr.strip() or r.stdout.strip())
    return "seen from %s: %s" % (words[0], "does not exist" if words[1] == "absent"
                                 else "EXISTS (not a private host?)")


def _cli() -> str:
    """How to call the plugin's command line from here."""
    script = os.path.join(os.path.dirname(sys.executable), "scipion-cloudexec")
    return script if os.access(script, os.X_OK) else "%s -m scipion_cloudexec.cli" % sys.executable


def _gui_script(root: str) -> str:
    """A script beside the demo's folders that opens the project in Scipion's GUI."""
    path = os.path.join(root, "scipion-gui.sh")
    env = "".join("export %s=%s\n" % (k, os.environ[k]) for k in (
        "SCIPION_DOMAIN", "SCIPION_HOME", "SCIPION_USER_DATA", "SCIPION_CLOUDEXEC_CONFIG",
        "RELION_HOME", "OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"))
    with open(path, "w") as f:
        f.write("#!/bin/sh\n# opens the demo's project in the Scipion GUI (written by the demo)\n"
                "%sexec %s -O -m pyworkflow.apps.pw_project %s \"$@\"\n"
                % (env, sys.executable, PROJECT))
    os.chmod(path, 0o755)
    return path


def _wait(project, prots: list, clock: Clock) -> list:
    """Wait for protocols launched without waiting, showing where each one is."""
    import psutil

    def running(pid: int) -> bool:
        try:
            return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    pids = {p.getObjId(): p.getPid() for p in prots}
    while True:
        alive = [p for p in prots if running(pids[p.getObjId()])]
        clock.status(" | ".join("%s: %s" % (p.getObjLabel(), report.progress_of(p)
                                            if p in alive else "ended") for p in prots))
        if not alive:
            break
        time.sleep(0.5)
    out = []
    for p in prots:
        project._updateProtocol(p)
        out.append(project.getProtocol(p.getObjId()))
    clock.say("all ended: " + ", ".join("%s %s" % (p.getObjLabel(), p.getStatus()) for p in out))
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


def demo(root: str, args) -> int:
    clock = Clock()
    # Ctrl-C, and a kill, stop what the demo started (even where the shell ignores SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    why = relion.unavailable() or PrivateHost.unavailable()
    if why:
        clock.say("cannot run the demo: %s" % why)
        return 2
    host = _host(root)
    launched: List = []
    project = None
    try:
        clock.say("starting the cluster: host %s, its own network namespace (%s), "
                  "sshd + OpenMPI, a filesystem view without %s/desktop"
                  % (host.hostname, host.ns, root))
        host.up()
        _write_config(host)
        clock.say("cluster %r at %s:22 is up; hosts.conf queue %r -> it (SCIPION_HOME=%s)"
                  % (CLUSTER, host.address, CLUSTER, os.environ["SCIPION_HOME"]))

        data = os.path.join(root, "desktop", "data")
        shutil.rmtree(data, ignore_errors=True)
        volume = synthetic.test_volume(os.path.join(data, "volume.mrc"), 64, ANGPIX)
        stack = synthetic.project_particles(volume, os.path.join(data, "particles"),
                                            args.particles, ANGPIX, noise=4.0)
        mics = synthetic.micrographs_from_particles(stack, os.path.join(data, "micrographs"),
                                                    n=4, angpix=ANGPIX)
        clock.say("synthetic data in %s: a 64^3 test volume, %d particles of 64 px projected "
                  "at random orientations with noise (relion_project), %d micrographs"
                  % (data, args.particles, len(mics)))

        from pyworkflow.project import Manager
        manager = Manager()
        if os.path.exists(manager.getProjectPath(PROJECT)):
            manager.deleteProject(PROJECT)
        project = manager.createProject(PROJECT)
        os.chdir(project.path)
        clock.say("Scipion project %s at %s; %s" % (PROJECT, project.path,
                                                    _seen_from_cluster(host, project.path)))
        parts = relion.import_particles(project, stack, ANGPIX)
        clock.say("import particles (desktop): %s" % ", ".join(report.output_sizes(parts)))
        micsp = relion.import_micrographs(project, os.path.dirname(mics[0]), ANGPIX)
        clock.say("import micrographs (desktop): %s" % ", ".join(report.output_sizes(micsp)))

        c2d = relion.classify2d(project, parts.outputParticles, args.classes, args.iterations,
                                args.mpi, mask_diameter=150, label="relion 2D", queue=CLUSTER)
        from ..protocols import ProtCloudPowerSpectra
        psd = project.newProtocol(ProtCloudPowerSpectra, downsample=2, boxSize=128,
                                  numberOfThreads=3)
        psd.setObjLabel("power spectra")
        psd.inputMicrographs.set(micsp.outputMicrographs)
        psd._useQueue.set(True)
        psd.setQueueParams([CLUSTER, {"QUEUE_FOR_JOBS": "Y"}])
        for prot in (c2d, psd):
            project.launchProtocol(prot, wait=False)
            launched.append(prot)
        clock.say("sent to cluster %r (Use queue: %s): RELION 2D classification (%d classes, "
                  "%d iterations, relion_refine_mpi with %d MPI ranks) and power spectra (%d "
                  "micrographs)" % (CLUSTER, CLUSTER, args.classes, args.iterations, args.mpi,
                                    len(mics)))
        c2d, psd = _wait(project, launched, clock)
        launched = []
        failed = [p for p in (c2d, psd) if not p.isFinished()]
        for p in failed:
            clock.say("%s FAILED: %s\n    its log: %s" % (p.getObjLabel(), p.getErrorMessage(),
                                                      os.path.join(p.getWorkingDir(), "logs")))
        _report(clock, project, [parts, micsp, c2d, psd], host, root, args)
        return 1 if failed else 0
    except KeyboardInterrupt:
        clock.say("interrupted: stopping the protocols (their cluster jobs are cancelled) "
                  "and the cluster")
        return 130
    finally:
        if project is not None:
            for prot in launched:  # interrupted: Scipion's Stop also cancels the cluster jobs
                try:
                    project._updateProtocol(prot)
                    prot = project.getProtocol(prot.getObjId())
                    if prot.isActive():
                        project.stopProtocol(prot)
                except Exception as e:
                    clock.say("could not stop %s: %s" % (prot.getObjLabel(), e))
        if args.keep:
            clock.say("the cluster is left running (--keep): %s:22; stop it with\n    %s -m "
                      "scipion_cloudexec.demo --root %s --down" % (host.address, sys.executable, root))
        else:
            host.down()
            host.tb.down()
            clock.say("cluster stopped (its namespace, sshd, agent and jobs), and the loopback "
                      "sshd holding its keys")


def _report(clock: Clock, project, prots: list, host: PrivateHost, root: str, args) -> None:
    desktop = socket.gethostname()
    hosts = {CLUSTER: "%s (%s)" % (host.hostname, host.address)}
    out = ["", "=== where each step ran, and how long it took (steps + provenance) ==="]
    for p in prots:
        out.append("  %s  (%s: %s, %.1f s)" % (p.getObjLabel(), os.path.basename(p.getWorkingDir()),
                                               p.getStatus(), report.protocol_time(p)))
        out += report.where_and_how_long(p, desktop, hosts)
    out += ["", "=== output sets (project database %s) ===" % os.path.join(project.path,
                                                                          "project.sqlite")]
    c2d = prots[2]
    images, sizes = relion.class_averages(c2d) if c2d.isFinished() else (None, [])
    for p in prots:
        out.append("  %-19s %s" % (p.getObjLabel(), "; ".join(report.output_sizes(p)) or "-"))
        if p is c2d and sizes:
            out.append("  %-19s %s" % ("", report.relion_mpi_hosts(c2d)))
            out.append("  %-19s particles per class: %s (%d of the %d particles)"
                       % ("", ", ".join(map(str, sizes)), sum(sizes), args.particles))
    if sizes:
        png = project.path.rstrip("/") + "-class-averages.png"
        lib = synthetic.write_montage(png, images, ["%d ptcls" % s for s in sizes], zoom=2,
                                      title="RELION 2D classes, %d iterations on %s"
                                            % (args.iterations, host.hostname))
        out += ["", "=== class averages ===", "  %s  (%d classes, written with %s)"
                % (png, len(sizes), lib)]
    out += ["", "=== more ===",
            "  the RELION step's provenance (command, hashes of what was staged and gathered):",
            "    %s provenance %s" % (_cli(), os.path.join(project.path, c2d.getWorkingDir())),
            "  open the project in the Scipion GUI:", "    " + _gui_script(root)]
    if not args.keep:
        out.append("    (new runs on cluster %r need it up: run the demo with --keep)" % CLUSTER)
    clock.say("done in %.0f s" % (time.monotonic() - clock.t0))
    print("\n".join(out), flush=True)
