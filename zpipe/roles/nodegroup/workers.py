"""The node group's workers: each takes batches of items from its lane and runs the analyses on them, scan by scan.

Scans never mix in an analysis: a worker gives each scan its own set of analysis instances,
from `begin` to `finish` and `results`, and hands a set back for reuse only once that scan is
finished (a worker with two scans open at once has two sets). A hook that raises is reported
once (analysis, hook, scan, traceback); that analysis is marked failed for the scan and skipped
for the rest of it, its instance is discarded, and the other analyses and the scan's account go
on. So a worker always finishes every scan it is given, and the node group never waits on it
forever.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import inspect

import numpy as np

from zpipe import catalog, codec
from zpipe.assemble import Assembler
from zpipe.plugin import Analysis, Batch, Context, Scan
from zpipe.results import ResultBuffers
from zpipe.roles.nodegroup.receive import Lane

log = logging.getLogger("zpipe.nodegroup")
PARTIAL_AFTER = 0.05  # seconds a worker waits for a full batch before it takes fewer (slow streams)


@dataclass
class AnalysisSpec:
    """One analysis of the node group as the workers run it: its name (unique in the node group), class, params."""

    name: str
    cls: type
    params: Any
    writes: bool  # its results meet at the scan's writer: it declares buffers, or writes a file of its own
    takes_out: bool  # its `process` takes the buffers (`process(batch, out)`)

    def make(self):
        """An instance with its params and its name (as `write` runs on, with no setup)."""
        p = self.cls(self.params)
        p.name = self.name
        return p


def analysis_specs(spec) -> list[AnalysisSpec]:
    out = []
    for a in spec.analyses:
        cls = catalog.get(a.plugin)
        name = getattr(a, "name", None) or a.plugin  # distinct in a node group (zpipe validate checks it)
        writes = cls.write is not Analysis.write or cls.buffers is not Analysis.buffers
        try:
            takes_out = len(inspect.signature(cls.process).parameters) >= 3
        except (TypeError, ValueError):
            takes_out = False
        out.append(AnalysisSpec(name, cls, cls.Params.model_validate(a.params), writes, takes_out))
    return out


def checked(value: Any) -> Any:
    """`results` as it will travel (zpipe.codec), or TypeError/ValueError saying what cannot."""
    codec.encode(value)
    return value


def travels(value: Any, *, arrays_ok: bool) -> Any:
    """`value` as it can cross processes (msgpack): None or a dict of str keys; numpy scalars become
    Python numbers; nested values plain. Arrays only at the top level of results. Else TypeError."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"a {type(value).__name__}, where a dict of str keys (or None) goes")

    def plain(v: Any, depth: int = 0) -> Any:
        if depth > 32:
            raise ValueError("a value nested more than 32 deep")
        if isinstance(v, np.generic):
            return v.item()
        if v is None or isinstance(v, (bool, int, float, str, bytes)):
            if isinstance(v, int) and not -2**63 <= v < 2**64:
                raise ValueError(f"an integer of {v.bit_length()} bits")
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x, depth + 1) for x in v]
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {k: plain(x, depth + 1) for k, x in v.items()}
        raise TypeError(f"a {type(v).__name__} that cannot travel between processes")

    return {k: v if arrays_ok and isinstance(v, np.ndarray) else plain(v) for k, v in value.items()}


@dataclass
class Failure:
    analysis: str
    hook: str
    scan: int | None
    error: str
    traceback: str

    def summary(self) -> dict[str, Any]:
        return {"hook": self.hook, "scan": self.scan, "error": self.error, "traceback": self.traceback[-4000:]}


@dataclass
class _Set:
    """One instance per analysis, for one scan at a time; None where the analysis failed."""

    instances: list
    failures: dict = field(default_factory=dict)  # analysis name -> Failure (for the current scan)
    buffers: dict = field(default_factory=dict)  # analysis name -> ResultBuffers (for the current scan)


