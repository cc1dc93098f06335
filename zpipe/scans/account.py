"""A scan's account: what was expected, sent, received, processed and lost, and the outcome that follows.

The account is added up from what each party published (see zpipe.scans.record): the producers'
flow records (what they planned and sent), the aggregator's (what it received, forwarded,
rejected, could not deliver), and each node group's part (what it accepted, rejected, which items
it processed, complete or not, and what its analyses found). Outcomes, documented in
docs/accounting.md:

* complete: every message the sources planned was sent, received and accepted, every item
  processed by a node group that reported, every analysis succeeded. Items may be incomplete
  only by parts the source itself never had (a detector's own loss), and they are named.
* incomplete: something was lost inside the pipeline (in transit, rejected, undeliverable, with
  a node group that died, or by a timeout), and every lost item or part is named.
* failed: the account itself is partial or an analysis failed: what was lost cannot be named
  (no key range and messages missing; a producer never said what it planned; no node group
  reported), or the scan's account is empty.

`ok` is true for complete only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

OUTCOMES = ("complete", "incomplete", "failed")


class KeySet:
    """The keys of a scan's items seen so far: a bitmap over the announced range (one bit per
    item when packed), and a set for keys outside it."""

    def __init__(self, key_range: tuple[int, int] | None):
        self.first, count = key_range if key_range else (0, 0)
        self.bits = np.zeros(count, dtype=bool)
        self.extra: set[int] = set()

    def add(self, key: int) -> None:
        i = key - self.first
        if 0 <= i < len(self.bits):
            self.bits[i] = True
        else:
            self.extra.add(key)

    def __contains__(self, key: int) -> bool:
        i = key - self.first
        return bool(self.bits[i]) if 0 <= i < len(self.bits) else key in self.extra

    def __len__(self) -> int:
        return int(self.bits.sum()) + len(self.extra)

    def merge(self, other: "KeySet") -> None:
        if len(self.bits) == len(other.bits) and self.first == other.first:
            self.bits |= other.bits
        else:
            for k in other.keys():
                self.add(int(k))
        self.extra |= other.extra

    def keys(self):
        yield from (np.flatnonzero(self.bits) + self.first).tolist()
        yield from self.extra

    def pack(self) -> dict[str, Any]:
        return {"first": self.first, "count": len(self.bits), "bits": np.packbits(self.bits).tobytes(),
                "extra": sorted(self.extra)[:10_000]}

    @classmethod
    def unpack(cls, packed: dict[str, Any]) -> "KeySet":
        ks = cls((int(packed["first"]), int(packed["count"])))
        bits = np.frombuffer(packed["bits"], np.uint8)
        ks.bits = np.unpackbits(bits, count=len(ks.bits)).astype(bool) if len(ks.bits) else ks.bits
        ks.extra = {int(k) for k in packed.get("extra") or ()}
        return ks


def _processed(packed: Any, keys) -> KeySet:
    """A part's bitmap of processed items, if it is over the scan's own key range (else ValueError)."""
    if not isinstance(packed, dict) or not isinstance(packed.get("bits"), (bytes, bytearray)):
        raise ValueError("a part's processed items are not a bitmap")
    first, count = packed.get("first"), packed.get("count")
    if [first, count] != list(keys or [0, 0]) or len(packed["bits"]) != (count + 7) // 8:
        raise ValueError(f"a part's processed items are over {first}+{count}, not the scan's {keys}")
    if len(packed.get("extra") or ()) > 10_000:
        raise ValueError("a part names too many items outside the scan")
    return KeySet.unpack(packed)


def ranges(keys: Iterable[int]) -> list[list[int]]:
    """Sorted keys as [first, last] runs: a lost node group's half a million frames in a few lines."""
    out: list[list[int]] = []
    for k in sorted(keys):
        if out and k == out[-1][1] + 1:
            out[-1][1] = k
        else:
            out.append([k, k])
    return out


def merge_figures(into: dict[str, Any], figures: dict[str, Any]) -> None:
    """Workers' and node groups' figures: numbers add up; anything else (thresholds, an error) keeps the first."""
    for k, v in figures.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v
        elif k not in into and not (v is None or (isinstance(v, (dict, list, str)) and not v)):
            into[k] = v


