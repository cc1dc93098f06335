"""`zpipe status` attached to a real 4D-Camera run via a stand-alone registry: every replica, its rates, the scan."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from support import steady_topology, zpipe

NODES = {("producer", i) for i in range(4)} | {("aggregator", 0), ("nodegroup", 0), ("nodegroup", 1)}


def status_json(registry: str) -> dict:
    res = zpipe("status", "--registry", registry, "--json", timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def moving(node: dict) -> bool:
    r = node["rates"] or {}
    return (r.get("msgs_in_s", 0) > 0 and r.get("bytes_in_s", 0) > 0) or \
           (r.get("msgs_out_s", 0) > 0 and r.get("bytes_out_s", 0) > 0)


@pytest.fixture
def registry():
    """A stand-alone registry (with the accountant that closes scans) on a free port of 127.0.0.1."""
    proc = subprocess.Popen([sys.executable, "-m", "zpipe", "kv", "--bind", "tcp://127.0.0.1:0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip().removeprefix("zpipe kv: serving at ")
        assert address.startswith("tcp://127.0.0.1:"), address
        yield address
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.timeout(180)
def test_status_json_while_streaming_and_done_after(tmp_path, registry):
    out = tmp_path / "out"
    with open(tmp_path / "stdout", "w+") as so, open(tmp_path / "stderr", "w+") as se:
        run = subprocess.Popen([sys.executable, "-m", "zpipe", "run", steady_topology(tmp_path), "--registry", registry,
                                "--output-dir", str(out)], stdout=so, stderr=se)
        try:
            seen, best = None, set()
            deadline = time.monotonic() + 90
            while seen is None and run.poll() is None and time.monotonic() < deadline:
                data = status_json(registry)
                nodes = {(n["node"], n["replica"]): n for n in data["nodes"]}
                best = max(best, {k for k, n in nodes.items() if moving(n)}, key=len)
                if set(nodes) == NODES and all(moving(n) for n in nodes.values()):
                    seen = data
            assert seen, f"never saw every replica moving at once; at best {sorted(best)}"
            (scan,) = seen["scans"]
            assert scan["scan"] == 1 and scan["status"] == "streaming" and scan["meta"]["scan_shape"] == [64, 64]
            assert 0 < scan["received"] < 16384 and scan["expected"] in (None, 16384)
            assert run.wait(120) == 0
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
        so.seek(0)
        assert "scan 1 complete in" in so.read()

    after = status_json(registry)  # the run is over; scan records stay in the registry
    last = after["scans"][-1]
    assert last["status"] == "done" and last["ok"]
    assert last["received"] == last["expected"] == 16384
    assert after["nodes"] == []  # every replica withdrew its status on the way out
    res = zpipe("status", "--registry", registry, "--once", "--sample", "0", timeout=30, env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    assert "scan 1 done" in res.stdout and "16,384/16,384 100%" in res.stdout, res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 80, res.stdout


@pytest.mark.timeout(30)
def test_status_without_a_registry_says_so():
    res = zpipe("status", "--registry", "tcp://127.0.0.1:9", "--json", "--connect-timeout", "1", timeout=20)
    assert res.returncode == 2
    assert "no answer from KV server at tcp://127.0.0.1:9" in res.stderr
