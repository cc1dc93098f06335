"""The built-in 4D-STEM analyses (virtual detectors, centre of mass) against plain numpy, in process and end to end.

In process, through zpipe.testing.run_analysis (the real workers, assembly and merges), on random
frames with lost frames and sectors. End to end, on a non-square simulated scan (32 x 24), through
`zpipe run`, `zpipe replay` of the same scan gone to disk, and `mpiexec -n 2 zpipe run`: the images
written must be bit-identical to numpy's on the simulator's frames.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from support import zpipe
from zpipe.testing import run_analysis
from zpipe_4dcamera.analyses import CentreOfMass, VirtualDetectors

DETECTORS = {"bf": {"centre": [288, 288], "outer": 40}, "adf": {"centre": [288, 288], "inner": 60, "outer": 250}}
TOPOLOGY = """\
name: stem
nodes:
  producer:
    role: producer
    plugin: 4dcamera-sim
    replicas: 4
    threads: 2
    params: {scan_shape: [32, 24], electrons_per_frame: 40, first_frame: 1000, loss: LOSS, seed: 3}
    fallback: fallback
    fallback_wait: WAIT
    sockets:
      data: {pattern: push, connect: aggregator.in}
  aggregator:
    role: aggregator
    threads: 4
    route: frame_number
    sockets:
      in: {pattern: pull}
      out: {pattern: push, connect: nodegroup.data}
  nodegroup:
    role: nodegroup
    replicas: 2
    threads: 4
    workers: 2
    batch: 8
    assemble: {key: frame_number, part: module, parts: 4, shape: [144, 576], dtype: uint16}
    analyses:
      - plugin: virtual-detectors
        name: vd
        params:
          detectors:
            bf: {centre: [288, 288], outer: 40}
            adf: {centre: [288, 288], inner: 60, outer: 250}
      - plugin: centre-of-mass
        name: com
      - plugin: framesum
    sockets:
      data: {pattern: pull}
