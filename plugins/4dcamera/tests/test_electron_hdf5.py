"""The electron-count analysis and its HDF5 file give stempy's events, in streaming and file workflows alike."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import uuid
import warnings

import numpy as np
import pytest

from zpipe.plugin import Batch, Context, Scan
from zpipe.testing import make
from zpipe_4dcamera import SECTOR_SHAPE, SECTORS
from zpipe_4dcamera import rawfile as rf
from zpipe_4dcamera.counting import count_frame
from zpipe_4dcamera.electron import ElectronCounting
from zpipe_4dcamera.filecount import count_files
from zpipe_4dcamera.hdf5 import CountedFrames, read_electron_counts, write_electron_counts
from zpipe_4dcamera.simulate import SimulatedCamera

stempy_image = pytest.importorskip("stempy.image", reason="stempy is the reference (the test extra)")
stempy_io = pytest.importorskip("stempy.io")
from stempy import _image as stempy_native  # noqa: E402

ROWS = SECTOR_SHAPE[0]
SCAN = 7


# ---------------------------------------------------------------- a node group, in-process

class Data:
    """A simulated scan with lost sectors: frames as the assembler hands them out."""

    def __init__(self, shape=(12, 10), seed=5, loss=0.03, lost_frames=(), frames_per_position=1):
        self.cam = SimulatedCamera(shape, electrons_per_frame=60, xray_probability=0.3, seed=seed,
                                   first_frame=1000, scan_number=SCAN, loss=loss,
                                   frames_per_position=frames_per_position)
        self.lost_frames = set(lost_frames)  # all four sectors lost: the frame never shows up
        self.items = []
        for i in range(self.cam.n_frames):
            missing = [k for k in range(SECTORS) if self.cam.lost(i, k)]
            if i in self.lost_frames or len(missing) == SECTORS:
                continue
            frame = self.cam.frame(i)
            for k in missing:
                frame[k * ROWS : (k + 1) * ROWS] = 0
            header = {k: v for k, v in self.cam.header(i, 0).items() if k != "module"}
            self.items.append(({**header, "complete": not missing, "missing": missing}, frame))
        assert any(not h["complete"] for h, _ in self.items), "the tests need incomplete frames"

    def write_v5(self, directory):
        """The same frames as stempy v5 files, each module's records shuffled."""
        order = np.random.default_rng(1)
        with rf.ScanWriter(directory, SCAN, self.cam.scan_shape, max_bytes=9 * rf.RECORD_BYTES) as w:
            for k in range(SECTORS):
                for i in order.permutation(self.cam.n_frames):
                    if i in self.lost_frames or self.cam.lost(i, k):
                        w.mark_lost(self.cam.frame_number(i), k)
                    else:
                        w.write(self.cam.header(i, k), self.cam.sector(i, k))
        return [str(p) for p in rf.scan_files(directory, SCAN)]


def run_workers(data, params, workers=3, batch=8, route=None):
    """What a node group does: one instance per worker thread, each getting its frames (complete
    ones first) in batches from a reused buffer; returns each worker's figures and results."""
    node = f"test-{uuid.uuid4().hex[:8]}"
    route = route or (lambda header: header["frame_number"] % workers)
    mine = [[] for _ in range(workers)]
    for header, frame in data.items:
        mine[route(header)].append((header, frame))
    instances = [make(ElectronCounting, params, Context(node=node, thread=t, threads=workers)) for t in range(workers)]
    figures, results, errors = [None] * workers, [None] * workers, []
    scan = Scan(SCAN)

    def work(t):
        try:
            plugin, items = instances[t], sorted(mine[t], key=lambda it: not it[0]["complete"])
            buffer = np.empty((batch, *data.items[0][1].shape), np.uint16)
            if items:
                plugin.begin(scan)
            for i in range(0, len(items), batch):
                chunk = items[i : i + batch]
                for j, (_, frame) in enumerate(chunk):
                    buffer[j] = frame
                plugin.process(Batch(scan, buffer[: len(chunk)], [h for h, _ in chunk]))
                buffer[:] = 0xFFFF  # reused: whatever the plugin kept without copying is now garbage
            figures[t] = plugin.finish(scan)
            results[t] = plugin.counted(scan)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    return figures, results


def per_frame(counted):
    """frame number -> (position, events)."""
    return {int(f): (int(p), counted.events[counted.offsets[i] : counted.offsets[i + 1]])
            for i, (p, f) in enumerate(zip(counted.positions, counted.frame_numbers))}


