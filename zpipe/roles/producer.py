"""The producer role: a receiving server's sending side (the paper's Producer).

For each scan, the first replica fixes which node groups take part and announces the
scan; then every thread tells downstream how many messages each node group will get
(the info channel, sent in-band before the data so it cannot overtake it), then sends its
messages. Routed straight to node groups (`route` set, the direct topology) or to its own
aggregator thread. With no node group registered, the scan goes to disk instead.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import msgpack
import zmq

from zpipe import flow, scan as scans
from zpipe.plugin import Context, Scan, Source
from zpipe.routing import Router, Undeliverable
from zpipe.runtime import NodeRuntime
from zpipe.topology import Topology

log = logging.getLogger("zpipe.producer")
SEND_TIMEOUT_S = 0.1  # SNDTIMEO of the data sockets: how often a blocked sender looks up
_pack = msgpack.Packer(use_bin_type=True).pack


def downstream(topology: Topology, node: str, sname: str) -> tuple[str, str]:
    """The node and socket that `node.sname` sends to."""
    spec = topology.nodes[node].sockets[sname]
    if spec.connect:
        peer, _, psock = spec.connect.partition(".")
        return peer, psock
    for up in flow.upstreams(topology, node, sname):  # the link is symmetric; find the other end
        return up.node, up.socket
    raise LookupError(f"{node}.{sname} is linked to nothing")


def node_groups_of(topology: Topology, node: str, sname: str) -> tuple[str, str]:
    """The node group node and its data socket that `node.sname` ultimately feeds."""
    peer, psock = downstream(topology, node, sname)
    spec = topology.nodes[peer]
    if spec.role == "nodegroup":
        return peer, psock
    out = next(n for n, s in spec.sockets.items() if s.pattern == "push")
    return node_groups_of(topology, peer, out)


def run(rt: NodeRuntime, make_plugin) -> dict:
    spec, topo = rt.spec, rt.topology
    out = rt.outputs()[0]
    peer, psock = downstream(topo, rt.name, out)
    direct = topo.nodes[peer].role == "nodegroup"
    ng_node, ng_sock = node_groups_of(topo, rt.name, out)
    ng_threads = topo.nodes[ng_node].threads
    plugins: list[Source] = []
    for t in range(spec.threads):
        p = make_plugin()
        p.setup(Context(rt.name, rt.replica, spec.replicas, t, spec.threads, rt.host, rt.output_dir))
        plugins.append(p)
    totals = {"messages": 0, "bytes": 0, "scans": 0, "undeliverable": 0}

    # Threads keep their sockets for the whole run: one connection per thread, as in the paper.
    senders: dict[int, object] = {}

    def make_sender(t: int):
        if t not in senders:
            if direct:
                # All threads of one replica (one sector) reach the same receiving thread, so
                # each of a node group's receivers carries whole sector streams (flow control).
                senders[t] = Router(rt, out, ng_node, f"{ng_sock}@{rt.replica % ng_threads}")
            else:
                sock = rt.connect_to(out, peer, f"{psock}@{rt.replica}")
                sock.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT_S * 1000))
                senders[t] = sock
        return senders[t]

    for sc in plugins[0].scans():
        rt.meter.scan, rt.meter.state = sc.id, "streaming"
        rec = _announce(rt, sc, ng_node, ng_sock)
        ngs = rec["node_groups"]
        t0 = time.perf_counter()
        if not ngs:
            rt.meter.state = "writing"
            counts = _fallback(rt, plugins, sc, rec)
        else:
            pace = _Pace(len(plugins))
            counts = _in_threads(rt, plugins, lambda t, p: _stream(rt, p, sc, t, ngs, direct, make_sender, pace))
        sent = {out: counts["messages"]}
        flow.publish(rt.kv, rt.name, rt.replica, sc.id, done=True, sent=sent, bytes=counts["bytes"],
                     seconds=time.perf_counter() - t0, fallback=not ngs,
                     first_sent=counts.get("first_sent"), last_sent=counts.get("last_sent"))
        for k in ("messages", "bytes", "undeliverable"):
            totals[k] += counts.get(k, 0)
        totals["scans"] += 1
        rt.meter.state = "idle"
    _in_threads(rt, plugins, lambda t, p: _send_end(rt, t, direct, make_sender))
    flow.publish(rt.kv, rt.name, rt.replica, "end", done=True)
    return totals


def _announce(rt: NodeRuntime, sc: Scan, ng_node: str, ng_sock: str) -> dict:
    """Replica 0 fixes the scan's node groups; the others take them from the record."""
    if rt.replica == 0:
        # Wait (bounded) for every node group the topology declares, then go with those registered.
        want = rt.topology.nodes[ng_node].replicas
        deadline = time.monotonic() + (rt.spec.fallback_wait if rt.spec.fallback else rt.resolve_timeout)
        while len(ngs := [ep.replica for ep in rt.registry.endpoints(ng_node, f"{ng_sock}@0")]) < want:
            if time.monotonic() > deadline or rt.stop.is_set():
                break
            time.sleep(0.05)
        return scans.update(rt.kv, sc.id, status="announced" if ngs else "fallback", node_groups=ngs,
                            meta=sc.meta, producers=rt.spec.replicas, started=time.time())
    rec = scans.wait_record(rt.kv, sc.id, timeout=rt.resolve_timeout)
    return rec


