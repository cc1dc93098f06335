"""Electron counting in the pipeline: one stempy-layout HDF5 file per scan, the same with and without MPI."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from support import TOPOLOGIES, zpipe

BACKGROUND, XRAY = 30.0, 2000.0  # fixed, so every run and every node group counts with the same cut


def counting_topology(tmp_path) -> str:
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text()
    text = text.replace("scan_shape: [64, 64]", "scan_shape: [16, 16]\n      xray_probability: 0.2")
    old = "      - plugin: electron-count"
    assert old in text
    text = text.replace(old, f"      - plugin: electron-count\n        params: {{background_threshold: {BACKGROUND}, "
                             f"xray_threshold: {XRAY}}}")
    f = tmp_path / "counting.yaml"
    f.write_text(text)
    return str(f)


def entries(path: Path):
    from zpipe_4dcamera.hdf5 import read_electron_counts

    return read_electron_counts(path)


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_mpi_and_plain_runs_write_the_same_file_that_stempy_loads_and_agrees_with(tmp_path):
    stempy_io = pytest.importorskip("stempy.io")
    stempy_image = pytest.importorskip("stempy.image")
    from zpipe_4dcamera.simulate import SimulatedCamera

    path = counting_topology(tmp_path)
    plain, mpi = tmp_path / "plain", tmp_path / "mpi"
    res = zpipe("run", path, "--output-dir", str(plain), timeout=110)
    assert res.returncode == 0, res.stderr
    assert f"electron-count wrote {plain}/scan_1_electrons.h5" in res.stdout
    mpiexec = Path(sys.executable).with_name("mpiexec")
    res = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "zpipe", "run", path, "--output-dir", str(mpi)],
                         capture_output=True, text=True, timeout=110, env={**os.environ})
    assert res.returncode == 0, res.stdout + res.stderr
    a, b = entries(plain / "scan_1_electrons.h5"), entries(mpi / "scan_1_electrons.h5")
    assert a["version"] == b["version"] == 3 and a["scan_shape"] == b["scan_shape"] == (16, 16)
    assert len(a["frames"]) == len(b["frames"]) == 256
    assert all(np.array_equal(x, y) for x, y in zip(a["frames"], b["frames"]))
    assert a["electron_counting"]["background_threshold"] == b["electron_counting"]["background_threshold"] == BACKGROUND
    assert a["report"]["complete"] == b["report"]["complete"] == 256

    loaded = stempy_io.load_electron_counts(str(mpi / "scan_1_electrons.h5"))
    assert tuple(loaded.scan_shape) == (16, 16)
    cam = SimulatedCamera(scan_shape=(16, 16), xray_probability=0.2, seed=1, first_frame=1000)
    total = 0
    for i in range(cam.n_frames):
        x, y = cam.scan_position(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = stempy_image.electron_count_frame(cam.frame(i), background_threshold=BACKGROUND,
                                                       xray_threshold=XRAY)
        expected = np.asarray(theirs.data[0, 0], np.uint32)
        ours = np.asarray(loaded.data[y * 16 + x, 0], np.uint32)
        assert np.array_equal(np.sort(ours), np.sort(expected)), f"frame {i}"
        total += len(expected)
    assert total == a["report"]["analyses"]["electron-count"]["events"] > 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("electrons, background", [(0, 1000.0), (0.3, 30.0)], ids=["dark", "some-empty-frames"])
def test_a_dark_scan_and_empty_frames_are_written_and_stempy_agrees(tmp_path, electrons, background):
    """A dark scan (no event in any frame) and one where many frames are empty: the file is written,
    stempy loads it, and the events are stempy's own (none, where there are none)."""
    stempy_io = pytest.importorskip("stempy.io")
    stempy_image = pytest.importorskip("stempy.image")
    from zpipe_4dcamera.simulate import SimulatedCamera

    text = Path(counting_topology(tmp_path)).read_text()
    text = text.replace("xray_probability: 0.2", "xray_probability: 0")
    text = text.replace("electrons_per_frame: 40", f"electrons_per_frame: {electrons}")
    text = text.replace(f"background_threshold: {BACKGROUND}", f"background_threshold: {background}")
    path = tmp_path / "dark.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    res = zpipe("run", str(path), "--output-dir", str(out), timeout=170)
    assert res.returncode == 0, res.stderr
    h5 = out / "scan_1_electrons.h5"
    loaded = stempy_io.load_electron_counts(str(h5))
    assert tuple(loaded.scan_shape) == (16, 16)
    cam = SimulatedCamera(scan_shape=(16, 16), electrons_per_frame=electrons, xray_probability=0, seed=1,
                          first_frame=1000)
    empty = 0
    for i in range(cam.n_frames):
        x, y = cam.scan_position(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = stempy_image.electron_count_frame(cam.frame(i), background_threshold=background,
                                                       xray_threshold=XRAY)
        expected = np.sort(np.asarray(theirs.data[0, 0], np.uint32))
        ours = np.sort(np.asarray(loaded.data[y * 16 + x, 0], np.uint32))
        assert np.array_equal(ours, expected), f"frame {i}"
        empty += len(expected) == 0
    assert empty == cam.n_frames if electrons == 0 else 0 < empty < cam.n_frames
