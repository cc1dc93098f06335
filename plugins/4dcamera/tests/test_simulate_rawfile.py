"""The simulated camera is realistic and reproducible, and its v5 files read back bit-identical in stempy."""

import os

import numpy as np
import pytest

from zpipe_4dcamera import SECTOR_SHAPE, SECTORS
from zpipe_4dcamera import rawfile as rf
from zpipe_4dcamera.simulate import SimulatedCamera

SCAN = 42
ROWS = SECTOR_SHAPE[0]


def expected_frame(cam, i, lost):
    """The frame a reader must return: the simulated one with lost sectors zero-filled."""
    frame = cam.frame(i)
    for k in range(SECTORS):
        if (i, k) in lost:
            frame[k * ROWS : (k + 1) * ROWS] = 0
    return frame


def write_scan(cam, directory, lost, seed=0, **options):
    """Each module's records in its own shuffled order, as unsynchronised receivers write them."""
    order = np.random.default_rng(seed)
    with rf.ScanWriter(directory, cam.scan_number, cam.scan_shape, **options) as writer:
        for k in range(SECTORS):
            for i in order.permutation(cam.n_frames):
                if (i, k) in lost:
                    writer.mark_lost(cam.frame_number(i), k)
                else:
                    writer.write(cam.header(i, k), cam.sector(i, k))


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    # Not square, so a swapped x/y shows up; frame numbers start at 1000.
    cam = SimulatedCamera((16, 12), electrons_per_frame=60, xray_probability=0.2, seed=7,
                          first_frame=1000, scan_number=SCAN, loss=0.02)
    lost = {(i, k) for i in range(cam.n_frames) for k in range(SECTORS) if cam.lost(i, k)}
    lost |= {(5, k) for k in range(SECTORS)}  # one frame lost entirely
    directory = tmp_path_factory.mktemp("scan")
    # Rollover every 7 records gives several files per module, like the real receivers.
    write_scan(cam, directory, lost, max_bytes=7 * rf.RECORD_BYTES)
    return cam, lost, directory


# --- the simulator -------------------------------------------------------------------------

def test_frames_are_reproducible_and_sectors_recombine():
    a = SimulatedCamera((8, 8), electrons_per_frame=80, xray_probability=0.5, seed=3, first_frame=1000)
    b = SimulatedCamera((8, 8), electrons_per_frame=80, xray_probability=0.5, seed=3, first_frame=1000)
    for i in (0, 17, 63):
        frame = a.frame(i)
        assert frame.dtype == np.uint16 and frame.shape == (576, 576)
        np.testing.assert_array_equal(frame, b.frame(i))
        # Each sector simulated alone (as one producer process would) matches the consumer's frame.
        for k in reversed(range(SECTORS)):
            np.testing.assert_array_equal(b.sector(i, k), frame[k * ROWS : (k + 1) * ROWS])
    assert not np.array_equal(a.frame(1), a.frame(2))
    assert not np.array_equal(a.frame(1), SimulatedCamera((8, 8), seed=4).frame(1))


def test_headers_follow_the_scan():
    cam = SimulatedCamera((5, 3), seed=1, first_frame=1000, scan_number=9, frames_per_position=2)
    assert cam.n_frames == 30
    assert cam.header(13, 2) == {"scan_number": 9, "frame_number": 1013, "scan_width": 5, "scan_height": 3,
                                 "scan_x": 1, "scan_y": 1, "module": 2}
    with pytest.raises(IndexError):
        cam.header(30, 0)


def test_background_matches_the_real_detector():
    cam = SimulatedCamera((4, 4), electrons_per_frame=0, seed=11)
    pixels = np.stack([cam.frame(i) for i in range(4)]).astype(np.float64)
    assert abs(pixels.mean() - 20.5) < 0.05
    assert abs(pixels.std() - 2.4) < 0.05