class Workers:
    def __init__(self, group):
        self.group = group
        self.rt, self.spec = group.rt, group.rt.spec
        self.lanes: list[Lane] = group.lanes
        self.analyses = group.analyses
        self.run_token = f"{self.rt.label}@{id(group):x}"
        self.live: dict[tuple[int, int], dict] = {}  # (scan, worker) -> its buffers, read for previews

    # -- one worker thread ---------------------------------------------------------------------------
    def work(self, w: int) -> None:
        lane = self.lanes[w]
        spare: list[_Set] = []
        active: dict[int, _Set] = {}
        while True:
            job = self.next_job(lane)
            if job is None:
                return
            scan_id, asm, items = job
            scan = Scan(scan_id, dict(self.group.meta_of(scan_id)))
            aset = active.get(scan_id)
            if aset is None:
                aset = active[scan_id] = spare.pop() if spare else self.make_set(w)
                self.begin(aset, scan, asm)
                self.live[(scan_id, w)] = aset.buffers
            if items is not None:
                self.process(asm, aset, scan, items)
            else:
                result = self.close(asm, aset, scan, w)
                self.live.pop((scan_id, w), None)
                del active[scan_id]
                if not aset.failures:
                    spare.append(aset)
                self.group.worker_done(scan_id, w, result)

    def make_set(self, w: int) -> _Set:
        aset = _Set([])
        for i, a in enumerate(self.analyses):
            ctx = Context(self.rt.name, self.rt.replica, self.spec.replicas, w, self.spec.workers, self.rt.host,
                          self.rt.output_dir, analysis=a.name, run=self.run_token)
            try:
                p = a.make()
                p.setup(ctx)
            except Exception as exc:
                aset.instances.append(None)
                aset.failures[a.name] = self.failed(a.name, "setup", None, exc)
                continue
            aset.instances.append(p)
        return aset

    def failed(self, name: str, hook: str, scan: int | None, exc: BaseException) -> Failure:
        tb = traceback.format_exc()
        f = Failure(name, hook, scan, f"{exc.__class__.__name__}: {exc}"[:500], tb)
        self.rt.meter.errors += 1
        log.error("%s: analysis %r failed in %s%s; it is marked failed for the scan, the others go on:\n%s",
                  self.rt.label, name, hook, f" (scan {scan})" if scan is not None else "", tb.rstrip())
        return f

    def call_all(self, aset: _Set, hook: str, scan: Scan, *args) -> dict[str, Any]:
        """Call `hook` on every analysis still standing; a failure takes that one out for the scan."""
        out = {}
        for i, a in enumerate(self.analyses):
            p = aset.instances[i]
            if p is None or a.name in aset.failures:
                continue
            try:
                out[a.name] = getattr(p, hook)(*args)
            except Exception as exc:
                aset.failures[a.name] = self.failed(a.name, hook, scan.id, exc)
                aset.instances[i] = None  # its state is suspect: a fresh instance for the next scan
        return out

    def begin(self, aset: _Set, scan: Scan, asm: Assembler | None) -> None:
        """`begin`, and the buffers each analysis declares for the scan, allocated (zeros)."""
        aset.buffers = {}
        geometry = scan.geometry
        item_shape = asm.item_shape if asm is not None else self.item_shape()
        declared = self.call_all(aset, "buffers", scan, scan)
        for i, a in enumerate(self.analyses):
            decl = declared.get(a.name)
            if not decl:
                continue
            try:
                if not isinstance(decl, dict):
                    raise TypeError(f"buffers() returned a {type(decl).__name__}, not a dict of buffers")
                aset.buffers[a.name] = ResultBuffers(decl, geometry.positions_count if geometry else None, item_shape)
            except (TypeError, ValueError) as exc:
                aset.failures[a.name] = self.failed(a.name, "buffers", scan.id, exc)
                aset.instances[i] = None
        self.call_all(aset, "begin", scan, scan)

    def item_shape(self) -> tuple[int, ...]:
        asm = self.spec.assemble
        return (asm.parts * asm.shape[0], *asm.shape[1:])

    def process(self, asm: Assembler, aset: _Set, scan: Scan, items) -> None:
        batch = Batch(scan, headers=[it.header for it in items], stack=lambda: asm.stack(items))
        for i, a in enumerate(self.analyses):
            p = aset.instances[i]
            if p is None or a.name in aset.failures:
                continue
            bufs = aset.buffers.get(a.name)
            try:
                if bufs is None:
                    p.process(batch, None) if a.takes_out else p.process(batch)
                else:
                    out = bufs.out(len(batch))
                    p.process(batch, out) if a.takes_out else p.process(batch)
                    bufs.place(batch.positions, out)
            except Exception as exc:
                aset.failures[a.name] = self.failed(a.name, "process", scan.id, exc)
                aset.instances[i] = None

    def close(self, asm: Assembler | None, aset: _Set, scan: Scan, w: int) -> dict[str, Any]:
        """The scan's last items (the incomplete ones), then `finish` and `results`: this worker's share."""
        result: dict[str, Any] = {"complete": 0, "incomplete": 0, "missing_parts": {}, "seen": None,
                                  "analyses": {}, "results": {}}
        if asm is not None:  # the lane's lock is not needed: the scan is closed, no receiver adds to it
            result["missing_parts"] = {str(k): v for k, v in asm.missing.items()}
            result["seen"] = asm.seen
            while (items := asm.take(force=True)) is not None:
                self.process(asm, aset, scan, items)
            result["complete"], result["incomplete"] = asm.done_complete, asm.done_incomplete
        figures = self.call_all(aset, "finish", scan, scan)
        values = self.call_all(aset, "results", scan, scan)
        for hook, got in (("finish", figures), ("results", values)):
            for name, value in list(got.items()):
                try:
                    got[name] = travels(value, arrays_ok=hook == "results") if hook == "finish" else checked(value)
                except (TypeError, ValueError) as exc:
                    del got[name]
                    if name not in aset.failures:
                        aset.failures[name] = self.failed(name, hook, scan.id, TypeError(f"it returned {exc}"))
        for a in self.analyses:
            entry: dict[str, Any] = {"figures": figures.get(a.name) or {}, "writes": a.writes}
            if a.name in aset.failures:
                entry["failed"] = aset.failures[a.name].summary()
            result["analyses"][a.name] = entry
            if a.writes and a.name not in aset.failures:
                bufs = aset.buffers.get(a.name)
                result["results"][a.name] = {"buffers": bufs, "parts": [] if values.get(a.name) is None
                                             else [values[a.name]]}
        aset.buffers = {}
        if aset.failures:
            # A set with a failure is not reused; failures of `setup` mean the analysis never ran.
            for i, a in enumerate(self.analyses):
                if a.name in aset.failures:
                    aset.instances[i] = None
        result["processed"] = time.time()
        return result

    # -- what a worker does next ---------------------------------------------------------------------
    def next_job(self, lane: Lane):
        """(scan, assembler, items) to process, (scan, assembler or None, None) to close a scan, None to stop."""
        with lane.cond:
            waited = False
            while not self.group.stopping:
                if lane.flushes:
                    scan_id = lane.flushes.pop(0)
                    lane.closed.add(scan_id)
                    asm = lane.assemblers.pop(scan_id, None)
                    if asm is not None:
                        lane.ready -= len(asm.ready) + len(asm.incomplete)  # what was counted as ready
                        asm.flush()
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
