"""Raw sector files in stempy's version-5 format: the disk fallback every stempy/py4DSTEM user can open."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, Self

import numpy as np

from . import SECTOR_SHAPE, SECTORS

HEADER = struct.Struct("<IIHHHH")  # scan, frame number, scan width, height, x, y
HEADER_FIELDS = ("scan_number", "frame_number", "scan_width", "scan_height", "scan_x", "scan_y")
SECTOR_BYTES = SECTOR_SHAPE[0] * SECTOR_SHAPE[1] * 2
RECORD_BYTES = HEADER.size + SECTOR_BYTES
# The NCEM receivers' naming (distiller globs "data_scan{id:010}_module*_dst*_file*.data").
# stempy takes the sector from the last "module(\d+)" before ".data" in the path.
FILE_NAME = "data_scan{scan:010d}_module{module}_dst{dst}_file{index}.data"
_NAME_RE = re.compile(r"data_scan(\d+)_module(\d+)_dst(\d+)_file(\d+)\.data$")
_MODULE_RE = re.compile(r".*module(\d+).*\.data")  # stempy's own rule, so we agree with it
_SCAN_RE = re.compile(r"^data_scan(\d{10,})_.*\.data$")  # any data file of a scan, readable or not
_PARTIAL = ".partial"


class BadRecord(NamedTuple):
    """A record a tolerant reader skipped, and why; offset None: the whole file was skipped."""

    path: Path
    offset: int | None
    problem: str

    def __str__(self) -> str:
        where = "" if self.offset is None else f" (record at byte offset {self.offset})"
        return f"{self.path}: {self.problem}{where}"


class RawFileError(ValueError):
    """A record that cannot be read; names the file and the byte offset of the record."""

    def __init__(self, path: Path | str, offset: int | None, problem: str):
        self.bad = BadRecord(Path(path), offset, problem)
        super().__init__(str(self.bad))
        self.path, self.offset, self.problem = self.bad


def _raise(bad: BadRecord) -> None:
    raise RawFileError(*bad)


def file_name(scan_number: int, module: int, dst: int = 0, index: int = 0) -> str:
    return FILE_NAME.format(scan=scan_number, module=module, dst=dst, index=index)


def manifest_path(directory: Path | str, scan_number: int) -> Path:
    # Not "*.data", so neither stempy's globs nor scan_files() mistake it for sectors.
    return Path(directory) / f"data_scan{scan_number:010d}_manifest.json"


def module_of(path: Path | str) -> int:
    """The sector a file holds, found exactly as stempy finds it."""
    match = _MODULE_RE.search(str(path))
    if match is None or not 0 <= int(match[1]) < SECTORS:
        raise RawFileError(path, None, f"file name has no module0..module{SECTORS - 1} before '.data'")
    return int(match[1])


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}{_PARTIAL}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ClosedOrAborted:
    """`with` a writer: closed (files final) when the block ends well, aborted (nothing left
    under a final name) when it raises."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SectorFileWriter(_ClosedOrAborted):
    """Appends one module's records to files that appear under their final names only on close().

    Files are written as hidden ``.<name>.partial`` and all renamed in close(),
    so a crashed or aborted writer never leaves a file that looks complete.
    ``max_bytes`` rolls over to the next ``_file{n}`` like the real receivers do.
    Use as a context manager: an exception inside the block aborts (deletes) the files.
    The renames are not one atomic step across files: the scan's manifest, written
    last, is what says a scan is complete.
    """

    def __init__(
        self,
        directory: Path | str,
        scan_number: int,
        module: int,
        dst: int = 0,
        max_bytes: int | None = None,
        scan_shape: tuple[int, int] | None = None,
        fsync: bool = False,
    ):
        if not 0 <= module < SECTORS:
            raise ValueError(f"module {module} is not one of 0..{SECTORS - 1}")
        if max_bytes is not None and max_bytes < RECORD_BYTES:
            raise ValueError(f"max_bytes must hold at least one record ({RECORD_BYTES} bytes)")
        self.directory, self.scan_number, self.module, self.dst = Path(directory), scan_number, module, dst
        self.max_bytes, self.fsync = max_bytes, fsync
        self.scan_shape = tuple(scan_shape) if scan_shape is not None else None
        self.records, self.bytes = 0, 0
        self.frame_range: list[int] | None = None
        self.lost: list[int] = []
        self._done: list[Path] = []  # closed temporary files awaiting the final rename
        self._file = None
        self._file_bytes = 0
        self._seen: np.ndarray | None = None  # records per scan position, to report missing ones
        self._closed = False

    def write(self, header: dict, sector: np.ndarray) -> None:
        if self._closed:
            raise ValueError("writer is closed")
        values = tuple(int(header[name]) for name in HEADER_FIELDS)
        self._validate(header, values, sector)
        try:
            packed = HEADER.pack(*values)
        except struct.error as e:
            raise ValueError(f"header {header} does not fit the v5 header's uint32/uint16 fields") from e
        if self._file is None or (self.max_bytes and self._file_bytes + RECORD_BYTES > self.max_bytes):
            self._roll()
        self._file.write(packed)
        # "<u2" is a no-copy view on little-endian hosts; big-endian ones get swapped bytes.
        self._file.write(np.ascontiguousarray(sector, dtype="<u2"))
        self._file_bytes += RECORD_BYTES
        self.records += 1
        self.bytes += RECORD_BYTES
        frame = values[1]
        if self.frame_range is None:
            self.frame_range = [frame, frame]
        else:
            self.frame_range = [min(self.frame_range[0], frame), max(self.frame_range[1], frame)]
        self._seen[values[5] * values[2] + values[4]] += 1

    def mark_lost(self, frame_number: int) -> None:
        """Record that this module's sector of a frame never arrived (listed in the manifest)."""
        self.lost.append(int(frame_number))

    def _validate(self, header: dict, values: tuple, sector: np.ndarray) -> None:
        scan, _, width, height, x, y = values
        if scan != self.scan_number:
            raise ValueError(f"record of scan {scan} given to the writer of scan {self.scan_number}")
        if header.get("module", self.module) != self.module:
            raise ValueError(f"record of module {header['module']} given to the writer of module {self.module}")
        if self.scan_shape is None:
            self.scan_shape = (width, height)
        if (width, height) != self.scan_shape:
            raise ValueError(f"scan shape {(width, height)} differs from {self.scan_shape}")
        # stempy indexes its scan map with y * width + x unchecked: an outside position would corrupt its memory.
        if not (x < width and y < height):
            raise ValueError(f"scan position {(x, y)} is outside the {width}x{height} scan")
        if sector.shape != SECTOR_SHAPE:
            raise ValueError(f"sector shape {sector.shape} is not {SECTOR_SHAPE}")
        if self._seen is None:
            self._seen = np.zeros(width * height, dtype=np.uint32)

    def _roll(self) -> None:
        self._close_file()
        index = len(self._done)
        path = self.directory / f".{file_name(self.scan_number, self.module, self.dst, index)}{_PARTIAL}"
        self._file = open(path, "wb", buffering=1 << 20)
        self._file_bytes = 0

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            self._done.append(Path(self._file.name))
            self._file = None

    def close(self) -> dict:
        """Publish the files under their final names; returns this module's manifest entry."""
        if not self._closed:
            self._close_file()
            for tmp in self._done:
                os.replace(tmp, tmp.with_name(tmp.name[1 : -len(_PARTIAL)]))
            self._closed = True
        return self.summary()

    def abort(self) -> None:
        """Drop everything written: nothing appears under a final name."""
        if self._file is not None:
            self._file.close()
            self._done.append(Path(self._file.name))
            self._file = None
        if not self._closed:
            for tmp in self._done:
                tmp.unlink(missing_ok=True)
            self._done.clear()
        self._closed = True

    def summary(self) -> dict:
        seen = self._seen
        if seen is None:  # nothing written: every position is missing, if we know the scan
            seen = np.zeros(self.scan_shape[0] * self.scan_shape[1] if self.scan_shape else 0, dtype=np.uint32)
        return {
            "module": self.module,
            "dst": self.dst,
            "files": [tmp.name[1 : -len(_PARTIAL)] for tmp in self._done],
            "records": self.records,
            "bytes": self.bytes,
            "frame_numbers": self.frame_range,
            "lost_frames": sorted(self.lost),
            "missing_positions": np.flatnonzero(seen == 0).tolist(),
        }


