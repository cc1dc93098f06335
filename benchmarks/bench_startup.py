"""How fast a node process starts and how much memory it holds, before and after the lean core (issue 10).

For a producer, the aggregator and a node group of topologies/4dcamera-local.yaml, it starts
replica 0 as the runner does, `python -m zpipe.node --topology T --node N --replica 0 --host
localhost --registry ADDR --output-dir D`, against a real registry (a zpipe.kv.KVServer in this
process, on loopback, holding the `pipeline` key a node waits for), and measures:

* start: from just before the exec to "ready": its liveness key `nodes/{node}/0` in the
  registry and, for the roles that bind (aggregator, node group), every per-thread input
  endpoint `endpoints/{node}/0/{socket}@{t}` too. A node imports and checks its plugins
  before it registers, so the plugins' imports are inside this time, before and after alike.
* peak RSS: the process's VmHWM, read --settle seconds after ready (its plugins set up, waiting
  for data: the producer for node groups, the others for their senders), then it is stopped
  (SIGTERM, by pid).
* whether numba, h5py or mpi4py are mapped into it (/proc/PID/maps).

BEFORE is a git worktree of the commit before the lean core (the parent of the commit that added
this script; HEAD while it is uncommitted; or --before REV), run with PYTHONPATH pointing at that
worktree and its plugins/4dcamera, so the same venv serves both; AFTER is this working tree.
Runs interleave (before, after, before, ...) so the machine's noise hits both alike; medians of
--runs. Then one run of each under `python -X importtime` says where the start-up time goes,
as each top-level package's own import time summed (numpy, zmq, pydantic, ...).

--after REV measures that commit (another worktree) instead of the working tree, e.g. while
others' unfinished edits are in it.

Usage: python benchmarks/bench_startup.py [--runs 5] [--settle 1.0] [--before REV] [--after REV] [--no-imports]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zpipe.kv import KVClient, KVServer  # noqa: E402  (this tree's registry serves both: its protocol is unchanged)
from zpipe.topology import load_topology  # noqa: E402

TOPOLOGY = ROOT / "topologies" / "4dcamera-local.yaml"
NODES = ("producer", "aggregator", "nodegroup")
HEAVY = ("numba", "h5py", "mpi4py")
READY_TIMEOUT = 60.0
TARGET_MB, TARGET_S = 100, 0.5  # the target for a producer and the aggregator


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def before_rev(explicit: str | None) -> str:
    if explicit:
        return git("rev-parse", "--verify", explicit + "^{commit}")
    added = git("log", "--diff-filter=A", "--format=%H", "--", "benchmarks/bench_startup.py").split()
    return git("rev-parse", f"{added[-1]}^") if added else git("rev-parse", "HEAD")


class Tree:
    def __init__(self, label: str, root: Path):
        self.label, self.root = label, root
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(root), str(root / "plugins" / "4dcamera")])}
        self.env.pop("PYTHONPROFILEIMPORTTIME", None)
        self.out = ""  # its nodes' output directory

    def check(self, cwd: str) -> None:
        """The node processes must import zpipe and its plugins from this tree, not the installed ones."""
        out = subprocess.run([sys.executable, "-c", "import zpipe, zpipe_4dcamera; print(zpipe.__file__); "
                              "print(zpipe_4dcamera.__file__)"], env=self.env, cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.split()
        for path in out:
            if not Path(path).resolve().is_relative_to(self.root.resolve()):
                raise SystemExit(f"{self.label}: imports {path}, not from {self.root}")


def ready_keys(node: str, topo) -> list[str]:
    spec = topo.nodes[node]
    keys = [f"nodes/{node}/0"]
    if spec.role in ("aggregator", "nodegroup"):  # they bind one input per thread
        sock = next(s for s, sp in spec.sockets.items() if sp.pattern == "pull")
        keys += [f"endpoints/{node}/0/{sock}@{t}" for t in range(spec.threads)]
    return keys


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def mapped_heavy(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return [m for m in HEAVY if f"/{m}/" in maps or f"/{m}." in maps]


def measure(tree: Tree, node: str, keys: list[str], outdir: str, settle: float, importtime: bool = False) -> dict:
    """One start of replica 0 of `node` against a fresh registry: seconds to ready, memory, what it mapped."""
    server = KVServer("tcp://127.0.0.1:0").start()
    kv = KVClient(server.address, ("nodes/", "endpoints/", "pipeline")).start()
    seen: dict[str, float] = {}
    done = threading.Event()

    def on_change(key: str, value) -> None:
        if value is not None and key in keys and key not in seen:
            seen[key] = time.monotonic()
            if len(seen) == len(keys):
                done.set()

    kv.on_change(on_change)
    env = dict(tree.env)
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    err = open(os.path.join(outdir, f"{tree.label}-{node}.err"), "w+")
    proc = None
    try:
        kv.set("pipeline", {"id": f"bench-{os.getpid()}"})
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "zpipe.node", "--topology", str(TOPOLOGY), "--node", node,
                                 "--replica", "0", "--host", "localhost", "--registry", server.address,
                                 "--output-dir", outdir], env=env, cwd=outdir, stdout=err, stderr=err)
        deadline = t0 + READY_TIMEOUT
        while not done.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                err.seek(0)
                raise SystemExit(f"{tree.label} {node}: not ready (exit code {proc.poll()}); its output:\n"
                                 f"{err.read()[-3000:]}")
        start = max(seen.values()) - t0
        time.sleep(settle)
        mem = proc_status(proc.pid)
        heavy = mapped_heavy(proc.pid)
        result = {"start": start, "peak": mem["VmHWM"], "rss": mem["VmRSS"], "heavy": heavy}
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kv.close()
        server.stop()
    if importtime:
        err.seek(0)
        result["imports"] = import_breakdown(err.read())
    err.close()
    return result


def import_breakdown(stderr: str) -> dict[str, float]:
    """Seconds of import per top-level package (each module's own time, so nothing counts twice)."""
    by_package: dict[str, float] = defaultdict(float)
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        by_package[name.strip().split(".")[0]] += int(self_us) / 1e6
    return dict(by_package)


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after ready before peak RSS is read")
    ap.add_argument("--before", help="the commit to compare with (default: the one before the lean core)")
    ap.add_argument("--after", help="a commit to measure instead of the working tree")
    ap.add_argument("--nodes", default=",".join(NODES))
    ap.add_argument("--no-imports", action="store_true", help="skip the -X importtime breakdown")
    args = ap.parse_args()
    nodes = args.nodes.split(",")
    topo = load_topology(TOPOLOGY, plugins_of=())
    keys = {n: ready_keys(n, topo) for n in nodes}
    rev = before_rev(args.before)
    work = Path(tempfile.mkdtemp(prefix="zpipe-bench-startup-"))
    wt, wt_after = work / "before", work / "after"
    after_rev = git("rev-parse", "--verify", args.after + "^{commit}") if args.after else None
    try:
        git("worktree", "add", "--detach", "--quiet", str(wt), rev)
        if after_rev:
            git("worktree", "add", "--detach", "--quiet", str(wt_after), after_rev)
        trees = [Tree("before", wt), Tree("after", wt_after if after_rev else ROOT)]
        print(f"before: {rev[:10]} ({git('log', '-1', '--format=%s', rev)[:70]}), a worktree at {wt}")
        if after_rev:
            print(f"after:  {after_rev[:10]} ({git('log', '-1', '--format=%s', after_rev)[:70]}), a worktree")
        else:
            print(f"after:  this working tree ({ROOT}), HEAD {git('rev-parse', '--short', 'HEAD')}")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; loadavg {os.getloadavg()[0]:.2f}")
        results: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for tree in trees:
            out = work / f"out-{tree.label}"
            out.mkdir()
            tree.check(str(out))
            tree.out = str(out)
        for i in range(args.runs):
            for node in nodes:
                for tree in trees:
                    results[(tree.label, node)].append(measure(tree, node, keys[node], tree.out, args.settle))
            print(f"  run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)

        print("\nstart = exec to ready (liveness key; every input endpoint too for aggregator and node group);")
        print(f"peak = VmHWM {args.settle:g} s after ready; medians of {args.runs} runs, interleaved\n")
        head = (f"{'node':<11}{'start before':>13}{'after':>9}{'ratio':>8}   {'peak before':>12}{'after':>9}"
                f"{'ratio':>8}   heavy modules mapped (before -> after)")
        print(head)
        print("-" * len(head))
        for node in nodes:
            b, a = results[("before", node)], results[("after", node)]
            sb, sa = statistics.median(r["start"] for r in b), statistics.median(r["start"] for r in a)
            pb, pa = statistics.median(r["peak"] for r in b), statistics.median(r["peak"] for r in a)
            hb = ",".join(sorted({m for r in b for m in r["heavy"]})) or "none"
            ha = ",".join(sorted({m for r in a for m in r["heavy"]})) or "none"
            print(f"{node:<11}{sb:>11.3f} s{sa:>7.3f} s{sb / sa:>7.2f}x   {mb(pb):>12}{mb(pa):>9}{pb / pa:>7.2f}x   "
                  f"{hb} -> {ha}")
        print()
        for node in nodes:
            a = results[("after", node)]
            starts = " ".join(f"{r['start']:.3f}" for r in a)
            peaks = " ".join(f"{r['peak'] / 1e6:.0f}" for r in a)
            print(f"after, {node}: start s [{starts}]  peak MB [{peaks}]")
        for node in ("producer", "aggregator"):
            if node in nodes:
                a = results[("after", node)]
                s, p = statistics.median(r["start"] for r in a), statistics.median(r["peak"] for r in a)
                verdict = "meets" if s < TARGET_S and p < TARGET_MB * 1e6 else "misses"
                print(f"target (< {TARGET_S} s, < {TARGET_MB} MB), {node}: {verdict} it ({s:.3f} s, {mb(p)})")

        if not args.no_imports:
            print("\nwhere start-up goes: one run under -X importtime, own import time per top-level package "
                  "(importtime adds overhead)")
            for node in nodes:
                for tree in trees:
                    r = measure(tree, node, keys[node], tree.out, 0.2, importtime=True)
                    imp = r["imports"]
                    top = sorted(imp.items(), key=lambda kv_: -kv_[1])[:9]
                    print(f"  {tree.label:<6} {node:<10} imports {sum(imp.values()):.3f} s of {r['start']:.3f} s: "
                          + ", ".join(f"{k} {v * 1000:.0f}" for k, v in top) + " (ms)")
    finally:
        for tree_dir in (wt, wt_after):
            if tree_dir.exists():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree_dir)],
                               capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
