"""Which node replicas are alive: each publishes an ephemeral `nodes/{node}/{replica}` key while it runs.

A replica that dies (kill -9), freezes (SIGSTOP) or leaves stops refreshing its key and the
registry expires it within its TTL; a clean exit withdraws it at once. A replica that is about
to leave (a node group whose session ends) first says so in its key (`leaving`): it is still
alive and finishes what it was sent, but nothing new is routed to it. A peer is *gone* once its
key has been absent for GRACE seconds while our own view of the registry was sound: heard from
the server lately and not just re-synchronised (after a registry restart, keys come back only as
their owners re-publish them, within about a second). So a registry outage never makes a live
peer look dead, and a dead one is noticed within TTL + GRACE seconds (6 s by default).
"""

from __future__ import annotations

import os
import threading
import time

PREFIX = "nodes/"
TTL = 3.0
GRACE = 3.0
ENDED_GRACE = 30.0  # s a cleanly ended sender's last messages may take to be read off our queue
OUTAGE_TRUST = 10.0  # s of registry silence after which an in-band `end` is believed without its record


def key(node: str, replica: int) -> str:
    return f"{PREFIX}{node}/{int(replica)}"


def announce(kv, node: str, replica: int, **fields) -> str:
    """Publish this replica's liveness key (refreshed by the KV client until it closes)."""
    k = key(node, replica)
    kv.set(k, {"node": node, "replica": int(replica), "pid": os.getpid(), "started": time.time(), **fields}, ttl=TTL)
    return k


class Roster:
    """Alive and gone replicas, from the `nodes/` keys a KVClient follows (it must follow `nodes/`)."""

    def __init__(self, kv, grace: float = GRACE):
        self.kv, self.grace = kv, grace
        self._lock = threading.Lock()
        self._absent: dict[str, float] = {}  # key -> since when we have seen it absent
        kv.on_change(self._on_change)

    def _on_change(self, k: str, value) -> None:
        if k.startswith(PREFIX):
            with self._lock:
                if value is None:
                    self._absent.setdefault(k, time.monotonic())
                else:
                    self._absent.pop(k, None)

    def alive(self, node: str, replica: int) -> bool:
        return isinstance(self.kv.get(key(node, replica)), dict)

    def incarnation(self, node: str, replica: int):
        """Which process is `node[replica]` now (when it started), or None if it is not alive."""
        value = self.kv.get(key(node, replica))
        return value.get("started") if isinstance(value, dict) else None

    def leaving(self, node: str, replica: int) -> bool:
        """`node[replica]` is alive but leaving (its session ends): route nothing new to it."""
        value = self.kv.get(key(node, replica))
        return isinstance(value, dict) and value.get("leaving") is True

    def routable(self, node: str, replica: int) -> bool:
        """Alive and not leaving: a replica new work may go to."""
        value = self.kv.get(key(node, replica))
        return isinstance(value, dict) and value.get("leaving") is not True

    def gone(self, node: str, replica: int) -> bool:
        """True once `node[replica]` has been absent for the grace period in a sound view."""
        k = key(node, replica)
        if isinstance(self.kv.get(k), dict):
            return False
        now = time.monotonic()
        with self._lock:
            since = self._absent.setdefault(k, now)
        if not getattr(self.kv, "healthy", True):
            return False  # we cannot tell: the registry is silent, our view is old
        since = max(since, getattr(self.kv, "synced_at", 0.0))
        return now - since >= self.grace

    def why(self, node: str, replica: int) -> str:
        return f"died or left: its liveness key has been gone for over {self.grace:g} s"

    def ended(self, node: str, replica: int, pipe: str) -> bool:
        """`node[replica]` itself says it has no more scans (its `flow/.../end` record, of this pipeline):
        what makes an in-band `end` under its name believable (a forged one is not corroborated)."""
        end = self.kv.get(f"flow/{node}/{int(replica)}/end")
        if isinstance(end, dict) and end.get("done") is True and end.get("pipe") == pipe:
            return True
        # The registry has been away too long to ask: an `end` is taken at its word rather than wait forever.
        return getattr(self.kv, "silence", 0.0) > OUTAGE_TRUST

    def departed(self, node: str, replica: int, pipe: str) -> str | None:
        """For a receiver: why `node[replica]` will send nothing more, or None while it still may.

        A sender that ended cleanly (its `flow/.../end` record, of this pipeline) sent its last
        messages before it exited, and they may still wait in our queue behind others: it is
        given ENDED_GRACE seconds more for its in-band `end` to be read before it counts as gone.
        """
        if not self.gone(node, replica):
            return None
        if self.ended(node, replica, pipe):
            k = f"ended:{key(node, replica)}"
            with self._lock:
                since = self._absent.setdefault(k, time.monotonic())
            if time.monotonic() - since < ENDED_GRACE:
                return None
            return f"ended, but its last messages never arrived within {ENDED_GRACE:g} s"
        return self.why(node, replica)

    def close(self) -> None:
        self.kv.remove_on_change(self._on_change)