def _handed_to(producers: dict[int, dict | None], aggregator: dict | None) -> dict[int, int]:
    """Data messages handed to each node group: by the aggregator, or by the producers directly."""
    out: dict[int, int] = {}
    sources = [aggregator.get("forwarded")] if aggregator is not None else [
        (f or {}).get("sent_to") for f in producers.values()]
    for counts in sources:
        for g, n in (counts or {}).items():
            if str(g).isdigit() and isinstance(n, int):
                out[int(g)] = out.get(int(g), 0) + n
    return out


def _add(into: dict[str, int], more: dict | None) -> None:
    for k, v in (more or {}).items():
        if isinstance(v, int):
            into[k] = into.get(k, 0) + v


def total(scan: int, record: dict, producers: dict[int, dict | None], aggregator: dict | None,
          parts: dict[int, dict], gone: dict[str, str], outputs: dict[str, dict]) -> dict[str, Any]:
    """The scan's account from every party's figures.

    `producers`: replica -> its flow record (None if it never published one); `aggregator`: its
    flow record or None (no aggregator, or none published); `parts`: node-group replica -> its
    part, for the node groups counted (the scan's node groups that reported; a node group that
    died is left out, its items are then lost); `gone`: label -> why, for every party that died
    or left before it finished; `outputs`: analysis -> what its writer wrote.
    """
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    keys = meta.get("keys")
    ngs = [g for g in record.get("node_groups") or [] if isinstance(g, int)]
    source = record.get("source") or {}
    reasons: list[str] = []
    rep: dict[str, Any] = {"scan": scan, "node_groups": [], "node_groups_lost": {}, "gone": dict(gone),
                           "analyses": {}, "outputs": {}, "rejected_by": {}, "timed_out": False}

    # -- what the sources planned and sent ------------------------------------------------------
    planned = sent = undeliverable = written = 0
    unknown_plan = []
    first_sent = last_sent = None
    disk: dict[int, KeySet] = {}  # part -> the items whose part went to disk mid-scan
    spilled_to: set[str] = set()
    for r, flow in sorted(producers.items()):
        label = f"{source.get('node', 'producer')}[{r}]"
        if not flow or flow.get("planned") is None:
            unknown_plan.append(label)
            continue
        planned += int(flow["planned"])
        sent += int(flow.get("sent") or 0)
        undeliverable += int(flow.get("undeliverable") or 0)
        written += int(flow.get("written") or 0)
        if isinstance(flow.get("spilled_to"), str):
            spilled_to.add(flow["spilled_to"])
        for p, packed in (flow.get("written_items") or {}).items():
            ks = _processed(packed, keys)
            if int(p) in disk:
                disk[int(p)].merge(ks)
            else:
                disk[int(p)] = ks
        if not flow.get("done"):
            reasons.append(f"{label} stopped before it finished sending ({gone.get(label, 'no final count')})")
        for k, pick in (("first_sent", min), ("last_sent", max)):
            v = flow.get(k)
            if isinstance(v, (int, float)):
                cur = first_sent if k == "first_sent" else last_sent
                val = v if cur is None else pick(cur, v)
                if k == "first_sent":
                    first_sent = val
                else:
                    last_sent = val
    rep.update(expected=planned, sent=sent, written=written)
    if unknown_plan:
        reasons.append(f"no figures for the scan from {', '.join(unknown_plan)} reached the account"
                       + "".join(f" ({label}: {gone[label]})" for label in unknown_plan if label in gone))
    if planned != sent + written:
        reasons.append(f"the sources sent {sent:,}" + (f" and wrote to disk {written:,}" if written else "")
                       + f" of the {planned:,} messages they planned")
    if written:
        spilled = record.get("spilled") if isinstance(record.get("spilled"), dict) else {}
        where = ", ".join(sorted(spilled_to)) or "the producers' fallback"
        rep["on_disk"] = {"directory": where, "messages": written, "manifest": spilled.get("manifest")}
        if sent:  # split: the analyses saw only the streamed part (all of it on disk is a scan on disk)
            reasons.append(f"{written:,} messages of the scan went to disk ({where}): nobody downstream could take "
                           f"them (its node groups left, or the aggregator was gone)")

    # -- the aggregator ----------------------------------------------------------------------------
    relayed_in = None
    if aggregator is not None:
        relayed_in = int(aggregator.get("received") or 0)
        undeliverable += int(aggregator.get("undeliverable") or 0)
        if aggregator.get("rejected"):
            _add(rep["rejected_by"].setdefault("aggregator", {}), aggregator.get("rejected_by"))
        rep["aggregator"] = {k: aggregator.get(k) for k in ("received", "rejected", "forwarded", "undeliverable",
                                                             "rerouted", "done")}
        if not aggregator.get("done"):
            reasons.append(f"the aggregator stopped before it closed the scan ({gone.get('aggregator', 'no final count')})")
    elif record.get("route", {}).get("aggregator") and (sent or unknown_plan):
        # (Nothing sent through it, every message written to disk: its figures have nothing to add.)
        reasons.append("the aggregator never reported on the scan")

    # -- the node groups ---------------------------------------------------------------------------
    received = nbytes = rejected = 0
    sent_to_groups = 0
    complete = incomplete = duplicates = 0
    missing_parts: dict[str, list[int]] = {}
    occurrences: dict[str, int] = {}  # incomplete item -> node groups that processed it
    seen = KeySet(tuple(keys) if keys else None)
    parts_per_item = None
    firsts, processed_at = [], []
    handed = _handed_to(producers, aggregator)  # node group -> data messages sent to it
    rep["handed_to"] = {str(g): n for g, n in sorted(handed.items())}
    for r in ngs:
        part = parts.get(r)
        label = (part or {}).get("label") or f"{(record.get('route') or {}).get('node_group', 'nodegroup')}[{r}]"
        if part is None:
            why = gone.get(label, "it never reported")
            if handed.get(r, 1 if not keys else 0) == 0:
                rep.setdefault("node_groups_idle", {})[label] = f"{why}; nothing of the scan was sent to it"
                continue
            rep["node_groups_lost"][label] = why
            reasons.append(f"{label} is missing from the account ({why}): the {handed.get(r, '?'):,} messages "
                           f"sent to it are lost" if r in handed else f"{label} is missing from the account ({why})")
            continue
        rep["node_groups"].append(label)
        received += int(part.get("received") or 0)
        nbytes += int(part.get("bytes") or 0)
        sent_to_groups += int(part.get("sent") or 0)
        if part.get("rejected"):
            rejected += int(part["rejected"])
            _add(rep["rejected_by"].setdefault(label, {}), part.get("rejected_by"))
        if part.get("timed_out"):
            rep["timed_out"] = True
            reasons.append(f"{label} closed the scan by its timeout, not by its senders' counts")
        for s, why in (part.get("senders_gone") or {}).items():
            reasons.append(f"{label}: sender {s} {why}")
        complete += int(part.get("complete") or 0)
        incomplete += int(part.get("incomplete") or 0)
        for key, lacking in (part.get("missing_parts") or {}).items():
            # An item processed by two node groups (its parts split between them after a reroute)
            # lacks only the parts neither had.
            missing_parts[key] = sorted(set(missing_parts[key]) & set(lacking)) if key in missing_parts else lacking
            occurrences[key] = occurrences.get(key, 0) + 1
        parts_per_item = parts_per_item or part.get("parts_per_item")
        if part.get("processed"):
            ks = _processed(part["processed"], keys)
            before = len(seen)
            seen.merge(ks)
            duplicates += len(ks) - (len(seen) - before)
        if part.get("first_received"):
            firsts.append(part["first_received"])
        if part.get("processed_at"):
            processed_at.append(part["processed_at"])
        for name, a in (part.get("analyses") or {}).items():
            mine = rep["analyses"].setdefault(name, {})
            if a.get("failed"):
                mine.setdefault("failed", []).append({**a["failed"], "node_group": label})
            merge_figures(mine, a.get("figures") or {})
        if part.get("flow"):
            rep.setdefault("flow", {})[label] = part["flow"]
        if part.get("late"):
            rep.setdefault("late", {})[label] = part["late"]
            reasons.append(f"{label} turned away {sum(part['late'].values()):,} messages of the scan after closing it")
    rep.update(received=received, bytes=nbytes, rejected=rejected + int((aggregator or {}).get("rejected") or 0),
               undeliverable=undeliverable, complete=complete, incomplete=incomplete)
    if rep["rejected"]:
        reasons.append(f"{rep['rejected']:,} messages of the scan were rejected")
    if undeliverable:
        reasons.append(f"{undeliverable:,} messages could not be delivered (no node group of the scan was alive)")

    # Lost in transit: handed to the next hop but never there (a peer that died with them queued).
    lost_transit = 0
    if relayed_in is not None:
        lost_transit += max(0, sent - relayed_in - int(aggregator.get("rejected") or 0))
        forwarded = aggregator.get("forwarded") or {}
        for r in ngs:
            if r in parts:
                continue
            lost_transit += int(forwarded.get(str(r), 0))
        counted = sum(int(forwarded.get(str(r), 0)) for r in ngs if r in parts)
        lost_transit += max(0, counted - received - rejected)
    else:
        lost_transit += max(0, sent - received - rejected)
    rep["lost_in_transit"] = lost_transit
    if lost_transit:
        reasons.append(f"{lost_transit:,} messages were lost in transit (queued to a peer that died or left)")

    # -- items -------------------------------------------------------------------------------------
    split = [k for k, n in occurrences.items() if n > 1]  # parts split between node groups by a reroute
    if split:
        rep["split_items"] = sorted(int(k) for k in split)
        incomplete -= sum(occurrences[k] - 1 for k in split)
        duplicates -= sum(occurrences[k] - 1 for k in split)
        rep["incomplete"] = incomplete
        reasons.append(f"{len(split):,} items had their parts split between node groups (each part processed, "
                       f"never the whole item)")
    if disk:  # parts an item lacks in the node groups but that went to disk are not missing
        with_disk = 0
        for k, lacking in list(missing_parts.items()):
            kept = [p for p in lacking if not (p in disk and int(k) in disk[p])]
            with_disk += len(kept) < len(lacking)
            missing_parts[k] = kept
        rep["items_split_with_disk"] = with_disk
    missing_parts = {k: v for k, v in missing_parts.items() if v}
    rep["missing_parts"] = dict(sorted(missing_parts.items(), key=lambda kv: int(kv[0])))
    parts_missing = sum(len(v) for v in missing_parts.values())
    parts_per_item = parts_per_item or meta.get("parts_per_item")  # from the source, if no node group said
    if keys:
        first, count = keys
        never = ~seen.bits  # items no node group processed
        on_disk = np.zeros(count, dtype=np.int64)  # parts of each item written to disk
        for ks in disk.values():
            on_disk += ks.bits
        missing = np.flatnonzero(never & (on_disk == 0)) + first
        disk_only = never & (on_disk > 0)
        rep["items"] = {"expected": count, "processed": int(seen.bits.sum()), "complete": complete,
                        "incomplete": incomplete, "missing": len(missing), "duplicates": duplicates,
                        "outside_range": len(seen.extra)}
        if disk:
            rep["items"]["on_disk"] = int(disk_only.sum())
            rep["on_disk"]["item_ranges"] = ranges((np.flatnonzero(disk_only) + first).tolist())[:10_000]
        rep["missing_items"] = missing.tolist() if len(missing) <= 100_000 else []
        rep["missing_item_ranges"] = ranges(missing.tolist())
        if len(missing):
            reasons.append(f"{len(missing):,} of {count:,} items were never processed (lost before any part "
                           f"reached a node group that reported)")
        if duplicates:
            reasons.append(f"{duplicates:,} whole items were processed by more than one node group")
        if parts_per_item:
            parts_missing += len(missing) * parts_per_item
            # Items no node group processed, some of whose parts went to disk: the others are lost
            # (in transit, with a peer that died), each named on its item.
            short = np.flatnonzero(disk_only & (on_disk < parts_per_item))
            for i in short.tolist()[:100_000]:
                k = i + first
                rep["missing_parts"][str(k)] = [p for p in range(parts_per_item)
                                                if not (p in disk and disk[p].bits[i])]
            parts_missing += int((parts_per_item - on_disk[short]).sum())
            if len(short):
                rep["missing_parts"] = dict(sorted(rep["missing_parts"].items(), key=lambda kv: int(kv[0])))
            # Parts the sources never had: the scan's parts less those the producers planned to send.
            rep["parts_lost_upstream"] = max(0, count * parts_per_item - planned) if not unknown_plan else None
            if rep["parts_lost_upstream"] is not None and parts_missing > rep["parts_lost_upstream"]:
                reasons.append(f"{parts_missing - rep['parts_lost_upstream']:,} parts are missing beyond those "
                               f"the sources never had")
    else:
        rep["items"] = {"expected": None, "processed": None, "complete": complete, "incomplete": incomplete}
        rep["missing_items"], rep["missing_item_ranges"] = [], []
    rep["lost_parts"] = parts_missing

    # -- analyses and outputs ---------------------------------------------------------------------
    for name, a in rep["analyses"].items():
        for f in a.get("failed", []):
            reasons.append(f"analysis {name!r} failed in {f.get('hook')} on {f.get('node_group')}: {f.get('error')}")
    writers = {n for p in parts.values() for n, a in (p.get("analyses") or {}).items() if a.get("writes")}
    for name in sorted(writers):
        out = outputs.get(name)
        if out and isinstance(out.get("positions"), int):  # per-position buffers: which positions arrived
            a = rep["analyses"].setdefault(name, {})
            a["positions"], a["positions_received"] = out["positions"], out.get("positions_received")
            a["positions_missing"] = out.get("positions_missing") or []
        if out and out.get("path"):
            rep["outputs"][name] = out["path"]
            lacking = [r for r in parts if r not in (out.get("node_groups") or [])]
            if lacking:
                reasons.append(f"analysis {name!r}: its output lacks the results of node groups {lacking}")
                rep.setdefault("outputs_partial", {})[name] = lacking
        elif out and out.get("error"):
            reasons.append(f"analysis {name!r}: its output could not be written: {out['error']}")
            rep["analyses"].setdefault(name, {}).setdefault("failed", []).append(
                {"hook": "write", "scan": scan, "error": out["error"], "node_group": f"writer {out.get('writer')}"})
        elif out is None or not out.get("empty"):
            reasons.append(f"analysis {name!r}: no output was written")

    # -- times -------------------------------------------------------------------------------------
    if record.get("started"):
        end = max(processed_at) if processed_at else None
        rep["seconds"] = (end - record["started"]) if end else None
    first = first_sent or (min(firsts) if firsts else None)
    if first and processed_at:
        rep["streaming_seconds"] = max(processed_at) - first
    rep["first_received"] = min(firsts) if firsts else None
    rep["processed"] = max(processed_at) if processed_at else None

    rep["outcome"], rep["reasons"] = outcome(rep, reasons, keys_known=bool(keys), unknown_plan=bool(unknown_plan),
                                             any_part=bool(rep["node_groups"]))
    rep["ok"] = rep["outcome"] == "complete"
    return rep


