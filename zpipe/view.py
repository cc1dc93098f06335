"""What `zpipe run` and `zpipe status` show: the nodes' status keys turned into rates, a rich table or a plain line."""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from zpipe import preview
from zpipe.status import PREFIX

ROLE_ORDER = ("source", "producer", "aggregator", "stage", "nodegroup")
COLLAPSE_ABOVE = 4  # a node with more replicas than this becomes one summed row
# Seconds of publications a rate spans: ZeroMQ wakes a sender blocked at its high-water mark
# only once half the queue has drained, so a held-back sender moves in bursts; this smooths them.
WINDOW = 3.0
FINISHED = ("done", "failed")
PLAIN_EVERY = 5.0  # seconds between plain lines when the output is not a terminal
COUNTERS = ("msgs_in", "bytes_in", "msgs_out", "bytes_out")


# -- rates -------------------------------------------------------------------------------------
def rate(a: dict, b: dict) -> dict[str, float] | None:
    """Per-second rates between two snapshots of one replica, b the later; None if they span no time.

    Both times come from the replica's own clock, so the viewer's clock and delays in the
    store do not distort them. `blocked` is seconds waited on a full queue per second,
    summed over the node's threads (2.0: two threads blocked all the time).
    """
    dt = b["time"] - a["time"]
    if dt <= 0 or a.get("pid") != b.get("pid"):
        return None
    r = {f"{k}_s": max(0, b[k] - a[k]) / dt for k in COUNTERS}
    r["blocked"] = max(0.0, b["blocked_s"] - a["blocked_s"]) / dt
    return r


def scan_rates(a: dict, b: dict) -> dict[str, float]:
    """Parts received per second for each scan a node group is receiving."""
    dt = b["time"] - a["time"]
    if dt <= 0:
        return {}
    old = a.get("scans") or {}
    return {sid: max(0, s.get("received", 0) - old.get(sid, {}).get("received", 0)) / dt
            for sid, s in (b.get("scans") or {}).items() if sid in old}


# -- what is shown -----------------------------------------------------------------------------
@dataclass
class Row:
    node: str
    role: str
    host: str
    state: str
    replica: int | None = 0
    replicas: int = 1
    rates: dict[str, float] | None = None
    errors: int = 0
    rejected: int = 0
    msgs_in: int = 0  # cumulative: tells sources (take nothing in) from sinks (send nothing on)
    msgs_out: int = 0
    snapshot: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.node} ×{self.replicas}" if self.replica is None else f"{self.node}[{self.replica}]"

    @property
    def msg_s(self) -> float | None:
        # The rate through the node: what it takes in, or for a source what it sends.
        return None if self.rates is None else max(self.rates["msgs_in_s"], self.rates["msgs_out_s"])


@dataclass
class ScanView:
    scan: int
    status: str
    received: int = 0
    expected: int | None = None
    rate: float | None = None
    elapsed: float | None = None
    record: dict = field(default_factory=dict)

    @property
    def eta(self) -> float | None:
        if self.expected is None or not self.rate or self.status in FINISHED:
            return None
        return max(0, self.expected - self.received) / self.rate


@dataclass
class Picture:
    rows: list[Row]
    scans: list[ScanView]
    warnings: list[str]
    time: float = field(default_factory=time.time)
    previews: dict = field(default_factory=dict)  # scan -> {analysis.buffer: grid}, see zpipe.preview