"""


def numpy_images(frames: np.ndarray, positions: np.ndarray, npos: int) -> dict[str, np.ndarray]:
    """The same images in plain numpy: masks and moments over whole frames, NaN where no frame arrived."""
    rows, cols = np.indices(frames.shape[1:])
    r2 = (rows - 288) ** 2 + (cols - 288) ** 2 if frames.shape[1] == 576 else None
    out = {k: np.full(npos, np.nan) for k in ("bf", "adf", "com_y", "com_x")}
    for f, p in zip(frames.astype(np.int64), positions):
        if r2 is not None:
            out["bf"][p] = f[r2 < 40 ** 2].sum()
            out["adf"][p] = f[(r2 < 250 ** 2) & (r2 >= 60 ** 2)].sum()
        total = f.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            out["com_y"][p] = (f.sum(axis=1) @ np.arange(f.shape[0])) / total
            out["com_x"][p] = (f.sum(axis=0) @ np.arange(f.shape[1])) / total
    return out


def test_virtual_detectors_and_centre_of_mass_in_process_match_numpy():
    rng = np.random.default_rng(4)
    frames = rng.poisson(0.8, (4, 6, 64, 48)).astype(np.uint16)
    frames[1, 2] = 0  # an empty frame: its centre of mass is NaN, not an error
    dets = {"bf": {"centre": [32, 24], "outer": 10}, "adf": {"centre": [32, 24], "inner": 14, "outer": 30}}
    vd = run_analysis(VirtualDetectors, {"detectors": dets}, frames, drop=[3, (7, 1)])[1]
    com = run_analysis(CentreOfMass, {}, frames, drop=[3, (7, 1)])[1]
    flat = frames.reshape(24, 64, 48).astype(np.int64)
    flat[7, 32:] = 0  # its second sector was lost: zero-filled, as the node group does
    rows, cols = np.indices((64, 48))
    r2 = (rows - 32) ** 2 + (cols - 24) ** 2
    keep = np.arange(24) != 3
    assert np.array_equal(vd.buffers["bf"][keep], flat[:, r2 < 100].sum(axis=1)[keep])
    assert np.array_equal(vd.buffers["adf"][keep], flat[:, (r2 < 900) & (r2 >= 196)].sum(axis=1)[keep])
    with np.errstate(invalid="ignore", divide="ignore"):
        expected_y = flat.sum(axis=2) @ np.arange(64) / flat.sum(axis=(1, 2))
    assert np.array_equal(com.buffers["com_y"][keep], expected_y[keep], equal_nan=True)
    assert np.isnan(com.buffers["com_y"][8])  # the empty frame
    assert not vd.received[3] and np.isnan(vd.buffers["bf"][3]) and vd.received.sum() == 23


def simulated(loss: float = 0.0, scan: int = 1):
    """The simulator's frames of the topology's scan, zero-filled where a sector was lost, and their positions."""
    from zpipe.plugin import Context, Scan
    from zpipe_4dcamera.sources import CameraSource

    src = CameraSource(CameraSource.Params(scan_shape=(32, 24), electrons_per_frame=40, first_frame=1000,
                                           loss=loss, seed=3))
    src.setup(Context("truth"))
    cam = src.camera(Scan(scan))
    frames, positions = [], []
    for i in range(cam.n_frames):
        f = cam.frame(i).copy()
        lost = [k for k in range(4) if cam.lost(i, k)]
        for k in lost:
            f[144 * k:144 * (k + 1)] = 0
        if len(lost) == 4:
            continue  # no sector of it exists: no frame
        x, y = cam.scan_position(i)
        frames.append(f)
        positions.append(y * 32 + x)
    return np.stack(frames), np.array(positions)


def assert_images(out: Path, expected: dict[str, np.ndarray], scan: int = 1) -> None:
    vd, com = np.load(out / f"scan_{scan}_vd.npz"), np.load(out / f"scan_{scan}_com.npz")
    for name, got in (("bf", vd["bf"]), ("adf", vd["adf"]), ("com_y", com["com_y"]), ("com_x", com["com_x"])):
        assert got.shape == (24 * 32,) and np.array_equal(got, expected[name], equal_nan=True), name


def topology(tmp_path: Path, loss: float = 0.0, wait: float = 5) -> Path:
    path = tmp_path / "stem.yaml"
    path.write_text(TOPOLOGY.replace("LOSS", str(loss)).replace("WAIT", str(wait)))
    return path


@pytest.fixture(scope="module")
def truth():
    frames, positions = simulated()
    return numpy_images(frames, positions, 24 * 32)


@pytest.mark.timeout(180)
def test_images_through_zpipe_run_are_bit_identical_to_numpy(tmp_path, truth):
    out = tmp_path / "out"
    res = zpipe("run", str(topology(tmp_path)), "--output-dir", str(out), timeout=170)
    assert res.returncode == 0, res.stderr
    assert "vd wrote" in res.stdout and "com wrote" in res.stdout
    assert_images(out, truth)


@pytest.mark.timeout(240)
def test_images_through_zpipe_replay_are_bit_identical_to_numpy(tmp_path, truth):
    text = topology(tmp_path, wait=1).read_text()
    split = text.replace("nodes:\n", "hosts:\n  here: {address: 127.0.0.1}\n  elsewhere: {address: 127.0.0.1}\nnodes:\n", 1)
    for role in ("producer", "aggregator"):
        split = split.replace(f"    role: {role}\n", f"    role: {role}\n    host: here\n")
    split = split.replace("    role: nodegroup\n", "    role: nodegroup\n    host: elsewhere\n")
    (tmp_path / "split.yaml").write_text(split)
    disk = tmp_path / "disk"
    res = zpipe("run", str(tmp_path / "split.yaml"), "--host", "here", "--output-dir", str(disk), timeout=120)
    assert res.returncode == 0 and "written to disk" in res.stdout, res.stderr
    out = tmp_path / "replayed"
    res = zpipe("replay", str(disk / "fallback"), "--topology", str(topology(tmp_path)), "--output-dir", str(out),
                timeout=170)
    assert res.returncode == 0, res.stderr
    assert_images(out, truth)


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_images_under_mpiexec_are_bit_identical_to_numpy(tmp_path, truth):
    mpiexec = shutil.which("mpiexec", path=str(Path(__import__("sys").executable).parent))
    if mpiexec is None:
        pytest.skip("no mpiexec beside this Python (the mpich wheel installs one)")
    import subprocess
    import sys

    out = tmp_path / "out"
    res = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "zpipe", "run", str(topology(tmp_path)),
                          "--output-dir", str(out)], capture_output=True, text=True, timeout=230)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_images(out, truth)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", [pytest.param(5, marks=pytest.mark.slow)]  # ~25 s: the default run stays near 10 min
                         + [pytest.param(s, marks=pytest.mark.chaos) for s in range(40, 59)])
def test_interleaved_lossy_scans_give_exact_images_with_lost_positions_marked(tmp_path, seed):
    """Three scans back to back with 1 % of sectors lost, 2 workers in each of 2 node groups."""
    path = topology(tmp_path, loss=0.01)
    text = path.read_text().replace("seed: 3}", f"seed: {seed}, scans: 3}}")
    path.write_text(text)
    out = tmp_path / "out"
    res = zpipe("run", str(path), "--output-dir", str(out), timeout=170)
    assert res.returncode == 0, res.stderr
    for scan in (1, 2, 3):
        from zpipe.plugin import Context, Scan
        from zpipe_4dcamera.sources import CameraSource

        src = CameraSource(CameraSource.Params(scan_shape=(32, 24), electrons_per_frame=40, first_frame=1000,
                                               loss=0.01, seed=seed))
        src.setup(Context("truth"))
        cam = src.camera(Scan(scan))
        frames, positions = [], []
        for i in range(cam.n_frames):
            f = cam.frame(i).copy()
            for k in range(4):
                if cam.lost(i, k):
                    f[144 * k:144 * (k + 1)] = 0
            if all(cam.lost(i, k) for k in range(4)):
                continue
            x, y = cam.scan_position(i)
            frames.append(f)
            positions.append(y * 32 + x)
        expected = numpy_images(np.stack(frames), np.array(positions), 24 * 32)
        assert_images(out, expected, scan)
        report = __import__("json").loads((out / f"scan_{scan}_report.json").read_text())
        assert report["analyses"]["framesum"]["sum"] == int(sum(int(f.sum(dtype=np.int64)) for f in frames))
        missing = 24 * 32 - len(positions)  # frames every sector of which was lost upstream
        assert report["analyses"]["vd"]["positions_received"] == len(positions)
        assert len(report["analyses"]["vd"]["positions_missing"]) <= missing + 1
        vd = np.load(out / f"scan_{scan}_vd.npz")
        assert vd["received"].sum() == len(positions) and np.isnan(vd["bf"][~vd["received"]]).all()
