"""The node group role: receive parts, assemble items, run the analyses, and account for every scan.

Three kinds of thread, talking only through the lanes and the workers' results:
* the receiving thread (receive.py) checks every message and files parts into items;
* the workers (workers.py) run the analyses on batches, one scan at a time per instance;
* this module's control loop closes scans and publishes this node group's part of each
  scan's account (zpipe.scans.record: `scans/{id}/part/{replica}`), as the scan goes and when
  it closes, then brings the analyses' results to the scan's writer (zpipe.gather).

A scan closes when every upstream sender has said `done` (or is gone, or ended), or, as a
last resort, `scan_timeout` seconds after it went quiet; either way the incomplete items are
processed too, and the part names what is missing. The accountant (zpipe.scans.accountant)
adds the parts up; this node group never waits for the others' parts.

Asked to leave (the first SIGTERM: its session ends), a node group says so in its liveness key
(zpipe.roster); its senders route the rest of their scans elsewhere and send it their `done`
at once, so it closes its open scans with everything it was sent, publishes their parts and
results, and exits: after LEAVE_WAIT seconds, or once what the queues upstream held stopped
coming, LEAVE_MAX seconds at most, it closes what is still open, naming the senders not through.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from zpipe import flow, preview
from zpipe.gather import MpiGather, ZmqGather
from zpipe.plugin import Scan, ScanResults
from zpipe.results import ResultBuffers
from zpipe.roles.nodegroup.receive import READY_MAX, Lane, Receiver, ScanState
from zpipe.roles.nodegroup.workers import Workers, analysis_specs
from zpipe.runtime import NodeRuntime
from zpipe.scans import record
from zpipe.scans.account import KeySet, merge_figures, ranges

log = logging.getLogger("zpipe.nodegroup")
PROGRESS_EVERY = 1.0  # s between the parts published while a scan is open
STALLED = 1.0  # s between two turns of the control loop that mean this process itself was stopped
WORKER_WAIT = 600.0  # s a closing scan waits for a worker still inside an analysis hook, at most
LEAVE_WAIT = 10.0  # s a leaving node group waits for its senders' `done`s before it closes with what arrived,
LEAVE_QUIET = 2.0  # ... or longer while parts still arrive (the queues upstream draining), until none came
LEAVE_MAX = 20.0  # for this long, or this long at most (the runner's grace after a signal is 25 s)
LEAVE_SETTLE = 1.0  # s a leaving node group with nothing open waits for an info already on its way


def run(rt: NodeRuntime, _make_plugin) -> dict:
    return NodeGroup(rt).run()


class NodeGroup:
    def __init__(self, rt: NodeRuntime):
        self.rt, self.spec, self.plan = rt, rt.spec, rt.plan
        self.meter = rt.meter
        self.meter.queue_max = READY_MAX * self.spec.workers
        self.lanes = [Lane() for _ in range(self.spec.workers)]
        self.analyses = analysis_specs(self.spec)
        self.stopping = False
        self.receiver = Receiver(self)
        self.workers = Workers(self)
        self.errors: list[BaseException] = []
        self._meta: dict[int, dict] = {}
        self._results: dict[int, dict[int, dict]] = {}  # scan -> worker -> its share
        self._results_cond = threading.Condition()
        self.finals: dict[int, dict] = {}  # closed scan -> our final part (republished with late messages)
        self.preview_keys: dict[int, set[str]] = {}  # scan -> the preview keys we published
        self._persist_failed = False
        self.closed_count = 0
        self.closed_scans: list[int] = []
        self.bytes = 0
        self.gather = None
        if any(a.writes for a in self.analyses):
            self.gather = MpiGather(rt.mpi) if rt.mpi is not None else ZmqGather(rt, self.spec.scan_timeout * 2 + 30)

    # -- called by the other threads -----------------------------------------------------------------
    def opened(self, st: ScanState) -> None:
        """The receiving thread saw a scan's first info (under its lock)."""
        self._meta[st.id] = st.meta
        self.meter.scans[st.id] = {"received": 0, "expected": None}

    def meta_of(self, scan: int) -> dict:
        return self._meta.get(scan, {})

    def worker_done(self, scan: int, w: int, result: dict) -> None:
        with self._results_cond:
            self._results.setdefault(scan, {})[w] = result
            self._results_cond.notify_all()

    # -- the control loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        def guarded(fn, *args):
            try:
                fn(*args)
            except BaseException as exc:
                self.errors.append(exc)
                self.rt.stop.set()

        workers = [threading.Thread(target=guarded, args=(self.workers.work, w), name=f"work-{w}", daemon=True)
                   for w in range(self.spec.workers)]
        receiver = threading.Thread(target=guarded, args=(self.receiver.serve,), name="recv", daemon=True)
        for th in (*workers, receiver):
            th.start()
        last_progress = last_preview = previous = 0.0
        leaving = quiet_since = None
        try:
            while not self.rt.stop.is_set():
                now = time.monotonic()
                if self.rt.leave.is_set():
                    if leaving is None:
                        leaving = quiet_since = now
                        self.rt.announce_leaving()
                        log.info("%s: leaving: nothing new is routed here; closing the open scans with what "
                                 "their senders sent", self.rt.label)
                    if self.leave_step(now, leaving):
                        break
                    with self.receiver.lock:
                        if self.receiver.scans:
                            quiet_since = now
                    if now - quiet_since > LEAVE_SETTLE:
                        break
                if previous and now - previous > STALLED:
                    # We were not running (SIGSTOP, a swapped-out host): nobody was quiet, we were.
                    with self.receiver.lock:
                        for st in self.receiver.scans.values():
                            st.last = now
                previous = now
                self.check_scans(now)
                if now - last_progress >= PROGRESS_EVERY:
                    last_progress = now
                    self.publish_progress()
                if self.rt.topology.status.interval and now - last_preview >= self.rt.topology.status.interval:
                    last_preview = now
                    self.publish_previews()
                with self.receiver.lock:
                    still_open = bool(self.receiver.scans)
                if not receiver.is_alive() and not still_open:
                    break
                time.sleep(0.02)
            self.publish_progress()  # late messages of closed scans reach the account
            # We leave cleanly: every scan we closed has its part published (the accountant can tell
            # "died with its results" from "its part was lost with the registry").
            flow.publish(self.rt.kv, self.rt.name, self.rt.replica, "end", done=True, pipe=self.rt.pipe,
                         scans=sorted(self.closed_scans[-1000:]))
        finally:
            self.stopping = True
            for lane in self.lanes:
                with lane.cond:
                    lane.cond.notify_all()
            for th in (receiver, *workers):
                th.join(timeout=5.0)
            if self.gather is not None:
                self.gather.close()
        if self.errors:
            raise self.errors[0]
        if self.rt.stop.is_set():
            raise InterruptedError("stopped")
        return {"scans": self.closed_count, "messages": self.receiver.messages, "bytes": self.bytes,
                "rejected": self.receiver.rejects.count}

    def check_scans(self, now: float) -> None:
        rcv = self.receiver
        with rcv.lock:
            open_scans = list(rcv.scans.values())
        self.meter.queue = sum(lane.ready for lane in self.lanes)
        if open_scans:
            self.meter.state, self.meter.scan = "streaming", open_scans[-1].id
        for st in open_scans:
            with rcv.lock:  # the receiving thread adds senders as their infos arrive
                # Known only once every sender of ours said how many (its info, or its done: an aggregator
                # channel says only at its done); a partial sum would read as more than 100 % in the view.
                counts = [s.done if s.done is not None else s.expected for s in st.senders.values()]
                expected = (sum(counts) if len(counts) >= len(self.plan.ng_senders) and None not in counts
                            else None)
                through, left = rcv.state_of(st)
            self.meter.scans[st.id] = {"received": st.received, "expected": expected or None}
            quiet = now - st.last > self.spec.scan_timeout
            if through or quiet:
                self.close_scan(st, timed_out=not through, left=left)

    def leave_step(self, now: float, leaving: float) -> bool:
        """While leaving: past LEAVE_WAIT, close every open scan with what arrived, naming the senders
        that had not handed back their share; True then (time to go)."""
        if now - leaving <= LEAVE_WAIT:
            return False
        with self.receiver.lock:
            open_scans = list(self.receiver.scans.values())
        if now - leaving <= LEAVE_MAX and any(now - st.last < LEAVE_QUIET for st in open_scans):
            return False  # still draining
        for st in open_scans:
            with self.receiver.lock:
                left = {s: f"had not said done {now - leaving:.0f} s after this node group began to leave"
                        for s in self.plan.ng_senders if (st.senders.get(s) or _NO).done is None}
            self.close_scan(st, timed_out=False, left=left)
        return True

    # -- closing a scan ------------------------------------------------------------------------------------
    def close_scan(self, st: ScanState, timed_out: bool, left: dict[str, str]) -> None:
        rt = self.rt
        self.receiver.close(st)
        if timed_out:
            log.warning("%s: scan %d went quiet for %.1f s with %d messages in and senders %s not through; "
                        "closing it with what arrived", rt.label, st.id, self.spec.scan_timeout, st.received,
                        sorted(s for s in self.plan.ng_senders if (st.senders.get(s) or _NO).done is None))
        with self.receiver.lock:
            senders = dict(st.senders)
        for s, snd in senders.items():
            if snd.abandoned and not self.rt.leave.is_set():
                left[s] = "gave up on this node group mid-scan (it looked gone) and sent the rest elsewhere"
        for s, why in left.items():
            log.warning("%s: scan %d: sender %s %s", rt.label, st.id, s, why)
        self.meter.state = "processing"
        for lane in self.lanes:
            with lane.cond:
                lane.flushes.append(st.id)
                lane.cond.notify_all()
        shares = self._await_workers(st.id)
        part = self.part(st, shares, timed_out, left)
        results = {a.name: merged([s["results"][a.name] for s in shares.values() if a.name in s["results"]])
                   for a in self.analyses if a.writes}
        if self.rt.topology.status.interval:
            for name, r in results.items():  # the scan's last picture, whole
                self.preview(st.id, st.meta, name, [r["buffers"]])
        if self.gather is not None:
            self.meter.state = "writing"
            self.write(st, part, results)
        part["final"] = True
        self.publish_part(st.id, part)
        self.finals[st.id] = part
        while len(self.finals) > 64:
            self.finals.pop(next(iter(self.finals)))
        self.closed_count += 1
        self.closed_scans.append(st.id)
        self.bytes += st.bytes
        self.meter.scans[st.id] = {"received": st.received, "expected": part["sent"], "done": True}
        while len(self.meter.scans) > 64:  # a long run: the status shows the last few
            self.meter.scans.pop(next(iter(self.meter.scans)))
        self._meta.pop(st.id, None)
        self.meter.state = "idle"

    def _await_workers(self, scan: int) -> dict[int, dict]:
        """Every worker's share of the scan; bounded (a worker stuck inside a hook is named, not waited for)."""
        deadline = time.monotonic() + WORKER_WAIT
        with self._results_cond:
            while len(self._results.get(scan, {})) < self.spec.workers:
                if time.monotonic() > deadline or self.rt.stop.is_set() or self.errors:
                    log.error("%s: scan %d: workers %s did not finish it", self.rt.label, scan,
                              sorted(set(range(self.spec.workers)) - set(self._results.get(scan, {}))))
                    break
                self._results_cond.wait(0.1)
            return self._results.pop(scan, {})

    def part(self, st: ScanState, shares: dict[int, dict], timed_out: bool, left: dict[str, str]) -> dict[str, Any]:
        """This node group's part of the scan's account (see zpipe.scans.account for how parts add up)."""
        rt = self.rt
        part: dict[str, Any] = {
            "label": rt.label, "replica": rt.replica, "final": False, "received": st.received, "bytes": st.bytes,
            "sent": sum(s.done or 0 for s in st.senders.values()), "rejected": sum(st.rejected.values()),
            "rejected_by": dict(st.rejected), "timed_out": timed_out, "senders_gone": dict(left),
            "senders": {k: {"expected": s.expected, "sent": s.done, "accepted": s.accepted, "rejected": s.rejected,
                            "abandoned": s.abandoned} for k, s in st.senders.items()},
            "first_received": st.first_received, "parts_per_item": self.spec.assemble.parts,
            "flow": {"held": st.held, "overrides": st.overrides, "max_pending": st.max_pending},
            "complete": 0, "incomplete": 0, "missing_parts": {}, "analyses": {}, "updated": time.time(),
        }
        seen = KeySet(st.keys)
        missing_workers = sorted(set(range(self.spec.workers)) - set(shares))
        for w, r in sorted(shares.items()):
            part["complete"] += r["complete"]
            part["incomplete"] += r["incomplete"]
            part["missing_parts"].update(r["missing_parts"])
            if r.get("seen") is not None:
                seen.merge(r["seen"])
            for name, a in r["analyses"].items():
                mine = part["analyses"].setdefault(name, {"figures": {}, "writes": a["writes"]})
                merge_figures(mine["figures"], a["figures"])
                if a.get("failed") and "failed" not in mine:
                    mine["failed"] = {**a["failed"], "worker": w}
        for name in (a.name for a in self.analyses):
            if missing_workers:
                part["analyses"].setdefault(name, {"figures": {}, "writes": False})["failed"] = {
                    "hook": "process", "scan": st.id, "error": f"workers {missing_workers} never finished the scan"}
        part["processed"] = seen.pack()
        part["processed_at"] = max((r["processed"] for r in shares.values()), default=time.time())
        return part

    def write(self, st: ScanState, part: dict, results: dict[str, list]) -> None:
        """Bring every node group's results to the scan's writer, which writes each analysis's output."""
        rt = self.rt
        if isinstance(self.gather, MpiGather):
            writer = st.node_groups[0]
        else:
            alive = [g for g in st.node_groups if g == rt.replica or not rt.roster.gone(rt.name, g)]
            # One that is leaving (its session ends) sends its share rather than write, while another stays.
            staying = [g for g in alive if not (rt.leave.is_set() if g == rt.replica else rt.roster.leaving(rt.name, g))]
            writer = (staying or alive or [rt.replica])[0]
        summary = {k: part[k] for k in ("complete", "incomplete", "received", "bytes", "rejected", "missing_parts")}
        summary["analyses"] = {n: a["figures"] for n, a in part["analyses"].items()}
        mine = {"part": summary, "results": {name: {"buffers": r["buffers"].share() if r["buffers"] else None,
                                                    "parts": r["parts"]} for name, r in results.items()}}
        shares, missing = self.gather.collect(st.id, st.node_groups, writer, mine)
        if missing:
            part.setdefault("gather", {}).update({str(g): why for g, why in missing.items()})
        if shares is None:  # not the writer
            return
        report = {"scan": st.id, "node_groups": sorted(shares), "complete": 0, "incomplete": 0, "received": 0,
                  "bytes": 0, "rejected": 0, "missing_parts": {}, "analyses": {}, "provisional": True}
        for share in shares.values():  # what each node group says of its part (for the file's own record)
            p = share.get("part") if isinstance(share.get("part"), dict) else {}
            for k in ("complete", "incomplete", "received", "bytes", "rejected"):
                report[k] += p[k] if type(p.get(k)) is int else 0
            if isinstance(p.get("missing_parts"), dict):
                report["missing_parts"].update(p["missing_parts"])
            for n, figures in (p.get("analyses") if isinstance(p.get("analyses"), dict) else {}).items():
                if isinstance(figures, dict):
                    merge_figures(report["analyses"].setdefault(str(n), {}), figures)
        scan = Scan(st.id, dict(st.meta))
        for a in self.analyses:
            if not a.writes:
                continue
            out: dict[str, Any] = {"node_groups": sorted(shares), "writer": rt.replica}
            try:
                res = merged([share["results"][a.name] for share in shares.values()
                              if isinstance(share.get("results"), dict) and a.name in share["results"]])
                bufs = res["buffers"]
                results = ScanResults(scan, dict(bufs.arrays) if bufs else {}, bufs.received if bufs else None,
                                      res["parts"])
                if results.received is not None:
                    out["positions"], out["positions_received"] = len(results.received), int(results.received.sum())
                    out["positions_missing"] = ranges(np.flatnonzero(~results.received).tolist())[:10_000]
                path = a.make().write(scan, results, report, rt.output_dir)
                out.update(path=str(path) if path else None, empty=not path)
            except Exception as exc:
                log.exception("%s: analysis %r failed to write scan %d", rt.label, a.name, st.id)
                self.meter.errors += 1
                out["error"] = f"{exc.__class__.__name__}: {exc}"[:500]
            out["updated"] = time.time()
            out["pipe"] = rt.pipe
            rt.kv.set(record.output_key(st.id, a.name), out)
            try:
                record.write_part(rt.output_dir, st.id, f"output.{a.name}", out)
            except OSError:
                pass

    # -- publishing ----------------------------------------------------------------------------------------
    def publish_part(self, scan: int, part: dict) -> None:
        """Into the registry, and onto our own disk: the part outlives this process and the registry both."""
        part["revision"] = part.get("revision", 0) + 1
        part["updated"] = time.time()
        part.setdefault("pipe", self.rt.pipe)
        self.rt.kv.set(record.part_key(scan, self.rt.replica), part)
        self._persist(scan, part)

    def _persist(self, scan: int, part: dict) -> None:
        try:
            record.write_part(self.rt.output_dir, scan, self.rt.label, part)
        except OSError as exc:
            if not self._persist_failed:
                self._persist_failed = True
                log.error("%s: cannot keep scan parts in %s: %s", self.rt.label, self.rt.output_dir, exc)

    def publish_previews(self) -> None:
        """Small pictures of the per-position buffers of the scans under way (zpipe.preview)."""
        live: dict[int, dict[str, list]] = {}
        for (scan, _w), bufs in list(self.workers.live.items()):
            for name, b in list(bufs.items()):
                live.setdefault(scan, {}).setdefault(name, []).append(b)
        for scan, by_analysis in live.items():
            for name, sets in by_analysis.items():
                self.preview(scan, self.meta_of(scan), name, sets)

    def preview(self, scan: int, meta: dict, name: str, sets: list) -> None:
        """Publish one analysis's per-position buffers of one scan as small pictures (its workers' sets)."""
        geometry = Scan(scan, meta).geometry
        sets = [b for b in sets if b is not None and b.received is not None]
        if geometry is None or not sets or sets[0].received.shape != (geometry.positions_count,):
            return
        received = np.zeros(geometry.positions_count, bool)
        for b in sets:
            received |= b.received
        keys = self.preview_keys.setdefault(scan, set())
        for buf, kind in sets[0].kinds.items():
            if kind != "position" or sets[0].arrays[buf].ndim != 1:
                continue
            values = np.zeros(geometry.positions_count)
            for b in sets:  # each worker's positions are its own
                values = np.where(b.received, b.arrays[buf], values)
            grid = preview.shrink(values, received, geometry.shape)
            if grid is not None:
                key = f"{preview.PREFIX}{scan}/{name}.{buf}/{self.rt.replica}"
                self.rt.kv.set(key, preview.value(grid), ttl=preview.TTL)
                keys.add(key)
        while len(self.preview_keys) > 4:  # the pictures of the last few scans stay, older ones go
            for key in self.preview_keys.pop(next(iter(self.preview_keys))):
                self.rt.kv.delete(key)

    def publish_progress(self) -> None:
        """Open scans' running counts, and closed scans that turned away late messages since."""
        rcv = self.receiver
        with rcv.lock:
            open_scans = list(rcv.scans.values())
            late = {s: dict(v) for s, v in rcv.closed.items() if v}
        for st in open_scans:
            progress = {"label": self.rt.label, "replica": self.rt.replica, "final": False, "received": st.received,
                        "bytes": st.bytes, "rejected": sum(st.rejected.values()), "updated": time.time(),
                        "pipe": self.rt.pipe}
            self.rt.kv.set(record.part_key(st.id, self.rt.replica), progress)
            self._persist(st.id, progress)
        for scan, counts in late.items():
            part = self.finals.get(scan)
            if part is not None and part.get("late") != counts:
                part["late"] = counts
                self.publish_part(scan, part)


def merged(entries: list) -> dict[str, Any]:
    """Workers' (or node groups') results of one analysis as one: buffers merged, parts listed."""
    bufs, parts = None, []
    for e in entries:
        if not isinstance(e, dict):
            raise ValueError("results of the wrong shape")
        b = e.get("buffers")
        if b is not None and not isinstance(b, ResultBuffers):
            b = ResultBuffers.from_share(b)  # as it crossed the network
        if b is not None:
            if bufs is None:
                bufs = b
            else:
                bufs.merge(b)
        parts.extend(e.get("parts") or [])
    return {"buffers": bufs, "parts": parts}


class _NoSender:
    done = None


_NO = _NoSender()
