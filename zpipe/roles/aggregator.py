"""The aggregator role: one thread per producer replica, relaying each message to the node group its `route` field picks.

Each thread first collects the expected-count maps of its producer's threads, adds them
up and tells every node group of the scan how many messages to expect from it; then it
runs a tight pull-decode-push loop, so that all parts of an item meet on one node group.
Messages are forwarded as received, never re-encoded.
"""

from __future__ import annotations

import logging
import threading

import msgpack
import zmq

from zpipe import flow, scan as scans
from zpipe.roles.producer import downstream
from zpipe.routing import Router, Undeliverable
from zpipe.runtime import NodeRuntime

log = logging.getLogger("zpipe.aggregator")
_pack = msgpack.Packer(use_bin_type=True).pack
DRAIN = 256  # messages taken per pass before looking up (stop, registry changes)


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
    totals = [dict(messages=0, bytes=0, undeliverable=0) for _ in range(spec.threads)]
    errors: list[BaseException] = []
    ready = threading.Barrier(spec.threads + 1)

    def thread(t: int) -> None:
        pull = router = None
        try:
            pull = rt.bind_per_thread(in_name, t)
            router = Router(rt, out_name, ng_node, f"{ng_sock}@{t % ng_threads}")
            ready.wait()
            _relay(rt, t, pull, router, producer_threads, spec.route, rejects, totals[t])
        except BaseException as exc:
            errors.append(exc)
            rt.stop.set()
            if not ready.broken:
                ready.abort()
        finally:
            if router:
                router.close(linger_ms=30_000 if not errors else 0)
            if pull:
                pull.close(linger=0)

    threads = [threading.Thread(target=thread, args=(t,), name=f"relay-{t}") for t in range(spec.threads)]
    for th in threads:
        th.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    out = {k: sum(t[k] for t in totals) for k in totals[0]}
    out["rejected"] = rejects.count
    flow.publish(rt.kv, rt.name, rt.replica, "end", done=True, **out)
    return out


def _relay(rt: NodeRuntime, t: int, pull: zmq.Socket, router: Router, producer_threads: int, route: str,
           rejects: Rejects, totals: dict) -> None:
    infos: dict[int, list[dict]] = {}
    node_groups: dict[int, list[int]] = {}
    ends = 0
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    me = f"{rt.name}[{rt.replica}]/{t}"
    meter = rt.meter
    meter.state = "streaming"
    while ends < producer_threads:
        if rt.stop.is_set():
            raise InterruptedError("stopped")
        if not poller.poll(100):
            router.refresh()
            continue
        for _ in range(DRAIN):
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                header = msgpack.unpackb(frames[0].buffer, raw=False)
                kind = header.get("type", "data")
                scan_id = int(header["scan"]) if kind != "end" else -1
            except Exception as exc:
                rejects.add(f"bad header ({exc.__class__.__name__}: {exc})")
                continue
            if kind == "end":
                ends += 1
                if ends == producer_threads:
                    for g in router.replicas():
                        router.send(g, [_pack({"type": "end", "sender": me})])
                continue
            if kind == "info":
                got = infos.setdefault(scan_id, [])
                got.append(header)
                node_groups[scan_id] = list(header["node_groups"])
                if len(got) == producer_threads:
                    _forward_info(router, scan_id, got, me, totals)
                    del infos[scan_id]
                continue
            ngs = node_groups.get(scan_id)
            if ngs is None:
                ngs = node_groups[scan_id] = scans.wait_record(rt.kv, scan_id, 10.0)["node_groups"]
            try:
                target = ngs[int(header[route]) % len(ngs)]
            except (KeyError, TypeError, ValueError):
                rejects.add(f"no integer {route!r} to route by", str(header.get("sender", "unknown sender")))
                continue
            meter.msgs_in += 1
            try:
                router.send(target, frames)
            except Undeliverable as exc:
                totals["undeliverable"] += 1
                if totals["undeliverable"] == 1:
                    log.warning("%s: scan %d: %s; counting its messages as lost", me, scan_id, exc)
                continue
            totals["messages"] += 1
            nbytes = len(frames[-1])
            totals["bytes"] += nbytes
            meter.msgs_out += 1
            meter.bytes_in += nbytes
            meter.bytes_out += nbytes


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
