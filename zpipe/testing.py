"""Test a plugin in-process, without sockets or processes: the same calls the roles make, in the same order.

    from zpipe.testing import run_source, run_stage
    msgs = run_source(CounterSource, {"messages": 10})
    result = run_stage(ChecksumSink, {}, msgs)
    assert result.finished[1]["messages"] == 10
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from zpipe.plugin import Analysis, Context, Message, Plugin, Scan, ScanResults, Source, Stage


def make(cls: type[Plugin], params: Mapping[str, Any] | None = None, ctx: Context | None = None) -> Plugin:
    """Validate `params` through the plugin's own model (as `zpipe validate` does) and set it up."""
    plugin = cls(cls.Params.model_validate(dict(params or {})))
    plugin.setup(ctx or Context(node="test"))
    return plugin


def run_source(cls: type[Source], params: Mapping[str, Any] | None = None, *, threads: int = 1,
               ctx: Context | None = None) -> list[Message]:
    """Every message of every scan, as the source role would send them (threads in order)."""
    plugin = make(cls, params, ctx)
    out: list[Message] = []
    for scan in plugin.scans():
        for t in range(threads):
            out.extend(plugin.messages(scan, t, threads))
    return out


@dataclass
class StageResult:
    outputs: list[Message] = field(default_factory=list)
    finished: dict[int, dict[str, Any] | None] = field(default_factory=dict)


def run_stage(cls: type[Stage], params: Mapping[str, Any] | None, messages: Iterable[Message], *,
              batch: int = 64, ctx: Context | None = None) -> StageResult:
    """Feed `messages` in batches, grouped by their header's `scan`; finish each scan at the end."""
    plugin = make(cls, params, ctx)
    result = StageResult()
    by_scan: dict[int, list[Message]] = {}
    for m in messages:
        by_scan.setdefault(int(m.header.get("scan", 0)), []).append(m)
    for scan_id, msgs in by_scan.items():
        scan = Scan(scan_id)
        plugin.begin(scan)
        for i in range(0, len(msgs), batch):
            result.outputs.extend(plugin.process(msgs[i:i + batch]) or ())
        result.finished[scan_id] = plugin.finish(scan)
    return result


# -- analyses ---------------------------------------------------------------------------------------
@dataclass
class ScanOutcome:
    """One scan as `run_analysis` saw it end: what the scan's account and its output would hold."""

    figures: dict[str, Any]  # `finish` figures, added up over workers and node groups
    buffers: dict[str, Any]  # the merged buffers, unreceived positions NaN (float buffers)
    received: Any  # bool per position, or None
    parts: list[Any]  # every worker's `results`
    output: str | None = None  # what `write` wrote (with `output_dir`)
    failed: dict[str, Any] | None = None  # hook, scan, error, traceback, if the analysis failed


