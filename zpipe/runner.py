"""`zpipe run`: start the registry (if this host owns it) and every node replica placed on this host, and supervise them.

Each replica is its own process in its own session, so Ctrl-C reaches only the runner,
which then stops the replicas in order: SIGTERM, a bounded wait, SIGKILL. A replica that dies
is reported with its last output, and the run goes on without it: its peers notice (zpipe.roster)
and every scan is still accounted for, by the accountant that runs beside the registry
(zpipe.scans.accountant). Should nothing move for STALL seconds after a death, the rest is
stopped. The exit code says how the scans ended (docs/accounting.md):
0 every scan complete; 3 every scan accounted, some with losses named or a node died;
4 some scan failed (its account is partial, or an analysis failed), or the run stalled;
1 the run could not start; 2 a usage error; 130 interrupted.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import uuid
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from zpipe import security, view
from zpipe.hosts import AddressError, registry_from_topology, resolve
from zpipe.kv import KVClient, KVServer
from zpipe.runtime import PIPELINE_KEY
from zpipe.scans.accountant import Accountant
from zpipe.topology import Topology

# Seconds a replica gets between SIGTERM and SIGKILL: node groups and producers leave gracefully
# (finish what is under way, hand back the rest, deregister) within it; under Slurm's default
# KillWait (30 s) for the runner itself. A second signal to the runner stops them at once.
STOP_GRACE = 25.0
SAME_REQUEST = 2.0  # s: a signal this soon after the first is the same request
STALL = 60.0  # seconds without progress, after a node died, before the rest is stopped
EXIT_COMPLETE, EXIT_INCOMPLETE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 3, 4, 130
ACCOUNT_WAIT = 15.0  # seconds without progress before a runner stops waiting for a remote accountant
ACCOUNT_WAIT_MAX = 600.0  # seconds it waits at most, progress or not
REGISTRY_WAIT = 30.0  # seconds a runner waits for another host's registry to answer (hosts start in any order)
PIPELINE_WAIT = 10.0  # seconds it then waits for that host's runner to publish the pipeline's id
# Where launchers put a task's rank: Slurm (srun), MPICH/Hydra (PMI), PMIx, Open MPI.
RANK_VARS = ("SLURM_PROCID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")
# Every runner of a pipeline says it is there (an ephemeral key, gone when it ends or dies): the registry's
# host serves the registry until the runners of the other hosts have ended, not only its own nodes.
RUNNERS = "runners/"


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


def pick_host(topology: Topology, host: str | None, nodes=None) -> str:
    used = topology.hosts_used()
    if host:
        if host not in topology.hosts:
            raise RunError(f"--host {host!r} is not in the topology's hosts: {', '.join(topology.hosts)}")
        return host
    if len(used) == 1:
        return used[0]
    theirs = {topology.nodes[n].host for n in nodes or () if n in topology.nodes}
    if len(theirs) == 1:  # --node names nodes of one host: that one
        return theirs.pop()
    raise RunError(f"nodes are placed on several hosts ({', '.join(used)}); say which this is with --host")


def launcher_rank(env=None) -> tuple[int, str]:
    """This task's rank as its launcher (srun, mpiexec) set it, and the variable it came from."""
    env = os.environ if env is None else env
    for var in RANK_VARS:
        value = env.get(var, "").strip()
        if value:
            if not value.isdigit():
                raise RunError(f"--replica rank: {var}={value!r} is not a rank (a number from 0)")
            return int(value), var
    raise RunError(f"--replica rank takes the replica number from the launcher's rank, but none of "
                   f"{', '.join(RANK_VARS)} is set; start under srun or mpiexec, or give the number (--replica 0)")


def parse_replicas(text: str, env=None) -> tuple[list[int], str | None]:
    """`--replica`: a number, a list (0,2), a range (0-3) or `rank`; the numbers and, for `rank`, where it came from."""
    if text.strip() == "rank":
        rank, var = launcher_rank(env)
        return [rank], var
    numbers: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]{1,6})\s*(?:-\s*([0-9]{1,6})\s*)?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise RunError(f"--replica {text!r}: expected a replica number, a list such as 0,2, a range such as 0-3, "
                           f"or `rank` (the launcher's rank)")
        numbers.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    return sorted(numbers), None


