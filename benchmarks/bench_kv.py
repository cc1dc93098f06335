"""How fast the KV store moves updates and snapshots, next to raw pyzmq doing the same.

Absolute numbers swing with the machine's load, so each figure comes with a ratio
to a raw-pyzmq baseline measured in the same run:

* update rate: a client's ``set()`` calls until the last update is visible in a
  second client, vs. PUSH -> PULL/PUB forwarder -> SUB of the same msgpack frames;
* snapshot: a new client joining until it holds 10,000 keys, vs. a DEALER fetching
  the same 10,000 key/values from a ROUTER (one message; one message per key).

Both servers run in their own process; both sides' clients run in this one.
Usage: ``python benchmarks/bench_kv.py``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zpipe.kv import KVClient  # noqa: E402

UPDATES = 50_000
SNAPSHOT_KEYS = 10_000
ROUNDS = 3


def value(i: int) -> dict:
    return {"i": i, "name": f"node-{i}", "status": "streaming", "expected": i * 7}


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# -- the raw baseline server (runs as a child process) -----------------------------


def raw_server() -> None:
    """PULL -> PUB forwarder plus a ROUTER serving SNAPSHOT_KEYS key/values."""
    ctx = zmq.Context()
    pull, pub, router = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    pub.sndhwm = router.sndhwm = 100_000
    for s in (pull, pub, router):
        s.linger = 0
        s.bind("tcp://127.0.0.1:0")
    store = {f"snap/{i}": pack(value(i)) for i in range(SNAPSHOT_KEYS)}
    blob = pack([[k, v, None] for k, v in store.items()])
    print(" ".join(s.last_endpoint.decode() for s in (pull, pub, router)), flush=True)
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(router, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        while pull in events:  # drain, then poll: the fast way to forward
            try:
                pub.send_multipart(pull.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        if router in events:
            identity, how = router.recv_multipart()
            if how == b"one":
                router.send_multipart([identity, blob])
            else:  # the Clone guide's way: one message per key, then an end marker
                for k, v in store.items():
                    router.send_multipart([identity, k.encode(), v])
                router.send_multipart([identity, b"", b""])


# -- measurements -------------------------------------------------------------------


def kv_update_rate(address: str) -> float:
    with KVClient(address, ["bench/"]) as writer, KVClient(address, ["bench/"]) as reader:
        last_key, last = f"bench/{(UPDATES - 1) % 1000}", value(UPDATES - 1)
        t0 = time.perf_counter()
        for i in range(UPDATES):
            writer.set(f"bench/{i % 1000}", value(i))
        while reader.get(last_key) != last:  # polling get() is cheaper than wait() here
            time.sleep(0.001)
        rate = UPDATES / (time.perf_counter() - t0)
        if reader.resyncs:
            print(f"  (reader resynchronised {reader.resyncs} times)")
        return rate


def raw_update_rate(ctx: zmq.Context, pull_ep: str, pub_ep: str) -> float:
    push, sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.SUB)
    push.sndhwm = sub.rcvhwm = 100_000
    sub.subscribe(b"")
    sub.connect(pub_ep)
    push.connect(pull_ep)
    try:
        while True:  # wait until the subscription has reached the forwarder
            push.send_multipart([b"hi", b""])
            if sub.poll(100):
                break
        while sub.poll(50):
            sub.recv_multipart()
        done = threading.Event()

        def receive() -> None:
            while True:
                topic, header, body = sub.recv_multipart()
                unpack(header), unpack(body)  # what a KV client does with each update
                if topic == b"kend":
                    done.set()
                    return

        thread = threading.Thread(target=receive)
        thread.start()
        t0 = time.perf_counter()
        for i in range(UPDATES):
            key = b"end" if i == UPDATES - 1 else f"bench/{i % 1000}".encode()
            push.send_multipart([b"k" + key, pack([i, "epoch", None, b"origin", {"": i}]), pack(value(i))])
        done.wait()
        rate = UPDATES / (time.perf_counter() - t0)
        thread.join()
        return rate
    finally:
        push.close(linger=0)
        sub.close(linger=0)


def kv_snapshot_time(address: str) -> float:
    with KVClient(address, ["snap/"]) as writer:
        for i in range(SNAPSHOT_KEYS):
            writer.set(f"snap/{i}", value(i))
        writer.wait(lambda items: len(items) == SNAPSHOT_KEYS, prefix="snap/", timeout=120)
        times = []
        for _ in range(ROUNDS * 2):
            t0 = time.perf_counter()
            with KVClient(address, ["snap/"]) as joiner:
                took = time.perf_counter() - t0
                assert len(joiner.items()) == SNAPSHOT_KEYS
            times.append(took)
        return statistics.median(times)


def raw_snapshot_time(ctx: zmq.Context, router_ep: str, how: bytes) -> float:
    times = []
    for _ in range(ROUNDS * 2):
        t0 = time.perf_counter()
        dealer = ctx.socket(zmq.DEALER)
        dealer.rcvhwm = 100_000
        dealer.connect(router_ep)
        dealer.send(how)
        if how == b"one":
            state = {k: unpack(v) for k, v, _ in unpack(dealer.recv())}
        else:
            state = {}
            while True:
                k, v = dealer.recv_multipart()
                if not k:
                    break
                state[k.decode()] = unpack(v)
        times.append(time.perf_counter() - t0)
        dealer.close(linger=0)
        assert len(state) == SNAPSHOT_KEYS
    return statistics.median(times)


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def main() -> None:
    kv, address = start(["-m", "zpipe.kv", "--bind", "tcp://127.0.0.1:0"])
    raw, endpoints = start([__file__, "--raw-server"])
    pull_ep, pub_ep, router_ep = endpoints.split()
    ctx = zmq.Context()
    try:
        kv_rates, raw_rates = [], []
        for _ in range(ROUNDS):  # interleaved, so both see the same background load
            kv_rates.append(kv_update_rate(address))
            raw_rates.append(raw_update_rate(ctx, pull_ep, pub_ep))
        kv_rate, raw_rate = statistics.median(kv_rates), statistics.median(raw_rates)
        kv_snap = kv_snapshot_time(address)
        raw_one = raw_snapshot_time(ctx, router_ep, b"one")
        raw_each = raw_snapshot_time(ctx, router_ep, b"each")
    finally:
        ctx.term()
        for proc in (kv, raw):
            proc.terminate()
            proc.wait(timeout=10)

    print(f"KV update rate     : {kv_rate:10,.0f} updates/s  "
          f"(raw PUSH->PULL->PUB->SUB {raw_rate:,.0f}/s; ratio {kv_rate / raw_rate:.2f})")
    print(f"KV snapshot 10,000 : {kv_snap * 1e3:10.1f} ms        "
          f"(raw DEALER/ROUTER one message {raw_one * 1e3:.1f} ms, ratio {kv_snap / raw_one:.2f}; "
          f"one message per key {raw_each * 1e3:.1f} ms, ratio {kv_snap / raw_each:.2f})")
    print(f"medians of {ROUNDS} update runs of {UPDATES:,} and {ROUNDS * 2} joins; "
          f"{sys.platform}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--raw-server"]:
        raw_server()
    else:
        main()