def write_manifest(directory: Path | str, scan_number: int, scan_shape: tuple[int, int], modules: list[dict]) -> Path:
    """Atomically write the scan's manifest from the modules' close() summaries."""
    ranges = [m["frame_numbers"] for m in modules if m["frame_numbers"]]
    lost = sorted([frame, m["module"]] for m in modules for frame in m["lost_frames"])
    # A module may be written by several writers (one per producer thread, told apart by dst):
    # its records add up, and a position is missing only if no writer of the module saw it.
    records: dict[str, int] = {}
    missing_by_module: dict[int, set[int]] = {}
    for m in modules:
        records[str(m["module"])] = records.get(str(m["module"]), 0) + m["records"]
        mine = set(m["missing_positions"])
        missing_by_module[m["module"]] = missing_by_module.get(m["module"], mine) & mine
    missing = sorted([pos, k] for k, positions in missing_by_module.items() for pos in positions)
    present = {m["module"] for m in modules}
    manifest = {
        "format": "stempy-sectors-v5",
        "scan_number": scan_number,
        "scan_width": scan_shape[0],
        "scan_height": scan_shape[1],
        "frame_numbers": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None,
        "records": dict(sorted(records.items())),
        # Numeric order (module, dst, file index), the order scan_files() returns.
        "files": [f for m in sorted(modules, key=lambda m: (m["module"], m["dst"])) for f in m["files"]],
        # lost: sectors the producer knew it dropped, as [frame_number, module];
        # missing: scan positions a module has no record for, as [position, module].
        "lost": lost,
        "missing": missing,
        "complete": not lost and not missing and present == set(range(SECTORS)) and all(records.values()),
    }
    path = manifest_path(directory, scan_number)
    # One key per line, each value compact: readable, and short even with thousands of lost sectors.
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()) + "\n}\n"
    _write_atomically(path, text.encode())
    return path


