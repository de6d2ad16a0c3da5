"""The staging wire protocol: what the desktop's stager asks the cluster's staging server.

Typed like the agent's ZeroMQ messages (``messages.py``): one dataclass per request, one
JSON line each on the server's stdin, ``cmd`` naming the request::

    stager (desktop)                                 stage_server (cluster, stdin/stdout)
      Hello(protocol=N) -------------------------->  its own N: {"ok": true, "protocol": N}
                                                     another: {"error": "protocol", ...} and exits
      StageIn / ListTree / Send / Reset / Remove
      / CacheInfo / Mirrors ---------------------->  answers: JSON lines (and raw bytes for
                                                     StageIn's contents and Send's files)
      ChunkPlan / Chunk (+ bytes) / Publish ------>  large files in byte ranges, over several
                                                     streams at once (see remote/chunks.py)
      <------------------------------------------  {"alive": 1} while it works on a request

The server of a bundle is always the client's own code (the bundle's name is its hash), so
another protocol means a damaged or foreign bundle at that path, or a client bumped without
its server; either way :class:`StagingProtocolMismatch` names both versions instead of a
server misreading requests. Standard library only (shipped to the cluster).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Type

#: the shape of the requests and answers below; bump when an old peer would misread them
STAGE_PROTOCOL = 3  # 2: ChunkPlan, Chunk, Publish (large files over parallel streams);
# 3: ListTree's track/since, answered with what changed since the last listing (issue 13)


class BadRequest(ValueError):
    """A line that is not a request of this protocol."""


@dataclass
class Request:
    """Base of the requests; ``CMD`` is the ``cmd`` field on the wire."""
    CMD: ClassVar[str] = ""

    def encode(self) -> bytes:
        """One JSON line."""
        # shallow: fields are plain values and lists; dataclasses.asdict deep-copies every
        # entry of a 10,000-file check (0.1-0.2 s of a cold stage-in)
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        body["cmd"] = self.CMD
        return json.dumps(body).encode() + b"\n"


@dataclass
class Hello(Request):
    """The first request on every stream: the client's protocol version."""
    CMD: ClassVar[str] = "hello"
    protocol: int = STAGE_PROTOCOL


@dataclass
class StageIn(Request):
    """Make files present in a mirror. ``files``: ``[rel, size, sha256]`` for inputs (hard
    links into the cache), ``[rel, size, sha256, base, shared]`` for a run folder (private
    copies, written only where the mirror still holds *base*). Answer: ``{"missing":
    [[sha256, offset]], "needed", "free"}`` (or ``{"error": "nospace"}``), then the missing
    contents back to back, then ``{"received", "linked", "unchanged", "repaired", "errors",
    "conflicts"}``. With *check*, what the cache holds is linked and the answer comes at
    once without reading any content. *stall*: seconds without a byte that end the upload."""
    CMD: ClassVar[str] = "in"
    mirror: str = ""
    files: List[list] = field(default_factory=list)
    dirs: List[str] = field(default_factory=list)
    check: bool = False
    stall: float = 60.0


@dataclass
class ListTree(Request):
    """The tree under ``root/dir``: ``{"exists", "files": [[rel, size, mtime_ns, sha256]],
    "dirs", "links": [[rel, target]], "refused": [[rel, reason]], "skipped": [[rel, kind]]}``,
    paths relative to *root*; *exclude* relative to *dir*. With *track*, the answer also
    has a ``"token"``; a request whose *since* is the token of the last tracked listing of
    this tree by this server process is answered with what changed since:
    ``"delta": true``, ``files`` / ``dirs`` / ``links`` whose entry differs (new ones
    too), ``"gone": [rel]``; ``refused`` and ``skipped`` in full. Any other *since* gets
    the whole listing (no ``"delta"``): a delta only ever applies to the listing it was
    computed from."""
    CMD: ClassVar[str] = "list"
    root: str = ""
    dir: str = "."
    exclude: List[str] = field(default_factory=list)
    track: bool = False
    since: str = ""


