"""Services and sessions on one machine (two "hosts" on loopback): producers and the aggregator run as
services, acquisitions are requested while they run, a session of node groups joins and leaves.

The same story across network namespaces, at the issue's full size, is tests/hosts/test_sessions_netns.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from sessions import Site, pixel_sum_on_disk, service_topology, truth_sum
from support import TOPOLOGIES, zpipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def site(tmp_path):
    port = free_port()
    topo = service_topology(tmp_path / "services.yaml", port=port,
                            hosts={"servers": "127.0.0.1", "compute": "127.0.0.1"})
    s = Site(topo, tmp_path, f"tcp://127.0.0.1:{port}")
    try:
        yield s
    finally:
        pids = [p.pid for p in s.procs.values()]
        killed = s.close()
        assert not killed, f"processes that had to be killed: {killed}"
        left = [p for p in psutil.process_iter(["pid", "cmdline"])
                if str(topo) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"processes left behind: {[p.info for p in left]} (runners {pids})"


@pytest.mark.timeout(300)
def test_scans_go_to_disk_without_a_session_stream_with_one_and_a_session_that_ends_mid_scan_loses_nothing(site):
    t0 = time.monotonic()
    servers = site.start("servers", "servers")
    site.wait_alive("producer", 4)
    site.wait_alive("aggregator", 1)

    # No session: the acquisition goes to disk, at once.
    scan, line, rc = site.acquire("--shape", "16x16")
    assert rc == 0 and scan == 1, line
    assert "no node group; 1,024 of 1,024 messages written to disk" in line, line
    assert pixel_sum_on_disk(site.out("servers") / "fallback", 1) == truth_sum(1)

    # A session joins: the next acquisition streams to it, exactly.
    site.start("session", "compute", "--registry", site.registry)
    site.wait_alive("nodegroup", 2)
    scan, line, rc = site.acquire("--shape", "16x16")
    assert rc == 0 and scan == 2 and "scan 2 complete" in line, line
    r = site.report(2)
    assert r["expected"] == r["received"] == 1024 and r["complete"] == 256 and r["ok"]

    # The session ends (SIGTERM, as a batch system does) in the middle of a paced scan: what streamed
    # and what went to disk are the whole scan, sector for sector.
    left_in, out, err = site.end_mid_scan("session", 3, "32x32", rate=300, after=1.0)  # ~3.4 s at 300 frames/s
    assert left_in < 20, f"the session took {left_in:.1f} s to leave"
    assert "scan 3 incomplete" in out and "written to disk" in out, out + err
    r = site.report(3)
    assert r["lost_parts"] == 0 and not r["missing_items"] and not r["missing_parts"], r["reasons"]
    assert r["received"] > 0 and r["written"] > 0 and r["received"] + r["written"] == r["expected"] == 4096
    on_disk_n, on_disk_sum = pixel_sum_on_disk(site.out("servers") / "fallback", 3)
    n, total = truth_sum(3, (32, 32))
    assert on_disk_n == r["written"] and r["received"] + on_disk_n == n
    assert r["analyses"]["framesum"]["sum"] + on_disk_sum == total, "a sector was lost or counted twice"
    assert r["items"]["missing"] == 0 and r["items"]["on_disk"] > 0
    print(f"session left mid-scan in {left_in:.1f} s: scan 3 streamed {r['received']:,} + wrote {r['written']:,} "
          f"= {r['expected']:,} sectors, lost {r['lost_parts']}; pixel sums streamed + on disk == the scan's")

    # No session any more: the next scan goes to disk again.
    scan, line, rc = site.acquire("--shape", "16x16")
    assert rc == 0 and scan == 4 and "written to disk" in line, line

    # A scan on disk replays to the counts streaming it gives: scan 1 replayed, against the same
    # simulated scan (number 1, same seed) streamed by a batch run.
    replayed, live = site.workdir / "replayed", site.workdir / "live"
    local = TOPOLOGIES / "4dcamera-local.yaml"
    res = zpipe("replay", str(site.out("servers") / "fallback"), "--scan", "1", "--topology", str(local),
                "--output-dir", str(replayed), timeout=120)
    assert res.returncode == 0, res.stderr
    batch = site.workdir / "batch.yaml"
    batch.write_text(local.read_text().replace("scan_shape: [64, 64]", "scan_shape: [16, 16]"))
    res = zpipe("run", str(batch), "--output-dir", str(live), timeout=120)
    assert res.returncode == 0, res.stderr
    a, b = (json.loads((d / "scan_1_report.json").read_text()) for d in (replayed, live))
    for key in ("expected", "received", "complete", "incomplete", "missing_parts", "analyses"):
        assert a[key] == b[key], key
    assert a["analyses"]["framesum"]["sum"] == truth_sum(1)[1]

    took = site.stop("servers")
    assert servers.returncode in (0, 130, 3), site.log("servers")
    assert took < 30 and time.monotonic() - t0 < 240


@pytest.fixture
def agg_site(tmp_path):
    """As `site`, with the aggregator on a "host" of its own, so that it can be absent, leave and come back."""
    port = free_port()
    topo = service_topology(tmp_path / "services.yaml", port=port, aggregator_host="agg",
                            hosts={"servers": "127.0.0.1", "agg": "127.0.0.1", "compute": "127.0.0.1"})
    s = Site(topo, tmp_path, f"tcp://127.0.0.1:{port}")
    try:
        yield s
    finally:
        killed = s.close()
        assert not killed, f"processes that had to be killed: {killed}"
        left = [p for p in psutil.process_iter(["pid", "cmdline"]) if str(topo) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"processes left behind: {[p.info for p in left]}"


@pytest.mark.slow  # ~70 s; the default run stays near 10 min (run: pytest -m slow tests/test_sessions.py)
@pytest.mark.timeout(300)
def test_with_the_aggregator_down_scans_go_to_disk_and_stream_again_once_it_is_back(agg_site):
    site, t0 = agg_site, time.monotonic()
    site.start("servers", "servers")
    site.wait_alive("producer", 4)
    site.start("session", "compute", "--registry", site.registry)
    site.wait_alive("nodegroup", 2)

    # No aggregator yet: to disk at once, no wait for it, no crash.
    t = time.monotonic()
    scan, line, rc = site.acquire("--shape", "16x16")
    assert rc == 0 and scan == 1 and "written to disk" in line, line
    assert time.monotonic() - t < 30, "the producers waited for the aggregator"
    assert pixel_sum_on_disk(site.out("servers") / "fallback", 1) == truth_sum(1)
    assert site.report(1)["outcome"] == "complete"

    # It starts: the next scan streams, exactly.
    site.start("agg", "agg", "--registry", site.registry)
    site.wait_alive("aggregator", 1)
    scan, line, rc = site.acquire("--shape", "16x16")
    assert rc == 0 and scan == 2 and "scan 2 complete" in line, line

    # It leaves (SIGTERM) in the middle of a paced scan: that scan is relayed to its end; the next goes to disk.
    left_in, out, err = site.end_mid_scan("agg", 3, "32x32", rate=300, after=1.0)
    assert left_in < 25, f"the aggregator took {left_in:.1f} s to leave"
    r = site.report(3)
    assert r["lost_parts"] == 0 and not r["missing_items"] and not r["missing_parts"], r["reasons"]
    assert r["received"] + r.get("written", 0) == r["expected"] == 4096, r["reasons"]
    assert r["received"] > 0, "the scan never streamed: not a leave mid-scan"
    scan, line, rc = site.acquire("--shape", "16x16")
    assert rc == 0 and scan == 4 and "written to disk" in line, line

    # Back again: scans stream again.
    site.start("agg2", "agg", "--registry", site.registry)
    site.wait_alive("aggregator", 1)
    scan, line, rc = site.acquire("--shape", "16x16")
    assert rc == 0 and scan == 5 and "scan 5 complete" in line, line
    print(f"aggregator down: scan 1 to disk; up: scan 2 streamed; left mid-scan 3 in {left_in:.1f} s "
          f"(streamed {r['received']:,} + written {r.get('written', 0):,} of {r['expected']:,}); scan 4 to disk; "
          f"back: scan 5 streamed; {time.monotonic() - t0:.0f} s in all")
    for name in ("session", "agg2", "servers"):
        assert site.stop(name) < 30


@pytest.mark.slow  # ~42 s: the default run stays near 10 min; the sessions test above replays a disk scan in it
@pytest.mark.timeout(300)
def test_requests_that_cannot_be_served_are_refused_in_a_line_and_a_replay_request_streams_the_disk_scan(site):
    site.start("servers", "servers")
    site.wait_alive("producer", 4)
    site.wait_alive("aggregator", 1)
    scan, line, rc = site.acquire("--shape", "16x16")  # no session: to disk
    assert rc == 0 and scan == 1 and "written to disk" in line, line

    # Each refused with its reason, none announced; the service goes on.
    for args, why in ((["--set", "rate=0.001"], "rate"), (["--set", "first_frame=1e30"], "first_frame"),
                      (["--set", "no_such=1"], "no_such"), (["--scan", str(2**53)], "scan"),
                      (["--replay", "../elsewhere"], "inside it"),
                      (["--replay", "fallback", "--replay-scan", "1"], "no node group")):
        proc = subprocess.run([sys.executable, "-m", "zpipe", "acquire", "--registry", site.registry, *args, "--wait"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode in (1, 2) and why in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)

    site.start("session", "compute", "--registry", site.registry)
    site.wait_alive("nodegroup", 2)
    scan, line, rc = site.acquire("--replay", "fallback", "--replay-scan", "1")
    assert rc == 0 and scan == 2 and "scan 2 complete" in line, line
    r = site.report(2)
    n, total = truth_sum(1)
    assert r["received"] == r["expected"] == n and r["analyses"]["framesum"]["sum"] == total
    scan, line, rc = site.acquire("--shape", "16x16")  # numbering goes on after the replay
    assert rc == 0 and scan == 3 and "scan 3 complete" in line, line
    for name in ("session", "servers"):
        assert site.stop(name) < 30
