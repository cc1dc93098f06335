"""`zpipe replay` as a user runs it: damaged files replay what is good and say what is not;
nothing to replay is one line, not a traceback."""

from __future__ import annotations

import json
import os

import pytest

from support import TOPOLOGIES, zpipe


@pytest.mark.timeout(150)
def test_replay_of_a_truncated_file_delivers_every_good_record_and_names_the_bad_one(tmp_path):
    from zpipe_4dcamera import SECTORS
    from zpipe_4dcamera import rawfile as rf
    from zpipe_4dcamera.simulate import SimulatedCamera

    cam = SimulatedCamera((8, 8), electrons_per_frame=40, seed=2, first_frame=1000, scan_number=1)
    disk = tmp_path / "disk"
    disk.mkdir()
    with rf.ScanWriter(disk, 1, cam.scan_shape, max_bytes=40 * rf.RECORD_BYTES) as writer:
        for k in range(SECTORS):
            for i in range(cam.n_frames):
                writer.write(cam.header(i, k), cam.sector(i, k))
    cut = disk / rf.file_name(1, 2, 0, 0)  # module 2's first file: frames 0..39
    os.truncate(cut, 25 * rf.RECORD_BYTES + rf.HEADER.size + 500)  # in frame 25's sector
    good = cam.n_frames * SECTORS - (40 - 25)

    out = tmp_path / "out"
    res = zpipe("replay", str(disk), "--topology", str(TOPOLOGIES / "4dcamera-local.yaml"),
                "--output-dir", str(out), timeout=140)
    output = res.stdout + res.stderr
    report = json.loads((out / "scan_1_report.json").read_text())
    assert report["received"] == good, output
    assert "Traceback" not in output
    (line,) = [x for x in output.splitlines() if str(cut) in x]
    assert "WARNING" in line and "skipped 1 bad record" in line
    assert f"byte offset {25 * rf.RECORD_BYTES}: truncated sector data: 500 of {rf.SECTOR_BYTES} bytes (frame 1025)" \
        in line


def one_line_error(res, *needles: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("zpipe replay: ") and all(n in line for n in needles), line
    return line


@pytest.mark.timeout(60)
def test_nothing_to_replay_is_one_line_naming_the_directory_and_scan(tmp_path):
    topology = str(TOPOLOGIES / "4dcamera-local.yaml")
    empty, other, scans = tmp_path / "empty", tmp_path / "other", tmp_path / "scans"
    for d in (empty, other, scans):
        d.mkdir()
    (other / "notes.txt").write_text("no data here")
    (other / "data_scan0000000001_manifest.json").write_text("{}")
    (scans / "data_scan0000000001_module0_dst0_file0.data").write_bytes(b"")
    (scans / "data_scan0000000004_module0_dst0_file0.data").write_bytes(b"")
    for d in (empty, other):
        line = one_line_error(zpipe("replay", str(d), "--topology", topology, "--output-dir", str(tmp_path / "o"),
                                    timeout=25))
        assert line == f"zpipe replay: {d}: no data_scan*.data files"
    line = one_line_error(zpipe("replay", str(tmp_path / "nowhere"), "--topology", topology, timeout=25))
    assert line == f"zpipe replay: {tmp_path / 'nowhere'}: no such directory"
    line = one_line_error(zpipe("replay", str(scans), "--scan", "4", "--scan", "7", "--topology", topology,
                                "--output-dir", str(tmp_path / "o"), timeout=25))
    assert line == f"zpipe replay: {scans}: no data files of scan 7 (scans there: 1, 4)"
    assert not (tmp_path / "o").exists()  # nothing started
