"""Issue 11, acceptance 2, across network namespaces: receiving servers (4 producers, as a service), the
aggregator with the registry (a service), and a compute node where sessions of two node groups start and end.

Three acquisitions with no session go to disk, in files stempy reads; a session joins and three acquisitions
stream exactly; the session ends (SIGTERM) in the middle of a fourth, whose streamed and written sectors are
the whole scan; the fifth goes to disk; every process ends; the disk scans replay to the counts that
streaming the same scans gives. Marked `netns` (about two minutes): `pytest -m netns tests/hosts`.
"""

from __future__ import annotations

import json
import time

import numpy as np
import psutil
import pytest

from sessions import Site, pixel_sum_on_disk, service_topology, truth_sum
from three_hosts import make_net
from support import TOPOLOGIES, zpipe

HOSTS = ["servers", "agg", "compute"]
PORT = 47600
SHAPE = (64, 64)
BOUND = 300.0  # seconds the whole story may take


@pytest.fixture
def net(request):
    return make_net(request, HOSTS)


def camera(scan: int):
    """The simulated camera of a scan, as the producers made it."""
    from zpipe.plugin import Context, Scan
    from zpipe_4dcamera.sources import CameraSource

    src = CameraSource(CameraSource.Params(scan_shape=SHAPE))
    src.setup(Context("truth"))
    return src.camera(Scan(scan))


@pytest.mark.netns
@pytest.mark.timeout(600)
def test_services_and_a_session_across_three_hosts(net, tmp_path):
    stempy_io = pytest.importorskip("stempy.io")
    topo = service_topology(tmp_path / "site.yaml", port=PORT, hosts={h: net.address[h] for h in HOSTS},
                            scan_shape=SHAPE, aggregator_host="agg", registry_host="agg")
    site = Site(topo, tmp_path, f"tcp://{net.address['agg']}:{PORT}", spawn=net.popen, registry_host="agg")
    t0 = time.monotonic()
    try:
        site.start("agg", "agg")
        site.start("servers", "servers")
        site.wait_alive("producer", 4)
        site.wait_alive("aggregator", 1)

        # Three acquisitions, no session: three scans on disk, which stempy reads.
        for n in (1, 2, 3):
            scan, line, rc = site.acquire("--shape", "64x64")
            assert rc == 0 and scan == n and "written to disk" in line, line
        fallback = site.out("servers") / "fallback"
        for n in (1, 2, 3):
            files = sorted(str(p) for p in fallback.glob(f"data_scan{n:010d}_*.data"))
            reader = stempy_io.reader(files, version=5, backend="multi-pass")
            cam = camera(n)
            for i in (0, 1234, 4095):
                x, y = cam.scan_position(i)
                block = reader.read_frames((y, x))[0]
                assert np.array_equal(np.asarray(block.data).reshape(576, 576), cam.frame(i)), (n, i)
            assert pixel_sum_on_disk(fallback, n) == truth_sum(n, SHAPE)

        # A session joins: three acquisitions stream exactly.
        site.start("session", "compute")
        site.wait_alive("nodegroup", 2)
        for n in (4, 5, 6):
            scan, line, rc = site.acquire("--shape", "64x64")
            assert rc == 0 and scan == n and f"scan {n} complete" in line, line
            r = site.report(n)
            assert r["expected"] == r["received"] == 4 * 4096 and r["complete"] == 4096 and r["ok"]
            assert (site.out("compute") / f"scan_{n}_electrons.h5").exists()

        # The session ends (SIGTERM) in the middle of the seventh.
        left_in, out, err = site.end_mid_scan("session", 7, "64x64", rate=1000, after=1.5)  # ~4 s at 1,000 frames/s
        assert "scan 7 " in out and "written to disk" in out, out + err
        r = site.report(7)
        n7, sum7 = truth_sum(7, SHAPE)
        disk_n, disk_sum = pixel_sum_on_disk(fallback, 7)
        assert r["lost_parts"] == 0 and not r["missing_items"], r["reasons"]
        assert r["received"] + r["written"] == r["expected"] == n7 and disk_n == r["written"]
        assert r["analyses"]["framesum"]["sum"] + disk_sum == sum7

        # No session: the eighth goes to disk.
        scan, line, rc = site.acquire("--shape", "64x64")
        assert rc == 0 and scan == 8 and "written to disk" in line, line

        took = {name: site.stop(name) for name in ("servers", "agg")}
        total = time.monotonic() - t0
        assert total < BOUND, f"{total:.0f} s"
        print(f"acceptance 2: session left mid-scan in {left_in:.1f} s; scan 7 streamed {r['received']:,} + wrote "
              f"{r['written']:,} = {r['expected']:,} sectors, lost {r['lost_parts']}; services stopped in "
              f"{max(took.values()):.1f} s; all in {total:.0f} s")
    finally:
        killed = site.close()
    assert not killed, f"processes that had to be killed: {killed}"
    assert not net.pids(), f"processes left in the namespaces: {net.pids()}"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(topo) in " ".join(p.info["cmdline"] or [])]

    # The disk scans replay (on this machine) to the counts that streaming the same scans gives.
    replayed, live = tmp_path / "replayed", tmp_path / "live"
    local = TOPOLOGIES / "4dcamera-local.yaml"
    batch = tmp_path / "batch.yaml"
    batch.write_text(local.read_text().replace("scan_shape: [64, 64]", "scan_shape: [64, 64]\n      scans: 3"))
    for scan in (1, 2, 3):
        res = zpipe("replay", str(fallback), "--scan", str(scan), "--topology", str(local),
                    "--output-dir", str(replayed), timeout=200)
        assert res.returncode == 0, res.stderr
    res = zpipe("run", str(batch), "--output-dir", str(live), timeout=300)
    assert res.returncode == 0, res.stderr
    for scan in (1, 2, 3):
        a, b = (json.loads((d / f"scan_{scan}_report.json").read_text()) for d in (replayed, live))
        for key in ("expected", "received", "complete", "incomplete", "missing_parts", "analyses"):
            assert a[key] == b[key], (scan, key)
        assert np.isclose(a["analyses"]["framesum"]["sum"], truth_sum(scan, SHAPE)[1])
