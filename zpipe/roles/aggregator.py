"""The aggregator role: one channel per producer replica, relaying each message to the node group its `route` field picks.

Each channel (`threads` of them, 1:1 with producer replicas: a pull socket in and a push
per node group out) first collects the expected-count maps of its producer's threads, adds
them up and tells every node group of the scan how many messages to expect from it; then
it runs a tight pull-decode-push loop, so that all parts of an item meet on one node group.
Messages are forwarded as received (zero-copy), never re-encoded. One thread serves every
channel (see _Relay): per message it only decodes a small header.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import msgpack
import zmq

from zpipe import flow, scan as scans
from zpipe.inbox import Inbox
from zpipe.roles.producer import downstream
from zpipe.routing import Router, Undeliverable
from zpipe.runtime import NodeRuntime

log = logging.getLogger("zpipe.aggregator")
_pack = msgpack.Packer(use_bin_type=True).pack
HELD_POLL_MS = 1  # how often held channels try again


class Rejects:
    """Counts rejected messages; logs each distinct (reason, sender) once, not per message."""

    def __init__(self, where: str, meter=None):
        self.where, self.count, self._seen = where, 0, set()
        self.meter = meter
        self._lock = threading.Lock()

    def add(self, reason: str, sender: str = "unknown sender") -> None:
        with self._lock:
            self.count += 1
            if self.meter is not None:
                self.meter.rejected = self.count
            if (reason, sender) not in self._seen:
                self._seen.add((reason, sender))
                log.warning("%s rejected a message from %s: %s", self.where, sender, reason)


def run(rt: NodeRuntime, _make_plugin) -> dict:
    spec, topo = rt.spec, rt.topology
    in_name, out_name = rt.inputs()[0], rt.outputs()[0]
    ups = flow.upstreams(topo, rt.name, in_name)
    producer_threads = topo.nodes[ups[0].node].threads
    ng_node, ng_sock = downstream(topo, rt.name, out_name)
    ng_threads = topo.nodes[ng_node].threads
    rejects = Rejects(f"{rt.name}[{rt.replica}].{in_name}", rt.meter)
    channels: list[_Channel] = []
    ok = False
    try:
        for t in range(spec.threads):
            channels.append(_Channel(t, rt.bind_per_thread(in_name, t),
                                     Router(rt, out_name, ng_node, f"{ng_sock}@{t % ng_threads}")))
        _Relay(rt, channels, producer_threads, spec.route, rejects).run()
        ok = True
    finally:
        for ch in channels:
            ch.router.close(linger_ms=30_000 if ok else 0)
            ch.pull.close(linger=0)
    out = {k: sum(ch.totals[k] for ch in channels) for k in ("messages", "bytes", "undeliverable")}
    out["rejected"] = rejects.count
    flow.publish(rt.kv, rt.name, rt.replica, "end", done=True, **out)
    return out


@dataclass
class _Channel:
    """One producer replica's stream: its own pull socket in, its own push per node group out."""

    t: int
    pull: zmq.Socket
    router: Router
    ends: int = 0
    infos: dict[int, list[dict]] = field(default_factory=dict)
    held: tuple | None = None  # (target, frames, since) waiting for room downstream
    totals: dict = field(default_factory=lambda: {"messages": 0, "bytes": 0, "undeliverable": 0})


class _Relay:
    """One thread relays every channel (see zpipe.inbox): pull, decode the header, push to the
    node group it picks; a channel whose node group has no room is held while the others go on."""

    def __init__(self, rt: NodeRuntime, channels: list[_Channel], producer_threads: int, route: str,
                 rejects: Rejects):
        self.rt, self.channels, self.producer_threads = rt, channels, producer_threads
        self.route, self.rejects = route, rejects
        self.node_groups: dict[int, list[int]] = {}
        self.me = f"{rt.name}[{rt.replica}]"
        self.open = len(channels)  # channels whose producers have not all sent their end

    def run(self) -> None:
        rt = self.rt
        rt.meter.state = "streaming"

        def refresh() -> None:
            for ch in self.channels:
                ch.router.refresh()

        Inbox([ch.pull for ch in self.channels]).serve(
            self.take, self.resend, lambda: self.open > 0 and not rt.stop.is_set(),
            park_poll_ms=HELD_POLL_MS, idle=refresh)
        if rt.stop.is_set():
            raise InterruptedError("stopped")

    def take(self, t: int, frames) -> _Channel | None:
        """Relay one message from channel t; the channel, to hold, if its node group has no room."""
        ch = self.channels[t]
        try:
            header = msgpack.unpackb(frames[0].buffer, raw=False)
            kind = header.get("type", "data")
            scan_id = int(header["scan"]) if kind != "end" else -1
        except Exception as exc:
            self.rejects.add(f"bad header ({exc.__class__.__name__}: {exc})")
            return None
        me = f"{self.me}/{ch.t}"
        if kind == "end":
            ch.ends += 1
            if ch.ends == self.producer_threads:
                for g in ch.router.replicas():
                    ch.router.send(g, [_pack({"type": "end", "sender": me})])
                self.open -= 1
            return None
        if kind == "info":
            got = ch.infos.setdefault(scan_id, [])
            got.append(header)
            self.node_groups[scan_id] = list(header["node_groups"])
            if len(got) == self.producer_threads:
                _forward_info(ch.router, scan_id, got, me, ch.totals)
                del ch.infos[scan_id]
            return None
        ngs = self.node_groups.get(scan_id)
        if ngs is None:
            ngs = self.node_groups[scan_id] = scans.wait_record(self.rt.kv, scan_id, 10.0)["node_groups"]
        try:
            target = ngs[int(header[self.route]) % len(ngs)]
        except (KeyError, TypeError, ValueError):
            self.rejects.add(f"no integer {self.route!r} to route by", str(header.get("sender", "unknown sender")))
            return None
        self.rt.meter.msgs_in += 1
        self.rt.meter.bytes_in += len(frames[-1])
        ch.held = (target, frames, time.monotonic())
        return None if self.resend(ch, ch.held[2]) else ch

    def resend(self, ch: _Channel, now: float) -> bool:
        """Try the held message again; True once it went (or was counted undeliverable)."""
        target, frames, since = ch.held
        try:
            if not ch.router.try_send(target, frames):
                return False
        except Undeliverable as exc:
            ch.totals["undeliverable"] += 1
            if ch.totals["undeliverable"] == 1:
                log.warning("%s/%d: %s; counting its messages as lost", self.me, ch.t, exc)
        else:
            nbytes = len(frames[-1])
            ch.totals["messages"] += 1
            ch.totals["bytes"] += nbytes
            self.rt.meter.msgs_out += 1
            self.rt.meter.bytes_out += nbytes
        if now > since:
            self.rt.meter.blocked_s += now - since
        ch.held = None
        return True


def _forward_info(router: Router, scan_id: int, got: list[dict], me: str, totals: dict) -> None:
    expected: dict[str, int] = {}
    for info in got:
        for g, n in info["expected"].items():
            expected[g] = expected.get(g, 0) + int(n)
    for g in got[0]["node_groups"]:
        try:
            router.send(g, [_pack({"type": "info", "scan": scan_id, "sender": me,
                                   "expected": expected.get(str(g), 0)})])
        except Undeliverable:
            totals["undeliverable"] += 1