def read_manifest(directory: Path | str, scan_number: int) -> dict:
    return json.loads(manifest_path(directory, scan_number).read_text())


class ScanWriter(_ClosedOrAborted):
    """The four module writers of one scan plus its manifest, for single-process use."""

    def __init__(self, directory: Path | str, scan_number: int, scan_shape: tuple[int, int], **writer_options):
        self.directory, self.scan_number, self.scan_shape = Path(directory), scan_number, tuple(scan_shape)
        self.writers = [
            SectorFileWriter(directory, scan_number, k, scan_shape=scan_shape, **writer_options) for k in range(SECTORS)
        ]

    def write(self, header: dict, sector: np.ndarray) -> None:
        self.writers[header["module"]].write(header, sector)

    def mark_lost(self, frame_number: int, module: int) -> None:
        self.writers[module].mark_lost(frame_number)

    def close(self) -> Path:
        return write_manifest(self.directory, self.scan_number, self.scan_shape, [w.close() for w in self.writers])

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


OnBad = Callable[[BadRecord], None]


def scan_numbers(directory: Path | str) -> list[int]:
    """The scans that have data files (``data_scan<10 digits>_*.data``) in the directory."""
    found = set()
    for path in Path(directory).glob("data_scan*.data"):
        match = _SCAN_RE.match(path.name)
        if match and path.name.startswith(f"data_scan{int(match[1]):010d}_"):
            found.add(int(match[1]))
    return sorted(found)


def scan_files(directory: Path | str | Iterable[Path | str], scan_number: int,
               on_bad: OnBad | None = None) -> list[Path]:
    """A scan's complete sector files, ordered by module, dst and file index.

    ``directory`` may be several directories (the real receivers spread a scan over drives).
    Unfinished ``.partial`` files are never returned. A data file of the scan whose name
    says no module (no ``module0``..``module3`` before ``.data``) raises RawFileError, or,
    given ``on_bad``, is handed to it as a BadRecord (offset None) and left out.
    """
    report = on_bad or _raise
    directories = [directory] if isinstance(directory, (str, Path)) else list(directory)
    found, bad = [], []
    for d in directories:
        for path in Path(d).glob(f"data_scan{scan_number:010d}_*.data"):
            match = _NAME_RE.search(path.name)
            try:
                key = (module_of(path), *(int(g) for g in match.groups()[2:])) if match else (module_of(path), 0, 0)
            except RawFileError as e:
                bad.append(e.bad)
                continue
            found.append((key, str(path), path))
    for b in sorted(bad):
        report(b)
    return [path for _, _, path in sorted(found)]


def _header_problem(header: dict, scan_number: int | None, scan_shape: tuple[int, int] | None,
                    frame_numbers: tuple[int, int] | None) -> str | None:
    """Why a header cannot be a record of this scan, or None: what stempy would trip over, plus the
    scan's own facts when they are known (its file name's scan number, its manifest's shape and frames)."""
    h = header
    if scan_number is not None and h["scan_number"] != scan_number:
        return f"corrupt header: scan number {h['scan_number']} is not the file name's {scan_number}"
    width, height = h["scan_width"], h["scan_height"]
    if scan_shape is not None and (width, height) != tuple(scan_shape):
        return f"corrupt header: scan shape {width}x{height} is not the scan's {scan_shape[0]}x{scan_shape[1]}"
    if not (h["scan_x"] < width and h["scan_y"] < height):
        return f"corrupt header: scan position ({h['scan_x']}, {h['scan_y']}) is outside the scan ({width}x{height})"
    if frame_numbers is not None and not frame_numbers[0] <= h["frame_number"] <= frame_numbers[1]:
        return (f"corrupt header: frame number {h['frame_number']} is outside the scan's "
                f"{frame_numbers[0]}..{frame_numbers[1]}")
    return None


