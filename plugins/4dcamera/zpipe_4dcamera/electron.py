"""Electron counting as a node-group analysis: stempy's events, with one set of thresholds per scan."""

# How the workers of a node group agree on the thresholds
# -------------------------------------------------------
# A node group runs one instance per worker thread, all in one process. Instances with the same
# node, replica and parameters join one `_Group` (a process-wide registry, found in `setup`).
# For each scan the group keeps a `_SharedScan` holding a pool of `number_of_samples` frames:
# * Until the thresholds exist, every worker copies its complete frames into the pool, first
#   come first served, and keeps the pool slots it filled as frames it still has to count.
# * The worker that fills the last slot computes the thresholds (under the scan's lock; the
#   others only need that lock while they are still sampling), and every worker then counts its
#   own pooled frames and everything after them.
# * Fewer complete frames than `number_of_samples`: a worker declares itself done sampling at its
#   first incomplete frame (the assembler hands those out only after all complete ones) or at
#   `finish`. When all `ctx.threads` workers have, the thresholds come from the partial pool.
#   Only then does a worker wait for others, and the others never wait for it, so this cannot
#   deadlock; `wait_s` bounds the wait in case a worker died (then the pool as it stands is used).
# So a process never holds more than `number_of_samples` uncounted frames per scan (800 MB at
# the production 1200), and never blocks a worker that still has complete frames to offer.
#
# What the sample is: the first `number_of_samples` complete frames to reach this process. With
# one worker and frames in order, those are the scan's first complete frames; with several,
# which ones depends on thread timing, so computed thresholds can differ between runs in the
# last digits, as stempy's own (random) sample does. Node groups in other processes sample their
# own frames and compute their own thresholds, close but not equal. For results identical
# everywhere and every time, put `background_threshold` and `xray_threshold` in the topology.

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from zpipe.plugin import Analysis, Batch, Context, Params, Scan, ScanResults

from . import FRAME_SHAPE
from .counting import count_frames_serial, gain_multiplier
from .hdf5 import CountedFrames
from .thresholds import calculate_thresholds

log = logging.getLogger(__name__)


class CountingParams(Params):
    """Shared by the streaming analysis and the file workflow (`filecount`), so both count alike."""

    number_of_samples: int = Field(1200, ge=1, description="complete frames sampled for the thresholds (NCEM: 1200)")
    background_threshold_n_sigma: float = Field(4.5, gt=0)
    xray_threshold_n_sigma: float = Field(175.0, gt=0)
    background_threshold: float | None = Field(None, description="fixed; with xray_threshold: no sampling")
    xray_threshold: float | None = None
    dark: str | None = Field(None, description="dark reference, a .npy file of the frame's shape")
    gain: str | None = Field(None, description="gain map as stempy takes it (frames are divided by it), .npy")
    wait_s: float = Field(300.0, gt=0, description="longest wait at a scan's end for other workers' samples")

    @model_validator(mode="after")
    def _both_or_neither(self) -> CountingParams:
        if (self.background_threshold is None) != (self.xray_threshold is None):
            raise ValueError("give both background_threshold and xray_threshold, or neither (then they are sampled)")
        return self


@dataclass(frozen=True)
class ScanThresholds:
    background: float
    xray: float
    attrs: dict[str, Any]  # /metadata/electron_counting, under stempy's names


def fixed_thresholds(p: CountingParams) -> ScanThresholds | None:
    if p.background_threshold is None:
        return None
    return ScanThresholds(p.background_threshold, p.xray_threshold,
                          {"threshold_calculated": False, "background_threshold": float(p.background_threshold),
                           "x_ray_threshold": float(p.xray_threshold)})


def sample_thresholds(frames: np.ndarray, p: CountingParams, dark, gain) -> ScanThresholds:
    t = calculate_thresholds(frames, dark, gain, p.background_threshold_n_sigma, p.xray_threshold_n_sigma)
    return ScanThresholds(t.background_threshold, t.x_ray_threshold, t.to_attrs())


