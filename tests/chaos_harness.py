"""What the chaos suite needs: a real `zpipe run` watched through its registry, and the ground truth of a simulated scan.

A `Run` starts the command in its own session, learns its registry from its first line, and
follows the registry with its own client: which replicas live (and their pids, so every one of
them can be checked dead afterwards), how far each scan has got. The ground truth of a scan is
recomputed from the simulator with the same parameters as the producers: every sector's pixel
sum, so that the framesum analysis's exact integer total proves which parts were processed,
and which the report names as lost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from support import TOPOLOGIES

REGISTRY_RE = re.compile(r"registry at (tcp://\S+)")


def chaos_topology(tmp: Path, *, base: str = "4dcamera-local.yaml", side: int = 24, scans: int = 3,
                   loss: float = 0.0, seed: int = 5, delay: float = 0.002, workers: int = 1,
                   scan_timeout: float = 10, extra: tuple[tuple[str, str], ...] = ()) -> Path:
    """A small 4D-Camera topology with framesum (the exact checksum) and a slow-ish stage, so that
    faults land mid-scan. Returns the file written."""
    text = (TOPOLOGIES / base).read_text()
    edits = [("scan_shape: [64, 64]", f"scan_shape: [{side}, {side}]\n      scans: {scans}\n      seed: {seed}"
                                      f"\n      loss: {loss}"),
             ("scan_timeout: 10", f"scan_timeout: {scan_timeout}"),
             ("workers: 1", f"workers: {workers}")]
    if "- plugin: electron-count" in text:
        edits.append(("      - plugin: electron-count   # thresholds from the first 1200 complete frames, as at NCEM",
                      f"      - plugin: discard\n        params: {{delay: {delay}}}"))
    else:
        edits.append(("      - plugin: framesum", f"      - plugin: framesum\n      - plugin: discard\n"
                                                   f"        params: {{delay: {delay}}}"))
    for old, new in (*edits, *extra):
        assert old in text, old
        text = text.replace(old, new)
    path = tmp / f"chaos-{base}"
    path.write_text(text)
    return path


def params_of(topology: Path) -> dict:
    """The producers' source parameters, straight from the YAML (the plugins of a test may not be importable here)."""
    from ruamel.yaml import YAML

    return dict(YAML(typ="safe").load(Path(topology).read_text())["nodes"]["producer"]["params"])


@dataclass
class Run:
    """`zpipe run` in a subprocess (its own session), watched through its registry."""

    topology: Path
    out: Path
    args: tuple = ()
    env: dict | None = None
    proc: subprocess.Popen | None = None
    registry: str | None = None
    kv: object = None
    pids: dict = field(default_factory=dict)  # label -> pid, every replica ever seen
    t0: float = 0.0
    _watch: threading.Thread | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout: float = 60) -> "Run":
        from zpipe.kv import KVClient

        self.out.mkdir(parents=True, exist_ok=True)
        self._so = open(self.out.parent / f"{self.out.name}.stdout", "w+")
        self._se = open(self.out.parent / f"{self.out.name}.stderr", "w+")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "zpipe", "run", str(self.topology), "--output-dir",
                                      str(self.out), *self.args], stdout=self._so, stderr=self._se,
                                     start_new_session=True, env={**os.environ, "COLUMNS": "200", **(self.env or {})})
        deadline = time.monotonic() + timeout
        while self.registry is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"zpipe run did not say where its registry is:\n{self.stderr()}")
            if m := REGISTRY_RE.search(self.stderr()):
                self.registry = m.group(1)
            time.sleep(0.05)
        self.kv = KVClient(self.registry, name="chaos-observer").start()
        self._watch = threading.Thread(target=self._follow, daemon=True)
        self._watch.start()
        return self

    def _follow(self) -> None:
        while not self._done.wait(0.1):
            try:
                for key, v in self.kv.items("nodes/").items():
                    if isinstance(v, dict) and isinstance(v.get("pid"), int):
                        self.pids[f"{v.get('node')}[{v.get('replica')}]"] = v["pid"]
            except Exception:
                pass

    # -- looking -----------------------------------------------------------------------------------
    def stderr(self) -> str:
        self._se.flush()
        return Path(self._se.name).read_text(errors="replace")

    def stdout(self) -> str:
        self._so.flush()
        return Path(self._so.name).read_text(errors="replace")

    def pid(self, node: str, replica: int, timeout: float = 60) -> int:
        label = f"{node}[{replica}]"
        deadline = time.monotonic() + timeout
        while label not in self.pids:
            assert time.monotonic() < deadline, f"{label} never registered; seen {sorted(self.pids)}"
            time.sleep(0.05)
        return self.pids[label]

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            assert self.proc.poll() is None or time.monotonic() < deadline, f"{what}: the run ended first"
            assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
            time.sleep(0.02)

    def received(self, scan: int) -> int:
        """Messages of `scan` the node groups accepted so far (their published parts)."""
        total = 0
        for key, part in self.kv.items(f"scans/{scan}/part/").items():
            if isinstance(part, dict):
                total += int(part.get("received") or 0)
        return total

    def at_fraction(self, scan: int, fraction: float, of: int, timeout: float = 90) -> None:
        """Wait until the node groups have accepted `fraction` of `of` messages of `scan`."""
        self.wait_for(lambda: self.received(scan) >= fraction * of, timeout, f"scan {scan} at {fraction:.0%}")

    # -- ending ----------------------------------------------------------------------------------
    def finish(self, bound: float) -> int:
        """The run's exit code; fails the test if it takes longer than `bound` seconds from its start."""
        left = bound - (time.monotonic() - self.t0)
        try:
            code = self.proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not end within its bound of {bound:g} s:\n{self.stderr()[-3000:]}")
        self.seconds = time.monotonic() - self.t0
        return code

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def close(self) -> None:
        """End everything this run started, by pid; then say whether anything had been left behind."""
        self._done.set()
        self.kill()
        if self.kv is not None:
            self.kv.close()
        for f in (getattr(self, "_so", None), getattr(self, "_se", None)):
            if f:
                f.close()
        left = self.orphans()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.left_behind = left

    def orphans(self) -> list[int]:
        """Replica processes of this run still alive (after a moment for exits in progress)."""
        deadline = time.monotonic() + 5
        while True:
            alive = []
            for pid in self.pids.values():
                try:
                    p = psutil.Process(pid)
                    if p.status() != psutil.STATUS_ZOMBIE and "zpipe.node" in " ".join(p.cmdline()):
                        if p.status() == psutil.STATUS_STOPPED:
                            p.send_signal(signal.SIGCONT)
                        alive.append(pid)
                except psutil.Error:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def reports(self) -> dict[int, dict]:
        return {int(p.name.split("_")[1]): json.loads(p.read_text()) for p in self.out.glob("scan_*_report.json")}

    def signal(self, node: str, replica: int, sig: int) -> int:
        pid = self.pid(node, replica)
        os.kill(pid, sig)
        return pid