def _fill(f, view: memoryview) -> int:
    """Read into all of view unless the file ends first; returns the bytes read."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _records(files: Iterable[Path | str], on_bad: OnBad | None, scan_shape, frame_numbers,
             data: bool) -> Iterator[tuple[dict, np.ndarray | None]]:
    """The one reading loop of read_sectors and read_headers, so both take and skip the same records."""
    report = on_bad or _raise
    head = bytearray(HEADER.size)
    for name in files:
        path = Path(name)
        try:
            module = module_of(path)
        except RawFileError as e:
            report(e.bad)
            continue
        named = _SCAN_RE.match(path.name)
        scan_number = int(named[1]) if named else None
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            if on_bad is None:
                raise
            report(BadRecord(path, None, f"cannot be opened: {e.strerror or e}"))
            continue
        with f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while got := _fill(f, memoryview(head)):
                if got < HEADER.size:
                    report(BadRecord(path, offset, f"truncated header: {got} of {HEADER.size} bytes"))
                    break
                header = dict(zip(HEADER_FIELDS, HEADER.unpack(head)))
                problem = _header_problem(header, scan_number, scan_shape, frame_numbers)
                sector = None
                if data and problem is None:
                    sector = np.empty(SECTOR_SHAPE, dtype="<u2")
                    got = _fill(f, memoryview(sector).cast("B"))
                else:  # the sector is not wanted: only whether it is all there
                    got = max(0, min(SECTOR_BYTES, size - offset - HEADER.size))
                    f.seek(offset + RECORD_BYTES)
                if got < SECTOR_BYTES:
                    what = "" if problem else f" (frame {header['frame_number']})"
                    report(BadRecord(path, offset, f"truncated sector data: {got} of {SECTOR_BYTES} bytes{what}"))
                    break
                if problem:
                    report(BadRecord(path, offset, problem))
                else:
                    header["module"] = module
                    yield header, sector
                offset += RECORD_BYTES


def read_sectors(files: Iterable[Path | str], on_bad: OnBad | None = None, *,
                 scan_shape: tuple[int, int] | None = None,
                 frame_numbers: tuple[int, int] | None = None) -> Iterator[tuple[dict, np.ndarray]]:
    """Stream (header, 144x576 uint16 sector) records from the files, one record in memory at a time.

    The header dict has the six header fields plus ``module`` (from the file
    name, as stempy takes it). Records come in file order, untouched: files
    may hold frames out of order.

    A bad record raises RawFileError naming the file and byte offset; given ``on_bad``,
    it is handed to it as a BadRecord instead, and reading goes on. Records have a fixed
    size, so after a corrupt header (a scan number other than the file name's, a position
    outside the scan, or, when given, a shape other than ``scan_shape`` or a frame number
    outside ``frame_numbers``) the next record is read; a truncated record ends its file;
    a file whose name says no module is skipped whole (a BadRecord with offset None).
    """
    return _records(files, on_bad, scan_shape, frame_numbers, data=True)  # type: ignore[return-value]


def read_headers(files: Iterable[Path | str], on_bad: OnBad | None = None, *,
                 scan_shape: tuple[int, int] | None = None,
                 frame_numbers: tuple[int, int] | None = None) -> Iterator[dict]:
    """The headers read_sectors would yield, with the same records skipped, reading only the headers."""
    for header, _ in _records(files, on_bad, scan_shape, frame_numbers, data=False):
        yield header


def describe_bad(bad: list[BadRecord], shown: int = 3) -> str:
    """One line for a file's bad records: how many, and the first few offsets with why."""
    if len(bad) == 1 and bad[0].offset is None:
        return f"{bad[0].path}: skipped: {bad[0].problem}"
    first = "; ".join(f"byte offset {b.offset}: {b.problem}" for b in bad[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    s = "" if len(bad) == 1 else "s"
    return f"{bad[0].path}: skipped {len(bad)} bad record{s} ({first}{more})"
