"""The producer role: a receiving server's sending side (the paper's Producer).

For each scan, the first replica fixes which node groups take part and announces the scan;
then every thread sends, on its own connection, an `info` (the scan's node groups and metadata,
and what it plans to send), its data, and a `done` saying how many it sent (zpipe.scans.messages),
routed straight to node groups (`route` set, the direct topology) or to its aggregator channel.
A node group that dies mid-scan is noticed (zpipe.roster) and the rest of its share goes to the
scan's node groups still alive; with none alive, or the aggregator gone, what is left is counted
undeliverable. With no node group registered, the scan goes to disk instead.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

from zpipe.plugin import Context, Scan, Source
from zpipe import flow
from zpipe.scans import messages, record as scans
from zpipe.transport.outbox import Outbox, PeerGone
from zpipe.roster import OUTAGE_TRUST
from zpipe.runtime import NodeRuntime
from zpipe.wire import pack_header

log = logging.getLogger("zpipe.producer")
ANNOUNCE_WAIT = 600.0  # s a replica waits, at most, for a live announcer to announce the scan


def run(rt: NodeRuntime, make_plugin) -> dict:
    spec, plan = rt.spec, rt.plan
    plugins: list[Source] = []
    for t in range(spec.threads):
        p = make_plugin()
        p.setup(Context(rt.name, rt.replica, spec.replicas, t, spec.threads, rt.host, rt.output_dir))
        plugins.append(p)
    totals = {"messages": 0, "bytes": 0, "scans": 0, "undeliverable": 0}
    direct = plan.aggregator is None
    # Threads keep their sockets for the whole run: one connection per thread, as in the paper.
    outboxes: dict[int, Outbox] = {}
    owed: dict[int, dict[int, list]] = {t: {} for t in range(spec.threads)}  # thread -> node group -> `done`s owed

    def outbox(t: int) -> Outbox:
        if t not in outboxes:
            if direct:
                # All threads of one replica (one sector) reach the same receiving socket, so each of a
                # node group's receivers carries whole sector streams (its flow control relies on it).
                outboxes[t] = Outbox(rt, plan.producer_out, plan.node_group,
                                     f"{plan.node_group_in}@{plan.ng_socket_of_replica(rt.replica)}")
            else:
                outboxes[t] = Outbox(rt, plan.producer_out, plan.aggregator, f"{plan.aggregator_in}@{rt.replica}")
        return outboxes[t]

    try:
        for sc in plugins[0].scans():
            if rt.stop.is_set():
                raise InterruptedError("stopped")
            rt.meter.scan, rt.meter.state = sc.id, "streaming"
            rec = _announce(rt, sc)
            ngs = rec.get("node_groups") if rec else None
            t0 = time.perf_counter()
            if rec is None:
                counts = _give_up(rt, plugins, sc, "no record of the scan appeared (is the scan's first producer there?)")
            elif not ngs:
                rt.meter.state = "writing"
                counts = _fallback(rt, plugins, sc)
            else:
                planned = _in_threads(rt, plugins, lambda t, p: {"planned": sum(1 for _ in p.plan(sc, t, spec.threads))})
                flow.publish_scan(rt, sc.id, done=False, planned=planned["planned"], sent=0,
                              first_sent=None)
                pace = _Pace(len(plugins))
                counts = _in_threads(rt, plugins, lambda t, p: _stream(rt, p, sc, t, ngs, outbox(t), pace, owed[t]))
            flow.publish_scan(rt, sc.id, done=True, planned=counts.get("planned", 0),
                          sent=counts.get("messages", 0), undeliverable=counts.get("undeliverable", 0),
                          bytes=counts.get("bytes", 0), seconds=time.perf_counter() - t0, fallback=bool(rec) and not ngs,
                          first_sent=counts.get("first_sent"), last_sent=counts.get("last_sent"),
                          sent_to=counts.get("sent_to") or None)
            for k in ("messages", "bytes", "undeliverable"):
                totals[k] += counts.get(k, 0)
            totals["scans"] += 1
            rt.meter.state = "idle"
        _in_threads(rt, plugins, lambda t, p: _send_end(rt, t, outbox(t), direct, owed[t]))
        flow.publish(rt.kv, rt.name, rt.replica, "end", done=True, pipe=rt.pipe)
    finally:
        for ob in outboxes.values():
            ob.close(linger_ms=30_000 if not rt.stop.is_set() else 0)
    return totals


def _announce(rt: NodeRuntime, sc: Scan) -> dict | None:
    """The lowest live replica fixes the scan's node groups; the others take them from the record.

    Replica 0 announces; should it be gone (zpipe.roster), the next one does, so the scans of a
    run whose first producer died are still announced and accounted for."""
    plan = rt.plan
    # The announcer may still be sending the last scan, then wait `fallback_wait` for node groups:
    # we wait as long as it lives (it may be slow, not gone), within ANNOUNCE_WAIT at most.
    deadline = time.monotonic() + ANNOUNCE_WAIT
    while not rt.stop.is_set():
        announcer = next((r for r in range(rt.spec.replicas) if r == rt.replica or not rt.roster.gone(rt.name, r)))
        if announcer == rt.replica:
            break
        rec = scans.wait_record(rt.kv, sc.id, timeout=0.5, stop=rt.stop, pipe=rt.pipe)
        if rec is not None:
            return rec
        if time.monotonic() > deadline or rt.kv.silence > OUTAGE_TRUST:
            return None  # no record: nobody can tell us the scan's node groups (the registry is away)
    else:
        return None
    current = scans.valid_record(rt.kv.get(scans.key(sc.id)), rt.pipe)
    if current is not None:
        return current  # announced already (by a replica before us that has since gone)
    # Wait (bounded) for every node group the topology declares, then go with those alive.
    want = plan.ng_replicas
    until = time.monotonic() + (rt.spec.fallback_wait if rt.spec.fallback else rt.resolve_timeout)
    while True:
        ngs = [ep.replica for ep in rt.registry.endpoints(plan.node_group, f"{plan.node_group_in}@0")
               if rt.roster.alive(plan.node_group, ep.replica)]
        if len(ngs) >= want or time.monotonic() > until or rt.stop.is_set():
            break
        time.sleep(0.05)
    source = {"node": rt.name, "replicas": rt.spec.replicas, "threads": rt.spec.threads}
    route = {"aggregator": plan.aggregator, "node_group": plan.node_group}
    rec = scans.update(rt.kv, sc.id, status="announced" if ngs else "fallback", node_groups=ngs,
                       meta=sc.meta, source=source, route=route, producers=rt.spec.replicas,
                       pipe=rt.pipe, announced_by=rt.label, started=time.time())
    try:
        scans.write_part(rt.output_dir, sc.id, "record", rec)  # the account's starting point, kept on disk too
    except OSError:
        pass
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
    sent_to: dict[str, int] = {}
    for r in results:
        total.update({k: v for k, v in r.items() if k not in _WHEN and k != "sent_to"})
        for g, n in (r.get("sent_to") or {}).items():
            sent_to[g] = sent_to.get(g, 0) + n
    out = dict(total)
    out["sent_to"] = sent_to
    for k, pick in _WHEN.items():  # wall-clock times: the earliest first, the latest last
        times = [r[k] for r in results if r.get(k) is not None]
        out[k] = pick(times) if times else None
    return out


_WHEN = {"first_sent": min, "last_sent": max}


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


def _stream(rt: NodeRuntime, plugin: Source, sc: Scan, t: int, ngs: list[int], out: Outbox, pace: _Pace,
            owed: dict[int, list]) -> dict:
    """One thread's share of a scan: info, data, done, on its own connection(s).

    `owed`: node group -> `done`s of earlier scans this thread gave up on it in; sent first
    should it come back (it was frozen, not dead)."""
    plan, pipe = rt.plan, rt.pipe
    route, threads = plan.route, rt.spec.threads
    direct = plan.aggregator is None
    me = plan.producer_sender(rt.replica, t)
    n = len(ngs)
    gone: set[int] = set()  # node groups of the scan found gone: the rest of their share goes to the others
    planned = 0
    counts: collections.Counter = collections.Counter()
    for h in plugin.plan(sc, t, threads):
        planned += 1
        if direct:
            counts[ngs[int(h[route]) % n]] += 1
    if t == 0 and (scans.valid_record(rt.kv.get(scans.key(sc.id)), rt.pipe) or {}).get("announced_by") == rt.label:
        scans.update(rt.kv, sc.id, status="streaming")
    messages_sent = nbytes = lost = 0
    sent_to: collections.Counter = collections.Counter()
    first_sent = None
    target_alive = True

    def deliver(g: int, frames) -> bool:
        """Send to node group g (direct) or the aggregator; False if it is gone (noted)."""
        nonlocal target_alive
        try:
            out.send(g if direct else 0, frames)
            return True
        except PeerGone as exc:
            if direct:
                if g not in gone:
                    gone.add(g)
                    log.warning("scan %d: %s; the rest of its share goes to the scan's other node groups", sc.id, exc)
            else:
                target_alive = False
                log.warning("scan %d: %s; the rest of this thread's share is undeliverable", sc.id, exc)
            return False

    told: set[int] = set()  # node groups our info reached
    for g in (ngs if direct else [0]):
        for done in owed.pop(g, ()) if direct else ():
            deliver(g, done)
        if deliver(g, messages.info(pipe, sc.id, me, ngs, sc.meta, expected=counts.get(g, 0) if direct else planned)):
            told.add(g)
    for msg in plugin.messages(sc, t, threads):
        header = msg.header
        header["scan"], header["pipe"], header["sender"] = sc.id, pipe, me
        frames = [pack_header(header), msg.payload]
        if not target_alive:
            lost += 1
            if rt.stop.is_set():
                raise InterruptedError("stopped")
            continue
        if direct:
            key = int(header[route])
            g = ngs[key % n]
            while g in gone or not deliver(g, frames):
                alive = [x for x in ngs if x not in gone]
                if not alive:
                    g = None
                    break
                g = alive[key % len(alive)]
            if g is None:
                lost += 1
                continue
            sent_to[g] += 1
        elif not deliver(0, frames):
            lost += 1
            continue
        if first_sent is None:
            first_sent = time.time()
        messages_sent += 1
        if messages_sent % pace.CHECK == 0 and len(pace.sent) > 1:
            pace.step(t, messages_sent, rt.stop)
        nbytes += msg.nbytes
        rt.meter.msgs_out += 1
        rt.meter.bytes_out += msg.nbytes
    pace.done(t)
    if direct:
        for g in ngs:
            done = messages.done(pipe, sc.id, me, sent_to.get(g, 0), abandoned=g in gone)
            if g not in gone:
                deliver(g, done)
            elif g in told:  # should it come back (it froze), it learns we gave up on it for this scan
                owed.setdefault(g, []).append(done)
    elif target_alive:
        deliver(0, messages.done(pipe, sc.id, me, messages_sent))
    return {"planned": planned, "messages": messages_sent, "bytes": nbytes, "undeliverable": lost,
            "first_sent": first_sent, "last_sent": time.time() if first_sent is not None else None,
            "sent_to": {str(g): n for g, n in sent_to.items()}}


def _send_end(rt: NodeRuntime, t: int, out: Outbox, direct: bool, owed: dict[int, list]) -> None:
    """This thread has no more scans: say so to every live replica it sends to (after what it owes them)."""
    end = messages.end(rt.pipe, rt.plan.producer_sender(rt.replica, t))
    out.refresh()
    for g in (out.replicas() if direct else [0]):
        try:
            for done in owed.pop(g, ()):
                out.send(g, done)
            out.send(g, end)
        except PeerGone:
            pass


def _give_up(rt: NodeRuntime, plugins: list[Source], sc: Scan, why: str) -> dict:
    """The scan cannot be sent anywhere: count what it would have been, say why."""
    planned = _in_threads(rt, plugins, lambda t, p: {"planned": sum(1 for _ in p.plan(sc, t, rt.spec.threads))})
    log.error("scan %d: %s; its %d messages from this producer are undeliverable", sc.id, why, planned["planned"])
    return {"planned": planned["planned"], "messages": 0, "undeliverable": planned["planned"]}


def _fallback(rt: NodeRuntime, plugins: list[Source], sc: Scan) -> dict:
    """No node group: write the scan where existing tools read it, and say so in the scan record."""
    if rt.spec.fallback is None:
        return _give_up(rt, plugins, sc, f"no node group is registered and {rt.name} has no `fallback` directory")
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
        return {"messages": n, "bytes": nbytes, "planned": n}

    counts = _in_threads(rt, plugins, write)
    log.warning("scan %d: no node group registered; wrote %d messages to %s", sc.id, counts["messages"], directory)
    if (scans.valid_record(rt.kv.get(scans.key(sc.id)), rt.pipe) or {}).get("announced_by") == rt.label:  # its announcer closes it
        want = rt.spec.replicas * rt.spec.threads
        try:
            parts = rt.kv.wait(lambda items: len(items) >= want, prefix=prefix, timeout=rt.resolve_timeout * 4)
        except TimeoutError:
            parts = rt.kv.items(prefix)
            log.error("scan %d: only %d of %d producer threads said their files are final", sc.id, len(parts), want)
        written = plugins[0].finish_recording(sc, directory, list(parts.values()))
        scans.update(rt.kv, sc.id, status="done", fallback={"directory": directory, **(written or {}),
                                                              "threads": len(parts), "of": want},
                     outcome="complete" if len(parts) >= want else "incomplete", finished=time.time())
    return counts