class Tracker:
    """Follows `status/` and `scans/` in a KVClient and keeps a short history per replica for rates.

    It listens to every change, not to a poll, so no publication is missed: a replica's
    final `done` arrives just before its key is withdrawn, and is what stays on screen.
    """

    def __init__(self, order: list[str] | None = None):
        self.order = order or []  # node names in topology order, when known
        self._lock = threading.Lock()
        self._history: dict[str, collections.deque] = {}  # key -> (received at, snapshot)
        self._gone: set[str] = set()
        self._scans: dict[str, dict] = {}
        self._expected: dict[str, Row] = {}  # replicas the runner started, shown before they publish
        self.ignored = 0  # status values of the wrong shape, not shown
        self._previews: dict[str, Any] = {}  # preview/{scan}/{analysis.buffer}/{replica} -> grid

    def attach(self, kv) -> "Tracker":
        kv.on_change(self.on_change)  # before the copy, so nothing falls between the two
        for prefix in (PREFIX, "scans/", preview.PREFIX):
            for k, v in kv.items(prefix).items():
                self.on_change(k, v)
        return self

    def expect(self, node: str, replica: int, role: str, host: str) -> None:
        self._expected[f"{PREFIX}{node}/{replica}"] = Row(node, role, host, "starting", replica)

    def on_change(self, key: str, value: Any) -> None:
        if key.startswith(preview.PREFIX):
            with self._lock:
                if value is None:
                    self._previews.pop(key, None)
                elif (grid := preview.grid_of(value)) is not None:
                    self._previews[key] = grid
            return
        if key.startswith("scans/"):
            with self._lock:
                if value is None:
                    self._scans.pop(key, None)
                else:
                    self._scans[key] = value
            return
        if not key.startswith(PREFIX):
            return
        with self._lock:
            if value is None:
                self._gone.add(key)
                return
            if not _sane(value):  # anyone can write a status key: what is not a status is not shown
                self.ignored += 1
                return
            self._gone.discard(key)
            h = self._history.setdefault(key, collections.deque(maxlen=256))
            if h and (h[-1][1].get("pid") != value.get("pid") or value["time"] < h[-1][1]["time"]):
                h.clear()  # a new process: its counters start again from zero
            if h and h[-1][1]["time"] == value["time"]:
                return
            h.append((time.monotonic(), value))
            while len(h) > 2 and value["time"] - h[1][1]["time"] >= WINDOW:
                h.popleft()

    def picture(self, now: float | None = None) -> Picture:
        now = time.monotonic() if now is None else now
        with self._lock:
            history = {k: list(h) for k, h in self._history.items()}
            gone, records = set(self._gone), dict(self._scans)
        rows = {}
        for k, h in history.items():
            try:
                rows[k] = _row(k, h, k in gone, now)
            except Exception:  # odd values that passed _sane
                self.ignored += 1
        for k, placeholder in self._expected.items():
            rows.setdefault(k, placeholder)
        ordered = sorted(rows.values(), key=self._sort_key)
        try:
            scans = _scans(records, history)
        except Exception:  # records anyone can write: a picture without them rather than none
            self.ignored += 1
            scans = []
        try:
            warnings = _warnings(history)
        except Exception:
            self.ignored += 1
            warnings = []
        with self._lock:
            grids = dict(self._previews)
        by: dict[int, dict[str, list]] = {}
        for key, grid in grids.items():
            parts = key.split("/")  # preview/{scan}/{analysis.buffer}/{replica}
            if len(parts) == 4 and parts[1].isdigit():
                by.setdefault(int(parts[1]), {}).setdefault(parts[2], []).append(grid)
        previews = {scan: {name: preview.combine(gs) for name, gs in sorted(names.items())}
                    for scan, names in sorted(by.items())}
        return Picture(ordered, scans, warnings, previews=previews)

    def _sort_key(self, row: Row):
        role = ROLE_ORDER.index(row.role) if row.role in ROLE_ORDER else len(ROLE_ORDER)
        node = self.order.index(row.node) if row.node in self.order else len(self.order)
        return role, node, row.node, row.replica or 0


_NUMBERS = ("msgs_in", "bytes_in", "msgs_out", "bytes_out", "blocked_s", "rejected", "errors", "queue", "queue_max")


