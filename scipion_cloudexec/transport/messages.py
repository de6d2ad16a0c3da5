"""Messages between the client and the remote agent, and their authenticated envelope.

Wire format (ZeroMQ multipart, DEALER -> ROUTER)::

    [b"CX", mac, body, *blobs]

``body`` is UTF-8 JSON ``{"t": <type>, "v": PROTOCOL_VERSION, ...fields}``; ``blobs``
carry raw bytes (job output) without base64. ``mac`` is HMAC-SHA256 with the agent's
secret over ``body`` and every blob, so a message from anyone without the secret
(another user on the head node, a forged frame) fails :func:`decode` and is dropped.
The secret travels only over the SSH channel (a 0600 file read through SFTP).

This module is shipped to the cluster with the agent: standard library only.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from ..version import PROTOCOL_VERSION

MAGIC = b"CX"


class BadMessage(ValueError):
    """A message failed authentication or does not parse; it must be dropped."""


@dataclass
class Message:
    """Base of all messages; ``rid`` pairs a reply with its request."""
    rid: int = 0

    TYPE = ""
    blob: Optional[bytes] = field(default=None, repr=False)


_TYPES: Dict[str, Type[Message]] = {}


def message(cls):
    """Class decorator: make *cls* a dataclass message registered under its name."""
    cls = dataclass(cls)
    cls.TYPE = cls.__name__
    _TYPES[cls.TYPE] = cls
    return cls


# ---- client -> agent --------------------------------------------------------------

@message
class Hello(Message):
    """First message of a connection: who the client is and which code it runs."""
    client: str = ""
    version: str = ""
    protocol: int = PROTOCOL_VERSION


@message
class Ping(Message):
    """Heartbeat; the agent answers :class:`Pong` at once."""
    seq: int = 0


@message
class Submit(Message):
    """Start a job (``spec`` is a JobSpec as a dict); idempotent on ``spec['job_id']``.
    With ``watch`` the sender also gets its output and end, as after :class:`Watch`."""
    spec: Dict[str, Any] = field(default_factory=dict)
    watch: bool = True


@message
class Watch(Message):
    """Stream a job's output from the given byte offsets, then its end."""
    job_id: str = ""
    out_offset: int = 0
    err_offset: int = 0


@message
class Cancel(Message):
    """Stop a job (SIGTERM then SIGKILL to its process group, or scancel)."""
    job_id: str = ""


@message
class ListJobs(Message):
    """Ask for the journal's jobs, newest first."""
    limit: int = 100


@message
class Shutdown(Message):
    """Ask the agent to exit; refused while jobs run when ``only_if_idle``."""
    only_if_idle: bool = True


# ---- agent -> client --------------------------------------------------------------

@message
class Welcome(Message):
    """Answer to :class:`Hello`: the agent's identity and state."""
    version: str = ""
    protocol: int = PROTOCOL_VERSION
    pid: int = 0
    host: str = ""
    python: str = ""
    workdir: str = ""
    disk_free: int = 0
    active_jobs: int = 0


@message
class Pong(Message):
    seq: int = 0
    active_jobs: int = 0


@message
class Accepted(Message):
    """The job is in the journal; ``existed`` when it was submitted before."""
    job_id: str = ""
    state: str = ""
    existed: bool = False


@message
class Output(Message):
    """A chunk of a job's stdout or stderr, in ``blob``, starting at ``offset``."""
    job_id: str = ""
    stream: str = "stdout"
    offset: int = 0


@message
class Ended(Message):
    """A job reached a final state; sent after the last :class:`Output`."""
    job_id: str = ""
    state: str = ""
    exit_code: Optional[int] = None
    reason: str = ""
    launcher_id: str = ""
    started: float = 0.0
    ended: float = 0.0


@message
class Jobs(Message):
    jobs: List[Dict[str, Any]] = field(default_factory=list)


@message
class Done(Message):
    """Generic success answer (cancel, shutdown)."""
    ok: bool = True
    detail: str = ""


@message
class Error(Message):
    """The request was refused; ``kind`` names the failure for the client to map."""
    kind: str = ""
    detail: str = ""


def encode(msg: Message, secret: bytes) -> List[bytes]:
    """Message -> authenticated multipart frames."""
    # shallow on purpose: dataclasses.asdict deep-copies and doubles the cost of a ping
    fields = {name: getattr(msg, name) for name in _field_names(type(msg))}
    blob = fields.pop("blob")
    fields["t"] = msg.TYPE
    fields["v"] = PROTOCOL_VERSION
    body = json.dumps(fields, separators=(",", ":")).encode()
    blobs: Sequence[bytes] = (blob,) if blob is not None else ()
    return [MAGIC, _mac(secret, body, blobs), body, *blobs]


@functools.lru_cache(maxsize=None)
def _field_names(cls: Type[Message]) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def decode(frames: Sequence[bytes], secret: bytes) -> Message:
    """Authenticated multipart frames -> Message.

    Raises:
        BadMessage: wrong envelope, failed HMAC, unknown type or version.
    """
    if len(frames) < 3 or bytes(frames[0]) != MAGIC:
        raise BadMessage("not a cloudexec message")
    mac, body, blobs = bytes(frames[1]), bytes(frames[2]), [bytes(b) for b in frames[3:]]
    if not hmac.compare_digest(mac, _mac(secret, body, blobs)):
        raise BadMessage("authentication failed (wrong or missing secret)")
    try:
        fields = json.loads(body)
    except ValueError:
        raise BadMessage("malformed body") from None
    if not isinstance(fields, dict) or "t" not in fields or "v" not in fields:
        raise BadMessage("body is not a message object")
    kind, version = fields.pop("t"), fields.pop("v")
    if version != PROTOCOL_VERSION:
        raise BadMessage("protocol version %s, expected %s" % (version, PROTOCOL_VERSION))
    cls = _TYPES.get(kind)
    if cls is None:
        raise BadMessage("unknown message type %r" % kind)
    try:
        msg = cls(**fields)
    except TypeError as e:
        raise BadMessage("bad fields for %s: %s" % (kind, e)) from None
    msg.blob = blobs[0] if blobs else None
    return msg


def _mac(secret: bytes, body: bytes, blobs: Sequence[bytes]) -> bytes:
    h = hmac.new(secret, body, hashlib.sha256)
    for b in blobs:
        h.update(b)
    return h.digest()


def split_identity(frames: Sequence[bytes]) -> Tuple[bytes, List[bytes]]:
    """ROUTER frames -> (peer identity, message frames)."""
    return bytes(frames[0]), list(frames[1:])
