"""The agent's socket security below the messages: ZeroMQ CURVE.

Every message is also authenticated by its HMAC (messages.py), but ZeroMQ assembles a whole
multi-frame message before the agent can check it: on a bare TCP socket any process on the
head node could make the agent hold frames it never asked for. With CURVE the agent's socket
completes no handshake with a peer that lacks the agent's key (``curve`` in ``agent.json``,
mode 0600, and in the ``READY`` line the client reads over SSH), so such a peer gets no
message in at all; the traffic is encrypted too, which costs little next to SSH's.

Shipped to the cluster with the agent: standard library and pyzmq only.
"""
from __future__ import annotations

from typing import Optional

import zmq

__all__ = ["curve_available", "serve_curve", "connect_curve", "CurveMissing"]


class CurveMissing(RuntimeError):
    """The agent asks for CURVE and this pyzmq (its libzmq) was built without it."""


def curve_available() -> bool:
    """Whether this libzmq can do CURVE."""
    return bool(zmq.has("curve"))


def serve_curve(sock: zmq.Socket) -> Optional[str]:
    """Make *sock* (before bind) a CURVE server with a new key pair; returns the public key
    (Z85 text) that clients need, or None when libzmq lacks CURVE (the HMAC alone then)."""
    if not curve_available():
        return None
    public, secret = zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_server = True
    return public.decode("ascii")


def connect_curve(sock: zmq.Socket, server_key: Optional[str]) -> None:
    """Make *sock* (before connect) a CURVE client of the agent whose public key is
    *server_key*; nothing when the agent has none (an agent without CURVE).

    Raises:
        CurveMissing: the agent has a key and this libzmq cannot use it.
    """
    if not server_key:
        return
    if not curve_available():
        raise CurveMissing("the agent's socket asks for ZeroMQ CURVE, which this desktop's "
                           "pyzmq (libzmq %s) lacks: install a pyzmq wheel from PyPI (they "
                           "include it)" % zmq.zmq_version())
    public, secret = zmq.curve_keypair()  # the agent accepts any client key that knows its own
    sock.curve_serverkey = server_key.encode("ascii")
    sock.curve_publickey = public
    sock.curve_secretkey = secret
