"""Raw sector files in stempy's version-5 format: the disk fallback every stempy/py4DSTEM user can open."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

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
_PARTIAL = ".partial"


class RawFileError(ValueError):
    """A record that cannot be read; names the file and the byte offset of the record."""

    def __init__(self, path: Path | str, offset: int | None, problem: str):
        where = "" if offset is None else f" (record at byte offset {offset})"
        super().__init__(f"{path}: {problem}{where}")
        self.path, self.offset = Path(path), offset


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


def scan_files(directory: Path | str | Iterable[Path | str], scan_number: int) -> list[Path]:
    """A scan's complete sector files, ordered by module, dst and file index.

    ``directory`` may be several directories (the real receivers spread a scan over drives).
    Unfinished ``.partial`` files are never returned.
    """
    directories = [directory] if isinstance(directory, (str, Path)) else list(directory)
    found = []
    for d in directories:
        for path in Path(d).glob(f"data_scan{scan_number:010d}_module*.data"):
            match = _NAME_RE.search(path.name)
            key = tuple(int(g) for g in match.groups()[1:]) if match else (module_of(path), 0, 0)
            found.append((key, str(path), path))
    return [path for _, _, path in sorted(found)]


def read_sectors(files: Iterable[Path | str]) -> Iterator[tuple[dict, np.ndarray]]:
    """Stream (header, 144x576 uint16 sector) records from the files, one record in memory at a time.

    The header dict has the six header fields plus ``module`` (from the file
    name, as stempy takes it). Records come in file order, untouched: files
    may hold frames out of order. A truncated or impossible record raises
    RawFileError naming the file and byte offset.
    """
    for path in files:
        module = module_of(path)
        named = _NAME_RE.search(Path(path).name)
        with open(path, "rb") as f:
            offset = 0
            while head := f.read(HEADER.size):
                if len(head) < HEADER.size:
                    raise RawFileError(path, offset, f"truncated header: {len(head)} of {HEADER.size} bytes")
                header = dict(zip(HEADER_FIELDS, HEADER.unpack(head)))
                if not (header["scan_x"] < header["scan_width"] and header["scan_y"] < header["scan_height"]):
                    raise RawFileError(path, offset, f"corrupt header {header}: scan position outside the scan")
                if named and header["scan_number"] != int(named[1]):
                    raise RawFileError(path, offset, f"corrupt header {header}: not the scan in the file name")
                sector = np.empty(SECTOR_SHAPE, dtype="<u2")
                got = f.readinto(sector.view(np.uint8))
                if got < SECTOR_BYTES:
                    raise RawFileError(path, offset, f"truncated sector data: {got} of {SECTOR_BYTES} bytes")
                header["module"] = module
                yield header, sector
                offset += RECORD_BYTES