def _sane(value: Any) -> bool:
    """A status snapshot as Meter.snapshot writes it (numbers where numbers go), or not shown."""
    if not isinstance(value, dict) or not _finite(value.get("time")):
        return False
    if not isinstance(value.get("node", ""), str) or not isinstance(value.get("state", ""), str):
        return False
    if not isinstance(value.get("replica", 0), int) or not isinstance(value.get("scans", {}), dict):
        return False
    if not isinstance(value.get("warnings", []), list) or not all(isinstance(w, str) for w in value["warnings"]):
        return False
    if not isinstance(value.get("role", ""), str) or not isinstance(value.get("host", ""), str):
        return False
    if not all(isinstance(c, dict) and all(c.get(k) is None or _finite(c.get(k)) for k in ("received", "expected"))
               for c in value.get("scans", {}).values()):
        return False
    return all(_finite(value.get(k, 0)) for k in _NUMBERS)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _row(key: str, h: list, gone: bool, now: float) -> Row:
    received, snap = h[-1]
    state = snap.get("state", "?")
    r = rate(h[0][1], snap) if len(h) > 1 else None
    period = (snap["time"] - h[-2][1]["time"]) if len(h) > 1 else 1.0
    if gone:
        state, r = (state if state in FINISHED else "gone"), None
    elif now - received > max(3.0, 4 * period):
        state, r = f"{state}?", None  # silent: its last rate would be a lie
    return Row(snap.get("node", key), snap.get("role", "?"), snap.get("host", "?"), state, snap.get("replica", 0),
               rates=r, errors=snap.get("errors", 0), rejected=snap.get("rejected", 0),
               msgs_in=snap.get("msgs_in", 0), msgs_out=snap.get("msgs_out", 0), snapshot=snap)


def _scans(records: dict[str, dict], history: dict[str, list]) -> list[ScanView]:
    """Each scan's progress: node groups' reports where they closed it, else their live counts.

    One pass over the replicas and one over the records, so a long run's thousands of scans
    cost no more than they must at a few pictures a second.
    """
    counts: dict[str, dict[int, tuple[int, int | None]]] = {}  # scan -> node group replica -> (received, expected)
    speed: dict[str, float] = {}
    for h in history.values():
        snap = h[-1][1]
        for sid, c in (snap.get("scans") or {}).items():
            counts.setdefault(sid, {})[snap.get("replica", 0)] = (c.get("received", 0), c.get("expected"))
        if len(h) > 1:
            for sid, v in scan_rates(h[0][1], snap).items():
                speed[sid] = speed.get(sid, 0.0) + v
    for key, rep in records.items():
        parts = key.split("/")  # scans/{id}/part/{replica}: a node group's part, once it closed the scan
        if len(parts) == 4 and parts[2] == "part" and parts[3].isdigit() and isinstance(rep, dict) and rep.get("final"):
            counts.setdefault(parts[1], {})[int(parts[3])] = (rep.get("received", 0), rep.get("sent"))
    out = []
    for key, rec in records.items():
        sid = key.split("/", 1)[1]
        if not sid.isdigit() or not isinstance(rec, dict) or not _sane_record(rec):
            continue
        per_group = counts.get(sid, {})
        known = [e for _, e in per_group.values() if e is not None]
        groups = rec.get("node_groups") or []
        expected = sum(known) if groups and len(known) >= len(groups) else None
        running = rec.get("status") not in FINISHED
        end = time.time() if running else rec.get("finished") or rec.get("updated")
        elapsed = end - rec["started"] if rec.get("started") and end else None
        received = sum(r for r, _ in per_group.values())
        rate = speed.get(sid) if running else received / elapsed if elapsed else None  # finished: its average
        out.append(ScanView(int(sid), rec.get("status", "?"), received, expected, rate or None, elapsed, rec))
    out.sort(key=lambda s: s.scan)
    return out


def _sane_record(rec: dict) -> bool:
    """A scan record's fields the view uses, of the types it uses them as."""
    return (isinstance(rec.get("node_groups") or [], list) and isinstance(rec.get("status", ""), str)
            and all(rec.get(k) is None or _finite(rec.get(k)) for k in ("started", "finished", "updated")))


def _warnings(history: dict[str, list], keep: int = 5) -> list[str]:
    found = []
    for h in history.values():
        snap = h[-1][1]
        label = f"{snap.get('node')}[{snap.get('replica')}]"
        found += [(w[:8], f"{label} {w}") for w in snap.get("warnings") or []]
    return [w for _, w in sorted(found)[-keep:]]  # each starts HH:MM:SS, so this is time order


# -- grouping ----------------------------------------------------------------------------------
def collapse(rows: list[Row], above: int = COLLAPSE_ABOVE) -> list[Row]:
    """One summed row for each node with more than `above` replicas; order kept."""
    by_node: dict[str, list[Row]] = {}
    for r in rows:
        by_node.setdefault(r.node, []).append(r)
    out = []
    for node, rs in by_node.items():
        out += [merge(rs)] if len(rs) > above else rs
    return out


