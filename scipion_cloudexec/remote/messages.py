"""Messages between the client and the remote agent, and their authenticated envelope.

Wire format (ZeroMQ multipart, DEALER -> ROUTER), protocol 2 and later::

    [b"CX" + version (2 bytes, big-endian), mac, body, *blobs]

``body`` is UTF-8 JSON ``{"t": <type>, "v": version, ...fields}``; ``blobs`` carry raw
bytes (job output) without base64. ``mac`` is HMAC-SHA256 with the agent's secret over the
first frame, the number of frames after the MAC and each one's length and bytes: a message
from anyone without the secret (another user on the head node, a forged frame) fails
:func:`decode` and is dropped, and so do authentic frames cut differently (re-split,
merged, dropped, re-stamped with another version). The secret travels only over the SSH
channel (a 0600 file read through SFTP) and is new for each agent process.

Versions. The first frame names the protocol before anything is authenticated, so a
message of another version is reported as such (:class:`OtherProtocol`), not as a forgery
or a timeout. Frozen from protocol 2 on, so that every later version can still read them:
the envelope and its MAC, ``Hello``'s ``rid``/``protocol`` and ``Error``'s ``rid``/``kind``/
``detail``. An agent answers an authentic ``Hello`` of another version with
``Error(kind="protocol")`` in the sender's own envelope (:func:`decode_hello`,
:func:`refusal`); protocol 1 (first frame ``b"CX"`` alone, MAC over the bytes only) is
known too, so a client of 1 gets that error rather than silence. Before speaking ZeroMQ
at all, the client compares the protocol in the agent's state line (``READY``), and the
bundle's ``start`` replaces an idle agent of another protocol (agent/server.py).

Replays. A peer without the secret can still resend captured authentic frames verbatim
(there is no session key or sequence number, on purpose). Capturing loopback traffic or
the SSH tunnel's end takes root, who can read the secret anyway, so this is defence in
depth, and every request is harmless when repeated: ``Submit`` is idempotent on the job
id (the agent answers ``existed=True`` and never runs it twice), ``Cancel`` of a job
already cancelled or ended changes nothing, ``Shutdown(only_if_idle)`` is refused while a
job is active (an idle agent that exits is started again by the next client, jobs and
journal intact), ``Hello``/``Ping``/``Watch``/``ListJobs`` only read. Replies go to the
replaying connection, authenticated but not encrypted: a replayed ``Submit`` or ``Watch``
shows that job's output, to root only, who can read the job's files anyway. A replay
against a later agent fails: its secret differs.

This module is shipped to the cluster with the agent: standard library only.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from ..version import PROTOCOL_VERSION

MAGIC = b"CX"
#: protocol 1's first frame was MAGIC alone and its MAC did not cover frame boundaries
LEGACY_PROTOCOL = 1
_VERSION = struct.Struct(">H")
_COUNT = struct.Struct(">I")
_LENGTH = struct.Struct(">Q")

#: largest frame the agent accepts (ZMQ_MAXMSGSIZE on its ROUTER; a bigger one closes the
#: sender's connection before its bytes are read). Legitimate requests are small: a Submit
#: carries argv and environment, a few KiB, or ~1 MiB for thousands of file arguments.
MAX_REQUEST_FRAME = 8 << 20
#: largest frame the client accepts from its agent: output chunks are 256 KiB, a Jobs
#: answer is 100 journal rows
MAX_REPLY_FRAME = 64 << 20


class BadMessage(ValueError):
    """A message failed authentication or does not parse; it must be dropped."""


class OtherProtocol(BadMessage):
    """A cloudexec message of another protocol version (claimed by its unauthenticated
    first frame): a peer of another release, or a forgery."""

    def __init__(self, protocol: int, expected: int):
        super().__init__("protocol version %s, expected %s" % (protocol, expected))
        self.protocol = protocol
        self.expected = expected


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
    """The job is in the journal; ``existed`` when it was submitted before; ``reason``
    says why it waits, if it does (the head node's slots or GPUs are taken)."""
    job_id: str = ""
    state: str = ""
    existed: bool = False
    reason: str = ""


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
    gpus: List[int] = field(default_factory=list)  # those it ran on (the agent may swap)


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


def encode(msg: Message, secret: bytes, protocol: int = PROTOCOL_VERSION) -> List[bytes]:
    """Message -> authenticated multipart frames.

    *protocol* other than ours is only for :func:`refusal` (an ``Error`` stamped with the
    peer's version so that the peer can read it).
    """
    # shallow on purpose: dataclasses.asdict deep-copies and doubles the cost of a ping
    fields = {name: getattr(msg, name) for name in _field_names(type(msg))}
    blob = fields.pop("blob")
    fields["t"] = msg.TYPE
    fields["v"] = protocol
    body = json.dumps(fields, separators=(",", ":")).encode()
    blobs: Sequence[bytes] = (blob,) if blob is not None else ()
    if protocol == LEGACY_PROTOCOL:
        return [MAGIC, _legacy_mac(secret, body, blobs), body, *blobs]
    head = header(protocol)
    return [head, _mac(secret, head, body, blobs), body, *blobs]


@functools.lru_cache(maxsize=None)
def _field_names(cls: Type[Message]) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def header(protocol: int) -> bytes:
    """First frame of a message of *protocol* (2 and later): ``CX`` + version (2 bytes)."""
    return MAGIC + _VERSION.pack(protocol)


def envelope_protocol(frames: Sequence[bytes]) -> int:
    """The protocol version a message's first frame claims (not authenticated).

    Raises:
        BadMessage: not a cloudexec message at all.
    """
    if len(frames) < 3:
        raise BadMessage("not a cloudexec message (%d frame(s))" % len(frames))
    head = bytes(frames[0])
    if head == MAGIC:
        return LEGACY_PROTOCOL
    if len(head) == len(MAGIC) + _VERSION.size and head.startswith(MAGIC):
        return _VERSION.unpack(head[len(MAGIC):])[0]
    raise BadMessage("not a cloudexec message")


def decode(frames: Sequence[bytes], secret: bytes, protocol: int = PROTOCOL_VERSION) -> Message:
    """Authenticated multipart frames of *protocol* (ours by default) -> Message.

    Raises:
        OtherProtocol: a cloudexec message of another protocol version (says which).
        BadMessage: wrong envelope, failed HMAC, unknown type or bad fields.
    """
    claimed = envelope_protocol(frames)
    if claimed != protocol:
        raise OtherProtocol(claimed, protocol)
    if len(frames) > 4:  # before the MAC: no hashing of a forged pile of frames
        raise BadMessage("%d frames, at most 4 expected" % len(frames))
    mac, body = bytes(frames[1]), bytes(frames[2])
    blobs = [bytes(b) for b in frames[3:]]
    expected = (_legacy_mac(secret, body, blobs) if claimed == LEGACY_PROTOCOL else
                _mac(secret, bytes(frames[0]), body, blobs))
    if not hmac.compare_digest(mac, expected):
        raise BadMessage("authentication failed (wrong or missing secret, or altered frames)")
    try:
        fields = json.loads(body)
    except ValueError:
        raise BadMessage("malformed body") from None
    if not isinstance(fields, dict) or "t" not in fields or "v" not in fields:
        raise BadMessage("body is not a message object")
    kind, version = fields.pop("t"), fields.pop("v")
    if version != claimed:  # authentic, so only a bug of the sender's
        raise BadMessage("body says protocol %s, envelope %s" % (version, claimed))
    cls = _TYPES.get(kind)
    if cls is None:
        raise BadMessage("unknown message type %r" % kind)
    try:
        msg = cls(**fields)
    except TypeError as e:
        raise BadMessage("bad fields for %s: %s" % (kind, e)) from None
    msg.blob = blobs[0] if blobs else None
    return msg


def decode_hello(frames: Sequence[bytes], secret: bytes) -> Optional[Tuple[Hello, int]]:
    """``(hello, its envelope's protocol)`` for an authentic :class:`Hello` of any version.

    Hello's ``rid`` and ``protocol`` and Error's ``kind`` and ``detail`` never change shape,
    and the envelope's MAC scheme is fixed from protocol 2 on (1 is known too), so any
    version can read another's Hello and answer it with :func:`refusal`. None when the
    message is not an authentic Hello. (A newer Hello's new fields are ignored.)
    """
    try:
        claimed = envelope_protocol(frames)
        mac, body = bytes(frames[1]), bytes(frames[2])
        blobs = [bytes(b) for b in frames[3:]]
        expected = (_legacy_mac(secret, body, blobs) if claimed == LEGACY_PROTOCOL else
                    _mac(secret, bytes(frames[0]), body, blobs))
        if not hmac.compare_digest(mac, expected):
            return None
        fields = json.loads(body)
        if not isinstance(fields, dict) or fields.get("t") != Hello.TYPE:
            return None
        return Hello(rid=int(fields.get("rid", 0)), client=str(fields.get("client", "")),
                     version=str(fields.get("version", "")),
                     protocol=int(fields.get("protocol", claimed))), claimed
    except (BadMessage, ValueError, TypeError):
        return None


def refusal(rid: int, protocol: int, secret: bytes, detail: str) -> List[bytes]:
    """Frames of an ``Error(kind="protocol")`` answering request *rid* in the envelope of
    *protocol* (the requester's), so that a client of that version reads it as a refusal."""
    return encode(Error(rid=rid, kind="protocol", detail=detail), secret, protocol)


def _mac(secret: bytes, head: bytes, body: bytes, blobs: Sequence[bytes]) -> bytes:
    # the header (magic, version), the number of frames and each frame's length are
    # authenticated with the bytes: frames cannot be re-split, merged, dropped or re-stamped
    parts = [body, *blobs]
    h = hmac.new(secret, head, hashlib.sha256)
    h.update(_COUNT.pack(len(parts)))
    for p in parts:
        h.update(_LENGTH.pack(len(p)))
        h.update(p)
    return h.digest()


def _legacy_mac(secret: bytes, body: bytes, blobs: Sequence[bytes]) -> bytes:
    """Protocol 1's MAC (body then blobs, boundaries not covered): only to read an old
    peer's Hello and answer it in a form it reads."""
    h = hmac.new(secret, body, hashlib.sha256)
    for b in blobs:
        h.update(b)
    return h.digest()


def split_identity(frames: Sequence[bytes]) -> Tuple[bytes, List[bytes]]:
    """ROUTER frames -> (peer identity, message frames)."""
    return bytes(frames[0]), list(frames[1:])