def test_electrons_are_small_bright_clouds():
    cam = SimulatedCamera((4, 4), electrons_per_frame=100, seed=5)
    counts = []
    for i in range(8):
        f = cam.frame(i).astype(np.int32)
        # An electron's cloud peak: a local maximum well above the noise (20.5 + 15 sigma).
        padded = np.pad(f, 1, constant_values=0)
        neighbours = np.stack([padded[1 + dy : 577 + dy, 1 + dx : 577 + dx]
                               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
        peaks = (f > 56) & (f > neighbours.max(axis=0))
        counts.append(peaks.sum())
        assert f.max() < 1000  # no x-rays unless asked
        # Clouds are a few pixels wide: more bright pixels than peaks, but not many more.
        assert peaks.sum() < (f > 45).sum() < 12 * peaks.sum()
    # Poisson(100) per frame; overlapping clouds in the bright-field disk merge a few.
    assert 70 < np.mean(counts) < 110
    assert SimulatedCamera((4, 4), electrons_per_frame=10, seed=5).frame(0).max() < 300


def test_xrays_are_single_hot_pixels():
    cam = SimulatedCamera((4, 4), electrons_per_frame=20, xray_probability=1.0, seed=2)
    for i in range(8):
        f = cam.frame(i)
        assert (f > 1000).sum() == 1
        assert f.max() >= 2000


def test_loss_is_deterministic_and_near_its_rate():
    cam = SimulatedCamera((64, 64), seed=1, loss=0.01)
    lost = [cam.lost(i, k) for i in range(cam.n_frames) for k in range(SECTORS)]
    assert 0.007 < np.mean(lost) < 0.013
    assert lost == [SimulatedCamera((64, 64), seed=1, loss=0.01).lost(i, k)
                    for i in range(cam.n_frames) for k in range(SECTORS)]
    assert not any(SimulatedCamera((8, 8), loss=0.0).lost(i, k) for i in range(64) for k in range(4))
    # Loss never changes the pixels that do arrive.
    np.testing.assert_array_equal(cam.frame(3), SimulatedCamera((64, 64), seed=1).frame(3))


# --- the files, read by stempy and by us ----------------------------------------------------

def test_stempy_reads_every_sector_bit_identical(scan):
    stempy_io = pytest.importorskip("stempy.io")
    cam, lost, directory = scan
    files = rf.scan_files(directory, SCAN)
    assert len(files) > SECTORS  # rollover happened
    reader = stempy_io.reader([str(f) for f in files], version=5, backend="multi-pass")
    width, height = cam.scan_shape
    assert tuple(reader.scan_shape) == (height, width)
    assert reader.num_frames_per_scan == 1
    for i in range(cam.n_frames):
        x, y = cam.scan_position(i)
        if all((i, k) in lost for k in range(SECTORS)):
            # A frame with no sector at all does not exist for stempy.
            with pytest.raises(ValueError, match="out of bounds"):
                reader.read_frames((y, x))
            continue
        (block,) = reader.read_frames((y, x))
        assert list(block.header.image_numbers) == [y * width + x]
        np.testing.assert_array_equal(block.data, expected_frame(cam, i, lost), err_msg=f"frame {i}")


def test_our_reader_returns_what_was_written(scan):
    cam, lost, directory = scan
    files = rf.scan_files(directory, SCAN)
    seen = set()
    for header, sector in rf.read_sectors(files):
        i, k = header["frame_number"] - cam.first_frame, header["module"]
        assert header == cam.header(i, k)
        np.testing.assert_array_equal(sector, cam.sector(i, k))
        seen.add((i, k))
    assert seen == {(i, k) for i in range(cam.n_frames) for k in range(SECTORS)} - lost


def test_manifest_describes_the_scan(scan):
    cam, lost, directory = scan
    manifest = rf.read_manifest(directory, SCAN)
    assert (manifest["scan_width"], manifest["scan_height"]) == cam.scan_shape
    assert manifest["frame_numbers"] == [1000, 1000 + cam.n_frames - 1]
    assert manifest["records"] == {str(k): cam.n_frames - sum(1 for i, m in lost if m == k) for k in range(SECTORS)}
    assert manifest["lost"] == sorted([cam.frame_number(i), k] for i, k in lost)
    assert manifest["missing"] == sorted([i, k] for i, k in lost)  # one frame per position here
    assert manifest["files"] == [f.name for f in rf.scan_files(directory, SCAN)]
    assert manifest["complete"] is False


def test_stempy_and_we_agree_on_independently_written_files(tmp_path):
    stempy_io = pytest.importorskip("stempy.io")
    # Written with numpy's structured dtype from stempy's format documentation, not with our writer.
    record = np.dtype([("scan", "<u4"), ("frame", "<u4"), ("size", "<u2", 2), ("pos", "<u2", 2),
                       ("data", "<u2", SECTOR_SHAPE)])
    cam = SimulatedCamera((3, 2), electrons_per_frame=30, seed=9, first_frame=77, scan_number=3)
    for k in range(SECTORS):
        records = np.zeros(cam.n_frames, dtype=record)
        for j, i in enumerate(reversed(range(cam.n_frames))):
            records[j] = (3, cam.frame_number(i), cam.scan_shape, cam.scan_position(i), cam.sector(i, k))
        records.tofile(tmp_path / rf.file_name(3, k))
    files = rf.scan_files(tmp_path, 3)
    ours = {}
    for header, sector in rf.read_sectors(files):
        frame = ours.setdefault((header["scan_y"], header["scan_x"]), np.zeros((576, 576), np.uint16))
        frame[header["module"] * ROWS : (header["module"] + 1) * ROWS] = sector
    reader = stempy_io.reader([str(f) for f in files], version=5, backend="multi-pass")
    assert len(ours) == cam.n_frames
    for (y, x), frame in ours.items():
        np.testing.assert_array_equal(reader.read_frames((y, x))[0].data, frame)
        np.testing.assert_array_equal(frame, cam.frame(y * 3 + x))


def test_several_frames_per_position_are_ordered_by_frame_number(tmp_path):
    stempy_io = pytest.importorskip("stempy.io")
    cam = SimulatedCamera((4, 2), electrons_per_frame=30, seed=4, first_frame=500, frames_per_position=2)
    write_scan(cam, tmp_path, lost=set(), seed=1)
    reader = stempy_io.reader([str(f) for f in rf.scan_files(tmp_path, cam.scan_number)],
                              version=5, backend="multi-pass")
    assert reader.num_frames_per_scan == 2
    blocks = reader.read_frames((1, 2))  # position 6: frames 12 and 13
    for block, i in zip(blocks, (12, 13)):
        np.testing.assert_array_equal(block.data, cam.frame(i))
    assert rf.read_manifest(tmp_path, cam.scan_number)["complete"] is True


# --- failures ------------------------------------------------------------------------------

@pytest.mark.parametrize("cut, problem", [(rf.RECORD_BYTES + 1000, "truncated sector data"),
                                          (2 * rf.RECORD_BYTES + 9, "truncated header")])
def test_truncated_file_names_file_and_offset(tmp_path, cut, problem):
    cam = SimulatedCamera((2, 2), seed=1, scan_number=4)
    with rf.SectorFileWriter(tmp_path, 4, module=1) as writer:
        for i in range(4):
            writer.write(cam.header(i, 1), cam.sector(i, 1))
    (path,) = rf.scan_files(tmp_path, 4)
    os.truncate(path, cut)
    records = rf.read_sectors([path])
    next(records)
    with pytest.raises(rf.RawFileError, match=problem) as error:
        list(records)
    expected_offset = (cut // rf.RECORD_BYTES) * rf.RECORD_BYTES
    assert error.value.path == path and error.value.offset == expected_offset
    assert str(path) in str(error.value) and f"byte offset {expected_offset}" in str(error.value)


def test_corrupt_header_is_reported(tmp_path):
    path = tmp_path / rf.file_name(4, 0)
    path.write_bytes(rf.HEADER.pack(4, 1, 2, 2, 7, 0) + bytes(rf.SECTOR_BYTES))
    with pytest.raises(rf.RawFileError, match="outside the scan") as error:
        list(rf.read_sectors([path]))
    assert error.value.offset == 0


def test_interrupted_writer_leaves_no_final_file(tmp_path):
    cam = SimulatedCamera((4, 4), seed=1, scan_number=5)
    with pytest.raises(RuntimeError):
        with rf.ScanWriter(tmp_path, 5, cam.scan_shape) as writer:
            for i in range(8):
                for k in range(SECTORS):
                    writer.write(cam.header(i, k), cam.sector(i, k))
            raise RuntimeError("receiver died")
    assert os.listdir(tmp_path) == []
    # A writer killed before close() (no cleanup at all) leaves only hidden partial files.
    crashed = rf.SectorFileWriter(tmp_path, 5, module=0)
    crashed.write(cam.header(0, 0), cam.sector(0, 0))
    crashed._file.flush()
    assert rf.scan_files(tmp_path, 5) == [] and not list(tmp_path.glob("*.data"))
    assert not rf.manifest_path(tmp_path, 5).exists()
    crashed.abort()


def test_writer_rejects_records_stempy_would_misread(tmp_path):
    cam = SimulatedCamera((4, 4), seed=1, scan_number=5)
    with rf.SectorFileWriter(tmp_path, 5, module=0) as writer:
        with pytest.raises(ValueError, match="outside"):
            writer.write({**cam.header(0, 0), "scan_x": 4}, cam.sector(0, 0))
        with pytest.raises(ValueError, match="module"):
            writer.write(cam.header(0, 1), cam.sector(0, 1))
        with pytest.raises(ValueError, match="scan 6"):
            writer.write({**cam.header(0, 0), "scan_number": 6}, cam.sector(0, 0))
    assert rf.scan_files(tmp_path, 5) == []  # nothing was written, so no empty file either


def test_module_comes_from_the_file_name_like_stempy():
    assert rf.module_of("/data/module9/data_scan0000000001_module3_dst1_file2.data") == 3
    with pytest.raises(rf.RawFileError):
        rf.module_of("data_scan0000000001.data")
    assert rf.file_name(12, 2, 1, 3) == "data_scan0000000012_module2_dst1_file3.data"
