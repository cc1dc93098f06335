"""The source role: sends each scan of a source plugin, from `threads` threads, then accounts for it."""

from __future__ import annotations

import logging
import threading
import time

import zmq

from zpipe import flow, wire
from zpipe.plugin import Context, Scan, Source
from zpipe.runtime import NodeRuntime

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
        counts = _send_scan(rt, plugins, scan, links)
        sent = {name: counts["messages"] for name in outs}
        flow.publish(rt.kv, rt.name, rt.replica, scan.id, done=True, sent=sent, bytes=counts["bytes"],
                     seconds=time.perf_counter() - t0, meta=scan.meta)
        totals["messages"] += counts["messages"]
        totals["bytes"] += counts["bytes"]
        totals["scans"] += 1
    flow.publish(rt.kv, rt.name, rt.replica, "end", done=True)
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
                    wire.send_frames(links[n].socket, frames)
                    break
                except zmq.Again:
                    if rt.stop.is_set():
                        raise InterruptedError("stopped while sending") from None
                    rt.refresh()
            forwarded[n] += 1
    for w in workers:
        w.join()
    for p in pulls.values():
        p.close()
    if errors:
        raise errors[0]
    return {"messages": expected or 0, "bytes": sum(r.get("bytes", 0) for r in results)}


def _send_thread(rt: NodeRuntime, plugin: Source, scan: Scan, thread: int, threads: int, socks, refresh) -> dict:
    n = nbytes = 0
    for msg in plugin.messages(scan, thread, threads):
        for sock in socks.values():
            rt.send(sock, msg, refresh)
        n += 1
        nbytes += msg.nbytes
        rt.meter.msgs_out += 1
        rt.meter.bytes_out += msg.nbytes
        if rt.stop.is_set():
            raise InterruptedError("stopped")
    return {"messages": n, "bytes": nbytes}
