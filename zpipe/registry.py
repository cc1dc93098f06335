"""Where the sockets of running nodes are, kept as ephemeral keys in the KV store.

Nodes bind to port 0 and publish the address they got, instead of anyone writing
IP/port files by hand (the paper's future work). Entries are ephemeral, so a
crashed node's endpoints vanish by themselves within the TTL and its peers
(through ``follow``) stop sending to it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass

from .kv.client import KVClient
from .kv.protocol import reachable

__all__ = ["Endpoint", "Follower", "Registry", "reachable"]


@dataclass(frozen=True)
class Endpoint:
    node: str
    replica: int
    socket: str
    address: str
    host: str = ""
    pid: int = 0

    @property
    def label(self) -> str:
        return f"{self.node}.{self.socket}[{self.replica}]"


def _check_name(what: str, name: str) -> None:
    # Names are key segments: a "/" would make endpoints/{node}/... ambiguous.
    if not name or "/" in name:
        raise ValueError(f"{what} name must be non-empty and contain no '/': {name!r}")


class Registry:
    """Publish this process's endpoints and look up everyone else's."""

    PREFIX = "endpoints/"

    def __init__(self, kv: KVClient, ttl: float = 3.0):
        if not any(self.PREFIX.startswith(s) or s.startswith(self.PREFIX) for s in kv.subtrees):
            raise ValueError(
                f"KV client follows {list(kv.subtrees)}, which does not include {self.PREFIX!r}"
            )
        self.kv = kv
        self.ttl = ttl

    def key(self, node: str, replica: int, socket: str) -> str:
        _check_name("node", node)
        _check_name("socket", socket)
        return f"{self.PREFIX}{node}/{int(replica)}/{socket}"

    def publish(self, ep: Endpoint) -> None:
        if "0.0.0.0" in ep.address or "tcp://*" in ep.address:
            raise ValueError(f"{ep.label}: {ep.address} is not connectable; use reachable()")
        self.kv.set(self.key(ep.node, ep.replica, ep.socket), dataclasses.asdict(ep), ttl=self.ttl)

    def withdraw(self, ep: Endpoint) -> None:
        self.kv.delete(self.key(ep.node, ep.replica, ep.socket))

    def all(self) -> list[Endpoint]:
        """Every registered endpoint, sorted by node, socket and replica."""
        eps = [e for e in map(_decode, self.kv.items(self.PREFIX).values()) if e is not None]
        return sorted(eps, key=lambda e: (e.node, e.socket, e.replica))

    def endpoints(self, node: str, socket: str) -> list[Endpoint]:
        """The endpoints of ``node.socket`` registered now, sorted by replica."""
        return _select(self.kv.items(f"{self.PREFIX}{node}/"), node, socket)

    def resolve(
        self, node: str, socket: str, *, replicas: int = 1, timeout: float = 10.0,
        stop: threading.Event | None = None,
    ) -> list[Endpoint]:
        """Wait until replicas 0..replicas-1 of ``node.socket`` are registered.

        Returns every registered replica (there may be more). Raises LookupError
        naming what is missing and what is there instead; InterruptedError once ``stop`` is set.
        """
        wanted = set(range(replicas))

        def complete(items: dict) -> bool:
            return wanted <= {e.replica for e in _select(items, node, socket)}

        try:
            items = self.kv.wait(complete, prefix=f"{self.PREFIX}{node}/", timeout=timeout, stop=stop)
        except TimeoutError:
            raise LookupError(self._missing(node, socket, replicas, timeout)) from None
        return _select(items, node, socket)

    def _missing(self, node: str, socket: str, replicas: int, timeout: float) -> str:
        have = {e.replica for e in self.endpoints(node, socket)}
        missing = ", ".join(str(r) for r in range(replicas) if r not in have)
        registered = ", ".join(e.label for e in self.all()) or "nothing"
        what = "no endpoint" if not have else f"only {len(have)} endpoint(s)"
        return (
            f"{what} for '{node}.{socket}' after {timeout:g} s (registry {self.kv.address}): "
            f"waiting for replicas {missing} of 0..{replicas - 1}; registered: {registered}"
        )

    def follow(self, node: str, socket: str) -> "Follower":
        return Follower(self, node, socket)


class Follower:
    """The changing set of ``node.socket`` endpoints, for a peer that connects to
    every replica: ``changes()`` says what to connect to and what to drop."""

    def __init__(self, registry: Registry, node: str, socket: str):
        self._prefix = f"{registry.PREFIX}{node}/"
        self._node, self._socket = node, socket
        self._kv = registry.kv
        self._lock = threading.Lock()
        self._current: dict[str, Endpoint] = {}
        self._reported: set[Endpoint] = set()
        # Register, then read under the lock: a change racing with the read is
        # applied after it (the agent calls back for one change at a time).
        self._kv.on_change(self._on_change)
        with self._lock:
            for key, value in self._kv.items(self._prefix).items():
                self._update(key, value)

    def _on_change(self, key: str, value) -> None:
        if key.startswith(self._prefix):
            with self._lock:
                self._update(key, value)

    def _update(self, key: str, value) -> None:
        ep = _decode(value) if value is not None else None
        if ep is not None and ep.node == self._node and ep.socket == self._socket:
            self._current[key] = ep
        else:
            self._current.pop(key, None)

    def changes(self) -> tuple[list[Endpoint], list[Endpoint]]:
        """``(appeared, gone)`` since the last call; the first call reports
        everything present as appeared. Non-blocking. An endpoint that came and
        went between two calls is not reported; one whose address changed is
        reported gone (old) and appeared (new)."""
        with self._lock:
            now = set(self._current.values())
            appeared, gone = now - self._reported, self._reported - now
            self._reported = now
        return sorted(appeared, key=_order), sorted(gone, key=_order)

    def current(self) -> list[Endpoint]:
        with self._lock:
            return sorted(self._current.values(), key=_order)

    def wait(self, predicate, timeout: float = 10.0) -> list[Endpoint]:
        """Poll ``current()`` until ``predicate(current)`` holds (for tests, tools)."""
        deadline = time.monotonic() + timeout
        while not predicate(eps := self.current()):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self._node}.{self._socket}: condition not met in {timeout:g} s")
            time.sleep(0.02)
        return eps

    def close(self) -> None:
        self._kv.remove_on_change(self._on_change)


def _order(e: Endpoint) -> tuple:
    return (e.replica, e.address)


_FIELDS = {"node": str, "replica": int, "socket": str, "address": str, "host": str, "pid": int}


def _decode(value) -> Endpoint | None:
    # Anyone can write anything under endpoints/: a record of the wrong shape or
    # types is ignored rather than allowed to break a peer (an unhashable or
    # unsortable field would, far from here).
    if not isinstance(value, dict) or not value.keys() <= _FIELDS.keys():
        return None
    if any(type(value[name]) is not kind for name, kind in _FIELDS.items() if name in value):
        return None
    try:
        return Endpoint(**value)
    except TypeError:
        return None  # a field missing


def _select(items: dict, node: str, socket: str) -> list[Endpoint]:
    eps = [
        e
        for e in map(_decode, items.values())
        if e is not None and e.node == node and e.socket == socket
    ]
    return sorted(eps, key=lambda e: e.replica)
