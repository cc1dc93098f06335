"""The 4D-Camera data plane end to end: real processes, sockets and files; every scan accounted for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from support import TOPOLOGIES, third_party, zpipe

SMALL = "scan_shape: [16, 16]"


def topology(tmp_path, name: str, *edits: tuple[str, str]) -> str:
    text = (TOPOLOGIES / name).read_text()
    for old, new in (("scan_shape: [64, 64]", SMALL), *edits):
        assert old in text, old
        text = text.replace(old, new)
    f = tmp_path / name
    f.write_text(text)
    return str(f)


def report(out, scan: int = 1) -> dict:
    return json.loads((out / f"scan_{scan}_report.json").read_text())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["4dcamera-local.yaml", "4dcamera-direct.yaml"])
def test_scan_completes_with_every_frame(tmp_path, name):
    out = tmp_path / "out"
    res = zpipe("run", topology(tmp_path, name), "--output-dir", str(out), timeout=110)
    assert res.returncode == 0, res.stderr
    r = report(out)
    assert r["expected"] == r["received"] == 256 * 4
    assert r["complete"] == 256 and r["incomplete"] == 0 and r["ok"]
    assert r["analyses"]["framesum"]["frames"] == 256
    assert sorted(r["node_groups"]) == ["nodegroup[0]", "nodegroup[1]"]
    assert re.search(r"scan 1 complete in [\d.]+ s \(streamed 0\.17 GB in [\d.]+ s, [\d.]+ GB/s\): "
                     r"expected 1,024, received 1,024; 256 complete \+ 0 incomplete", res.stdout)
    assert 0 < r["streaming_seconds"] <= r["seconds"] and r["bytes"] == 1024 * 144 * 576 * 2


@pytest.mark.timeout(150)
@pytest.mark.parametrize("side, loss", [(16, 0.01), (64, 0.001)])  # 0.1 %: the 4D Camera's UDP loss
def test_lost_sectors_are_named_exactly_and_their_frames_still_processed(tmp_path, side, loss):
    from zpipe_4dcamera.simulate import SimulatedCamera

    out = tmp_path / "out"
    path = topology(tmp_path, "4dcamera-local.yaml", (SMALL, f"scan_shape: [{side}, {side}]"),
                    ("first_frame: 1000", f"first_frame: 1000\n      loss: {loss}\n      seed: 7"),
                    ("scan_timeout: 10", "scan_timeout: 5"))
    t0 = time.monotonic()
    res = zpipe("run", path, "--output-dir", str(out), timeout=140)
    assert res.returncode == 0, res.stderr
    frames = side * side
    cam = SimulatedCamera(scan_shape=(side, side), seed=7 + 1, first_frame=1000, loss=loss)  # seed + scan number
    dropped: dict[str, list[int]] = {}
    for i in range(cam.n_frames):
        for k in range(4):
            if cam.lost(i, k):
                dropped.setdefault(str(cam.frame_number(i)), []).append(k)
    assert dropped, "the seed should drop some sectors"
    r = report(out)
    assert r["missing_parts"] == dropped
    assert r["incomplete"] == len(dropped) and r["complete"] == frames - len(dropped)
    assert r["analyses"]["framesum"]["frames"] == frames  # incomplete frames were processed too
    assert r["expected"] == r["received"] and not r["timed_out"]
    assert time.monotonic() - t0 < 120


@pytest.fixture
def liar(tmp_path):
    """A third-party source that announces more messages than it sends, like an upstream loss after counting."""
    return third_party(tmp_path / "site", "liar", "1.0", {"liar": "liar_zp:Liar"}, {"liar_zp": (
        "from zpipe_4dcamera.sources import CameraSource\n"
        "class Liar(CameraSource):\n"
        "    def messages(self, scan, thread, threads):\n"
        "        for msg in super().messages(scan, thread, threads):\n"
        "            if msg.header['frame_number'] == 1010 and msg.header['module'] == 2:\n"
        "                continue  # counted in plan(), never sent\n"
        "            yield msg\n")})


@pytest.mark.timeout(120)
def test_a_source_that_sends_less_than_it_planned_is_named_at_once_not_by_a_timeout(tmp_path, liar):
    out = tmp_path / "out"
    path = topology(tmp_path, "4dcamera-local.yaml", ("plugin: 4dcamera-sim", "plugin: liar"),
                    ("scan_timeout: 10", "scan_timeout: 60"))
    t0 = time.monotonic()
    res = zpipe("run", path, "--output-dir", str(out), env=liar, timeout=110)
    assert res.returncode == 3, res.stderr  # accounted, with a loss named
    r = report(out)
    assert r["outcome"] == "incomplete" and not r["ok"] and not r["timed_out"]
    assert r["expected"] == r["sent"] + 1 == r["received"] + 1
    assert r["missing_parts"] == {"1010": [2]} and r["incomplete"] == 1 and r["complete"] == 255
    assert "the sources sent 1,023 of the 1,024 messages they planned" in r["reasons"]
    assert "scan 1 incomplete" in res.stdout and "1 missing parts (1010:[2])" in res.stdout
    assert time.monotonic() - t0 < 40  # the senders' counts closed it, not the 60 s timeout


@pytest.mark.timeout(180)
def test_no_node_group_goes_to_disk_that_stempy_reads_and_replay_matches_live(tmp_path):
    stempy_io = pytest.importorskip("stempy.io")
    from zpipe_4dcamera.simulate import SimulatedCamera

    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text().replace("scan_shape: [64, 64]", SMALL)
    text = text.replace("nodes:\n", "hosts:\n  here: {address: 127.0.0.1}\n  elsewhere: {address: 127.0.0.1}\nnodes:\n", 1)
    text = text.replace("    role: producer\n", "    role: producer\n    host: here\n    fallback_wait: 1\n")
    text = text.replace("    role: aggregator\n", "    role: aggregator\n    host: here\n")
    text = text.replace("    role: nodegroup\n", "    role: nodegroup\n    host: elsewhere\n")
    split = tmp_path / "split.yaml"
    split.write_text(text)
    disk = tmp_path / "disk"
    res = zpipe("run", str(split), "--host", "here", "--output-dir", str(disk), timeout=100)
    assert res.returncode == 0, res.stderr
    assert "no node group; written to disk" in res.stdout
    files = sorted(str(p) for p in (disk / "fallback").glob("*.data"))
    assert len(files) == 8  # 4 sectors x 2 producer threads
    reader = stempy_io.reader(files, version=5, backend="multi-pass")
    cam = SimulatedCamera(scan_shape=(16, 16), seed=1, first_frame=1000)
    for i in (0, 1, 17, 255):
        x, y = cam.scan_position(i)
        block = reader.read_frames((y, x))[0]
        assert np.array_equal(np.asarray(block.data).reshape(576, 576), cam.frame(i)), f"frame {i} differs"

    live, replayed = tmp_path / "live", tmp_path / "replayed"
    res = zpipe("run", topology(tmp_path, "4dcamera-local.yaml"), "--output-dir", str(live), timeout=100)
    assert res.returncode == 0, res.stderr
    res = zpipe("replay", str(disk / "fallback"), "--topology", str(TOPOLOGIES / "4dcamera-local.yaml"),
                "--output-dir", str(replayed), timeout=100)
    assert res.returncode == 0, res.stderr
    a, b = report(live), report(replayed)
    for key in ("expected", "received", "complete", "incomplete", "missing_parts", "analyses"):
        assert a[key] == b[key], (key, res.stdout, res.stderr)


@pytest.mark.timeout(180)
def test_slow_stage_loses_nothing_and_producer_memory_stays_flat(tmp_path):
    out = tmp_path / "out"
    # Producers send a prepared sector (thousands of frames/s); the stage takes 10 ms per frame,
    # about a tenth of that. Small queues, so the scan (16 MB x 40) is far larger than they hold.
    path = topology(tmp_path, "4dcamera-local.yaml", (SMALL, "scan_shape: [32, 32]\n      payload: constant"),
                    ("- plugin: framesum", "- plugin: discard\n        params: {delay: 0.01}"),
                    ("replicas: 2\n    threads: 4", "replicas: 1\n    threads: 4"),
                    ("{pattern: push, connect: aggregator.in}", "{pattern: push, connect: aggregator.in, hwm: 10}"),
                    ("in: {pattern: pull}", "in: {pattern: pull, hwm: 10}"),
                    ("{pattern: push, connect: nodegroup.data}", "{pattern: push, connect: nodegroup.data, hwm: 10}"),
                    ("data: {pattern: pull}", "data: {pattern: pull, hwm: 10}"))
    with open(tmp_path / "stdout", "w+") as so, open(tmp_path / "stderr", "w+") as se:
        proc = subprocess.Popen([sys.executable, "-m", "zpipe", "run", path, "--output-dir", str(out)],
                                stdout=so, stderr=se, text=True)
        samples: dict[int, list[int]] = {}
        try:
            while proc.poll() is None:
                # The runner's own children only: a producer's short-lived child (a fork about to
                # exec `uname`, say) carries the producer's command line until it execs.
                for child in psutil.Process(proc.pid).children():
                    try:
                        if "--node producer " in " ".join(child.cmdline()):
                            samples.setdefault(child.pid, []).append(child.memory_info().rss)
                    except psutil.Error:
                        pass
                time.sleep(0.25)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        se.seek(0)
        stderr = se.read()
    assert proc.returncode == 0, stderr
    r = report(out)
    assert r["expected"] == r["received"] == 4096 and r["complete"] == 1024 and r["ok"]
    assert r["seconds"] > 8  # the stage really was the bottleneck (1024 frames x 10 ms)
    assert len(samples) == 4
    for pid, rss in samples.items():
        assert len(rss) > 20, "producers finished early: they were not held back by the slow stage"
        settled = max(rss[len(rss) // 5: len(rss) // 2])
        assert max(rss[len(rss) // 2:]) - settled < 10e6, f"producer {pid} grew: {[r >> 20 for r in rss]} MiB"


@pytest.mark.timeout(120)
def test_bad_messages_are_rejected_counted_and_logged_once(tmp_path):
    import msgpack
    import zmq

    from zpipe.kv import KVClient
    from zpipe.registry import Registry

    out = tmp_path / "out"
    path = topology(tmp_path, "4dcamera-local.yaml", ("- plugin: framesum", "- plugin: discard\n        params: {delay: 0.01}"))
    proc = subprocess.Popen([sys.executable, "-m", "zpipe", "run", path, "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    try:
        registry = None
        deadline = time.monotonic() + 30
        while registry is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if m := re.search(r"registry at (tcp://\S+)", line):
                registry = m.group(1)
        assert registry, "runner did not say where its registry is"
        with KVClient(registry).start() as kv:
            ep = Registry(kv).resolve("nodegroup", "data@0", timeout=20)[0]
            # Node group 0 has opened scan 1 (its part is published while the scan is open).
            kv.wait(lambda items: "scans/1/part/0" in items, prefix="scans/", timeout=30)
            pipe = kv.get("pipeline")["id"]
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(ep.address)
        # Junk and messages of no pipeline: turned away by the node group, never part of the scan.
        good = {"scan": 1, "frame_number": 1000, "module": 0, "sender": "intruder"}
        push.send_multipart([b"\xc1not msgpack", b"x"])
        push.send_multipart([msgpack.packb({"frame_number": 3, "sender": "intruder"}), b"x"])
        push.send_multipart([msgpack.packb({**good, "scan": 999}), bytes(165888)])
        # Forged with the pipeline's id, claiming a real sender: part of scan 1's account.
        forged = {**good, "pipe": pipe, "sender": "producer[0]/0"}
        push.send_multipart([msgpack.packb({**forged, "frame_number": 5000}), bytes(165888)])
        push.send_multipart([msgpack.packb({**forged, "frame_number": 5001}), bytes(165888)])  # same reason: logged once
        push.close()
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        ctx.term()
        if proc.poll() is None:
            proc.kill()
    stderr = stderr if proc.returncode is not None else ""
    assert proc.returncode == 3, stderr  # every loss named: incomplete
    r = report(out)
    assert r["complete"] == 256 and r["expected"] == r["received"] == 1024
    assert r["outcome"] == "incomplete" and r["rejected"] + sum(r.get("late", {}).get("nodegroup[0]", {}).values()) == 2
    assert "rejected 5" in stdout  # the node group's own count: every message turned away
    assert "from unknown sender: header is not msgpack" in stderr
    assert "from intruder: not this pipeline" in stderr
    assert stderr.count("from producer[0]/0:") == 1


@pytest.mark.timeout(30)
def test_replay_of_a_missing_directory_says_so_before_starting_anything(tmp_path):
    res = zpipe("replay", str(tmp_path / "nowhere"), "--topology", str(TOPOLOGIES / "4dcamera-local.yaml"), timeout=25)
    assert res.returncode == 2
    assert res.stderr.strip() == f"zpipe replay: {tmp_path / 'nowhere'}: no such directory"
