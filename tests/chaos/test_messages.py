"""Chaos: forged and malformed messages at every socket of a running pipeline, and a flooded registry.

While a seeded scan streams, raw ZeroMQ sockets (no zpipe code) send every kind of bad message to
every socket the registry lists (each aggregator channel, each node group's receiving sockets and
its results socket) and to the registry itself. Every run must end within its bound with no
traceback and no replica left, every scan's account equal to the ground truth (nothing the
forger sent is counted as data, nothing real is lost), and the bad messages counted.
"""

from __future__ import annotations

import importlib.util
import os
import random
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from chaos_harness import Run, Truth, chaos_topology, params_of

BOUND = 150.0
ROOT = Path(__file__).resolve().parent.parent


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def bad_messages(pipe: str, rng: random.Random, senders: list[str]) -> list[list[bytes]]:
    """One of each kind of bad message a data socket may meet (the forger knows the pipeline's id and
    its senders' names, as a stale or misconfigured peer would; it cannot know what they will send)."""
    sector = bytes(144 * 576 * 2)
    real = rng.choice(senders)
    data = {"pipe": pipe, "scan": 1, "sender": "producer[0]/0", "frame_number": 1000, "module": 0,
            "scan_width": 24, "scan_height": 24, "scan_x": 0, "scan_y": 0}
    return [
        [os.urandom(rng.randint(0, 300))],                                         # random bytes
        [os.urandom(64), os.urandom(64), os.urandom(64)],                          # three frames of junk
        [b"\xc1"],                                                                 # never valid msgpack
        [_pack([1, 2, 3]), sector],                                                # not a map
        [_pack({k: v for k, v in data.items() if k != "pipe"}), sector],           # no pipeline id
        [_pack({**data, "pipe": "0" * 16}), sector],                               # another pipeline
        [_pack({**data, "sender": "intruder[0]/0"}), sector],                      # unknown sender
        [_pack({**data, "scan": "1"}), sector],                                    # wrong-typed scan
        [_pack({**data, "scan": 999_999 + rng.randint(0, 7)}), sector],            # unknown scans
        [_pack({**data, "frame_number": 10**9}), sector],                          # outside the scan
        [_pack({**data, "frame_number": [1000]}), sector],                         # wrong-typed key
        [_pack({**data, "module": 7}), sector],                                    # no such part
        [_pack(data), b"x" * 100],                                                 # wrong size
        [_pack(data)],                                                             # single part
        [_pack({"type": "info", "pipe": pipe, "scan": 1, "sender": real})],        # info without its fields
        [_pack({"type": "info", "pipe": pipe, "scan": 1, "sender": real, "node_groups": [0, 1], "meta": {},
                "expected": -1000})],                                              # absurd count
        [_pack({"type": "info", "pipe": pipe, "scan": 1, "sender": real, "node_groups": "all", "meta": {}})],
        [_pack({"type": "done", "pipe": pipe, "scan": 1, "sender": real, "sent": -5})],
        [_pack({"type": "done", "pipe": pipe, "scan": 1, "sender": real, "sent": 0})],  # fewer than arrived
        [_pack({"type": "end", "pipe": pipe, "sender": real})],                    # end with scans open
        [_pack({"type": "launch", "pipe": pipe, "sender": real})],                 # unknown type
        [_pack({"pipe": pipe, "scan": 1, "from": 7, "analysis": "x", "plain": {}, "arrays": [["a", "<u2", [5]]],
                "none": False}), b"123"],                                          # a results message that lies
    ]


class Forger(threading.Thread):
    """Sends `rounds` of every bad message to every endpoint of the run, while it streams."""

    def __init__(self, run: Run, pipe: str, rounds: int, seed: int):
        super().__init__(daemon=True)
        self.zrun, self.pipe, self.rounds, self.rng = run, pipe, rounds, random.Random(seed)
        self.sent = 0
        self.targets: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:  # noqa: D401 - thread body
        try:
            ctx = zmq.Context()
            eps = {k: v for k, v in self.zrun.kv.items("endpoints/").items() if isinstance(v, dict)}
            self.targets = sorted(f"{v['node']}[{v['replica']}].{v['socket']}" for v in eps.values())
            senders = [f"aggregator[0]/{c}" for c in range(4)] + [f"producer[{r}]/{t}" for r in range(4) for t in range(2)]
            socks = []
            for v in eps.values():
                s = ctx.socket(zmq.PUSH)
                s.linger = 0
                s.sndtimeo = 200
                s.connect(v["address"])
                socks.append(s)
            for _ in range(self.rounds):
                for s in socks:
                    for msg in bad_messages(self.pipe, self.rng, senders):
                        try:
                            s.send_multipart(msg)
                            self.sent += 1
                        except zmq.Again:
                            pass
                time.sleep(0.01)
            for s in socks:
                s.close(linger=1000)
            ctx.term()
        except BaseException as exc:
            self.error = exc