def load_references(p: CountingParams) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(dark, gain factor) as the kernels take them: float32, the gain inverted as stempy does."""
    dark = None if p.dark is None else np.ascontiguousarray(np.load(p.dark), np.float32)
    gain = None if p.gain is None else gain_multiplier(np.asarray(np.load(p.gain), np.float32))
    return dark, gain


class _SharedScan:
    """One scan's threshold sample, shared by the workers of a group until the thresholds exist."""

    def __init__(self, capacity: int):
        self.cond = threading.Condition()
        self.capacity = capacity
        self.pool: np.ndarray | None = None  # allocated on first use; np.empty commits pages as filled
        self.filled = 0  # pool[:filled] holds sampled frames
        self.counted = 0  # of those, counted by the workers that pooled them: at filled, the pool goes
        self.done = 0  # workers that will offer no more complete frames
        self.finished = 0
        self.thresholds: ScanThresholds | None = None
        self.error: str | None = None


class _Group:
    """The instances of one analysis in one node group: `workers` threads of one process."""

    def __init__(self, workers: int):
        self.workers = workers
        self.lock = threading.Lock()
        self.members: dict[int, weakref.ref] = {}  # worker thread -> instance
        self.scans: dict[int, _SharedScan] = {}

    def scan(self, scan_id: int, capacity: int) -> _SharedScan:
        with self.lock:
            if scan_id not in self.scans:
                self.scans[scan_id] = _SharedScan(capacity)
            return self.scans[scan_id]

    def finished(self, scan_id: int, shared: _SharedScan) -> None:
        with self.lock:
            shared.finished += 1
            if shared.finished >= self.workers and self.scans.get(scan_id) is shared:
                del self.scans[scan_id]


_GROUPS: dict[tuple, list[_Group]] = {}
_GROUPS_LOCK = threading.Lock()


def _join(instance: ElectronCounting, ctx: Context) -> _Group:
    """The group of this node group's instances of this analysis.

    A node group names its run and the analysis (`ctx.run`, `ctx.analysis`): every instance of
    one analysis in one node group joins one group, however many each worker makes (a worker
    gives each open scan its own instance). Without them (a plugin driven by hand), the first
    group with no live instance in this worker's slot (a second identical analysis, or a later
    run in the same process, forms a group of its own)."""
    if getattr(ctx, "run", ""):
        key = ("run", ctx.run, ctx.analysis)
        with _GROUPS_LOCK:
            groups = _GROUPS.setdefault(key, [])
            if not groups:
                groups.append(_Group(ctx.threads))
            group = groups[0]
            group.members = {k: r for k, r in group.members.items() if r() is not None}
            group.members[id(instance)] = weakref.ref(instance)
            for k in [k for k, gs in _GROUPS.items() if k[0] == "run" and k != key
                      and not any(r() is not None for g in gs for r in g.members.values())]:
                del _GROUPS[k]  # runs whose instances are all gone
            return group
    key = (ctx.node, ctx.replica, ctx.threads, instance.params.model_dump_json())
    with _GROUPS_LOCK:
        groups = _GROUPS.setdefault(key, [])
        groups[:] = [g for g in groups if any(r() is not None for r in g.members.values())]
        for group in groups:
            member = group.members.get(ctx.thread)
            if member is None or member() is None:
                break
        else:
            group = _Group(ctx.threads)
            groups.append(group)
        group.members[ctx.thread] = weakref.ref(instance)
        return group


@dataclass
class _Mine:
    """One worker's share of one scan."""

    shared: _SharedScan | None  # None with fixed thresholds
    thresholds: ScanThresholds | None
    scan_shape: tuple[int, int] | None = None
    frame_shape: tuple[int, int] | None = None
    pending: list = field(default_factory=list)  # (start, stop, positions, frame numbers) in the pool
    chunks: list = field(default_factory=list)  # (positions, frame numbers, events per frame, events)
    done: bool = False
    figures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("frames", "complete_frames", "incomplete_frames", "events", "sampled_frames", "uncounted_frames"), 0))


