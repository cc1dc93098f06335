"""Electron-counted scans as stempy's version-3 HDF5 file, the file stempy, py4DSTEM and their users load."""

# The layout is stempy 3.6's SparseArray.write_to_hdf5 (stempy/io/sparse_array.py), which its
# load_electron_counts reads back:
#   root attr version = 3
#   /electron_events/frames          vlen uint32, one entry per (position, frame at that position),
#                                    position-major; attrs Nx, Ny = frame shape
#   /electron_events/scan_positions  int64 arange(positions); attrs Nx = scan width, Ny = scan height
#   /metadata/electron_counting      attrs: thresholds and their statistics
# stempy's loader ignores scan_positions for version 3 and reshapes `frames` to
# (positions, frames per position), so the file must be dense: a position whose frame never
# arrived gets an empty entry, and /metadata/zpipe says which entries are such padding.
# Our own group /metadata/zpipe holds the scan report (stempy loads a metadata group's attributes
# and subgroups and skips its datasets, so the full JSON report as a dataset costs it nothing).

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import FRAME_SHAPE

VERSION = 3


@dataclass
class CountedFrames:
    """Counted frames of one scan, in any order: frame i's events are ``events[offsets[i]:offsets[i + 1]]``.

    Shipping it: ``arrays()`` gives four numpy arrays and ``meta`` a JSON-able dict;
    ``CountedFrames.from_arrays(arrays, meta)`` rebuilds it on the other side.
    """

    positions: np.ndarray  # int64[n]: scan_y * scan_width + scan_x
    frame_numbers: np.ndarray  # int64[n]
    offsets: np.ndarray  # int64[n + 1]
    events: np.ndarray  # uint32[offsets[-1]]: row * frame_width + col
    meta: dict[str, Any] = field(default_factory=dict)  # scan_shape, frame_shape, thresholds (attrs)

    def __len__(self) -> int:
        return len(self.positions)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"positions": self.positions, "frame_numbers": self.frame_numbers,
                "offsets": self.offsets, "events": self.events}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> CountedFrames:
        return cls(np.asarray(arrays["positions"], np.int64), np.asarray(arrays["frame_numbers"], np.int64),
                   np.asarray(arrays["offsets"], np.int64), np.asarray(arrays["events"], np.uint32), dict(meta))

    @classmethod
    def concat(cls, parts: list[CountedFrames]) -> CountedFrames:
        """Several workers' (node groups', ranks') parts of one scan as one.

        The thresholds are the first part's that has any. Workers of one process share one set;
        node groups in other processes sample their own frames and may differ slightly: then
        every distinct set is kept in ``meta["threshold_sets"]`` and the file records them.
        """
        parts = [p for p in parts if p is not None]
        if not parts:
            raise ValueError("no parts to join")
        counts = [np.diff(p.offsets) for p in parts]
        offsets = np.zeros(sum(len(p) for p in parts) + 1, np.int64)
        np.cumsum(np.concatenate(counts), out=offsets[1:])
        meta = {}
        for p in parts:
            for k, v in p.meta.items():
                if v and not meta.get(k):
                    meta[k] = v
        sets = []
        for p in parts:
            t = p.meta.get("thresholds") or {}
            pair = [t.get("background_threshold"), t.get("x_ray_threshold")]
            if t and pair not in sets:
                sets.append(pair)
        if len(sets) > 1:
            meta["threshold_sets"] = sets
        return cls(np.concatenate([p.positions for p in parts]), np.concatenate([p.frame_numbers for p in parts]),
                   offsets, np.concatenate([p.events for p in parts]), meta)

    def write(self, path: str | os.PathLike, report: dict | None = None) -> Path:
        """This scan's stempy-v3 file (see write_electron_counts)."""
        if not self.meta.get("scan_shape"):
            raise ValueError("no frame was counted, so the scan's shape is unknown")
        extra = {"threshold_sets": self.meta["threshold_sets"]} if "threshold_sets" in self.meta else None
        return write_electron_counts(path, self.meta["scan_shape"], self.positions, self.offsets, self.events,
                                     self.meta.get("thresholds") or {}, report,
                                     tuple(self.meta.get("frame_shape", FRAME_SHAPE)),
                                     frame_numbers=self.frame_numbers, zpipe_attrs=extra)


def _layout(positions: np.ndarray, frame_numbers: np.ndarray | None, n_positions: int):
    """(order of the frames, file entry of each, frames per position): position-major, then frame number."""
    if frame_numbers is None:
        order = np.argsort(positions, kind="stable")
    else:
        order = np.lexsort((frame_numbers, positions))
    sorted_positions = positions[order]
    per_position = np.bincount(positions, minlength=n_positions)
    per = max(1, int(per_position.max(initial=0)))
    # A frame's slot among its position's frames: its index minus that of the position's first frame.
    rank = np.arange(len(order)) - np.searchsorted(sorted_positions, sorted_positions, side="left")
    return order, sorted_positions * per + rank, per


def _scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_))