def outcome(rep: dict, reasons: list[str], *, keys_known: bool, unknown_plan: bool, any_part: bool):
    """(outcome, reasons): complete only when nothing is wrong; failed when the loss cannot be named."""
    failed = []
    if rep["gone"].get("account"):
        failed.append(f"the account is partial: {rep['gone']['account']}")
    if not any_part and not keys_known:
        failed.append("no node group of the scan reported: nothing is known of what arrived")
    if unknown_plan and not keys_known:
        failed.append("some source never said what it would send, and the source gave no key range: "
                      "what was lost cannot be named")
    if rep["expected"] == 0 and not rep["received"]:
        failed.append("the account is empty: nothing was expected and nothing arrived")
    if any(a.get("failed") for a in rep["analyses"].values()):
        failed.append("an analysis failed")
    lost_messages = rep["expected"] - rep["received"]
    if not keys_known and (lost_messages or rep["node_groups_lost"]):
        failed.append("messages were lost and the source gave no key range to name the items they carried")
    if failed:
        return "failed", failed + reasons
    if reasons:
        return "incomplete", reasons
    return "complete", []


def summary_line(rep: dict) -> str:
    scan = rep.get("scan")
    took = f" in {rep['seconds']:.2f} s" if isinstance(rep.get("seconds"), (int, float)) else ""
    streamed = rep.get("streaming_seconds")
    if streamed and rep.get("bytes") and streamed > 0:
        gb = rep["bytes"] / 1e9
        took += f" (streamed {gb:.2f} GB in {streamed:.2f} s, {gb / streamed:.2f} GB/s)"
    items = rep.get("items") or {}
    parts = [f"scan {scan} {rep.get('outcome', '?')}{took}: expected {rep.get('expected', 0):,}, "
             f"received {rep.get('received', 0):,}",
             f"{rep.get('complete', 0):,} complete + {rep.get('incomplete', 0):,} incomplete items"]
    lost = rep.get("lost_parts", 0)
    if rep.get("missing_parts"):
        shown = ", ".join(f"{k}:{v}" for k, v in list(rep["missing_parts"].items())[:5])
        more = " ..." if len(rep["missing_parts"]) > 5 else ""
        parts.append(f"{lost:,} missing parts ({shown}{more})")
    if items.get("missing"):
        parts.append(f"{items['missing']:,} items missing entirely")
    if rep.get("written"):
        parts.append(f"{rep['written']:,} written to disk ({(rep.get('on_disk') or {}).get('directory', '?')})")
    for f in ("rejected", "undeliverable", "lost_in_transit"):
        if rep.get(f):
            parts.append(f"{rep[f]:,} {f.replace('_', ' ')}")
    if rep.get("node_groups_lost"):
        parts.append("lost node groups: " + ", ".join(rep["node_groups_lost"]))
    if rep.get("timed_out"):
        parts.append("ended by timeout")
    if rep.get("outcome") == "failed" and rep.get("reasons"):
        parts.append(f"FAILED: {rep['reasons'][0]}")
    return "; ".join(parts)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def to_disk_why(fb: dict) -> str:
    """Why a scan went to disk, in the account's words."""
    why = fb.get("why")
    return "no node group" if why in (None, "no node group is registered") else str(why)


