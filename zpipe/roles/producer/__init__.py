"""The producer role: a receiving server's sending side (the paper's Producer).

For each scan, the first live replica fixes which node groups take part and announces the scan;
then every thread sends, on its own connection, an `info` (the scan's node groups and metadata,
and what it plans to send), its data, and a `done` saying how many it sent (zpipe.scans.messages),
routed straight to node groups (`route` set, the direct topology) or to its aggregator channel
(stream.py). Scans come from the source (batch) or from acquisitions requested while the producer
runs as a service (service.py). With no node group there, or no aggregator, a scan goes to disk;
should they leave or die mid-scan, the rest of it does (`fallback`), and the scan's record and
account say where every part went. A first SIGTERM lets the scan under way finish, then ends.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

from zpipe import flow
from zpipe.plugin import Context, Source
from zpipe.roles.producer import service
from zpipe.roles.producer.stream import Job, Pace, Spill, send_end, stream
from zpipe.roster import OUTAGE_TRUST
from zpipe.runtime import NodeRuntime
from zpipe.scans import record as scans
from zpipe.transport.outbox import Outbox

log = logging.getLogger("zpipe.producer")
ANNOUNCE_WAIT = 600.0  # s a replica waits, at most, for a live announcer to announce the scan
SPILL_WAIT = 15.0  # s the announcer waits for every replica to close the files of a scan's rest


def run(rt: NodeRuntime, make_plugin) -> dict:
    spec, plan = rt.spec, rt.plan
    plugins: list[Source] = []
    for t in range(spec.threads):
        p = make_plugin()
        p.setup(Context(rt.name, rt.replica, spec.replicas, t, spec.threads, rt.host, rt.output_dir))
        plugins.append(p)
    totals = {"messages": 0, "bytes": 0, "scans": 0, "undeliverable": 0, "written": 0}
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

    jobs = service.Service(rt, plugins, lambda: _choose(rt)).jobs() if spec.service else service.batch(plugins)
    try:
        for job, rec in jobs:
            if rt.stop.is_set():
                raise InterruptedError("stopped")
            if job is None:  # an announced acquisition this replica could not make (logged)
                continue
            rt.meter.scan, rt.meter.state = job.id, "streaming"
            if rec is None:
                rec = _announce(rt, job)
            ngs = rec.get("node_groups") if rec else None
            t0 = time.perf_counter()
            if rec is None:
                counts = _give_up(rt, job, "no record of the scan appeared (is the scan's first producer there?)")
            elif not ngs and job.replay:
                counts = _give_up(rt, job, f"{rec.get('fallback_reason') or 'no node group'}, and a replay is "
                                           f"not written to disk again")
            elif not ngs:
                rt.meter.state = "writing"
                counts = _fallback(rt, job, rec)
            else:
                shares: dict[int, tuple] = {}  # thread -> its share's plan (one pass over the headers)
                planned = _in_threads(rt, job.plugins, lambda t, p: _plan_share(rt, job, t, p, ngs, shares))
                flow.publish_scan(rt, job.id, done=False, planned=planned["planned"], sent=0, first_sent=None)
                if rt.replica == 0:  # the record follows the scan: announced, streaming, done
                    scans.update(rt.kv, job.id, status="streaming")
                pace = Pace(len(job.plugins))
                spill_to = _spill_directory(rt, job)
                counts = _in_threads(rt, job.plugins, lambda t, p: _send_share(rt, job, t, p, ngs, outbox(t), pace,
                                                                                owed[t], spill_to, shares[t]))
            flow.publish_scan(rt, job.id, done=True, planned=counts.get("planned", 0),
                              sent=counts.get("messages", 0), undeliverable=counts.get("undeliverable", 0),
                              bytes=counts.get("bytes", 0), seconds=time.perf_counter() - t0,
                              fallback=bool(rec) and not ngs, first_sent=counts.get("first_sent"),
                              last_sent=counts.get("last_sent"), sent_to=counts.get("sent_to") or None,
                              **(_written(counts, _spill_directory(rt, job)) if ngs else {}))
            if counts.get("written") and ngs:
                _finish_spill(rt, job, rec)
            for k in ("messages", "bytes", "undeliverable", "written"):
                totals[k] += counts.get(k, 0)
            totals["scans"] += 1
            rt.meter.state = "idle"
            if rt.leave.is_set():
                log.info("%s: leaving after scan %d, as asked", rt.label, job.id)
                break
        _in_threads(rt, plugins, lambda t, p: send_end(rt, t, outbox(t), direct, owed[t]))
        flow.publish(rt.kv, rt.name, rt.replica, "end", done=True, pipe=rt.pipe)
    finally:
        for ob in outboxes.values():
            ob.close(linger_ms=30_000 if not rt.stop.is_set() else 0)
    return totals


def _spill_directory(rt: NodeRuntime, job: Job) -> str | None:
    """Where the rest of a scan goes if nobody downstream can take it: the fallback, if the source records."""
    if rt.spec.fallback is None or job.replay or type(job.plugins[0]).recorder is Source.recorder:
        return None
    return os.path.join(rt.output_dir, rt.spec.fallback)


def _plan_share(rt: NodeRuntime, job: Job, t: int, plugin: Source, ngs: list[int], shares: dict) -> dict:
    """Thread t's share before it is sent: how many messages, and (sending straight to the node groups)
    how many go to each, which their infos announce."""
    route, direct, n = rt.plan.route, rt.plan.aggregator is None, len(ngs)
    planned, per_ng = 0, collections.Counter()
    stop = rt.stop
    for h in plugin.plan(job.scan, t, rt.spec.threads):
        planned += 1
        if direct:
            per_ng[ngs[int(h[route]) % n]] += 1
        if not planned & 0xFFF and stop.is_set():  # a huge scan's plan takes a while
            raise InterruptedError("stopped while planning")
    shares[t] = (planned, per_ng)
    return {"planned": planned}


def _send_share(rt: NodeRuntime, job: Job, t: int, plugin: Source, ngs: list[int], out: Outbox, pace: Pace,
                owed: dict, spill_to: str | None, share: tuple) -> dict:
    plan = rt.plan
    keys = job.meta.get("keys")
    keys = tuple(keys) if isinstance(keys, (list, tuple)) and len(keys) == 2 else None
    spill = Spill(plugin, job.scan, spill_to, plan.key, plan.part, keys) if spill_to else None
    try:
        counts = stream(rt, plugin, job, t, ngs, out, pace, owed, spill, share)
    except BaseException:
        if spill is not None:
            spill.abort()  # leave no file under a final name
        raise
    if spill is not None and spill.written:
        manifest = spill.close()
        rt.kv.set(f"scans/{job.id}/fallback/{rt.name}/{rt.replica}/{t}", manifest)
        counts.update(written=spill.written, written_bytes=spill.bytes, written_items=spill.items)
    return counts


def _written(counts: dict, directory: str | None) -> dict:
    """The flow record's account of what went to disk mid-scan (the rest of a share nobody could take)."""
    if not counts.get("written"):
        return {}
    return {"written": counts["written"], "written_bytes": counts.get("written_bytes", 0),
            "written_items": {str(p): ks.pack() for p, ks in (counts.get("written_items") or {}).items()},
            "spilled_to": directory}


