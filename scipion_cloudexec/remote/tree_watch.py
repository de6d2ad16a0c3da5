"""A mirror's tree kept current from inotify, so the staging server's listing before a
gather costs what changed, not what the run folder holds (issue 13).

Only where every change passes through this host's kernel: a tree on a local filesystem
(:data:`.inotify.LOCAL_FILESYSTEMS`; jobs on other nodes writing to it through this
host's NFS server are seen too). On network filesystems, where other hosts' kernels
write, the listing walks the whole tree as before.

The invariant: every path the watch does not name holds what :attr:`TreeWatch.entries`
says, once no process holds it open for writing. A whole walk sets it up (each folder is
watched before it is read); events keep it (created, written, deleted, renamed,
attributes). Writes through a shared mapping make no event of their own, but a mapping
holds its file open: the ``IN_CLOSE_WRITE`` comes when the last of descriptor and mapping
goes, at the latest when the process exits, so before its job's ``rc`` and before the
gather that follows. A listing made while another job still writes through a mapping may
show that file as of its last event, as a walk shows it half written; its own gather sees
the end. Links (their target may change elsewhere) and files with several hard links (a
write through another name makes no event here) are stat'ed at every listing; a new link
to a file makes no event on its other names, so the inode's earlier name is looked up.

Whenever the watch cannot vouch for the tree (the kernel's queue overflowed, out of
watches, a folder moved, the tree's top removed), it raises and the caller walks the whole
tree and starts a new watch. Standard library only (shipped to the cluster).
"""
from __future__ import annotations

import os
import stat
from typing import Dict, List, Optional, Set, Tuple

from . import inotify
from .hashing import HashCache
from .inotify import (IN_DELETE_SELF, IN_IGNORED, IN_ISDIR, IN_MOVE_SELF, IN_MOVED_FROM,
                      IN_MOVED_TO, TREE_MASK, Inotify)
from .listing import DIR, Entry, body, other, walk


class Unwatchable(Exception):
    """The watch cannot vouch for the tree: walk it whole."""


