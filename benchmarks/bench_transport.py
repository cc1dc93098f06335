"""How close zpipe's 4D-Camera topologies come to raw pyzmq moving the same messages, and whether memory stays flat.

Four pipelines move the same messages (a ~100 B msgpack header + one 144x576 uint16
sector, 165,888 B; 4 messages a frame) from four producer processes, one per sector, to
two consumers, over tcp loopback, zero-copy:

* raw relay chain, the issue's baseline: 4 producer processes (1 thread each; zpipe's have
  2) PUSH to one relay process (1 thread, one PULL all producers connect to) that unpacks
  the header and routes by frame_number mod 2 to one of two PUSH sockets; 2 consumer
  processes receive (copy=False) and count. Every loop drains with NOBLOCK and polls only
  when empty. GB/s = payload bytes / (last receive - first send).
* raw direct chain: the same without the relay; each producer routes by frame_number over
  one PUSH per consumer. The like-for-like baseline of zpipe's direct topology.
* zpipe aggregator: benchmarks/topologies/bench-aggregator.yaml (4dcamera-local.yaml with
  `payload: constant` and the `discard` analysis): 4 producers x 2 threads -> aggregator
  (4 threads) -> 2 node groups (4 receiver threads + 1 worker each, frames assembled).
* zpipe direct: benchmarks/topologies/bench-direct.yaml, the producers route themselves.

zpipe's GB/s is taken from the scan's report: `received` x 165,888 B / `streaming_seconds`,
which runs from the first message any producer sent to the last frame processed (so,
like raw's first send to last receive, but also through assembly, analysis and the
end-of-scan account). The whole scan's time (announcement to report, which adds finding
the node groups and closing the scan) and the wall time of the whole `zpipe run`
(start-up and shut-down included) are printed beside it. A report whose
expected != received (or that is not ok) is flagged loudly. Runs interleave so that the
machine's noise hits every pipeline alike; medians of --repeat runs.

Memory: every zpipe process (runner and nodes) reads its own peak RSS (VmHWM), its CPU
time and each of its Python threads' CPU time just before it exits, through a
sitecustomize.py put on PYTHONPATH (zpipe itself is not touched). The peaks of a scan of N
frames and of 4N frames are compared per process: memory should be bounded by queue
limits and high-water marks, so it must not grow with the scan.

CPU per message: the CPU time of every process (user + system, libzmq's I/O thread
included) per message moved, from the N- and 4N-frame runs so that start-up drops out;
each role split into its Python threads and the rest (libzmq). Steadier than GB/s on a
shared machine, and it says how much work each design does per message.

--profile NODE[REPLICA][,...] (e.g. nodegroup[0]) adds one run (of --profile-topology) with
cProfile on every thread of those processes, timed in each thread's CPU time, and prints
where each thread's time goes.

--netns runs the raw relay chain and the aggregator topology across a link between two network
namespaces instead (root): producers and relay/aggregator on one, consumers/node groups on the
other, so every message crosses a veth pair and a bridge; GB/s of each and the ratio, same run.

Usage: python benchmarks/bench_transport.py [--frames N] [--repeat K] [--no-memory]
                                            [--profile LABELS [--profile-topology direct]]
       python benchmarks/bench_transport.py --netns [--frames N] [--repeat K]
"""

from __future__ import annotations

import argparse
import json
import marshal
import math
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPOLOGIES = Path(__file__).resolve().parent / "topologies"
SECTOR_SHAPE = (144, 576)
PAYLOAD_BYTES = SECTOR_SHAPE[0] * SECTOR_SHAPE[1] * 2  # 165,888
SECTORS = 4
FRAME_BYTES = SECTORS * PAYLOAD_BYTES
NODE_GROUPS = 2
FIRST_FRAME = 1000
RUN_TIMEOUT = 300  # seconds one `zpipe run` may take before the benchmark gives up on it
HOSTS_REGISTRY_PORT = 47650  # --netns: the registry's port on host a (inside the namespace: nothing else there)
# Peak RSS may differ by this much (or this fraction) between the N- and 4N-frame scans before we call it
# growth: run to run, a producer's peak swings by up to ~50 MB, as its two threads build the simulated
# camera's noise pool (~80 MB of float64 temporaries each, payload: constant or not) together or apart.
GROWTH_MB = 64.0
GROWTH_FRACTION = 0.15
TARGET = 0.8  # the target ratio to the raw chain
ROLE_ORDER = ("producer", "aggregator", "nodegroup", "runner")

# -- raw pyzmq chain -----------------------------------------------------------------------------


def _cpu() -> dict:
    """This process's CPU seconds: all of it, and its one Python thread's (the rest is libzmq's I/O thread)."""
    t = os.times()
    return {"total": t.user + t.system, "python": time.thread_time()}