def _finish_spill(rt: NodeRuntime, job: Job, rec: dict) -> None:
    """The scan's announcer ties the files every replica wrote of the scan's rest together (the
    source's finish_recording) once they have all said so, within SPILL_WAIT, and notes it in the record."""
    if rec.get("announced_by") != rt.label:
        return
    prefix = f"scans/{job.id}/fallback/"
    deadline = time.monotonic() + SPILL_WAIT

    def settled() -> bool:
        for r in range(rt.spec.replicas):
            f = rt.kv.get(flow.flow_key(rt.name, r, job.id))
            if not (isinstance(f, dict) and f.get("done")) and not rt.roster.gone(rt.name, r):
                return False
        return True

    while not settled() and time.monotonic() < deadline and not rt.stop.is_set():
        time.sleep(0.05)
    manifests = [v for v in rt.kv.items(prefix).values() if isinstance(v, dict)]
    directory = _spill_directory(rt, job)
    try:
        made = job.plugins[0].finish_recording(job.scan, directory, manifests) or {}
    except Exception as exc:
        log.error("scan %d: cannot tie together the files written of its rest: %s: %s", job.id, type(exc).__name__, exc)
        made = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    scans.update(rt.kv, job.id, spilled={"directory": directory, **made, "threads": len(manifests)})


def _choose(rt: NodeRuntime, wait: float = 0.0) -> tuple[list[int], str | None]:
    """The node groups a new scan goes to (alive, registered, not leaving), waiting up to `wait`
    seconds for all the topology declares; ([], why) if it goes to disk."""
    plan = rt.plan
    until = time.monotonic() + wait
    while True:
        agg_ok = plan.aggregator is None or rt.roster.routable(plan.aggregator, 0)
        ngs = [ep.replica for ep in rt.registry.endpoints(plan.node_group, f"{plan.node_group_in}@0")
               if rt.roster.routable(plan.node_group, ep.replica)]
        if (agg_ok and len(ngs) >= plan.ng_replicas) or time.monotonic() > until or rt.stop.is_set():
            break
        time.sleep(0.05)
    if not agg_ok:
        return [], f"the aggregator {plan.aggregator} is not there"
    return ngs, None if ngs else "no node group is registered"


