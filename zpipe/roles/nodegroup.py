"""The node group role: receive parts, assemble items, run the analyses, and account for every scan.

Receiver threads (one socket each, 1:1 with upstream sending threads) place each part
straight into its item, held by reference (zero-copy), in the lane of the worker that owns
the item's key; workers take complete items in batches and run the analyses. Two limits
keep memory bounded by settings, not by the scan: complete items waiting for a worker
(READY_MAX: receivers block, and the sockets' HWM slows the senders), and items waiting for
their other parts (IN_FLIGHT: see `hold`). A scan ends when every upstream sender's expected
count has arrived and as many messages came in, or, if that never happens, `scan_timeout`
seconds after the scan went quiet; either way the incomplete items are processed too, and
the report names what is missing.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import msgpack

from zpipe import catalog, flow, scan as scans
from zpipe.assemble import Assembler, KeySet
from zpipe.gather import MpiGather, ZmqGather
from zpipe.inbox import Inbox
from zpipe.plugin import Analysis, Batch, Context, Scan
from zpipe.roles.aggregator import Rejects
from zpipe.runtime import NodeRuntime
from zpipe.wire import BadMessage

log = logging.getLogger("zpipe.nodegroup")
READY_MAX = 64  # complete items waiting for a worker, per worker
# Items a worker's lane may hold waiting for their other parts (see must_wait): a part that
# would start an item further ahead parks its socket (whose HWM then pushes back on the sector
# that runs ahead) until the slower sectors catch up. Should nothing complete for FLOW_STALL
# seconds while it waits, or after FLOW_TIMEOUT, it goes on: a safety net, counted in the status.
IN_FLIGHT = 192
FLOW_TIMEOUT = 5.0
FLOW_STALL = 0.05
PARTIAL_AFTER = 0.05  # seconds a worker waits for a full batch before it takes fewer (slow streams)
PARK_POLL_MS = 2  # how often parked parts are looked at again
_unpack = msgpack.unpackb


@dataclass
class _ScanState:
    id: int
    infos: int = 0
    expected: int = 0
    last: float = field(default_factory=time.monotonic)
    first_received: float | None = None  # wall clock, for the report's streaming time
    held: int = 0  # parts parked by flow control
    overrides: int = 0  # parked parts let go by the safety net, not by the rule
    max_pending: int = 0  # most items that waited for parts at once, in one lane
    node_groups: int = 1  # of the scan
    received: int = 0  # written by the receiving thread only
    bytes: int = 0  # payload bytes, likewise


@dataclass(slots=True)
class _Part:
    """A received data part on its way into an item; it waits here while flow control holds its socket."""

    frames: list
    header: dict
    scan_id: int
    sender: str
    st: _ScanState
    lane: "_Lane"
    key: int
    part: object
    since: float = 0.0  # parked at
    still: float = 0.0  # last time an item completed while parked
    progress: int = 0


class _Lane:
    """One worker's share of the items: its assemblers (by scan), guarded by one condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.assemblers: dict[int, Assembler] = {}
        self.closed: set[int] = set()  # scans flushed: a late part is rejected, not assembled
        self.flushes: list[int] = []  # scans the worker is to close
        self.completed = 0  # items completed so far: flow control's sign of progress
        self.ready = 0  # complete items not yet taken by the worker


def run(rt: NodeRuntime, _make_plugin) -> dict:
    spec, topo = rt.spec, rt.topology
    in_name = rt.inputs()[0]
    ups = flow.upstreams(topo, rt.name, in_name)
    senders = sum(topo.nodes[u.node].replicas * topo.nodes[u.node].threads for u in ups)
    # Which receiving thread each upstream sending thread reaches (see producer and aggregator):
    # a producer's threads all go to receiver (replica mod T), an aggregator's thread a to (a mod T).
    per_thread = [0] * spec.threads
    for u in ups:
        up = topo.nodes[u.node]
        for r in range(up.replicas):
            for a in range(up.threads):
                per_thread[(r if up.role == "producer" else a) % spec.threads] += 1
    group = NodeGroup(rt, in_name, senders, per_thread)
    return group.run()