# Where each kind of raw process runs: (network namespace or None, the address it binds and is reached at).
# --netns places the producers and the relay on one namespace and the consumers on another, as zpipe's
# producers and aggregator on one host and its node groups on another.
PLACES = {"producer": (None, "127.0.0.1"), "relay": (None, "127.0.0.1"), "consumer": (None, "127.0.0.1")}


def _place(kind: str) -> str:
    """Move this (new, single-threaded) process into its kind's namespace; its address there."""
    ns, address = PLACES[kind]
    if ns:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), f"setns into {ns}")
        finally:
            os.close(fd)
    return address


def _raw_consumer(expected: int, port_q, result_q) -> None:
    address = _place("consumer")
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port(f"tcp://{address}")
    port_q.put(f"tcp://{address}:{port}")
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    n = nbytes = 0
    while n < expected:
        poller.poll()
        while n < expected:
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            n += 1
            nbytes += len(frames[1])
    last = time.monotonic()
    result_q.put(("consumer", {"messages": n, "bytes": nbytes, "last": last, "cpu": _cpu()}))
    pull.close(linger=0)
    ctx.term()


def _raw_relay(expected: int, consumer_ports: list[str], port_q, result_q) -> None:
    address = _place("relay")
    import msgpack
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port(f"tcp://{address}")
    outs = []
    for p in consumer_ports:
        s = ctx.socket(zmq.PUSH)
        s.connect(p)
        outs.append(s)
    port_q.put(f"tcp://{address}:{port}")
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    unpackb, n_out = msgpack.unpackb, len(outs)
    n = 0
    while n < expected:
        poller.poll()
        while n < expected:
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            header = unpackb(frames[0].buffer, raw=False)
            outs[header["frame_number"] % n_out].send_multipart(frames, copy=False)
            n += 1
    for s in outs:
        s.close(linger=-1)
    pull.close(linger=0)
    ctx.term()  # returns once everything queued reached the consumers
    result_q.put(("relay", {"messages": n, "cpu": _cpu()}))


