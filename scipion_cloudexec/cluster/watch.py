"""What changed in the local run folder since the last stage-in, learnt from inotify (Linux,
through ctypes: no dependency), so a stage-in looks at those paths instead of walking the
whole run folder (issue 13).

A stage-in may use the paths this gives only under one invariant: every path it does not
name holds, here, the state the base holds for it. A full walk establishes it (the watch
is set up *before* that walk: what changes during the walk is reported too); events keep
it (a file written, created, deleted, renamed, its attributes changed); what a sync leaves
unequal (conflicts) is named again at every stage-in (:meth:`recheck`). Whenever the
watch cannot vouch for it, :meth:`changes` answers None and the caller walks everything:
not on Linux, inotify unavailable or out of watches, the kernel's queue overflowed, a
watched folder moved or was removed, a link to a folder in the run folder (its content is
not watched), the base reset (:meth:`invalidate`).

Files whose content may change without an event on their folder are named at every
stage-in, like a walk would look at them: links to files (the target lives elsewhere),
files with several hard links (and the name a file had when a new link to it appears: a
link makes no event on the file's other names), files written here (from their first
write or close on, stat'ed every time; the hash memo says whether they changed), and files
this process maps shared and writable (read from ``/proc/self/maps``: writes through a
mapping make no event until it is unmapped). Another local process writing through a
mapping is seen when it unmaps the file (its close event), at the next stage-in. The
gathers' own writes show up as events too: the file hashes equal to the base, and nothing
travels.
"""
from __future__ import annotations

import functools
import logging
import os
import stat
import threading
from typing import Dict, Iterator, Optional, Sequence, Set, Tuple

from ..remote import inotify
from ..remote.inotify import (IN_DELETE_SELF, IN_IGNORED, IN_ISDIR, IN_MOVE_SELF,
                              IN_MOVED_FROM, IN_MOVED_TO, TREE_MASK, WRITTEN, Inotify)
from .errors import InputMissing
from .local_files import TEMP_PREFIX, _excluded, _Local, _walk_dir

log = logging.getLogger(__name__)


