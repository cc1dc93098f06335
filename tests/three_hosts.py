"""Three hosts, each a network namespace of its own (tests/netns.py): receiving servers (the 4 producers), the
aggregator with the registry, and a compute node with two node groups; the 4D-Camera pipeline placed on them,
and `zpipe run` on each host with its output in a file. Shared by the tests in tests/hosts/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netns
from support import TOPOLOGIES

HOSTS = ["recv", "agg", "compute"]
REGISTRY_PORT = 47555
FRAMES = 64 * 64
RUN_BOUND = 150.0  # seconds every runner of a test has, together, to end


def make_net(request, hosts: list[str] = HOSTS) -> netns.Net:
    """A Net of `hosts` (default: these three), closed when the test ends (every process ended by pid,
    every namespace deleted, even on failure); the test skipped with the reason where namespaces cannot
    be made."""
    why = netns.available()
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    n = netns.Net(hosts)
    request.addfinalizer(n.close)
    return n


def topology(tmp_path: Path, net: netns.Net, compute: str | None = None) -> str:
    """4dcamera-local.yaml placed on the three hosts, with the namespaces' addresses and a fixed registry port.
    `compute`: the compute host's entry (default: its fixed address). No fallback directory: a scan waits for
    both node groups (the test starts the producers once they are registered)."""
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text()
    compute = compute or f"{{address: {net.address['compute']}}}"
    hosts = (f"registry: {{host: agg, port: {REGISTRY_PORT}}}\n"
             f"security: none                 # open (the namespaces are the test's own); secured: tests/security\n"
             f"hosts:\n"
             f"  recv: {{address: {net.address['recv']}}}\n"
             f"  agg: {{address: {net.address['agg']}}}\n"
             f"  compute: {compute}\n\nnodes:\n")
    for old, new in (("\nnodes:\n", "\n" + hosts),
                     ("name: 4dcamera-local", "name: three-hosts"),
                     ("    role: producer\n", "    role: producer\n    host: recv\n"),
                     ("    fallback: fallback     # with no node group registered, write version-5 files here\n", ""),
                     ("    role: aggregator\n", "    role: aggregator\n    host: agg\n"),
                     ("    role: nodegroup\n", "    role: nodegroup\n    host: compute\n")):
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "three-hosts.yaml"
    path.write_text(text)
    res = subprocess.run([sys.executable, "-m", "zpipe", "validate", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return str(path)


class Runs:
    """`zpipe run` on the hosts of a Net, each with its output in a file, ended by the Net's close()."""

    def __init__(self, net: netns.Net, tmp_path: Path, topo: str):
        self.net, self.tmp, self.topo = net, tmp_path, topo
        self.procs: dict[str, tuple[subprocess.Popen, Path, Path]] = {}

    def start(self, label: str, host: str, *args: str, env: dict | None = None) -> Path:
        out = self.tmp / f"out-{label}"
        log = self.tmp / f"{label}.log"
        with open(log, "wb") as f:
            proc = self.net.popen(host, [sys.executable, "-m", "zpipe", "run", self.topo, "--host", host,
                                         "--output-dir", str(out), *args],
                                  stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**os.environ, "ZPIPE_LOG": "WARNING", **(env or {})}, cwd=self.tmp)
        self.procs[label] = (proc, out, log)
        return out

    def logs(self) -> str:
        return "\n".join(f"----- {label} (exit {p.poll()}):\n{log.read_text(errors='replace')[-20000:]}"
                         for label, (p, _, log) in self.procs.items())

    def wait(self, bound: float = RUN_BOUND) -> dict[str, int]:
        deadline = time.monotonic() + bound
        codes = {}
        for label, (p, _, _) in self.procs.items():
            try:
                codes[label] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for pid in self.net.pids():  # where every process is stuck, into the logs (faulthandler)
                    try:
                        os.kill(pid, signal.SIGUSR1)
                    except ProcessLookupError:
                        pass
                time.sleep(2)
                pytest.fail(f"{label} still running after {bound:.0f} s\n{self.logs()}")
        return codes