def merge(rs: list[Row]) -> Row:
    states = collections.Counter(r.state for r in rs)
    state, n = states.most_common(1)[0]
    hosts = sorted({r.host for r in rs})
    measured = [r.rates for r in rs if r.rates is not None]
    rates = None
    if measured:
        rates = {k: sum(m[k] for m in measured) for k in measured[0]}
        rates["blocked"] /= len(measured)  # per replica, so it reads like a single replica's
    return Row(rs[0].node, rs[0].role, hosts[0] if len(hosts) == 1 else f"{len(hosts)} hosts",
               state if n == len(rs) else f"{state} {n}/{len(rs)}", None, len(rs), rates,
               sum(r.errors for r in rs), sum(r.rejected for r in rs),
               sum(r.msgs_in for r in rs), sum(r.msgs_out for r in rs))


def totals(rows: list[Row]) -> dict[str, float]:
    """What enters the pipeline (sources' output) and what leaves it (sinks' input), per second."""
    t = dict(replicas=sum(r.replicas for r in rows), errors=sum(r.errors for r in rows),
             rejected=sum(r.rejected for r in rows), in_msgs=0.0, in_bytes=0.0, out_msgs=0.0, out_bytes=0.0)
    for r in rows:
        if r.rates is None:
            continue
        if r.msgs_in == 0 and r.msgs_out:
            t["in_msgs"] += r.rates["msgs_out_s"]
            t["in_bytes"] += r.rates["bytes_out_s"]
        if r.msgs_out == 0 and r.msgs_in:
            t["out_msgs"] += r.rates["msgs_in_s"]
            t["out_bytes"] += r.rates["bytes_in_s"]
    return t


# -- formatting --------------------------------------------------------------------------------
def _n(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v:,.0f}"


def _gb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e9:.2f}"


def _pct(blocked: float) -> str:
    # Thread-seconds per second, and a long wait is counted when it ends: capped, it reads as
    # "held back all the time" instead of a surprising 700 %.
    return f"{100 * min(1.0, blocked):.0f}"


def _clock(s: float | None) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _progress(s: ScanView) -> str:
    pct = f" {100 * s.received / s.expected:.0f}%" if s.expected else ""
    return f"{s.received:,}/{'?' if s.expected is None else f'{s.expected:,}'}{pct}"


def shown_scans(scans: list[ScanView], keep: int = 4) -> list[ScanView]:
    """Scans still under way, and the last one finished, so the end of a run still shows its result."""
    done = [s for s in scans if s.status in FINISHED]
    return ([*done[-1:], *[s for s in scans if s.status not in FINISHED]])[-keep:]


HEADERS = ("node", "role", "host", "state", "msg/s", "GB/s in", "GB/s out", "blk%", "err")
GIVE_WAY = (2, 1, 3, 0)  # when too wide: host shortens first, then role, state, node; numbers never