def _flat_scalars(d: dict, prefix: str = "") -> dict[str, Any]:
    """The report's scalars as attributes, nested keys joined by '.': readable with h5ls alone."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        elif _scalar(v):
            out[f"{prefix}{k}"] = v
    return out


def write_electron_counts(path: str | os.PathLike, scan_shape: tuple[int, int], positions, offsets, events,
                          thresholds_attrs: dict[str, Any], report: dict | None = None,
                          frame_shape: tuple[int, int] = FRAME_SHAPE, *, frame_numbers=None,
                          zpipe_attrs: dict[str, Any] | None = None) -> Path:
    """Write counted frames as stempy's version-3 file, atomically (a temporary name, then a rename).

    ``scan_shape`` is (width, height); frame i sits at ``positions[i]`` (= y * width + x) and
    its events are ``events[offsets[i]:offsets[i + 1]]``. Frames may come in any order: the
    file holds them by position, then by ``frame_numbers`` (if given; else in the order given),
    so runs over the same data write equal files. ``report`` (JSON-able) goes to /metadata/zpipe.
    """
    path = Path(path)
    width, height = (int(v) for v in scan_shape)
    n_positions = width * height
    positions = np.asarray(positions, np.int64)
    offsets = np.asarray(offsets, np.int64)
    events = np.asarray(events, np.uint32)
    n = len(positions)
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(events) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must rise from 0 to len(events) = {len(events)} in {n + 1} steps")
    if n and (positions.min() < 0 or positions.max() >= n_positions):
        raise ValueError(f"positions must lie in 0..{n_positions - 1} for a {width} x {height} scan")
    if frame_numbers is not None:
        frame_numbers = np.asarray(frame_numbers, np.int64)
        if frame_numbers.shape != (n,):
            raise ValueError("frame_numbers must have one entry per frame")
    order, entry, per = _layout(positions, frame_numbers, n_positions)

    entries = np.empty(n_positions * per, dtype=object)
    entries.fill(np.empty(0, np.uint32))  # padding: positions with fewer frames than the most
    # Plain ints: slicing with numpy scalars costs several times more, per frame.
    for e, start, stop in zip(entry.tolist(), offsets[:-1][order].tolist(), offsets[1:][order].tolist()):
        entries[e] = events[start:stop]
    padding = np.setdiff1d(np.arange(len(entries)), entry)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["version"] = VERSION
            group = f.create_group("electron_events")
            sp = group.create_dataset("scan_positions", data=np.arange(n_positions, dtype=np.int64))
            sp.attrs["Nx"], sp.attrs["Ny"] = width, height
            frames = group.create_dataset("frames", (len(entries),), dtype=h5py.vlen_dtype(np.uint32))
            frames.attrs["Nx"], frames.attrs["Ny"] = int(frame_shape[0]), int(frame_shape[1])
            # The low-level write: h5py's own (frames[...] = entries) turns a list of equal-length event
            # arrays (every frame empty: a dark scan) into a 2-D array and fails to broadcast it.
            frames.id.write(h5py.h5s.ALL, h5py.h5s.ALL, entries)
            counting = f.create_group("metadata/electron_counting")
            for k, v in thresholds_attrs.items():
                counting.attrs[k] = v
            ours = f.create_group("metadata/zpipe")
            for k, v in {**_flat_scalars(report or {}), "frames": n, "frames_per_position": per,
                         "padding_entries": len(padding)}.items():
                ours.attrs[k] = v
            for k, v in (zpipe_attrs or {}).items():
                ours.attrs[k] = v if _scalar(v) else json.dumps(v)
            ours.create_dataset("padding_entries", data=padding.astype(np.int64))
            if report is not None:
                ours.create_dataset("report", data=json.dumps(report, sort_keys=True, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_electron_counts(path: str | os.PathLike) -> dict[str, Any]:
    """A v3 file as plain values: version, scan_shape (width, height), frame_shape, frames (one
    uint32 array per entry, position-major), frames_per_position, electron_counting and zpipe
    attributes, and the report (None if the file has none)."""
    with h5py.File(path, "r") as f:
        frames = f["electron_events/frames"]
        sp = f["electron_events/scan_positions"]
        scan_shape = (int(sp.attrs["Nx"]), int(sp.attrs["Ny"]))
        entries = [np.asarray(e, np.uint32) for e in frames[()]]
        zp = f.get("metadata/zpipe")
        counting = f.get("metadata/electron_counting")
        report = json.loads(zp["report"][()]) if zp is not None and "report" in zp else None
        return {
            "version": int(f.attrs["version"]),
            "scan_shape": scan_shape,
            "frame_shape": (int(frames.attrs["Nx"]), int(frames.attrs["Ny"])),
            "scan_positions": sp[()],
            "frames": entries,
            "frames_per_position": len(entries) // max(1, scan_shape[0] * scan_shape[1]),
            "electron_counting": dict(counting.attrs) if counting is not None else {},
            "zpipe": dict(zp.attrs) if zp is not None else {},
            "padding_entries": zp["padding_entries"][()] if zp is not None and "padding_entries" in zp else None,
            "report": report,
        }
