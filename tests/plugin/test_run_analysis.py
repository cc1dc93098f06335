"""The analysis contract as a third party meets it: a test of ~10 lines with run_analysis, every
documented type crossing node groups (in process through the codec, over ZeroMQ and under MPI
alike), and one plugin listed twice under two names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import TOPOLOGIES, third_party, zpipe
from zpipe.plugin import Analysis, per_position
from zpipe.testing import run_analysis


class CentreOfMass(Analysis):  # docs/analyses.md's example, as a third party writes it
    def buffers(self, scan):
        return {"com_y": per_position(), "com_x": per_position()}

    def process(self, batch, out):
        rows, cols = batch.data.sum(axis=2, dtype=np.int64), batch.data.sum(axis=1, dtype=np.int64)
        total = rows.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["com_y"][:] = rows @ np.arange(rows.shape[1]) / total
            out["com_x"][:] = cols @ np.arange(cols.shape[1]) / total


def test_centre_of_mass_matches_numpy():  # the guide's test, as it stands there: ten lines
    frames = np.random.default_rng(0).poisson(2, (6, 8, 32, 32)).astype(np.uint16)  # 6x8 scan, 32x32 frames
    out = run_analysis(CentreOfMass, {}, frames, workers=2, node_groups=2, drop=[5])[1]
    flat = frames.reshape(48, 32, 32).astype(np.int64)
    expected = flat.sum(axis=2) @ np.arange(32) / flat.sum(axis=(1, 2))
    assert np.isnan(out.buffers["com_y"][5]) and not out.received[5]
    assert np.array_equal(np.delete(out.buffers["com_y"], 5), np.delete(expected, 5))


# Every type docs/analyses.md says may travel, as one worker's results.
KINDS_CODE = '''
import json, os
import numpy as np
from zpipe.plugin import Analysis

def every_type(worker):
    return {"none": None, "bool": True, "int": -2**62, "uint": 2**63 + 5, "float": 2.5, "str": "é", "bytes": b"\\x00\\xff",
            "list": [1, "a", None], "tuple": (1, 2), "dict": {"k": {"deep": [1.5]}},
            "i64": np.int64(7), "f32": np.float32(0.25), "b_": np.bool_(True),
            "array": np.arange(6, dtype=np.uint16).reshape(2, 3), "nested": [{"a": np.ones((2, 2), np.float32)}],
            "bools": np.array([True, False]), "c": np.array([1 + 2j]), "empty": np.zeros((0, 3)), "worker": worker}

def plain(v):
    if isinstance(v, np.ndarray):
        return {"array": v.tolist() if v.dtype.kind != "c" else [[x.real, x.imag] for x in v.ravel()],
                "dtype": v.dtype.str, "shape": list(v.shape)}
    if isinstance(v, bytes):
        return {"bytes": v.hex()}
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v

class Kinds(Analysis):
    def setup(self, ctx):
        self.worker = f"{ctx.replica}/{ctx.thread}"
    def process(self, batch):
        pass
    def results(self, scan):
        return every_type(self.worker)
    def write(self, scan, results, report, output_dir):
        path = os.path.join(output_dir, f"scan_{scan.id}_kinds.json")
        with open(path, "w") as f:
            json.dump(sorted((plain(p) for p in results.parts), key=lambda p: p["worker"]), f)
        return path
'''


def expected_parts(workers: list[str]) -> list:
    ns: dict = {}
    exec(KINDS_CODE, ns)
    # What arrives: numpy scalars as Python numbers, tuples as lists.
    parts = []
    for w in sorted(workers):
        v = ns["every_type"](w)
        v.update(i64=7, f32=0.25, b_=True, tuple=[1, 2])
        parts.append(json.loads(json.dumps(ns["plain"](v))))
    return parts


@pytest.fixture
def kinds_plugin(tmp_path):
    return third_party(tmp_path / "site", "kinds", "1.0", {"kinds": "kinds_zp:Kinds"}, {"kinds_zp": KINDS_CODE})


def test_every_documented_type_crosses_node_groups_in_process(tmp_path):
    ns: dict = {}
    exec(KINDS_CODE, ns)
    out = run_analysis(ns["Kinds"], {}, np.zeros((2, 2, 4, 4), np.uint16), workers=2, node_groups=2,
                       output_dir=str(tmp_path))[1]
    assert json.loads(Path(out.output).read_text()) == expected_parts(["0/0", "0/1", "1/0", "1/1"])


def kinds_topology(tmp_path: Path) -> Path:
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text().replace("scan_shape: [64, 64]", "scan_shape: [8, 8]")
    text = text.replace("      - plugin: electron-count   # thresholds from the first 1200 complete frames, as at NCEM",
                        "      - plugin: kinds").replace("workers: 1", "workers: 2")
    # No disk fallback: on a loaded machine the node groups (MPI ranks) may take longer than the
    # fallback's 5 s wait to register, and the scan would go to disk (exit 0, no analysis output).
    text = text.replace("    fallback: fallback     # with no node group registered, write version-5 files here\n", "")
    path = tmp_path / "kinds.yaml"
    path.write_text(text)
    return path


@pytest.mark.timeout(120)
def test_every_documented_type_crosses_node_groups_over_zeromq(tmp_path, kinds_plugin):
    out = tmp_path / "out"
    res = zpipe("run", str(kinds_topology(tmp_path)), "--output-dir", str(out), env=kinds_plugin, timeout=110)
    assert res.returncode == 0, res.stderr
    got = json.loads((out / "scan_1_kinds.json").read_text())
    assert got == expected_parts(["0/0", "0/1", "1/0", "1/1"])


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_every_documented_type_crosses_node_groups_under_mpi(tmp_path, kinds_plugin):
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    if mpiexec is None:
        pytest.skip("no mpiexec beside this Python (the mpich wheel installs one)")
    out = tmp_path / "out"
    res = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "zpipe", "run", str(kinds_topology(tmp_path)),
                          "--output-dir", str(out)], capture_output=True, text=True, timeout=170,
                         env={**__import__("os").environ, **kinds_plugin})
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((out / "scan_1_kinds.json").read_text()) == expected_parts(["0/0", "0/1", "1/0", "1/1"])


@pytest.mark.timeout(120)
def test_one_plugin_twice_under_two_names_writes_both_and_reports_both(tmp_path):
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text().replace("scan_shape: [64, 64]", "scan_shape: [12, 8]")
    text = text.replace("      - plugin: electron-count   # thresholds from the first 1200 complete frames, as at NCEM", """\
      - plugin: virtual-detectors
        name: small
        params: {detectors: {bf: {centre: [288, 288], outer: 20}}}
      - plugin: virtual-detectors
        name: large
        params: {detectors: {bf: {centre: [288, 288], outer: 200}}}""")
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    res = zpipe("run", str(path), "--output-dir", str(out), timeout=110)
    assert res.returncode == 0, res.stderr
    small, large = np.load(out / "scan_1_small.npz")["bf"], np.load(out / "scan_1_large.npz")["bf"]
    assert small.shape == large.shape == (96,) and (large > small).all()
    report = json.loads((out / "scan_1_report.json").read_text())
    assert set(report["outputs"]) == {"small", "large"}
    assert report["analyses"]["small"]["positions_received"] == report["analyses"]["large"]["positions_received"] == 96