def run_analysis(cls, params: Mapping[str, Any] | None = None, frames=None, *, scans: int = 1,
                 parts: int = 2, workers: int = 2, node_groups: int = 2, batch: int = 4, drop=(),
                 interleave: bool = True, output_dir: str | None = None, name: str | None = None,
                 meta: Mapping[str, Any] | None = None) -> dict[int, ScanOutcome]:
    """Run an analysis as node groups run it, in this process: the real workers, lanes, assembly and
    merges, no sockets. Returns each scan's outcome, by scan id (1, 2, ...).

    `frames` has the scan's shape first, then the item's: (positions..., rows, cols) (a 4-D array for
    a 2-D scan). Each item is cut into `parts` row bands that are put back together like sectors,
    items are spread over `node_groups` (key mod n) and their `workers`, in batches of `batch`;
    `drop` names parts lost upstream, as (item index, part) pairs, or whole items, as an int. With
    several `scans`, their parts arrive interleaved. The node groups' results cross between them
    through the codec, as over ZeroMQ or MPI.
    """
    import threading

    import numpy as np

    from zpipe import codec
    from zpipe.geometry import Geometry
    from zpipe.roles.nodegroup import merged
    from zpipe.roles.nodegroup.receive import Lane
    from zpipe.roles.nodegroup.workers import AnalysisSpec, Workers
    from zpipe.scans.account import merge_figures
    from zpipe.status import Meter
    from zpipe.topology.model import AssembleSpec

    frames = np.asarray(frames)
    if frames.ndim < 3:
        raise ValueError("frames: the scan's shape, then each item's (rows, cols)")
    scan_shape, item_shape = frames.shape[:-2], frames.shape[-2:]
    if item_shape[0] % parts:
        raise ValueError(f"{item_shape[0]} rows do not split into {parts} parts")
    items = frames.reshape(-1, *item_shape)
    rows = item_shape[0] // parts
    assemble = AssembleSpec(key="key", part="part", parts=parts, shape=(rows, item_shape[1]), dtype=frames.dtype.str)
    geometry = Geometry(tuple(int(n) for n in scan_shape), first=0, key="key")
    scan_meta = {**dict(meta or {}), "geometry": geometry.meta(), "keys": [0, len(items)]}
    node_spec = SimpleNamespace(workers=workers, replicas=node_groups, batch=batch, assemble=assemble,
                                analyses=[SimpleNamespace(plugin="analysis", params=dict(params or {}), name=name)])
    validated = cls.Params.model_validate(dict(params or {}))
    import inspect

    spec = AnalysisSpec(name or getattr(cls, "__name__", "analysis").lower(), cls, validated,
                        cls.write is not Analysis.write or cls.buffers is not Analysis.buffers,
                        len(inspect.signature(cls.process).parameters) >= 3)
    dropped_items = {d for d in drop if isinstance(d, int)}
    dropped_parts = {tuple(d) for d in drop if not isinstance(d, int)}

    groups = []
    for g in range(node_groups):
        rt = SimpleNamespace(name="nodegroup", replica=g, label=f"nodegroup[{g}]", host="localhost",
                             output_dir=output_dir or ".", spec=node_spec,
                             meter=Meter("nodegroup", g, "nodegroup", "localhost", 0))
        group = _Group(rt, [Lane() for _ in range(workers)], [spec], scan_meta)
        group.workers = Workers(group)
        group.threads = [threading.Thread(target=group.workers.work, args=(w,), daemon=True) for w in range(workers)]
        for th in group.threads:
            th.start()
        groups.append(group)

    from zpipe.assemble import Assembler

    def feed(scan_id: int, index: int) -> None:
        if index in dropped_items:
            return
        g = index % node_groups
        lane = groups[g].lanes[(index // node_groups) % workers]
        for p in range(parts):
            if (index, p) in dropped_parts:
                continue
            payload = np.ascontiguousarray(items[index, p * rows:(p + 1) * rows])
            with lane.cond:
                asm = lane.assemblers.get(scan_id)
                if asm is None:
                    asm = lane.assemblers[scan_id] = Assembler(assemble, batch, key_range=(0, len(items)))
                if asm.add({"key": index, "part": p}, payload.view(np.uint8).reshape(-1)):
                    lane.ready += 1
                    lane.cond.notify_all()

    order = [(s, i) for i in range(len(items)) for s in range(1, scans + 1)] if interleave else \
        [(s, i) for s in range(1, scans + 1) for i in range(len(items))]
    for s, i in order:
        feed(s, i)
    outcomes: dict[int, ScanOutcome] = {}
    try:
        for s in range(1, scans + 1):
            shares = []
            figures: dict[str, Any] = {}
            failed = None
            for group in groups:
                for lane in group.lanes:
                    with lane.cond:
                        lane.flushes.append(s)
                        lane.cond.notify_all()
                results = group.wait(s)
                entries = []
                for r in results.values():
                    a = r["analyses"].get(spec.name, {})
                    merge_figures(figures, a.get("figures") or {})
                    failed = failed or a.get("failed")
                    if spec.name in r["results"]:
                        entries.append(r["results"][spec.name])
                mine = merged(entries)
                share = {"buffers": mine["buffers"].share() if mine["buffers"] else None, "parts": mine["parts"]}
                shares.append(codec.decode([bytes(f) for f in codec.encode(share)]))  # as it crosses node groups
            res = merged(shares)
            bufs = res["buffers"]
            scan = Scan(s, dict(scan_meta))
            results_obj = ScanResults(scan, dict(bufs.arrays) if bufs else {}, bufs.received if bufs else None,
                                      res["parts"])
            output = None
            if output_dir is not None and spec.writes and not failed:
                output = spec.make().write(scan, results_obj, {"scan": s, "analyses": {spec.name: figures}}, output_dir)
            outcomes[s] = ScanOutcome(figures, results_obj.filled(), results_obj.received, res["parts"], output, failed)
    finally:
        for group in groups:
            group.stopping = True
            for lane in group.lanes:
                with lane.cond:
                    lane.cond.notify_all()
    return outcomes


class _Group:
    """What Workers needs of a node group, in process (the real lanes, assembly and worker loop)."""

    def __init__(self, rt, lanes, analyses, meta):
        import threading

        self.rt, self.lanes, self.analyses, self._meta = rt, lanes, analyses, meta
        self.stopping = False
        self._results: dict[int, dict[int, dict]] = {}
        self._cond = threading.Condition()

    def meta_of(self, scan: int) -> dict:
        return self._meta

    def worker_done(self, scan: int, w: int, result: dict) -> None:
        with self._cond:
            self._results.setdefault(scan, {})[w] = result
            self._cond.notify_all()

    def wait(self, scan: int, timeout: float = 60.0) -> dict[int, dict]:
        import time

        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._results.get(scan, {})) < len(self.lanes):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"scan {scan}: the workers did not finish it in {timeout:g} s")
                self._cond.wait(0.1)
            return self._results.pop(scan)
