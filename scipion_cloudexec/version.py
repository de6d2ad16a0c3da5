"""Version of the plugin and of the client/agent wire protocol."""

__version__ = "0.1.0"

#: Bumped whenever a message changes shape; client and agent must agree on it. What a bump
#: must keep, and what a client meets against an agent of another one: docs/PROTOCOL.md.
PROTOCOL_VERSION = 4