class TreeWatch:
    """Entries of the tree *root*/*sub* (as :func:`.listing.scan` gives them, *exclude*
    left out), kept current from inotify. One staging server's: not thread-safe."""

    def __init__(self, root: str, sub: str, exclude: List[str]) -> None:
        self.root = root
        self.sub = sub
        self.top = os.path.normpath(os.path.join(root, sub))
        here = os.path.relpath(self.top, root)
        self.top_rel = "" if here == "." else here
        self.skip = {os.path.normpath(os.path.join(self.top, e)) for e in exclude}
        self.entries: Dict[str, Entry] = {}
        self.refused: Dict[str, str] = {}
        self.skipped: Dict[str, str] = {}
        self._ino: Optional[Inotify] = None
        self._folders: Dict[str, Tuple[int, int]] = {}  # folder (root-relative) -> watch, inode
        self._wds: Dict[int, str] = {}  # watch -> folder
        self._dirty: Set[str] = set()
        self._always: Set[str] = set()  # links and hard-linked files: stat'ed every time
        self._inodes: Dict[int, str] = {}  # a regular file's inode -> its path (or a past one)
        self._linked: List[str] = []

    @staticmethod
    def possible(top: str) -> bool:
        """The tree can be watched here: inotify on, a folder on a local filesystem."""
        return (inotify.enabled() and os.path.isdir(top) and not os.path.islink(top)
                and inotify.local_filesystem(top))

    def start(self, hashes: HashCache) -> None:
        """Walk the whole tree, each folder watched before it is read; raises OSError
        where that fails (the caller walks without a watch)."""
        self._ino = Inotify()
        refused: List[list] = []
        skipped: List[list] = []
        prefix = self.top_rel + "/" if self.top_rel else ""
        walk(self.top, self.top, prefix, self.sub, self.skip, hashes, self.entries, refused,
             skipped, self._watch_folder, self._file)
        self._found(self.entries, refused, skipped)

    def _watch_folder(self, path: str, rel: str) -> None:
        assert self._ino is not None
        wd = self._ino.add(path, TREE_MASK)
        if wd is not None:
            try:
                ino = os.lstat(path).st_ino
            except OSError:
                return  # gone meanwhile: its parent's event names it
            self._folders[rel] = (wd, ino)
            self._wds[wd] = rel

    def _file(self, rel: str, st: os.stat_result) -> None:
        """A regular file seen (by a walk, or looked at): with several links, it and the
        inode's earlier name (a new link makes no event on the file's other names) are
        looked at every time; with one, events tell again."""
        if st.st_nlink > 1:
            self._always.add(rel)
            older = self._inodes.get(st.st_ino)
            if older and older != rel and older not in self._always:
                self._always.add(older)
                self._linked.append(older)
        else:
            self._always.discard(rel)
        self._inodes[st.st_ino] = rel

    def _found(self, found: Dict[str, Entry], refused: List[list], skipped: List[list]
               ) -> None:
        """What a walk found: links are looked at every time."""
        self.refused.update(refused)
        self.skipped.update(skipped)
        self._always.update(rel for rel, _ in refused)  # links, all of them
        self._always.update(rel for rel, e in found.items() if isinstance(e, str) and e != DIR)

    def refresh(self, hashes: HashCache) -> Dict[str, Optional[Entry]]:
        """Bring :attr:`entries` up to date; what they held before, for every path that may
        have changed (None: absent). Raises OSError or :class:`Unwatchable` where the watch
        cannot vouch for the tree (then :meth:`close` it and walk)."""
        assert self._ino is not None
        for wd, mask, name in self._ino.read():
            self._event(wd, mask, name)
        todo = self._dirty | self._always
        self._dirty = set()
        changed: Dict[str, Optional[Entry]] = {}
        for rel in sorted(todo):  # a folder before what it holds
            self._look(rel, hashes, changed)
        while self._linked:  # earlier names of files linked again (see _look)
            rel = self._linked.pop()
            if rel not in todo:
                todo.add(rel)
                self._look(rel, hashes, changed)
        return changed

    def _event(self, wd: int, mask: int, name: str) -> None:
        folder = self._wds.get(wd)
        if folder is None:
            return  # a watch already dropped
        if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
            # its folder was removed: the parent's event names it; a new folder of that
            # name (another inode) is read whole
            if folder == self.top_rel:
                raise Unwatchable("the run folder itself moved or was removed")
            del self._wds[wd]
            if self._folders.get(folder, (None,))[0] == wd:
                del self._folders[folder]
            return
        if mask & IN_ISDIR and mask & (IN_MOVED_FROM | IN_MOVED_TO):
            raise Unwatchable("a folder moved: its watches name old paths")
        rel = folder + "/" + name if folder else name
        if self.root + "/" + rel not in self.skip:
            self._dirty.add(rel)

    def _path(self, rel: str) -> str:
        return self.root + "/" + rel

    def _set(self, rel: str, entry: Optional[Entry], changed: Dict[str, Optional[Entry]]
             ) -> None:
        before = self.entries.get(rel)
        if before != entry:
            changed.setdefault(rel, before)
            if entry is None:
                del self.entries[rel]
            else:
                self.entries[rel] = entry

    def _remove(self, rel: str, changed: Dict[str, Optional[Entry]]) -> None:
        """*rel* is gone (or no longer a folder): it and whatever was listed under it."""
        was_dir = self.entries.get(rel) == DIR
        self._set(rel, None, changed)
        self.refused.pop(rel, None)
        self.skipped.pop(rel, None)
        self._always.discard(rel)
        if not was_dir:
            return
        prefix = rel + "/"
        for k in [k for k in self.entries if k.startswith(prefix)]:
            self._set(k, None, changed)
        for d in (self.refused, self.skipped):
            for k in [k for k in d if k.startswith(prefix)]:
                del d[k]
        self._always = {k for k in self._always if not k.startswith(prefix)}
        for k in [k for k in self._folders if k == rel or k.startswith(prefix)]:
            self._wds.pop(self._folders.pop(k)[0], None)  # the kernel drops the watch itself

    def _look(self, rel: str, hashes: HashCache, changed: Dict[str, Optional[Entry]]) -> None:
        path = self._path(rel)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._remove(rel, changed)
            return
        if stat.S_ISDIR(st.st_mode):
            if self.entries.get(rel) != DIR:
                self._remove(rel, changed)
                self._set(rel, DIR, changed)
            if self._folders.get(rel, (0, None))[1] != st.st_ino:  # new: watched, read whole
                self._new_folder(path, rel, hashes, changed)
            return
        if self.entries.get(rel) == DIR:
            self._remove(rel, changed)  # a folder became a file or a link
        self.refused.pop(rel, None)
        self.skipped.pop(rel, None)
        if stat.S_ISREG(st.st_mode):
            self._set(rel, (st.st_size, st.st_mtime_ns, hashes.get(path, st)), changed)
            self._file(rel, st)
            return
        kind, value = other(path, st, self.top, self.sub)
        if stat.S_ISLNK(st.st_mode):  # its target may change elsewhere: inside, or not
            self._always.add(rel)
        if kind == "entry":
            self._set(rel, value, changed)
            return
        self._set(rel, None, changed)
        (self.refused if kind == "refused" else self.skipped)[rel] = value

    def _new_folder(self, path: str, rel: str, hashes: HashCache,
                    changed: Dict[str, Optional[Entry]]) -> None:
        found: Dict[str, Entry] = {}
        refused: List[list] = []
        skipped: List[list] = []
        walk(self.top, path, rel + "/", self.sub, self.skip, hashes, found, refused, skipped,
             self._watch_folder, self._file)
        for r, e in found.items():
            self._set(r, e, changed)
        self._found(found, refused, skipped)

    def close(self) -> None:
        """Drop every watch."""
        if self._ino is not None:
            self._ino.close()
        self._ino = None
        self._wds.clear()
        self._folders.clear()


def delta(entries: Dict[str, Entry], changed: Dict[str, Optional[Entry]]) -> dict:
    """A listing's delta (see :func:`.listing.answer`) from the paths *changed* names, with
    what each held before."""
    now = [(rel, entries[rel]) for rel, before in changed.items()
           if rel in entries and entries[rel] != before]
    out: dict = {"delta": True, "gone": sorted(rel for rel, before in changed.items()
                                               if before is not None and rel not in entries)}
    out.update(body(now))
    return out
