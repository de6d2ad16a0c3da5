"""The agent's durable job journal: one sqlite file under ``<workdir>/agent/``.

Every job and state change is committed before the client hears of it, so an
agent that restarts (or a client that reconnects) finds every job again.

Shipped to the cluster with the agent: standard library only.
"""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Dict, List, Optional

from .jobs import FINAL_STATES, JobSpec, JobState

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    client      TEXT NOT NULL DEFAULT '',
    label       TEXT NOT NULL DEFAULT '',
    scheduler   TEXT NOT NULL,
    launcher_id TEXT NOT NULL DEFAULT '',
    state       TEXT NOT NULL,
    exit_code   INTEGER,
    reason      TEXT NOT NULL DEFAULT '',
    cancelled   INTEGER NOT NULL DEFAULT 0,
    submitted   REAL NOT NULL,
    started     REAL NOT NULL DEFAULT 0,
    ended       REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS pending_cancels (
    scheduler   TEXT NOT NULL,
    key         TEXT NOT NULL,
    argv        TEXT NOT NULL,
    added       REAL NOT NULL,
    PRIMARY KEY (scheduler, key)
);
"""

#: columns added after the first release, with their definitions (old journals get them)
ADDED_COLUMNS = {"seen": "REAL NOT NULL DEFAULT 0"}

COLUMNS = ("job_id", "client", "label", "scheduler", "launcher_id", "state", "exit_code",
           "reason", "cancelled", "submitted", "started", "ended", "seen")


class Journal:
    """Jobs by id, with their state; the single writer is the agent's main thread."""

    def __init__(self, path: str):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a killed agent; only a host crash may lose the last commits
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for name, definition in ADDED_COLUMNS.items():
            if name not in have:
                self.db.execute("ALTER TABLE jobs ADD COLUMN %s %s" % (name, definition))

    def add(self, spec: JobSpec, scheduler: str) -> bool:
        """Record a new job; False when the id is already known (nothing changes)."""
        try:
            self.db.execute(
                "INSERT INTO jobs(job_id, spec, client, label, scheduler, state, submitted)"
                " VALUES (?,?,?,?,?,?,?)",
                (spec.job_id, json.dumps(spec.to_dict()), spec.client, spec.label, scheduler,
                 JobState.SUBMITTED.value, time.time()))
            return True
        except sqlite3.IntegrityError:
            return False

    def update(self, job_id: str, **fields: Any) -> None:
        """Set columns of one job (state as a JobState or its value)."""
        if "state" in fields:
            fields["state"] = JobState(fields["state"]).value
        cols = ", ".join("%s=?" % k for k in fields)
        self.db.execute("UPDATE jobs SET %s WHERE job_id=?" % cols, (*fields.values(), job_id))

    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        row = self.db.execute("SELECT %s FROM jobs WHERE job_id=?" % ", ".join(COLUMNS),
                              (job_id,)).fetchone()
        return dict(zip(COLUMNS, row)) if row else None

    def spec(self, job_id: str) -> Optional[JobSpec]:
        row = self.db.execute("SELECT spec FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return JobSpec.from_dict(json.loads(row[0])) if row else None

    def active(self) -> List[Dict[str, Any]]:
        """Jobs not in a final state."""
        finals = tuple(s.value for s in FINAL_STATES)
        rows = self.db.execute("SELECT %s FROM jobs WHERE state NOT IN (%s)"
                               % (", ".join(COLUMNS), ",".join("?" * len(finals))), finals)
        return [dict(zip(COLUMNS, r)) for r in rows]

    def recent(self, limit: int = 100) -> List[Dict[str, Any]]:
        """Newest jobs first, each with ``cores`` (ranks x threads) from its spec."""
        rows = self.db.execute("SELECT %s, spec FROM jobs ORDER BY submitted DESC LIMIT ?"
                               % ", ".join(COLUMNS), (limit,))
        out = []
        for r in rows:
            row = dict(zip(COLUMNS, r))
            spec = json.loads(r[-1])
            row["cores"] = int(spec.get("ranks", 1)) * int(spec.get("threads", 1))
            out.append(row)
        return out

    def close(self) -> None:
        self.db.close()


class PendingCancels:
    """A scheduler's cancel commands not carried out yet (``scancel`` while slurmctld does
    not answer), kept in the journal's file so that the next agent issues them again: a job
    whose cancel was pending when its agent stopped would otherwise run on, unobserved.

    Used from the scheduler's own thread (its own connection; sqlite serializes the writes
    with the agent's journal connection).
    """

    def __init__(self, path: str, scheduler: str):
        self.scheduler = scheduler
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                  timeout=30.0)
        self.db.executescript(SCHEMA)

    def load(self) -> Dict[str, List[str]]:
        """{key: argv} of the cancels still to do."""
        rows = self.db.execute("SELECT key, argv FROM pending_cancels WHERE scheduler=? "
                               "ORDER BY added", (self.scheduler,))
        return {k: json.loads(a) for k, a in rows}

    def put(self, key: str, argv: List[str]) -> None:
        self.db.execute("INSERT OR REPLACE INTO pending_cancels(scheduler, key, argv, added) "
                        "VALUES (?,?,?,?)", (self.scheduler, key, json.dumps(argv), time.time()))

    def done(self, key: str) -> None:
        self.db.execute("DELETE FROM pending_cancels WHERE scheduler=? AND key=?",
                        (self.scheduler, key))

    def close(self) -> None:
        self.db.close()
