"""A scan's record in the key-value store, and the keys of everything else kept about a scan.

`scans/{id}` holds the record: status (announced, streaming, fallback, processing, writing,
done), the node groups fixed for the scan when it was announced, the source's metadata, who
takes part (`source`: the producer node and its replicas; `route`: the aggregator, if any, and
the node-group node), and once the account is closed its outcome and summary.
`scans/{id}/part/{replica}` is each node group's part of the account, published as the scan
goes and finally when the node group closes it; `scans/{id}/report` is the whole account (see
zpipe.scans.account), and `scans/{id}/output/{analysis}` what a writer wrote.
"""

from __future__ import annotations

import json
import os
import time

import msgpack

from zpipe.kv import KVClient

PREFIX = "scans/"


def key(scan: int) -> str:
    return f"{PREFIX}{scan}"


def part_key(scan: int, replica: int) -> str:
    return f"{PREFIX}{scan}/part/{replica}"


def report_key(scan: int) -> str:
    return f"{PREFIX}{scan}/report"


def output_key(scan: int, analysis: str) -> str:
    return f"{PREFIX}{scan}/output/{analysis}"


def scan_of(k: str) -> int | None:
    """The scan number of `scans/{id}` (the record itself), else None."""
    rest = k[len(PREFIX):] if k.startswith(PREFIX) else ""
    return int(rest) if rest.isdigit() else None


_written: dict[tuple[int, str], dict] = {}  # (client, key) -> fields this process wrote


def update(kv: KVClient, scan: int, **fields) -> dict:
    """Merge `fields` into the scan record.

    The store shows our own writes only once the server has echoed them, so a second
    update right after a first would read the record without them and wipe them out:
    the fields this process wrote are kept here and merged over what the store shows.
    One party writes each phase's fields (producers, then the accountant), so ours win.
    """
    mine = _written.setdefault((id(kv), key(scan)), {})
    if "pipe" in fields and mine.get("pipe") not in (None, fields["pipe"]):
        mine.clear()  # a new pipeline's scan of the same number: nothing of the old one carries over
    mine.update(fields, updated=time.time())
    while len(_written) > 4096:  # a long run's oldest scans: their records are final
        _written.pop(next(iter(_written)))
    current = kv.get(key(scan))
    if not isinstance(current, dict) or current.get("pipe") != mine.get("pipe", current.get("pipe")):
        current = {}  # another pipeline's record of this number (or junk): replaced, not merged
    rec = {"scan": scan, **current, **mine}
    if "status" not in fields and current.get("status") == "done":
        rec["status"] = "done"  # final (the accountant closed it): a later field of ours never reopens it
    kv.set(key(scan), rec)
    return rec


def valid_record(rec, pipe: str | None) -> dict | None:
    """`rec` if it is an announced record of pipeline `pipe` whose node groups make sense, else None
    (anyone can write a record: a producer never routes by one it cannot trust)."""
    from zpipe.scans.messages import Rejected, node_groups

    if not isinstance(rec, dict) or rec.get("pipe") != pipe:
        return None
    ngs = rec.get("node_groups")
    if ngs == []:
        return rec  # announced to disk: no node group
    try:
        node_groups(ngs)
    except Rejected:
        return None
    return rec


def wait_record(kv: KVClient, scan: int, timeout: float, stop=None, pipe: str | None = None) -> dict | None:
    """The record, once the scan's announcer has written it (for pipeline `pipe`); None after `timeout` (or stop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        rec = valid_record(kv.get(key(scan)), pipe)
        if rec is not None:
            return rec
        try:
            kv.wait(lambda items: key(scan) in items, prefix=key(scan), timeout=min(0.2, deadline - time.monotonic()))
        except TimeoutError:
            pass
    return None


def plain(value, depth: int = 0):
    """`value` as JSON and msgpack both carry it: str keys, no bytes, nothing nested absurdly deep
    (a report is made from figures anyone could have written to the registry)."""
    if depth > 32:
        return "(nested too deep)"
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"({len(value)} bytes)"
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
        return f"(an integer of {value.bit_length()} bits)"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)[:200]


def write_json(path: str, data: dict) -> str:
    """Atomically: a reader never sees half a report, even when several runners write their copy of it into one
    directory (the node groups of one session job) at once: each through a file of its own."""
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w") as f:
        json.dump(plain(data), f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path


PARTS_DIR = "parts"


def part_file(output_dir: str, scan: int, label: str) -> str:
    """Where a node group keeps its part of a scan's account on its own disk, beside the registry's copy."""
    return os.path.join(output_dir, PARTS_DIR, f"scan_{scan}.{label}.msgpack")


def write_part(output_dir: str, scan: int, label: str, part: dict) -> None:
    """Atomically (msgpack: the processed-items bitmap is bytes)."""
    path = part_file(output_dir, scan, label)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(msgpack.packb(part, use_bin_type=True))
    os.replace(tmp, path)


def read_part(output_dir: str, scan: int, label: str) -> dict | None:
    """A node group's part as it last wrote it, or None (no file, or one that does not decode)."""
    try:
        with open(part_file(output_dir, scan, label), "rb") as f:
            part = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    except (OSError, ValueError, msgpack.UnpackException):
        return None
    return part if isinstance(part, dict) else None
