"""Starting the agent as a daemon: one per workdir, under a lock, its state in agent.json;
first, an idle agent of another protocol version in that workdir is retired.

A workdir on a shared file system (NFS home) can be reached through several login nodes
behind one host name. ``agent.json`` names the node its agent runs on and holds a lease
(``lease_until``, wall clock) the agent renews; ``start`` on another node refuses while the
lease holds, and takes over once it has run out (that node is down). Node clocks are
assumed to agree within seconds (NTP).

Shipped to the cluster: standard library only.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from typing import Callable, Dict, List, Optional

from ..version import PROTOCOL_VERSION
from .jobs import JobSpec, JobState

log = logging.getLogger("cloudexec.agent")

#: seconds an agent's lease on its workdir lasts unless renewed ($CLOUDEXEC_AGENT_LEASE)
DEFAULT_LEASE = 60.0
#: exit code of ``start`` when the workdir's agent runs on another node
EXIT_OTHER_NODE = 3
#: keys of agent.json that only a client (over SSH) may see: never printed or logged
PRIVATE_KEYS = ("secret", "curve", "stage")


def lease_term() -> float:
    """The lease an agent takes on its workdir, in seconds."""
    try:
        return max(1.0, float(os.environ.get("CLOUDEXEC_AGENT_LEASE") or DEFAULT_LEASE))
    except ValueError:
        return DEFAULT_LEASE


def write_private(path: str, data: str) -> None:
    """Write *path* atomically, mode 0600, through a fresh temporary name created with
    O_EXCL|O_NOFOLLOW: a file or symlink planted next to it is never followed nor reused."""
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), secrets.token_hex(6))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def other_node(state: Optional[dict]) -> bool:
    """True when *state* is that of an agent started on another host."""
    return bool(state) and state.get("host", socket.gethostname()) != socket.gethostname()


def other_node_message(workdir: str, state: dict) -> str:
    """Why ``start`` refuses: the workdir's agent runs on another login node."""
    here, there = socket.gethostname(), state.get("host", "?")
    left = float(state.get("lease_until", 0)) - time.time()
    return ("the agent for workdir %s runs on login node %s (pid %s), but this connection "
            "reached login node %s. Two agents on one workdir would each take the other's "
            "jobs for lost, so none is started here.\nFix: point 'host =' in this cluster's "
            "section of the cloudexec config at %s (the node the agent runs on), or give each "
            "login node a workdir of its own. If %s is down, its lease runs out in %.0f s and "
            "the next start takes the workdir over.\n"
            % (workdir, there, state.get("pid", "?"), here, there, there, max(0.0, left)))


class AgentPaths:
    """Where the agent keeps its files under a workdir."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.dir = os.path.join(workdir, "agent")
        self.state = os.path.join(self.dir, "agent.json")
        self.log = os.path.join(self.dir, "agent.log")
        self.journal = os.path.join(self.dir, "journal.sqlite")
        self.lock = os.path.join(self.dir, "start.lock")
        self.jobs = os.path.join(workdir, "jobs")


def _alive(pid: int) -> bool:
    """True for a running process (a zombie, common in containers without init, is not)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _running_agent(path: str) -> Optional[dict]:
    """The state of the agent that runs and listens on this host, or None (no file, a
    stale one, or one of another host)."""
    state = _read_state(path)
    if state and not other_node(state) and _alive(int(state.get("pid", 0))) and \
            _answers(int(state.get("port", 0))):
        return state
    return None


def _read_state(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def start_daemon(workdir: str, run: Callable[[AgentPaths], None], wait: float = 20.0) -> int:
    """Start the agent (``run(paths)``, in a daemon process) unless one runs; print its
    state line.

    Prints ``READY <agent.json>`` (with the secret, for the client at the other end
    of the SSH channel) and returns 0, or prints the reason on stderr and returns 1
    (:data:`EXIT_OTHER_NODE` when the workdir's agent runs on another login node and its
    lease holds). Holds ``start.lock`` so that concurrent starters make a single agent.
    """
    paths = AgentPaths(workdir)
    os.makedirs(paths.dir, mode=0o700, exist_ok=True)
    with open(paths.lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _read_state(paths.state)
        if other_node(found) and float(found.get("lease_until", 0)) > time.time():  # type: ignore
            sys.stderr.write(other_node_message(workdir, found))  # type: ignore[arg-type]
            return EXIT_OTHER_NODE
        state = _running_agent(paths.state)
        if state is None:
            try:
                child = _fork()
            except OSError as e:
                sys.stderr.write("cannot start the agent: fork failed (%s) even after "
                                 "retrying: the login node is out of processes or memory\n" % e)
                return 1
            if child == 0:  # first child: new session, then the daemon forks off
                os.setsid()
                if _fork() == 0:
                    os.close(lock.fileno())  # else the daemon would hold start.lock forever
                    _run_daemon(paths, run)
                os._exit(0)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                state = _running_agent(paths.state)
                if state is not None:
                    break
                time.sleep(0.02)
            else:
                tail = ""
                try:
                    with open(paths.log) as f:
                        tail = "".join(f.readlines()[-20:])
                except OSError:
                    pass
                sys.stderr.write("the agent did not start within %.0f s; %s:\n%s"
                                 % (wait, paths.log, tail))
                return 1
    # stdout is the SSH channel back to the client: the secret never touches a command line
    sys.stdout.write("READY %s\n" % json.dumps(state))
    return 0


#: errnos of a fork or exec that may work a moment later (process or memory limits)
RESOURCE_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})


