"""Several hosts on one machine: network namespaces joined by a bridge, for tests and benchmarks that cross a network.

Each host is a namespace with its own loopback and one veth (`eth0`) into a bridge that lives in a
namespace of its own (so nothing of it is visible outside, and the root namespace's firewall stays
out of the way). Addresses are 10.213.N.1.. on a /24 chosen per network, used only inside it.
`cut(host)` takes that host's link down on the bridge side (a real network fault), `restore(host)`
brings it back. `close()` ends every process left in the namespaces, by pid, and deletes them; use the
Net as a context manager, or register close() as a fixture's finalizer, so that it runs on failure too.
Needs root and iproute2; `available()` says why not where they are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid

STOP_GRACE = 10.0  # seconds what runs in the namespaces gets between SIGTERM and SIGKILL


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"zpprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


class Net:
    def __init__(self, hosts: list[str]):
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = 100 + os.getpid() % 150
        self.bridge = f"zp{self.tag}br"
        self.ns = {h: f"zp{self.tag}{i}" for i, h in enumerate(hosts)}
        self.address = {h: f"10.213.{self.subnet}.{i + 1}" for i, h in enumerate(hosts)}
        self.port = {h: f"p{self.tag}{i}" for i, h in enumerate(hosts)}
        self.procs: list[subprocess.Popen] = []
        try:
            _ip("netns", "add", self.bridge)
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            _ip("-n", self.bridge, "link", "set", "lo", "up")
            for i, h in enumerate(hosts):
                ns, port = self.ns[h], self.port[h]
                _ip("netns", "add", ns)
                _ip("link", "add", "eth0", "netns", ns, "address", f"02:13:{self.subnet:02x}:00:00:{i + 1:02x}",
                    "type", "veth", "peer", "name", port, "netns", self.bridge)
                _ip("-n", self.bridge, "link", "set", port, "master", "br0")
                _ip("-n", self.bridge, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{self.address[h]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start `argv` on `host` (in its namespace), in a session of its own; ended by close()."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns[host], *argv], timeout=timeout, **kw)

    def cut(self, host: str) -> None:
        _ip("-n", self.bridge, "link", "set", self.port[host], "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.bridge, "link", "set", self.port[host], "up")

    def pids(self) -> list[int]:
        out = []
        for ns in (*self.ns.values(), self.bridge):
            res = _ip("netns", "pids", ns, check=False)
            out += [int(p) for p in res.stdout.split() if p.isdigit()]
        return out

    def close(self) -> list[int]:
        """End what runs in the namespaces (by pid: SIGTERM, then SIGKILL) and delete them.
        Returns the pids that had to be killed after the grace."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        # A `zpipe run` given SIGTERM stops its replicas in turn (SIGTERM, up to 5 s, SIGKILL): give it that.
        deadline = time.monotonic() + STOP_GRACE
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        killed = self.pids()
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for ns in (*self.ns.values(), self.bridge):
            _ip("netns", "del", ns, check=False)
        return killed

    def __enter__(self) -> "Net":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
