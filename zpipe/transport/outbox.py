"""Sending to a chosen replica of a downstream socket: one PUSH per replica, found and followed through the registry.

The paper's aggregator keeps push sockets 1:1 with node groups so that all parts of an item meet
on one node group; a plain PUSH would round-robin them apart. Every wait here is bounded by the
node's stop event and by the liveness of the replica waited for (zpipe.roster): a send to a
replica that died, froze or left raises PeerGone within the roster's bound instead of blocking,
and the caller decides what the message becomes (sent elsewhere, or counted as lost).
"""

from __future__ import annotations

import time

import zmq

LOOK_S = 0.05  # how often a blocked sender looks at the registry and the roster
POLL_MS = 100  # longest single wait for room on a socket
MOVED_LINGER_MS = 5_000  # a replica that moved: what is queued to its old address still goes out if it can
# A replica alive in the roster but with no endpoint of this socket in our registry view for this long is
# given up on (PeerGone), as one that died would be: the send must not wait for it forever.
ENDPOINT_WAIT = 30.0


class PeerGone(Exception):
    """The replica is gone (the roster says so); nothing sent to it now would arrive."""

    def __init__(self, label: str, why: str):
        super().__init__(f"{label} is gone: {why}")
        self.label, self.why = label, why


class Outbox:
    """One PUSH per replica of `node.socket`; owned by the thread that created it."""

    def __init__(self, rt, sname: str, node: str, socket: str, spec=None):
        self.rt, self.sname, self.node, self.socket = rt, sname, node, socket
        self.spec = spec if spec is not None else rt.spec.sockets[sname]  # how our sockets are made
        self.follower = rt.registry.follow(node, socket)
        self.socks: dict[int, zmq.Socket] = {}
        self.addresses: dict[int, str] = {}
        self._looked = 0.0
        self.refresh()

    def label(self, replica: int) -> str:
        return f"{self.node}[{replica}].{self.socket}"

    def refresh(self) -> None:
        """Connect to every registered replica we have no socket for (new, moved, or back after leaving)."""
        self.follower.changes()  # keeps the follower's bookkeeping small; current() is what counts
        for ep in self.follower.current():
            if self.addresses.get(ep.replica) == ep.address and ep.replica in self.socks:
                continue
            old = self.socks.pop(ep.replica, None)
            if old is not None:  # the replica restarted at a new address
                old.close(linger=MOVED_LINGER_MS)
            try:
                sock = self.rt.new_socket(self.spec)
                plane = getattr(self.rt, "plane", None)
                if plane is not None:
                    plane.secure(sock, self.node, self.socket, binds=False)  # zpipe.security: before it connects
                sock.connect(ep.address)
            except zmq.ZMQError:  # not an address we can connect to (a forged record): never use it
                continue
            self.socks[ep.replica] = sock
            self.addresses[ep.replica] = ep.address

    def gone(self, replica: int) -> bool:
        return self.rt.roster.gone(self.node, replica)

    def replicas(self) -> list[int]:
        """Replicas registered now and not gone."""
        return sorted(r for r in self.socks if not self.gone(r))

    def drop(self, replica: int) -> None:
        """Give up on a replica: what is queued to it is discarded (the caller counted it lost)."""
        sock = self.socks.pop(replica, None)
        self.addresses.pop(replica, None)
        if sock is not None:
            sock.close(linger=0)

    def _look(self, replica: int) -> None:
        now = time.monotonic()
        if now - self._looked >= LOOK_S:
            self._looked = now
            self.refresh()
            if self.gone(replica):
                self.drop(replica)
                raise PeerGone(self.label(replica), self.rt.roster.why(self.node, replica))

    def try_send(self, replica: int, frames) -> bool:
        """Send if the replica's queue has room now; False if not (try again); PeerGone if it is gone."""
        sock = self.socks.get(replica)
        if sock is not None:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)  # HWM is checked on the first part only
                return True
            except zmq.Again:
                pass
        self._look(replica)
        return False

    def send(self, replica: int, frames) -> None:
        """Send, waiting while the replica's queue is full; bounded by stop (InterruptedError) and by
        the replica's liveness (PeerGone). Time spent waiting is counted as blocked."""
        if self.try_send(replica, frames):
            return
        meter, stop = self.rt.meter, self.rt.stop
        unknown_since = None
        while True:
            t0 = time.monotonic()
            sock = self.socks.get(replica)
            if sock is not None:
                unknown_since = None
                sock.poll(POLL_MS, zmq.POLLOUT)
            else:
                if unknown_since is None:
                    unknown_since = t0
                elif t0 - unknown_since >= ENDPOINT_WAIT:
                    raise PeerGone(self.label(replica), f"alive, but no endpoint of it was registered for "
                                                        f"{ENDPOINT_WAIT:g} s")
                time.sleep(LOOK_S)
            meter.blocked_s += time.monotonic() - t0
            if stop.is_set():
                raise InterruptedError("stopped while sending")
            if self.try_send(replica, frames):
                return

    def close(self, linger_ms: int) -> None:
        for sock in self.socks.values():
            sock.close(linger=linger_ms)
        self.socks.clear()
        self.follower.close()
