"""A run's provenance records while its jobs run, and what Scipion's Stop leaves in the run.

The executor appends a step's record to ``Runs/<id>/logs/cloudexec.jsonl`` when its job has
ended and its outputs are back. Scipion's Stop runs hosts.conf's ``CANCEL_COMMAND``
(``scipion-cloudexec cancel CLUSTER:JOB``) for every running job, then kills the protocol
process: the executor never gets to write anything. So:

* while a job runs, its record so far (cluster, command, inputs) waits in
  ``logs/cloudexec-pending/<job>.json`` (:func:`write_pending`, :func:`drop_pending`);
* ``cancel``, run by Scipion with the project folder as working directory, finds the run
  folder from the job id (:func:`find_run_dir`), writes "cancel sent to job ..." into the
  run's log and completes the pending record as cancelled (:func:`note_cancel`).

``provenance`` reads both files (:func:`read_records`).
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from typing import Any, Dict, List, Optional

PENDING = "cloudexec-pending"
RECORDS = "cloudexec.jsonl"
#: the executor's job ids: <mirror>-<protocol id>-<run token>-s<step>-<n>[.<attempt>]
JOB_RE = re.compile(r"-(\d+)-([0-9a-f]{8})-s(\d+)-\d+(?:\.\d+)?$")


def _pending_path(logs: str, job_id: str) -> str:
    return os.path.join(logs, PENDING, job_id + ".json")


def write_pending(logs: str, record: Dict[str, Any]) -> None:
    """Keep a running job's record so far (Stop completes it, see :func:`note_cancel`)."""
    path = _pending_path(logs, record["job_id"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, sort_keys=True)
    os.replace(tmp, path)


def drop_pending(logs: str, job_id: str) -> None:
    """The job's final record was written: its pending one goes."""
    try:
        os.unlink(_pending_path(logs, job_id))
    except FileNotFoundError:
        pass


def find_run_dir(job_id: str, project_dir: str = ".") -> Optional[str]:
    """The run folder (under *project_dir*) of a job the executor named, or None: the
    protocol id and the run's token are in the job id."""
    m = JOB_RE.search(job_id)
    if not m:
        return None
    prot_id, token = int(m.group(1)), m.group(2)
    for logs in glob.glob(os.path.join(project_dir, "Runs", "%06d_*" % prot_id, "logs")):
        try:
            with open(os.path.join(logs, "cloudexec.json")) as f:
                if json.load(f).get("token") == token:
                    return os.path.dirname(logs)
        except (OSError, ValueError):
            continue
    return None


def note_cancel(run_dir: str, job_id: str, cluster: str, was: str,
                row: Optional[Dict[str, Any]] = None) -> str:
    """After ``cancel`` of a job of *run_dir*: say so in the run's log and record the step
    as cancelled in its provenance (unless the executor recorded its end already).

    Args:
        was: the job's state when the cancel reached the agent.
        row: the agent's journal row of the job (launcher id, start), if known.

    Returns:
        The line written to the log.
    """
    logs = os.path.join(run_dir, "logs")
    line = ("cloudexec: cancel sent to job %s on %s (Scipion's Stop); it was %s"
            % (job_id, cluster, was))
    with open(os.path.join(logs, "run.stdout"), "a") as f:
        f.write("%s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), line))
    pending = _pending_path(logs, job_id)
    claimed = pending + ".cancel"
    try:
        os.replace(pending, claimed)  # the executor may be writing its own end right now
    except FileNotFoundError:
        return line  # ended and recorded by the executor, or never started there
    with open(claimed) as f:
        record = json.load(f)
    row = row or {}
    record.update(state="cancelled", exit_code=None, ended=time.time(), outputs={},
                  started=row.get("started") or record.get("started") or 0,
                  launcher_id=row.get("launcher_id") or record.get("launcher_id"),
                  reason="cancelled by Scipion's Stop (was %s)" % was)
    with open(os.path.join(logs, RECORDS), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    os.unlink(claimed)
    return line


def read_records(run_dir: str) -> List[Dict[str, Any]]:
    """A run's provenance records, oldest first: ended jobs (the last record of a job id
    wins), then jobs still running or cut short with no end recorded (state "running?")."""
    logs = os.path.join(run_dir, "logs")
    try:
        with open(os.path.join(logs, RECORDS)) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        records = []
    latest: Dict[str, Dict[str, Any]] = {}
    for r in records:
        latest.pop(r["job_id"], None)
        latest[r["job_id"]] = r
    for path in sorted(glob.glob(os.path.join(logs, PENDING, "*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if r.get("job_id") not in latest:
            latest[r["job_id"]] = dict(r, state="running?", exit_code=None,
                                       reason="no end recorded: still running, or the "
                                              "protocol process was killed")
    return list(latest.values())
