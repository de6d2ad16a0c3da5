"""The cluster side of staging, run as ``python agent.zip stage COMMAND`` over an SSH exec
channel; its stdin/stdout are the channel. Shipped with the agent (stdlib only).

Layout under the workdir: ``cache/`` (see :mod:`.cache`) and ``projects/<name>/...``, the
project mirrors: inputs are hard links into the cache, run folders hold private files.

``python agent.zip stage serve --workdir W`` then serves requests, one JSON line each, for as
long as the channel stays open, so a client pays the SSH session start once. Requests:

``{"cmd": "in", "mirror": "projects/NAME", "files": [[rel, size, sha256], ...], "dirs": [...]}``
    Answers
    ``{"missing": [[sha256, offset], ...], "needed": n, "free": n}`` (or
    ``{"error": "nospace", ...}``), then reads the missing contents back to back
    from their offsets, verifies each hash, links every file into the mirror and
    answers ``{"received": n, "linked": n, "unchanged": n, "repaired": n, "errors": [...]}``.
    With ``"check": true`` it links what the cache holds and answers at once
    ``{"missing": [...], "needed", "free", "linked", "unchanged", "repaired", "errors"}``
    without reading any content, so a client can keep several checks in flight.
``{"cmd": "list", "root": R, "dir": D}``
    the files under R/D: ``{"files": [[rel, size, mtime_ns, sha256]], "links": [[rel, target]],
    "refused": [[rel, reason]]}``, paths relative to R.
``{"cmd": "send", "root": R, "paths": ["rel", ...]}``
    for each: a header line ``{"path", "size"}``, the bytes,
    a trailer line ``{"sha256"}``.
``{"cmd": "cache", "gc": false}``
    size and entries of the cache; with --gc, drop objects no mirror links to.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import select
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

from .cache import Cache, StageError
from .hashing import BLOCK, HashCache

RESERVE = 0.01  # keep 1% of the disk free


def safe_rel(rel: str) -> str:
    """A normalized relative path that stays below its root, or StageError."""
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


def _reply(obj) -> None:
    sys.stdout.buffer.write(json.dumps(obj).encode() + b"\n")
    sys.stdout.buffer.flush()


class StreamBroken(StageError):
    """The byte stream is out of step with the requests: the server must stop."""


def cmd_in(cache: "Cache", request: dict, stdin: io.BufferedReader) -> None:
    workdir = cache.workdir
    mirror = request["mirror"]
    mirror_root = os.path.join(workdir, safe_rel(mirror))
    files = [(safe_rel(rel), int(size), str(sha)) for rel, size, sha in request["files"]]
    os.makedirs(mirror_root, exist_ok=True)
    for rel in request.get("dirs", []):
        if rel != ".":
            os.makedirs(os.path.join(mirror_root, safe_rel(rel)), exist_ok=True)
    records = cache.records({sha for _r, _s, sha in files})
    # one lstat per unchanged file: a mirror file sharing the verified object's inode,
    # size and mtime is that object, untouched
    todo: List[Tuple[str, int, str]] = []
    unchanged = 0
    for rel, size, sha in files:
        rec = records.get(sha)
        if rec is not None and rec[0] == size and rec[2] is not None:
            try:
                st = os.lstat(os.path.join(mirror_root, rel))
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
    if request.get("check"):  # link what is here; the client sends the rest in a later request
        _count(cache, mirror, 0, 0)
        linked, same, errors = _link_all(cache, mirror_root, todo, set(missing))
        _reply(dict(answer, linked=linked, unchanged=unchanged + same, repaired=repaired,
                    errors=errors))
        return
    if needed > free:
        _reply({"error": "nospace", "needed": needed, "free": max(free, 0)})
        return
    _reply(answer)
    errors: List[str] = []
    bad: List[str] = []  # arrived with another hash: changed while sent, or corrupted
    received = 0
    cache.db.execute("BEGIN")  # one commit for the batch, not one per file
    stdin.raw.timeout = float(request.get("stall", 60))
    try:
        for sha in order:
            size, offset = missing[sha]
            try:
                why = cache.receive(sha, size, offset, stdin)
            except StageError as e:
                raise StreamBroken(str(e)) from None
            received += size - offset
            if why:
                bad.append(sha)
        _count(cache, mirror, received, len(order) - len(bad))
    finally:
        stdin.raw.timeout = None
        cache.db.execute("COMMIT")  # what arrived intact stays usable
    linked, same, link_errors = _link_all(cache, mirror_root, todo, set(bad))
    unchanged += same
    errors += link_errors
    _reply({"received": received, "linked": linked, "unchanged": unchanged,
            "repaired": repaired, "errors": errors, "bad": bad})


def _count(cache: "Cache", mirror: str, received: int, files: int) -> None:
    """Add to what *mirror* has received (for `scipion-cloudexec status`)."""
    added = (received, files, time.time(), mirror)
    # no UPSERT: clusters may run an sqlite older than 3.24
    if not cache.db.execute("UPDATE mirrors SET bytes = bytes + ?, files = files + ?,"
                            " updated = ? WHERE mirror = ?", added).rowcount:
        cache.db.execute("INSERT INTO mirrors (bytes, files, updated, mirror) VALUES (?,?,?,?)",
                         added)


def _link_all(cache: "Cache", mirror_root: str, todo: List[Tuple[str, int, str]],
              skip: set) -> Tuple[int, int, List[str]]:
    """Hard-link the objects of *todo* into the mirror, but those in *skip*: (linked,
    already linked, errors)."""
    linked, same, errors = 0, 0, []
    for rel, _size, sha in todo:
        if sha in skip:
            continue
        try:
            if cache.link(sha, os.path.join(mirror_root, rel)):
                linked += 1
            else:
                same += 1
        except FileNotFoundError:
            errors.append("%s: content missing on the cluster" % rel)
    return linked, same, errors


def cmd_list(cache: "Cache", hashes: HashCache, request: dict) -> None:
    root = os.path.realpath(request["root"])
    sub = request.get("dir", ".")
    top = os.path.join(root, safe_rel(sub))
    files, links, refused = [], [], []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if target != root and not target.startswith(root + os.sep):
                    refused.append([rel, "symbolic link to %s, outside the project"
                                    % os.readlink(path)])
                else:
                    links.append([rel, os.path.relpath(target, os.path.realpath(dirpath))])
                continue
            st = os.stat(path)
            files.append([rel, st.st_size, st.st_mtime_ns, hashes.get(path, st)])
    hashes.flush()
    _reply({"files": files, "links": links, "refused": refused})


def cmd_send(cache: "Cache", request: dict) -> None:
    root = request["root"]
    out = sys.stdout.buffer
    for rel in request["paths"]:
        path = os.path.join(root, safe_rel(rel))
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
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


def cmd_cache(cache: "Cache", request: dict) -> None:
    workdir, gc = cache.workdir, bool(request.get("gc"))
    entries = size = dropped = freed = 0
    for dirpath, _dirs, names in os.walk(cache.objects):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            if gc and st.st_nlink == 1:  # no mirror links to it
                os.unlink(path)
                cache.db.execute("DELETE FROM objects WHERE sha256=?", (name,))
                dropped += 1
                freed += st.st_size
                continue
            entries += 1
            size += st.st_size
    partial = sum(os.path.getsize(os.path.join(cache.partial, n))
                  for n in os.listdir(cache.partial))
    _reply({"entries": entries, "bytes": size, "partial_bytes": partial, "dropped": dropped,
            "freed": freed, "free": shutil.disk_usage(workdir).free})


def cmd_mirrors(cache: "Cache", request: dict) -> None:
    rows = cache.db.execute("SELECT mirror, bytes, files, updated FROM mirrors").fetchall()
    _reply({"mirrors": [dict(zip(("mirror", "bytes", "files", "updated"), r)) for r in rows]})


def serve(workdir: str) -> int:
    """Answer requests from stdin until it closes."""
    cache = Cache(workdir)
    hashes = HashCache(os.path.join(workdir, "cache", "hashes.sqlite"))
    stdin = io.BufferedReader(StallingInput(sys.stdin.fileno()), BLOCK)
    handlers = {"in": lambda c, r: cmd_in(c, r, stdin), "send": cmd_send, "cache": cmd_cache,
                "list": lambda c, r: cmd_list(c, hashes, r),
                "ping": lambda c, r: _reply({"ok": True}), "mirrors": cmd_mirrors}
    try:
        while True:
            line = stdin.readline()
            if not line:
                return 0
            try:
                request = json.loads(line)
                handlers[request["cmd"]](cache, request)
            except StreamBroken as e:
                _reply({"error": "failed", "detail": str(e)})
                return 2
            except (StageError, OSError, ValueError, KeyError) as e:
                _reply({"error": "failed", "detail": "%s: %s" % (type(e).__name__, e)})
    finally:
        hashes.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="cloudexec-stage")
    p.add_argument("command", choices=["serve"])
    p.add_argument("--workdir", required=True)
    a = p.parse_args(argv)
    return serve(a.workdir)