def _locked(method):
    """Under the watch's lock: a lost cluster's runner is closed by whichever thread saw
    the loss, while another may be in a stage-in (its descriptor read, or closed and its
    number given to a new socket, under the reader)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class Unwatchable(Exception):
    """The watch cannot vouch for the run folder: walk it."""


class RunFolderWatch:
    """inotify watches on every folder of one run folder (project-relative *run_dir*),
    excluded prefixes (project-relative) left out. Used by one cluster's stage-ins, which
    take turns: not thread-safe."""

    def __init__(self, project_root: str, run_dir: str, exclude: Sequence[str] = ()):
        self.root = os.path.abspath(project_root)
        self.run_dir = os.path.normpath(run_dir)
        self.exclude = list(exclude)
        self._ino: Optional[Inotify] = None
        self._wds: Dict[int, str] = {}  # watch -> folder (project-relative)
        self._dirty: Set[str] = set()
        self._always: Set[str] = set()  # stat'ed at every stage-in (see the module's doc)
        self._recheck: Set[str] = set()  # left unequal to the base by a sync
        self._inodes: Dict[int, str] = {}  # a regular file's inode -> its path (or a past one)
        self._linked: Set[str] = set()  # earlier names of files linked again, to name now
        self._lock = threading.RLock()
        self.enabled = inotify.enabled()

    # ---- set up ----------------------------------------------------------------------

    @_locked
    def start(self) -> None:
        """Watch every folder now, before the full walk whose result the next
        :meth:`changes` builds on; anything that fails leaves the watch off (walks)."""
        self.close()
        if not self.enabled:
            return
        try:
            self._ino = Inotify()
            self._add_tree(self.run_dir)
        except (OSError, Unwatchable) as e:
            log.info("run folder %s: full walks (%s)", self.run_dir, e)
            self.close()

    def _add_tree(self, rel: str) -> None:
        """Watch *rel* and the folders under it, each before it is read; note what must be
        stat'ed every time."""
        path = os.path.join(self.root, rel)
        assert self._ino is not None
        wd = self._ino.add(path, TREE_MASK)
        if wd is None:
            return  # gone meanwhile: its parent's event names it
        self._wds[wd] = rel
        with os.scandir(path) as it:
            for e in it:
                sub = rel + "/" + e.name
                if e.name.startswith(TEMP_PREFIX) or _excluded(sub, self.exclude):
                    continue
                try:
                    if e.is_symlink():
                        if e.is_dir():
                            raise Unwatchable("%s links to a folder" % sub)
                        self._always.add(sub)
                    elif e.is_dir(follow_symlinks=False):
                        self._add_tree(sub)
                    else:  # a new folder may hold a new link to a file
                        self._file(sub, e.stat(follow_symlinks=False))
                except FileNotFoundError:
                    continue

    # ---- use -------------------------------------------------------------------------

    @_locked
    def changes(self) -> Optional[Tuple[Set[str], Set[str]]]:
        """The project-relative paths that may differ from the base now (changed since the
        last call, plus those named every time), as (paths, folders among them: watched
        now, to be walked whole), or None: walk the whole run folder (and :meth:`start`
        before that walk)."""
        if self._ino is None:
            return None
        try:
            self._read()
            paths = self._dirty | self._always | self._recheck | self._mapped()
            folders = set()
            for rel in paths:
                path = os.path.join(self.root, rel)
                try:
                    st = os.lstat(path)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    if os.path.isdir(path):
                        raise Unwatchable("%s links to a folder" % rel)
                    self._always.add(rel)
                elif stat.S_ISDIR(st.st_mode):
                    self._add_tree(rel)  # before its walk: what comes after is an event
                    folders.add(rel)
                else:
                    self._file(rel, st)
            paths |= self._linked
            self._linked = set()
        except (OSError, Unwatchable) as e:
            log.info("run folder %s: a full walk (%s)", self.run_dir, e)
            self.close()
            return None
        self._dirty = set()
        return paths, folders

    def _mapped(self) -> Set[str]:
        """Files of the run folder this process maps shared and writable now: written
        through the mapping, they get no event until it is gone."""
        top = os.path.join(self.root, self.run_dir) + "/"
        out = set()
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return out
        # only the lines naming the run folder are split: there are hundreds (a stack per
        # thread), read at every stage-in
        at = maps.find(top)
        while at >= 0:
            end = maps.find("\n", at)
            end = len(maps) if end < 0 else end
            fields = maps[maps.rfind("\n", 0, at) + 1:end].split(None, 5)
            if len(fields) == 6 and fields[1][1] == "w" and fields[1][3] == "s" \
                    and fields[5].startswith(top):
                out.add(os.path.relpath(fields[5], self.root))
            at = maps.find(top, end)
        return {rel for rel in out if not _excluded(rel, self.exclude)}  # logs/'s sqlite

    def _file(self, rel: str, st: os.stat_result) -> None:
        """A file seen: with several links, it and the name the inode had (a new link
        makes no event on the file's other names) are named at every stage-in from now on."""
        if st.st_nlink > 1:
            self._always.add(rel)
            older = self._inodes.get(st.st_ino)
            if older and older != rel:
                self._always.add(older)
                self._linked.add(older)
        self._inodes[st.st_ino] = rel

    @_locked
    def recheck(self, paths: Sequence[str]) -> None:
        """*paths* were left unequal to the base (conflicts): name them at every stage-in."""
        self._recheck.update(paths)

    @_locked
    def invalidate(self) -> None:
        """The base was reset or changed behind the watch's back: walk next time."""
        self.close()

    def _read(self) -> None:
        assert self._ino is not None
        for wd, mask, name in self._ino.read():
            self._event(wd, mask, name)

    def _event(self, wd: int, mask: int, name: str) -> None:
        folder = self._wds.get(wd)
        if folder is None:
            return  # a watch already dropped
        if mask & IN_IGNORED:  # its folder was removed: the parent's event names it
            del self._wds[wd]
            if folder == self.run_dir:
                raise Unwatchable("the run folder itself was removed")
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            if folder == self.run_dir:
                raise Unwatchable("the run folder itself moved or was removed")
            return
        if mask & IN_ISDIR and mask & (IN_MOVED_FROM | IN_MOVED_TO):
            raise Unwatchable("a folder moved: its watches name old paths")
        rel = folder + "/" + name
        if name.startswith(TEMP_PREFIX) or _excluded(rel, self.exclude):
            return
        self._dirty.add(rel)
        if mask & WRITTEN and not mask & IN_ISDIR:
            self._always.add(rel)

    def entries(self, paths: Set[str], folders: Set[str]
                ) -> Iterator[Tuple[str, Optional[_Local]]]:
        """What a walk yields (see :meth:`Stager.walk`), for *paths* only, from
        :meth:`changes`: *folders* walked whole, files stat'ed (following links, as a walk
        does), paths gone yield nothing."""
        for rel in sorted(paths):
            path = os.path.join(self.root, rel)
            if rel in folders:
                yield from _walk_dir(path, rel, self.exclude, set())
                continue
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                if os.path.islink(path):
                    raise InputMissing("input %s is a broken link" % path) from None
                continue
            if not stat.S_ISDIR(st.st_mode):  # made a folder since: its event comes next
                yield rel, _Local(path, os.path.realpath(path), st)

    @_locked
    def close(self) -> None:
        """Drop the watches (the next :meth:`changes` asks for a walk)."""
        if self._ino is not None:
            self._ino.close()
        self._ino = None
        self._wds.clear()
        self._dirty = set()
        self._always = set()
        self._inodes = {}
        self._linked = set()
