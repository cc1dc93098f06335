"""The file-based workflow, as a baseline: count a scan's stempy version-5 sector files into the same HDF5 file.

    python -m zpipe_4dcamera.filecount data_scan0000000007_module*.data -o scan7.h5 [--number-of-samples 1200 ...]

Like stempy's multi-pass reader it first reads only the record headers, then reads each frame's
four sectors where they lie, so files may hold frames in any order and memory stays bounded.
Counting follows the streaming analysis (`electron.ElectronCounting`): same parameters, same
kernels, complete frames first, incomplete ones (missing sectors zero-filled) counted but never
sampled. The sample is the scan's first `number_of_samples` complete frames by frame number,
which is what a single streaming worker fed in order samples too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import FRAME_SHAPE, SECTOR_SHAPE, SECTORS
from .counting import count_frames
from .electron import CountingParams, fixed_thresholds, load_references, sample_thresholds
from .hdf5 import CountedFrames
from .rawfile import HEADER_FIELDS, RECORD_BYTES, RawFileError, module_of

RECORD = np.dtype([*((name, "<u4") for name in HEADER_FIELDS[:2]), *((name, "<u2") for name in HEADER_FIELDS[2:]),
                   ("pixels", "<u2", SECTOR_SHAPE)])
assert RECORD.itemsize == RECORD_BYTES


class ScanFiles:
    """Where each sector of each frame of one scan lies in its files (read from the headers only)."""

    def __init__(self, files: list[Path | str]):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("no files to count")
        self.maps, parts = [], []
        for i, path in enumerate(self.files):
            size = path.stat().st_size
            if size % RECORD_BYTES:
                raise RawFileError(path, size - size % RECORD_BYTES, "truncated record at the end of the file")
            records = np.memmap(path, RECORD, "r") if size else np.zeros(0, RECORD)
            self.maps.append(records)
            heads = {name: np.asarray(records[name], np.int64) for name in HEADER_FIELDS}
            parts.append((heads, np.full(len(records), module_of(path)), np.full(len(records), i)))
        heads = {name: np.concatenate([p[0][name] for p in parts]) for name in HEADER_FIELDS}
        module, file_index = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
        for name in ("scan_number", "scan_width", "scan_height"):
            if len(np.unique(heads[name])) > 1:
                raise ValueError(f"the files hold records with different {name}s: one scan at a time")
        if len(module) == 0:
            raise ValueError("the files hold no records")
        self.scan_number = int(heads["scan_number"][0])
        self.scan_shape = (int(heads["scan_width"][0]), int(heads["scan_height"][0]))
        if np.any(heads["scan_x"] >= self.scan_shape[0]) or np.any(heads["scan_y"] >= self.scan_shape[1]):
            raise ValueError("a record's scan position lies outside the scan")
        self.frame_numbers, frame = np.unique(heads["frame_number"], return_inverse=True)
        n = len(self.frame_numbers)
        self.file_of = np.full((n, SECTORS), -1, np.int64)  # -1: sector missing
        self.record_of = np.zeros((n, SECTORS), np.int64)
        if len(np.unique(frame * SECTORS + module)) != len(frame):
            raise ValueError("a sector of some frame appears twice in the files")
        self.file_of[frame, module] = file_index
        self.record_of[frame, module] = np.concatenate([np.arange(len(m)) for m in self.maps])
        self.positions = np.zeros(n, np.int64)
        self.positions[frame] = heads["scan_y"] * self.scan_shape[0] + heads["scan_x"]
        self.complete = (self.file_of >= 0).all(axis=1)

    def read(self, frames: np.ndarray) -> np.ndarray:
        """Frames (indices into frame_numbers) as (n, 576, 576) uint16, missing sectors zero."""
        rows = SECTOR_SHAPE[0]
        out = np.zeros((len(frames), *FRAME_SHAPE), np.uint16)
        for j, i in enumerate(frames):
            for k in range(SECTORS):
                f = self.file_of[i, k]
                if f >= 0:
                    out[j, k * rows : (k + 1) * rows] = self.maps[f]["pixels"][self.record_of[i, k]]
        return out


def count_files(files, output: str | Path, report: dict | None = None, batch: int = 64, **params) -> dict[str, Any]:
    """Count one scan's v5 files and write the stempy v3 file `output`; returns the figures.

    `params` are the streaming analysis's (`electron.CountingParams`: number_of_samples,
    background_threshold_n_sigma, xray_threshold_n_sigma, background_threshold, xray_threshold,
    dark, gain). Counting uses all of numba's threads.
    """
    t0 = time.perf_counter()
    p = CountingParams(**params)
    dark, gain = load_references(p)
    scan = ScanFiles(files)
    complete = np.flatnonzero(scan.complete)
    order = np.concatenate([complete, np.flatnonzero(~scan.complete)])  # complete first, as stempy and streaming
    thresholds = fixed_thresholds(p)
    counted: list[tuple[np.ndarray, np.ndarray]] = []

    def count(frames):
        events, offsets = count_frames(frames, thresholds.background, thresholds.xray, dark, gain)
        counted.append((np.diff(offsets), events))

    start = 0
    if thresholds is None:
        if len(complete) == 0:
            raise ValueError("no complete frame to sample thresholds from: give background_threshold and "
                             "xray_threshold")
        start = min(p.number_of_samples, len(complete))
        sample = scan.read(order[:start])
        thresholds = sample_thresholds(sample, p, dark, gain)
        count(sample)
        del sample
    # Read the next batch while this one is counted: numpy copies and numba both release the GIL.
    with ThreadPoolExecutor(1) as reader:
        chunks = [order[i : i + batch] for i in range(start, len(order), batch)]
        ahead = reader.submit(scan.read, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            frames = ahead.result()
            ahead = reader.submit(scan.read, chunks[i + 1]) if i + 1 < len(chunks) else None
            count(frames)
    counts = np.concatenate([c[0] for c in counted]) if counted else np.zeros(0, np.int64)
    offsets = np.zeros(len(order) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    events = np.concatenate([c[1] for c in counted]) if counted else np.zeros(0, np.uint32)
    result = CountedFrames(scan.positions[order], scan.frame_numbers[order].astype(np.int64), offsets, events,
                           {"scan_shape": list(scan.scan_shape), "frame_shape": list(FRAME_SHAPE),
                            "thresholds": thresholds.attrs})
    figures = {"scan_number": scan.scan_number, "files": len(scan.files), "frames": len(order),
               "complete_frames": len(complete), "incomplete_frames": len(order) - len(complete),
               "sampled_frames": start, "events": len(events), "thresholds": thresholds.attrs}
    figures["seconds"] = time.perf_counter() - t0
    result.write(output, {"source": "files", **figures, **(report or {})})
    figures["output"] = str(output)
    return figures


def _files(args: list[str]) -> list[Path]:
    out = []
    for a in args:
        path = Path(a)
        out.extend(sorted(path.glob("*.data")) if path.is_dir() else [path])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zpipe_4dcamera.filecount", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="one scan's data_scan*_module*.data files (or their directory)")
    parser.add_argument("-o", "--output", required=True, help="the HDF5 file to write")
    parser.add_argument("--batch", type=int, default=64)
    for name, field in CountingParams.model_fields.items():
        if name != "wait_s":
            kind = str if name in ("dark", "gain") else int if name == "number_of_samples" else float
            parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=field.description)
    args = vars(parser.parse_args(argv))
    files, output, batch = _files(args.pop("files")), args.pop("output"), args.pop("batch")
    params = {k: v for k, v in args.items() if v is not None}
    try:
        figures = count_files(files, output, batch=batch, **params)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(figures, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
