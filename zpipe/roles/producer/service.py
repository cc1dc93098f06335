"""Where a producer's scans come from: the source's own list (batch), or acquisitions (service).

As a service, the replica that announces scans (the lowest live one) takes each acquisition
requested in the registry (zpipe.acquisitions), in order, numbers it and announces it; every
replica, that one included, then sends the scan of the next announced record. A request names
the source's parameters (its `Request`) or a directory of recorded files to replay, which the
source's `replay_plugin` reads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

from zpipe import acquisitions, flow
from zpipe.plugin import Context, Source
from zpipe.roles.producer.stream import Job
from zpipe.runtime import NodeRuntime
from zpipe.scans import messages
from zpipe.scans import record as scans

log = logging.getLogger("zpipe.producer")
WAIT = 0.2  # s between looks for a request or an announced scan


def batch(plugins: list[Source]) -> Iterator[tuple[Job, dict | None]]:
    """The source's own scans; each is announced when its turn comes (record None)."""
    for sc in plugins[0].scans():
        yield Job(sc.id, sc, plugins), None


class Service:
    """Acquisitions, until the producer is stopped or leaves."""

    def __init__(self, rt: NodeRuntime, plugins: list[Source], choose):
        self.rt, self.plugins = rt, plugins
        self.choose = choose  # () -> (node groups, why none): where the next scan goes
        self.taken: set[str] = set()
        self.last = self._last_announced()
        self._made: dict[int, Job] = {}  # scans this replica announced, made when it checked the request

    def _records(self) -> dict[int, dict]:
        out = {}
        for k, v in self.rt.kv.items("scans/").items():
            n = k[len("scans/"):]
            rec = scans.valid_record(v, self.rt.pipe) if n.isdigit() else None
            if rec is not None:
                out[int(n)] = rec
        return out

    def _last_announced(self) -> int:
        """Scans of this pipeline finished before we started are not ours to send."""
        done = [n for n, rec in self._records().items() if rec.get("status") in ("done", "fallback")]
        return max(done, default=0)

    def jobs(self) -> Iterator[tuple[Job, dict]]:
        rt = self.rt
        while not (rt.stop.is_set() or rt.leave.is_set()):
            rec = self._next_record()
            if rec is None and self._announcer():
                rec = self._take_request()
            if rec is None:
                time.sleep(WAIT)
                continue
            n = rec["_scan"]
            self.last = n
            try:
                job = self._made.pop(n, None) or self.job(n, rec)
            except Exception as exc:  # a request the announcer accepted but we cannot make: say so, go on
                why = f"{type(exc).__name__}: {exc}"
                log.error("scan %d: cannot make the requested scan here: %s", n, why)
                # Our figures for it, so that its account closes (failed: our share's plan is unknown)
                # instead of waiting for them.
                flow.publish_scan(rt, n, done=True, planned=None, sent=0, error=why[:1000])
                job = None
            yield job, {k: v for k, v in rec.items() if k != "_scan"}

    def _announcer(self) -> bool:
        rt = self.rt
        return next(r for r in range(rt.spec.replicas) if r == rt.replica or not rt.roster.gone(rt.name, r)) \
            == rt.replica

    def _next_record(self) -> dict | None:
        """The earliest announced acquisition after the last we sent."""
        later = {n: rec for n, rec in self._records().items() if n > self.last and "request" in rec}
        if not later:
            return None
        n = min(later)
        return {**later[n], "_scan": n}

    def _take_request(self) -> dict | None:
        rt = self.rt
        for rid, value in acquisitions.pending(rt.kv, rt.pipe, self.taken):
            self.taken.add(rid)
            try:
                req = acquisitions.check(value)
                n = req["scan"] if req["scan"] is not None else max([self.last, *self._records()], default=0) + 1
                if n in self._records() or n <= self.last:
                    raise acquisitions.Refused(f"scan {n} exists already in this pipeline; give a later number "
                                               f"or none (the next is {max([self.last, *self._records()]) + 1})")
                if n >= acquisitions.MAX_SCAN:
                    raise acquisitions.Refused(f"scan numbers stop below {acquisitions.MAX_SCAN}")
                job = self.job(n, {"request": req})  # made here first: a request that cannot be served is refused
                check_meta = dict(job.meta)
                if isinstance(check_meta.get("keys"), tuple):
                    check_meta["keys"] = list(check_meta["keys"])
                try:  # what every receiver will check in the scan's info: refused now, not rejected there
                    messages.meta(check_meta)
                except messages.Rejected as exc:
                    raise acquisitions.Refused(f"the scan it makes would be rejected downstream: {exc}") from None
                ngs, why_none = self.choose()
                if not ngs and req.get("replay") is not None:
                    raise acquisitions.Refused(f"{why_none}: a replay streams recorded files to node groups "
                                               f"and is never written to disk again")
            except Exception as exc:
                why = str(exc) if isinstance(exc, acquisitions.Refused) else f"{type(exc).__name__}: {exc}"
                log.warning("acquisition %s refused: %s", rid, why)
                acquisitions.answer(rt.kv, rid, error=why[:1000])
                continue
            source = {"node": rt.name, "replicas": rt.spec.replicas, "threads": rt.spec.threads}
            route = {"aggregator": rt.plan.aggregator, "node_group": rt.plan.node_group}
            self._made = {n: job}
            rec = scans.update(rt.kv, n, status="announced" if ngs else "fallback", node_groups=ngs, meta=job.meta,
                               source=source, route=route, producers=rt.spec.replicas, pipe=rt.pipe,
                               announced_by=rt.label, started=time.time(), request=req, acquisition=rid,
                               **({"fallback_reason": why_none} if not ngs else {}))
            try:
                scans.write_part(rt.output_dir, n, "record", rec)
            except OSError:
                pass
            acquisitions.answer(rt.kv, rid, scan=n, node_groups=ngs, to_disk=not ngs)
            log.info("acquisition %s: scan %d, %s", rid, n, f"to node groups {ngs}" if ngs else f"to disk ({why_none})")
            return {**rec, "_scan": n}
        return None

    def job(self, n: int, rec: dict) -> Job:
        """The scan record `rec` asks for, as this replica's threads send it."""
        req = rec["request"]
        if req.get("replay") is not None:
            return self._replay(n, req["replay"])
        cls = type(self.plugins[0])
        request = cls.Request.model_validate(req.get("params") or {})
        sc = self.plugins[0].acquire(n, request)
        for p in self.plugins[1:]:
            p.acquire(n, request)  # each thread's instance knows the scan too
        return Job(n, sc, self.plugins, request=req)

    def _replay(self, n: int, replay: dict) -> Job:
        """A directory of recorded files, read by the source's replay plugin, sent as scan n."""
        from zpipe import catalog

        rt = self.rt
        name = type(self.plugins[0]).replay_plugin
        if not name:
            raise acquisitions.Refused(f"plugin {rt.spec.plugin!r} names no replay plugin: it cannot replay files")
        cls = catalog.get(name)
        directory = os.path.join(rt.output_dir, replay["directory"])  # relative: to the producer's output dir
        wanted = [replay["scan"]] if replay.get("scan") is not None else None
        if hasattr(cls, "check_replay"):
            try:
                cls.check_replay(directory, wanted)
            except ValueError as exc:
                raise acquisitions.Refused(str(exc)) from None
        params = cls.Params.model_validate({"directory": directory, **({"scans": wanted} if wanted else {})})
        plugins = []
        for t in range(rt.spec.threads):
            p = cls(params)
            p.setup(Context(rt.name, rt.replica, rt.spec.replicas, t, rt.spec.threads, rt.host, rt.output_dir))
            plugins.append(p)
        found = list(plugins[0].scans())
        if len(found) != 1:
            raise acquisitions.Refused(f"{directory}: {len(found)} scans there; name one (`scan`)")
        sc = found[0]
        for p in plugins[1:]:
            next(iter(p.scans()))
        meta = {**sc.meta, "replayed_scan": sc.id}
        return Job(n, type(sc)(sc.id, meta), plugins, request={"replay": replay}, replay=True)