def _announce(rt: NodeRuntime, job: Job) -> dict | None:
    """The lowest live replica fixes the scan's node groups; the others take them from the record.

    Replica 0 announces; should it be gone (zpipe.roster), the next one does, so the scans of a
    run whose first producer died are still announced and accounted for."""
    # The announcer may still be sending the last scan, then wait `fallback_wait` for node groups:
    # we wait as long as it lives (it may be slow, not gone), within ANNOUNCE_WAIT at most.
    deadline = time.monotonic() + ANNOUNCE_WAIT
    while not rt.stop.is_set():
        announcer = next((r for r in range(rt.spec.replicas) if r == rt.replica or not rt.roster.gone(rt.name, r)))
        if announcer == rt.replica:
            break
        rec = scans.wait_record(rt.kv, job.id, timeout=0.5, stop=rt.stop, pipe=rt.pipe)
        if rec is not None:
            return rec
        if time.monotonic() > deadline or rt.kv.silence > OUTAGE_TRUST:
            return None  # no record: nobody can tell us the scan's node groups (the registry is away)
    else:
        return None
    current = scans.valid_record(rt.kv.get(scans.key(job.id)), rt.pipe)
    if current is not None:
        return current  # announced already (by a replica before us that has since gone)
    # Wait (bounded) for every node group the topology declares, then go with those alive.
    ngs, why_none = _choose(rt, rt.spec.fallback_wait if rt.spec.fallback else rt.resolve_timeout)
    source = {"node": rt.name, "replicas": rt.spec.replicas, "threads": rt.spec.threads}
    route = {"aggregator": rt.plan.aggregator, "node_group": rt.plan.node_group}
    rec = scans.update(rt.kv, job.id, status="announced" if ngs else "fallback", node_groups=ngs,
                       meta=job.meta, source=source, route=route, producers=rt.spec.replicas,
                       pipe=rt.pipe, announced_by=rt.label, started=time.time(),
                       **({"fallback_reason": why_none} if not ngs else {}))
    try:
        scans.write_part(rt.output_dir, job.id, "record", rec)  # the account's starting point, kept on disk too
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
    items: dict = {}  # part -> KeySet of the items whose part went to disk
    for r in results:
        total.update({k: v for k, v in r.items() if k not in _WHEN and k not in ("sent_to", "written_items")})
        for g, n in (r.get("sent_to") or {}).items():
            sent_to[g] = sent_to.get(g, 0) + n
        for p, ks in (r.get("written_items") or {}).items():
            if p in items:
                items[p].merge(ks)
            else:
                items[p] = ks
    out = dict(total)
    out["sent_to"] = sent_to
    if items:
        out["written_items"] = items
    for k, pick in _WHEN.items():  # wall-clock times: the earliest first, the latest last
        times = [r[k] for r in results if r.get(k) is not None]
        out[k] = pick(times) if times else None
    return out


_WHEN = {"first_sent": min, "last_sent": max}


def _give_up(rt: NodeRuntime, job: Job, why: str) -> dict:
    """The scan cannot be sent anywhere: count what it would have been, say why."""
    planned = _in_threads(rt, job.plugins, lambda t, p: {"planned": sum(1 for _ in p.plan(job.scan, t, rt.spec.threads))})
    log.error("scan %d: %s; its %d messages from this producer are undeliverable", job.id, why, planned["planned"])
    return {"planned": planned["planned"], "messages": 0, "undeliverable": planned["planned"]}


def _fallback(rt: NodeRuntime, job: Job, rec: dict) -> dict:
    """No node group (or no aggregator): write the scan where existing tools read it, and say so in its record."""
    why = rec.get("fallback_reason") or "no node group is registered"
    if rt.spec.fallback is None:
        return _give_up(rt, job, f"{why} and {rt.name} has no `fallback` directory")
    sc, plugins = job.scan, job.plugins
    directory = os.path.join(rt.output_dir, rt.spec.fallback)
    os.makedirs(directory, exist_ok=True)
    prefix = f"scans/{job.id}/fallback/"

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
    log.warning("scan %d: %s; wrote %d messages to %s", job.id, why, counts["messages"], directory)
    if rec.get("announced_by") == rt.label:  # its announcer closes it
        want = rt.spec.replicas * rt.spec.threads
        deadline = time.monotonic() + rt.resolve_timeout * 4
        while True:  # bounded, and cut short by a stop (the record then says how many did)
            try:
                parts = rt.kv.wait(lambda items: len(items) >= want, prefix=prefix, timeout=0.25)
                break
            except TimeoutError:
                if rt.stop.is_set() or time.monotonic() > deadline:
                    parts = rt.kv.items(prefix)
                    log.error("scan %d: only %d of %d producer threads said their files are final", job.id,
                              len(parts), want)
                    break
        error = None
        try:
            written = plugins[0].finish_recording(sc, directory, list(parts.values()))
        except Exception as exc:  # the files are there, their index is not: say so in the record
            error, written = f"{type(exc).__name__}: {exc}"[:1000], None
            log.error("scan %d: could not finish the files' index in %s: %s", job.id, directory, error)
        scans.update(rt.kv, job.id, status="done", fallback={"directory": directory, **(written or {}),
                                                               "threads": len(parts), "of": want, "why": why,
                                                               **({"error": error} if error else {})},
                     outcome="failed" if error else "complete" if len(parts) >= want else "incomplete",
                     finished=time.time())
    return counts
