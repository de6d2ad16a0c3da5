"""The agent bundle: the agent's own modules zipped, shipped by the client.

The zip is deterministic (fixed timestamps, sorted entries), so its SHA-256 names
exactly the code inside. The agent reports that hash as its version, which is
how the client knows the agent it talks to runs the client's own code.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from functools import lru_cache
from typing import Tuple

from ..version import __version__

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: modules the agent needs, relative to the package; all stdlib + pyzmq only
MODULES = (
    "version.py",
    "transport/messages.py",
    "agent/jobs.py",
    "agent/journal.py",
    "agent/launchers.py",
    "agent/schedulers.py",
    "agent/server.py",
)
_INITS = ("__init__.py", "transport/__init__.py", "agent/__init__.py")
_MAIN = b"""import sys
if sys.version_info < (3, 9):
    sys.exit("cloudexec agent: Python 3.9 or newer is needed, this is %s" % sys.version.split()[0])
try:
    import zmq  # noqa: F401
except ImportError:
    sys.exit("cloudexec agent: No module named 'zmq': install pyzmq for %s" % sys.executable)
from scipion_cloudexec.agent.server import main
sys.exit(main())
"""


@lru_cache(maxsize=1)
def build() -> Tuple[bytes, str]:
    """Return (zip bytes, version ``<release>+<sha256[:12]>``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        add("__main__.py", _MAIN)
        for rel in sorted(_INITS + MODULES):
            data = b"" if rel in _INITS else open(os.path.join(_PKG, rel), "rb").read()
            add("scipion_cloudexec/" + rel, data)
    data = buf.getvalue()
    return data, "%s+%s" % (__version__, hashlib.sha256(data).hexdigest()[:12])
