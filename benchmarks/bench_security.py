"""What security costs (issue 12): the 4D-Camera transport with data links under CURVE, under the address
allow-list and with none, and the control plane (registry) under CURVE, against raw pyzmq, same run.

Pipelines, interleaved run by run so that the machine's noise hits each alike (medians of --repeat):

* raw relay chain / raw relay chain, CURVE: 4 producer processes PUSH to a relay that routes by
  frame_number mod 2 to 2 consumers (bench_transport.py's baseline), without and with CURVE on every
  link (libzmq's own encryption cost; no ZAP handler, so any client key is accepted: the per-byte cost
  is the same, authentication is per connection).
* zpipe, no security: benchmarks/topologies/bench-aggregator.yaml as it is.
* zpipe, registry curve: `security: {keys, registry: curve, data: none}`: the control plane only
  (registry, status, results gather) under CURVE, every write checked. The issue's bound: < 2 % of
  throughput.
* zpipe, data allow: registry curve, data links behind the ZAP address allow-list (no per-byte cost).
* zpipe, data curve: registry curve, every data link under CURVE.

GB/s: payload bytes / time, raw: first send to last receive; zpipe: the scan report's received x
165,888 B / streaming_seconds (first message sent to last frame processed), as bench_transport.py.
CPU per message: every process's user + system CPU (libzmq's threads included) / messages. zpipe's is
read by each process as it exits (bench_transport.py's sitecustomize hook); so that start-up drops out,
each zpipe variant also runs, in every repetition, with a scan LONG (4) times as long, and its CPU per
message is the median of (CPU at 4N - CPU at N) / 3N's messages, as bench_transport.py does.

The control plane's cost, in CPU: the same hook records the CPU of every thread by name, libzmq's
included (the registry's contexts name theirs "1/ZMQbg/..." and "2/ZMQbg/..."). The control plane's
threads' CPU with CURVE minus without, paired run by run (both lengths), as a share of the pipeline's CPU: on two busy
cores a share of CPU is a share of throughput, and it is steady where GB/s is not. The results gather
shares the data context's threads and is not in it: one message per node group per scan.

Usage: python benchmarks/bench_security.py [--frames N] [--repeat K]
       python benchmarks/bench_security.py --quick      # a few seconds' smoke run, figures meaningless
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transport as bt  # noqa: E402  (its zpipe runner, topology writer and process hook)

SECTORS, PAYLOAD_BYTES, FIRST_FRAME, NODE_GROUPS = bt.SECTORS, bt.PAYLOAD_BYTES, bt.FIRST_FRAME, bt.NODE_GROUPS
LONG = 4  # the longer scan of each repetition, x frames: CPU per message without start-up


# -- raw pyzmq, with or without CURVE ----------------------------------------------------------------

def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _secure(sock, keys, server: bool, server_public=None) -> None:
    if keys is None:
        return
    public, secret = keys
    sock.curve_secretkey, sock.curve_publickey = secret, public
    if server:
        sock.curve_server = True
    else:
        sock.curve_serverkey = server_public


def _consumer(expected, keys, port_q, result_q):
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    _secure(pull, keys, True)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    n = nbytes = 0
    first = None
    while n < expected:
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pull.poll(100)
            continue
        if first is None:
            first = time.time()
        n += 1
        nbytes += len(frames[-1].buffer)
    result_q.put(("consumer", {"messages": n, "bytes": nbytes, "last": time.time(), "cpu": _cpu()}))
    ctx.destroy(linger=0)


def _relay(expected, keys, ports, port_q, result_q):
    import msgpack
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    _secure(pull, keys, True)
    port_q.put(pull.bind_to_random_port("tcp://127.0.0.1"))
    outs = []
    for p in ports:
        s = ctx.socket(zmq.PUSH)
        s.sndhwm = 100
        _secure(s, keys, False, keys[0] if keys else None)
        s.connect(f"tcp://127.0.0.1:{p}")
        outs.append(s)
    n = 0
    while n < expected:
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pull.poll(100)
            continue
        header = msgpack.unpackb(frames[0].bytes)
        outs[header["frame_number"] % len(outs)].send_multipart(frames, copy=False)
        n += 1
    result_q.put(("relay", {"cpu": _cpu()}))
    ctx.destroy(linger=5000)


def _producer(module, frames, keys, port, ready, start, result_q):
    import msgpack
    import numpy as np
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.sndhwm = 100
    _secure(push, keys, False, keys[0] if keys else None)
    push.connect(f"tcp://127.0.0.1:{port}")
    payload = np.zeros(bt.SECTOR_SHAPE, np.uint16).tobytes()
    ready.wait()
    start.wait()
    first = time.time()
    for i in range(frames):
        push.send_multipart([msgpack.packb({"frame_number": FIRST_FRAME + i, "module": module, "scan": 1}), payload],
                            copy=False)
    result_q.put(("producer", {"first": first, "cpu": _cpu()}))
    ctx.destroy(linger=30000)


def run_raw(frames: int, curve: bool) -> dict:
    import zmq

    keys = zmq.curve_keypair() if curve else None  # one pair for all: libzmq's per-byte cost is what is measured
    mpc = mp.get_context("fork")
    port_q, result_q = mpc.Queue(), mpc.Queue()
    total = frames * SECTORS
    per = [sum(1 for i in range(frames) if (FIRST_FRAME + i) % NODE_GROUPS == c) * SECTORS for c in range(NODE_GROUPS)]
    procs, ports = [], []
    for c in range(NODE_GROUPS):
        procs.append(mpc.Process(target=_consumer, args=(per[c], keys, port_q, result_q)))
        procs[-1].start()
        ports.append(port_q.get(timeout=30))
    procs.append(mpc.Process(target=_relay, args=(total, keys, ports, port_q, result_q)))
    procs[-1].start()
    relay_port = port_q.get(timeout=30)
    ready, start = mpc.Barrier(SECTORS + 1), mpc.Event()
    for k in range(SECTORS):
        procs.append(mpc.Process(target=_producer, args=(k, frames, keys, relay_port, ready, start, result_q)))
        procs[-1].start()
    ready.wait(timeout=30)
    time.sleep(0.2)
    start.set()
    results: dict[str, list[dict]] = {}
    try:
        for _ in procs:
            kind, r = result_q.get(timeout=bt.RUN_TIMEOUT)
            results.setdefault(kind, []).append(r)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.exitcode is None:
                p.kill()
    received = sum(r["messages"] for r in results.get("consumer", []))
    nbytes = sum(r["bytes"] for r in results.get("consumer", []))
    seconds = max(r["last"] for r in results["consumer"]) - min(r["first"] for r in results["producer"])
    cpu = sum(r["cpu"] for rs in results.values() for r in rs)
    return {"ok": received == total, "expected": total, "received": received, "seconds": seconds,
            "gbps": nbytes / seconds / 1e9, "cpu_us": 1e6 * cpu / total}  # raw: nothing to start up


# -- zpipe ---------------------------------------------------------------------------------------------

VARIANTS = {
    "zpipe, no security": None,
    "zpipe, registry curve": "security: {keys: keys, registry: curve, data: none}",
    "zpipe, data allow": "security: {keys: keys, registry: curve, data: allow}",
    "zpipe, data curve": "security: {keys: keys, registry: curve, data: curve}",
}


def topologies(frames: int, work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    base = bt.write_topology(bt.TOPOLOGIES / "bench-aggregator.yaml", frames, work)
    out = {}
    for name, section in VARIANTS.items():
        path = work / (name.replace(", ", "-").replace(" ", "-") + ".yaml")
        path.write_text(base.read_text() + (f"\n{section}\n" if section else ""))
        out[name] = path
    keys = subprocess.run([sys.executable, "-m", "zpipe", "keys", str(work / "keys"), "--topology",
                           str(out["zpipe, data curve"])], capture_output=True, text=True, timeout=60)
    if keys.returncode != 0:
        raise SystemExit(f"zpipe keys failed: {keys.stderr}")
    return out


def zpipe_cpu(run: dict) -> float:
    procs = run.get("procs") or {}
    return sum(p["cpu"] for p in procs.values()) if procs and run.get("ok") else math.nan


# The control plane's threads, by name (bench_transport.py's hook records each): the KV clients' agents (a node's
# is named after it, "kv agent" in the record; the runner's and its accountant's after them), the accountant,
# the registry server and its ZAP handler, the status publishers; and libzmq's threads of the registry's
# contexts, which zpipe names "1/ZMQbg/..." (clients) and "2/ZMQbg/..." (server): where CURVE's work is done.
CONTROL_THREADS = ("kv agent", "runner", "accountant", "kv-server", "status", "zap-the registry")
CONTROL_ZMQ_THREADS = ("1/", "2/")


def control_cpu(run: dict) -> float:
    """CPU seconds of every process's control-plane threads (nan if the run did not report them all)."""
    procs = run.get("procs") or {}
    if not procs or not run.get("ok"):
        return math.nan
    total = 0.0
    for p in procs.values():
        total += sum(v for k, v in p["threads"].items() if k.startswith(CONTROL_THREADS))
        total += sum(v for k, v in p.get("zmq_threads", {}).items() if k.startswith(CONTROL_ZMQ_THREADS))
    return total