def select(topology: Topology, host: str, nodes=None, replicas: str | None = None, *,
           exclude: frozenset[str] = frozenset(), env=None) -> dict[str, list[int]]:
    """The replicas this runner starts: {node: [replica, ...]}, every one of this host's unless --node and
    --replica narrow it down. RunError, in one line, for a node or replica that is not there."""
    here = [n for n, s in topology.nodes.items() if s.host == host and n not in exclude]
    for n in nodes or ():
        if n not in topology.nodes:
            raise RunError(f"--node {n!r} is not a node of the topology; its nodes: {', '.join(topology.nodes)}")
        if topology.nodes[n].host != host:
            raise RunError(f"--node {n!r} is placed on host {topology.nodes[n].host!r}, not on {host!r}")
        if n in exclude:
            raise RunError(f"--node {n!r} runs in the MPI ranks here, not as a process of this runner")
    chosen = [n for n in here if n in nodes] if nodes else here
    if replicas is None:
        return {n: list(range(topology.nodes[n].replicas)) for n in chosen}
    numbers, var = parse_replicas(replicas, env)
    for n in chosen:
        count = topology.nodes[n].replicas
        bad = [r for r in numbers if r >= count]
        if bad:
            why = f" (the launcher's rank, from {var})" if var else ""
            raise RunError(f"--replica {bad[0]}{why}: node {n!r} has {count} replica{'s' * (count != 1)} "
                           f"(0-{count - 1}); start as many tasks as replicas, or number them below {count}")
    return {n: list(numbers) for n in chosen}


