"""Damaged version-5 files: every good record is read back bit for bit, every bad one is named.

A small simulated scan is written with rawfile's writers, then damaged the ways disks and copies
damage files: cut short in a header or in a sector, a header overwritten in the middle, junk
appended, a byte inserted, a name without a module. The readers and the replay source must
yield exactly the good records, name the bad ones by file and byte offset, and the source's
plan() must announce exactly what its messages() send.
"""

import logging
import os
import shutil

import numpy as np
import pytest

from zpipe.plugin import Context
from zpipe_4dcamera import SECTORS
from zpipe_4dcamera import rawfile as rf
from zpipe_4dcamera.simulate import SimulatedCamera
from zpipe_4dcamera.sources import RawFileSource

SCAN = 3
SHAPE = (8, 8)
FIRST = 1000
PER_FILE = 20  # records per file: 64 records of a module make files of 20, 20, 20 and 4
R = rf.RECORD_BYTES


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The scan once, with each module's frames in its own shuffled order; layout: file name -> frames."""
    cam = SimulatedCamera(SHAPE, electrons_per_frame=30, xray_probability=0.1, seed=5, first_frame=FIRST,
                          scan_number=SCAN)
    directory = tmp_path_factory.mktemp("written")
    rng = np.random.default_rng(1)
    layout: dict[str, list[int]] = {}
    with rf.ScanWriter(directory, SCAN, SHAPE, max_bytes=PER_FILE * R) as writer:
        for k in range(SECTORS):
            for p, i in enumerate(rng.permutation(cam.n_frames)):
                writer.write(cam.header(i, k), cam.sector(i, k))
                layout.setdefault(rf.file_name(SCAN, k, 0, p // PER_FILE), []).append(int(i))
    return cam, directory, layout


class Damaged:
    """A fresh copy of the scan to damage, which remembers what a reader must skip."""

    def __init__(self, cam, directory, layout):
        self.cam, self.dir, self.layout = cam, directory, layout
        self.skipped: dict[str, set[int]] = {}  # file name -> record indices that must be skipped
        self.ends: dict[str, int] = {}  # file name -> records before the file's truncated tail

    def path(self, module: int, index: int = 0):
        return self.dir / rf.file_name(SCAN, module, 0, index)

    def frame(self, path, record: int) -> int:
        return self.layout[path.name][record]

    def truncate(self, path, size: int) -> None:
        os.truncate(path, size)
        self.ends[path.name] = size // R

    def overwrite_header(self, path, record: int, header: bytes) -> None:
        with open(path, "r+b") as f:
            f.seek(record * R)
            f.write(header)
        self.skipped.setdefault(path.name, set()).add(record)

    def append(self, path, junk: bytes) -> None:
        with open(path, "ab") as f:
            f.write(junk)

    def good(self) -> list[tuple[int, int]]:
        """(frame index, module) of every record a tolerant reader yields, in its order."""
        out = []
        for path in rf.scan_files(self.dir, SCAN):
            frames = self.layout[path.name]
            for r, i in enumerate(frames[: self.ends.get(path.name, len(frames))]):
                if r not in self.skipped.get(path.name, ()):
                    out.append((i, rf.module_of(path)))
        return out

    def check(self, records, ordered: bool = True) -> None:
        """The records are exactly the good ones (in order), bit for bit the simulator's."""
        records = list(records)
        got = [(h["frame_number"] - FIRST, h["module"]) for h, _ in records]
        assert (got if ordered else sorted(got)) == (self.good() if ordered else sorted(self.good()))
        for header, sector in records:
            i, k = header["frame_number"] - FIRST, header["module"]
            assert header == self.cam.header(i, k)
            np.testing.assert_array_equal(sector, self.cam.sector(i, k), err_msg=f"frame {i} sector {k}")


@pytest.fixture
def scan(written, tmp_path):
    cam, source, layout = written
    shutil.copytree(source, tmp_path / "scan")
    return Damaged(cam, tmp_path / "scan", layout)


def tolerant(files, **checks):
    bad = []
    records = list(rf.read_sectors(files, bad.append, **checks))
    return records, bad


# --- the reader ------------------------------------------------------------------------------

def test_undamaged_scan_reads_whole(scan):
    records, bad = tolerant(rf.scan_files(scan.dir, SCAN), scan_shape=SHAPE, frame_numbers=(FIRST, FIRST + 63))
    assert bad == [] and len(records) == 64 * SECTORS
    scan.check(records)


def test_file_cut_in_a_sector_yields_the_records_before_it(scan):
    path = scan.path(1, 1)
    scan.truncate(path, 3 * R + rf.HEADER.size + 1000)
    records, bad = tolerant(rf.scan_files(scan.dir, SCAN))
    assert bad == [rf.BadRecord(path, 3 * R, f"truncated sector data: 1000 of {rf.SECTOR_BYTES} bytes "
                                             f"(frame {FIRST + scan.frame(path, 3)})")]
    assert len(records) == 64 * SECTORS - (PER_FILE - 3)
    scan.check(records)
    assert str(bad[0]) == f"{path}: {bad[0].problem} (record at byte offset {3 * R})"


def test_file_cut_in_a_header_yields_the_records_before_it(scan):
    path = scan.path(2, 0)
    scan.truncate(path, 5 * R + 7)
    records, bad = tolerant(rf.scan_files(scan.dir, SCAN))
    assert bad == [rf.BadRecord(path, 5 * R, "truncated header: 7 of 16 bytes")]
    scan.check(records)


@pytest.mark.parametrize("kind, problem", [
    ("garbage", "corrupt header: scan number 4058335883 is not the file name's 3"),
    ("position", "corrupt header: scan position (9, 0) is outside the scan (8x8)"),
    ("shape", "corrupt header: scan shape 16x4 is not the scan's 8x8"),
    ("frame", "corrupt header: frame number 5000 is outside the scan's 1000..1063"),
])
def test_corrupt_header_in_the_middle_is_skipped_and_reading_goes_on(scan, kind, problem):
    path = scan.path(0, 1)
    header = {"garbage": np.random.default_rng(7).bytes(16),
              "position": rf.HEADER.pack(SCAN, 1001, 8, 8, 9, 0),
              "shape": rf.HEADER.pack(SCAN, 1001, 16, 4, 1, 1),
              "frame": rf.HEADER.pack(SCAN, 5000, 8, 8, 1, 1)}[kind]
    scan.overwrite_header(path, 2, header)
    records, bad = tolerant(rf.scan_files(scan.dir, SCAN), scan_shape=SHAPE, frame_numbers=(FIRST, FIRST + 63))
    assert bad == [rf.BadRecord(path, 2 * R, problem)]
    assert len(records) == 64 * SECTORS - 1
    scan.check(records)
    # Unchecked by default (stempy has no such facts either): only the scan's own.
    if kind in ("shape", "frame"):
        assert len(tolerant(rf.scan_files(scan.dir, SCAN))[0]) == 64 * SECTORS


def test_appended_junk_is_named_and_the_file_read_whole(scan):
    path = scan.path(3, 3)  # the short last file: 4 records
    junk = np.random.default_rng(3).bytes(R + 100)
    scan.append(path, junk)
    scan.append(scan.path(3, 0), b"0123456789")
    records, bad = tolerant(rf.scan_files(scan.dir, SCAN))
    number = int.from_bytes(junk[:4], "little")
    assert bad == [rf.BadRecord(scan.path(3, 0), PER_FILE * R, "truncated header: 10 of 16 bytes"),
                   rf.BadRecord(path, 4 * R, f"corrupt header: scan number {number} is not the file name's 3"),
                   rf.BadRecord(path, 5 * R, f"truncated sector data: 84 of {rf.SECTOR_BYTES} bytes")]
    assert len(records) == 64 * SECTORS
    scan.check(records)


def test_a_shifted_file_is_all_bad_and_the_others_still_read(scan):
    path = scan.path(1, 0)
    data = path.read_bytes()
    path.write_bytes(b"\0" + data)  # one byte inserted: every record of the file is misaligned
    scan.skipped[path.name] = set(range(PER_FILE))
    records, bad = tolerant(rf.scan_files(scan.dir, SCAN))
    assert [b.offset for b in bad] == [r * R for r in range(PER_FILE + 1)]
    assert all(b.path == path for b in bad)
    assert all(b.problem.startswith("corrupt header: scan number") for b in bad[:-1])
    assert bad[-1].problem == "truncated header: 1 of 16 bytes"  # the last record's final byte
    scan.check(records)


def test_strict_reading_still_stops_at_the_first_bad_record(scan):
    path = scan.path(0, 1)
    scan.overwrite_header(path, 2, rf.HEADER.pack(SCAN, 1001, 8, 8, 9, 0))
    with pytest.raises(rf.RawFileError, match="outside the scan") as error:
        list(rf.read_sectors(rf.scan_files(scan.dir, SCAN)))
    assert error.value.path == path and error.value.offset == 2 * R


def damage_everything(scan) -> list[str]:
    """Several kinds of damage at once, in files of every module; returns the damaged files' names."""
    cut, junk, corrupt, shifted = scan.path(0, 0), scan.path(1, 3), scan.path(2, 1), scan.path(3, 2)
    scan.truncate(cut, 7 * R + 100)
    scan.append(junk, np.random.default_rng(4).bytes(2 * R + 5))
    scan.overwrite_header(corrupt, 0, rf.HEADER.pack(SCAN, 1001, 8, 8, 8, 8))
    scan.overwrite_header(corrupt, 19, rf.HEADER.pack(SCAN + 1, 1001, 8, 8, 1, 1))
    shifted.write_bytes(shifted.read_bytes()[1:])  # one byte lost: all 20 records misaligned
    scan.skipped[shifted.name] = set(range(PER_FILE))
    return [p.name for p in (cut, junk, corrupt, shifted)]


def test_reading_headers_only_takes_and_skips_the_same_records(scan):
    damage_everything(scan)
    files = rf.scan_files(scan.dir, SCAN)
    records, bad = tolerant(files, scan_shape=SHAPE)
    scan.check(records)
    bad_headers = []
    headers = list(rf.read_headers(files, bad_headers.append, scan_shape=SHAPE))
    assert headers == [h for h, _ in records]
    assert bad_headers == bad and len(bad) == 1 + 3 + 2 + PER_FILE


# --- the replay source -----------------------------------------------------------------------

def sources(directory, replicas: int, threads: int, **params):
    for replica in range(replicas):
        for thread in range(threads):
            src = RawFileSource(RawFileSource.Params(directory=str(directory), **params))
            src.setup(Context("producer", replica, replicas, thread, threads))
            yield src


def replay(directory, replicas: int, threads: int):
    """Every producer thread's plan() then messages(), as producers call them; checks that they agree."""
    messages, bad = [], []
    for src in sources(directory, replicas, threads):
        (scan,) = list(src.scans())
        plan = list(src.plan(scan, src.ctx.thread, threads))
        sent = list(src.messages(scan, src.ctx.thread, threads))
        assert plan == [m.header for m in sent]
        assert all(h["scan"] == SCAN for h in plan)
        messages += sent
        bad += src.bad_records(SCAN)
        assert src.bad_records() == src.bad_records(SCAN)
    return scan, messages, bad


@pytest.mark.parametrize("replicas, threads", [(4, 2), (1, 3)])
def test_source_sends_every_good_record_and_names_each_bad_one_once(scan, caplog, replicas, threads):
    damaged = damage_everything(scan)
    _, expected_bad = tolerant(rf.scan_files(scan.dir, SCAN), scan_shape=SHAPE, frame_numbers=(FIRST, FIRST + 63))
    with caplog.at_level(logging.WARNING):
        replayed, messages, bad = replay(scan.dir, replicas, threads)
    assert replayed.meta["scan_shape"] == list(SHAPE) and replayed.meta["frame_numbers"] == [FIRST, FIRST + 63]
    assert [m.header.pop("scan") for m in messages] == [SCAN] * len(scan.good())
    scan.check([(m.header, m.payload) for m in messages], ordered=False)
    assert sorted(bad) == sorted(expected_bad)
    # One line per damaged file (not per record), naming it, the count and the first offsets.
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == len(damaged)
    for name in damaged:
        (line,) = [m for m in lines if name in m]
        count = sum(1 for b in bad if b.path.name == name)
        first = [b.offset for b in bad if b.path.name == name][:3]
        assert f"skipped {count} bad record" in line
        assert all(f"byte offset {o}:" in line for o in first)
    shifted = next(m for m in lines if damaged[3] in m)
    assert f"; and {PER_FILE - 3} more)" in shifted


def test_source_replays_without_a_manifest_or_with_a_corrupt_one(scan, caplog):
    manifest = rf.manifest_path(scan.dir, SCAN)
    for text in (None, "{not json", '{"scan_width": "8", "scan_height": 8}', "[]"):
        if text is None:
            manifest.unlink()
        else:
            manifest.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            replayed, messages, bad = replay(scan.dir, 4, 2)
        assert bad == [] and len(messages) == 64 * SECTORS
        assert "scan_shape" not in replayed.meta
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if text is None:
            assert warnings == []
        else:  # said once, by the first replica's first thread
            (line,) = warnings
            assert str(manifest) in line and "replaying the files without it" in line


def test_data_files_naming_no_sector_are_named_once_and_skipped(scan, caplog):
    good = scan.path(0, 0).read_bytes()
    names = [f"data_scan{SCAN:010d}_moduleX_dst0_file0.data",
             f"data_scan{SCAN:010d}_module7_dst0_file0.data",
             f"data_scan{SCAN:010d}_dst0_file0.data"]
    for name in names:
        (scan.dir / name).write_bytes(good)
    unnamed = []
    assert rf.scan_files(scan.dir, SCAN, unnamed.append) == rf.scan_files(scan.dir, SCAN, lambda b: None)
    assert sorted(b.path.name for b in unnamed) == sorted(names)
    assert all(b.offset is None and "file name has no module0..module3" in b.problem for b in unnamed)
    with pytest.raises(rf.RawFileError, match="no module"):
        rf.scan_files(scan.dir, SCAN)
    with caplog.at_level(logging.WARNING):
        _, messages, bad = replay(scan.dir, 4, 2)
    assert len(messages) == 64 * SECTORS
    assert sorted(bad) == sorted(unnamed)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == len(names) and all(any(n in line and "skipped:" in line for line in lines) for n in names)


def test_nothing_to_replay_is_one_line_naming_the_directory(tmp_path, scan):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("no data here")
    (tmp_path / "other" / f".data_scan{SCAN:010d}_module0_dst0_file0.data.partial").write_bytes(b"")
    for d in (empty, tmp_path / "other"):
        with pytest.raises(ValueError) as error:
            RawFileSource.check_replay(str(d), None)
        assert str(error.value) == f"{d}: no data_scan*.data files"
    RawFileSource.check_replay(str(scan.dir), None)
    RawFileSource.check_replay(str(scan.dir), [SCAN])
    with pytest.raises(ValueError) as error:
        RawFileSource.check_replay(str(scan.dir), [SCAN, 9])
    assert str(error.value) == f"{scan.dir}: no data files of scan 9 (scan there: {SCAN})"
