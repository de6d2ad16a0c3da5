"""The desktop's copy of a mirror's run folder as the cluster last listed it, kept up to date
from listings that send only what changed (issue 13, see ``remote/listing.py``).

A gather asks with the token of the listing this copy holds; the staging server answers
with the paths whose entry changed and those gone, or, when it does not hold that token
(another server process, a restart), with the whole listing, which replaces the copy.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .local_files import _excluded
from .sync import DIR, under


class RemoteTree:
    """States (see :mod:`.sync`) and sizes of the mirror's run folder, by path."""

    def __init__(self, run_dir: str, exclude: Sequence[str]):
        self.run_dir = run_dir
        self.exclude = list(exclude)
        self.token = ""  # of the listing this copy holds; "" asks for the whole listing
        self.states: Dict[str, str] = {run_dir: DIR}
        self.sizes: Dict[str, int] = {}
        self.outside: Dict[str, str] = {}  # listed paths no real walk gives: refused

    def apply(self, listing: dict) -> None:
        """Take in a listing: a delta (``"delta"``) onto this copy, or a whole one in its
        place. Entries outside the run folder (never from a real walk) are kept apart,
        refused at every gather; excluded paths are left out."""
        delta = bool(listing.get("delta"))
        if delta:
            for rel in listing["gone"]:
                self._drop(rel)
        else:
            self.states, self.sizes, self.outside = {self.run_dir: DIR}, {}, {}
        entries: List[Tuple[str, str, Optional[int]]] = (
            [(rel, sha, size) for rel, size, _mtime, sha in listing["files"]]
            + [(rel, DIR, None) for rel in listing.get("dirs", [])]
            + [(rel, "l:" + target, None) for rel, target in listing["links"]])
        for rel, state, size in entries:
            if delta:
                self._drop(rel)
            if not under(rel, self.run_dir):
                self.outside[rel] = "outside %s" % self.run_dir
            elif not _excluded(rel, self.exclude):
                self.states[rel] = state
                if size is not None:
                    self.sizes[rel] = size
        self.token = listing.get("token", "")

    def _drop(self, rel: str) -> None:
        self.states.pop(rel, None)
        self.sizes.pop(rel, None)
        self.outside.pop(rel, None)
