"""Shared state for zpipe nodes: a Clone-pattern key-value store over ZeroMQ.

One server orders every change; each client keeps a live local copy of the
subtrees it cares about. See ``protocol.py`` for the wire format.
"""

from .client import KVClient
from .server import KVServer, serve

__all__ = ["KVClient", "KVServer", "serve"]
