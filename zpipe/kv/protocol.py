"""Wire format shared by the key-value server and its clients (ZeroMQ Clone pattern).

Kept in one module so that server and client cannot drift apart, and so that the
frame layouts are documented in one place.

Sockets (the server binds all three; a client only needs the first address):

* bootstrap, ROUTER <- DEALER: ``[cmd, request_id, payload]`` (at most
  ``MAX_REQUEST`` bytes), answered ``[cmd, request_id, reply]``
    - ``HELLO``    -> reply payload ``{"epoch", "pub", "collector", "heartbeat"}``
      (epoch a str of 1..``MAX_EPOCH``, endpoints str, heartbeat seconds in
      (0, ``MAX_HEARTBEAT``]); the request's payload is ignored
    - ``SNAPSHOT`` (payload ``{"subtrees": [...]}``, a list of at most
      ``MAX_SUBTREES`` str; no payload means ``[""]``) -> reply payload
      ``{"epoch", "seq", "counts", "entries": [[key, body, ttl], ...]}``
* updates, PUB -> SUB:
    - update:    ``[b"k" + key, packb([seq, epoch, ttl, origin, counts]), body]``
    - heartbeat: ``[b"h", packb({"epoch", "seq", "counts"})]``
    - welcome:   ``[b"w" + token]``, one frame, sent back (XPUB) for each subscription
      to a topic ``b"w" + token`` (token at most ``MAX_WELCOME - 1`` bytes)
  The ``k``/``h`` topic prefix lets a SUB filter subtrees by key prefix and still
  receive heartbeats, whatever the keys look like. A client subscribes to its own
  welcome topic with the others; ZeroMQ sends a SUB's subscriptions in topic order
  (``h`` < ``k`` < ``w``) on one connection, so its welcome says its updates are
  live, and a snapshot taken after it misses nothing (the Clone pattern's race
  between a SUB still connecting and the snapshot). Counts in updates and
  heartbeats catch anything that still slips through.
* collector, PULL <- PUSH: ``[key, packb([ttl, refresh, origin]), body]``

``body`` is the msgpack encoding of one value (the server checks that it decodes,
so no client meets one that does not); an empty body means "deleted"
(msgpack never encodes a value as zero bytes, so the two cannot be confused).
``key`` is UTF-8, not empty, at most ``MAX_KEY`` bytes. ``ttl`` is None (a plain
key) or seconds in (0, ``MAX_TTL``]; ``refresh`` a bool; ``origin`` the writer's
8-byte client id and its 8-byte big-endian write number (``ORIGIN_LEN`` bytes),
or ``b""`` in an update the server made itself (an expiry).

Malformed messages. Anything on any socket that does not have exactly this
shape and these types (or exceeds ``MAX_BODY``, ``MAX_KEY``, ``MAX_REQUEST``) is
dropped by whoever receives it, counted by reason (``KVServer.rejected``,
``KVClient.rejected``) and logged once per reason (``reject``). A legitimate
client never sends one: ``KVClient.set`` checks the same limits and raises.

Sequence numbers: ``seq`` numbers every update the server makes (per epoch).
``counts`` maps each subtree some client asked for to the number of updates made
under it; a client filtered to a subtree cannot see gaps in the global ``seq``,
but it can see a gap in its subtree's count. ``epoch`` is a random id chosen by
each server start, so a client notices a restarted server from its first message.
"""

from __future__ import annotations

from typing import Any

import logging
import math

import msgpack

HELLO = b"HELLO"
SNAPSHOT = b"SNAPSHOT"
UPDATE_TOPIC = b"k"
HEARTBEAT_TOPIC = b"h"
WELCOME_TOPIC = b"w"
MAX_WELCOME = 64  # bytes of a welcome topic
DELETED = b""

# Control-plane messages are small; a deep queue lets a briefly busy client catch
# up instead of losing updates (and paying for a resync).
HWM = 100_000

# Limits on what a message may carry (see "Malformed messages" above).
MAX_KEY = 1024  # bytes of a key or a subtree, UTF-8
MAX_BODY = 64 << 20  # bytes of an encoded value (generous: reports carry lists)
MAX_TTL = 86_400.0  # seconds; an ephemeral key refreshed less than daily is not one
MAX_REQUEST = 64 << 10  # bytes of a bootstrap request, all frames
MAX_SUBTREES = 256  # in one snapshot request
MAX_COUNTED_SUBTREES = 1024  # distinct subtrees the server counts (every heartbeat carries them all)
ORIGIN_LEN = 16  # client id (8) + write number (8)
MAX_EPOCH = 64  # characters
MAX_HEARTBEAT = 3600.0  # seconds between a server's heartbeats
# libzmq names a context's threads "<prefix>/ZMQbg/IO/0" (an integer prefix only): the registry's clients'
# threads ("1/...") and its server's ("2/...") stand apart from the data plane's in `top -H`, py-spy and
# the benchmarks (benchmarks/bench_security.py measures the control plane's CPU by them).
CLIENT_THREADS, SERVER_THREADS = 1, 2


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # strict_map_key=False: values may be dicts with int keys, not only str.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decodes(data: bytes) -> bool:
    """Whether ``data`` is exactly one msgpack value that ``unpack`` accepts."""
    try:
        unpack(data)
    except Exception:  # msgpack raises several kinds (and ValueError, TypeError...)
        return False
    return True


def is_int(value: Any) -> bool:
    """An integer, not a bool (msgpack keeps the two apart; so do we)."""
    return type(value) is int


def is_ttl(value: Any) -> bool:
    """None, or a finite number of seconds in (0, MAX_TTL]."""
    if value is None:
        return True
    return type(value) in (int, float) and math.isfinite(value) and 0 < value <= MAX_TTL


def is_counts(value: Any) -> bool:
    """A map of subtree -> non-negative update count."""
    return isinstance(value, dict) and all(
        isinstance(s, str) and is_int(n) and n >= 0 for s, n in value.items()
    )


def reject(rejected: dict[str, int], reason: str, logger: logging.Logger, who: str, detail: str = "") -> None:
    """Count a dropped malformed message under ``reason``; log only the first of each reason.

    One bad peer can send millions: a log line each would be a second way to
    knock the receiver over.
    """
    n = rejected.get(reason, 0)
    rejected[reason] = n + 1
    if n == 0:
        if len(detail) > 200:
            detail = detail[:200] + "..."
        logger.warning(
            "%s dropped a malformed message (%s%s); further ones for this reason are only counted",
            who, reason, f": {detail}" if detail else "",
        )


def brief(value: Any) -> str:
    """A short repr of a bad value, for a log line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


def welcome_for(subscription: bytes) -> bytes | None:
    """What a server sends back for a message its XPUB received: the welcome topic when it is a
    subscription (byte 1, then the topic) to one, within ``MAX_WELCOME`` bytes; else None (an
    unsubscription, another topic, or whatever a peer sent on a SUB-facing socket)."""
    if subscription[:1] == b"\x01" and subscription[1:2] == WELCOME_TOPIC and len(subscription) <= 1 + MAX_WELCOME:
        return subscription[1:]
    return None
