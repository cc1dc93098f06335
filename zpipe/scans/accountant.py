"""The accountant: closes every scan's account from what its parties published, whoever of them died.

It runs beside the registry server (in `zpipe run` on the registry's host, or `zpipe kv`), the
one process every party talks to and that outlives a node's death. It watches the scan records,
the producers' and the aggregator's flow records, the node groups' parts and who is alive (see
zpipe.roster). A scan's account is closed once every party of it has either published its final
figures or is gone; it is written to `scans/{id}/report`, summed up in the record, and (with an
output directory) written as `scan_{id}_report.json`. A part that changes afterwards (a node
group turning away late messages of the scan) reopens it: the account is written again with the
next revision, never left saying less than is known.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from zpipe.kv import KVClient
from zpipe.roster import Roster
from zpipe.scans import account, messages, record

log = logging.getLogger("zpipe.accountant")
SUBTREES = ("scans/", "flow/", "nodes/")
TICK = 0.2
MAX_PARTIES = 4096  # producer replicas, node groups: what a record may name
ON_DISK_WAIT = 15.0  # s after a scan's files were made final that a producer's figures are waited for
UNSEEN_GRACE = 10.0  # s after every sender finished: a live node group with no part never saw the scan


class Accountant(threading.Thread):
    def __init__(self, address: str, output_dir: str | None = None, *, name: str = "accountant", curve=None):
        super().__init__(name=name, daemon=True)
        self.kv = KVClient(address, SUBTREES, name=name, curve=curve)
        self.output_dir = output_dir
        self.roster: Roster | None = None
        self.stopped = threading.Event()
        self.closed: dict[int, tuple] = {}  # scan -> fingerprint of the inputs its account was made from
        self.revisions: dict[int, int] = {}
        self.reports: dict[int, dict] = {}  # scan -> its latest account, for the process that runs us
        self._senders_done: dict[int, float] = {}
        self._dirty: set[int] = set()
        self._pipes: dict[int, str | None] = {}  # scan -> the pipeline its record is of
        self._lock = threading.Lock()

    def start(self) -> "Accountant":
        self.kv.start()
        self.kv.on_change(self._on_change)
        self.roster = Roster(self.kv)
        super().start()
        return self

    def run(self) -> None:
        while not self.stopped.wait(TICK):
            try:
                self.sweep()
            except Exception:  # the account must outlive a bad record: log it and go on
                log.exception("accountant: a sweep failed")

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=5)
        self.kv.close()

    # -- closing accounts --------------------------------------------------------------------------
    def _on_change(self, key: str, _value) -> None:
        """Note which scans' figures changed, so a sweep looks only at those (and the ones still open)."""
        parts = key.split("/")
        if len(parts) >= 2 and parts[0] == "scans" and parts[1].isdigit():
            self._dirty.add(int(parts[1]))
        elif len(parts) == 4 and parts[0] == "flow" and parts[3].isdigit():
            self._dirty.add(int(parts[3]))

    def sweep(self, final: str | None = None) -> list[int]:
        """Close every scan whose parties are all done or gone (all of them, with `final` set: the run ends).

        Anyone can write to the registry: a scan whose record or figures are of the wrong shape gets
        a failed account saying so, and never stops the others'."""
        closed = []
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            items = self.kv.items(record.PREFIX)
            flows = self.kv.items("flow/")
            for k, rec in items.items():
                scan = record.scan_of(k)
                if scan is None or (scan in self.closed and scan not in dirty and final is None):
                    continue
                try:
                    if self._sweep_one(scan, rec, items, flows, final):
                        closed.append(scan)
                except Exception as exc:  # a record of the wrong shape (written by anyone): that scan fails
                    if self.closed.get(scan) == ("malformed",):
                        continue
                    log.warning("accountant: scan %d: its record or figures are malformed: %s", scan, exc)
                    self._close_malformed(scan, rec, exc)
                    closed.append(scan)
        return closed

    def _sweep_one(self, scan: int, rec, items: dict, flows: dict, final: str | None) -> bool:
        if not isinstance(rec, dict):
            raise ValueError(f"the record is a {type(rec).__name__}")
        pipe = rec.get("pipe")
        if self._pipes.get(scan, pipe) != pipe:  # the same number in a new pipeline: a new scan
            self.closed.pop(scan, None)
            self.revisions.pop(scan, None)
            self._senders_done.pop(scan, None)
        self._pipes[scan] = pipe
        if rec.get("fallback"):
            if rec.get("status") == "done" and scan not in self.closed and (
                    final is not None or self._producers_through(scan, rec, flows)):
                self._close_on_disk(scan, rec, flows)
                return True
            return False
        if not rec.get("node_groups"):
            return False
        inputs = self._inputs(scan, rec, items, flows)
        if inputs is None and final is None:
            return False
        if inputs is None:
            inputs = self._inputs(scan, rec, items, flows, force=final)
        fingerprint = _fingerprint(inputs)
        if self.closed.get(scan) == fingerprint:
            return False
        self._close(scan, rec, inputs, fingerprint)
        return True

    def _close_malformed(self, scan: int, rec, exc: Exception) -> None:
        rep = {"scan": scan, "outcome": "failed", "ok": False, "expected": 0, "received": 0, "complete": 0,
               "incomplete": 0, "reasons": [f"the scan's record or figures in the registry are malformed: {exc}"],
               "revision": self.revisions.get(scan, 0) + 1, "closed_at": time.time()}
        self.revisions[scan] = rep["revision"]
        try:
            self._write(scan, rep, rec.get("pipe") if isinstance(rec, dict) else None)
        except Exception:
            log.exception("accountant: scan %d: not even a failed account could be written", scan)
        self.closed[scan] = ("malformed",)

    def _inputs(self, scan: int, rec: dict, items: dict, flows: dict, force: str | None = None):
        """Every party's figures for the scan, or None while a live party has not finished."""
        source = rec.get("source") if isinstance(rec.get("source"), dict) else {}
        route = rec.get("route") if isinstance(rec.get("route"), dict) else {}
        pnode, preps = source.get("node", "producer"), source.get("replicas") or 0
        if type(preps) is not int or not 0 <= preps <= MAX_PARTIES or not isinstance(pnode, str):
            raise ValueError(f"source {messages.brief(pnode)} with {messages.brief(preps)} replicas")
        messages.node_groups(rec.get("node_groups"))
        agg, ng_node = route.get("aggregator"), route.get("node_group", "nodegroup")
        gone: dict[str, str] = {}
        waiting = False
        producers: dict[int, dict | None] = {}

        def ours(value):  # figures of this scan's pipeline only (the same scan number may be an old run's)
            return value if isinstance(value, dict) and value.get("pipe") == rec.get("pipe") else None
        for r in range(preps):
            flow = ours(flows.get(f"flow/{pnode}/{r}/{scan}"))
            producers[r] = flow if isinstance(flow, dict) else None
            if not (flow and flow.get("done")):
                if self.roster.gone(pnode, r):
                    gone[f"{pnode}[{r}]"] = self.roster.why(pnode, r)
                else:
                    waiting = True
        agg_flow = None
        if agg:
            agg_flow = ours(flows.get(f"flow/{agg}/0/{scan}"))
            agg_flow = agg_flow if isinstance(agg_flow, dict) else None
            if not (agg_flow and agg_flow.get("done")):
                if self.roster.gone(agg, 0):
                    gone["aggregator"] = gone[f"{agg}[0]"] = self.roster.why(agg, 0)
                else:
                    waiting = True
        senders_finished = not waiting
        now = time.monotonic()
        if senders_finished:
            self._senders_done.setdefault(scan, now)
        parts: dict[int, dict] = {}
        lost_parts: list[str] = []  # node groups that closed the scan but whose part is nowhere to be read
        for r in rec.get("node_groups") or []:
            if not isinstance(r, int):
                continue
            part = ours(items.get(record.part_key(scan, r)))
            label = f"{ng_node}[{r}]"
            if not (isinstance(part, dict) and part.get("final")) and self.output_dir:
                kept = record.read_part(self.output_dir, scan, label)  # what it wrote on its disk (same host)
                if kept and kept.get("final") and kept.get("pipe") == rec.get("pipe"):
                    part = {**kept, "from_file": True}
            if isinstance(part, dict) and part.get("final"):
                parts[r] = part
            elif self.roster.gone(ng_node, r):
                end = flows.get(f"flow/{ng_node}/{r}/end")
                if isinstance(end, dict) and end.get("pipe") == rec.get("pipe") and scan in (end.get("scans") or ()):
                    gone[label] = "ended cleanly after closing the scan, but its part of the account is lost"
                    lost_parts.append(label)
                else:
                    gone[label] = self.roster.why(ng_node, r)
                if isinstance(part, dict):
                    gone[label] += f" after accepting {part.get('received', 0):,} messages of the scan"
            elif part is None and senders_finished and now - self._senders_done[scan] > UNSEEN_GRACE:
                gone[label] = "never heard of the scan"
            else:
                waiting = True
        if waiting and force is None:
            return None
        if force is not None:
            for r in range(preps):
                if not (producers[r] and producers[r].get("done")):
                    gone.setdefault(f"{pnode}[{r}]", force)
            for r in rec.get("node_groups") or []:
                if isinstance(r, int) and r not in parts:
                    gone.setdefault(f"{ng_node}[{r}]", force)
        outputs = {k.rsplit("/", 1)[1]: v for k, v in items.items()
                   if k.startswith(f"{record.PREFIX}{scan}/output/") and ours(v)}
        if lost_parts:
            gone["account"] = f"the parts of {', '.join(lost_parts)} are lost (the registry restarted?)"
        return producers, agg_flow, parts, gone, outputs

    def _close(self, scan: int, rec: dict, inputs, fingerprint) -> None:
        producers, agg_flow, parts, gone, outputs = inputs
        try:
            rep = account.total(scan, rec, producers, agg_flow, parts, gone, outputs)
        except Exception as exc:  # malformed figures: still an account, and a failed one
            log.exception("accountant: scan %d: the figures do not add up", scan)
            rep = {"scan": scan, "outcome": "failed", "ok": False, "expected": 0, "received": 0,
                   "complete": 0, "incomplete": 0, "reasons": [f"the account could not be added up: {exc}"]}
        revision = self.revisions.get(scan, 0) + 1
        self.revisions[scan] = revision
        rep["revision"] = revision
        rep["closed_at"] = time.time()
        if revision > 1:
            log.warning("scan %d: account revised (%d): %s", scan, revision, rep.get("outcome"))
        self._write(scan, rep, rec.get("pipe"))
        self.closed[scan] = fingerprint

    def _write(self, scan: int, rep: dict, pipe: str | None) -> None:
        """The account into the registry, the report file and the record's summary (and our own list)."""
        rep = record.plain(rep)
        path = None
        if self.output_dir:
            try:
                os.makedirs(self.output_dir, exist_ok=True)
                path = record.write_json(os.path.join(self.output_dir, f"scan_{scan}_report.json"), rep)
            except OSError as exc:
                log.error("scan %d: could not write its report in %s: %s", scan, self.output_dir, exc)
        rep["report_file"] = path
        self.kv.set(record.report_key(scan), rep)
        summary = rep.get("summary") or (account.summary_line(rep) + "".join(
            f"; {name} wrote {out}" for name, out in (rep.get("outputs") or {}).items()))
        fields = {"summary": summary} if rep.get("on_disk") else {"status": "done", "summary": summary}
        record.update(self.kv, scan, pipe=pipe, outcome=rep["outcome"], ok=rep["ok"], report_file=path,
                      revision=rep.get("revision"), expected=rep.get("expected"), received=rep.get("received"),
                      complete=rep.get("complete"), incomplete=rep.get("incomplete"), lost_parts=rep.get("lost_parts"),
                      outputs=rep.get("outputs"), finished=time.time(), **fields)
        self.reports[scan] = {**rep, "summary": summary}
        while len(self.reports) > 4096:  # a long service: the runner prints its own run's, these are a cache
            self.reports.pop(next(iter(self.reports)))
        log.info("%s", summary)

    def _producers_through(self, scan: int, rec: dict, flows: dict) -> bool:
        """Every producer of a scan on disk has published its final figures, or is gone, or it is
        ON_DISK_WAIT seconds since the scan's files were made final."""
        source = rec.get("source") if isinstance(rec.get("source"), dict) else {}
        pnode, preps = source.get("node", "producer"), source.get("replicas")
        if type(preps) is not int or not 0 <= preps <= MAX_PARTIES or not isinstance(pnode, str):
            return True  # _close_on_disk says what is wrong with it
        finished = rec.get("finished")
        if isinstance(finished, (int, float)) and time.time() - finished > ON_DISK_WAIT:
            return True
        for r in range(preps):
            f = flows.get(f"flow/{pnode}/{r}/{scan}")
            if not (isinstance(f, dict) and f.get("done")) and not self.roster.gone(pnode, r):
                return False
        return True

    def _close_on_disk(self, scan: int, rec: dict, flows: dict) -> None:
        source = rec.get("source") if isinstance(rec.get("source"), dict) else {}
        pnode, preps = source.get("node", "producer"), source.get("replicas") or 0
        if type(preps) is not int or not 0 <= preps <= MAX_PARTIES:
            raise ValueError(f"{messages.brief(preps)} producer replicas")
        producers = {r: flows.get(f"flow/{pnode}/{r}/{scan}") for r in range(preps)}
        rep = account.on_disk(scan, rec, {r: f if isinstance(f, dict) else None for r, f in producers.items()})
        rep["revision"], rep["closed_at"] = 1, time.time()
        self._write(scan, rep, rec.get("pipe"))
        self.closed[scan] = ("on disk",)

    def finish(self, why: str, timeout: float = 0.0) -> None:
        """The run ends: close what is still open with what is known (those scans fail), then flush."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._open():
            time.sleep(TICK)
        self.sweep(final=why)

    def _open(self) -> list[int]:
        items = self.kv.items(record.PREFIX)
        out = []
        for k, rec in items.items():
            scan = record.scan_of(k)
            if scan is not None and isinstance(rec, dict) and not rec.get("fallback") and rec.get("node_groups") \
                    and scan not in self.closed:
                out.append(scan)
        return out


def _fingerprint(inputs) -> tuple:
    producers, agg_flow, parts, gone, outputs = inputs

    def rev(d: Any) -> Any:
        return (d.get("revision"), d.get("updated"), d.get("done"), d.get("final")) if isinstance(d, dict) else None

    return (tuple((r, rev(f)) for r, f in sorted(producers.items())), rev(agg_flow),
            tuple((r, rev(p)) for r, p in sorted(parts.items())), tuple(sorted(gone.items())),
            tuple((n, rev(o)) for n, o in sorted(outputs.items())))


LOST = "the registry lost the scan's account; this one is made from the parties' own files"


def from_files(output_dir: str, scan: int, pipe: str, note: str = LOST) -> dict | None:
    """The scan's account made from the files its parties kept in `output_dir` (zpipe.scans.record.write_part):
    for when the registry lost it. Its outcome is failed unless every party's figures are there."""
    rec = record.read_part(output_dir, scan, "record")
    if not rec or rec.get("pipe") != pipe:
        return None
    source = rec.get("source") if isinstance(rec.get("source"), dict) else {}
    route = rec.get("route") if isinstance(rec.get("route"), dict) else {}
    pnode, agg, ng = source.get("node", "producer"), route.get("aggregator"), route.get("node_group", "nodegroup")
    missing: list[str] = []

    def read(label: str, final: str) -> dict | None:
        value = record.read_part(output_dir, scan, label)
        if not value or value.get("pipe") != pipe or not value.get(final):
            missing.append(label)
            return None
        return value

    producers = {r: read(f"{pnode}[{r}]", "done") for r in range(int(source.get("replicas") or 0))}
    agg_flow = read(f"{agg}[0]", "done") if agg else None
    parts = {r: p for r in rec.get("node_groups") or [] if (p := read(f"{ng}[{r}]", "final")) is not None}
    outputs = {}
    for path in (Path(output_dir) / record.PARTS_DIR).glob(f"scan_{scan}.output.*.msgpack"):
        name = path.name[len(f"scan_{scan}.output."):-len(".msgpack")]
        value = record.read_part(output_dir, scan, f"output.{name}")
        if value:
            outputs[name] = value
    gone = {label: "its figures are not on this host" for label in missing}
    rep = account.total(scan, rec, producers, agg_flow, parts, gone, outputs)
    if missing:
        rep["outcome"], rep["ok"] = "failed", False
        rep["reasons"] = [f"{note}, and those of {', '.join(missing)} are not on this host", *rep["reasons"]]
    else:
        rep["reasons"] = [*rep["reasons"], note]
    rep["from_files"] = output_dir
    rep["missing_parties"] = missing
    return rep


def scans_on_disk(output_dir: str, pipe: str) -> list[int]:
    """Scans of pipeline `pipe` whose record was kept in `output_dir`."""
    found = []
    for path in (Path(output_dir) / record.PARTS_DIR).glob("scan_*.record.msgpack"):
        scan = path.name[len("scan_"):-len(".record.msgpack")]
        if scan.isdigit() and (rec := record.read_part(output_dir, int(scan), "record")) and rec.get("pipe") == pipe:
            found.append(int(scan))
    return sorted(found)
