"""The source role: sends each scan of a source plugin, from `threads` threads, then accounts for it."""

from __future__ import annotations

import logging
import threading
import time

import zmq

from zpipe import flow
from zpipe.plugin import Context, Scan, Source
from zpipe.runtime import NodeRuntime
from zpipe.topology.plan import peers
from zpipe.transport.outbox import PeerGone

log = logging.getLogger("zpipe.source")
SEND_TIMEOUT_MS = 100  # how often a blocked sender looks up from a full queue to check for stop


def run(rt: NodeRuntime, make_plugin) -> dict:
    spec = rt.spec
    outs = rt.outputs()
    plugins: list[Source] = []
    for t in range(spec.threads):
        p = make_plugin()
        p.setup(Context(rt.name, rt.replica, spec.replicas, t, spec.threads, rt.host, rt.output_dir))
        plugins.append(p)
    totals = {"messages": 0, "bytes": 0, "scans": 0}
    # Bound sockets are one per replica, so threads reach them through an inproc fan-in.
    links = {name: rt.open(name) for name in outs}
    for link in links.values():
        link.socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)

    for scan in plugins[0].scans():
        rt.meter.scan, rt.meter.state = scan.id, "streaming"
        flow.publish(rt.kv, rt.name, rt.replica, scan.id, done=False, meta=scan.meta)
        t0 = time.perf_counter()
        try:
            counts = _send_scan(rt, plugins, scan, links)
        except PeerGone as exc:
            # Nobody is left to receive: the scan and those after it are undeliverable; say so and end.
            log.error("%s: scan %d: %s; stopping: what is left is undeliverable", rt.label, scan.id, exc)
            flow.publish(rt.kv, rt.name, rt.replica, scan.id, done=True, undeliverable=True, meta=scan.meta)
            totals["undeliverable_scans"] = totals.get("undeliverable_scans", 0) + 1
            break
        sent = {name: counts["messages"] for name in outs}
        flow.publish(rt.kv, rt.name, rt.replica, scan.id, done=True, sent=sent, bytes=counts["bytes"],
                     seconds=time.perf_counter() - t0, meta=scan.meta)
        totals["messages"] += counts["messages"]
        totals["bytes"] += counts["bytes"]
        totals["scans"] += 1
    flow.publish(rt.kv, rt.name, rt.replica, "end", done=True, pipe=rt.pipe)
    return totals


def _send_scan(rt: NodeRuntime, plugins: list[Source], scan: Scan, links) -> dict:
    threads = len(plugins)
    if threads == 1:
        return _send_thread(rt, plugins[0], scan, 0, 1, {n: l.socket for n, l in links.items()}, rt.refresh)
    # Each thread pushes into its own inproc socket; a forwarder per output moves the
    # frames on to the replica's one real socket without copying them.
    results: list[dict] = [{} for _ in range(threads)]
    errors: list[BaseException] = []
    addrs = {n: f"inproc://fanin-{n}-{scan.id}" for n in links}
    pulls = {}
    for n, addr in addrs.items():
        pull = rt.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(addr)
        pulls[n] = pull

    def worker(t: int) -> None:
        socks = {}
        try:
            for n, addr in addrs.items():
                s = rt.ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
                s.connect(addr)
                socks[n] = s
            results[t] = _send_thread(rt, plugins[t], scan, t, threads, socks, None)
        except BaseException as exc:
            errors.append(exc)
            rt.stop.set()
        finally:
            for s in socks.values():
                s.close(linger=-1 if not errors else 0)

    workers = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    expected = None
    forwarded = {n: 0 for n in links}
    poller = zmq.Poller()
    for p in pulls.values():
        poller.register(p, zmq.POLLIN)
    while True:
        if expected is None and not any(w.is_alive() for w in workers):
            expected = sum(r.get("messages", 0) for r in results)
        if errors:
            break
        if expected is not None and all(v >= expected for v in forwarded.values()):
            break
        ready = dict(poller.poll(50))
        for n, sock in pulls.items():
            if sock not in ready:
                continue
            frames = sock.recv_multipart(copy=False)
            while True:
                try:
                    links[n].socket.send_multipart(frames, copy=False)
                    break
                except zmq.Again:
                    if rt.stop.is_set():
                        raise InterruptedError("stopped while sending") from None
                    rt.refresh()
                    if all(rt.roster.gone(node, r) for node, r in downstream(rt, n)):
                        raise PeerGone(n, "every downstream replica is gone")
            forwarded[n] += 1
    for w in workers:
        w.join()
    for p in pulls.values():
        p.close()
    if errors:
        raise errors[0]
    return {"messages": expected or 0, "bytes": sum(r.get("bytes", 0) for r in results)}


def downstream(rt: NodeRuntime, sname: str) -> list[tuple[str, int]]:
    """The replicas our socket `sname` feeds, whose liveness bounds a blocked send."""
    return [(node, r) for node, _ in peers(rt.topology, rt.name, sname) for r in range(rt.topology.nodes[node].replicas)]


def _send_thread(rt: NodeRuntime, plugin: Source, scan: Scan, thread: int, threads: int, socks, refresh) -> dict:
    n = nbytes = 0
    me = f"{rt.label}/{thread}"
    downs = {name: downstream(rt, name) for name in socks}
    for msg in plugin.messages(scan, thread, threads):
        msg.header["pipe"], msg.header["sender"] = rt.pipe, me
        for name, sock in socks.items():
            rt.send(sock, msg, refresh, downs[name])
        n += 1
        nbytes += msg.nbytes
        rt.meter.msgs_out += 1
        rt.meter.bytes_out += msg.nbytes
        if rt.stop.is_set():
            raise InterruptedError("stopped")
    return {"messages": n, "bytes": nbytes}
