"""The identity of one run of a protocol on the desktop: its mirror's name, its token,
its job ids and attempts, where each job went, and its sync state (:mod:`..cluster.sync`).
Split from :mod:`.runner`, which runs the jobs."""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
import threading
import uuid
from typing import Dict, List, Optional, Set, Tuple

from ..cluster.sync import SyncState


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


class ProtocolRun:
    """The identity of one run of a protocol, as files and job ids see it."""

    def __init__(self, project_root: str, project_name: str, run_dir: str, prot_id: int):
        self.project_root = os.path.abspath(project_root)
        self.run_dir = os.path.relpath(os.path.abspath(run_dir), self.project_root)
        self.prot_id = prot_id
        # two desktops with the same user, path and project name must not share a mirror
        where = "%s@%s:%s" % (getpass.getuser(), socket.gethostname(), self.project_root)
        self.mirror = "%s-%s" % (_safe(project_name), hashlib.sha256(where.encode()).hexdigest()[:8])
        self.logs = os.path.join(self.project_root, self.run_dir, "logs")
        self._token: Optional[str] = None
        self._sync: Optional[SyncState] = None
        self._counts: Dict[int, int] = {}
        self._lock = threading.Lock()
        self._placements_lock = threading.Lock()
        self._by_job: Optional[Dict[str, List[Dict[str, str]]]] = None
        self._all: List[Dict[str, str]] = []  # the same records, in the file's order
        # (job, cluster) placed before a reset of that cluster's mirror: never reused
        self._voided: Set[Tuple[str, str]] = set()

    @property
    def token(self) -> str:
        """Random per run; kept across resumes in logs/cloudexec.json, new after a restart."""
        if self._token is None:
            path = os.path.join(self.logs, "cloudexec.json")
            try:
                with open(path) as f:
                    self._token = json.load(f)["token"]
            except (OSError, ValueError, KeyError):
                self._token = uuid.uuid4().hex[:8]
                os.makedirs(self.logs, exist_ok=True)
                with open(path, "w") as f:
                    json.dump({"token": self._token}, f)
        return self._token

    @property
    def sync(self) -> SyncState:
        """What the run folder and each cluster's mirror of it last agreed on."""
        with self._lock:
            if self._sync is None:
                self._sync = SyncState(self.logs)
            return self._sync

    def _placed(self) -> Dict[str, List[Dict[str, str]]]:
        """Placement records by job (attempt suffix dropped), oldest first: the file read
        once, then kept in step by :meth:`place` (only this process writes it while the
        run is on; reading it again per step cost O(steps) each, issue 13)."""
        with self._placements_lock:
            if self._by_job is None:
                self._by_job = {}
                try:
                    with open(os.path.join(self.logs, "cloudexec-placements.jsonl")) as f:
                        for line in f:
                            self._index(json.loads(line))
                except OSError:
                    pass
            return self._by_job

    def _index(self, record: Dict[str, str]) -> None:
        assert self._by_job is not None
        if "reset" in record:
            self._voided.update((p["job_id"], p["cluster"]) for p in self._all
                                if p.get("cluster") == record["reset"])
            return
        self._all.append(record)
        job, _dot, attempt = record.get("job_id", "").rpartition(".")
        key = job if _dot and attempt.isdigit() else record.get("job_id", "")
        self._by_job.setdefault(key, []).append(record)

    def _placements(self, containing: str = "") -> List[Dict[str, str]]:
        """The placement records, oldest first (only those naming *containing*)."""
        self._placed()
        with self._placements_lock:
            return [p for p in self._all
                    if containing in p.get("job_id", "") or containing in p.get("cluster", "")]

    def _attempts(self, job_id: str) -> List[Tuple[str, str]]:
        """(attempt id, cluster) of a job, oldest first, as earlier processes placed them."""
        return [(p["job_id"], p["cluster"]) for p in list(self._placed().get(job_id, ()))
                if p.get("job_id") == job_id or p.get("job_id", "").startswith(job_id + ".")]

    def placed_on(self, cluster: str) -> List[str]:
        """Every job id this run sent to *cluster*, oldest first."""
        return list(dict.fromkeys(p["job_id"] for p in self._placements(cluster)
                                  if p.get("cluster") == cluster))

    def latest(self, job_id: str) -> Optional[Tuple[str, str]]:
        """The newest attempt of a job and its cluster, if an earlier process placed it."""
        found = self._attempts(job_id)
        return found[-1] if found else None

    def latest_on(self, job_id: str, cluster: str) -> Optional[str]:
        """The newest attempt of a job placed on *cluster*, if any."""
        found = [a for a, c in self._attempts(job_id) if c == cluster]
        return found[-1] if found else None

    def next_attempt(self, job_id: str) -> str:
        """A new attempt's id: ``<job_id>.2``, ``.3``... (never one used before)."""
        with self._lock:
            n = len({a for a, _c in self._attempts(job_id)})
            return "%s.%d" % (job_id, n + 1) if n else job_id

    def voided(self, job_id: str, cluster: str) -> bool:
        """Whether *job_id* was placed on *cluster* before its mirror of the run was last
        emptied: what the job wrote there is gone, so its result must not be reused."""
        self._placed()
        with self._placements_lock:
            return (job_id, cluster) in self._voided

    def place(self, job_id: str, cluster: str) -> None:
        """Remember where a job went, so a resumed run attaches to it there."""
        self._append({"job_id": job_id, "cluster": cluster})

    def mirror_reset(self, cluster: str) -> None:
        """*cluster*'s mirror of the run is about to be emptied: the jobs placed there so
        far are void (written first: a crash in between only costs a rerun)."""
        self._append({"reset": cluster})

    def _append(self, record: Dict[str, str]) -> None:
        with self._lock:
            os.makedirs(self.logs, exist_ok=True)
            placed = self._placed()
            with open(os.path.join(self.logs, "cloudexec-placements.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            with self._placements_lock:
                if placed is self._by_job:
                    self._index(record)

    def job_id(self, step_id: int) -> str:
        with self._lock:
            n = self._counts[step_id] = self._counts.get(step_id, 0) + 1
        return "%s-%d-%s-s%d-%d" % (self.mirror[:40], self.prot_id, self.token, step_id, n)