def stempy_frame(frame, background, xray, dark=None, gain=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stempy_image.electron_count_frame(frame, darkreference=dark, background_threshold=background,
                                                   xray_threshold=xray, gain=gain)
    return np.asarray(result.data[0, 0], np.uint32)


@pytest.fixture(scope="module")
def data():
    return Data(lost_frames=(17,))


@pytest.fixture(scope="module")
def v5_files(data, tmp_path_factory):
    return data.write_v5(tmp_path_factory.mktemp("v5"))


# ---------------------------------------------------------------- counting in the workers

@pytest.mark.parametrize("references", [False, True])
def test_fixed_thresholds_give_stempys_events(data, tmp_path, references):
    params = {"background_threshold": 31.5, "xray_threshold": 1500.0}
    dark = gain = None
    if references:
        rng = np.random.default_rng(2)
        dark = rng.uniform(0, 4, (576, 576)).astype(np.float32)
        gain = rng.uniform(0.9, 1.1, (576, 576)).astype(np.float32)
        np.save(tmp_path / "dark.npy", dark)
        np.save(tmp_path / "gain.npy", gain)
        params.update(dark=str(tmp_path / "dark.npy"), gain=str(tmp_path / "gain.npy"))
    figures, results = run_workers(data, params)
    counted = per_frame(CountedFrames.concat(results))
    assert len(counted) == len(data.items)
    for header, frame in data.items:
        position, events = counted[header["frame_number"]]
        assert position == header["scan_y"] * header["scan_width"] + header["scan_x"]
        assert np.array_equal(events, stempy_frame(frame, 31.5, 1500.0, dark, gain)), header
    assert sum(f["frames"] for f in figures) == len(data.items)
    assert sum(f["incomplete_frames"] for f in figures) == sum(not h["complete"] for h, _ in data.items)
    assert sum(f["events"] for f in figures) == sum(len(e) for _, e in counted.values())
    assert all(f["thresholds"] == {"threshold_calculated": False, "background_threshold": 31.5,
                                   "x_ray_threshold": 1500.0} for f in figures)
    assert sum(f["sampled_frames"] + f["uncounted_frames"] for f in figures) == 0


def test_computed_thresholds_are_one_set_close_to_stempys(data):
    """Fewer samples than complete frames: the pool fills mid-scan and its filler computes them."""
    figures, results = run_workers(data, {"number_of_samples": 40}, workers=4, batch=5)
    sets = [f["thresholds"] for f in figures]
    assert all(s == sets[0] for s in sets) and sets[0]["threshold_calculated"]
    assert sets[0]["number_of_samples"] == 40 == sum(f["sampled_frames"] for f in figures)
    complete = np.stack([frame for h, frame in data.items if h["complete"]])
    blocks = [b._block for b in stempy_io.PyReader(complete, np.arange(len(complete), dtype=np.uint32),
                                                    (len(complete), 1), 32, len(complete))]
    expected = stempy_native.calculate_thresholds(blocks, 40, 4.5, 175.0)
    assert sets[0]["background_threshold"] == pytest.approx(expected.background_threshold, rel=0.01)
    counted = per_frame(CountedFrames.concat(results))
    for header, frame in data.items:
        expected_events = count_frame(frame, sets[0]["background_threshold"], sets[0]["x_ray_threshold"])
        assert np.array_equal(counted[header["frame_number"]][1], expected_events)


def test_small_scan_waits_for_every_worker_and_an_idle_worker_finishes(data):
    """More samples wanted than complete frames exist: every complete frame is sampled, once all
    workers are done; worker 2 gets no frame at all and only finish() is called on it."""
    figures, results = run_workers(data, {"number_of_samples": 10_000}, workers=3,
                                   route=lambda h: h["frame_number"] % 2)
    n_complete = sum(h["complete"] for h, _ in data.items)
    assert [f["thresholds"]["number_of_samples"] for f in figures[:2]] == [n_complete] * 2
    assert figures[2]["frames"] == 0 and results[2] is not None and len(results[2]) == 0
    assert sum(f["frames"] for f in figures) == len(data.items) and not any(f["uncounted_frames"] for f in figures)


def test_params_are_checked():
    with pytest.raises(ValueError, match="both"):
        ElectronCounting.Params(background_threshold=30)
    with pytest.raises(ValueError):
        ElectronCounting.Params(number_of_sample=10)  # a typo is an error, not a default


# ---------------------------------------------------------------- the file

def test_file_loads_in_stempy(tmp_path):
    """Two frames per position and a frame lost entirely: the file stays dense, as stempy needs."""
    data = Data(shape=(6, 5), frames_per_position=2, lost_frames=(9,))
    _, results = run_workers(data, {"background_threshold": 31.5, "xray_threshold": 1500.0})
    counted = CountedFrames.concat(results)
    path = counted.write(tmp_path / "scan.h5", report={"ok": True, "analyses": {"electron-count": {"events": 3}}})
    array = stempy_io.load_electron_counts(str(path))
    assert array.scan_shape == (5, 6) and array.frame_shape == (576, 576) and array.data.shape == (30, 2)
    assert array.metadata["electron_counting"]["background_threshold"] == 31.5
    mine = per_frame(counted)
    for i in range(data.cam.n_frames):
        x, y = data.cam.scan_position(i)
        got = array.data[y * 6 + x, i % 2]
        expected = mine[data.cam.frame_number(i)][1] if i != 9 else []
        assert np.array_equal(got, expected), i
    back = read_electron_counts(path)
    assert back["zpipe"]["padding_entries"] == 1 and back["padding_entries"].tolist() == [9]
    assert back["zpipe"]["analyses.electron-count.events"] == 3 and back["report"]["ok"] is True


def test_file_is_the_same_whatever_the_order_of_frames(data, tmp_path):
    _, results = run_workers(data, {"background_threshold": 31.5, "xray_threshold": 1500.0})
    counted = CountedFrames.concat(results)
    shuffled = np.random.default_rng(0).permutation(len(counted))
    parts = [CountedFrames(counted.positions[[i]], counted.frame_numbers[[i]],
                           np.array([0, counted.offsets[i + 1] - counted.offsets[i]]),
                           counted.events[counted.offsets[i] : counted.offsets[i + 1]], counted.meta) for i in shuffled]
    a = counted.write(tmp_path / "a.h5")
    b = CountedFrames.concat(parts).write(tmp_path / "b.h5")
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob(".*partial"))


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="offsets"):
        write_electron_counts(tmp_path / "x.h5", (2, 2), [0, 1], [0, 1], np.zeros(2, np.uint32), {})
    with pytest.raises(ValueError, match="positions"):
        write_electron_counts(tmp_path / "x.h5", (2, 2), [4], [0, 0], np.zeros(0, np.uint32), {})
    assert not list(tmp_path.iterdir())


