"""Wire format shared by the key-value server and its clients (ZeroMQ Clone pattern).

Kept in one module so that server and client cannot drift apart, and so that the
frame layouts are documented in one place.

Sockets (the server binds all three; a client only needs the first address):

* bootstrap, ROUTER <- DEALER: ``[cmd, request_id, payload]``
    - ``HELLO``    -> reply payload ``{"epoch", "pub", "collector", "heartbeat"}``
    - ``SNAPSHOT`` (payload ``{"subtrees": [...]}``) -> reply payload
      ``{"epoch", "seq", "counts", "entries": [[key, body, ttl], ...]}``
* updates, PUB -> SUB:
    - update:    ``[b"k" + key, packb([seq, epoch, ttl, origin, counts]), body]``
    - heartbeat: ``[b"h", packb({"epoch", "seq", "counts"})]``
  The ``k``/``h`` topic prefix lets a SUB filter subtrees by key prefix and still
  receive heartbeats, whatever the keys look like.
* collector, PULL <- PUSH: ``[key, packb([ttl, refresh, origin]), body]``

``body`` is the msgpack encoding of the value; an empty body means "deleted"
(msgpack never encodes a value as zero bytes, so the two cannot be confused).

Sequence numbers: ``seq`` numbers every update the server makes (per epoch).
``counts`` maps each subtree some client asked for to the number of updates made
under it; a client filtered to a subtree cannot see gaps in the global ``seq``,
but it can see a gap in its subtree's count. ``epoch`` is a random id chosen by
each server start, so a client notices a restarted server from its first message.
"""

from __future__ import annotations

from typing import Any

import msgpack

HELLO = b"HELLO"
SNAPSHOT = b"SNAPSHOT"
UPDATE_TOPIC = b"k"
HEARTBEAT_TOPIC = b"h"
DELETED = b""

# Control-plane messages are small; a deep queue lets a briefly busy client catch
# up instead of losing updates (and paying for a resync).
HWM = 100_000


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # strict_map_key=False: values may be dicts with int keys, not only str.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def split_tcp(endpoint: str) -> tuple[str, str]:
    """``tcp://host:port`` -> ``(host, port)``; IPv6 hosts keep their brackets."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"not a tcp endpoint: {endpoint!r}")
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not host:
        raise ValueError(f"tcp endpoint without host:port: {endpoint!r}")
    return host, port


_WILDCARDS = {"*", "0.0.0.0", "[::]", "::", "[*]", ""}


def reachable(bound: str, host_address: str) -> str:
    """Turn a bound endpoint (a socket's LAST_ENDPOINT) into one peers can connect to.

    ``tcp://0.0.0.0:41234`` or ``tcp://*:41234`` becomes ``tcp://<host_address>:41234``;
    a specific bound host is kept; ipc:// and inproc:// are returned unchanged.
    Never returns a wildcard host: an empty or wildcard ``host_address`` means
    127.0.0.1.
    """
    if not bound.startswith("tcp://"):
        return bound
    host, port = split_tcp(bound)
    if host not in _WILDCARDS:
        return bound
    return with_host(bound, host_address)


def with_host(endpoint: str, host: str) -> str:
    """Replace the host of a tcp endpoint (a wildcard host becomes 127.0.0.1)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    _, port = split_tcp(endpoint)
    host = host.strip()
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # bare IPv6 literal
    return f"tcp://{host}:{port}"


def sibling(bind: str, suffix: str) -> str:
    """Where to bind the PUB/collector next to a bootstrap bound at ``bind``.

    tcp: same interface, a port of the system's choosing (the client learns it from
    HELLO); ipc/inproc: the same name with a suffix.
    """
    if bind.startswith("tcp://"):
        host, _ = split_tcp(bind)
        return f"tcp://{host}:0"
    return f"{bind}.{suffix}"
