"""Starting the agent as a daemon: one per workdir, under a lock, its state in agent.json.

Shipped to the cluster: standard library only.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Callable, Optional

log = logging.getLogger("cloudexec.agent")


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
    """The state of the agent that runs and listens, or None (no file, or a stale one)."""
    state = _read_state(path)
    if state and _alive(int(state.get("pid", 0))) and _answers(int(state.get("port", 0))):
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
    of the SSH channel) and returns 0, or prints the
    reason on stderr and returns 1. Holds ``start.lock`` so that concurrent
    starters make a single agent.
    """
    paths = AgentPaths(workdir)
    os.makedirs(paths.dir, exist_ok=True)
    with open(paths.lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _running_agent(paths.state)
        if state is None:
            if os.fork() == 0:  # first child: new session, then the daemon forks off
                os.setsid()
                if os.fork() == 0:
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


def _run_daemon(paths: AgentPaths, run: Callable[[AgentPaths], None]) -> None:
    code = 0
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        logfd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
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