def _in_threads(rt: NodeRuntime, plugins, work) -> dict:
    """Run work(t, plugin) on every thread; sum their counts; re-raise the first failure."""
    results: list[dict] = [{} for _ in plugins]
    errors: list[BaseException] = []

    def body(t: int) -> None:
        try:
            results[t] = work(t, plugins[t]) or {}
        except BaseException as exc:
            errors.append(exc)
            rt.stop.set()

    if len(plugins) == 1:
        body(0)
    else:
        threads = [threading.Thread(target=body, args=(t,), name=f"send-{t}") for t in range(len(plugins))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    total: collections.Counter = collections.Counter()
    for r in results:
        total.update({k: v for k, v in r.items() if k not in _WHEN})
    out = dict(total)
    for k, pick in _WHEN.items():  # wall-clock times: the earliest first, the latest last
        times = [r[k] for r in results if r.get(k) is not None]
        out[k] = pick(times) if times else None
    return out


_WHEN = {"first_sent": min, "last_sent": max}


def _send(rt: NodeRuntime, sock: zmq.Socket, frames) -> None:
    while True:
        try:
            sock.send_multipart(frames, copy=False)
            return
        except zmq.Again:  # a whole send timeout spent waiting: count it now, so the view sees it live
            rt.meter.blocked_s += SEND_TIMEOUT_S
            if rt.stop.is_set():
                raise InterruptedError("stopped while sending") from None


class _Pace:
    """Keeps a replica's sending threads within DRIFT messages of each other.

    The threads' streams meet on one socket downstream, so their sum is what a node group
    sees of this sector; kept in step, that stream stays in frame order within a small
    slack, which the node groups' flow control relies on (see nodegroup.must_wait), as a
    detector's own readout does. A thread that has sent everything stops counting.
    """

    DRIFT = 96  # node groups hold a sector back 192 frames per worker ahead: well above this
    CHECK = 8  # messages between looks

    def __init__(self, threads: int):
        self.sent = [0] * threads

    def step(self, t: int, n: int, stop) -> None:
        self.sent[t] = n
        if n - min(self.sent) <= self.DRIFT:
            return
        while n - min(self.sent) > self.DRIFT // 2:  # let the others catch up well, not just back to the line
            if stop.is_set():
                raise InterruptedError("stopped while sending")
            time.sleep(0.001)

    def done(self, t: int) -> None:
        self.sent[t] = float("inf")


def _stream(rt: NodeRuntime, plugin: Source, sc: Scan, t: int, ngs: list[int], direct: bool, make_sender,
            pace: _Pace) -> dict:
    route = rt.spec.route or rt.topology.nodes[downstream(rt.topology, rt.name, rt.outputs()[0])[0]].route
    n = len(ngs)
    sender_id = f"{rt.name}[{rt.replica}]/{t}"
    counts = collections.Counter(ngs[int(h[route]) % n] for h in plugin.plan(sc, t, rt.spec.threads))
    info = {"type": "info", "scan": sc.id, "sender": sender_id, "node_groups": ngs,
            "expected": {str(g): counts.get(g, 0) for g in ngs}}
    sender = make_sender(t)
    if rt.replica == 0 and t == 0:
        scans.update(rt.kv, sc.id, status="streaming")
    messages = nbytes = lost = 0
    first_sent = None
    if direct:
        for g in ngs:
            sender.send(g, [_pack({**info, "expected": counts.get(g, 0)})])
    else:
        _send(rt, sender, [_pack(info)])
    for msg in plugin.messages(sc, t, rt.spec.threads):
        frames = [_pack(msg.header), msg.payload]
        if direct:
            try:
                sender.send(ngs[int(msg.header[route]) % n], frames)
            except Undeliverable as exc:
                lost += 1
                if lost == 1:
                    log.warning("scan %d: %s; counting its messages as lost", sc.id, exc)
                continue
        else:
            _send(rt, sender, frames)
        if first_sent is None:
            first_sent = time.time()
        messages += 1
        if messages % pace.CHECK == 0 and len(pace.sent) > 1:
            pace.step(t, messages, rt.stop)
        nbytes += msg.nbytes
        rt.meter.msgs_out += 1
        rt.meter.bytes_out += msg.nbytes
    pace.done(t)
    return {"messages": messages, "bytes": nbytes, "undeliverable": lost,
            "first_sent": first_sent, "last_sent": time.time() if first_sent is not None else None}


def _send_end(rt: NodeRuntime, t: int, direct: bool, make_sender) -> None:
    sender = make_sender(t)
    end = [_pack({"type": "end", "sender": f"{rt.name}[{rt.replica}]/{t}"})]
    if direct:
        sender.refresh()
        for g in sender.replicas():
            try:
                sender.send(g, end)
            except Undeliverable:
                pass
    else:
        _send(rt, sender, end)


def _fallback(rt: NodeRuntime, plugins: list[Source], sc: Scan, rec: dict) -> dict:
    """No node group: write the scan where existing tools read it, and say so in the scan record."""
    if rt.spec.fallback is None:
        raise RuntimeError(f"scan {sc.id}: no node group is registered and {rt.name} has no `fallback` "
                           f"directory; nothing would receive the data")
    directory = os.path.join(rt.output_dir, rt.spec.fallback)
    os.makedirs(directory, exist_ok=True)
    prefix = f"scans/{sc.id}/fallback/"

    def write(t: int, plugin: Source) -> dict:
        recorder = plugin.recorder(sc, directory)
        if recorder is None:
            raise RuntimeError(f"plugin {rt.spec.plugin!r} cannot record to disk (it has no recorder)")
        n = nbytes = 0
        try:
            for msg in plugin.messages(sc, t, rt.spec.threads):
                recorder.write(msg)
                n += 1
                nbytes += msg.nbytes
        except BaseException:
            abort = getattr(recorder, "abort", None)
            if abort:
                abort()  # leave no file under a final name
            raise
        rt.kv.set(f"{prefix}{rt.name}/{rt.replica}/{t}", recorder.close())
        return {"messages": n, "bytes": nbytes}

    counts = _in_threads(rt, plugins, write)
    log.warning("scan %d: no node group registered; wrote %d messages to %s", sc.id, counts["messages"], directory)
    if rt.replica == 0:  # the scan's first producer closes the scan once every thread's files are final
        want = rt.spec.replicas * rt.spec.threads
        parts = rt.kv.wait(lambda items: len(items) >= want, prefix=prefix, timeout=rt.resolve_timeout * 4)
        written = plugins[0].finish_recording(sc, directory, list(parts.values()))
        scans.update(rt.kv, sc.id, status="done", fallback={"directory": directory, **(written or {})},
                     finished=time.time())
    return counts
