"""Services and sessions as a facility runs them, for the tests: producers and the aggregator as
long-lived services, node groups in sessions that start and end, acquisitions requested by
`zpipe acquire`. On loopback (two "hosts" at 127.0.0.1) or in network namespaces (tests/netns.py):
`spawn(host, argv)` starts a process where it belongs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import TOPOLOGIES


def service_topology(path: Path, *, port: int, hosts: dict[str, str], scan_shape=(16, 16), aggregator_host="servers",
                     registry_host="servers", analyses=("framesum", "electron-count"), security="none") -> Path:
    """The 4D-Camera pipeline as services: producers (service: true, disk fallback) on `servers`, the
    aggregator there (or on `aggregator_host`), two node groups on `compute`; the registry on `registry_host`.
    `security`: the topology's section (open by default: loopback, or the test's own namespaces)."""
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text()
    host_lines = "".join(f"  {h}: {{address: {a}}}\n" for h, a in hosts.items())
    edits = [
        ("nodes:\n", f"hosts:\n{host_lines}registry: {{host: {registry_host}, port: {port}}}\n"
                      f"security: {security}\nnodes:\n"),
        ("    role: producer\n", "    role: producer\n    host: servers\n    service: true\n"),
        ("    role: aggregator\n", f"    role: aggregator\n    host: {aggregator_host}\n"),
        ("    role: nodegroup\n", "    role: nodegroup\n    host: compute\n"),
        ("scan_shape: [64, 64]", f"scan_shape: [{scan_shape[0]}, {scan_shape[1]}]"),
        ("      - plugin: framesum\n      - plugin: electron-count   # thresholds from the first 1200 complete "
         "frames, as at NCEM\n", "".join(f"      - plugin: {a}\n" for a in analyses)),
    ]
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


class Site:
    """The processes of one facility under test; every one ended (by pid) in close()."""

    def __init__(self, topology: Path, workdir: Path, registry: str, spawn=None, registry_host: str = "servers",
                 keys: Path | None = None):
        self.topology, self.workdir, self.registry = topology, workdir, registry
        self.keys = keys  # a secured topology's key directory: the operator's key for acquire and our own reads
        self.registry_host = registry_host  # its runner's accountant writes the scans' reports
        self.spawn = spawn or self._local
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _local(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, start_new_session=True, **kw)

    def out(self, host: str) -> Path:
        return self.workdir / f"out-{host}"

    def start(self, name: str, host: str, *extra: str) -> subprocess.Popen:
        """`zpipe run TOPOLOGY --host HOST` (plus `extra`), its output in a log of its own."""
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as f:
            proc = self.spawn(host, [sys.executable, "-m", "zpipe", "run", str(self.topology), "--host", host,
                                     "--output-dir", str(self.out(host)), *extra],
                              stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs[name] = proc
        return proc

    def wait_alive(self, node: str, replicas: int, timeout: float = 60, host: str = "servers") -> None:
        """Until `replicas` replicas of `node` are alive (and not leaving) in the registry, asked from `host`."""
        code = (f"from zpipe.kv import KVClient\nfrom zpipe.security import operator_curve\n"
                f"kv = KVClient({self.registry!r}, ('nodes/',), name='test', connect_timeout={timeout}, "
                f"curve=operator_curve({str(self.keys) if self.keys else None!r})).start()\n"
                f"kv.wait(lambda items: sum(1 for k, v in items.items() if k.startswith('nodes/{node}/') and "
                f"isinstance(v, dict) and not v.get('leaving')) >= {replicas}, prefix='nodes/{node}/', "
                f"timeout={timeout})\n")
        proc = self.spawn(host, [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
        try:
            out, _ = proc.communicate(timeout=2 * timeout + 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        assert proc.returncode == 0, f"{replicas} replicas of {node} were not alive within {timeout} s:\n{out}"

    def acquire(self, *args: str, host: str = "servers", timeout: float = 120) -> tuple[int | None, str, int]:
        """`zpipe acquire --registry R ARGS --wait`: (scan number, its account's line, exit code)."""
        keys = ["--keys", str(self.keys)] if self.keys else []
        proc = self.spawn(host, [sys.executable, "-m", "zpipe", "acquire", "--registry", self.registry, *keys, *args,
                                 "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        lines = out.strip().splitlines()
        scan = None
        for line in lines:
            if line.startswith("acquisition ") and " scan " in line:
                scan = int(line.split(" scan ")[1].split()[0])
        return scan, (lines[-1] if lines else err.strip()), proc.returncode

    def stop(self, name: str, timeout: float = 60) -> float:
        """SIGTERM to a runner (as a batch system ends a job): seconds until it exited."""
        proc = self.procs[name]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
        return time.monotonic() - t0

    def end_mid_scan(self, name: str, scan: int, shape: str, rate: int, after: float,
                     host: str = "servers") -> tuple[float, str, str]:
        """A paced acquisition; `after` s into its streaming, SIGTERM to runner `name` (a session or the
        aggregator leaving mid-scan). (seconds it took to leave, the acquisition's stdout, stderr)."""
        acq = self.spawn(host, [sys.executable, "-m", "zpipe", "acquire", "--registry", self.registry, "--shape",
                                shape, "--set", f"rate={rate}", "--wait"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = acq.stdout.readline()  # "acquisition ID: scan N to node groups [0, 1]" (bounded by the timeout)
            assert f"scan {scan} to node groups" in first, first
            time.sleep(after)  # well into the scan
            left_in = self.stop(name)
            try:
                out, err = acq.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(acq.pid, signal.SIGKILL)
                out, err = acq.communicate(timeout=10)
                raise AssertionError(f"scan {scan}: no account 120 s after {name} left\n"
                                     f"acquire: {out}{err}\n{self.tails()}") from None
        finally:
            if acq.poll() is None:
                os.killpg(acq.pid, signal.SIGKILL)
                acq.wait(10)
        return left_in, out, err

    def report(self, scan: int) -> dict:
        return json.loads((self.out(self.registry_host) / f"scan_{scan}_report.json").read_text())

    def tails(self, lines: int = 40) -> str:
        """The last `lines` of every process's log, for a failure's message (tmp dirs do not last)."""
        return "\n".join(f"--- {name} ---\n" + "\n".join(self.log(name).splitlines()[-lines:])
                         for name in self.logs)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def close(self) -> list[int]:
        """End every process started here (their sessions: SIGTERM, then SIGKILL); the pids killed."""
        killed = []
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(proc.pid)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        return killed


def pixel_sum_on_disk(directory: str | Path, scan: int) -> tuple[int, int]:
    """(sectors, their pixel sum) of a scan's version-5 files: what went to disk, read back."""
    from zpipe_4dcamera.rawfile import read_sectors, scan_files

    n = total = 0
    for _header, sector in read_sectors(scan_files(directory, scan)):
        n += 1
        total += int(sector.sum(dtype="int64"))
    return n, total


def truth_sum(scan: int, shape=(16, 16), seed: int = 0) -> tuple[int, int]:
    """(sectors, pixel sum) of the simulated scan as the producers make it."""
    from zpipe.plugin import Context, Scan
    from zpipe_4dcamera.sources import CameraSource

    src = CameraSource(CameraSource.Params(scan_shape=shape, seed=seed))
    src.setup(Context("truth"))
    cam = src.camera(Scan(scan))
    n = total = 0
    for i in range(cam.n_frames):
        for k in range(4):
            if not cam.lost(i, k):
                n += 1
                total += int(cam.sector(i, k).sum(dtype="int64"))
    return n, total
