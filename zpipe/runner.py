"""`zpipe run`: start the registry (if this host owns it) and every node replica placed on this host, and supervise them.

Each replica is its own process in its own session, so Ctrl-C reaches only the runner,
which then stops the replicas in order: SIGTERM, a bounded wait, SIGKILL. A replica that
crashes is reported with its traceback and ends the run non-zero.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from zpipe import view
from zpipe.kv import KVClient, KVServer
from zpipe.topology import Topology

STOP_GRACE = 5.0  # seconds a replica gets between SIGTERM and SIGKILL


@dataclass
class Replica:
    node: str
    index: int
    proc: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=60))
    reader: threading.Thread | None = None

    @property
    def label(self) -> str:
        return f"{self.node}[{self.index}]"


class RunError(Exception):
    pass


def pick_host(topology: Topology, host: str | None) -> str:
    used = topology.hosts_used()
    if host:
        if host not in topology.hosts:
            raise RunError(f"--host {host!r} is not in the topology's hosts: {', '.join(topology.hosts)}")
        return host
    if len(used) == 1:
        return used[0]
    raise RunError(f"nodes are placed on several hosts ({', '.join(used)}); say which this is with --host")


class Runner:
    def __init__(self, topology: Topology, path: str, *, host: str | None = None, registry: str | None = None,
                 output_dir: str = ".", out=sys.stdout, err=sys.stderr, exclude: frozenset[str] = frozenset(),
                 on_registry=None):
        self.topology, self.path = topology, os.path.abspath(path)
        self.host = pick_host(topology, host)
        self.registry_arg = registry
        self.output_dir = os.path.abspath(output_dir)
        # Under MPI (zpipe.mpirun) the node groups run in the MPI ranks, not as our children:
        # they are excluded here, and `on_registry(address)` starts this rank's share of them
        # as `local` threads (label, thread, [exit code]) that are supervised like replicas.
        self.exclude, self.on_registry = exclude, on_registry
        self.local: list[tuple[str, threading.Thread, list[int]]] = []
        self.out, self.err = out, err
        self.replicas: list[Replica] = []
        self.server: KVServer | None = None
        self.kv: KVClient | None = None
        self._stop = threading.Event()
        self._print_lock = threading.Lock()
        self.display: view.Display | None = None  # the live view or plain progress lines (zpipe/view.py)

    # -- registry ------------------------------------------------------------------------------
    def _registry(self) -> str:
        reg = self.topology.registry
        if self.registry_arg:
            return self.registry_arg
        if reg.address:
            return reg.address
        if self.topology.registry_host() != self.host:
            raise RunError(f"the registry runs on host {self.topology.registry_host()!r}; "
                           f"give its address with --registry")
        hs = self.topology.hosts[self.host]
        self.server = KVServer(f"tcp://{hs.bind or hs.address}:{reg.port}").start()
        return self.server.address

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, registry: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name, node in self.topology.nodes.items():
            if node.host != self.host or name in self.exclude:
                continue
            for i in range(node.replicas):
                cmd = [sys.executable, "-m", "zpipe.node", "--topology", self.path, "--node", name,
                       "--replica", str(i), "--host", self.host, "--registry", registry,
                       "--output-dir", self.output_dir, "--parent", str(os.getpid())]
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True, env=env)
                rep = Replica(name, i, proc)
                rep.reader = threading.Thread(target=self._relay, args=(rep,), daemon=True)
                rep.reader.start()
                self.replicas.append(rep)

    def _relay(self, rep: Replica) -> None:
        for raw in rep.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            rep.tail.append(line)
            if self.display is not None and self.display.relay(f"[{rep.label}] {line}"):
                continue  # printed above the live view, which a raw print would tear
            with self._print_lock:
                print(f"[{rep.label}] {line}", file=self.err, flush=True)

    def _terminate(self) -> None:
        alive = [r for r in self.replicas if r.proc.poll() is None]
        for r in alive:
            _signal(r.proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for r in alive:
            try:
                r.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(r.proc, signal.SIGKILL)
                r.proc.wait()
        for r in self.replicas:
            if r.reader:
                r.reader.join(timeout=2.0)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> int:
        old = {s: signal.signal(s, lambda *_: self._stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        t0 = time.monotonic()
        code = 1
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            registry = self._registry()
            self.kv = KVClient(registry, name="runner").start()
            print(f"zpipe: {self.topology.name} on host {self.host}, registry at {registry}", file=self.err, flush=True)
            # In-process node groups (under MPI) log straight to stderr, which would tear a live view.
            self.display = view.for_runner(self.kv, self.topology, self.host, self.err, self._print_lock,
                                           exclude=self.exclude, live=False if self.on_registry else None)
            self._spawn(registry)
            if self.on_registry:
                self.on_registry(registry)
            code = self._supervise()
            if code == 0:
                for line in self.scan_lines():
                    print(line, file=self.out, flush=True)
                print(self.summary(time.monotonic() - t0), file=self.out, flush=True)
            return code
        finally:
            self._view_off()
            self._terminate()
            if self.kv:
                self.kv.close()
            if self.server:
                self.server.stop()
            for s, h in old.items():
                signal.signal(s, h)

    def _supervise(self) -> int:
        while True:
            if self._stop.is_set():
                self._view_off()
                print("zpipe: stopping (signal received)", file=self.err, flush=True)
                self._terminate()
                return 130
            codes = [(r, r.proc.poll()) for r in self.replicas]
            failed = [(r, c) for r, c in codes if c not in (None, 0)]
            for label, thread, result in self.local:
                if not thread.is_alive() and result and result[0] != 0:
                    self._view_off()
                    print(f"zpipe: node {label} (in this process) failed with exit code {result[0]}",
                          file=self.err, flush=True)
                    return 1
            if all(c == 0 for _, c in codes) and any(th.is_alive() for _, th, _ in self.local):
                time.sleep(0.05)
                continue
            if failed:
                time.sleep(0.2)  # let the reader catch the traceback's last lines
                self._view_off()
                for r, c in failed:
                    if r.reader:
                        r.reader.join(timeout=1.0)
                    tail = "\n".join(f"    {line}" for line in r.tail)
                    print(f"zpipe: node {r.label} failed with exit code {c}; its last output:\n{tail}",
                          file=self.err, flush=True)
                return 1
            if all(c == 0 for _, c in codes):
                self._view_off()
                return 0
            time.sleep(0.05)

    def _view_off(self) -> None:
        """Before the runner prints on its own: the live view's last picture stays, untorn, above."""
        if self.display is not None:
            self.display.stop()

    def scan_lines(self) -> list[str]:
        """Each scan's account, as the node groups (or the disk fallback) closed it."""
        lines = []
        records = {k: v for k, v in self.kv.items("scans/").items() if k.count("/") == 1}
        for key in sorted(records, key=lambda k: int(k.split("/")[1])):
            rec = records[key]
            if rec.get("summary"):
                lines.append(f"{rec['summary']}; report {rec.get('report_file', '?')}")
            elif rec.get("fallback"):
                fb = rec["fallback"]
                lines.append(f"scan {rec['scan']}: no node group; written to disk as {fb.get('files', '?')} files "
                             f"in {fb.get('directory')} (manifest {fb.get('manifest', '?')})")
            else:
                lines.append(f"scan {rec.get('scan')}: {rec.get('status', '?')}")
        return lines

    def summary(self, seconds: float) -> str:
        """One line: what each node on this host moved, and anything else it counted."""
        parts = []
        for name, node in self.topology.nodes.items():
            if node.host != self.host:
                continue
            figures: dict[str, int] = {}
            for i in range(node.replicas):
                for k, v in (self.kv.get(f"totals/{name}/{i}") or {}).items():
                    if isinstance(v, int) and not isinstance(v, bool):
                        figures[k] = figures.get(k, 0) + v
            msgs, nbytes = figures.pop("messages", 0), figures.pop("bytes", 0)
            figures.pop("scans", None)
            more = "".join(f", {k} {v:,}" for k, v in figures.items())
            parts.append(f"{name} {msgs:,} msgs ({nbytes / 1e9:.2f} GB{more})")
        return f"{self.topology.name}: done in {seconds:.2f} s; " + "; ".join(parts)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the replica's whole session, in case a plugin forked
    except ProcessLookupError:
        pass