@dataclass
class Send(Request):
    """For each path under *root*: a header line ``{"path", "size"}``, the bytes, a trailer
    line ``{"sha256"}`` (nothing else comes between them)."""
    CMD: ClassVar[str] = "send"
    root: str = ""
    paths: List[str] = field(default_factory=list)


@dataclass
class Reset(Request):
    """Empty folder *dir* of *mirror*. Answer ``{"ok": true}``."""
    CMD: ClassVar[str] = "reset"
    mirror: str = ""
    dir: str = ""


@dataclass
class Remove(Request):
    """Delete ``[rel, state]`` paths of *mirror* where they still hold that state. Answer
    ``{"deleted", "conflicts": [[rel, state now]]}``."""
    CMD: ClassVar[str] = "rm"
    mirror: str = ""
    paths: List[list] = field(default_factory=list)


@dataclass
class CacheInfo(Request):
    """The cache's entries and bytes; with *gc*, first drop objects no mirror links to that
    are at least *min_age* seconds old (a younger one may be on its way into a mirror)."""
    CMD: ClassVar[str] = "cache"
    gc: bool = False
    min_age: float = 3600.0


@dataclass
class Mirrors(Request):
    """Bytes and files each mirror has received: ``{"mirrors": [{mirror, bytes, files,
    updated}]}``."""
    CMD: ClassVar[str] = "mirrors"


@dataclass
class ChunkPlan(Request):
    """A large file to be sent in byte ranges of *chunk* bytes over several streams (each a
    staging server of its own). Answer ``{"present": bool, "have": [chunk indexes already
    written]}``; chunk *i* covers ``i*chunk .. min(size, (i+1)*chunk)``."""
    CMD: ClassVar[str] = "plan"
    sha256: str = ""
    size: int = 0
    chunk: int = 0


@dataclass
class Chunk(Request):
    """Chunk *index* of a planned file: its bytes follow this line at once. The server
    writes them at their offset (several servers write one file at once) and records the
    chunk as done. Answer ``{"ok": true}`` (or ``{"present": true}`` when the object was
    published meanwhile: the bytes are read and dropped). *stall* as for StageIn."""
    CMD: ClassVar[str] = "chunk"
    sha256: str = ""
    size: int = 0
    chunk: int = 0
    index: int = 0
    stall: float = 60.0


@dataclass
class Publish(Request):
    """Every chunk sent: hash the whole file once and publish it into the cache. Answer
    ``{"ok": true}``, ``{"missing": [indexes]}`` (chunks not recorded as written), or
    ``{"bad": digest}`` (another hash: the chunks are dropped, nothing is published)."""
    CMD: ClassVar[str] = "publish"
    sha256: str = ""
    size: int = 0
    chunk: int = 0


@dataclass
class SendRange(Request):
    """Bytes *offset* .. *offset + length* of *path* under *root* (a chunk of a large file
    gathered over several streams): a header line ``{"size": length}``, then exactly that
    many bytes (zeros past the end of a file that shrank: the desktop's whole-file hash
    against the listing refuses it)."""
    CMD: ClassVar[str] = "range"
    root: str = ""
    path: str = ""
    offset: int = 0
    length: int = 0


REQUESTS: Dict[str, Type[Request]] = {cls.CMD: cls for cls in (
    Hello, StageIn, ListTree, Send, Reset, Remove, CacheInfo, Mirrors, ChunkPlan, Chunk,
    Publish, SendRange)}


def decode(line: bytes) -> Request:
    """The request of one line.

    Raises:
        BadRequest: not JSON, an unknown ``cmd``, or fields the request does not have.
    """
    try:
        raw = json.loads(line)
        cls = REQUESTS[raw.pop("cmd")]
        return cls(**raw)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadRequest("not a staging request of protocol %d: %s: %s"
                         % (STAGE_PROTOCOL, type(e).__name__, e)) from None


def mismatch(theirs: Any) -> Optional[str]:
    """Why a peer speaking protocol *theirs* cannot be served (None: it can)."""
    if theirs == STAGE_PROTOCOL:
        return None
    return ("staging protocol %s, this staging server speaks %d: the bundle at this path is "
            "not the client's own (damaged or another release's); remove it and run again"
            % (theirs, STAGE_PROTOCOL))
