"""What a scientist reads at the end of the demo: where each step ran and how long it took
(the protocol's steps and the plugin's provenance, ``Runs/<id>/logs/cloudexec.jsonl``), and
the output sets with their sizes, from the project database. Also the progress line shown
while protocols run (read from each protocol's ``logs/run.stdout``)."""
from __future__ import annotations

import json
import os
import re
import socket
from typing import Dict, List, Optional

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"STARTED: (\w+), step (\d+)")
_FINISHED = re.compile(r"FINISHED: (\w+), step (\d+)")
_ITERATION = re.compile(r"Expectation iteration (\d+) of (\d+)")
_ON_CLUSTER = re.compile(r"cloudexec: job \S+ on cluster (\S+)")


def provenance(prot) -> Dict[int, dict]:
    """The plugin's provenance records of *prot*'s steps that ran on a cluster, by step index
    (the last attempt of each)."""
    path = os.path.join(prot.getWorkingDir(), "logs", "cloudexec.jsonl")
    out: Dict[int, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line) if line.strip() else {}
                if "step" in r and "started" in r:
                    out[int(r["step"])] = r
    return out


def progress_of(prot) -> str:
    """A few words on where *prot* is, from its log: the running step, where it runs, RELION's
    iteration, how many steps are done."""
    path = os.path.join(prot.getWorkingDir(), "logs", "run.stdout")
    try:
        with open(path, errors="replace") as f:
            text = _ANSI.sub("", f.read())
    except OSError:
        return "starting"
    started = _STARTED.findall(text)
    done = len(_FINISHED.findall(text))
    if not started:
        return "starting"
    words = ""
    if done < len(started):
        words = started[-1][0]
        it = _ITERATION.findall(text)
        cluster = _ON_CLUSTER.findall(text)
        if cluster:
            words += " on " + cluster[-1]
        if it and "Relion" in words:
            words += ", iteration %s/%s" % it[-1]
        words += "; "
    return words + "%d step(s) done" % done


def relion_mpi_hosts(prot) -> str:
    """RELION's own account of its MPI ranks and their hosts, from the step's log."""
    path = os.path.join(prot.getWorkingDir(), "logs", "run.stdout")
    try:
        with open(path, errors="replace") as f:
            text = _ANSI.sub("", f.read())
    except OSError:
        return ""
    ranks = re.findall(r"Number of MPI processes\s*=\s*(\d+)", text)
    hosts = re.findall(r"runs on host\s*=\s*(\S+)", text)
    if not ranks:
        return ""
    return "RELION's log: %s MPI processes, on host %s" % (ranks[-1], ", ".join(sorted(set(hosts))))


def _seconds(step) -> float:
    return step.getElapsedTime().total_seconds()


def where_and_how_long(prot, desktop: Optional[str] = None,
                       cluster_hosts: Optional[Dict[str, str]] = None) -> List[str]:
    """Lines, one per step: its name, where it ran (the desktop, or the cluster, its host and
    launcher, from the provenance) and how long it took (the step's own start and end; for a
    cluster step also the job's time on the cluster)."""
    desktop = desktop or socket.gethostname()
    records = provenance(prot)
    lines = []
    for index, step in enumerate(prot.loadSteps(), 1):
        name = step.funcName.get() if hasattr(step, "funcName") else type(step).__name__
        r = records.get(index)
        status = step.getStatus() if hasattr(step, "getStatus") else "finished"
        if r is None:
            where = "desktop (%s)" % desktop if status == "finished" else "(%s)" % status
            extra = ""
        else:
            host = (cluster_hosts or {}).get(r["cluster"], r.get("host", ""))
            where = "cluster %s: %s, %s, %d rank(s)" % (r["cluster"], host, r["launcher"],
                                                       r.get("ranks", 1))
            job = (r.get("ended") or 0) - (r.get("started") or 0)
            extra = "  (job %.1f s there, %s; %d file(s) staged in, %d gathered)" % (
                job, r.get("state"), len(r.get("inputs", {})), len(r.get("outputs", {})))
        lines.append("    %-19s %-50s %6.1f s%s" % (name, where, _seconds(step), extra))
    return lines


def output_sizes(prot) -> List[str]:
    """'name: N Kind' for each output set of *prot*, as stored in the project."""
    out = []
    for name, obj in prot.iterOutputAttributes():
        size = obj.getSize() if hasattr(obj, "getSize") else None
        out.append("%s: %s %s" % (name, size if size is not None else "-", type(obj).__name__))
    return out


def protocol_time(prot) -> float:
    """The protocol's wall time in seconds (pyworkflow's own start and end)."""
    try:
        return prot.getElapsedTime().total_seconds()
    except Exception:
        return 0.0