def same_counts(a, b):
    fa, fb = read_electron_counts(a), read_electron_counts(b)
    for key in ("version", "scan_shape", "frame_shape", "frames_per_position", "electron_counting"):
        assert fa[key] == fb[key], key
    assert np.array_equal(fa["scan_positions"], fb["scan_positions"])
    assert all(np.array_equal(x, y) for x, y in itertools.zip_longest(fa["frames"], fb["frames"]))


# ---------------------------------------------------------------- streaming vs files vs stempy

def test_streaming_and_file_workflows_write_the_same_file(data, v5_files, tmp_path):
    """Computed thresholds too: asking for more samples than complete frames, both sample all of them."""
    params = {"number_of_samples": 10_000}
    _, results = run_workers(data, params, workers=3)
    streamed = CountedFrames.concat(results).write(tmp_path / "streamed.h5")
    figures = count_files(v5_files, tmp_path / "files.h5", **params)
    assert figures["incomplete_frames"] > 0 and figures["frames"] == len(data.items)
    same_counts(streamed, tmp_path / "files.h5")
    assert read_electron_counts(streamed)["electron_counting"]["threshold_calculated"]


def test_one_worker_in_order_samples_what_the_file_workflow_samples(data, v5_files, tmp_path):
    params = {"number_of_samples": 25}
    _, results = run_workers(data, params, workers=1)
    streamed = CountedFrames.concat(results).write(tmp_path / "streamed.h5")
    count_files(v5_files, tmp_path / "files.h5", **params)
    same_counts(streamed, tmp_path / "files.h5")


def test_stempys_file_workflow_gives_the_same_events(data, v5_files, tmp_path):
    reader = stempy_io.reader(v5_files, version=5, backend="multi-pass")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = stempy_image.electron_count(reader, number_of_samples=40, background_threshold_n_sigma=4.5,
                                             xray_threshold_n_sigma=175)
    t = theirs.metadata["electron_counting"]
    mine = count_files(v5_files, tmp_path / "ours.h5", number_of_samples=40)
    assert mine["thresholds"]["background_threshold"] == pytest.approx(t["background_threshold"], rel=0.01)
    # With stempy's thresholds, event for event (stempy's files workflow counts incomplete frames too).
    count_files(v5_files, tmp_path / "same.h5", background_threshold=t["background_threshold"],
                xray_threshold=t["x_ray_threshold"])
    ours = read_electron_counts(tmp_path / "same.h5")
    assert len(ours["frames"]) == len(theirs.data) == data.cam.n_frames
    for position, frames in enumerate(theirs.data):
        assert np.array_equal(ours["frames"][position], np.sort(frames[0])), position


def test_command_line(v5_files, tmp_path):
    out = tmp_path / "cli.h5"
    done = subprocess.run([sys.executable, "-m", "zpipe_4dcamera.filecount", *v5_files, "-o", str(out),
                           "--background-threshold", "31.5", "--xray-threshold", "1500"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count_files(v5_files, tmp_path / "api.h5", background_threshold=31.5, xray_threshold=1500.0)
    same_counts(out, tmp_path / "api.h5")
    bad = subprocess.run([sys.executable, "-m", "zpipe_4dcamera.filecount", *v5_files, "-o", str(out),
                          "--background-threshold", "31.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "both" in bad.stderr
