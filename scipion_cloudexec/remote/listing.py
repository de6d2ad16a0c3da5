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

import logging
import os
import stat
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from .hashing import HashCache
from .paths import inside

log = logging.getLogger(__name__)

#: a path's entry: (size, mtime_ns, sha256) for a file, DIR for a folder, "l:TARGET" for a
#: link; compared whole between two listings (so a content change is seen whatever its
#: size and mtime, as the full listing sees it)
Entry = Union[Tuple[int, int, str], str]
DIR = "d"
KEEP = 4  # trees remembered per server process (a protocol gathers one run folder)

_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device"}


def scan(root: str, sub: str, exclude: List[str], hashes: HashCache,
         on_folder: Optional[Callable[[str, str], None]] = None
         ) -> Tuple[Dict[str, Entry], List[list], List[list], bool]:
    """The tree under *root*/*sub*, without following links and without opening anything
    but regular files: (entries by path relative to *root*, refused links, skipped special
    files, whether *sub* is a folder). *exclude*: paths relative to *sub*, left out.
    *on_folder(path, rel)* is called for each folder before it is read (a watch)."""
    top = os.path.normpath(os.path.join(root, sub))
    skip = {os.path.normpath(os.path.join(top, e)) for e in exclude}
    entries: Dict[str, Entry] = {}
    refused: List[list] = []
    skipped: List[list] = []
    if os.path.isfile(top) and not os.path.islink(top):  # one file (``fetch FILE``)
        st = os.stat(top)
        entries[os.path.relpath(top, root)] = (st.st_size, st.st_mtime_ns, hashes.get(top, st))
    here = os.path.relpath(top, root)
    if os.path.isdir(top):
        walk(top, top, "" if here == "." else here + "/", sub, skip, hashes, entries,
             refused, skipped, on_folder)
    return entries, refused, skipped, os.path.isdir(top)


def walk(top: str, start: str, prefix: str, sub: str, skip: Set[str], hashes: HashCache,
         entries: Dict[str, Entry], refused: List[list], skipped: List[list],
         on_folder: Optional[Callable[[str, str], None]] = None,
         on_file: Optional[Callable[[str, os.stat_result], None]] = None) -> None:
    """Add what lies under the folder *start* (path *prefix* relative to the root, with a
    trailing slash or empty) to *entries*, *refused* and *skipped* (see :func:`scan`);
    *on_file(rel, stat)* is called for each regular file."""
    stack = [(start, prefix)]
    while stack:
        folder, prefix = stack.pop()
        if on_folder is not None:
            on_folder(folder, prefix[:-1])
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
                    if stat.S_ISREG(st.st_mode):
                        entries[rel] = (st.st_size, st.st_mtime_ns, hashes.get(path, st))
                        if on_file is not None:
                            on_file(rel, st)
                    else:
                        kind, value = other(path, st, top, sub)
                        if kind == "entry":
                            entries[rel] = value
                        else:
                            (refused if kind == "refused" else skipped).append([rel, value])
                except FileNotFoundError:  # a running job deleted it meanwhile
                    continue


def other(path: str, st: os.stat_result, top: str, sub: str) -> Tuple[str, str]:
    """A listing's view of what is neither a folder nor a regular file: ("entry",
    "l:TARGET") for a link inside *top*; ("refused", why) for one outside; ("skipped",
    kind) for a special file, never opened (a FIFO would hang the listing, a socket fail
    it)."""
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if inside(target, top):
            return "entry", "l:" + os.path.relpath(target, os.path.realpath(os.path.dirname(path)))
        return "refused", "symbolic link to %s, outside %s" % (os.readlink(path), sub)
    return "skipped", _KINDS.get(stat.S_IFMT(st.st_mode), "special file")


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
    out.update(body(todo))
    return out


def body(todo: Iterable[Tuple[str, Entry]]) -> dict:
    """The ``files``, ``dirs`` and ``links`` of a listing holding the entries *todo*."""
    files, dirs, links = [], [], []
    for rel, e in todo:
        if e == DIR:
            dirs.append(rel)
        elif isinstance(e, str):
            links.append([rel, e[2:]])
        else:
            files.append([rel, e[0], e[1], e[2]])
    return {"files": files, "dirs": dirs, "links": links}


class Listings:
    """The last tracked listing of each tree this server sent (at most KEEP trees); with
    *watch*, each tree's inotify watch where it can be watched (:mod:`.tree_watch`)."""

    def __init__(self, watch: bool = False) -> None:
        self.watch = watch
        self._sent: Dict[tuple, Tuple[str, Optional[Dict[str, Entry]]]] = {}
        self._watches: Dict[tuple, Any] = {}  # key -> TreeWatch

    def list(self, root: str, sub: str, exclude: List[str], hashes: HashCache,
             track: bool = False, since: str = "") -> dict:
        """The ``ListTree`` answer (see :class:`~.stage_protocol.ListTree`)."""
        if not track:
            entries, refused, skipped, exists = scan(root, sub, exclude, hashes)
            out = answer(entries, None)
            out.update(refused=refused, skipped=skipped, exists=exists)
            return out
        key = (root, sub, tuple(sorted(exclude)))
        token, old = self._sent.pop(key, ("", None))
        delta_ok = bool(since) and since == token
        watched = self._watched(key, root, sub, exclude, hashes)
        if watched is not None:
            from .tree_watch import delta
            watch, changed = watched
            entries = watch.entries
            if delta_ok and changed is not None:
                out = delta(entries, changed)
            else:
                out = answer(entries, None)
            out.update(refused=[list(r) for r in sorted(watch.refused.items())],
                       skipped=[list(r) for r in sorted(watch.skipped.items())], exists=True,
                       watched=True)
            old = None  # the watch knows what changed: no copy kept
        else:
            entries, refused, skipped, exists = scan(root, sub, exclude, hashes)
            out = answer(entries, old if delta_ok else None)
            out.update(refused=refused, skipped=skipped, exists=exists)
            old = entries
        out["token"] = os.urandom(12).hex()
        self._sent[key] = (out["token"], old)
        while len(self._sent) > KEEP:
            gone_key = next(iter(self._sent))
            del self._sent[gone_key]
            w = self._watches.pop(gone_key, None)
            if w is not None:
                w.close()
        return out

    def _watched(self, key: tuple, root: str, sub: str, exclude: List[str],
                 hashes: HashCache) -> Optional[Tuple[Any, Optional[dict]]]:
        """The tree's watch brought up to date and what changed since its last listing
        (None: it was just set up), or None: no watch here, walk."""
        if not self.watch:
            return None
        from .tree_watch import TreeWatch, Unwatchable  # it builds on this module
        watch = self._watches.pop(key, None)
        try:
            if watch is not None:
                changed = watch.refresh(hashes)
                self._watches[key] = watch
                return watch, changed
        except (OSError, Unwatchable) as e:
            log.info("%s: a whole walk (%s)", os.path.join(root, sub), e)
            watch.close()
        top = os.path.normpath(os.path.join(root, sub))
        if not TreeWatch.possible(top):
            return None
        watch = TreeWatch(root, sub, exclude)
        try:
            watch.start(hashes)
        except (OSError, Unwatchable) as e:
            log.info("%s: whole walks (%s)", top, e)
            watch.close()
            return None
        self._watches[key] = watch
        return watch, None

    def close(self) -> None:
        for w in self._watches.values():
            w.close()
        self._watches.clear()
