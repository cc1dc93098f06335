"""The scan protocol's in-band messages and the checks every receiver applies before acting on one.

Four kinds travel on the data sockets, each a msgpack map (then, for data, the payload):

* `info`  {type, pipe, scan, sender, node_groups, meta[, expected]}: before a sender's first data
  of a scan; opens the scan for that sender. `node_groups` are the replicas the scan is split
  over; `meta` what the source says about the scan (its key range among others).
* data    {pipe, scan, sender, ...source fields}: one part of an item.
* `done`  {type, pipe, scan, sender, sent[, abandoned]}: after a sender's last data of a scan;
  `sent` is how many data messages it sent to this receiver. Messages on one connection arrive
  in order, so a receiver that has a sender's `done` has everything that sender will ever send
  it for the scan. `abandoned`: the sender gave up on this receiver mid-scan (it looked gone,
  e.g. frozen) and sent the rest elsewhere; it is sent if the receiver comes back.
* `end`   {type, pipe, sender}: the sender has no more scans.

`pipe` is the pipeline's identity (a random id the registry holds, see zpipe.runtime): a message
from another pipeline, a stale producer or a reused port is rejected, never mixed in. `sender`
is `node[replica]/thread`. Anything malformed, from an unknown sender, for an unknown or closed
scan, or out of turn is rejected with a reason, counted, and logged once per reason and sender.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import msgpack

log = logging.getLogger("zpipe.scans")

MAX_HEADER = 64 * 1024  # bytes; a header is a few hundred, a scan's meta a few kB
MAX_SCAN = 2**53
MAX_COUNT = 10**12  # messages; 1024x1024 positions x 4 sectors is 4e6
MAX_NODE_GROUPS = 4096
MAX_ITEMS = 2**26  # items a scan may announce (a 4096x4096 scan is 2**24): its bitmaps are allocated from it
_pack = msgpack.Packer(use_bin_type=True).pack


class Rejected(Exception):
    """A message that must not be acted on. `reason` is short and stable (it keys the counts)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail
        self.header = None


def brief(value: Any, limit: int = 40) -> str:
    """A short, safe rendering of anything a message may hold (never repr of a deep structure)."""
    if isinstance(value, int) and value.bit_length() > 96:
        text = f"an integer of {value.bit_length()} bits"
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:limit])
    else:
        text = f"a {type(value).__name__}"
    return text[:limit]


def sender_of(header: Any) -> str:
    """The claimed sender, printable and bounded, whatever the header holds."""
    s = header.get("sender") if isinstance(header, dict) else None
    if not isinstance(s, str):
        return "unknown sender"
    return s[:80] if s.isprintable() else repr(s)[:80]


def decode(frame) -> dict:
    """The header frame as a map; Rejected if it is too big, not msgpack or not a map."""
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    if len(buf) > MAX_HEADER:
        raise Rejected("header too large", f"{len(buf):,} bytes > {MAX_HEADER:,}")
    try:
        header = msgpack.unpackb(buf, raw=False)
    except Exception as exc:
        raise Rejected("header is not msgpack", exc.__class__.__name__) from None
    if not isinstance(header, dict):
        raise Rejected("header is not a map", type(header).__name__)
    return header


def ours(frame, pipe: str) -> dict:
    """The header frame as a map, if it is of pipeline `pipe`; else Rejected (as `decode`)."""
    header = decode(frame)
    if header.get("pipe") != pipe:
        exc = Rejected("not this pipeline", f"pipe {brief(header.get('pipe'), 20)}")
        exc.header = header  # who it claims to be from, for the count and the log
        raise exc
    return header


def count(value: Any, what: str, upper: int = MAX_COUNT) -> int:
    """A non-negative integer no larger than `upper` (bools are not counts)."""
    if type(value) is not int or not 0 <= value <= upper:
        raise Rejected(f"bad {what}", brief(value))
    return value


def scan_id(header: dict) -> int:
    return count(header.get("scan"), "scan number", MAX_SCAN)


def node_groups(value: Any) -> list[int]:
    if (not isinstance(value, list) or not 0 < len(value) <= MAX_NODE_GROUPS
            or any(type(g) is not int or not 0 <= g < MAX_NODE_GROUPS for g in value) or len(set(value)) != len(value)):
        raise Rejected("bad node_groups", brief(value, 60))
    return value


def meta(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Rejected("bad meta", type(value).__name__)
    keys = value.get("keys")
    if keys is not None:
        if (not isinstance(keys, list) or len(keys) != 2 or type(keys[0]) is not int or type(keys[1]) is not int
                or not 0 <= keys[0] <= 2**62 or not 0 <= keys[1] <= MAX_ITEMS):
            raise Rejected("bad meta.keys", brief(keys, 60))
    if value.get("geometry") is not None:
        from zpipe.geometry import Geometry, GeometryError

        try:
            Geometry.from_meta(value)
        except (GeometryError, TypeError) as exc:
            raise Rejected("bad meta.geometry", str(exc)[:80]) from None
    return value


# -- making messages ---------------------------------------------------------------------------
def info(pipe: str, scan: int, sender: str, ngs: list[int], scan_meta: dict, expected=None) -> list[bytes]:
    header = {"type": "info", "pipe": pipe, "scan": scan, "sender": sender, "node_groups": list(ngs),
              "meta": scan_meta}
    if expected is not None:
        header["expected"] = expected
    return [_pack(header)]


def done(pipe: str, scan: int, sender: str, sent: int, abandoned: bool = False) -> list[bytes]:
    """`abandoned`: the sender gave up on this receiver mid-scan (it looked gone); the rest went elsewhere."""
    header = {"type": "done", "pipe": pipe, "scan": scan, "sender": sender, "sent": sent}
    if abandoned:
        header["abandoned"] = True
    return [_pack(header)]


def end(pipe: str, sender: str) -> list[bytes]:
    return [_pack({"type": "end", "pipe": pipe, "sender": sender})]


# -- counting what was turned away --------------------------------------------------------------
class Rejects:
    """Counts rejected messages by reason and by sender; logs each (reason, sender) once.

    Senders are whatever a message claims, so the table of them is bounded: past SENDERS distinct
    ones, the rest are counted under "other senders". Thread-safe.
    """

    SENDERS = 64

    def __init__(self, where: str, meter=None):
        self.where, self.meter = where, meter
        self.count = 0
        self.by_reason: dict[str, int] = {}
        self.by_sender: dict[str, int] = {}
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def add(self, reason: str, sender: str = "unknown sender", detail: str = "") -> None:
        with self._lock:
            self.count += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            if sender not in self.by_sender and len(self.by_sender) >= self.SENDERS:
                sender = "other senders"
            self.by_sender[sender] = self.by_sender.get(sender, 0) + 1
            if self.meter is not None:
                self.meter.rejected = self.count
            first = (reason, sender) not in self._logged and len(self._logged) < 4 * self.SENDERS
            if first:
                self._logged.add((reason, sender))
        if first:
            log.warning("%s rejected a message from %s: %s%s (counted; further ones from this sender "
                        "for this reason are not logged)", self.where, sender, reason, f" ({detail})" if detail else "")

    def reject(self, exc: Rejected, sender: str) -> None:
        self.add(exc.reason, sender, exc.detail)

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {"rejected": self.count, "rejected_by": dict(self.by_reason),
                    "rejected_senders": dict(self.by_sender)}


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