@pytest.mark.timeout(BOUND + 60)
def test_forged_and_malformed_messages_at_every_socket_leave_every_scan_exact(tmp_path):
    topo = chaos_topology(tmp_path, scans=3, delay=0.003)
    params = params_of(topo)
    run = Run(topo, tmp_path / "out").start()
    try:
        run.wait_for(lambda: len([k for k in run.kv.items("endpoints/") if "/nodegroup/" in k]) >= 8, 60,
                     "every node group's sockets")
        pipe = run.wait_for(lambda: (run.kv.get("pipeline") or {}).get("id"), 30, "the pipeline id")
        run.at_fraction(1, 0.05, 24 * 24 * 4)
        forger = Forger(run, pipe, rounds=20, seed=11)
        forger.start()
        forger.join(120)
        code = run.finish(BOUND)
        assert forger.error is None, forger.error
        assert forger.sent > 2000 and len(forger.targets) >= 12, (forger.sent, forger.targets)
        reports = run.reports()
        assert sorted(reports) == [1, 2, 3], run.stdout()
        for scan, r in reports.items():
            if r.get("on_disk"):  # no node group was left: to disk, whole
                assert r["outcome"] == "complete", r
                continue
            # Exact, whatever the forger did: a forged `end` or `done` under a real sender's name (this
            # forger knows the pipeline's id and the names: the threat model's "insider" until senders
            # are authenticated) may end a sender's share early; its items are then named lost.
            Truth(params, scan).check(r)
        out = run.stdout()
        rejected = sum(int(x.replace(",", "")) for x in __import__("re").findall(r"rejected ([\d,]+)", out.splitlines()[-1]))
        print(f"forger sent {forger.sent:,} bad messages to {len(forger.targets)} sockets "
              f"({', '.join(forger.targets)}); the nodes rejected {rejected:,}; exit {code} in {run.seconds:.1f} s; "
              f"outcomes { {s: r['outcome'] for s, r in sorted(reports.items())} }")
        assert rejected >= forger.sent * 0.9  # the rest are malformed beyond a message (dropped by ZeroMQ)
        assert code in (0, 3), run.stderr()[-2000:]
        assert "Traceback" not in run.stderr()
        assert run.stderr().count("rejected a message from unknown sender: header is not msgpack") <= 12
    finally:
        run.close()
    assert not run.left_behind


def _kv_garbage():
    spec = importlib.util.spec_from_file_location("kv_malformed", ROOT / "kv" / "test_malformed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(BOUND + 60)
def test_a_registry_flooded_with_malformed_messages_keeps_the_pipeline_exact(tmp_path):
    """1,000 malformed messages of each kind to the registry's server (and, relayed, to its clients)
    while the scans stream: the server and every client stay alive and the scans are exact."""
    from zpipe.kv import protocol as p

    kvm = _kv_garbage()
    topo = chaos_topology(tmp_path, scans=2, delay=0.003)
    params = params_of(topo)
    run = Run(topo, tmp_path / "out").start()
    try:
        run.at_fraction(1, 0.05, 24 * 24 * 4)
        hello = kvm.hello(run.registry)
        ctx = zmq.Context()
        dealer, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
        for s in (dealer, push):
            s.linger = 0
        dealer.connect(run.registry)
        push.connect(hello["collector"].replace("0.0.0.0", "127.0.0.1"))
        kinds = 0
        for frames_list in kvm.REQUESTS.values():
            for frames in kvm.cycle(frames_list):
                dealer.send_multipart(frames)
            kinds += 1
        for variants in kvm.SNAPSHOT_REQUESTS.values():
            for payload in kvm.cycle(variants):
                dealer.send_multipart([p.SNAPSHOT, b"1", payload])
            kinds += 1
        for variants in kvm.COLLECTOR.values():
            for frames in kvm.cycle(variants):
                push.send_multipart(frames)
            kinds += 1
        time.sleep(1)
        dealer.close()
        push.close()
        ctx.term()
        code = run.finish(BOUND)
        reports = run.reports()
        assert sorted(reports) == [1, 2], run.stdout()
        for scan, r in reports.items():
            Truth(params, scan).check(r)
            assert r["outcome"] == "complete", (scan, r["reasons"])
        assert code == 0, run.stderr()[-2000:]
        assert "Traceback" not in run.stderr() and "stopped on an error" not in run.stderr()
        print(f"registry flood: {kinds} kinds x {kvm.N:,} malformed messages during the scans; exit {code} in "
              f"{run.seconds:.1f} s; both scans complete and exact")
    finally:
        run.close()
    assert not run.left_behind