class NodeGroup:
    def __init__(self, rt: NodeRuntime, in_name: str, senders: int, per_thread: list[int]):
        self.rt, self.spec, self.in_name = rt, rt.spec, in_name
        self.senders, self.per_thread = senders, per_thread
        self.label = f"{rt.name}[{rt.replica}]"
        self.rejects = Rejects(f"{self.label}.{in_name}", rt.meter)
        self.meter = rt.meter
        self.meter.queue_max = READY_MAX * rt.spec.workers
        self.lanes = [_Lane() for _ in range(self.spec.workers)]
        self.results: queue.Queue = queue.Queue()
        self.scans: dict[int, _ScanState] = {}
        self.finished: set[int] = set()
        self.unknown: dict[int, float] = {}  # scan id -> when we last found no record for it
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.stopping = False
        self.ends = [0] * self.spec.threads
        self.messages = 0
        self.analyses = [(a.plugin, catalog.get(a.plugin), a.params) for a in self.spec.analyses]
        # Only analyses that write a file need their results gathered.
        self.writes = any(cls.write.__func__ is not Analysis.write.__func__ for _, cls, _ in self.analyses)
        self.gather = None
        if self.writes:
            self.gather = MpiGather(rt.mpi) if rt.mpi is not None else ZmqGather(rt, self.spec.scan_timeout * 2 + 30)

    # -- receiving -----------------------------------------------------------------------------
    def state(self, scan_id: int) -> _ScanState:
        with self.lock:
            st = self.scans.get(scan_id)
            if st is None:
                ngs = len((self.rt.kv.get(scans.key(scan_id)) or {}).get("node_groups") or [0])
                st = self.scans[scan_id] = _ScanState(scan_id, node_groups=ngs)
            return st

    def receive(self) -> None:
        """One thread serves every receiving socket; a part that must wait parks its socket alone.

        Per message the thread only decodes a small header and files a buffer away, so one
        thread keeps up with several GB/s; more would only take turns at the GIL. A parked
        socket is not read (its HWM pushes back on the sender that runs ahead) while the
        others go on, so the parts the waiting items need keep coming.
        """
        socks = [self.rt.bind_per_thread(self.in_name, t) for t in range(self.spec.threads)]
        want = sum(self.per_thread)
        try:
            Inbox(socks).serve(self.take, self.retry, lambda: sum(self.ends) < want and not self.rt.stop.is_set(),
                               park_poll_ms=PARK_POLL_MS)
        finally:
            for sock in socks:
                sock.close(linger=0)

    def known(self, scan_id: int) -> bool:
        """A scan exists once its first producer announced it; give the record a moment to arrive."""
        now = time.monotonic()
        if now - self.unknown.get(scan_id, -10.0) < 5.0:  # asked lately: do not stall on every bad message
            return False
        deadline = now + 2.0
        while self.rt.kv.get(scans.key(scan_id)) is None:
            if time.monotonic() > deadline:
                self.unknown[scan_id] = time.monotonic()
                return False
            time.sleep(0.01)
        return True

    def take(self, t: int, frames) -> "_Part | None":
        """Account for one message; a data part goes into its item now, or comes back to wait (parked)."""
        try:
            header = _unpack(frames[0].buffer, raw=False)
            kind = header.get("type", "data")
        except Exception as exc:
            self.rejects.add(f"header is not a msgpack map ({exc.__class__.__name__})")
            return
        sender = str(header.get("sender", "unknown sender"))
        if kind == "end":
            self.ends[t] += 1
            return
        try:
            scan_id = int(header["scan"])
        except (KeyError, TypeError, ValueError):
            self.rejects.add("header has no integer 'scan'", sender)
            return
        if scan_id in self.finished:
            self.rejects.add(f"message for scan {scan_id}, which has ended", sender)
            return
        st = self.scans.get(scan_id)
        if st is None:
            if not self.known(scan_id):
                self.rejects.add(f"unknown scan {scan_id} (no record at {scans.key(scan_id)})", sender)
                return
            st = self.state(scan_id)
        st.last = time.monotonic()
        if kind == "info":
            with self.lock:
                st.infos += 1
                st.expected += int(header["expected"])
            return
        if st.first_received is None:
            st.first_received = time.time()
        if len(frames) != 2:
            self.rejects.add(f"expected 2 frames (header, payload), got {len(frames)}", sender)
            st.received += 1  # it was sent and counted upstream: it arrived, it was just bad
            return None
        key = self.spec.assemble.key
        try:
            k = int(header[key])
            w = (k // st.node_groups) % len(self.lanes)  # keys come to us 1 in node_groups
        except (KeyError, TypeError, ValueError):
            self.rejects.add(f"header has no integer {key!r}", sender)
            st.received += 1
            return None
        part = _Part(frames, header, scan_id, sender, st, self.lanes[w], k,
                     header.get(self.spec.assemble.part))
        if self.must_wait(part):
            st.held += 1
            part.since = part.still = time.monotonic()
            part.progress = part.lane.completed
            return part
        self.place(part)
        return None

    def place(self, p: _Part) -> None:
        """Put one part into its item (by reference), in the lane of the worker that owns the item's key."""
        lane, st = p.lane, p.st
        with lane.cond:
            asm = lane.assemblers.get(p.scan_id)
            if asm is None and p.scan_id not in lane.closed:
                asm = lane.assemblers[p.scan_id] = self.assembler(p.scan_id)
            try:
                if asm is None:
                    raise BadMessage(f"message for scan {p.scan_id}, which has ended")
                if asm.add(p.header, p.frames[1].buffer):
                    lane.completed += 1
                    lane.ready += 1
                    if len(asm.ready) >= self.spec.batch:
                        lane.cond.notify_all()
                elif len(asm.pending) > st.max_pending:
                    st.max_pending = len(asm.pending)
            except BadMessage as exc:
                self.rejects.add(str(exc), p.sender)
        st.received += 1  # counted once placed (or rejected): when the counts add up, every part is in
        nbytes = len(p.frames[1])
        st.bytes += nbytes
        self.meter.msgs_in += 1
        self.meter.bytes_in += nbytes

    def must_wait(self, p: _Part) -> bool:
        """Flow control: wait while the worker is behind, or while this part's item is too far ahead.

        "Too far" is measured in keys (frame numbers), which order every stream the same way:
        a part may start a new item only within `window` keys of the oldest item still waiting
        for parts. Every node group holds by the same rule, so a sector held here can never wait,
        through a shared upstream thread, on a sector held by another node group: the one held
        is always the furthest ahead. Items whose missing parts' streams moved `window` beyond
        them are stale (lost upstream, most likely) and do not hold the window back.
        """
        lane = p.lane
        if lane.ready >= READY_MAX:
            return True  # the worker is behind: wait for it, however long it takes
        asm = lane.assemblers.get(p.scan_id)
        if asm is None or p.key in asm.pending or p.key in asm.stale or len(asm.pending) < IN_FLIGHT // 2:
            return False  # a new scan, a part an item waits for, or plenty of room
        window = IN_FLIGHT * p.st.node_groups * len(self.lanes)  # keys in a lane are this far apart
        with lane.cond:
            frontier = asm.frontier(window)
        return frontier is not None and p.key >= frontier + window

    def retry(self, p: _Part, now: float) -> bool:
        """Place a parked part if it may go now; True once it went."""
        lane = p.lane
        if not self.must_wait(p):
            self.meter.blocked_s += now - p.since
            self.place(p)
            return True
        if lane.ready < READY_MAX:  # held for the items in flight, not for the worker
            if lane.completed != p.progress:
                p.progress, p.still = lane.completed, now
            elif now - p.still >= FLOW_STALL or now - p.since >= FLOW_TIMEOUT:
                # Nothing completes while it waits: what the items need is queued behind a parked
                # part (one socket carries several senders). Go on rather than deadlock.
                self.meter.flow_overrides += 1
                p.st.overrides += 1
                self.meter.blocked_s += now - p.since
                self.place(p)
                return True
        p.st.last = now  # held back, not quiet
        return False

    def assembler(self, scan_id: int) -> Assembler:
        keys = ((self.rt.kv.get(scans.key(scan_id)) or {}).get("meta") or {}).get("keys")
        return Assembler(self.spec.assemble, self.spec.batch, key_range=tuple(keys) if keys else None)

    # -- working -------------------------------------------------------------------------------
    def work(self, w: int) -> None:
        spec = self.spec
        ctx = Context(self.rt.name, self.rt.replica, spec.replicas, w, spec.workers, self.rt.host, self.rt.output_dir)
        plugins: list[tuple[str, Analysis]] = []
        for name, cls, params in self.analyses:
            p = cls(cls.Params.model_validate(params))
            p.setup(ctx)
            plugins.append((name, p))
        lane = self.lanes[w]
        begun: set[int] = set()
        while True:
            job = self.next_job(lane)
            if job is None:
                return
            scan_id, asm, items = job
            if scan_id not in begun:
                begun.add(scan_id)
                for _, p in plugins:
                    p.begin(Scan(scan_id))
            if items is not None:
                self.process(asm, plugins, scan_id, items)
            else:
                self.close_scan(lane, asm, plugins, scan_id, w)
                begun.discard(scan_id)

    def next_job(self, lane: _Lane):
        """(scan, assembler, items) to process, (scan, assembler or None, None) to close a scan, None to stop."""
        with lane.cond:
            waited = False
            while not self.stopping:
                if lane.flushes:
                    scan_id = lane.flushes.pop(0)
                    lane.closed.add(scan_id)
                    asm = lane.assemblers.pop(scan_id, None)
                    if asm is not None:
                        asm.flush()
                        lane.ready -= len(asm.ready)
                    lane.cond.notify_all()
                    return scan_id, asm, None
                for scan_id, asm in lane.assemblers.items():
                    # A full batch, or after a quiet spell whatever is complete: slow streams move too.
                    items = asm.take(force=False) or (asm.take(force=True) if waited and asm.ready else None)
                    if items:
                        lane.ready -= len(items)
                        lane.cond.notify_all()  # room for receivers held on READY_MAX
                        return scan_id, asm, items
                waited = not lane.cond.wait(PARTIAL_AFTER)
            return None

    def process(self, asm: Assembler, plugins, scan_id: int, items) -> None:
        batch = Batch(Scan(scan_id), headers=[it.header for it in items], stack=lambda: asm.stack(items))
        for _, p in plugins:
            p.process(batch)

    def close_scan(self, lane: _Lane, asm: Assembler | None, plugins, scan_id: int, w: int) -> None:
        spec = self.spec
        result = {"complete": 0, "incomplete": 0, "missing_parts": {}, "analyses": {}, "results": {}}
        if asm is not None:  # the lane's lock is not needed: the scan is closed, no receiver adds to it
            result["missing_parts"] = {str(it.header[spec.assemble.key]): it.header["missing"]
                                       for it in asm.incomplete}
            result["seen"] = asm.seen
            while (items := asm.take(force=True)) is not None:
                self.process(asm, plugins, scan_id, items)
            result["complete"], result["incomplete"] = asm.done_complete, asm.done_incomplete
        for name, p in plugins:
            result["analyses"][name] = p.finish(Scan(scan_id)) or {}
            result["results"][name] = p.results(Scan(scan_id))
        result["processed"] = time.time()
        self.results.put((scan_id, w, result))

    # -- the scan's end ------------------------------------------------------------------------
    def check_scans(self) -> None:
        now = time.monotonic()
        with self.lock:
            open_scans = [s for s in self.scans.values() if s.id not in self.finished]
        meter = self.meter
        meter.queue = sum(lane.ready for lane in self.lanes)
        if open_scans:
            meter.state, meter.scan = "streaming", open_scans[-1].id
        for st in open_scans:
            received = st.received
            meter.scans[st.id] = {"received": received, "expected": st.expected if st.infos >= self.senders else None,
                                  "infos": st.infos, "senders": self.senders}
            complete = st.infos >= self.senders and received >= st.expected
            quiet = now - st.last > self.spec.scan_timeout
            if complete or quiet:
                self.finish(st, timed_out=not complete)

    def finish(self, st: _ScanState, timed_out: bool) -> None:
        rt, spec = self.rt, self.spec
        self.finished.add(st.id)
        rec = rt.kv.get(scans.key(st.id)) or {}
        ngs = rec.get("node_groups", [rt.replica])
        if timed_out:
            log.warning("%s: scan %d went quiet for %.1f s with %d of %s messages and %d of %d counts; "
                        "finishing it with what arrived", self.label, st.id, spec.scan_timeout,
                        st.received, st.expected if st.infos >= self.senders else "?", st.infos, self.senders)
        if ngs and ngs[0] == rt.replica:
            scans.update(rt.kv, st.id, status="processing")
        self.meter.state = "processing"
        for lane in self.lanes:
            with lane.cond:
                lane.flushes.append(st.id)
                lane.cond.notify_all()
        parts = [self.results.get() for _ in range(spec.workers)]
        report = scans.empty_report(self.label)
        report.update(expected=st.expected, received=st.received, timed_out=timed_out,
                      infos=st.infos, senders=self.senders, bytes=st.bytes, first_received=st.first_received,
                      flow={"held": st.held, "overrides": st.overrides, "max_pending": st.max_pending},
                      processed=max(r["processed"] for _, _, r in parts))
        keys = (rec.get("meta") or {}).get("keys")
        seen = KeySet(tuple(keys) if keys else None)
        for _, _, r in parts:
            report["complete"] += r["complete"]
            report["incomplete"] += r["incomplete"]
            report["missing_parts"].update(r["missing_parts"])
            if r.get("seen") is not None:
                seen.merge(r["seen"])
            for name, figures in r["analyses"].items():
                scans.merge_figures(report["analyses"].setdefault(name, {}), figures)
        report["missing_items"] = self.missing_items(rec, ngs, seen)
        report["rejected"] = self.rejects.count
        mine = {name: [r["results"][name] for _, _, r in parts if r["results"].get(name) is not None]
                for name, _, _ in self.analyses}
        gathered = self.gather.collect(st.id, ngs or [rt.replica], mine) if self.writes else None
        self.messages += report["received"]
        rt.kv.set(f"scans/{st.id}/report/{rt.replica}", report)
        self.meter.scans[st.id] = {"received": report["received"], "expected": report["expected"], "done": True}
        self.meter.state = "idle"
        if ngs and ngs[0] == rt.replica:
            self.total(st.id, ngs, rec, gathered)

    def missing_items(self, rec: dict, ngs: list[int], seen: KeySet) -> list[int]:
        """Items of our share that never showed a single part, when the source said which keys to expect."""
        keys = (rec.get("meta") or {}).get("keys")
        if not keys or self.rt.replica not in ngs:
            return []
        first, count = keys
        n, me = len(ngs), ngs.index(self.rt.replica)
        return [k for k in range(first, first + count) if k % n == me and k not in seen]

    def total(self, scan_id: int, ngs: list[int], rec: dict, gathered) -> None:
        """The scan's first node group adds up every node group's report and closes the scan."""
        rt = self.rt
        prefix = f"scans/{scan_id}/report/"
        try:
            reports = rt.kv.wait(lambda items: len(items) >= len(ngs), prefix=prefix,
                                 timeout=self.spec.scan_timeout * 2 + 10)
        except TimeoutError:
            reports = rt.kv.items(prefix)
            log.warning("%s: scan %d: only %d of %d node groups reported", self.label, scan_id, len(reports), len(ngs))
        total = scans.add_reports([reports[k] for k in sorted(reports)])
        seconds = time.time() - rec.get("started", time.time())
        total["seconds"] = seconds
        first = flow.first_sent(rt.kv, scan_id) or total.get("first_received")
        if first and total.get("processed"):  # first message sent to last item processed: the stream's own time
            total["streaming_seconds"] = total["processed"] - first
        total["outputs"] = {}
        if gathered:
            scans.update(rt.kv, scan_id, status="writing")
            self.meter.state = "writing"
            for name, cls, _ in self.analyses:
                out = cls.write(Scan(scan_id, rec.get("meta") or {}), gathered.get(name, []), total, rt.output_dir)
                if out:
                    total["outputs"][name] = out
        path = scans.write_json(os.path.join(rt.output_dir, f"scan_{scan_id}_report.json"), total)
        outputs = "".join(f"; {name} wrote {out}" for name, out in total["outputs"].items())
        scans.update(rt.kv, scan_id, status="done", report_file=path, ok=total["ok"], outputs=total["outputs"],
                     expected=total["expected"], received=total["received"], complete=total["complete"],
                     incomplete=total["incomplete"], lost_parts=total["lost_parts"],
                     summary=scans.summary_line(scan_id, total, seconds) + outputs, finished=time.time())
        log.info("%s", scans.summary_line(scan_id, total, seconds))

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> dict:
        spec = self.spec

        def guarded(fn, *args):
            try:
                fn(*args)
            except BaseException as exc:
                self.errors.append(exc)
                self.rt.stop.set()

        workers = [threading.Thread(target=guarded, args=(self.work, w), name=f"work-{w}", daemon=True)
                   for w in range(spec.workers)]
        receivers = [threading.Thread(target=guarded, args=(self.receive,), name="recv", daemon=True)]
        for th in (*workers, *receivers):
            th.start()
        try:
            while not self.rt.stop.is_set():
                self.check_scans()
                if all(not th.is_alive() for th in receivers):
                    self.check_scans()
                    with self.lock:
                        still_open = [s for s in self.scans.values() if s.id not in self.finished]
                    if not still_open:
                        break
                time.sleep(0.02)
        finally:
            self.stopping = True
            for lane in self.lanes:
                with lane.cond:
                    lane.cond.notify_all()
            for th in (*receivers, *workers):
                th.join(timeout=5.0)
        if self.errors:
            raise self.errors[0]
        if self.rt.stop.is_set():
            raise InterruptedError("stopped")
        return {"scans": len(self.finished), "messages": self.messages, "bytes": sum(st.bytes for st in self.scans.values()),
                "rejected": self.rejects.count}