def on_disk(scan: int, record: dict, producers: dict[int, dict | None]) -> dict[str, Any]:
    """The account of a scan that went to disk (no node group was there): what each producer wrote."""
    fb = record.get("fallback") if isinstance(record.get("fallback"), dict) else {}
    planned = sum(int((f or {}).get("planned") or 0) for f in producers.values())
    written = sum(int((f or {}).get("sent") or 0) for f in producers.values())
    reasons = []
    missing = [r for r, f in producers.items() if not (f and f.get("done"))]
    if missing:
        reasons.append(f"producers {missing} never said their files were final")
    if fb.get("threads") is not None and fb.get("of") is not None and fb["threads"] < fb["of"]:
        reasons.append(f"only {fb['threads']} of {fb['of']} producer threads closed their files")
    if fb.get("error"):
        reasons.append(f"the files' index could not be finished: {str(fb['error'])[:200]}")
    unmade = [r for r, f in producers.items() if f and f.get("planned") is None]
    for r in unmade:
        reasons.append(f"producer {r} could not make the scan: {str(producers[r].get('error') or '?')[:200]}")
    outcome = ("failed" if unmade or fb.get("error") else
               "complete" if not reasons and written == planned else "incomplete")
    return {"scan": scan, "outcome": outcome, "ok": outcome == "complete", "reasons": reasons,
            "expected": planned, "written": written, "received": 0, "complete": 0, "incomplete": 0,
            "on_disk": fb, "node_groups": [], "analyses": {}, "missing_parts": {}, "missing_items": [],
            "lost_parts": 0, "summary": f"scan {scan}: {to_disk_why(fb)}; {written:,} of {planned:,} "
                                        f"messages written "
                                        f"to disk as {fb.get('files', '?')} files in {fb.get('directory')} "
                                        f"(manifest {fb.get('manifest', '?')})"}
