"""The cluster side of staging, run as ``python agent.zip stage COMMAND`` over an SSH exec
channel; its stdin/stdout are the channel. Shipped with the agent (stdlib only).

Layout under the workdir: ``cache/`` (see :mod:`.cache`) and ``projects/<name>/...``, the
project mirrors: inputs are hard links into the cache, run folders hold private files.

``python agent.zip stage serve --workdir W`` then serves requests, one JSON line each, for as
long as the channel stays open, so a client pays the SSH session start once. The requests,
their answers and the version handshake are defined in :mod:`.stage_protocol`. Over 400
lines: one handler per request, each short; the cache they share is :mod:`.cache`.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import select
import shutil
import stat
import sys
import threading
import time
from typing import BinaryIO, Dict, List, Optional, Tuple

from . import chunks
from .cache import Cache, StageError
from .hashing import BLOCK, HashCache, path_state
from .listing import Listings
from .stage_protocol import (STAGE_PROTOCOL, BadRequest, CacheInfo, Chunk, ChunkPlan, Hello,
                             ListTree, Mirrors, Publish, Remove, Request, Reset, Send, SendRange,
                             StageIn, decode, mismatch)

RESERVE = 0.01  # keep 1% of the disk free


def safe_rel(rel: str) -> str:
    """A normalized relative path that stays below its root, or StageError."""
    if rel and rel[0] != "/" and rel[-1] != "/" and "\0" not in rel:
        wrapped = "/%s/" % rel  # already normal and below its root: the usual case, cheap
        if "//" not in wrapped and "/./" not in wrapped and "/../" not in wrapped:
            return rel
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == ".." or norm.startswith("../") or "\0" in rel or not rel:
        raise StageError("path %r leaves its root" % rel)
    return norm


class StallingInput(io.RawIOBase):
    """stdin that gives up after *timeout* seconds without a byte (None: waits forever).
    A link cut at the far side leaves sshd and this server waiting for hours; a server
    that gives up lets go of its partial upload, which the next try then resumes.
    Reads go straight into the caller's buffer; select() runs only when no data waits."""

    def __init__(self, fd: int):
        self.fd = fd
        self.timeout: Optional[float] = None
        os.set_blocking(fd, False)
        self._file = io.FileIO(fd, "rb", closefd=False)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while True:
            n = self._file.readinto(b)
            if n is not None:
                return n
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                raise StageError("no data for %.0f s: the link or the client is gone"
                                 % self.timeout)


ALIVE = 1.0  # seconds between keep-alive lines while a request is worked on


class Answers:
    """The server's output stream: JSON lines (answers and keep-alives, one writer at a
    time) and, for :class:`Send`, raw bytes between them."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self._lock = threading.Lock()

    def line(self, obj) -> None:
        with self._lock:
            self.stream.write(json.dumps(obj).encode() + b"\n")
            self.stream.flush()


class _KeepAlive:
    """While a request is worked on (hashing a large output, copying a large file), a
    ``{"alive": 1}`` line every ALIVE seconds: the client's dead-link timer measures the
    link, not the server's work. Not used while raw bytes are being sent."""

    def __init__(self, out: Answers):
        self.out = out

    def __enter__(self) -> "_KeepAlive":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(ALIVE):
            self.out.line({"alive": 1})

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class StreamBroken(StageError):
    """The byte stream is out of step with the requests: the server must stop."""


