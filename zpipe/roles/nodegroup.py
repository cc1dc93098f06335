"""The node group role: receive parts, assemble items, run the analyses, and account for every scan.

Receiver threads (one socket each, 1:1 with upstream sending threads) hand parts to
worker threads by item key, through bounded queues, so a slow analysis slows the senders
instead of growing memory. A scan ends when every upstream sender's expected count has
arrived and as many messages came in, or, if that never happens, `scan_timeout` seconds
after the scan went quiet; either way the incomplete items are processed too, and the
report names what is missing.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import msgpack
import zmq

from zpipe import catalog, flow, scan as scans
from zpipe.assemble import Assembler, KeySet
from zpipe.gather import MpiGather, ZmqGather
from zpipe.plugin import Analysis, Batch, Context, Scan
from zpipe.roles.aggregator import Rejects
from zpipe.runtime import NodeRuntime
from zpipe.wire import BadMessage

log = logging.getLogger("zpipe.nodegroup")
QUEUE_DEPTH = 256  # parts waiting per worker; with the sockets' HWM this bounds memory
# Frames a worker may hold waiting for their other parts. A receiver about to start one more
# waits (holding its socket, so the HWM pushes back on the sector that runs ahead) until the
# slower sectors catch up; after FLOW_TIMEOUT it goes on anyway, so a dead stream cannot stall it.
IN_FLIGHT = 192
FLOW_TIMEOUT = 2.0
FLOW_STALL = 0.01  # seconds the worker may sit idle before a held receiver goes on
DRAIN = 256


@dataclass
class _ScanState:
    id: int
    infos: int = 0
    expected: int = 0
    last: float = field(default_factory=time.monotonic)
    received: list[int] = field(default_factory=list)  # per receiver thread, written only by it


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
        self.meter.queue_max = QUEUE_DEPTH * rt.spec.workers
        self.queues = [queue.Queue(QUEUE_DEPTH) for _ in range(self.spec.workers)]
        self.assemblers: list[dict[int, Assembler]] = [{} for _ in range(self.spec.workers)]  # per worker, by scan
        self.in_flight = [0] * self.spec.workers  # frames each worker holds waiting for parts
        self.lagging = [0] * self.spec.workers  # bit mask: parts the oldest frames in flight wait for
        self.results: queue.Queue = queue.Queue()
        self.scans: dict[int, _ScanState] = {}
        self.finished: set[int] = set()
        self.unknown: dict[int, float] = {}  # scan id -> when we last found no record for it
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.ends = [0] * self.spec.threads
        self.bytes = [0] * self.spec.threads  # per receiver thread, written only by it
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
                st = self.scans[scan_id] = _ScanState(scan_id, received=[0] * self.spec.threads)
            return st

    def receive(self, t: int) -> None:
        sock = self.rt.bind_per_thread(self.in_name, t)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        key = self.spec.assemble.key
        workers = self.spec.workers
        try:
            while self.ends[t] < self.per_thread[t] and not self.rt.stop.is_set():
                if not poller.poll(100):
                    continue
                for _ in range(DRAIN):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.take(t, frames, key, workers)
        finally:
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

    def take(self, t: int, frames, key: str, workers: int) -> None:
        try:
            header = msgpack.unpackb(frames[0].buffer, raw=False)
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
        if scan_id not in self.scans and not self.known(scan_id):
            self.rejects.add(f"unknown scan {scan_id} (no record at {scans.key(scan_id)})", sender)
            return
        st = self.state(scan_id)
        st.last = time.monotonic()
        if kind == "info":
            with self.lock:
                st.infos += 1
                st.expected += int(header["expected"])
            return
        if len(frames) != 2:
            self.rejects.add(f"expected 2 frames (header, payload), got {len(frames)}", sender)
            st.received[t] += 1  # it was sent and counted upstream: it arrived, it was just bad
            return
        try:
            w = int(header[key]) % workers
        except (KeyError, TypeError, ValueError):
            self.rejects.add(f"header has no integer {key!r}", sender)
            st.received[t] += 1
            return
        self.hold_new_items(w, scan_id, header.get(key), header.get(self.spec.assemble.part), st)
        self.put(w, ("part", scan_id, header, frames[1]), st)
        st.received[t] += 1  # after the put: once counts add up, every part is in a queue
        nbytes = len(frames[1])
        self.bytes[t] += nbytes
        self.meter.msgs_in += 1
        self.meter.bytes_in += nbytes

    def hold_new_items(self, w: int, scan_id: int, key, part, st: _ScanState) -> None:
        """Flow control across sectors: do not start a new frame while too many wait for parts."""
        asm = self.assemblers[w].get(scan_id)
        if asm is not None and key in asm.pending:
            return  # this part completes a frame in flight: always welcome
        if isinstance(part, int) and (self.lagging[w] >> part) & 1:
            return  # frames in flight wait for this very sector: it is behind, not ahead
        waited = idle = 0.0
        while self.in_flight[w] + self.queues[w].qsize() >= IN_FLIGHT:
            # Waiting only helps while the worker has parts to take: if it sits idle, the parts
            # it needs are behind held messages (two producer threads share a sector's socket),
            # so go on rather than deadlock. FLOW_TIMEOUT caps the wait whatever happens.
            idle = idle + 0.002 if self.queues[w].qsize() == 0 else 0.0
            if waited >= FLOW_TIMEOUT or idle >= FLOW_STALL:
                self.meter.flow_overrides += 1
                return
            if self.rt.stop.is_set():
                raise InterruptedError("stopped")
            time.sleep(0.002)
            waited += 0.002
            self.meter.blocked_s += 0.002
            st.last = time.monotonic()  # held back, not quiet

    def put(self, w: int, item, st: _ScanState | None = None) -> None:
        while True:
            try:
                self.queues[w].put(item, timeout=0.1)
                return
            except queue.Full:
                self.meter.blocked_s += 0.1
                if self.rt.stop.is_set():
                    raise InterruptedError("stopped") from None
                if st is not None:
                    st.last = time.monotonic()  # busy, not quiet: the workers are behind

    # -- working -------------------------------------------------------------------------------
    def work(self, w: int) -> None:
        spec = self.spec
        ctx = Context(self.rt.name, self.rt.replica, spec.replicas, w, spec.workers, self.rt.host, self.rt.output_dir)
        plugins: list[tuple[str, Analysis]] = []
        for name, cls, params in self.analyses:
            p = cls(cls.Params.model_validate(params))
            p.setup(ctx)
            plugins.append((name, p))
        assemblers: dict[int, Assembler] = self.assemblers[w]
        q = self.queues[w]
        while True:
            item = q.get()
            if item is None:
                return
            if item[0] == "part":
                _, scan_id, header, frame = item
                asm = assemblers.get(scan_id)
                if asm is None:
                    keys = ((self.rt.kv.get(scans.key(scan_id)) or {}).get("meta") or {}).get("keys")
                    asm = assemblers[scan_id] = Assembler(spec.assemble, spec.batch, key_range=tuple(keys) if keys else None)
                    for _, p in plugins:
                        p.begin(Scan(scan_id))
                try:
                    asm.add(header, frame.buffer)
                except BadMessage as exc:
                    self.rejects.add(str(exc), str(header.get("sender", "unknown sender")))
                    continue
                self.in_flight[w] = sum(len(a.pending) for a in assemblers.values())
                self.lagging[w] = asm.lagging() if self.in_flight[w] >= IN_FLIGHT // 2 else 0
                self.run_batches(asm, plugins, scan_id, force=False)
            elif item[0] == "flush":
                scan_id = item[1]
                asm = assemblers.pop(scan_id, None)
                result = {"complete": 0, "incomplete": 0, "missing_parts": {}, "analyses": {}}
                if asm is not None:
                    asm.flush()
                    result["missing_parts"] = {str(it.header[spec.assemble.key]): it.header["missing"]
                                               for it in asm.incomplete}
                    result["seen"] = asm.seen
                    self.run_batches(asm, plugins, scan_id, force=True)
                    result["complete"], result["incomplete"] = asm.done_complete, asm.done_incomplete
                result["results"] = {}
                for name, p in plugins:
                    result["analyses"][name] = p.finish(Scan(scan_id)) or {}
                    result["results"][name] = p.results(Scan(scan_id))
                self.in_flight[w] = sum(len(a.pending) for a in assemblers.values())
                self.results.put((scan_id, w, result))

    def run_batches(self, asm: Assembler, plugins, scan_id: int, force: bool) -> None:
        while (taken := asm.take(force)) is not None:
            data, headers = taken
            batch = Batch(Scan(scan_id), data, headers)
            for _, p in plugins:
                p.process(batch)

    # -- the scan's end ------------------------------------------------------------------------
    def check_scans(self) -> None:
        now = time.monotonic()
        with self.lock:
            open_scans = [s for s in self.scans.values() if s.id not in self.finished]
        meter = self.meter
        meter.queue = sum(q.qsize() for q in self.queues)
        if open_scans:
            meter.state, meter.scan = "streaming", open_scans[-1].id
        for st in open_scans:
            received = sum(st.received)
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
                        sum(st.received), st.expected if st.infos >= self.senders else "?", st.infos, self.senders)
        if ngs and ngs[0] == rt.replica:
            scans.update(rt.kv, st.id, status="processing")
        self.meter.state = "processing"
        for w in range(spec.workers):
            self.put(w, ("flush", st.id))
        parts = [self.results.get() for _ in range(spec.workers)]
        report = scans.empty_report(self.label)
        report.update(expected=st.expected, received=sum(st.received), timed_out=timed_out,
                      infos=st.infos, senders=self.senders)
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
        receivers = [threading.Thread(target=guarded, args=(self.receive, t), name=f"recv-{t}", daemon=True)
                     for t in range(spec.threads)]
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
            for w in range(spec.workers):
                try:
                    self.queues[w].put(None, timeout=1.0)
                except queue.Full:
                    pass
            for th in (*receivers, *workers):
                th.join(timeout=5.0)
        if self.errors:
            raise self.errors[0]
        if self.rt.stop.is_set():
            raise InterruptedError("stopped")
        return {"scans": len(self.finished), "messages": self.messages, "bytes": sum(self.bytes),
                "rejected": self.rejects.count}
