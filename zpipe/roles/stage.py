"""The stage role: receives messages, hands them in batches to a stage plugin, sends on what it returns.

It drains its input without polling per message, and ends a scan when the messages its
replicas received add up to what upstream declared sent (see `zpipe.flow`).
"""

from __future__ import annotations

import logging
import time

import zmq

from zpipe import flow, wire
from zpipe.plugin import Context, Message, Scan, Stage
from zpipe.runtime import NodeRuntime
from zpipe.scans.messages import Rejected, Rejects, sender_of
from zpipe.topology.plan import peers
from zpipe.transport.outbox import PeerGone

log = logging.getLogger("zpipe.stage")
BATCH = 64
PUBLISH_EVERY = 0.1  # seconds between counter updates in the key-value store
QUIET = 10.0  # seconds of silence after which a scan whose counts never add up is finished with what arrived


class _ScanState:
    def __init__(self, scan: Scan):
        self.scan = scan
        self.received = self.bytes = 0
        self.sent: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self.last = time.monotonic()  # when a message of it last arrived


def run(rt: NodeRuntime, make_plugin) -> dict:
    plugin: Stage = make_plugin()
    plugin.setup(Context(rt.name, rt.replica, rt.spec.replicas, 0, rt.spec.threads, rt.host, rt.output_dir))
    in_names, out_names = rt.inputs(), rt.outputs()
    ups = [u for n in in_names for u in flow.upstreams(rt.topology, rt.name, n)]
    fanout = any(u.fanout for u in ups)
    links = {n: rt.open(n) for n in (*in_names, *out_names)}
    outs = [links[n].socket for n in out_names]
    for s in outs:
        s.setsockopt(zmq.SNDTIMEO, 100)
    poller = zmq.Poller()
    for n in in_names:
        poller.register(links[n].socket, zmq.POLLIN)

    open_scans: dict[int, _ScanState] = {}
    finished: set[int] = set()
    totals = {"messages": 0, "bytes": 0, "rejected": 0, "scans": 0}
    rejects = Rejects(rt.label, rt.meter)
    upstream_nodes = {u.node for u in ups}
    downs = {n: [(node, r) for node, _ in peers(rt.topology, rt.name, n)
                 for r in range(rt.topology.nodes[node].replicas)] for n in out_names}
    last_publish = 0.0

    def departed(node: str, replica: int) -> str | None:
        return rt.roster.departed(node, replica, rt.pipe)

    def state_for(scan_id: int) -> _ScanState:
        st = open_scans.get(scan_id)
        if st is None:
            st = open_scans[scan_id] = _ScanState(Scan(scan_id))
            plugin.begin(st.scan)
        return st

    gone_since: dict[str, float] = {}  # outputs whose every downstream replica is gone, since when

    def emit(st: _ScanState, produced) -> None:
        for msg in produced or ():
            msg.header["pipe"], msg.header["sender"] = rt.pipe, f"{rt.label}/0"
            for name, sock in zip(out_names, outs):
                now = time.monotonic()
                if now - gone_since.get(name, -10.0) < 1.0:  # nobody there: count it, look again in a second
                    totals["undeliverable"] = totals.get("undeliverable", 0) + 1
                    continue
                try:
                    rt.send(sock, msg, rt.refresh, downs[name])
                except PeerGone as exc:
                    if name not in gone_since:
                        log.error("%s: %s; what it would get is counted undeliverable", rt.label, exc)
                    gone_since[name] = time.monotonic()
                    totals["undeliverable"] = totals.get("undeliverable", 0) + 1
                    continue
                gone_since.pop(name, None)
                st.sent[name] = st.sent.get(name, 0) + 1
                rt.meter.msgs_out += 1
                rt.meter.bytes_out += msg.nbytes

    def publish_counts(final_for: _ScanState | None = None) -> None:
        for st in open_scans.values():
            flow.publish(rt.kv, rt.name, rt.replica, st.scan.id, done=st is final_for,
                         received=st.received, bytes=st.bytes, sent=st.sent)

    while not rt.stop.is_set():
        batches: dict[int, list[Message]] = {}
        got = 0
        for n in in_names:
            sock = links[n].socket
            while got < BATCH * 4:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                msg = None
                try:
                    msg = wire.decode(frames)
                    if msg.header.get("pipe") != rt.pipe:
                        raise Rejected("not this pipeline")
                    sender = msg.header.get("sender")
                    if not isinstance(sender, str) or sender.partition("[")[0] not in upstream_nodes:
                        raise Rejected("unknown sender")
                    scan_id = msg.header.get("scan")
                    if type(scan_id) is not int or scan_id < 0:
                        raise Rejected("bad scan number", repr(scan_id)[:30])
                    if scan_id in finished:
                        raise Rejected("message after the scan closed", f"scan {scan_id}")
                except Rejected as exc:
                    rejects.reject(exc, sender_of(msg.header if msg else None))
                    totals["rejected"] = rejects.count
                    continue
                batches.setdefault(scan_id, []).append(msg)
                got += 1
        for scan_id, msgs in batches.items():
            st = state_for(scan_id)
            st.last = time.monotonic()
            for i in range(0, len(msgs), BATCH):
                chunk = msgs[i:i + BATCH]
                emit(st, plugin.process(chunk))
                st.received += len(chunk)
                nbytes = sum(m.nbytes for m in chunk)
                st.bytes += nbytes
                rt.meter.msgs_in += len(chunk)
                rt.meter.bytes_in += nbytes
                rt.meter.scan, rt.meter.state = scan_id, "streaming"
        now = time.monotonic()
        if got and now - last_publish < PUBLISH_EVERY:
            continue
        # Idle or due: publish counters, then see whether any scan is complete.
        last_publish = now
        rt.refresh()  # follow upstream and downstream replicas as they come and go
        publish_counts()
        for scan_id in flow.scans_announced(rt.kv, ups) - finished:
            state_for(scan_id)
        for scan_id, st in sorted(open_scans.items()):
            want = flow.expected(rt.kv, ups, scan_id, departed)
            have = st.received if fanout else flow.received(rt.kv, rt.name, rt.spec.replicas, scan_id)
            quiet = time.monotonic() - st.last > QUIET
            if (want is None or have < want) and not quiet:
                continue
            if want is None or have < want:  # a sender died mid-scan, or messages were lost: say so
                log.warning("%s: scan %d: %d of %s messages after %.0f s of silence; finishing it with what arrived",
                            rt.label, scan_id, have, want if want is not None else "?", QUIET)
            result = plugin.finish(st.scan) or {}
            seconds = time.perf_counter() - st.t0
            rt.kv.set(rt.key("results", scan_id), {**result, "received": st.received, "bytes": st.bytes,
                                                   "seconds": seconds})
            publish_counts(final_for=st)
            del open_scans[scan_id]
            finished.add(scan_id)
            totals["messages"] += st.received
            totals["bytes"] += st.bytes
            totals["scans"] += 1
            if out_names:
                totals["sent"] = totals.get("sent", 0) + max(st.sent.values(), default=0)
            for k, v in result.items():  # what the plugin counted, added up over scans
                if isinstance(v, int) and not isinstance(v, bool) and k not in totals:
                    totals.setdefault(f"_{k}", 0)
                    totals[f"_{k}"] += v
        if not open_scans and flow.ended(rt.kv, ups, departed):
            flow.publish(rt.kv, rt.name, rt.replica, "end", done=True, pipe=rt.pipe)
            return {k.lstrip("_"): v for k, v in totals.items()}
        if not got:
            poller.poll(20)
    raise InterruptedError("stopped")