# -- the ground truth --------------------------------------------------------------------------------
class Truth:
    """A simulated scan as the producers made it: which sectors exist, and each one's pixel sum."""

    def __init__(self, params: dict, scan: int):
        from zpipe.plugin import Context, Scan
        from zpipe_4dcamera.sources import CameraSource

        src = CameraSource(CameraSource.Params(**params))
        src.setup(Context("truth"))
        self.cam = src.camera(Scan(scan))
        self.first = self.cam.frame_number(0)
        self.n = self.cam.n_frames
        self.sums = [[None if self.cam.lost(i, k) else int(self.cam.sector(i, k).sum(dtype="int64")) for k in range(4)]
                     for i in range(self.n)]

    def check(self, report: dict, *, dead_share: set[int] | None = None, n_groups: int = 2,
              on_disk: tuple[int, int] | None = None) -> dict:
        """Assert the report names exactly what was lost; returns figures for the test to print.

        The framesum total must equal the pixel sum of exactly the parts the report does not name
        as lost (or lost upstream); items the report names lost must be those the source made, and
        with `dead_share` (node-group indices that died), only items routed to them may be lost.
        `on_disk`: (parts, pixel sum) of what the producers wrote to disk mid-scan, read back from the
        files; those parts count with the processed ones.
        """
        assert report["outcome"] in ("complete", "incomplete", "failed"), report["outcome"]
        if report["outcome"] == "failed":
            return {"outcome": "failed", "reasons": report["reasons"][:3]}
        missing_items = set(report["missing_items"])
        missing_parts = {int(k): set(v) for k, v in report["missing_parts"].items()}
        total, parts_in, lost_named = 0, 0, 0
        for i in range(self.n):
            key = self.first + i
            for k in range(4):
                s = self.sums[i][k]
                if s is None:
                    continue  # lost upstream: never sent, so never counted
                if key in missing_items or k in missing_parts.get(key, ()):
                    lost_named += 1
                    continue
                total += s
                parts_in += 1
        fs = report["analyses"].get("framesum", {})
        disk_n, disk_sum = on_disk or (0, 0)  # parts written to disk mid-scan: neither lost nor processed
        assert report.get("written", 0) == disk_n, (report.get("written"), disk_n)
        assert fs.get("sum", 0) + disk_sum == total, \
            f"framesum {fs.get('sum')} + on disk {disk_sum} != {total}: a part was lost unnamed or counted twice"
        assert report["received"] + disk_n == parts_in, (report["received"], disk_n, parts_in)
        if not on_disk:
            processed = self.n - len(missing_items)
            assert fs.get("frames", 0) == processed + len(report.get("split_items", [])), (fs.get("frames"), processed)
        assert report["lost_parts"] == sum(len(v) for v in missing_parts.values()) + 4 * len(missing_items)
        for i in range(self.n):  # a part the source never had is always named on its item
            key = self.first + i
            if key not in missing_items:
                assert self.upstream_lost(key) <= missing_parts.get(key, set()), f"item {key}: upstream loss unnamed"
        if dead_share is not None:
            for key in missing_items | {k for k, v in missing_parts.items() if v - self.upstream_lost(k)}:
                assert key % n_groups in dead_share, f"item {key} was lost but routed to a live node group"
        if report["outcome"] == "complete":
            assert not missing_items and all(v <= self.upstream_lost(k) for k, v in missing_parts.items())
        return {"outcome": report["outcome"], "lost_parts": lost_named, "missing_items": len(missing_items),
                "incomplete": report["incomplete"]}

    def upstream_lost(self, key: int) -> set[int]:
        i = key - self.first
        return {k for k in range(4) if 0 <= i < self.n and self.sums[i][k] is None}