def _fork(tries: int = 6) -> int:
    """os.fork, tried again with backoff (0.1 .. 3.2 s) while the system is short of
    processes or memory."""
    for i in range(tries):
        try:
            return os.fork()
        except OSError as e:
            if e.errno not in RESOURCE_ERRNOS or i == tries - 1:
                raise
            time.sleep(0.1 * 2 ** i)
    raise AssertionError("unreachable")


def _run_daemon(paths: AgentPaths, run: Callable[[AgentPaths], None]) -> None:
    code = 0
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        logfd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                        0o600)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(message)s")
        run(paths)
    except BaseException:
        log.exception("agent crashed")
        code = 1
    finally:
        os._exit(code)


def retire_other_protocol(workdir: str, wait: float = 20.0) -> Optional[Dict]:
    """Run by ``start`` before it starts or reuses an agent: an agent of another protocol
    version in this workdir cannot talk to this bundle's clients, so stop it (SIGTERM) if no
    job is active in its journal; this bundle's agent then takes its place. Busy, it is left
    alone and its state (no secret) with its active jobs (``jobs``) is returned; None when
    the way is clear.

    Jobs survive an agent's SIGTERM and the next agent adopts them, which is safe across
    protocol versions only while the journal's rows still parse as this code's job specs:
    checked once the old agent is gone (a job it accepted between the check and the
    signal); if one does not, it is reported as busy too.
    """
    paths = AgentPaths(workdir)
    if not os.path.exists(paths.state):
        return None
    os.makedirs(paths.dir, exist_ok=True)
    with open(paths.lock, "w") as lock:  # the lock start_daemon takes: one starter at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(paths.state) as f:
                state = json.load(f)
            pid = int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if state.get("protocol") == PROTOCOL_VERSION or not _agent_process(pid, workdir):
            return None
        public = {k: v for k, v in state.items() if k not in PRIVATE_KEYS}
        jobs = _active_jobs(paths.journal)
        if jobs:
            return dict(public, jobs=jobs)
        _note(paths, "stopping idle agent pid %d (protocol %s, version %s): a starter of "
              "protocol %d takes its place" % (pid, state.get("protocol"), state.get("version"),
                                                PROTOCOL_VERSION))
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while _agent_process(pid, workdir) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _agent_process(pid, workdir):  # no job to lose: it only holds the port
            os.kill(pid, signal.SIGKILL)
        unsafe = [j for j in _active_jobs(paths.journal) if not j.get("adoptable")]
        if unsafe:
            return dict(public, jobs=unsafe)
    return None


def _agent_process(pid: int, workdir: str) -> bool:
    """*pid* runs (not a zombie) and is an agent of *workdir*: a stale agent.json's pid may
    belong to another process by now."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        return os.path.normpath(workdir) in [os.path.normpath(a) for a in argv if a]
    except (OSError, IndexError):
        return False


def _active_jobs(journal: str) -> List[Dict]:
    """Active jobs of a journal (maybe another version's), each marked ``adoptable`` when
    its spec parses as this code's JobSpec."""
    if not os.path.exists(journal):
        return []
    import sqlite3
    db = sqlite3.connect(journal, timeout=30)
    try:
        finals = [s.value for s in JobState if s.final]
        rows = db.execute("SELECT job_id, label, client, state, spec FROM jobs WHERE state "
                          "NOT IN (%s)" % ",".join("?" * len(finals)), finals).fetchall()
    except sqlite3.Error as e:
        return [{"job_id": "?", "label": "unreadable journal: %s" % e, "adoptable": False}]
    finally:
        db.close()
    out = []
    for job_id, label, client, state, spec in rows:
        try:
            JobSpec.from_dict(json.loads(spec)).validate()
            ok = True
        except (TypeError, ValueError, KeyError):
            ok = False
        out.append({"job_id": job_id, "label": label, "client": client, "state": state,
                    "adoptable": ok})
    return out


def _note(paths: AgentPaths, text: str) -> None:
    with open(paths.log, "a") as f:
        f.write("%s INFO %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), text))