def _raw_producer(module: int, frames: int, width: int, ports: list[str], ready, start, result_q) -> None:
    """Sends its sector of every frame: to the relay (one port), or routed itself by frame_number (one per consumer)."""
    _place("producer")
    import msgpack
    import numpy as np
    import zmq

    ctx = zmq.Context()
    pushes = []
    for port in ports:
        pushes.append(ctx.socket(zmq.PUSH))
        pushes[-1].connect(port)
    n_out = len(pushes)
    payload = np.full(SECTOR_SHAPE, 20, dtype=np.uint16)  # as zpipe's `payload: constant`
    pack = msgpack.Packer(use_bin_type=True).pack
    height = math.ceil(frames / width)
    ready.wait()
    start.wait()
    first = time.monotonic()
    for i in range(frames):
        # The header the simulated camera sends (zpipe_4dcamera SimulatedCamera.header + scan).
        header = {"scan_number": 1, "frame_number": FIRST_FRAME + i, "scan_width": width, "scan_height": height,
                  "scan_x": i % width, "scan_y": i // width, "module": module, "scan": 1}
        pushes[header["frame_number"] % n_out].send_multipart([pack(header), payload], copy=False)
    for push in pushes:
        push.close(linger=-1)
    ctx.term()
    result_q.put(("producer", {"messages": frames, "first": first, "cpu": _cpu()}))


def run_raw(frames: int, width: int, relay: bool = True) -> dict:
    """The raw chain once (without `relay`: producers route to the consumers themselves, as zpipe's direct
    topology does); GB/s from the first send of any producer to the last receive of any consumer."""
    mpc = mp.get_context("fork")  # no zmq context exists in this process, so forking is safe
    port_q, result_q = mpc.Queue(), mpc.Queue()
    total = frames * SECTORS
    per_consumer = [sum(1 for i in range(frames) if (FIRST_FRAME + i) % NODE_GROUPS == c) * SECTORS
                    for c in range(NODE_GROUPS)]
    procs = []
    ports = []
    for c in range(NODE_GROUPS):
        procs.append(mpc.Process(target=_raw_consumer, args=(per_consumer[c], port_q, result_q)))
        procs[-1].start()
        ports.append(port_q.get(timeout=30))
    if relay:
        procs.append(mpc.Process(target=_raw_relay, args=(total, ports, port_q, result_q)))
        procs[-1].start()
        ports = [port_q.get(timeout=30)]
    ready, start = mpc.Barrier(SECTORS + 1), mpc.Event()
    for k in range(SECTORS):
        procs.append(mpc.Process(target=_raw_producer, args=(k, frames, width, ports, ready, start, result_q)))
        procs[-1].start()
    ready.wait(timeout=30)
    time.sleep(0.2)  # let the tcp connections come up; a slow joiner would only queue anyway
    start.set()
    results: dict[str, list[dict]] = {}
    for _ in procs:
        kind, r = result_q.get(timeout=RUN_TIMEOUT)
        results.setdefault(kind, []).append(r)
    for p in procs:
        p.join(timeout=30)
        if p.exitcode is None:
            p.kill()
    received = sum(r["messages"] for r in results["consumer"])
    nbytes = sum(r["bytes"] for r in results["consumer"])
    seconds = max(r["last"] for r in results["consumer"]) - min(r["first"] for r in results["producer"])
    cpu = {role: {k: sum(r["cpu"][k] for r in results[kind]) for k in ("total", "python")}
           for role, kind in (("producers", "producer"), ("relay", "relay"), ("consumers", "consumer"))
           if kind in results}
    return {"expected": total, "received": received, "ok": received == total and nbytes == total * PAYLOAD_BYTES,
            "seconds": seconds, "gbps": nbytes / seconds / 1e9, "wall": None, "cpu": cpu}


# -- zpipe runs ----------------------------------------------------------------------------------

# Runs in every Python process started with this directory on PYTHONPATH: the runner and each node.
SITECUSTOMIZE = r'''
import atexit
import json
import os
import resource
import sys
import threading
import time

_DIR = os.environ.get("BENCH_TRANSPORT_DIR")


def _label():
    argv = sys.argv
    if "--node" in argv:
        return f"{argv[argv.index('--node') + 1]}[{argv[argv.index('--replica') + 1]}]"
    return "runner"


_thread_cpu = {}  # thread name (numbers dropped) -> CPU seconds of the Python threads that ran under it
_thread_lock = threading.Lock()


def _group(name):
    base = name.rstrip("0123456789").rstrip("-")
    return "kv agent" if base.endswith("]") else base  # the KV client's thread is named after the node


def _timed_run(self, _run=threading.Thread._bootstrap_inner):  # subclasses that override run() too
    try:
        _run(self)
    finally:
        with _thread_lock:
            key = _group(self.name)
            _thread_cpu[key] = _thread_cpu.get(key, 0.0) + time.thread_time()


_zmq_threads = {}  # tid -> (name, CPU seconds) of libzmq's threads, as last seen: before each context ends, at exit


def _snapshot_zmq_threads():
    """libzmq's threads are not Python's: their CPU (schedstat: nanoseconds on the CPU) read from /proc, by name
    ("ZMQbg/IO/0", or "1/ZMQbg/IO/0" for a context with a thread name prefix, as the registry's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            if "ZMQbg" not in name:
                continue
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                _zmq_threads[tid] = (name, int(f.read().split()[0]) / 1e9)
        except (OSError, ValueError, IndexError):
            continue


def _measure_context_ends():
    try:
        import zmq
    except ImportError:
        return
    term = zmq.Context.term

    def measured_term(self):
        _snapshot_zmq_threads()  # the context's threads end with it
        return term(self)

    zmq.Context.term = measured_term


def _zmq_thread_cpu():
    _snapshot_zmq_threads()
    out = {}
    for name, cpu in _zmq_threads.values():
        key = name.rstrip("0123456789")
        out[key] = out.get(key, 0.0) + cpu
    return out


_max_pending = [None]  # node groups: the most items that ever waited in an Assembler for missing parts


def _watch_assembly():
    """Record how many items wait for their other parts, wrapping Assembler.add (zpipe's files untouched)."""
    try:
        from zpipe.assemble import Assembler
    except ImportError:
        return
    add = Assembler.add

    def watched_add(self, *args, **kwargs):
        result = add(self, *args, **kwargs)
        n = len(getattr(self, "pending", ()))
        if _max_pending[0] is None or n > _max_pending[0]:
            _max_pending[0] = n
        return result

    Assembler.add = watched_add


def _report():
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                status[key] = int(value.split()[0]) * 1024
    ru = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.path.join(_DIR, f"proc-{os.getpid()}.json"), "w") as f:
        json.dump({"label": _label(), "pid": os.getpid(), "peak_rss": status.get("VmHWM", 0),
                   "rss": status.get("VmRSS", 0), "cpu": ru.ru_utime + ru.ru_stime, "user": ru.ru_utime,
                   "sys": ru.ru_stime, "minflt": ru.ru_minflt, "nvcsw": ru.ru_nvcsw, "nivcsw": ru.ru_nivcsw,
                   "threads": {"main": time.thread_time(), **_thread_cpu}, "zmq_threads": _zmq_thread_cpu(),
                   "max_pending": _max_pending[0]}, f)


def _profile():
    """cProfile on every thread of this process, timed in the thread's own CPU time (waiting costs nothing)."""
    import cProfile
    import marshal
    profiles = []

    def start_thread(*_):
        p = cProfile.Profile(time.thread_time)
        profiles.append((threading.current_thread().name, p))
        p.enable()  # replaces this hook in the new thread

    threading.setprofile(start_thread)
    main = cProfile.Profile(time.thread_time)
    profiles.append(("MainThread", main))
    main.enable()

    def dump():
        main.disable()
        out = {}
        for name, p in profiles:
            p.create_stats()
            out.setdefault(name, []).append(p.stats)
        with open(os.path.join(_DIR, f"profile-{os.getpid()}.marshal"), "wb") as f:
            marshal.dump({"label": _label(), "threads": out}, f)

    atexit.register(dump)


if _DIR:
    threading.Thread._bootstrap_inner = _timed_run  # per-thread CPU without a profiler's overhead
    atexit.register(_report)
    _measure_context_ends()
    if _label().startswith("nodegroup["):
        _watch_assembly()
    if _label() in os.environ.get("BENCH_TRANSPORT_PROFILE", "").split(","):
        _profile()
'''


def scan_shape(frames: int) -> tuple[int, int]:
    """(width, height) with width * height == frames, as square as the number allows."""
    for h in range(int(math.isqrt(frames)), 0, -1):
        if frames % h == 0 and frames // h <= 0xFFFF:
            return frames // h, h
    raise ValueError(f"cannot lay {frames} frames out as a scan")


def write_topology(template: Path, frames: int, directory: Path) -> Path:
    from ruamel.yaml import YAML

    yaml = YAML()
    doc = yaml.load(template.read_text())
    doc["nodes"]["producer"]["params"]["scan_shape"] = list(scan_shape(frames))
    path = directory / f"{template.stem}-{frames}.yaml"
    with path.open("w") as f:
        yaml.dump(doc, f)
    return path


def hosts_topology(template: Path, frames: int, directory: Path, net) -> Path:
    """The topology on two hosts of `net`: producers, aggregator and registry on `a`, node groups on `b`,
    so that everything the node groups receive crosses the link between them."""
    from ruamel.yaml import YAML

    yaml = YAML()
    doc = yaml.load(write_topology(template, frames, directory).read_text())
    at = list(doc).index("nodes")
    doc.insert(at, "security", "none")  # the transport alone (benchmarks/bench_security.py measures security)
    doc.insert(at, "registry", {"host": "a", "port": HOSTS_REGISTRY_PORT})
    doc.insert(at, "hosts", {h: {"address": net.address[h]} for h in ("a", "b")})
    for node, host in (("producer", "a"), ("aggregator", "a"), ("nodegroup", "b")):
        doc["nodes"][node]["host"] = host
    path = directory / f"{template.stem}-{frames}-hosts.yaml"
    with path.open("w") as f:
        yaml.dump(doc, f)
    return path


def _run_on_hosts(topology: Path, workdir: Path, out: Path, env: dict, net) -> tuple[int, str]:
    """`zpipe run --host b` (the node groups, waiting for the registry) then `--host a` in their namespaces;
    the scan's report lands in `out` (a's, where the registry and its accountant run)."""
    procs = {}
    for host in ("b", "a"):
        log = workdir / f"{host}.log"
        with log.open("wb") as f:
            procs[host] = (net.popen(host, [sys.executable, "-m", "zpipe", "run", str(topology), "--host", host,
                                            "--output-dir", str(out if host == "a" else workdir / "out-b")],
                                     env=env, cwd=workdir, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL), log)
    deadline, codes = time.monotonic() + RUN_TIMEOUT, []
    for host, (proc, _) in procs.items():
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
            codes.append(-9)
    return max(codes, key=abs), "\n".join(f"--- {h}:\n{log.read_text(errors='replace')[-3000:]}"
                                          for h, (_, log) in procs.items())


def run_zpipe(topology: Path, workdir: Path, hook_dir: Path, profile: str | None = None, net=None) -> dict:
    out = workdir / "out"
    procdir = workdir / "procs"
    for d in (out, procdir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
           "BENCH_TRANSPORT_DIR": str(procdir), "ZPIPE_LOG": "WARNING"}
    if profile:
        env["BENCH_TRANSPORT_PROFILE"] = profile
    t0 = time.monotonic()
    if net is None:
        proc = subprocess.run([sys.executable, "-m", "zpipe", "run", str(topology), "--output-dir", str(out)],
                              env=env, cwd=workdir, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        code, said = proc.returncode, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    else:
        code, said = _run_on_hosts(topology, workdir, out, env, net)
    wall = time.monotonic() - t0
    reports = sorted(out.glob("scan_*_report.json"))
    if code != 0 or len(reports) != 1:
        print(f"!!! zpipe run {topology.name} exited {code} with {len(reports)} scan reports\n{said}", flush=True)
        return {"ok": False, "expected": 0, "received": 0, "seconds": math.nan, "gbps": math.nan, "wall": wall,
                "procs": {}, "profiles": {}}
    report = json.loads(reports[0].read_text())
    procs = {}
    for f in procdir.glob("proc-*.json"):
        rec = json.loads(f.read_text())
        procs[rec["label"]] = rec
    profiles = {}
    for f in procdir.glob("profile-*.marshal"):
        rec = marshal.loads(f.read_bytes())
        profiles[rec["label"]] = rec["threads"]
    received = report["received"]
    streaming = report.get("streaming_seconds") or math.nan
    return {"ok": bool(report.get("ok")) and report["expected"] == received, "expected": report["expected"],
            "received": received, "seconds": streaming, "scan_seconds": report["seconds"],
            "gbps": received * PAYLOAD_BYTES / streaming / 1e9, "wall": wall, "report": report,
            "procs": procs, "profiles": profiles}


# -- printing ------------------------------------------------------------------------------------


def print_status_cost(on: list[dict], off: list[dict]) -> None:
    """Status publishing's cost in CPU, which bounds its cost in throughput on a CPU-bound machine.

    Throughput on a shared 2-core machine swings by more than the 2 % to be shown; CPU time
    by thread does not. With status on: every process's publisher thread ("status"), plus what
    the runner (registry server, view) and the nodes' KV agents spend beyond their median
    with status off; as a share of all the pipeline's CPU with status on.
    """
    def threads(runs, name, procs=lambda lab: True):
        return [sum(p["threads"].get(name, 0.0) for lab, p in r["procs"].items() if procs(lab)) for r in runs]

    def cpu(runs, procs=lambda lab: True):
        return [sum(p["cpu"] for lab, p in r["procs"].items() if procs(lab)) for r in runs]

    if not all(r.get("procs") for r in on + off):
        print("status publishing's CPU: not measured (a run did not report its processes)")
        return
    runner = lambda lab: lab == "runner"  # noqa: E731
    publishers = med(threads(on, "status"))
    runner_extra = med(cpu(on, runner)) - med(cpu(off, runner))
    agents_extra = med(threads(on, "kv agent")) - med(threads(off, "kv agent"))
    total = med(cpu(on))
    cost = publishers + max(runner_extra, 0.0) + max(agents_extra, 0.0)
    print(f"status publishing's CPU: {1e3 * cost:.0f} ms of the pipeline's {total:.1f} s = {100 * cost / total:.2f} % "
          f"(publisher threads {1e3 * publishers:.0f} ms; runner, i.e. registry server and view, "
          f"{1e3 * runner_extra:+.0f} ms; nodes' KV agents {1e3 * agents_extra:+.0f} ms; medians of the runs above). "
          f"On 2 busy cores a CPU share is a throughput share: {'within' if cost / total <= 0.02 else 'ABOVE'} 2 %.")


def med(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


class _Stats:
    """What pstats.Stats takes in place of a profiler: stats already made (in the profiled process)."""

    def __init__(self, stats):
        self.stats = stats

    def create_stats(self):
        pass


def print_profile(profiles: dict, label: str, top: int = 12) -> None:
    import pstats

    print(f"\ncProfile of {label}, per thread, in CPU seconds of that thread (tottime: in the function "
          f"itself; C calls such as socket sends show as their own rows; cProfile slows Python code, "
          f"so compare shares, not seconds):")
    for name in sorted(profiles):
        stats_list = profiles[name]
        st = pstats.Stats(_Stats(stats_list[0]))
        for extra in stats_list[1:]:
            st.add(_Stats(extra))
        total = sum(v[2] for v in st.stats.values())
        if total < 0.05:
            continue
        print(f"  thread {name}: {total:.2f} CPU s")
        rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        for (file, line, func), (cc, nc, tt, ct, _callers) in rows:
            where = f"{Path(file).name}:{line}({func})" if file != "~" else func
            print(f"    {tt:7.3f} s {100 * tt / total:5.1f} %  {nc:>8d} calls  {where}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=4096, help="frames per scan (4 messages each); default 4096")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pipeline; medians are printed")
    ap.add_argument("--no-memory", action="store_true", help="skip the 4N-frame runs (memory and CPU per message)")
    ap.add_argument("--profile", metavar="NODE[REPLICA],...",
                    help="add one run with cProfile in these processes, e.g. nodegroup[0],aggregator[0]")
    ap.add_argument("--profile-topology", choices=("aggregator", "direct"), default="aggregator")
    ap.add_argument("--netns", action="store_true",
                    help="across a link between two network namespaces (root): raw relay chain and zpipe aggregator "
                         "only, producers + relay/aggregator on one side, consumers/node groups on the other")
    args = ap.parse_args()
    if args.netns:
        return main_netns(args)
    frames, width = args.frames, scan_shape(args.frames)[0]
    messages = frames * SECTORS
    t_start = time.monotonic()
    import msgpack
    import numpy
    import zmq

    print(f"bench_transport: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; Python "
          f"{sys.version.split()[0]}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), "
          f"msgpack {'.'.join(map(str, msgpack.version))}, numpy {numpy.__version__}")
    print(f"scan of {frames:,} frames {scan_shape(frames)} = {messages:,} messages of {PAYLOAD_BYTES:,} B "
          f"payload ({messages * PAYLOAD_BYTES / 1e9:.2f} GB); {args.repeat} runs each, interleaved; medians\n",
          flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench_transport-"))
    hook_dir = work / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pipelines = {"zpipe aggregator": TOPOLOGIES / "bench-aggregator.yaml",
                 "zpipe direct": TOPOLOGIES / "bench-direct.yaml"}
    topo_n = {name: write_topology(t, frames, work) for name, t in pipelines.items()}
    # Issue 5: the cost of status publishing, as the aggregator topology with it switched off.
    quiet = work / "bench-aggregator-status-off.yaml"
    quiet.write_text(topo_n["zpipe aggregator"].read_text().replace("\nnodes:", "\nstatus: {interval: 0}\nnodes:", 1))
    topo_n["zpipe agg. status off"] = quiet
    # The paper's (and 4dcamera-local's) producers have two sending threads each; the raw chain's one.
    two = work / "bench-aggregator-2-threads.yaml"
    two.write_text(topo_n["zpipe aggregator"].read_text().replace("    threads: 1 ", "    threads: 2 ", 1))
    topo_n["zpipe agg. 2 threads"] = two
    # Each zpipe topology is compared with the raw relay chain (the baseline) and with the raw chain
    # of its own shape: the direct topology has no relay, one tcp hop fewer than the baseline.
    raws = {"raw relay chain": True, "raw direct chain": False}
    like = {"zpipe aggregator": "raw relay chain", "zpipe direct": "raw direct chain",
            "zpipe agg. status off": "raw relay chain", "zpipe agg. 2 threads": "raw relay chain"}
    runs: dict[str, list[dict]] = {name: [] for name in (*raws, *topo_n)}
    problems: list[str] = []
    n_problems = 0
    try:
        for rep in range(args.repeat):
            line = []
            for name, relay in raws.items():
                r = run_raw(frames, width, relay=relay)
                runs[name].append(r)
                line.append(f"{name.rsplit(' ', 1)[0]} {r['gbps']:.2f} GB/s" + ("" if r["ok"] else " (INCOMPLETE)"))
            for name, topo in topo_n.items():
                z = run_zpipe(topo, work / name.replace(" ", "-"), hook_dir)
                runs[name].append(z)
                line.append(f"{name} {z['gbps']:.2f} GB/s ({z['seconds']:.2f} s streaming of {z['scan_seconds']:.2f} s "
                            f"scan, {z['wall']:.2f} s wall)"
                            + ("" if z["ok"] else " (INCOMPLETE)"))
            for name, rs in runs.items():
                if not rs[-1]["ok"]:
                    problems.append(f"{name} run {rep + 1}: expected {rs[-1]['expected']:,}, "
                                    f"received {rs[-1]['received']:,}" + (
                                        f", report ok={rs[-1]['report'].get('ok')}" if 'report' in rs[-1] else ""))
            print(f"  run {rep + 1}: " + "; ".join(line), flush=True)
            for p in problems[n_problems:]:
                print(f"  !!! {p}", flush=True)
            n_problems = len(problems)

        gbps = {name: med(r["gbps"] for r in rs) for name, rs in runs.items()}
        base = gbps["raw relay chain"]
        print(f"\n{'pipeline':21s} {'messages':>9s} {'received':>9s} {'GB/s':>6s} {'range':>11s} {'x raw':>6s} "
              f"{'x same shape':>12s} {'stream s':>8s} {'scan s':>7s} {'wall s':>7s}")
        for name, rs in runs.items():
            g = [r["gbps"] for r in rs]
            ratio = gbps[name] / base if base else math.nan
            shape = f"{gbps[name] / gbps[like[name]]:12.2f}" if name in like else f"{'':12s}"
            wall = med(r["wall"] for r in rs)
            scan_s = med(r.get("scan_seconds") for r in rs)
            verdict = ("" if name in raws else
                       f"  {'meets' if ratio >= TARGET else 'BELOW'} the target (>= {TARGET} x raw)")
            print(f"{name:21s} {messages:9,d} {min(r['received'] for r in rs):9,d} {gbps[name]:6.2f} "
                  f"{min(g):5.2f}-{max(g):<5.2f} {ratio:6.2f} {shape} {med(r['seconds'] for r in rs):8.2f} "
                  f"{'-' if math.isnan(scan_s) else f'{scan_s:.2f}':>7s} "
                  f"{'-' if math.isnan(wall) else f'{wall:.2f}':>7s}{verdict}")
        on, off = gbps["zpipe aggregator"], gbps["zpipe agg. status off"]
        print(f"status publishing (every 0.5 s) costs {100 * (off - on) / off:+.1f} % of the aggregator topology's "
              f"throughput ({on:.2f} GB/s with, {off:.2f} GB/s without; target within 2 %; runs interleaved)")
        print_status_cost(runs["zpipe aggregator"], runs["zpipe agg. status off"])
        print("x raw: median GB/s / the raw relay chain's (the issue's baseline); x same shape: / the raw chain "
              "with as many tcp hops.\nstream s (GB/s's time): raw: first send to last receive; zpipe: the report's "
              "streaming_seconds, first message sent to last frame processed (assembled, analysed, accounted).\n"
              "scan s: zpipe's whole scan, announcement (node groups found, record written) to report; "
              "wall: the whole `zpipe run`, start-up included; received: the fewest in any run.")

        if not args.no_memory:
            big = {}
            for name, template in pipelines.items():
                z = run_zpipe(write_topology(template, 4 * frames, work), work / (name.replace(" ", "-") + "-4N"),
                              hook_dir)
                big[name] = z
                if not z["ok"]:
                    problems.append(f"{name} {4 * frames:,}-frame run: expected {z['expected']:,}, "
                                    f"received {z['received']:,}")
            print(f"\n{4 * frames:,}-frame scans ({4 * messages:,} messages), once each: " + "; ".join(
                f"{name.split()[1]} {z['gbps']:.2f} GB/s, received {z['received']:,}" for name, z in big.items()))

            print(f"\nCPU per message, us: every process, user + system (raw: CPU / messages; zpipe: (CPU at "
                  f"{4 * frames:,} frames - median CPU at {frames:,}) / {3 * messages:,} messages, so start-up drops "
                  f"out); then each role split into its Python threads and the rest (libzmq's I/O thread):")
            raw_totals = {}
            for name in raws:
                rc = runs[name]
                raw_cpu = {role: {k: 1e6 * med(r["cpu"][role][k] for r in rc) / messages for k in ("total", "python")}
                           for role in rc[0]["cpu"]}
                raw_totals[name] = sum(v["total"] for v in raw_cpu.values())
                print(f"  {name:21s} {raw_totals[name]:5.0f}  ("
                      + ", ".join(f"{role} {v['total']:.0f}" for role, v in raw_cpu.items()) + ")")
                print("      " + "; ".join(f"{role}: python {v['python']:.0f}, libzmq {v['total'] - v['python']:.0f}"
                                         for role, v in raw_cpu.items()))
            for name, z in big.items():
                roles: dict[str, dict[str, float]] = {}
                for lab in sorted(z["procs"], key=lambda lab: ROLE_ORDER.index(lab.split("[")[0])):
                    rec, role = z["procs"][lab], lab.split("[")[0]
                    small = [r["procs"][lab] for r in runs[name] if lab in r["procs"]]
                    if not small:
                        continue
                    per = roles.setdefault(role, {"total": 0.0})
                    per["total"] += 1e6 * (rec["cpu"] - med(r["cpu"] for r in small)) / (3 * messages)
                    python = 0.0
                    for thread in rec["threads"]:
                        d = 1e6 * (rec["threads"][thread] - med(r["threads"].get(thread, 0.0) for r in small))
                        per[thread] = per.get(thread, 0.0) + d / (3 * messages)
                        python += d / (3 * messages)
                    per["python"] = per.get("python", 0.0) + python
                total = sum(v["total"] for v in roles.values())
                print(f"  {name:21s} {total:5.0f}  ("
                      + ", ".join(f"{role} {v['total']:.0f}" for role, v in roles.items())
                      + f"); {total / raw_totals[like[name]]:.2f} x the {like[name]}")
                split = []
                for role, per in roles.items():
                    if role != "runner":
                        threads = ", ".join(f"{t} {v:.0f}" for t, v in per.items() if t not in ("total", "python"))
                        split.append(f"{role}: {threads}, libzmq {per['total'] - per['python']:.0f}")
                print("      " + "; ".join(split))

            print(f"\nPeak RSS per process (VmHWM, read as each process exits), MB: {frames:,}-frame scan "
                  f"(the highest of {args.repeat} runs) vs {4 * frames:,}-frame scan")
            for name, z in big.items():
                grew = []
                print(f"  {name}:")
                for lab in sorted(z["procs"]):
                    small = max((r["procs"][lab]["peak_rss"] for r in runs[name] if lab in r["procs"]), default=0)
                    large = z["procs"][lab]["peak_rss"]
                    diff = (large - small) / 1e6
                    flag = diff > max(GROWTH_MB, GROWTH_FRACTION * small / 1e6)
                    if flag:
                        grew.append(lab)
                    print(f"    {lab:14s} {small / 1e6:8.1f} {large / 1e6:8.1f}  {diff:+8.1f}"
                          + ("  GREW" if flag else ""))
                pend = {lab: (max((r["procs"][lab].get("max_pending") or 0 for r in runs[name] if lab in r["procs"]),
                                  default=0), rec.get("max_pending"))
                        for lab, rec in sorted(z["procs"].items()) if rec.get("max_pending") is not None}
                if pend:
                    print("    frames held waiting for their other sectors, at most (N vs 4N): " + ", ".join(
                        f"{lab} {a:,} vs {b:,} (~{b * FRAME_BYTES / 1e6:.0f} MB)" for lab, (a, b) in pend.items()))
                print(f"    peak memory per process grew with the scan: {'YES: ' + ', '.join(grew) if grew else 'no'}")
                if grew:
                    problems.append(f"{name}: peak RSS grew from the {frames:,}- to the {4 * frames:,}-frame scan "
                                    f"in {', '.join(grew)}")

        if args.profile:
            z = run_zpipe(topo_n[f"zpipe {args.profile_topology}"], work / "profile", hook_dir, profile=args.profile)
            print(f"\nprofiled {args.profile_topology} run: {z['gbps']:.2f} GB/s (slowed by cProfile)")
            for label, threads in sorted(z["profiles"].items()):
                print_profile(threads, label)
            if not z["profiles"]:
                print(f"  no profile came back; is {args.profile!r} a process of the topology (e.g. nodegroup[0])?")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if problems:
        print("\n" + "!" * 78)
        print("!!! PROBLEMS (figures above that these touch are not to be trusted as they stand):")
        for p in problems:
            print(f"!!!   {p}")
        print("!" * 78)
    print(f"\ntotal {time.monotonic() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f}")
    return 1 if problems else 0


def main_netns(args) -> int:
    """The raw relay chain and zpipe's aggregator topology across one link: two network namespaces joined by
    a bridge (tests/netns.py); producers and the relay (or aggregator) on one, the consumers (node groups) on
    the other. The same messages as on loopback; GB/s of each and their ratio, runs interleaved."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import netns

    why = netns.available()
    if why:
        print(f"bench_transport --netns: {why}", file=sys.stderr)
        return 2
    frames, width = args.frames, scan_shape(args.frames)[0]
    t_start = time.monotonic()
    print(f"bench_transport --netns: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; scan of "
          f"{frames:,} frames = {frames * SECTORS:,} messages of {PAYLOAD_BYTES:,} B across a veth link "
          f"(bridge in a namespace of its own); {args.repeat} runs each, interleaved; medians\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_transport-netns-"))
    hook_dir = work / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net = netns.Net(["a", "b"])
    runs: dict[str, list[dict]] = {"raw relay chain": [], "zpipe aggregator": []}
    try:
        PLACES.update(producer=(net.ns["a"], net.address["a"]), relay=(net.ns["a"], net.address["a"]),
                      consumer=(net.ns["b"], net.address["b"]))
        topo = hosts_topology(TOPOLOGIES / "bench-aggregator.yaml", frames, work, net)
        for rep in range(args.repeat):
            r = run_raw(frames, width, relay=True)
            z = run_zpipe(topo, work / f"zpipe-{rep}", hook_dir, net=net)
            runs["raw relay chain"].append(r)
            runs["zpipe aggregator"].append(z)
            print(f"  run {rep + 1}: raw relay chain {r['gbps']:.2f} GB/s" + ("" if r["ok"] else " (INCOMPLETE)")
                  + f"; zpipe aggregator {z['gbps']:.2f} GB/s ({z['seconds']:.2f} s streaming, {z['wall']:.2f} s "
                  f"wall; expected {z['expected']:,}, received {z['received']:,})" + ("" if z["ok"] else
                                                                                     " (INCOMPLETE)"), flush=True)
    finally:
        PLACES.update({k: (None, "127.0.0.1") for k in PLACES})
        net.close()
        shutil.rmtree(work, ignore_errors=True)
    raw, zp = (med(r["gbps"] for r in runs[k]) for k in ("raw relay chain", "zpipe aggregator"))
    ok = all(r["ok"] for rs in runs.values() for r in rs)
    print(f"\nacross the link: raw relay chain {raw:.2f} GB/s, zpipe aggregator {zp:.2f} GB/s: "
          f"{zp / raw:.2f} x raw (median of {args.repeat}; every message arrived: {'yes' if ok else 'NO'})")
    print(f"total {time.monotonic() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