def print_control_plane(runs: dict[str, list[dict]], longer: dict[str, list[dict]], frames: int) -> None:
    """The control plane's CURVE, in CPU: on a CPU-bound machine a CPU share is a throughput share, and unlike
    GB/s (which swings by 10 % between identical runs here) CPU by thread is steady enough to show 2 %.
    Pairs: each repetition's runs without and with it, at both lengths (N, then LONG x N)."""
    pairs = {}  # frames -> [(control CPU none, control CPU curve, the curve run's whole CPU)]
    for n, group in ((frames, runs), (LONG * frames, longer)):
        got = [(control_cpu(a), control_cpu(b), zpipe_cpu(b))
               for a, b in zip(group["zpipe, no security"], group["zpipe, registry curve"])]
        pairs[n] = [p for p in got if not any(math.isnan(v) for v in p)]
    every = [p for ps in pairs.values() for p in ps]
    if not every:
        print("control plane under CURVE, in CPU: not measured (no pair of runs reported its processes)")
        return
    share = {n: [100 * (b - a) / total for a, b, total in ps] for n, ps in pairs.items()}
    median = bt.med(v for vs in share.values() for v in vs)
    print(f"control plane under CURVE, in CPU (registry clients and server, their libzmq threads, ZAP, status, "
          f"accountant): none {1e3 * bt.med(a for a, _, _ in every):.0f} ms, curve "
          f"{1e3 * bt.med(b for _, b, _ in every):.0f} ms of the pipeline's {bt.med(t for *_, t in every):.1f} s "
          f"(medians over both lengths); CURVE adds {1e3 * bt.med(b - a for a, b, _ in every):+.0f} ms = "
          f"{median:+.2f} % of the pipeline's CPU, largest {max(v for vs in share.values() for v in vs):+.2f} % ("
          + "; ".join(f"{n:,} frames: {', '.join(f'{v:+.2f}' for v in vs)} %" for n, vs in share.items())
          + f"): {'within' if median <= 2 else 'ABOVE'} the issue's 2 % of throughput on these busy cores")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=4096, help="frames per scan (4 messages each); default 4096")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pipeline; medians are printed")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 frames, once; figures meaningless")
    args = ap.parse_args()
    if args.quick:
        args.frames, args.repeat = 64, 1
    frames, messages = args.frames, args.frames * SECTORS
    import zmq

    if not zmq.has("curve"):
        print("bench_security: this libzmq has no CURVE", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    print(f"bench_security: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; pyzmq {zmq.__version__} "
          f"(libzmq {zmq.zmq_version()}, CURVE {'libsodium' if zmq.has('curve') else 'none'}); {frames:,} frames = "
          f"{messages:,} messages of {PAYLOAD_BYTES:,} B ({messages * PAYLOAD_BYTES / 1e9:.2f} GB); "
          f"{args.repeat} runs each, interleaved; medians\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_security-"))
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(bt.SITECUSTOMIZE)
    runs: dict[str, list[dict]] = {"raw relay chain": [], "raw relay chain, CURVE": [], **{v: [] for v in VARIANTS}}
    problems = []
    try:
        topos = topologies(frames, work)
        long = topologies(LONG * frames, work / "long")
        longer: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rep in range(args.repeat):
            line = []
            for name, curve in (("raw relay chain", False), ("raw relay chain, CURVE", True)):
                r = run_raw(frames, curve)
                runs[name].append(r)
                line.append(f"{name} {r['gbps']:.2f} GB/s")
            for name, topo in topos.items():
                z = bt.run_zpipe(topo, work / f"run-{len(line)}", hook)
                runs[name].append(z)
                line.append(f"{name} {z['gbps']:.2f} GB/s")
                z4 = bt.run_zpipe(long[name], work / "run-long", hook)  # CPU per message without start-up
                longer[name].append(z4)
                if not z4["ok"]:
                    problems.append(f"{name} {LONG * frames:,}-frame run {rep + 1}: expected {z4['expected']:,}, "
                                    f"received {z4['received']:,}")
            for name, rs in runs.items():
                if not rs[-1]["ok"]:
                    problems.append(f"{name} run {rep + 1}: expected {rs[-1]['expected']:,}, received "
                                    f"{rs[-1]['received']:,}")
            print(f"  run {rep + 1}: " + "; ".join(line), flush=True)
        gbps = {n: bt.med(r["gbps"] for r in rs) for n, rs in runs.items()}
        cpu_runs = {n: [r["cpu_us"] for r in rs] for n, rs in runs.items() if not n.startswith("zpipe")}
        cpu_runs.update({n: [1e6 * (zpipe_cpu(b) - zpipe_cpu(a)) / ((LONG - 1) * messages)
                             for a, b in zip(runs[n], longer[n])] for n in VARIANTS})
        cpu = {n: bt.med(v) for n, v in cpu_runs.items()}
        raw, plain = gbps["raw relay chain"], gbps["zpipe, no security"]
        print(f"\n{'pipeline':24s} {'GB/s':>6s} {'range':>11s} {'x raw':>6s} {'x zpipe none':>12s} "
              f"{'CPU us/msg':>10s} {'range':>11s} {'+ vs none':>9s}")
        for name, rs in runs.items():
            g = [r["gbps"] for r in rs]
            zp = name.startswith("zpipe")
            rel = f"{gbps[name] / plain:12.2f}" if zp else f"{'':12s}"
            ref = cpu["zpipe, no security"] if zp else cpu["raw relay chain"]
            print(f"{name:24s} {gbps[name]:6.2f} {min(g):5.2f}-{max(g):<5.2f} {gbps[name] / raw:6.2f} {rel} "
                  f"{cpu[name]:10.1f} {min(cpu_runs[name]):5.0f}-{max(cpu_runs[name]):<5.0f} {cpu[name] - ref:+9.1f}")
        control = 100 * (plain - gbps["zpipe, registry curve"]) / plain
        print(f"\ncontrol plane under CURVE, in throughput: {control:+.1f} % vs none (medians; runs swing by about "
              f"10 %, so this figure alone cannot show 2 %)")
        print_control_plane(runs, longer, frames)
        print(f"data links under CURVE: {gbps['zpipe, data curve']:.2f} GB/s, "
              f"{gbps['zpipe, data curve'] / plain:.2f} x none; raw pyzmq's own CURVE: "
              f"{gbps['raw relay chain, CURVE'] / raw:.2f} x raw; allow-list: {gbps['zpipe, data allow'] / plain:.2f} x none")
        print(f"CPU us/msg: every process, user + system, / messages (zpipe: CPU of a {LONG * frames:,}-frame scan minus "
              f"that of the {frames:,}-frame one of the same repetition, / {(LONG - 1) * messages:,}: start-up drops "
              f"out; medians, and the range of the runs: the whole pipeline's CPU per message moves with the load's batching "
              f"by more than the control plane's share, which its own line above measures); + vs none: minus the same-kind "
              f"pipeline without security.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        print("\n!!! PROBLEMS (figures these touch are not to be trusted):")
        for p in problems:
            print(f"!!!   {p}")
    print(f"\ntotal {time.monotonic() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
