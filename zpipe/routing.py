"""Sending to a chosen downstream replica: one PUSH socket per replica, following the registry.

The paper's aggregator keeps push sockets 1:1 with node groups so that all parts of an
item meet on one node group; a plain PUSH would round-robin them apart.
"""

from __future__ import annotations

import time

import zmq

from zpipe.runtime import NodeRuntime

SEND_TIMEOUT_MS = 100
GONE_GRACE = 2.0  # seconds a send waits for a replica that is not (or no longer) registered


class Undeliverable(Exception):
    """The chosen replica is not registered; the caller counts the message as lost."""


class Router:
    """One PUSH per replica of `node.socket`; owned by the thread that created it."""

    def __init__(self, rt: NodeRuntime, sname: str, node: str, socket: str):
        self.rt, self.sname, self.node, self.socket = rt, sname, node, socket
        self.follower = rt.registry.follow(node, socket)
        self.socks: dict[int, zmq.Socket] = {}
        self.addresses: dict[int, str] = {}
        self.gone: set[int] = set()
        self._missing_since: dict[int, float] = {}  # try_send: replicas found unregistered, since when
        self.refresh()

    def refresh(self) -> None:
        # A replica that leaves keeps its socket: a registry resync can report it gone and back,
        # and closing would drop what is queued to it. With ZMQ_IMMEDIATE nothing new queues
        # to a dead peer, and send() gives up on one that stays unregistered.
        appeared, gone = self.follower.changes()
        for ep in gone:
            self.gone.add(ep.replica)
        for ep in appeared:
            self.gone.discard(ep.replica)
            if self.addresses.get(ep.replica) == ep.address:
                continue
            old = self.socks.pop(ep.replica, None)
            if old is not None:  # the replica restarted at a new address; the old one is dead
                old.close(linger=0)
            sock = self.rt._new_socket(self.rt.spec.sockets[self.sname])
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            sock.connect(ep.address)
            self.socks[ep.replica] = sock
            self.addresses[ep.replica] = ep.address

    def replicas(self) -> list[int]:
        return sorted(r for r in self.socks if r not in self.gone)

    def send(self, replica: int, frames, *, copy: bool = False) -> None:
        """Send to `replica`, blocking at its high-water mark; Undeliverable if it is not there."""
        waited_since = None
        while True:
            sock = self.socks.get(replica)
            if sock is not None:
                try:
                    sock.send_multipart(frames, copy=copy)
                    return
                except zmq.Again:  # one send timeout spent blocked; counted now, so the view sees it live
                    self.rt.meter.blocked_s += SEND_TIMEOUT_MS / 1000
            if self.rt.stop.is_set():
                raise InterruptedError("stopped while sending")
            self.refresh()
            if replica not in self.socks or replica in self.gone:
                now = time.monotonic()
                waited_since = waited_since or now
                if now - waited_since > GONE_GRACE:
                    raise Undeliverable(f"{self.node}[{replica}].{self.socket} is not registered")
                time.sleep(0.01)

    def try_send(self, replica: int, frames) -> bool:
        """Send to `replica` if its queue has room now; False if it is full (try again later).

        Undeliverable once the replica has been unregistered for GONE_GRACE seconds.
        """
        sock = self.socks.get(replica)
        if sock is not None and replica not in self.gone:
            self._missing_since.pop(replica, None)
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)  # HWM is checked on the first part only
                return True
            except zmq.Again:
                return False
        self.refresh()
        if replica in self.socks and replica not in self.gone:
            return False
        since = self._missing_since.setdefault(replica, time.monotonic())
        if time.monotonic() - since > GONE_GRACE:
            raise Undeliverable(f"{self.node}[{replica}].{self.socket} is not registered")
        return False

    def close(self, linger_ms: int) -> None:
        for sock in self.socks.values():
            sock.close(linger=linger_ms)
        self.socks.clear()
        self.follower.close()
