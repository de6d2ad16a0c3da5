"""Starting a cluster's agent over SSH, for :class:`~.session.ClusterSession`: the bundle
uploaded if missing, pyzmq provided if the cluster's python lacks it, the bundle's
``start`` run and its state line read (``READY``, or ``BUSY`` for a busy agent of another
protocol), an idle agent of another version replaced.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Callable, Dict

from ..config import ClusterConfig
from ..remote import messages as m
from ..version import PROTOCOL_VERSION
from . import bundle, provision
from .errors import AgentStartError, VersionMismatch

if TYPE_CHECKING:
    from .session import ClusterSession

log = logging.getLogger(__name__)



def start_agent(session: "ClusterSession", uploaded: Callable[[], None] = lambda: None) -> Dict:
    """Upload the bundle if missing (and pyzmq, when the cluster's python lacks it), run
    its ``start``; return the agent's state line. *uploaded* is called right after an
    upload, before the start."""
    c, ssh = session.cluster, session.ssh
    cmd = bundle.command(c, "start", "--workdir", c.workdir, "--idle-timeout",
                         "%g" % c.agent_idle_timeout, "--heartbeat", "%g" % c.heartbeat)
    # one remote shell for the usual case (the bundle is there): each costs the user's
    # shell start-up (~/.bashrc, module systems), often more than the round trip
    res = ssh.run(bundle.if_intact(c, cmd), timeout=60)
    if res.exit_status == bundle.NO_WORKDIR:
        raise AgentStartError(str(bundle.no_workdir(c, res.stderr)))
    if bundle.NO_BUNDLE in res.stdout.decode(errors="replace"):
        bundle.upload(ssh, c)
        uploaded()
        res = ssh.run(cmd, timeout=60)
    remote = provision.RemotePython.from_output(res.stdout.decode(errors="replace"))
    if res.exit_status != 0 and remote is not None:  # its python lacks pyzmq: add it
        try:
            session.provisioned = provision.provide(ssh, c, remote)
        except (provision.ProvisionError, OSError) as e:
            raise AgentStartError(str(e)) from None
        log.info("%s: %s", c.name, session.provisioned)
        res = ssh.run(cmd, timeout=60)
    out = res.stdout.decode(errors="replace")
    err = res.stderr.decode(errors="replace").strip()
    if "BUSY " in out:  # a busy agent of another protocol: left alone (remote/server.py)
        raise _busy_other_protocol(c, json.loads(out.split("BUSY ", 1)[1].splitlines()[0]))
    if res.exit_status != 0 or "READY " not in out:
        raise AgentStartError(_explain_start_failure(c, res.exit_status, err, out))
    return json.loads(out.split("READY ", 1)[1].splitlines()[0])


def _busy_other_protocol(c: ClusterConfig, state: Dict) -> VersionMismatch:
    jobs = state.get("jobs", [])
    listed = "; ".join("%s (%s%s)" % (j.get("job_id"), j.get("state"),
                                      ", " + j["label"] if j.get("label") else "")
                       for j in jobs[:10]) + ("; ..." if len(jobs) > 10 else "")
    return VersionMismatch(
        "cluster %s runs the cloudexec agent of protocol %s (version %s, pid %s) with %d "
        "active job(s): %s. This client speaks protocol %d (version %s) and cannot talk to "
        "it. Those jobs are left running: let them end, following them with the "
        "scipion-cloudexec release that started them (scipion-cloudexec jobs %s), then "
        "run again: an idle agent of another protocol is replaced automatically."
        % (c.name, state.get("protocol"), state.get("version"), state.get("pid"),
           len(jobs), listed, PROTOCOL_VERSION, bundle.build()[1], c.name))


def _explain_start_failure(c: ClusterConfig, status: int, err: str, out: str) -> str:
    text = err or out
    if status == 127 or "not found" in text or "No such file" in text:
        return ("python %r not found on cluster %s: set 'python' in [cluster %s] of %s to "
                "the remote interpreter (it needs pyzmq).\n%s"
                % (c.python, c.name, c.name, c.source, text))
    if "pyzmq" in text or "No module named 'zmq'" in text:
        return ("the remote python %s on %s lacks pyzmq: install it there "
                "(%s -m pip install pyzmq).\n%s" % (c.python, c.name, c.python, text))
    return ("the agent did not start on %s (exit %d%s); its log there: %s/agent/agent.log"
            "\n%s" % (c.name, status, "" if err else ", nothing on stderr", c.workdir.rstrip("/"),
                       ("stdout:\n" + out) if out and not err else text))


def replace_agent(session: "ClusterSession", welcome: m.Welcome) -> None:
    """Stop an idle agent of another version, or refuse if it is busy."""
    reply = session.agent.request(m.Shutdown(only_if_idle=True))
    if not reply.ok:  # type: ignore[attr-defined]
        raise VersionMismatch(
            "cluster %s runs agent version %s (pid %d) with %s; this client needs version %s. "
            "Wait for those jobs to end (scipion-cloudexec jobs %s), or install the agent's "
            "version here." % (session.cluster.name, welcome.version, welcome.pid,
                               reply.detail, bundle.build()[1], session.cluster.name))  # type: ignore
    log.info("replaced idle agent %s on %s", welcome.version, session.cluster.name)
    session.agent.disconnect()
    pid = int(welcome.pid)
    for _ in range(100):
        if session.ssh.run("kill -0 %d" % pid).exit_status != 0:
            return
        time.sleep(0.1)


def ensure(session: "ClusterSession", module: str, package: str) -> None:
    """Make *module* importable by the agent's python on the cluster, installing *package*
    into the workdir if it is missing (see :mod:`.provision`).

    Raises:
        AgentStartError: it is missing and cannot be installed (says how to fix).
    """
    c = session.cluster
    cmd = bundle.command(c, "has", module, package)
    # the bundle is checked here too: a session that reached a known agent ran no start
    res = session.ssh.run(bundle.if_intact(c, cmd), timeout=60)
    if bundle.NO_BUNDLE in res.stdout.decode(errors="replace"):
        bundle.upload(session.ssh, c)
        res = session.ssh.run(cmd, timeout=60)
    remote = provision.RemotePython.from_output(res.stdout.decode(errors="replace"))
    if res.exit_status == 0 or remote is None:
        return  # there (or the probe itself failed: the job will say why)
    try:
        done = provision.provide(session.ssh, c, remote)
    except (provision.ProvisionError, OSError) as e:
        raise AgentStartError(str(e)) from None
    log.info("%s: %s", c.name, done)
    session.provisioned = "; ".join(filter(None, (session.provisioned, done)))
