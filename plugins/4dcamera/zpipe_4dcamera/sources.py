"""4D-Camera sources: the simulated camera, and replay of stempy version-5 sector files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from pydantic import Field, field_validator

from zpipe.geometry import Geometry
from zpipe.plugin import Context, Message, Params, Request, Scan, Source

from . import SECTOR_SHAPE, SECTORS
from .rawfile import (BadRecord, SectorFileWriter, describe_bad, manifest_path, module_of, read_headers, read_manifest,
                      read_sectors, scan_files, scan_numbers, write_manifest)
from .simulate import SimulatedCamera


def geometry(scan_shape) -> dict:
    """A 4D-Camera scan's geometry: (height, width) positions, each frame placed by its header's
    scan_y and scan_x (so replayed, reordered or lost frames land where they belong)."""
    width, height = scan_shape
    return Geometry((int(height), int(width)), fields=("scan_y", "scan_x")).meta()


def _my_sectors(ctx: Context, chosen: list[int] | None) -> list[int]:
    """Four replicas: one receiving server (sector) each, as at NCEM; otherwise each sends all four."""
    if chosen is not None:
        return chosen
    return [ctx.replica] if ctx.replicas == SECTORS else list(range(SECTORS))


class CameraSource(Source):
    """A simulated 4D Camera scan, sector by sector, reproducible bit for bit from its seed."""

    replay_plugin = "4dcamera-raw"

    class Params(Params):
        scan_shape: tuple[int, int] = Field((32, 32), description="scan positions (width, height)")
        scans: int = Field(1, ge=1)
        first_scan: int = Field(1, ge=0, description="scan number of the first scan")
        first_frame: int = Field(1000, ge=0, le=2**52, description="frame number of a scan's first frame")
        electrons_per_frame: float = Field(40.0, ge=0)
        xray_probability: float = Field(0.01, ge=0, le=1)
        loss: float = Field(0.0, ge=0, le=1, description="probability that a sector is lost upstream")
        seed: int = Field(0, ge=0)
        rate: float | None = Field(None, ge=10, le=1e7, description="frames per second (at least 10: a pause "
                                   "between frames delays a stop); default: as fast as possible")
        sectors: list[int] | None = Field(None, description="sectors this replica sends; default: its own "
                                          "when there are 4 replicas, else all")
        max_file_bytes: int | None = Field(None, description="disk fallback: roll over to a new file at this size")
        payload: Literal["simulated", "constant"] = Field(
            "simulated", description="constant: one prepared sector sent over and over, to measure transport alone")

    class Request(Request):
        """An acquisition's own settings (`zpipe acquire --shape 64x64 --set seed=3 ...`); unset: the node's params."""

        scan_shape: tuple[int, int] | None = Field(None, description="scan positions (width, height)")
        electrons_per_frame: float | None = Field(None, ge=0)
        xray_probability: float | None = Field(None, ge=0, le=1)
        loss: float | None = Field(None, ge=0, le=1)
        seed: int | None = Field(None, ge=0)
        rate: float | None = Field(None, ge=10, le=1e7)  # see Params.rate
        first_frame: int | None = Field(None, ge=0, le=2**52)  # frame numbers stay exact in every header

        @field_validator("scan_shape")
        @classmethod
        def _shape(cls, shape):
            if shape is not None and not (1 <= shape[0] <= 4096 and 1 <= shape[1] <= 4096):
                raise ValueError(f"a scan of {shape[0]}x{shape[1]} positions; each side is 1 to 4096")
            return shape

    def setup(self, ctx: Context) -> None:
        self.ctx = ctx
        self.sectors = _my_sectors(ctx, self.params.sectors)
        self._cameras: dict[int, SimulatedCamera] = {}
        self._requested: dict[int, Params] = {}  # scan -> the params an acquisition asked for

    def params_of(self, scan: Scan) -> Params:
        return self._requested.get(scan.id, self.params)

    def acquire(self, scan_id: int, request: "CameraSource.Request") -> Scan:
        """A simulated scan with the node's params, overridden by what the acquisition asks for; its
        seed is the request's (or the node's) plus the scan number, as in batch."""
        asked = {k: v for k, v in request.model_dump().items() if v is not None}
        params = self.params.model_copy(update=asked)
        self._requested[scan_id] = params
        while len(self._requested) > 16:
            self._requested.pop(next(iter(self._requested)))
        return self._scan(scan_id, params)

    def _scan(self, number: int, p: Params) -> Scan:
        n = p.scan_shape[0] * p.scan_shape[1]
        return Scan(number, {"scan_shape": list(p.scan_shape), "keys": [p.first_frame, n], "frames": n,
                             "sectors": SECTORS, "parts_per_item": SECTORS, "geometry": geometry(p.scan_shape),
                             "seed": p.seed + number})

    def camera(self, scan: Scan) -> SimulatedCamera:
        cam = self._cameras.get(scan.id)
        if cam is None:
            p = self.params_of(scan)
            self._cameras = {scan.id: SimulatedCamera(
                scan_shape=p.scan_shape, electrons_per_frame=p.electrons_per_frame,
                xray_probability=p.xray_probability, seed=p.seed + scan.id, first_frame=p.first_frame,
                scan_number=scan.id, loss=p.loss)}
            cam = self._cameras[scan.id]
        return cam

    def scans(self) -> Iterator[Scan]:
        p = self.params
        for i in range(p.scans):
            yield self._scan(p.first_scan + i, p)

    def _frames(self, scan: Scan, thread: int, threads: int) -> range:
        return range(thread, self.camera(scan).n_frames, threads)

    def plan(self, scan: Scan, thread: int, threads: int) -> Iterator[dict]:
        cam = self.camera(scan)
        for i in self._frames(scan, thread, threads):
            for k in self.sectors:
                if not cam.lost(i, k):
                    yield {**cam.header(i, k), "scan": scan.id}

    def messages(self, scan: Scan, thread: int, threads: int) -> Iterator[Message]:
        cam = self.camera(scan)
        frames = self._frames(scan, thread, threads)
        constant = None
        if self.params.payload == "constant":
            constant = np.full(SECTOR_SHAPE, 20, dtype=np.uint16)
        rate = self.params_of(scan).rate
        per_thread_rate = rate / threads if rate else None
        t0 = time.perf_counter()
        for n, i in enumerate(frames):
            if per_thread_rate and n % 16 == 0:
                delay = t0 + n / per_thread_rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            for k in self.sectors:
                if not cam.lost(i, k):
                    pixels = constant if constant is not None else cam.sector(i, k)
                    yield Message({**cam.header(i, k), "scan": scan.id}, pixels)

    def recorder(self, scan: Scan, directory: str) -> "SectorRecorder":
        return SectorRecorder(self, scan, directory)

    def finish_recording(self, scan: Scan, directory: str, manifests: list) -> dict:
        modules = [m for per_thread in manifests for m in per_thread["modules"]]
        path = write_manifest(directory, scan.id, tuple(self.params_of(scan).scan_shape), modules)
        return {"manifest": str(path), "files": sum(len(m["files"]) for m in modules)}


class SectorRecorder:
    """One producer thread's share of a scan as version-5 files: a writer per sector, dst = thread."""

    def __init__(self, source: CameraSource, scan: Scan, directory: str):
        self.source, self.scan = source, scan
        shape = tuple(source.params_of(scan).scan_shape)
        self.writers = {k: SectorFileWriter(directory, scan.id, k, dst=source.ctx.thread, scan_shape=shape,
                                            max_bytes=source.params.max_file_bytes) for k in source.sectors}

    def write(self, msg: Message) -> None:
        self.writers[int(msg.header["module"])].write(msg.header, msg.payload)

    def close(self) -> dict:
        cam = self.source.camera(self.scan)
        for i in self.source._frames(self.scan, self.source.ctx.thread, self.source.ctx.threads):
            for k, w in self.writers.items():
                if cam.lost(i, k):
                    w.mark_lost(cam.frame_number(i))
        return {"modules": [w.close() for w in self.writers.values()]}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


