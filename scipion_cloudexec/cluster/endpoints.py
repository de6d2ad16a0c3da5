"""What the desktop remembers of a cluster's agent (its ``READY`` line: port, secret, CURVE
key and staging endpoint), so that the next protocol process reaches the agent and stages
with no remote command at all: ``~/.cache/scipion-cloudexec/endpoints/<key>.json``, mode
0600 in a 0700 folder, one file per cluster (user, host, port, workdir), readable by you
alone like your SSH key (the same SSH login reads the cluster's own copy). Never in the
project, never logged.

A stale entry (the agent was replaced or is gone) costs one refused port forward: the
client forgets it and starts the agent, or a staging server, over SSH as without one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

from ..config import ClusterConfig
from ..remote.daemon import write_private

log = logging.getLogger(__name__)


def folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "scipion-cloudexec", "endpoints")


def _path(cluster: ClusterConfig) -> str:
    ident = "%s@%s:%s%s" % (cluster.user, cluster.host, cluster.port, cluster.workdir)
    return os.path.join(folder(), hashlib.sha256(ident.encode()).hexdigest()[:24] + ".json")


def load_agent(cluster: ClusterConfig, version: str) -> Optional[dict]:
    """The ``READY`` state of *cluster*'s agent of *version* as last reached, if known."""
    try:
        with open(_path(cluster)) as f:
            entry = json.load(f)
        agent = entry["agent"]
        if entry.get("version") == version and agent.get("version") == version and \
                int(agent["port"]) > 0 and agent["secret"]:
            return dict(agent, stage=entry.get("stage"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def load(cluster: ClusterConfig, version: str) -> Optional[dict]:
    """The endpoint of *cluster*'s agent of *version* (``{"port", "token"}``), if known."""
    stage = (load_agent(cluster, version) or {}).get("stage")
    try:
        if int(stage["port"]) > 0 and len(bytes.fromhex(stage["token"])) >= 16:
            return {"port": int(stage["port"]), "token": stage["token"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


AGENT_KEYS = ("pid", "port", "version", "protocol", "secret", "curve", "host")


def save(cluster: ClusterConfig, version: str, stage: dict,
         agent: Optional[dict] = None) -> None:
    """Remember *stage* (and the *agent*'s ``READY`` state) for the next process (best
    effort: a failure only costs time)."""
    try:
        os.makedirs(folder(), mode=0o700, exist_ok=True)
        entry = {"version": version,
                 "stage": {"port": int(stage["port"]), "token": stage["token"]}}
        if agent is not None:
            entry["agent"] = {k: agent.get(k) for k in AGENT_KEYS}
        write_private(_path(cluster), json.dumps(entry))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("%s: staging endpoint not remembered: %s", cluster.name, e)


def forget(cluster: ClusterConfig) -> None:
    try:
        os.unlink(_path(cluster))
    except OSError:
        pass