def cmd_in(cache: "Cache", hashes: HashCache, request: StageIn, stdin: io.BufferedReader,
           out: Answers) -> None:
    """Files of ``[rel, size, sha]`` are inputs: hard links into the cache. Files of
    ``[rel, size, sha, base, shared]`` belong to a run folder: written only where the
    mirror still holds *base* (what the client last synced; "" for nothing), as private
    copies a job may rewrite (hard links when *shared*: inputs linked into the run folder);
    elsewhere they are reported in ``conflicts`` and left alone."""
    workdir = cache.workdir
    mirror = request.mirror
    mirror_root = os.path.join(workdir, safe_rel(mirror))
    prefix = mirror_root.rstrip("/") + "/"  # joined by hand: os.path.join per file cost more
    os.makedirs(mirror_root, exist_ok=True)
    for rel in request.dirs:
        if rel != ".":
            os.makedirs(os.path.join(mirror_root, safe_rel(rel)), exist_ok=True)
    files: List[Tuple[str, int, str]] = []
    private: set = set()
    conflicts: List[List[str]] = []
    unchanged = 0
    for entry in request.files:
        rel, size, sha = safe_rel(entry[0]), int(entry[1]), str(entry[2])
        if len(entry) > 3:  # run folder: only over what the client last saw there
            now = path_state(prefix + rel, hashes)
            if now == sha:
                unchanged += 1
            elif now != entry[3]:
                conflicts.append([rel, now])
            else:
                files.append((rel, size, sha))
                if not (len(entry) > 4 and entry[4]):
                    private.add(rel)
            continue
        files.append((rel, size, sha))
    hashes.flush()
    records = cache.records({sha for _r, _s, sha in files})
    # one lstat per unchanged input: a mirror file sharing the verified object's inode,
    # size and mtime is that object, untouched
    todo: List[Tuple[str, int, str]] = []
    for rel, size, sha in files:
        rec = records.get(sha)
        if rec is not None and rec[0] == size and rec[2] is not None and rel not in private:
            try:
                st = os.lstat(prefix + rel)
                if (st.st_ino, st.st_size, st.st_mtime_ns) == (rec[2], size, rec[1]):
                    unchanged += 1
                    continue
            except FileNotFoundError:
                pass
        todo.append((rel, size, sha))
    missing: Dict[str, Tuple[int, int]] = {}
    repaired = 0
    for _rel, size, sha in todo:
        if sha in missing:
            continue
        ok, corrupt = cache.present(sha, size, records.get(sha))
        repaired += corrupt
        if not ok:
            missing[sha] = (size, cache.partial_size(sha, size))
    needed = sum(size - off for size, off in missing.values())
    usage = shutil.disk_usage(workdir)
    free = usage.free - int(usage.total * RESERVE)
    order = sorted(missing)
    answer = {"missing": [[sha, missing[sha][1]] for sha in order], "needed": needed,
              "free": max(free, 0)}
    if request.check:  # link what is here; the client sends the rest in a later request
        _count(cache, mirror, 0, 0)
        linked, same, errors = _link_all(cache, mirror_root, todo, set(missing), private)
        out.line(dict(answer, linked=linked, unchanged=unchanged + same, repaired=repaired,
                    errors=errors, conflicts=conflicts))
        return
    if needed > free:
        out.line({"error": "nospace", "needed": needed, "free": max(free, 0)})
        return
    out.line(answer)
    errors: List[str] = []
    bad: List[str] = []  # arrived with another hash: changed while sent, or corrupted
    refused: set = set()  # could not resume: another upload took the partial file
    received = 0
    stdin.raw.timeout = float(request.stall)
    try:
        for sha in order:
            size, offset = missing[sha]
            try:
                why = cache.receive(sha, size, offset, stdin)
            except StageError as e:
                raise StreamBroken(str(e)) from None
            received += size - offset
            if why and why.startswith("upload of"):  # raced with another upload: not the
                errors.append(why + "; stage again")  # file's fault
                refused.add(sha)
            elif why:
                bad.append(sha)
        _count(cache, mirror, received, len(order) - len(bad) - len(refused))
    finally:
        stdin.raw.timeout = None
    linked, same, link_errors = _link_all(cache, mirror_root, todo, set(bad) | refused,
                                          private)
    unchanged += same
    errors += link_errors
    out.line({"received": received, "linked": linked, "unchanged": unchanged,
            "repaired": repaired, "errors": errors, "bad": bad, "conflicts": conflicts})


def _count(cache: "Cache", mirror: str, received: int, files: int) -> None:
    """Add to what *mirror* has received (for `scipion-cloudexec status`)."""
    added = (received, files, time.time(), mirror)
    # no UPSERT (clusters may run an sqlite older than 3.24); insert first, so two servers
    # counting a new mirror at once do not both insert
    cache.db.execute("INSERT OR IGNORE INTO mirrors (bytes, files, updated, mirror)"
                     " VALUES (0, 0, 0, ?)", (mirror,))
    cache.db.execute("UPDATE mirrors SET bytes = bytes + ?, files = files + ?, updated = ?"
                     " WHERE mirror = ?", added)


def _link_all(cache: "Cache", mirror_root: str, todo: List[Tuple[str, int, str]],
              skip: set, private: set = frozenset()) -> Tuple[int, int, List[str]]:
    """Put the objects of *todo* into the mirror, but those in *skip*: hard links, or
    private copies for the paths in *private*. Returns (linked, already linked, errors)."""
    linked, same, errors = 0, 0, []
    for rel, _size, sha in todo:
        if sha in skip:
            continue
        try:
            if rel in private:
                _copy_private(cache.path(sha), os.path.join(mirror_root, rel))
                linked += 1
            elif cache.link(sha, os.path.join(mirror_root, rel)):
                linked += 1
            else:
                same += 1
        except FileNotFoundError:
            errors.append("%s: content missing on the cluster" % rel)
    return linked, same, errors


