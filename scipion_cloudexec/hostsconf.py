"""Scipion's ``hosts.conf``: the part that makes each cluster a queue of the ``cloudexec``
queue system, written from the clusters file, and the command Scipion runs as its
``SUBMIT_COMMAND``.

``scipion-cloudexec hostsconf [--write [PATH]]`` calls :func:`host_values` and
:func:`merge`: every ``[cluster NAME]`` and ``[group NAME]`` of the clusters file (and
``all`` when there are several clusters) becomes a queue of the host section, with its
parameters and their help; the keys the plugin owns are replaced, the others (and every
other section) kept as they were, so writing twice changes nothing.

pyworkflow reads hosts.conf with ``RawConfigParser(comment_prefixes=";")``: a ``#`` line
is not a comment there. Everything written here uses ``;`` comments.

Scipion calls ``SUBMIT_COMMAND`` only when a protocol itself would go to the queue: "Use
queue" with no queue chosen in the queue dialog (it starts empty), or "Steps on the
cluster" (``QUEUE_FOR_JOBS``) not ``Y``. With a queue and ``Y``, the protocol runs on the
desktop and its steps' jobs go to the cluster (executors/seam.py); nothing is submitted.
So :func:`refuse_submit` always refuses, saying what to pick.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .config import ClusterConfig

QUEUE_SYSTEM = "cloudexec"
#: keys of the host section written by :func:`host_values` (replaced on every write)
OWNED = ("NAME", "MANDATORY", "SUBMIT_COMMAND", "SUBMIT_TEMPLATE", "CHECK_COMMAND",
         "CANCEL_COMMAND", "QUEUES")
#: written only when the section lacks it (Scipion's own local MPI command)
DEFAULTS = {"PARALLEL_COMMAND": "mpirun -np %_(JOB_NODES)d %_(COMMAND)s"}
MARK = "; scipion-cloudexec:"


class HostsConfError(ValueError):
    """hosts.conf cannot take the cloudexec part as asked (e.g. another queue system)."""


def command_prefix() -> List[str]:
    """The absolute command that runs this plugin's command line from Scipion's processes
    (whose PATH need not hold it): the installed ``scipion-cloudexec`` script beside this
    Python, else this Python with ``-m scipion_cloudexec.cli``."""
    exe = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "scipion-cloudexec")
    if os.access(exe, os.X_OK):
        return [exe]
    found = shutil.which("scipion-cloudexec")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "scipion_cloudexec.cli"]


def _queue_params(clusters: Sequence[ClusterConfig], summary: str) -> List[List[str]]:
    """pyworkflow's queue parameters ``[[VAR, default, label, help], ...]`` of one queue."""
    params = [["QUEUE_FOR_JOBS", "Y", "Steps on the cluster",
               "%s. Keep Y: the protocol runs on this desktop and each of its steps' jobs runs "
               "on the cluster; anything else is refused." % summary]]
    slurm = [c for c in clusters if c.launcher == "slurm"]
    if slurm:
        params.append(["CLOUD_TIME", slurm[0].time, "Wall time",
                       "SLURM wall time of each job, e.g. 04:00:00 (empty: the clusters "
                       "file's time, else the partition's default)"])
    params += [
        ["CLOUD_POOL", "0", "Worker pool ranks",
         "Many small steps: run single-rank steps on an mpi4py worker pool of this many ranks, "
         "held on the cluster while the protocol runs (0: off, each step is its own job)"],
        ["CLOUD_RETRIES", "2", "Retries",
         "Times a job is tried again after a failure of the cluster or the link (never after "
         "the program's own failure)"],
        ["CLOUD_RECONNECT", "30", "Reconnect for (s)",
         "Seconds a step tries to reach its cluster again after losing contact (its job goes "
         "on there) before the job moves to another cluster"],
        ["CLOUD_JOBS", "0", "Jobs at once",
         "At most this many of the protocol's jobs on the cluster(s) at once (empty or 0: as "
         "many as the clusters' free slots take, ranks x threads each). The form's threads "
         "then bound only the steps running on this desktop: a step waiting on its cluster "
         "job lends its thread to the next step"],
    ]
    return params