class ElectronCounting(Analysis):
    """Counts electrons in every frame as stempy does; `results(scan)` hands over the events.

    `finish` returns figures that add up across workers (frames, events, ...) and, nested so
    that they are not added up, the thresholds. After `finish`, `results(scan)` returns this
    worker's `CountedFrames` for the scan once; `CountedFrames.concat` joins workers' parts and
    `.write(path, report)` writes the stempy file.
    """

    Params = CountingParams
    keep_results = 8  # finished scans whose results wait for `results()`; older ones are dropped

    def setup(self, ctx: Context) -> None:
        self.ctx = ctx
        self.dark, self.gain = load_references(self.params)
        self.fixed = fixed_thresholds(self.params)
        self.group = _join(self, ctx) if self.fixed is None else None
        self._scans: dict[int, _Mine] = {}
        self._results: OrderedDict[int, CountedFrames] = OrderedDict()
        # Compile (or load from numba's cache) now rather than on the first frames of a scan.
        shape = self.dark.shape if self.dark is not None else self.gain.shape if self.gain is not None else FRAME_SHAPE
        count_frames_serial(np.zeros((1, *shape), np.uint16), 1.0, 2.0, self.dark, self.gain)

    # -- the plugin contract -------------------------------------------------------------------
    def begin(self, scan: Scan) -> None:
        self._mine(scan.id)

    def process(self, batch: Batch) -> None:
        n = len(batch)
        if n == 0:
            return
        mine = self._mine(batch.scan.id)
        headers = batch.headers
        if mine.scan_shape is None:
            mine.scan_shape = (int(headers[0]["scan_width"]), int(headers[0]["scan_height"]))
            mine.frame_shape = tuple(batch.data.shape[1:])
        positions = np.fromiter((h["scan_y"] * h["scan_width"] + h["scan_x"] for h in headers), np.int64, n)
        numbers = np.fromiter((h["frame_number"] for h in headers), np.int64, n)
        complete = batch.complete
        f = mine.figures
        f["frames"] += n
        f["complete_frames"] += int(complete.sum())
        f["incomplete_frames"] += n - int(complete.sum())
        todo = np.ones(n, bool)  # frames of this batch not parked in the pool
        if mine.thresholds is None:
            self._sample(mine, batch.data, positions, numbers, complete, todo)
        self._count_pending(mine)
        if todo.all():
            self._count(mine, batch.data, positions, numbers)
        elif todo.any():
            self._count(mine, batch.data[todo], positions[todo], numbers[todo])

    def finish(self, scan: Scan) -> dict[str, Any]:
        mine = self._mine(scan.id)
        shared = mine.shared
        if shared is not None:
            with shared.cond:
                self._done_sampling(mine)
                if mine.pending:
                    self._await_thresholds(mine)
                mine.thresholds = shared.thresholds
            self._count_pending(mine)
            self.group.finished(scan.id, shared)
        del self._scans[scan.id]
        self._results[scan.id] = self._collect(mine)
        while len(self._results) > self.keep_results:
            dropped, _ = self._results.popitem(last=False)
            log.warning("electron-count: results of scan %d were never taken; dropped", dropped)
        thresholds = (mine.thresholds or (shared.thresholds if shared else None))
        figures: dict[str, Any] = dict(mine.figures)
        figures["thresholds"] = dict(thresholds.attrs) if thresholds else {}
        if shared is not None and shared.error:
            figures["error"] = shared.error
        return figures

    def counted(self, scan: Scan | int) -> CountedFrames | None:
        """This worker's counted frames of a finished scan (once; None if it has none to give)."""
        return self._results.pop(scan.id if isinstance(scan, Scan) else int(scan), None)

    def results(self, scan: Scan) -> dict[str, Any] | None:
        """What the node group ships to the scan's writer: the four arrays and the metadata."""
        cf = self.counted(scan)
        return None if cf is None else {**cf.arrays(), "meta": cf.meta}

    def write(self, scan: Scan, results: ScanResults, report: dict[str, Any], output_dir: str) -> str | None:
        """One stempy version-3 file per scan, from every worker of every node group."""
        counted = [CountedFrames.from_arrays(p, p["meta"]) for p in results.parts if p]
        counted = [c for c in counted if len(c)]
        if not counted:
            return None
        path = Path(output_dir) / f"scan_{scan.id}_electrons.h5"
        return str(CountedFrames.concat(counted).write(path, report))

    # -- thresholds ----------------------------------------------------------------------------
    def _mine(self, scan_id: int) -> _Mine:
        mine = self._scans.get(scan_id)
        if mine is None:
            shared = None if self.fixed else self.group.scan(scan_id, self.params.number_of_samples)
            mine = self._scans[scan_id] = _Mine(shared, self.fixed)
        return mine

    def _sample(self, mine: _Mine, data, positions, numbers, complete, todo) -> None:
        shared = mine.shared
        with shared.cond:
            if shared.thresholds is None and shared.error is None:
                take = np.flatnonzero(complete)[: shared.capacity - shared.filled]
                if len(take):
                    if shared.pool is None:
                        shared.pool = np.empty((shared.capacity, *data.shape[1:]), data.dtype)
                    start, stop = shared.filled, shared.filled + len(take)
                    # A copy, under the lock: the batch is reused after process() returns, and the
                    # copies are few (number_of_samples frames per scan, ~80 ms at 1200).
                    shared.pool[start:stop] = data[take]
                    shared.filled = stop
                    mine.pending.append((start, stop, positions[take], numbers[take]))
                    mine.figures["sampled_frames"] += len(take)
                    todo[take] = False
                if shared.filled == shared.capacity:
                    self._compute(shared)
                elif not complete.all():
                    self._done_sampling(mine)  # incomplete frames come last: no complete ones follow
                if todo.any():
                    self._await_thresholds(mine)
            mine.thresholds = shared.thresholds

    def _done_sampling(self, mine: _Mine) -> None:
        """Under the scan's lock: this worker will pool no more frames."""
        if not mine.done:
            mine.done = True
            mine.shared.done += 1
            mine.shared.cond.notify_all()

    def _await_thresholds(self, mine: _Mine) -> None:
        """Under the scan's lock, once this worker is done sampling or the pool is full."""
        shared, workers = mine.shared, self.group.workers
        if not shared.cond.wait_for(lambda: shared.thresholds or shared.error or shared.done >= workers,
                                    timeout=self.params.wait_s):
            log.warning("electron-count: %s: waited %.0f s for %d workers to finish sampling; using the %d "
                        "frames sampled so far", self.ctx.node, self.params.wait_s, workers - shared.done,
                        shared.filled)
        if shared.thresholds is None and shared.error is None:
            self._compute(shared)

    def _compute(self, shared: _SharedScan) -> None:
        """Under the scan's lock: the thresholds from the pool, for every worker."""
        if shared.filled == 0:
            shared.error = ("no complete frame to sample thresholds from: frames are left uncounted; "
                            "set background_threshold and xray_threshold")
        else:
            try:
                shared.thresholds = sample_thresholds(shared.pool[: shared.filled], self.params, self.dark, self.gain)
            except (ValueError, RuntimeError) as exc:
                shared.error = f"thresholds could not be computed: {exc}"
        if shared.error:
            log.error("electron-count: %s: %s", self.ctx.node, shared.error)
        shared.cond.notify_all()

    # -- counting ------------------------------------------------------------------------------
    def _count_pending(self, mine: _Mine) -> None:
        """Count this worker's pooled frames, once the thresholds exist (or never will)."""
        shared = mine.shared
        if not mine.pending or (mine.thresholds is None and shared.error is None):
            return
        pending, mine.pending = mine.pending, []
        for start, stop, positions, numbers in pending:
            self._count(mine, shared.pool[start:stop], positions, numbers)
        with shared.cond:
            shared.counted += sum(stop - start for start, stop, _, _ in pending)
            if shared.counted == shared.filled and (shared.thresholds or shared.error):
                shared.pool = None

    def _count(self, mine: _Mine, frames, positions, numbers) -> None:
        t = mine.thresholds
        if t is None:
            mine.figures["uncounted_frames"] += len(frames)
            return
        # The serial kernel: each worker thread counts on its own core, the GIL released.
        events, offsets = count_frames_serial(frames, t.background, t.xray, self.dark, self.gain)
        mine.chunks.append((positions, numbers, np.diff(offsets), events))
        mine.figures["events"] += len(events)

    def _collect(self, mine: _Mine) -> CountedFrames:
        chunks = mine.chunks
        counts = np.concatenate([c[2] for c in chunks]) if chunks else np.zeros(0, np.int64)
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        meta = {"scan_shape": list(mine.scan_shape) if mine.scan_shape else None,
                "frame_shape": list(mine.frame_shape or FRAME_SHAPE),
                "thresholds": dict(mine.thresholds.attrs) if mine.thresholds else {}}

        def cat(i, dtype):
            return np.concatenate([c[i] for c in chunks]).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)

        return CountedFrames(cat(0, np.int64), cat(1, np.int64), offsets, cat(3, np.uint32), meta)