def _copy_private(src: str, dest: str) -> None:
    """A writable copy of a cache object at *dest*, put in place by rename: a job that
    rewrites it never touches the object (shared with other mirrors)."""
    tmp = "%s.cloudexec-%d" % (dest, os.getpid())
    try:
        shutil.copyfile(src, tmp)
    except FileNotFoundError:
        os.stat(src)  # the object is missing: say so
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, dest)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def cmd_list(listings: Listings, hashes: HashCache, request: ListTree, out: Answers) -> None:
    """Files (with hashes), folders and links under R/D, without following links and
    without opening anything but regular files; links must stay under R/D. Tracked, only
    what changed since the listing named by ``since`` (see :mod:`.listing`)."""
    answer = listings.list(os.path.realpath(request.root), safe_rel(request.dir),
                           [safe_rel(e) for e in request.exclude], hashes,
                           track=request.track, since=request.since)
    hashes.flush()
    out.line(answer)


def cmd_reset(cache: "Cache", request: Reset, out: Answers) -> None:
    """Empty a run folder of a mirror (a restarted run starts from nothing)."""
    mirror = safe_rel(request.mirror)
    if not mirror.startswith("projects/"):
        raise StageError("%r is not a project mirror" % mirror)
    path = os.path.join(cache.workdir, mirror, safe_rel(request.dir))
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
    out.line({"ok": True})


def cmd_rm(cache: "Cache", hashes: HashCache, request: Remove, out: Answers) -> None:
    """Delete ``[rel, expected]`` paths of a mirror where they still hold *expected*
    (files and links first, then folders deepest first, only when empty)."""
    mirror_root = os.path.join(cache.workdir, safe_rel(request.mirror))
    entries = sorted(((safe_rel(r), e) for r, e in request.paths),
                     key=lambda x: (x[1] == "d", -x[0].count("/")))
    deleted, conflicts = 0, []
    for rel, expected in entries:
        path = os.path.join(mirror_root, rel)
        now = path_state(path, hashes)
        if now == "":
            continue
        if now != expected:
            conflicts.append([rel, now])
            continue
        try:
            os.rmdir(path) if now == "d" else os.unlink(path)
            deleted += 1
        except OSError:  # a folder holding files the client does not know of
            conflicts.append([rel, now])
    hashes.flush()
    out.line({"deleted": deleted, "conflicts": conflicts})


def cmd_send(cache: "Cache", request: Send, answers: Answers) -> None:
    """Each path: a header, its bytes, a trailer with their hash. A file gone since the
    listing is sent empty, one that is now a link or a FIFO likewise (never opened): the
    client sees the hash differ from the listing's and leaves it for the next gather."""
    root = request.root
    out = answers.stream
    for rel in request.paths:
        path = os.path.join(root, safe_rel(rel))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            fd = -1
        with (os.fdopen(fd, "rb") if fd >= 0 else io.BytesIO()) as f:
            st = os.fstat(fd) if fd >= 0 else None
            size = st.st_size if st is not None and stat.S_ISREG(st.st_mode) else 0
            out.write(json.dumps({"path": rel, "size": size}).encode() + b"\n")
            h = hashlib.sha256()
            left = size
            while left:
                block = f.read(min(BLOCK, left))
                if not block:  # shrank while sent: pad, the hash will not match
                    block = b"\0" * min(BLOCK, left)
                h.update(block)
                out.write(block)
                left -= len(block)
        out.write(json.dumps({"sha256": h.hexdigest()}).encode() + b"\n")
    out.flush()


