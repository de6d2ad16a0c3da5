"""Start and stop the local test bed (see the package docstring)."""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

SSHD = "/usr/sbin/sshd"


class TestbedError(RuntimeError):
    """A part of the test bed is missing or did not start; says which and how to fix."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True for a running process. A zombie is not: a daemon stopped here (sshd, slurmd,
    an agent) is reparented to init, which may take seconds to reap it."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        return pid if _alive(pid) else None
    except (OSError, ValueError):
        return None


def _stop_pid(path: str, timeout: float = 5.0) -> bool:
    pid = _read_pid(path)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    try:
        os.unlink(path)
    except OSError:
        pass
    return True


def _wait_for(cond, timeout: float, what: str, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    tail = ""
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = "\n" + "".join(f.readlines()[-15:])
    raise TestbedError("%s did not come up within %.0f s%s" % (what, timeout, tail))


class LocalTestbed:
    """The test bed's folder and daemons. Constructing it starts nothing."""

    def __init__(self, root: str, python: str = sys.executable):
        self.root = os.path.abspath(root)
        self.python = python
        self.user = getpass.getuser()
        self.keys = os.path.join(self.root, "keys")
        self.client_key = os.path.join(self.keys, "id_ed25519")
        self.known_hosts = os.path.join(self.keys, "known_hosts")
        self.sshd_dir = os.path.join(self.root, "sshd")
        self.sshd_pid = os.path.join(self.sshd_dir, "sshd.pid")
        self.sshd_port_file = os.path.join(self.sshd_dir, "port")
        self.slurm_dir = os.path.join(self.root, "slurm")
        self.slurm_conf = os.path.join(self.slurm_dir, "slurm.conf")
        self.remote = os.path.join(self.root, "remote")
        self.clusters_file = os.path.join(self.root, "clusters.conf")

    # ---- sshd ---------------------------------------------------------------------------

    @property
    def sshd_port(self) -> int:
        with open(self.sshd_port_file) as f:
            return int(f.read())

    def sshd_running(self) -> bool:
        return _read_pid(self.sshd_pid) is not None

    def start_sshd(self) -> None:
        if self.sshd_running():
            return
        if not os.path.exists(SSHD):
            raise TestbedError("%s not found: install openssh-server (scripts/setup.sh does)" % SSHD)
        os.makedirs(self.keys, exist_ok=True)
        os.makedirs(self.sshd_dir, mode=0o700, exist_ok=True)
        if not os.path.exists(self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cloudexec-testbed",
                            "-f", self.client_key], check=True)
        hostkey = os.path.join(self.sshd_dir, "ssh_host_ed25519_key")
        if not os.path.exists(hostkey):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostkey], check=True)
        auth = os.path.join(self.sshd_dir, "authorized_keys")
        shutil.copyfile(self.client_key + ".pub", auth)
        os.chmod(auth, 0o600)
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        env_lines = "SLURM_CONF=%s" % self.slurm_conf
        if os.geteuid() == 0:  # the test bed logs in as root; OpenMPI refuses root without these
            env_lines += " OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
        last_error = ""
        for _ in range(5):
            port = _free_port()
            conf = os.path.join(self.sshd_dir, "sshd_config")
            with open(conf, "w") as f:
                f.write(SSHD_CONFIG.format(port=port, hostkey=hostkey, pid=self.sshd_pid,
                                           auth=auth, user=self.user, env=env_lines))
            log = os.path.join(self.sshd_dir, "sshd.log")
            r = subprocess.run([SSHD, "-f", conf, "-E", log], capture_output=True, text=True)
            if r.returncode != 0:
                last_error = r.stderr
                continue
            try:
                _wait_for(lambda: _read_pid(self.sshd_pid) is not None, 5, "sshd", log)
                _wait_for(lambda: _port_open(port), 5, "sshd on port %d" % port, log)
            except TestbedError as e:
                last_error = str(e)
                _stop_pid(self.sshd_pid)
                continue
            with open(self.sshd_port_file, "w") as f:
                f.write("%d\n" % port)
            with open(hostkey + ".pub") as f:
                kind, b64 = f.read().split()[:2]
            with open(self.known_hosts, "w") as f:
                f.write("[127.0.0.1]:%d %s %s\n" % (port, kind, b64))
            return
        raise TestbedError("sshd did not start: %s" % last_error)

    # ---- SLURM --------------------------------------------------------------------------

    def slurm_available(self) -> bool:
        return all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")) \
            and os.geteuid() == 0

    def slurm_running(self) -> bool:
        return all(_read_pid(os.path.join(self.slurm_dir, n)) is not None
                   for n in ("slurmctld.pid", "slurmd.pid"))

    def start_slurm(self) -> None:
        if self.slurm_running():
            return
        if not self.slurm_available():
            raise TestbedError("SLURM needs root and the packages slurm-wlm and munge "
                               "(scripts/setup.sh installs them)")
        for port in (6817, 6818):
            if _port_open(port):
                raise TestbedError("port %d is taken, most likely by another SLURM (or test bed); "
                                   "stop it first (its test bed: scipion-cloudexec testbed down "
                                   "--root DIR)" % port)
        self._start_munge()
        s = self.slurm_dir
        for d in ("state", "log", "spool", "pmix"):
            os.makedirs(os.path.join(s, d), exist_ok=True)
        host = socket.gethostname().split(".")[0]
        with open(self.slurm_conf, "w") as f:
            f.write(SLURM_CONF.format(s=s, host=host))
        with open(os.path.join(s, "mpi.conf"), "w") as f:
            f.write("PMIxCliTmpDirBase=%s/pmix\n" % s)
        env = dict(os.environ, SLURM_CONF=self.slurm_conf)
        for daemon in ("slurmctld", "slurmd"):
            r = subprocess.run([daemon, "-f", self.slurm_conf], env=env, capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise TestbedError("%s failed to start: %s" % (daemon, r.stderr.strip()))
        _wait_for(lambda: self.slurm_running(), 15, "slurmctld and slurmd",
                  os.path.join(s, "log", "slurmctld.log"))

        def idle() -> bool:
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return r.stdout.strip().startswith("idle") or r.stdout.strip().startswith("mix")
        _wait_for(idle, 30, "the SLURM node (state idle)", os.path.join(s, "log", "slurmd.log"))

    def _start_munge(self) -> None:
        pidfile = "/run/munge/munged.pid"
        if _read_pid(pidfile) is not None:
            return
        if not os.path.exists("/etc/munge/munge.key"):
            r = subprocess.run(["/usr/sbin/mungekey", "--create"], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["/usr/sbin/create-munge-key", "-f"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        os.chmod("/run/munge", 0o755)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        _wait_for(lambda: _read_pid(pidfile) is not None, 10, "munged")
        os.makedirs(self.slurm_dir, exist_ok=True)
        open(os.path.join(self.slurm_dir, "munged.ours"), "w").close()  # ours to stop

    def stop_slurm(self) -> None:
        _stop_pid(os.path.join(self.slurm_dir, "slurmd.pid"))
        _stop_pid(os.path.join(self.slurm_dir, "slurmctld.pid"))
        marker = os.path.join(self.slurm_dir, "munged.ours")
        if os.path.exists(marker):  # only a munged this test bed started
            _stop_pid("/run/munge/munged.pid")
            os.unlink(marker)

    # ---- whole bed ----------------------------------------------------------------------

    def clusters(self) -> Dict[str, Dict[str, str]]:
        """The clusters the test bed offers, as clusters-file sections."""
        base = {"host": "127.0.0.1", "port": str(self.sshd_port), "user": self.user,
                "identity_file": self.client_key, "known_hosts": self.known_hosts,
                "python": self.python, "slots": "4", "heartbeat": "1"}
        mpirun = "mpirun --oversubscribe --bind-to none"
        out = {
            "local": dict(base, workdir=os.path.join(self.remote, "local"), launcher="local"),
            "mpi": dict(base, workdir=os.path.join(self.remote, "mpi"), launcher="mpirun",
                        mpirun=mpirun),
        }
        if self.slurm_running():
            out["slurm"] = dict(base, workdir=os.path.join(self.remote, "slurm"), launcher="slurm",
                                srun="srun --mpi=pmix", partition="debug", time="00:10:00")
        return out

    def write_clusters_file(self) -> str:
        lines: List[str] = ["# written by the scipion-cloudexec test bed: loopback sshd, "
                            "local OpenMPI and SLURM"]
        for name, keys in self.clusters().items():
            lines.append("\n[cluster %s]" % name)
            lines += ["%s = %s" % kv for kv in keys.items()]
        with open(self.clusters_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        return self.clusters_file

    def up(self, slurm: bool = True) -> str:
        """Start sshd (and SLURM when asked and possible); return the clusters file."""
        os.makedirs(self.remote, exist_ok=True)
        self.start_sshd()
        if slurm:
            self.start_slurm()
        return self.write_clusters_file()

    def stop_agents(self) -> None:
        """Stop the agents the tests started (each writes its pid in agent.json)."""
        import json
        for name in os.listdir(self.remote) if os.path.isdir(self.remote) else []:
            state = os.path.join(self.remote, name, "agent", "agent.json")
            try:
                with open(state) as f:
                    pid = int(json.load(f)["pid"])
            except (OSError, ValueError, KeyError):
                continue
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)

    def down(self) -> None:
        self.stop_agents()
        self.stop_slurm()
        _stop_pid(self.sshd_pid)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {hostkey}
PidFile {pid}
AuthorizedKeysFile {auth}
AllowUsers {user}
# the test bed's keys live under a folder StrictModes would reject
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
AllowTcpForwarding local
GatewayPorts no
X11Forwarding no
MaxStartups 200
MaxSessions 100
ClientAliveInterval 15
ClientAliveCountMax 4
LogLevel INFO
Subsystem sftp internal-sftp
SetEnv {env}
"""

SLURM_CONF = """\
ClusterName=cloudexec
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
# the node offers 8 CPUs whatever the machine has, so 4-rank jobs fit on 2 cores
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
