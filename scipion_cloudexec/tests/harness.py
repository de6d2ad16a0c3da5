"""The differential harness: a protocol run on a cluster must leave exactly what the same
protocol leaves when run locally.

``run_tree(prot)`` describes a run folder (every path but ``logs/``, which holds each
executor's own bookkeeping and the run's own logs): its type, and the bytes of a file or
the target of a link. A set's ``.sqlite`` (written on the desktop by the protocol's own
steps) is compared by its rows, with the run folder's name and creation times masked: the
only things that differ between two runs of one protocol anywhere. ``output_summary(prot)`` describes the outputs registered in the
project database. ``assert_same_run(local, cloud)`` compares both and names every
difference.
"""
from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import stat
from typing import Dict, List, Tuple

#: the run folder's own logs: run.stdout/stderr, steps.sqlite, run.db, cloudexec's records
SKIP = ("logs",)


def run_tree(run_dir: str) -> Dict[str, Tuple[str, str]]:
    """{relative path: (kind, content)} for everything under *run_dir* but ``logs/``;
    kind is "dir", "file" (content: SHA-256 of the bytes), "link" (its target) or the
    name of a special file type."""
    out: Dict[str, Tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(run_dir):
        rel_dir = os.path.relpath(dirpath, run_dir)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in SKIP]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", "")
            elif stat.S_ISREG(st.st_mode) and name.endswith(".sqlite"):
                out[rel] = ("sqlite", _rows_digest(path, os.path.basename(run_dir)))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    out[rel] = ("file", hashlib.sha256(f.read()).hexdigest())
            else:
                out[rel] = ("special", oct(stat.S_IFMT(st.st_mode)))
    return out


def _rows_digest(path: str, run_name: str) -> str:
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    dump = re.sub(r"'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?'", "'<time>'",
                  dump.replace(run_name, "<run>"))
    return hashlib.sha256(dump.encode()).hexdigest()


def output_summary(prot) -> Dict[str, Tuple]:
    """The protocol's registered outputs: class, size, and each item's file name relative
    to its run folder (sets), or the file name (single objects)."""
    out: Dict[str, Tuple] = {}
    run = os.path.abspath(prot.getWorkingDir())
    for name, obj in prot.iterOutputAttributes():
        files: List[str] = []
        items = list(obj) if hasattr(obj, "__iter__") and hasattr(obj, "getSize") else [obj]
        for item in items:
            fn = item.getFileName() if hasattr(item, "getFileName") else None
            if fn:
                files.append(os.path.relpath(os.path.abspath(fn), run)
                             if os.path.abspath(fn).startswith(run + os.sep) else fn)
        out[name] = (type(obj).__name__, obj.getSize() if hasattr(obj, "getSize") else 1,
                     tuple(files))
    return out


def differences(local: Dict[str, Tuple[str, str]], cloud: Dict[str, Tuple[str, str]]
                ) -> List[str]:
    """Readable differences between two run trees."""
    out = []
    for rel in sorted(set(local) | set(cloud)):
        a, b = local.get(rel), cloud.get(rel)
        if a == b:
            continue
        if a is None:
            out.append("only in the cloud run: %s %s" % (rel, b[0]))
        elif b is None:
            out.append("missing from the cloud run: %s %s" % (rel, a[0]))
        else:
            out.append("differs: %s (local %s %s, cloud %s %s)" % (rel, a[0], a[1][:12],
                                                                  b[0], b[1][:12]))
    return out


def assert_same_run(local, cloud, outputs: bool = True) -> None:
    """The cloud run's folder (and registered outputs) equal the local run's."""
    diff = differences(run_tree(local.getWorkingDir()), run_tree(cloud.getWorkingDir()))
    assert not diff, "the cloud run differs from the local run:\n  " + "\n  ".join(diff[:40])
    if outputs:
        assert output_summary(local) == output_summary(cloud)