def cmd_send_range(request: SendRange, answers: Answers) -> None:
    """A header, then exactly *length* bytes of the file from *offset* (zeros past its end:
    the stream stays in step; the desktop's whole-file hash refuses the file)."""
    out = answers.stream
    left, offset = int(request.length), int(request.offset)
    if left < 0 or offset < 0:
        raise StageError("range %d+%d" % (offset, left))
    path = os.path.join(request.root, safe_rel(request.path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            fd = -1
    except OSError:
        fd = -1
    out.write(json.dumps({"size": left}).encode() + b"\n")
    try:
        while left:
            block = os.pread(fd, min(8 * BLOCK, left), offset) if fd >= 0 else b""
            if not block:
                block = b"\0" * min(BLOCK, left)
            out.write(block)
            offset += len(block)
            left -= len(block)
    finally:
        if fd >= 0:
            os.close(fd)
    out.flush()


def cmd_cache(cache: "Cache", request: CacheInfo, out: Answers) -> None:
    """Entries and bytes of the cache; with gc, drop objects no mirror links to (under the
    publish lock, and only those old enough not to be on their way into a mirror)."""
    workdir, gc = cache.workdir, bool(request.gc)
    entries = size = dropped = freed = 0
    now, min_age = time.time(), float(request.min_age)
    for dirpath, _dirs, names in os.walk(cache.objects):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
                if gc and st.st_nlink == 1 and now - st.st_ctime >= min_age:
                    with cache._publishing():
                        st = os.stat(path)
                        if st.st_nlink == 1:  # still no mirror links to it
                            cache.db.execute("DELETE FROM objects WHERE sha256=?", (name,))
                            os.unlink(path)
                            dropped += 1
                            freed += st.st_size
                            continue
            except FileNotFoundError:  # dropped as corrupt by another server meanwhile
                continue
            entries += 1
            size += st.st_size
    partial = 0
    for n in os.listdir(cache.partial):
        try:
            partial += os.path.getsize(os.path.join(cache.partial, n))
        except FileNotFoundError:  # published or cleaned up meanwhile
            pass
    partial += chunks.sweep(cache, min_age if gc else None)
    out.line({"entries": entries, "bytes": size, "partial_bytes": partial, "dropped": dropped,
            "freed": freed, "free": shutil.disk_usage(workdir).free})


def cmd_chunk(cache: "Cache", request: Chunk, stdin: io.BufferedReader, out: Answers) -> None:
    """One chunk of a large file (its bytes follow the request): see :mod:`.chunks`."""
    stdin.raw.timeout = float(request.stall)
    try:
        answer = chunks.receive(cache, request, stdin)
    except StageError as e:
        raise StreamBroken(str(e)) from None
    finally:
        stdin.raw.timeout = None
    out.line(answer)


def cmd_mirrors(cache: "Cache", request: Mirrors, out: Answers) -> None:
    rows = cache.db.execute("SELECT mirror, bytes, files, updated FROM mirrors").fetchall()
    out.line({"mirrors": [dict(zip(("mirror", "bytes", "files", "updated"), r)) for r in rows]})


def serve(workdir: str, stdin_fd: int = 0, stdout: Optional[BinaryIO] = None) -> int:
    """Answer requests from *stdin_fd* on *stdout* (the process's own by default) until
    the input closes. The first must be a :class:`Hello` of this protocol: another version
    is answered ``{"error": "protocol"}`` and the server exits 3 without reading on (it
    would misread the requests)."""
    cache = Cache(workdir)
    hashes = HashCache(os.path.join(workdir, "cache", "hashes.sqlite"))
    listings = Listings(watch=True)  # what this process last listed: the next sends changes
    stdin = io.BufferedReader(StallingInput(stdin_fd), BLOCK)
    out = Answers(stdout if stdout is not None else sys.stdout.buffer)
    handlers = {StageIn: lambda c, r: cmd_in(c, hashes, r, stdin, out),
                ListTree: lambda c, r: cmd_list(listings, hashes, r, out),
                Remove: lambda c, r: cmd_rm(c, hashes, r, out),
                CacheInfo: lambda c, r: cmd_cache(c, r, out),
                Reset: lambda c, r: cmd_reset(c, r, out),
                Mirrors: lambda c, r: cmd_mirrors(c, r, out),
                ChunkPlan: lambda c, r: out.line(chunks.plan(c, r)),
                Chunk: lambda c, r: cmd_chunk(c, r, stdin, out),
                Publish: lambda c, r: out.line(chunks.publish(c, r))}
    greeted = False
    try:
        while True:
            line = stdin.readline()
            if not line:
                return 0
            try:
                request: Request = decode(line)
                if not greeted:
                    if not isinstance(request, Hello):
                        raise BadRequest("the first request must be hello, not %s" % request.CMD)
                    why = mismatch(request.protocol)
                    if why:
                        out.line({"error": "protocol", "detail": why, "protocol": STAGE_PROTOCOL})
                        return 3
                    greeted = True
                    out.line({"ok": True, "protocol": STAGE_PROTOCOL})
                elif isinstance(request, Send):  # raw bytes: nothing may come between them
                    cmd_send(cache, request, out)
                elif isinstance(request, SendRange):
                    cmd_send_range(request, out)
                else:
                    with _KeepAlive(out):
                        handlers[type(request)](cache, request)
            except StreamBroken as e:
                out.line({"error": "failed", "detail": str(e)})
                return 2
            except (StageError, OSError, ValueError, KeyError) as e:  # BadRequest too
                out.line({"error": "failed", "detail": "%s: %s" % (type(e).__name__, e)})
    finally:
        listings.close()
        hashes.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="cloudexec-stage")
    p.add_argument("command", choices=["serve", "listen"])
    p.add_argument("--workdir", required=True)
    p.add_argument("--parent", type=int, default=0, help="listen: the agent's pid")
    a = p.parse_args(argv)
    if a.command == "listen":
        from . import stage_endpoint
        return stage_endpoint.main(a.workdir, a.parent)
    return serve(a.workdir)