def _describe(c: ClusterConfig) -> str:
    return "%s@%s, %s launcher, %d slots%s" % (c.user, c.host, c.launcher, c.slots,
                                               ", GPUs %s" % ",".join(map(str, c.gpus))
                                               if c.gpus else "")


def queues(clusters: Mapping[str, ClusterConfig],
           groups: Mapping[str, Sequence[str]]) -> Dict[str, List[List[str]]]:
    """The ``QUEUES`` of the cloudexec host: one per cluster, one per group, and ``all``
    when there are several clusters (a name that is both a cluster and a group is the
    cluster, as the executor reads it)."""
    out: Dict[str, List[List[str]]] = {}
    for name, c in clusters.items():
        out[name] = _queue_params([c], "Cluster %s: %s" % (name, _describe(c)))
    for name, members in groups.items():
        if name not in out:
            out[name] = _queue_params([clusters[m] for m in members],
                                      "Group %s: jobs shared between clusters %s"
                                      % (name, ", ".join(members)))
    if len(clusters) > 1 and "all" not in out:
        out["all"] = _queue_params(list(clusters.values()), "All clusters (%s): each job "
                                   "goes where it would finish first" % ", ".join(clusters))
    return out


def host_values(clusters: Mapping[str, ClusterConfig], groups: Mapping[str, Sequence[str]],
                config_path: Optional[str] = None,
                prefix: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The keys of the host section that make *clusters* queues of the cloudexec system,
    as hosts.conf text values (multi-line values without their indentation).

    Args:
        clusters, groups: as the clusters file defines them.
        config_path: the clusters file the commands name (``--config``); None: none
            (they then read the default one, as the executor does).
        prefix: the plugin's command (default :func:`command_prefix`), absolute.
    """
    cmd = list(prefix or command_prefix())
    if config_path:
        cmd += ["--config", os.path.abspath(config_path)]
    base = " ".join(shlex.quote(a) for a in cmd)
    q = queues(clusters, groups)
    text = "{\n" + ",\n".join(
        "%s: [\n    %s]" % (json.dumps(name), ",\n    ".join(json.dumps(p) for p in params))
        for name, params in q.items()) + "\n}"
    return {
        "NAME": QUEUE_SYSTEM,
        "MANDATORY": "0",
        "SUBMIT_COMMAND": '%s queue-submit --queue "%%_(JOB_QUEUE)s" --steps '
                          '"%%_(QUEUE_FOR_JOBS)s" %%_(JOB_SCRIPT)s' % base,
        "SUBMIT_TEMPLATE": "#!/bin/sh\n%_(JOB_COMMAND)s",
        "CHECK_COMMAND": "true",
        "CANCEL_COMMAND": "%s cancel %%_(JOB_ID)s" % base,
        "QUEUES": text,
    }


# ---- merging into an existing hosts.conf ----------------------------------------------

def _blocks(lines: List[str]) -> List[Tuple[Optional[str], List[str]]]:
    """A section's body as (key or None, its lines): a key line with its continuation
    lines; comment and blank lines are their own blocks (key None)."""
    out: List[Tuple[Optional[str], List[str]]] = []
    for line in lines:
        stripped = line.strip()
        if line[:1] in (" ", "\t") and stripped and out and out[-1][0] is not None:
            out[-1][1].append(line)  # continuation of a value
        elif not stripped or stripped[0] in ";#" or ("=" not in line and ":" not in line):
            out.append((None, [line]))
        else:
            sep = min(i for i in (line.find("="), line.find(":")) if i >= 0)
            out.append((line[:sep].strip(), [line]))
    return out


def _format(key: str, value: str) -> List[str]:
    first, *rest = value.split("\n")
    return ["%s = %s" % (key, first)] + ["    " + r for r in rest]


def merge(text: str, values: Mapping[str, str], host: str = "localhost",
          source: str = "") -> str:
    """*text* (a hosts.conf, possibly empty) with *values* in section ``[host]``.

    Owned keys are replaced where they are, missing ones appended to the section; other
    keys, comments and sections stay as they were. The result of merging the same values
    twice is the same text.

    Raises:
        HostsConfError: the section already names another queue system.
    """
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "[%s]" % host), None)
    if start is None:
        head = lines + ([""] if lines and lines[-1].strip() else [])
        body: List[str] = []
        tail: List[str] = []
    else:
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].startswith("[")), len(lines))
        head, body, tail = lines[:start], lines[start + 1:end], lines[end:]
    blocks = _blocks(body)
    current = {k: "\n".join(ls) for k, ls in blocks if k}
    name = current.get("NAME", "").partition("=")[2].strip()
    if name and name != QUEUE_SYSTEM:
        raise HostsConfError("[%s] of hosts.conf already holds the queue system %r: pyworkflow "
                             "allows one per host. Write the cloudexec queues to another host "
                             "section (--host NAME) or remove that one." % (host, name))
    wanted = dict(values)
    for k, v in DEFAULTS.items():
        if k not in current:
            wanted[k] = v
    done = set()
    new_body: List[str] = []
    for key, ls in blocks:
        if key is None and ls[0].startswith(MARK):
            continue  # our note, written again below
        if key in wanted:
            if key not in done:
                new_body += _format(key, wanted[key])
                done.add(key)
            continue
        new_body += ls
    while new_body and not new_body[-1].strip():
        new_body.pop()
    for key in list(DEFAULTS) + list(OWNED):
        if key in wanted and key not in done:
            new_body += _format(key, wanted[key])
    note = ["%s %s written by 'scipion-cloudexec hostsconf'%s; run it again after "
            "changing the clusters file" % (MARK, ", ".join(OWNED),
                                            " from " + source if source else "")]
    out = head + ["[%s]" % host] + note + new_body + ([""] + tail if tail else [])
    return "\n".join(out) + "\n"


def write(path: str, values: Mapping[str, str], host: str = "localhost",
          source: str = "") -> Tuple[bool, Optional[str]]:
    """Merge *values* into the hosts.conf at *path* (made if missing).

    Returns:
        (changed, backup path): nothing is written when the file already holds them; else
        the previous file, if any, is kept as ``PATH.bak-<date>`` first.
    """
    try:
        with open(path) as f:
            old: Optional[str] = f.read()
    except FileNotFoundError:
        old = None
    new = merge(old or "", values, host, source)
    if new == old:
        return False, None
    backup = None
    if old is not None:
        backup = "%s.bak-%s" % (path, time.strftime("%Y%m%d-%H%M%S"))
        n = 1
        while os.path.exists(backup):
            n += 1
            backup = "%s.bak-%s-%d" % (path, time.strftime("%Y%m%d-%H%M%S"), n)
        shutil.copy2(path, backup)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".cloudexec-tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)
    return True, backup


def scipion_hosts_path() -> str:
    """The hosts.conf Scipion reads when a project has none of its own (as pyworkflow's
    ``Project._loadHosts`` finds it)."""
    import pyworkflow as pw
    return os.path.join(os.path.dirname(pw.Config.SCIPION_LOCAL_CONFIG), pw.Config.SCIPION_HOSTS)


# ---- SUBMIT_COMMAND -------------------------------------------------------------------

def refuse_submit(queue: str, steps: str, known: Sequence[str]) -> str:
    """Why Scipion's attempt to submit a protocol to a cloudexec queue is refused, and what
    to pick in the queue dialog instead (one line: Scipion shows it in the protocol's
    error)."""
    names = ", ".join(known) or "(none: the clusters file defines no cluster)"
    if not queue.strip():
        return ("scipion-cloudexec: no queue was chosen in the queue dialog. With 'Use queue? "
                "Yes', press the queue button next to it, pick a cluster (%s) and keep "
                "'Steps on the cluster' = Y; or set 'Use queue?' to No to run on this "
                "desktop." % names)
    where = "cluster %s" % queue if queue in known else "queue %s" % queue
    return ("scipion-cloudexec: 'Steps on the cluster' is %r for %s: it must be Y. The "
            "protocol itself always runs on this desktop and only its steps' jobs go to the "
            "cluster; set it back to Y in the queue dialog (queues: %s)."
            % (steps, where, names))
