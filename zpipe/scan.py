"""A scan's record in the key-value store and its account: what was expected, received, processed, missing.

`scans/{id}` holds the record: status (announced, streaming, fallback, processing, writing,
done, failed), the node groups fixed for the scan when it was announced, and the source's
metadata. Each node group adds `scans/{id}/report/{replica}`; the first node group of the
scan adds them up into `scans/{id}/report` and a JSON file next to the scan's output.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from zpipe.kv import KVClient


def key(scan: int) -> str:
    return f"scans/{scan}"


_written: dict[tuple[int, str], dict] = {}  # (client, key) -> fields this process wrote


def update(kv: KVClient, scan: int, **fields) -> dict:
    """Merge `fields` into the scan record.

    The store shows our own writes only once the server has echoed them, so a second
    update right after a first would read the record without them and wipe them out:
    the fields this process wrote are kept here and merged over what the store shows.
    One party writes each phase's fields (producers, then node groups), so ours win.
    """
    mine = _written.setdefault((id(kv), key(scan)), {})
    mine.update(fields, updated=time.time())
    rec = {"scan": scan, **(kv.get(key(scan)) or {}), **mine}
    kv.set(key(scan), rec)
    return rec


def wait_record(kv: KVClient, scan: int, timeout: float) -> dict:
    try:
        return kv.wait(lambda items: key(scan) in items, prefix=key(scan), timeout=timeout)[key(scan)]
    except TimeoutError:
        raise TimeoutError(f"scan {scan}: no record at {key(scan)} after {timeout:.0f} s "
                           f"(the first producer announces it)") from None


def empty_report(node_group: str = "") -> dict[str, Any]:
    return {"node_group": node_group, "expected": 0, "received": 0, "bytes": 0, "rejected": 0, "complete": 0,
            "incomplete": 0, "missing_parts": {}, "missing_items": [], "undeliverable": 0,
            "timed_out": False, "analyses": {}}


def merge_figures(into: dict[str, Any], figures: dict[str, Any]) -> None:
    """Workers' and node groups' figures: numbers add up; anything else (thresholds, an error) keeps the first."""
    for k, v in figures.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v
        elif k not in into and v not in (None, {}, [], ""):
            into[k] = v


def add_reports(reports: list[dict]) -> dict[str, Any]:
    """The scan's total: counts add up, missing parts and items merge, analysis figures add up."""
    total = empty_report("total")
    total["node_groups"] = [r.get("node_group", "") for r in reports]
    for r in reports:
        for f in ("expected", "received", "rejected", "complete", "incomplete", "undeliverable", "bytes"):
            total[f] += r.get(f, 0)
        for f, pick in (("first_received", min), ("processed", max)):  # wall-clock times
            if r.get(f) is not None:
                total[f] = pick(total[f], r[f]) if total.get(f) is not None else r[f]
        total["timed_out"] |= bool(r.get("timed_out"))
        if r.get("flow"):  # per node group: how often flow control held a sector back
            total.setdefault("flow", {})[r.get("node_group", "")] = r["flow"]
        total["missing_parts"].update(r.get("missing_parts", {}))
        total["missing_items"].extend(r.get("missing_items", []))
        for name, figures in r.get("analyses", {}).items():
            merge_figures(total["analyses"].setdefault(name, {}), figures)
    total["missing_items"].sort()
    total["missing_parts"] = dict(sorted(total["missing_parts"].items(), key=lambda kv: int(kv[0])))
    total["lost_parts"] = sum(len(v) for v in total["missing_parts"].values())
    total["ok"] = (total["expected"] == total["received"] and not total["incomplete"]
                   and not total["missing_items"] and not total["rejected"] and not total["undeliverable"])
    return total


def write_json(path: str, data: dict) -> str:
    """Atomically: a reader never sees half a report."""
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def summary_line(scan: int, total: dict, seconds: float | None = None) -> str:
    lost = total.get("lost_parts", 0)
    took = f" in {seconds:.2f} s" if seconds is not None else ""
    streamed = total.get("streaming_seconds")
    if streamed and total.get("bytes"):
        took += f" (streamed {total['bytes'] / 1e9:.2f} GB in {streamed:.2f} s, {total['bytes'] / 1e9 / streamed:.2f} GB/s)"
    parts = [f"scan {scan}{took}: expected {total['expected']:,}, received {total['received']:,}",
             f"{total['complete']:,} complete + {total['incomplete']:,} incomplete items"]
    if lost:
        shown = ", ".join(f"{k}:{v}" for k, v in list(total["missing_parts"].items())[:5])
        more = " ..." if len(total["missing_parts"]) > 5 else ""
        parts.append(f"{lost} missing parts ({shown}{more})")
    if total["missing_items"]:
        parts.append(f"{len(total['missing_items'])} items missing entirely")
    if total["rejected"]:
        parts.append(f"{total['rejected']} rejected")
    if total["undeliverable"]:
        parts.append(f"{total['undeliverable']} undeliverable")
    if total["timed_out"]:
        parts.append("ended by timeout")
    return "; ".join(parts)