class RawFileSource(Source):
    """Replays stempy version-5 sector files (the disk fallback's, or a receiver's) through a pipeline.

    A bad record (a corrupt header, a truncated tail, a file whose name says no module) is
    skipped, by plan() and messages() alike, so the scan is the good records: a frame whose
    sector was bad arrives with that sector missing, as if it had been lost upstream. Each
    file's bad records are logged once, in one WARNING line, and kept: see bad_records().
    """

    class Params(Params):
        directory: str = Field(description="where the scan's data_scan*_module*.data files are")
        scans: list[int] | None = Field(None, description="scan numbers to replay; default: every scan there")
        sectors: list[int] | None = None

    def setup(self, ctx: Context) -> None:
        self.ctx = ctx
        self.sectors = _my_sectors(ctx, self.params.sectors)
        self._bad: dict[int, dict[Path, list[BadRecord]]] = {}  # scan -> file -> its bad records, once read

    @staticmethod
    def check_replay(directory: str, scans: list[int] | None) -> None:
        """Before a replay starts: ValueError (one line, naming the directory) if there is nothing to replay."""
        found = scan_numbers(directory)
        if not found:
            raise ValueError(f"{directory}: no data_scan*.data files")
        absent = [s for s in scans or [] if s not in found]
        if absent:
            there = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
            which = "scans " if len(absent) > 1 else "scan "
            raise ValueError(f"{directory}: no data files of {which}{', '.join(map(str, absent))} "
                             f"(scan{'s' if len(found) > 1 else ''} there: {there})")

    def _scan_numbers(self) -> list[int]:
        if self.params.scans is not None:
            return list(self.params.scans)
        found = scan_numbers(self.params.directory)
        if not found:
            raise FileNotFoundError(f"no data_scan*.data files in {self.params.directory}")
        return found

    def _manifest(self, number: int) -> dict | None:
        """The scan's manifest if it is there and sound; the files replay without one (receivers write none)."""
        try:
            m = read_manifest(self.params.directory, number)
            width, height, frames = m["scan_width"], m["scan_height"], m.get("frame_numbers")
            if not (type(width) is int and type(height) is int and width > 0 and height > 0):
                raise ValueError(f"scan shape {width!r}x{height!r}")
            if frames is not None and not (isinstance(frames, list) and len(frames) == 2
                                           and all(type(f) is int for f in frames)):
                raise ValueError(f"frame_numbers {frames!r}")
            return {"scan_shape": [width, height], "frame_numbers": frames}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if self.ctx.replica == 0 and self.ctx.thread == 0:
                self.ctx.log.warning("scan %d: ignoring the unreadable manifest %s (%s: %s); replaying the files "
                                     "without it", number, manifest_path(self.params.directory, number),
                                     type(exc).__name__, exc)
            return None

    def scans(self) -> Iterator[Scan]:
        for number in self._scan_numbers():
            meta: dict = {"sectors": SECTORS, "replayed_from": self.params.directory}
            manifest = self._manifest(number)
            if manifest:
                meta["scan_shape"] = manifest["scan_shape"]
                meta["frames"] = manifest["scan_shape"][0] * manifest["scan_shape"][1]
                meta["geometry"] = geometry(manifest["scan_shape"])
                meta["parts_per_item"] = SECTORS
                if manifest["frame_numbers"]:
                    meta["frame_numbers"] = manifest["frame_numbers"]
                    first, last = manifest["frame_numbers"]
                    if last - first + 1 == meta["frames"]:  # one frame per position: the scan's key range
                        meta["keys"] = [first, meta["frames"]]
            yield Scan(number, meta)

    def _files(self, scan: Scan, thread: int, threads: int) -> list[Path]:
        unnamed: list[BadRecord] = []
        files = [f for f in scan_files(self.params.directory, scan.id, on_bad=unnamed.append)
                 if module_of(f) in self.sectors]
        if thread == 0 and self.ctx.replica == 0:  # files of no sector: named by one thread of one replica
            for bad in unnamed:
                self._note(scan, bad.path, [bad])
        return files[thread::threads]

    def _note(self, scan: Scan, path: Path, bad: list[BadRecord]) -> None:
        """Keep a file's bad records, and log them, the first time the file is read through."""
        seen = self._bad.setdefault(scan.id, {})
        if path in seen:
            return
        seen[path] = bad
        if bad:
            self.ctx.log.warning("scan %d: %s", scan.id, describe_bad(bad))

    def bad_records(self, scan: int | None = None) -> list[BadRecord]:
        """The bad records this source skipped so far (of one scan, or of all), in reading order."""
        return [b for number, files in self._bad.items() if scan in (None, number)
                for bad in files.values() for b in bad]

    def _records(self, scan: Scan, thread: int, threads: int, read) -> Iterator:
        shape, frames = scan.meta.get("scan_shape"), scan.meta.get("frame_numbers")
        for path in self._files(scan, thread, threads):
            bad: list[BadRecord] = []
            yield from read([path], bad.append, scan_shape=tuple(shape) if shape else None,
                            frame_numbers=tuple(frames) if frames else None)
            self._note(scan, path, bad)

    def plan(self, scan: Scan, thread: int, threads: int) -> Iterator[dict]:
        for header in self._records(scan, thread, threads, read_headers):
            yield {**header, "scan": scan.id}

    def messages(self, scan: Scan, thread: int, threads: int) -> Iterator[Message]:
        for header, sector in self._records(scan, thread, threads, read_sectors):
            yield Message({**header, "scan": scan.id}, sector)
