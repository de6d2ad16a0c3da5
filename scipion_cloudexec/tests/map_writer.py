"""A program that writes a file as some C programs do: through a shared mapping made from a
descriptor it closes before writing, so the writes themselves make no inotify event (the
close of the mapping's file comes when the process exits). Python's own ``mmap`` keeps a
copy of the descriptor, so the mapping is made through libc.

    python map_writer.py PATH TEXT (--go FILE | --sleep SECONDS)

Creates PATH as 4096 zero bytes, maps it, closes the descriptor, prints ``mapped``, waits
(for FILE to exist, or SECONDS), writes TEXT at its start through the mapping and exits.
"""
import argparse
import ctypes
import mmap
import os
import time

SIZE = 4096


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("text")
    p.add_argument("--go")
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open(a.path, "wb") as f:
        f.write(b"\0" * SIZE)
    fd = os.open(a.path, os.O_RDWR)
    addr = libc.mmap(None, SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap %s" % a.path)
    os.close(fd)  # the file's last event until the process exits
    print("mapped", flush=True)
    if a.go:
        while not os.path.exists(a.go):
            time.sleep(0.01)
    time.sleep(a.sleep)
    data = a.text.encode()[:SIZE]
    ctypes.memmove(addr, data, len(data))
    libc.msync(addr, SIZE, 4)  # MS_SYNC


if __name__ == "__main__":
    main()