class Runner:
    def __init__(self, topology: Topology, path: str, *, host: str | None = None, registry: str | None = None,
                 output_dir: str = ".", out=sys.stdout, err=sys.stderr, exclude: frozenset[str] = frozenset(),
                 on_registry=None, nodes=None, replicas: str | None = None):
        self.topology, self.path = topology, os.path.abspath(path)
        self.host = pick_host(topology, host, nodes)
        # --node / --replica: only these replicas of this host's nodes (a session started per rank, say).
        self.selection = select(topology, self.host, nodes, replicas, exclude=exclude)
        self.registry_arg = registry
        self.address: str | None = None  # this host's address, resolved (`auto`, an interface) when the run starts
        self.output_dir = os.path.abspath(output_dir)
        # Under MPI (zpipe.mpirun) the node groups run in the MPI ranks, not as our children:
        # they are excluded here, and `on_registry(address)` starts this rank's share of them
        # as `local` threads (label, thread, [exit code]) that are supervised like replicas.
        self.exclude, self.on_registry = exclude, on_registry
        self.local: list[tuple[str, threading.Thread, list[int]]] = []
        self.out, self.err = out, err
        self.replicas: list[Replica] = []
        self.server: KVServer | None = None
        self.accountant: Accountant | None = None
        self.kv: KVClient | None = None
        self.pipe: str | None = None
        self.died: list[str] = []
        self.seen_scans: dict[int, dict] = {}  # scan -> its record as last seen
        self._stop = threading.Event()
        self._signals = 0  # SIGINT/SIGTERM received: the first stops gracefully, a second at once
        self._first_signal = 0.0
        self._print_lock = threading.Lock()
        self.display: view.Display | None = None  # the live view or plain progress lines (zpipe/view.py)

    # -- registry ------------------------------------------------------------------------------
    def _registry(self) -> str:
        """The registry's address: --registry, the topology's external one, the registry host's (derived from the
        topology), or the one we start here. Resolves this host's address on the way (`auto` needs the registry's)."""
        reg = self.topology.registry
        hs = self.topology.hosts[self.host]
        try:
            if self.registry_arg or reg.address or self.topology.registry_host() != self.host:
                registry = self.registry_arg or reg.address or registry_from_topology(self.topology)
                self.address = resolve(hs, self.host, registry)
                return registry
            self.address = resolve(hs, self.host, None)
        except AddressError as exc:
            raise RunError(str(exc)) from None
        try:
            self.server = KVServer(f"tcp://{hs.bind or self.address}:{reg.port}", advertise=self.address,
                                   auth=security.server_auth(self.topology)).start()
            self.accountant = Accountant(self.server.address, self.output_dir,
                                         curve=security.client_for(self.topology, security.REGISTRY)).start()
        except Exception as exc:  # an address not on this machine, a port taken: one line, not a traceback
            raise RunError(f"cannot start the registry on host {self.host!r}: {exc}") from None
        return self.server.address

    def _pipeline(self) -> str:
        """The pipeline's identity in the registry: ours if we run the registry (or none is there yet)."""
        current = self.kv.get(PIPELINE_KEY)
        if self.server is None and isinstance(current, dict) and isinstance(current.get("id"), str):
            return current["id"]
        if self.server is None and not (self.registry_arg or self.topology.registry.address):
            # The registry is the topology's registry host's: its runner publishes the id just after the
            # registry answers. Made here too, it would be overwritten and this runner would not know
            # the pipeline's scans for its own (no reports here).
            from zpipe.runtime import pipeline_id

            try:
                return pipeline_id(self.kv, timeout=PIPELINE_WAIT)
            except RuntimeError as exc:
                raise RunError(str(exc)) from None
        pipe = uuid.uuid4().hex[:16]
        self.kv.set(PIPELINE_KEY, {"id": pipe, "topology": self.topology.name, "host": self.host,
                                   "started": time.time()})
        return pipe

    def _announce(self) -> None:
        from zpipe import roster

        self.kv.set(f"{RUNNERS}{self.host}/{os.getpid()}", {"host": self.host, "pid": os.getpid(), "pipe": self.pipe,
                                                             "address": self.address, "nodes": self.selection},
                    ttl=roster.TTL)

    def _other_runners(self) -> list[str]:
        mine = f"{RUNNERS}{self.host}/{os.getpid()}"
        return sorted(f"{v.get('host')} (pid {v.get('pid')})" for k, v in self.kv.items(RUNNERS).items()
                      if k != mine and isinstance(v, dict) and v.get("pipe") == self.pipe)

    def _serve_others(self) -> bool:
        """On the registry's host, once its own nodes are done: the runners of other hosts may still need the
        registry (their node groups finishing a scan, their reports). Serve it until they have ended, for as
        long as something moves (STALL s at most without), or until a signal (then False)."""
        others = self._other_runners()
        if others:
            self._view_off()
            print(f"zpipe: this host's nodes are done; the registry stays up until the runners on other hosts "
                  f"end: {', '.join(others)}", file=self.err, flush=True)
        progress, moved = None, time.monotonic()
        while others:
            if self._stop.is_set():
                return False
            sign, now = (self._progress(), tuple(others)), time.monotonic()
            if sign != progress:
                progress, moved = sign, now
            elif now - moved > STALL:
                print(f"zpipe: nothing moved for {STALL:.0f} s; not waiting longer for {', '.join(others)}",
                      file=self.err, flush=True)
                break
            time.sleep(0.1)
            others = self._other_runners()
        return True

    # -- processes -----------------------------------------------------------------------------
    def _subset(self) -> str:
        """`; only nodegroup[1]` when --node/--replica narrowed this run down, else nothing."""
        every = {n: list(range(s.replicas)) for n, s in self.topology.nodes.items()
                 if s.host == self.host and n not in self.exclude}
        if self.selection == every:
            return ""
        return "; only " + ", ".join(f"{n}[{','.join(map(str, rs))}]" for n, rs in self.selection.items())

    def _check_secrets(self) -> None:
        """Every secret this host's replicas will load, before anything starts: one missing or loose is one
        line naming the file and the replica, not a traceback in a node's failure record."""
        for name, numbers in self.selection.items():
            for i in numbers:
                for identity in security.secrets_needed(self.topology, name, i):
                    try:
                        security.load_secret(self.topology.security.keys, identity)
                    except security.SecurityError as exc:
                        raise RunError(f"{name}[{i}] cannot start: {exc}") from None

    def _not_running_yet(self) -> None:
        """Replicas started separately must have distinct numbers: refuse one that is alive in this pipeline
        already (another runner's), after waiting out the liveness key of one that just died."""
        from zpipe import roster

        deadline = time.monotonic() + roster.TTL + 1.0
        while True:
            twins = []
            for name, numbers in self.selection.items():
                for i in numbers:
                    v = self.kv.get(roster.key(name, i))
                    if isinstance(v, dict) and v.get("pipe") == self.pipe:
                        twins.append(f"{name}[{i}] (pid {v.get('pid')} on host {v.get('host')!r})")
            if not twins or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if twins:
            raise RunError(f"{', '.join(twins)} already running in this pipeline; start other replica numbers "
                           f"(--replica N, or --replica rank under srun/mpiexec)")

    def _spawn(self, registry: str) -> None:
        if self.server is None:
            self._not_running_yet()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name, numbers in self.selection.items():
            for i in numbers:
                cmd = [sys.executable, "-m", "zpipe.node", "--topology", self.path, "--node", name,
                       "--replica", str(i), "--host", self.host, "--registry", registry, "--address", self.address,
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
        """SIGTERM to every replica still running (they leave gracefully), SIGTERM again on a second
        signal to us (they stop at once), SIGKILL to any left after STOP_GRACE."""
        alive = [r for r in self.replicas if r.proc.poll() is None]
        for r in alive:
            _signal(r.proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        forwarded = self._signals
        while alive and time.monotonic() < deadline:
            if self._signals > forwarded:  # asked again: the replicas' second SIGTERM stops them at once
                forwarded = self._signals
                for r in alive:
                    _signal(r.proc, signal.SIGTERM)
            time.sleep(0.05)
            alive = [r for r in alive if r.proc.poll() is None]
        for r in alive:
            print(f"zpipe: {r.label} did not end within {STOP_GRACE:g} s of SIGTERM; killing it", file=self.err,
                  flush=True)
            _signal(r.proc, signal.SIGKILL)
            r.proc.wait()
        for r in self.replicas:
            if r.reader:
                r.reader.join(timeout=2.0)

    def _on_signal(self, *_) -> None:
        now = time.monotonic()
        if self._signals and now - self._first_signal < SAME_REQUEST:
            return  # the same request (a batch system signals every process of a job)
        if not self._signals:
            self._first_signal = now
        self._signals += 1
        self._stop.set()

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        t0 = time.monotonic()
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            self._check_secrets()
            registry = self._registry()
            try:
                self.kv = KVClient(registry, name="runner", curve=security.client_for(
                                       self.topology, security.REGISTRY if self.server else security.RUNNER),
                                   connect_timeout=10.0 if self.server else REGISTRY_WAIT).start()
            except (TimeoutError, RuntimeError) as exc:
                raise RunError(f"the registry at {registry} does not answer: {exc}") from None
            self.pipe = self._pipeline()
            self._announce()
            self.kv.on_change(self._seen)
            for k, v in self.kv.items("scans/").items():
                self._seen(k, v)
            print(f"zpipe: {self.topology.name} on host {self.host} ({self.address}), registry at {registry}"
                  + self._subset(), file=self.err, flush=True)
            # In-process node groups (under MPI) log straight to stderr, which would tear a live view.
            self.display = view.for_runner(self.kv, self.topology, self.host, self.err, self._print_lock,
                                           exclude=self.exclude, live=False if self.on_registry else None,
                                           replicas=self.selection)
            self._spawn(registry)
            if self.on_registry:
                self.on_registry(registry)
            ended = self._supervise()
            if ended == "done" and self.server is not None and not self._serve_others():
                ended = "interrupted"
            self._view_off()
            self._terminate()
            if self.accountant is not None:
                why = {"interrupted": "the run was interrupted before it closed the scan",
                       "stalled": "the run stalled and was stopped before it closed the scan"}.get(
                    ended, "the run ended before every party of the scan reported")
                self.accountant.finish(why, timeout=3.0)
            outcomes = self.report_scans()
            print(self.summary(time.monotonic() - t0), file=self.out, flush=True)
            return self.exit_code(ended, outcomes)
        finally:
            self._view_off()
            self._terminate()
            if self.kv:
                self.kv.close()
            if self.accountant:
                self.accountant.stop()
            if self.server:
                self.server.stop()
            for s, h in old.items():
                signal.signal(s, h)

    def exit_code(self, ended: str, outcomes: list[str]) -> int:
        if ended == "interrupted":
            return EXIT_INTERRUPTED
        if ended == "stalled" or "failed" in outcomes or (self.died and not outcomes):
            return EXIT_FAILED
        if "incomplete" in outcomes or self.died:
            return EXIT_INCOMPLETE
        return EXIT_COMPLETE

    def _supervise(self) -> str:
        """Until every replica here has ended ("done"), a signal ("interrupted"), or a stall after a death ("stalled")."""
        reported: set[int] = set()
        progress, moved = None, time.monotonic()
        while True:
            if self._stop.is_set():
                self._view_off()
                print(f"zpipe: stopping (signal received): what is under way finishes, up to {STOP_GRACE:g} s; "
                      f"signal again to stop at once", file=self.err, flush=True)
                self._terminate()
                return "interrupted"
            codes = [(r, r.proc.poll()) for r in self.replicas]
            for r, c in codes:
                if c not in (None, 0) and id(r) not in reported:
                    reported.add(id(r))
                    self._died(r, c)
            for label, thread, result in self.local:
                if not thread.is_alive() and result and result[0] != 0 and label not in self.died:
                    self.died.append(label)
                    print(f"zpipe: node {label} (in this process) failed with exit code {result[0]}",
                          file=self.err, flush=True)
            if all(c is not None for _, c in codes) and not any(th.is_alive() for _, th, _ in self.local):
                return "done"
            if self.died:
                now = time.monotonic()
                sign = self._progress()
                if sign != progress:
                    progress, moved = sign, now
                elif now - moved > STALL:
                    self._view_off()
                    print(f"zpipe: nothing moved for {STALL:.0f} s after {', '.join(self.died)} died; stopping the "
                          f"rest", file=self.err, flush=True)
                    self._terminate()
                    return "stalled"
            time.sleep(0.05)

    def _died(self, r: Replica, code: int) -> None:
        time.sleep(0.2)  # let the reader catch the traceback's last lines
        if r.reader:
            r.reader.join(timeout=1.0)
        self.died.append(r.label)
        how = f"was killed by signal {-code}" if code < 0 else f"failed with exit code {code}"
        tail = "\n".join(f"    {line}" for line in r.tail)
        self._view_off()
        print(f"zpipe: node {r.label} {how}; the run goes on without it; its last output:\n{tail}",
              file=self.err, flush=True)

    def _progress(self) -> tuple:
        """What moves while a pipeline works: replicas ending, scans closing, messages counted."""
        closed = len(self.accountant.closed) if self.accountant else 0
        moved = 0
        for v in self.kv.items("status/").values():
            if isinstance(v, dict):
                for k in ("msgs_in", "msgs_out"):
                    n = v.get(k)
                    moved += n if isinstance(n, int) and not isinstance(n, bool) else 0
        ended = sum(1 for r in self.replicas if r.proc.poll() is not None)
        return closed, moved, ended

    def _view_off(self) -> None:
        """Before the runner prints on its own: the live view's last picture stays, untorn, above."""
        if self.display is not None:
            self.display.stop()

    def _seen(self, key: str, value) -> None:
        """Every scan of this run we ever saw a record of: a registry that forgets one cannot make it vanish."""
        scan = key[len("scans/"):] if key.startswith("scans/") else ""
        if scan.isdigit() and isinstance(value, dict) and value.get("pipe") == self.pipe:
            self.seen_scans[int(scan)] = value

    def _records(self) -> dict[int, dict]:
        records = {}
        for k, rec in self.kv.items("scans/").items():
            scan = k.split("/")[1] if k.count("/") == 1 else ""
            if scan.isdigit() and isinstance(rec, dict) and rec.get("pipe") == self.pipe:
                records[int(scan)] = rec
        return records

    def report_scans(self) -> list[str]:
        """Print each scan's account (this run's scans); return their outcomes. Reports this host's
        accountant did not write (an external registry's did) are written to the output directory here."""
        records, unclosed = self._records(), None
        if self.accountant is None:  # the registry's accountant closes them: wait while they progress
            records, unclosed = self._await_accounts(records)
        if self.accountant is not None:
            for scan, rep in list(self.accountant.reports.items()):
                if scan in records:
                    records[scan] = {**records[scan], "summary": rep["summary"], "outcome": rep["outcome"],
                                     "report_file": rep.get("report_file")}
        from zpipe.scans.account import to_disk_why
        from zpipe.scans.accountant import scans_on_disk

        for scan in {*self.seen_scans, *scans_on_disk(self.output_dir, self.pipe)}:
            rec = records.get(scan, {})
            if rec.get("fallback") or (self.seen_scans.get(scan) or {}).get("fallback"):
                continue
            if not rec.get("summary") or (self.accountant is None and rec.get("outcome") != "complete"):
                # No account in the registry, or one the registry may have made without parties it lost
                # (an outage): the parties' own files here, when they hold the whole account, or no better.
                still_open = bool(rec) and not rec.get("summary")  # the registry holds it, not closed yet
                mine = self._from_files(scan, {**self.seen_scans.get(scan, {}), **rec},
                                        unclosed if still_open else None)
                if not rec.get("summary") or mine.get("whole"):
                    records[scan] = mine
        outcomes = []
        for scan in sorted(records):
            rec = records[scan]
            if rec.get("fallback"):
                fb = rec["fallback"] if isinstance(rec["fallback"], dict) else {}
                outcomes.append(rec.get("outcome", "complete"))
                line = (f"scan {scan}: {to_disk_why(fb)}; written to disk as {fb.get('files', '?')} files in "
                        f"{fb.get('directory')} (manifest {fb.get('manifest', '?')})")
                if rec.get("report_file"):
                    line += f"; report {rec['report_file']}"
            elif isinstance(rec.get("summary"), str):
                outcome = rec.get("outcome")
                outcomes.append(outcome if outcome in ("complete", "incomplete", "failed") else "failed")
                path = rec.get("report_file")
                if self.accountant is None and not rec.get("from_files"):
                    rep = self.kv.get(f"scans/{scan}/report")
                    if isinstance(rep, dict):  # the registry's accountant wrote it elsewhere: a copy here too
                        from zpipe.scans.record import write_json
                        try:
                            path = write_json(os.path.join(self.output_dir, f"scan_{scan}_report.json"), rep)
                        except OSError as exc:
                            print(f"zpipe: scan {scan}: cannot write its report here: {exc}", file=self.err)
                line = f"{rec['summary']}; report {path or '?'}"
            else:
                outcomes.append("failed")
                line = (f"scan {scan}: {rec.get('status', '?')}; no account: the registry's accountant never closed it "
                        f"(`zpipe kv` and `zpipe run` on the registry's host run one; `python -m zpipe.kv` is the bare store)")
            print(line, file=self.out, flush=True)
        return outcomes

    def _await_accounts(self, records: dict[int, dict]) -> tuple[dict[int, dict], tuple[float, float] | None]:
        """This run's scans as the registry holds them, once its accountant closed them all, or once none
        of the open ones made progress (their flow keys) for ACCOUNT_WAIT s, or after ACCOUNT_WAIT_MAX s:
        another host may still be processing a scan long after this host's nodes ended. With them, None
        if the wait ended with every scan closed (or by a signal), else (seconds waited, without progress)."""
        t0 = time.monotonic()
        quiet_since, last, signals = t0, None, self._signals
        while self._signals == signals:  # a signal now: the user will not wait
            open_scans = {str(n) for n, r in records.items() if not r.get("summary") and not r.get("fallback")}
            if not open_scans:
                break
            now = time.monotonic()
            # Counts, not when they were last published (nodes republish the same ones).
            progress = sorted((k, repr({f: x for f, x in v.items() if f != "updated"} if isinstance(v, dict) else v))
                              for k, v in self.kv.items("flow/").items() if k.rpartition("/")[2] in open_scans)
            if progress != last:
                last, quiet_since = progress, now
            if now - quiet_since >= ACCOUNT_WAIT or now - t0 >= ACCOUNT_WAIT_MAX:
                return records, (now - t0, now - quiet_since)
            time.sleep(0.1)
            records = self._records()
        return records, None

    def _from_files(self, scan: int, rec: dict, unclosed: tuple[float, float] | None = None) -> dict:
        """No account in the registry (it was lost, or never closed): the one the parties kept on this
        host's disk (zpipe.scans.accountant.from_files). It says so, and fails unless it is whole.
        `unclosed`: the registry still holds the scan, open after we waited (seconds, without progress)."""
        from zpipe.scans import account
        from zpipe.scans.accountant import LOST, from_files
        from zpipe.scans.record import write_json

        if unclosed is not None:  # not lost, just not closed while we waited
            waited, quiet = unclosed
            why = (f"the registry's accountant had not closed the scan {waited:.0f} s after this host's nodes "
                   f"ended (no progress for the last {quiet:.0f} s; the registry's host writes its report)")
            note = f"{why}; this account is made from the parties' own files on this host"
        else:
            why, note = "the registry holds no account of it", LOST
        try:
            rep = from_files(self.output_dir, scan, self.pipe, note)
        except Exception as exc:  # files of the wrong shape: still a line, and a failed one
            rep, error = None, f"; the files kept on this host do not add up: {exc}"
        else:
            error = "; nothing of it was kept on this host either"
        if rep is None:
            return {**rec, "outcome": "failed", "summary": f"scan {scan} failed: {why}{error}"}
        path = write_json(os.path.join(self.output_dir, f"scan_{scan}_report.json"), rep)
        return {**rec, "outcome": rep["outcome"], "report_file": path, "summary": account.summary_line(rep),
                "from_files": True, "whole": not rep.get("missing_parties")}

    def summary(self, seconds: float) -> str:
        """One line: what each node on this host moved, and anything else it counted."""
        parts = []
        for name, node in self.topology.nodes.items():
            if node.host != self.host or (name not in self.selection and name not in self.exclude):
                continue
            figures: dict[str, int] = {}
            for i in self.selection.get(name) or range(node.replicas):
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
