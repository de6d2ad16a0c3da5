"""Path checks both sides of the wire make alike (stdlib only: shipped to the cluster)."""
from __future__ import annotations

import os


def inside(path: str, folder: str, strictly: bool = False) -> bool:
    """Whether *path* is *folder* or below it (*strictly*: below it only). Both are taken
    as they are: resolve links first (``os.path.realpath``) where a link must not lead out."""
    folder = folder.rstrip(os.sep) or os.sep
    if path == folder:
        return not strictly
    return path.startswith(folder if folder == os.sep else folder + os.sep)