def _table(rows: list[Row], width: int) -> Table:
    cells = []
    for r in rows:
        rt = r.rates
        cells.append((r.label, r.role, r.host, r.state, _n(r.msg_s),
                      _gb(rt and rt["bytes_in_s"]) if r.msgs_in or rt is None else "",
                      _gb(rt and rt["bytes_out_s"]) if r.msgs_out or rt is None else "",
                      "-" if rt is None else _pct(rt["blocked"]), str(r.errors)))
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(HEADERS)]
    excess = sum(widths) + len(widths) - 1 - width  # columns are one space apart
    for i in GIVE_WAY:
        cut = max(0, min(excess, widths[i] - 5))
        widths[i] -= cut
        excess -= cut
    table = Table(box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    for i, (h, w) in enumerate(zip(HEADERS, widths)):
        table.add_column(h, width=w, no_wrap=True, overflow="ellipsis", justify="left" if i < 4 else "right")
    roles = [r.role for r in rows]
    for i, (r, c) in enumerate(zip(rows, cells)):
        style = "red" if r.state in ("failed", "gone") else "green" if r.state == "done" else ""
        last_of_role = i + 1 < len(rows) and roles[i + 1] != r.role
        table.add_row(*c[:3], Text(c[3], style=style), *c[4:8], Text(c[8], style="red" if r.errors else ""),
                      end_section=last_of_role)  # roles apart
    return table


def render(p: Picture, title: str = "", width: int = 80, height: int | None = None) -> RenderableType:
    """The whole view; every line fits `width` (columns give way, long texts end in an ellipsis)."""
    above = COLLAPSE_ABOVE
    if height and len(p.rows) > max(4, height - 16):
        above = 1  # not enough lines for every replica: one row per node
    rows = collapse(p.rows, above)
    table = _table(rows, width)
    t = totals(rows)
    parts: list[RenderableType] = [
        Text(f"zpipe {title}  {time.strftime('%H:%M:%S', time.localtime(p.time))}".strip(), style="bold",
             no_wrap=True, overflow="ellipsis")]
    if rows:
        parts += [table, Text(f"total: {t['replicas']} replicas · in {_n(t['in_msgs'])}/s {_gb(t['in_bytes'])} GB/s"
                              f" · out {_n(t['out_msgs'])}/s {_gb(t['out_bytes'])} GB/s · {t['errors']} errors"
                              + (f" · {t['rejected']} rejected" if t["rejected"] else ""))]
    else:
        parts.append(Text("no node replica is publishing status (none running, or status.interval is 0)",
                          style="dim"))
    scans = shown_scans(p.scans)
    if scans:
        grid = Table.grid(padding=(0, 1))
        bar_w = max(10, min(40, width - 60))
        for _ in range(6):
            grid.add_column(no_wrap=True)
        for s in scans:
            bar = ProgressBar(total=s.expected or None, completed=s.received, width=bar_w,
                              pulse=s.expected is None and s.status not in FINISHED)
            if s.status == "done":
                bar = ProgressBar(total=1, completed=1, width=bar_w, complete_style="green", finished_style="green")
            when = f"{_clock(s.eta)} left" if s.eta is not None else f"{s.elapsed:.1f} s" if s.elapsed else ""
            grid.add_row(f"scan {s.scan}", s.status, bar, _progress(s), f"{_n(s.rate)}/s" if s.rate else "", when)
        parts.append(grid)
    if p.previews:
        scan = max(p.previews)  # the latest scan's pictures, side by side as the width allows
        shown = Table.grid(padding=(0, 2))
        cells = []
        used = 0
        for name, grid in p.previews[scan].items():
            if grid is None or used + grid.shape[1] + 2 > width:
                continue
            used += max(grid.shape[1], len(name)) + 2
            picture = Text(f"{name}\n", style="dim", no_wrap=True, overflow="ellipsis")
            for line in preview.halfblocks(grid):
                for ch, style in line:
                    picture.append(ch, style=style)
                picture.append("\n")
            cells.append(picture)
        if cells:
            for _ in cells:
                shown.add_column(no_wrap=True)
            shown.add_row(*cells)
            parts += [Text(f"scan {scan}, as it builds up:", style="bold"), shown]
    if p.warnings:
        parts.append(Text("warnings:", style="yellow"))
        parts += [Text(f"  {w}", no_wrap=True, overflow="ellipsis") for w in p.warnings]
    return Group(*parts)


def plain_line(p: Picture, elapsed: float | None = None) -> str:
    """One line for logs: active scans, then each node's state and throughput."""
    parts = [f"zpipe: {elapsed:.0f} s" if elapsed is not None else f"zpipe: {time.strftime('%H:%M:%S')}"]
    for s in shown_scans(p.scans):
        more = f" {_n(s.rate)} msg/s" if s.rate else ""
        more += f" {_clock(s.eta)} left" if s.eta is not None else ""
        parts.append(f"scan {s.scan} {s.status} {_progress(s)}{more}")
    for r in collapse(p.rows, 1):
        gbs = "" if r.rates is None else f" {max(r.rates['bytes_in_s'], r.rates['bytes_out_s']) / 1e9:.2f} GB/s"
        parts.append(f"{r.label.replace(' ', '')} {r.state}{gbs}")
    t = totals(p.rows)
    parts.append(f"errors {t['errors']}" + (f", rejected {t['rejected']}" if t["rejected"] else ""))
    return " | ".join(parts)


def to_json(p: Picture) -> dict[str, Any]:
    """Every replica with its counters and rates, every scan with its status and progress."""
    nodes = []
    for r in p.rows:
        snap = dict(r.snapshot) or {"node": r.node, "replica": r.replica, "role": r.role, "host": r.host}
        snap["state"] = r.state
        snap["rates"] = None if r.rates is None else {k: round(v, 3) for k, v in r.rates.items()}
        nodes.append(snap)
    scans = [{**s.record, "received": s.received, "expected": s.expected,
              "rate": None if s.rate is None else round(s.rate, 3),
              "eta_s": None if s.eta is None else round(s.eta, 1),
              "elapsed_s": None if s.elapsed is None else round(s.elapsed, 3)} for s in p.scans]
    previews = {str(scan): {name: None if g is None else [[None if not np.isfinite(v) else round(float(v), 6)
                                                          for v in row] for row in g]
                            for name, g in names.items()} for scan, names in p.previews.items()}
    return {"time": p.time, "nodes": nodes, "scans": scans, "warnings": p.warnings, "previews": previews}


# -- on screen ---------------------------------------------------------------------------------
class Display:
    """Keeps the picture in front of the user: a rich Live region on a terminal, else a plain line every few seconds."""

    def __init__(self, tracker: Tracker, console: Console, title: str = "", *, live: bool | None = None,
                 every: float = PLAIN_EVERY, lock: threading.Lock | None = None, started: float | None = None):
        self.tracker, self.console, self.title = tracker, console, title
        self.live = console.is_terminal and not console.is_dumb_terminal if live is None else live
        self.every, self.lock = every, lock or threading.Lock()
        self.started = started
        self._live: Live | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def renderable(self) -> RenderableType:
        try:
            return render(self.tracker.picture(), self.title, self.console.width, self.console.height)
        except Exception as exc:  # a drawing bug must never take the run down with it
            return Text(f"zpipe: view failed: {exc!r}")

    def start(self) -> "Display":
        if self.live:
            self._live = Live(get_renderable=self.renderable, console=self.console, refresh_per_second=2,
                              redirect_stdout=True, redirect_stderr=True)  # stray prints and log records go above it
            self._live.start()
        else:
            self._thread = threading.Thread(target=self._plain, name="zpipe-view", daemon=True)
            self._thread.start()
        return self

    def _plain(self) -> None:
        last = None
        while not self._stopped.wait(self.every):
            p = self.tracker.picture()
            elapsed = None if self.started is None else time.monotonic() - self.started
            line = plain_line(p, elapsed)
            news = line.split(" | ", 1)[-1]  # all but the time: an idle pipeline does not fill a log
            if p.rows and news != last:
                last = news
                with self.lock:
                    print(line, file=self.console.file, flush=True)

    def relay(self, line: str) -> bool:
        """Print a node's output line above the live region; False when there is none (print it yourself)."""
        if self._live is None:
            return False
        self.console.print(Text(line), soft_wrap=True)  # above the region while live, plainly after
        return True

    def stop(self) -> None:
        """Idempotent; leaves the last picture on screen."""
        self._stopped.set()
        if self._live is not None and self._live.is_started:
            self._live.refresh()  # the final state (done, failed) is what stays on screen
            self._live.stop()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


def for_runner(kv, topology, host: str, err, lock: threading.Lock, *, exclude=frozenset(),
               live: bool | None = None, replicas: dict[str, list[int]] | None = None) -> Display | None:
    """The view `zpipe run` keeps while it supervises; None when the topology turned status off.
    `replicas`: the ones this runner starts ({node: [replica, ...]}), when not every one of this host's."""
    if topology.status.interval <= 0:
        return None
    tracker = Tracker(order=list(topology.nodes)).attach(kv)
    for name, node in topology.nodes.items():
        if node.host == host and name not in exclude and (replicas is None or name in replicas):
            for i in (range(node.replicas) if replicas is None else replicas[name]):
                tracker.expect(name, i, node.role, host)
    return Display(tracker, Console(file=err), f"{topology.name} · registry {kv.address}", live=live, lock=lock,
                   started=time.monotonic()).start()
