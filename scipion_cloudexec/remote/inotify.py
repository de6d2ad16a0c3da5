"""Linux inotify through ctypes (no dependency), and whether a folder's filesystem is one
whose every change passes through this host's kernel. Used on the desktop (the run
folder's changes before a stage-in) and on the cluster (the mirror's changes before a
listing). Standard library only (shipped to the cluster).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
from typing import Iterator, List, Optional, Tuple

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
#: what a watched tree needs: any change of an entry's content, kind, name or attributes
TREE_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
             | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
WRITTEN = IN_MODIFY | IN_CLOSE_WRITE  # opened for writing: it may be mapped and written
_EVENT = struct.Struct("iIII")

#: filesystems whose changes all go through the kernel of the host that holds them (an
#: NFS export of one of them included: the server's nfsd writes through its VFS), so
#: inotify on that host sees every change; network and cluster filesystems (nfs, lustre,
#: gpfs, beegfs, cephfs, cifs, fuse...) are written by other hosts' kernels: not here
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs",
                               "f2fs", "zfs", "jfs", "reiserfs", "overlay"})

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def enabled() -> bool:
    """inotify may be used: Linux, and not turned off with ``CLOUDEXEC_INOTIFY=0``."""
    return sys.platform.startswith("linux") and os.environ.get("CLOUDEXEC_INOTIFY", "1") != "0"


class Overflow(OSError):
    """The kernel's event queue overflowed: events were lost."""


class Inotify:
    """One non-blocking inotify instance."""

    def __init__(self) -> None:
        fd = _lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "inotify_init1: %s" % os.strerror(err))
        self.fd = fd

    def add(self, path: str, mask: int) -> Optional[int]:
        """A watch on *path* (its descriptor), or None if *path* is gone or no folder (with
        ``IN_ONLYDIR``); any other failure (out of watches...) raises OSError."""
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise OSError(err, "inotify_add_watch %s: %s" % (path, os.strerror(err)))
        return wd

    def remove(self, wd: int) -> None:
        _lib().inotify_rm_watch(self.fd, wd)  # already gone (folder removed): no matter

    def read(self) -> Iterator[Tuple[int, int, str]]:
        """The events queued now, in order: (watch, mask, name); raises :class:`Overflow`
        where the kernel lost some."""
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            at = 0
            while at < len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, at)
                name = buf[at + 16:at + 16 + size].rstrip(b"\0")
                at += 16 + size
                if mask & IN_Q_OVERFLOW:
                    raise Overflow(errno.EOVERFLOW, "events lost: the kernel's queue overflowed")
                yield wd, mask, os.fsdecode(name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts(mountinfo: str) -> List[Tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in the order mounted."""
    try:
        with open(mountinfo) as f:
            lines: List[str] = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and len(fields) >= 5 and right.split():
            out.append((_unescape(fields[4]), right.split()[0]))
    return out


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the filesystem holding *path* (``ext4``, ``nfs4``...), "" if unknown."""
    real = os.path.realpath(path)
    best, kind = "", ""
    for mount, fstype in _mounts(mountinfo):
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):  # the deepest; a later one covers an earlier
            best, kind = mount, fstype
    return kind


def local_filesystem(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Every change under *path* passes through this host's kernel (see
    :data:`LOCAL_FILESYSTEMS`): its filesystem, and any mounted below it."""
    if filesystem_type(path, mountinfo) not in LOCAL_FILESYSTEMS:
        return False
    below = os.path.realpath(path).rstrip("/") + "/"
    return all(fstype in LOCAL_FILESYSTEMS for mount, fstype in _mounts(mountinfo)
               if mount.startswith(below))
