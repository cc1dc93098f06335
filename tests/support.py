"""Helpers shared by the tests: the repository's paths, and the `zpipe` command run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ROOT / "topologies"


def zpipe(*args: str, timeout: float = 60, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the zpipe command; never hangs a test: at the timeout it is killed with every process it started
    (a runner's replicas run in sessions of their own; one stuck at its end once outlived a killed runner)."""
    proc = subprocess.Popen([sys.executable, "-m", "zpipe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and all its descendants, by pid (found before any is killed); the pids killed."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def third_party(where: Path, dist: str, version: str, entry_points: dict[str, str],
                modules: dict[str, str] | None = None) -> dict[str, str]:
    """Install a plugin distribution the way pip would, visible only to processes given the returned env."""
    info = where / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[zpipe.plugins]\n{lines}")
    for module, code in (modules or {}).items():
        (where / f"{module}.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(where), os.environ.get("PYTHONPATH")]))}


def steady_topology(tmp_path) -> str:
    """The 4D-Camera pipeline held to a steady pace for some seconds: a slow analysis and short queues,
    so that every replica, producers included, keeps moving while the test looks (no bursts, no early end)."""
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text()
    for old, new in (("scan_shape: [64, 64]", "scan_shape: [64, 64]\n      payload: constant"),
                     ("- plugin: framesum", "- plugin: discard\n        params: {delay: 0.002}"),
                     ("{pattern: push, connect: aggregator.in}", "{pattern: push, connect: aggregator.in, hwm: 10}"),
                     ("in: {pattern: pull}", "in: {pattern: pull, hwm: 10}"),
                     ("{pattern: push, connect: nodegroup.data}", "{pattern: push, connect: nodegroup.data, hwm: 10}"),
                     ("data: {pattern: pull}", "data: {pattern: pull, hwm: 10}")):
        assert old in text, old
        text = text.replace(old, new)
    f = tmp_path / "steady.yaml"
    f.write_text(text)
    return str(f)
