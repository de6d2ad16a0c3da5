"""The sync model between a local run folder and its mirror on one cluster.

Every path of the run folder has a *state*: "" (nothing), "d" (a folder), "l:TARGET" (a
symbolic link) or the SHA-256 of a file. For each cluster the desktop keeps the *base*:
the state both sides agreed on at their last sync (:class:`SyncState`, in the run's
``logs/``). A change is whatever differs from the base, on either side:

* stage-in sends what changed locally (L != B), and the cluster writes it only where its
  mirror still holds B; a path both sides changed is a conflict, never overwritten;
* a gather brings what changed on the cluster (R != B), and writes it only where the
  local run folder still holds B; the same rule the other way round;
* what one side deleted is deleted on the other, under the same condition.

A file a running job is writing is never pushed back over (it changed on the cluster, so
the desktop only sends it if the desktop changed it too: a conflict); a gather taken
while it was being written is superseded by the gather after that job ends. docs/SYNC.md
says more.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from ..remote.hashing import open_wal

DIR = "d"


class SyncConflict(RuntimeError):
    """Paths changed both on the desktop and on a cluster since their last sync."""

    def __init__(self, cluster: str, paths: Iterable[Tuple[str, str]]):
        self.paths = sorted(paths)
        super().__init__(
            "cloudexec: %d path(s) of the run folder changed both on the desktop and on cluster "
            "%s since they were last in step; nothing was overwritten:\n  %s\nTwo steps (or a "
            "step and a local change) wrote the same file: fix the protocol or its inputs, "
            "then Restart the run." % (len(self.paths), cluster, "\n  ".join(
                "%s (%s)" % (p, why) for p, why in self.paths)))


class SyncState:
    """The base of each cluster for one run, kept in ``logs/cloudexec-sync.sqlite`` (the
    run folder's ``logs/`` never travels; Restart deletes it with the rest)."""

    def __init__(self, logs_dir: str):
        os.makedirs(logs_dir, exist_ok=True)
        self._db = open_wal(os.path.join(logs_dir, "cloudexec-sync.sqlite"), threads=True)
        self._db.execute("CREATE TABLE IF NOT EXISTS base (cluster TEXT, path TEXT, state TEXT,"
                         " PRIMARY KEY (cluster, path))")
        self._db.execute("CREATE TABLE IF NOT EXISTS clusters (cluster TEXT PRIMARY KEY)")
        self._db.execute("CREATE TABLE IF NOT EXISTS abandoned (cluster TEXT PRIMARY KEY)")
        self._lock = threading.Lock()
        # each cluster's base as committed, read once: one protocol process owns the run
        # (pyworkflow runs it once at a time) and every write goes through this object
        self._bases: Dict[str, Dict[str, str]] = {}

    def known(self, cluster: str) -> bool:
        """Whether this run already synced with *cluster* (else its mirror is stale)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM clusters WHERE cluster=?",
                                    (cluster,)).fetchone() is not None

    def met(self, cluster: str) -> None:
        """*cluster*'s mirror of the run was reset: in step from now on."""
        self._write([("INSERT OR IGNORE INTO clusters VALUES (?)", [(cluster,)]),
                     ("DELETE FROM abandoned WHERE cluster=?", [(cluster,)])])

    def abandon(self, cluster: str) -> None:
        """The run's work left *cluster* (lost, its jobs moved elsewhere): forget its base,
        so the next contact stops the run's jobs still there and empties its mirror."""
        self._write([("DELETE FROM base WHERE cluster=?", [(cluster,)]),
                     ("DELETE FROM clusters WHERE cluster=?", [(cluster,)]),
                     ("INSERT OR IGNORE INTO abandoned VALUES (?)", [(cluster,)])],
                    lambda: self._bases.pop(cluster, None))

    def abandoned(self, cluster: str) -> bool:
        """Whether jobs of this run may still run on *cluster*, unobserved."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM abandoned WHERE cluster=?",
                                    (cluster,)).fetchone() is not None

    def base(self, cluster: str) -> Dict[str, str]:
        """*cluster*'s base (a copy)."""
        with self._lock:
            return dict(self._base(cluster))

    def _base(self, cluster: str) -> Dict[str, str]:
        if cluster not in self._bases:
            self._bases[cluster] = dict(self._db.execute(
                "SELECT path, state FROM base WHERE cluster=?", (cluster,)))
        return self._bases[cluster]

    def update(self, cluster: str, states: Dict[str, str]) -> None:
        """Record agreed states; "" drops a path."""
        if not states:
            return

        def in_memory() -> None:
            base = self._base(cluster)
            for p, s in states.items():
                if s:
                    base[p] = s
                else:
                    base.pop(p, None)
        self._write([("DELETE FROM base WHERE cluster=? AND path=?",
                      [(cluster, p) for p, s in states.items() if not s]),
                     ("INSERT OR REPLACE INTO base VALUES (?,?,?)",
                      [(cluster, p, s) for p, s in states.items() if s])], in_memory)

    def _write(self, statements: List[Tuple[str, List[tuple]]],
               then: Callable[[], object] = lambda: None) -> None:
        """Run (sql, rows) statements as one transaction; *then* (the copy in memory)
        once it is committed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    self._db.executemany(sql, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            then()

    def close(self) -> None:
        self._db.close()


@dataclass
class GatherPlan:
    """What a gather does locally, decided from the listing, the base and local states."""
    fetch: List[Tuple[str, int, str]] = field(default_factory=list)  # (rel, size, sha)
    links: List[Tuple[str, str]] = field(default_factory=list)  # (rel, target)
    mkdirs: List[str] = field(default_factory=list)
    delete: List[Tuple[str, str]] = field(default_factory=list)  # (rel, local state)
    agreed: Dict[str, str] = field(default_factory=dict)  # already equal: base only
    conflicts: List[Tuple[str, str]] = field(default_factory=list)


def plan_gather(remote: Dict[str, str], sizes: Dict[str, int], base: Dict[str, str],
                local: Callable[[str], str], cluster: str,
                paths: Optional[Iterable[str]] = None) -> GatherPlan:
    """Three-way decision for every path the cluster or the base knows (under the run
    folder, already filtered by the caller), or only for *paths* (the caller knows the
    others hold their base state on the cluster)."""
    plan = GatherPlan()
    for rel in sorted(set(remote) | set(base) if paths is None else set(paths)):
        r, b = remote.get(rel, ""), base.get(rel, "")
        if r == b:
            continue  # the cluster did not touch it since the last sync
        here = local(rel)
        if here == r:
            plan.agreed[rel] = r
        elif here != b:
            plan.conflicts.append((rel, "now %s here, %s on %s" % (
                _shown(here), _shown(r), cluster)))
        elif r == "":
            plan.delete.append((rel, here))
        elif r == DIR:
            if here:
                plan.delete.append((rel, here))
            plan.mkdirs.append(rel)
        else:
            if here == DIR:  # a folder the cluster replaced by a file or a link
                plan.delete.append((rel, here))
            if r.startswith("l:"):
                plan.links.append((rel, r[2:]))
            else:
                plan.fetch.append((rel, sizes[rel], r))
    return plan


def _shown(state: str) -> str:
    if not state:
        return "deleted"
    if state == DIR:
        return "a folder"
    if state.startswith("l:"):
        return "a link to %s" % state[2:]
    return "content %s" % state[:12]


def under(rel: str, prefix: Optional[str]) -> bool:
    return prefix is not None and (rel == prefix or rel.startswith(prefix.rstrip("/") + "/"))
