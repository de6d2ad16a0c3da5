"""The receiving half of staging: a run folder's changes back from the cluster (three-way,
see :mod:`.sync`) and ``fetch`` of any path under the workdir.

Every file lands in a new temporary file beside its destination (created exclusively,
never through a link) and is renamed into place only with the listing's hash; no path or
link may lead out of the folder written into. Mixed into :class:`~.stager.Stager`, whose
``_ask`` carries the requests.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..config import ClusterConfig
from ..remote.hashing import BLOCK, HashCache, path_state
from ..remote.paths import inside
from ..remote.stage_protocol import ListTree, Send
from .errors import DesktopFull, LinkLost, StagingError
from .local_files import (TEMP_PREFIX, _UMASK, Progress, StageReport, _excluded, _temp_name,
                          _tick)
from .remote_tree import RemoteTree
from .sync import DIR, GatherPlan, plan_gather, under
from . import streams


class Gathering:
    """``gather`` and ``fetch``, for :class:`~.stager.Stager`."""

    cluster: ClusterConfig
    hash_cache_path: str
    #: each run folder's mirror as last listed, by (mirror root, run folder, exclude)
    _trees: Dict[tuple, RemoteTree]

    def gather(self, project_root: str, project: str, run_dir: str, base: Dict[str, str],
               exclude: Sequence[str] = (), progress: Optional[Progress] = None
               ) -> StageReport:
        """Bring what changed in the mirror's *run_dir* since *base* into the local run
        folder (three-way, see :mod:`.sync`): files, folders (empty ones too), links that
        stay inside the run folder, deletions. A path that changed locally too is left
        alone and listed in ``report.conflicts``; a file that changed while it was sent
        is left for the next gather (``report.deferred``); FIFOs, sockets and devices are
        listed in ``report.skipped``. ``report.agreed`` holds the new base states."""
        t0 = time.monotonic()
        root = os.path.realpath(project_root)
        run_dir = os.path.normpath(run_dir)
        guard = os.path.realpath(os.path.join(root, run_dir))
        remote_root = self.mirror_root(project)
        key = (remote_root, run_dir, tuple(exclude))
        tree = self._trees.get(key) or RemoteTree(run_dir, exclude)
        _ch, listing = self._ask(ListTree(root=remote_root, dir=run_dir,
                                          exclude=[os.path.relpath(e, run_dir) for e in exclude],
                                          track=True, since=tree.token))
        if not listing.get("exists", True):
            raise StagingError("the run folder %s is gone from the mirror on %s: nothing was "
                               "changed locally; Restart the protocol" % (run_dir, self.cluster.name))
        tree.apply(listing)  # the server keeps what it sent: our copy must follow it now
        self._trees[key] = tree
        report = StageReport(refused=[tuple(r) for r in listing["refused"]] +
                             list(tree.outside.items()),
                             skipped=[tuple(r) for r in listing.get("skipped", [])])
        remote, sizes = tree.states, tree.sizes
        # only paths where the cluster and the base differ need a decision: a set
        # operation in C, not a loop over the run folder (issue 13)
        todo = [k for k, _s in base.items() ^ remote.items()
                if under(k, run_dir) and not _excluded(k, exclude)]
        memo = HashCache(self.hash_cache_path)
        try:
            plan = plan_gather(remote, sizes, base,
                               lambda rel: path_state(os.path.join(root, rel), memo),
                               self.cluster.name, paths=todo)
        finally:
            memo.close()
        report.files = len(sizes)
        report.bytes_total = sum(sizes.values())
        report.conflicts = plan.conflicts
        report.agreed.update(plan.agreed)
        self._apply(plan, root, guard, remote_root, report, progress)
        report.seconds = time.monotonic() - t0
        return report

    def _apply(self, plan: GatherPlan, root: str, guard: str, remote_root: str,
               report: StageReport, progress: Optional[Progress]) -> None:
        """Carry out a gather plan: files and links out of the way, folders, contents and
        links, then folders the cluster removed (when empty)."""
        def dest_of(rel: str) -> Optional[str]:
            return self._guarded(root, guard, rel, report)

        for rel, here in plan.delete:
            if here != DIR and (dest := dest_of(rel)) is not None:
                os.unlink(dest)
                report.agreed[rel] = ""  # a folder made in its place below says so
        kept = set()  # folders the cluster removed that still hold files made here since
        for rel, here in sorted(plan.delete, key=lambda x: -x[0].count("/")):
            if here == DIR and (dest := dest_of(rel)) is not None:
                try:
                    os.rmdir(dest)  # deepest first: their files went above
                    report.agreed[rel] = ""
                except OSError:  # those files go up next time
                    kept.add(rel)
        replaced = [rel for rel, _t in plan.links] + [rel for rel, _s, _h in plan.fetch]
        report.conflicts += [(rel, "now a folder holding files made here, a file or link on "
                              "%s" % self.cluster.name) for rel in replaced if rel in kept]
        for rel in sorted(plan.mkdirs, key=lambda r: r.count("/")):
            if (dest := dest_of(rel)) is not None:
                os.makedirs(dest, exist_ok=True)
                report.agreed[rel] = DIR
        for rel, target in plan.links:
            if rel not in kept and self._link(root, guard, rel, target, report):
                report.agreed[rel] = "l:" + target
        wanted = [(rel, dest, size, sha) for rel, size, sha in plan.fetch
                  if rel not in kept and (dest := dest_of(rel)) is not None]
        if wanted:
            self._receive(remote_root, wanted, report, progress)
            fetched = set(report.fetched)
            report.agreed.update((rel, sha) for rel, _d, _s, sha in wanted if rel in fetched)

    def fetch(self, remote_path: str, to: str, progress: Optional[Progress] = None) -> StageReport:
        """Copy a file or folder under the workdir (path relative to it) into folder *to*."""
        rel = os.path.normpath(remote_path.strip("/"))
        parent, name = os.path.split(rel)
        remote_root = "%s/%s" % (self.cluster.workdir.rstrip("/"), parent) if parent \
            else self.cluster.workdir
        os.makedirs(to, exist_ok=True)
        dest = os.path.realpath(to)
        return self._fetch(remote_root, name, dest, dest, progress)

    def _fetch(self, remote_root: str, sub: str, local_root: str, guard: str,
               progress: Optional[Progress]) -> StageReport:
        t0 = time.monotonic()
        _ch, listing = self._ask(ListTree(root=remote_root, dir=sub))
        report = StageReport(refused=[(r, why) for r, why in listing["refused"]])
        wanted: List[Tuple[str, str, int, str]] = []
        memo = HashCache(self.hash_cache_path)
        try:
            for rel, size, _mtime, sha in listing["files"]:
                report.files += 1
                report.bytes_total += size
                report.hashes[rel] = sha
                dest = self._guarded(local_root, guard, rel, report)
                if dest is None:
                    continue
                if os.path.isfile(dest) and not os.path.islink(dest) and \
                        os.path.getsize(dest) == size and memo.get(dest) == sha:
                    report.unchanged += 1
                    continue
                wanted.append((rel, dest, size, sha))
        finally:
            memo.close()
        for rel, target in listing["links"]:
            self._link(local_root, guard, rel, target, report)
        if wanted:
            self._receive(remote_root, wanted, report, progress)
        if report.deferred:
            raise StagingError("files on %s changed while they were fetched: %s; fetch again "
                               "once they are written" % (self.cluster.name,
                                                          ", ".join(report.deferred)))
        report.seconds = time.monotonic() - t0
        return report

    @staticmethod
    def _guarded(local_root: str, guard: str, rel: str, report: StageReport) -> Optional[str]:
        dest = os.path.join(local_root, rel)
        parent = os.path.realpath(os.path.dirname(dest))
        if os.path.isabs(rel) or ".." in rel.split(os.sep) or not inside(parent, guard) or (
                os.path.islink(dest) and not inside(os.path.realpath(dest), guard, strictly=True)):
            report.refused.append((rel, "would be written outside %s" % guard))
            return None
        return dest

    def _link(self, local_root: str, guard: str, rel: str, target: str,
              report: StageReport) -> bool:
        """Make the symbolic link *rel* -> *target*, only if it resolves inside *guard*."""
        dest = self._guarded(local_root, guard, rel, report)
        if dest is None:
            return False
        resolved = os.path.realpath(os.path.join(os.path.dirname(dest), target))
        if not inside(resolved, guard, strictly=True):
            report.refused.append((rel, "symbolic link to %s, outside %s" % (target, guard)))
            return False
        if os.path.islink(dest) and os.readlink(dest) == target:
            return True
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = _temp_name(dest)
        os.symlink(target, tmp)  # fails rather than follow anything already there
        os.replace(tmp, dest)
        report.fetched.append(rel)
        return True

    def _receive(self, remote_root: str, wanted: List[Tuple[str, str, int, str]],
                 report: StageReport, progress: Optional[Progress]) -> None:
        """Receive files ``(rel, dest, size, sha)``, *sha* from the listing. Each lands in
        a new temporary file beside *dest* (created exclusively, never through a link) and
        is renamed into place only with the listing's hash; one that changed since the
        listing goes to ``report.deferred``, a corrupted one fails the gather."""
        total = sum(w[2] for w in wanted)
        bad: List[str] = []
        big = [w for w in wanted if w[2] >= streams.CHUNKED_MIN]
        if big and streams.fixed_streams(self.cluster) != 1:
            bad += self._receive_chunked(remote_root, big, report, progress, total)
            wanted = [w for w in wanted if w[2] < streams.CHUNKED_MIN]
            if not wanted:
                if bad:
                    raise StagingError("files from %s arrived corrupted or changed while "
                                       "sent, not kept: %s; gather again"
                                       % (self.cluster.name, ", ".join(bad)))
                return
        ch, header = self._ask(Send(root=remote_root, paths=[w[0] for w in wanted]),
                               bulk=self._wants_bulk(total))
        try:
            for i, (rel, dest, _size, sha) in enumerate(wanted):
                if i:
                    header = ch.line()
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                h = hashlib.sha256()
                fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=os.path.dirname(dest))
                try:
                    with os.fdopen(fd, "wb") as f:
                        left = header["size"]
                        while left:
                            block = ch.out.read(min(BLOCK, left))
                            if not block:
                                raise LinkLost("connection to %s lost while receiving %s"
                                                   % (self.cluster.name, rel))
                            f.write(block)
                            h.update(block)
                            left -= len(block)
                            _tick(progress, report, len(block), total, i, len(wanted))
                    trailer = ch.line()
                    got = h.hexdigest()
                    if got == sha:
                        os.chmod(tmp, 0o666 & ~_UMASK)
                        os.replace(tmp, dest)
                        report.hashes[rel] = sha
                        report.fetched.append(rel)
                    elif got == trailer["sha256"]:
                        report.deferred.append(rel)  # written to while sent: next time
                    else:
                        bad.append(rel)
                finally:
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
        except OSError as e:
            self._drop(ch)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DesktopFull(self.cluster.name, os.path.dirname(wanted[0][1]),
                                  sum(w[2] for w in wanted)) from None
            raise
        except BaseException:
            self._drop(ch)
            raise
        if bad:
            raise StagingError("files from %s arrived corrupted and were not kept: %s"
                               % (self.cluster.name, ", ".join(bad)))

    def _receive_chunked(self, remote_root: str, big: List[Tuple[str, str, int, str]],
                         report: StageReport, progress: Optional[Progress], total: int
                         ) -> List[str]:
        """Large files in chunks over parallel streams (:mod:`.streams`), each
        into a partial file beside its destination, renamed into place only when the whole
        file has the listing's hash. A cut download leaves its partial file and the record
        of its whole chunks: the next gather of that content asks only for the others.
        Returns the files refused."""
        if self._pool is None:
            self._pool = self._new_pool()
        parts: List[str] = []
        have: Dict[str, Set[int]] = {}
        bad: List[str] = []
        for rel, dest, size, sha in big:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            part = _part_path(dest, sha)
            _drop_parts(dest, keep=part)  # partials of another content of this file
            have[part] = _resume(part, size)
            parts.append(part)
        try:
            self._pool.download(remote_root, [(w[0], p, w[2]) for w, p in zip(big, parts)],
                                lambda n: _tick(progress, report, n, total, 0, len(big)),
                                have=have, chunk_done=_record_chunk)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DesktopFull(self.cluster.name, os.path.dirname(big[0][1]),
                                  sum(w[2] for w in big)) from None
            raise
        for (rel, dest, _size, sha), part in zip(big, parts):
            h = hashlib.sha256()
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(8 * BLOCK), b""):
                    h.update(block)
            if h.hexdigest() == sha:
                os.chmod(part, 0o666 & ~_UMASK)
                os.replace(part, dest)
                report.hashes[rel] = sha
                report.fetched.append(rel)
            else:
                bad.append(rel)
            _drop_parts(dest)  # its record; a bad partial too: all of it comes again
        return bad


# ---- partial downloads ---------------------------------------------------------------------

PART = TEMP_PREFIX + "part-"  # a TEMP_PREFIX name: never walked, listed or staged


def _part_path(dest: str, sha: str) -> str:
    """The partial file of content *sha* for *dest*: named after both, so a cut download
    of the same content resumes and a partial of other content is known as stale."""
    tag = hashlib.sha256(os.path.basename(dest).encode()).hexdigest()[:12]
    return os.path.join(os.path.dirname(dest), "%s%s-%s" % (PART, tag, sha[:32]))


def _drop_parts(dest: str, keep: str = "") -> None:
    tag = os.path.basename(_part_path(dest, ""))
    folder = os.path.dirname(dest)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(tag) and path not in (keep, keep + ".chunks"):
            os.unlink(path)


def _resume(part: str, size: int) -> Set[int]:
    """The chunks an earlier download wrote whole into *part* (recorded with this chunk
    size, in a regular file of this size), or none, after making *part* afresh. The
    whole-file hash decides in the end: a record that lies costs a refetch, never a file."""
    try:
        st = os.lstat(part)
        with open(part + ".chunks") as f:
            head, *indices = f.read().split("\n")
        if stat.S_ISREG(st.st_mode) and st.st_size == size and head == "chunk %d" % streams.CHUNK:
            return {int(i) for i in indices if i.isdigit()}
    except (OSError, ValueError):
        pass
    for path in (part, part + ".chunks"):
        if os.path.lexists(path):
            os.unlink(path)
    os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
    with open(part + ".chunks", "x") as f:
        f.write("chunk %d\n" % streams.CHUNK)
    return set()


def _record_chunk(part: str, index: int) -> None:
    """*index* of *part* is written whole (one short append: whole lines even with several
    streams writing the same record)."""
    fd = os.open(part + ".chunks", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        os.write(fd, b"%d\n" % index)
    finally:
        os.close(fd)
