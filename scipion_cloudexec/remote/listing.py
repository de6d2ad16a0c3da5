"""The staging server's listing of a tree (``ListTree``), whole or as what changed since the
listing it sent last (issue 13).

The cluster's walk cannot be skipped (jobs on other nodes write over NFS: no change
notification reaches this process), only made cheap: one ``scandir`` per folder, one
``lstat`` per entry (from the ``DirEntry``), the hash from the memo. What travels, though,
follows the changes: a listing asked with ``track`` gets a token, and the server (one
process per control channel) keeps what it sent under that token; the next request that
names it (``since``) is answered with only the paths whose entry differs, and those gone.
A token it does not hold (another server process, a restart, an older listing) gets the
whole listing, so a desktop never applies a delta to anything but the listing it was
computed from. Standard library only (shipped to the cluster).
"""
from __future__ import annotations

import os
import stat
from typing import Dict, List, Optional, Tuple, Union

from .hashing import HashCache
from .paths import inside

#: a path's entry: (size, mtime_ns, sha256) for a file, DIR for a folder, "l:TARGET" for a
#: link; compared whole between two listings (so a content change is seen whatever its
#: size and mtime, as the full listing sees it)
Entry = Union[Tuple[int, int, str], str]
DIR = "d"
KEEP = 4  # trees remembered per server process (a protocol gathers one run folder)

_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device"}


def scan(root: str, sub: str, exclude: List[str], hashes: HashCache
         ) -> Tuple[Dict[str, Entry], List[list], List[list], bool]:
    """The tree under *root*/*sub*, without following links and without opening anything
    but regular files: (entries by path relative to *root*, refused links, skipped special
    files, whether *sub* is a folder). *exclude*: paths relative to *sub*, left out."""
    top = os.path.normpath(os.path.join(root, sub))
    skip = {os.path.normpath(os.path.join(top, e)) for e in exclude}
    entries: Dict[str, Entry] = {}
    refused: List[list] = []
    skipped: List[list] = []
    if os.path.isfile(top) and not os.path.islink(top):  # one file (``fetch FILE``)
        st = os.stat(top)
        entries[os.path.relpath(top, root)] = (st.st_size, st.st_mtime_ns, hashes.get(top, st))
    here = os.path.relpath(top, root)
    stack = [(top, "" if here == "." else here + "/")] if os.path.isdir(top) else []
    while stack:
        folder, prefix = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError:  # gone or unreadable meanwhile: as os.walk, not listed
            continue
        with it:
            for e in it:
                path = folder + "/" + e.name
                if path in skip:
                    continue
                rel = prefix + e.name
                try:
                    if e.is_dir(follow_symlinks=False):
                        entries[rel] = DIR
                        stack.append((path, rel + "/"))
                        continue
                    st = e.stat(follow_symlinks=False)
                    mode = st.st_mode
                    if stat.S_ISREG(mode):
                        entries[rel] = (st.st_size, st.st_mtime_ns, hashes.get(path, st))
                    elif stat.S_ISLNK(mode):
                        target = os.path.realpath(path)
                        if inside(target, top):
                            entries[rel] = "l:" + os.path.relpath(target, os.path.realpath(folder))
                        else:
                            refused.append([rel, "symbolic link to %s, outside %s"
                                            % (os.readlink(path), sub)])
                    else:  # never opened: a FIFO would hang the listing, a socket fail it
                        skipped.append([rel, _KINDS.get(stat.S_IFMT(mode), "special file")])
                except FileNotFoundError:  # a running job deleted it meanwhile
                    continue
    return entries, refused, skipped, os.path.isdir(top)


def answer(entries: Dict[str, Entry], old: Optional[Dict[str, Entry]]) -> dict:
    """The listing's body: every entry (*old* None), or those that differ from *old* and
    the paths *old* had that are gone (``"gone"``, ``"delta": true``)."""
    if old is None:
        todo = entries.items()
        out: dict = {}
    else:
        get = old.get  # one dict lookup per entry: cheaper than a set of the items
        todo = [(rel, e) for rel, e in entries.items() if get(rel) != e]
        out = {"delta": True, "gone": sorted(old.keys() - entries.keys())}
    files, dirs, links = [], [], []
    for rel, e in todo:
        if e == DIR:
            dirs.append(rel)
        elif isinstance(e, str):
            links.append([rel, e[2:]])
        else:
            files.append([rel, e[0], e[1], e[2]])
    out.update(files=files, dirs=dirs, links=links)
    return out


class Listings:
    """The last tracked listing of each tree this server sent (at most KEEP trees)."""

    def __init__(self) -> None:
        self._sent: Dict[tuple, Tuple[str, Dict[str, Entry]]] = {}

    def list(self, root: str, sub: str, exclude: List[str], hashes: HashCache,
             track: bool = False, since: str = "") -> dict:
        """The ``ListTree`` answer (see :class:`~.stage_protocol.ListTree`)."""
        entries, refused, skipped, exists = scan(root, sub, exclude, hashes)
        if not track:
            out = answer(entries, None)
        else:
            key = (root, sub, tuple(sorted(exclude)))
            token, old = self._sent.pop(key, ("", None))
            out = answer(entries, old if since and since == token else None)
            out["token"] = os.urandom(12).hex()
            self._sent[key] = (out["token"], entries)
            while len(self._sent) > KEEP:
                del self._sent[next(iter(self._sent))]
        out.update(refused=refused, skipped=skipped, exists=exists)
        return out
