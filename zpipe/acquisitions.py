"""Acquisitions: scans requested while the producers run as a service (`zpipe acquire`).

A request is a key `acquire/{id}` in the registry: the pipeline it is for, the source's request
parameters (its `Request`), or a directory of recorded files to replay. Ids sort in the order
the requests were made. The producer that announces scans (the lowest live replica) takes the
oldest request not yet taken, gives it a scan number, announces the scan with the request in its
record (`scans/{n}`), from which every producer replica makes the same scan, and answers at
`acquired/{id}`: the scan number, or why the request was refused.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

REQUESTS = "acquire/"
ANSWERS = "acquired/"
MAX_PARAMS_BYTES = 64 * 1024  # a request's parameters, packed: far above any real one
MAX_SCAN = 2**53  # scan numbers every message carries exactly (zpipe.scans.messages.MAX_SCAN)


def new_id() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def request(kv, pipe: str, params: dict[str, Any] | None = None, *, replay: dict | None = None,
            scan: int | None = None, by: str = "") -> str:
    """Ask the pipeline's producers for an acquisition; returns its id."""
    rid = new_id()
    value = {"pipe": pipe, "params": params or {}, "at": time.time(), "by": by or f"pid {os.getpid()}"}
    if replay is not None:
        value["replay"] = replay
    if scan is not None:
        value["scan"] = scan
    kv.set(REQUESTS + rid, value)
    return rid


def answer_of(kv, rid: str) -> dict | None:
    value = kv.get(ANSWERS + rid)
    return value if isinstance(value, dict) else None


def answer(kv, rid: str, **fields) -> None:
    kv.set(ANSWERS + rid, {**fields, "at": time.time()})


class Refused(ValueError):
    """A request the producers cannot serve; its message says why (sent back to the requester)."""


def pending(kv, pipe: str, taken: set[str]) -> list[tuple[str, Any]]:
    """Requests for this pipeline not yet answered, oldest first (`taken`: those we answered already,
    which the store may not show yet). Values of any shape: the caller checks them (check())."""
    out = []
    for key, value in kv.items(REQUESTS).items():
        rid = key[len(REQUESTS):]
        if not rid or "/" in rid or rid in taken or kv.get(ANSWERS + rid) is not None:
            continue
        if isinstance(value, dict) and value.get("pipe") not in (pipe, None):
            continue  # another pipeline's (an earlier run's) request
        out.append((rid, value))
    return sorted(out, key=lambda kv_: kv_[0])


def check(value: Any) -> dict:
    """A request as the producers act on it, or Refused: anyone can write a key."""
    from zpipe.kv.protocol import pack

    if not isinstance(value, dict):
        raise Refused(f"a request is a mapping, not {type(value).__name__}")
    params = value.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise Refused("`params` must map names to values")
    if len(pack(params)) > MAX_PARAMS_BYTES:
        raise Refused(f"`params` is over {MAX_PARAMS_BYTES} bytes")
    scan = value.get("scan")
    if scan is not None and not (type(scan) is int and 0 <= scan < MAX_SCAN):
        raise Refused(f"`scan` must be a non-negative integer, not {scan!r}"[:200])
    replay = value.get("replay")
    if replay is not None:
        if not isinstance(replay, dict) or not isinstance(replay.get("directory"), str) or not replay["directory"]:
            raise Refused("`replay` needs a `directory`")
        rs = replay.get("scan")
        if rs is not None and not (type(rs) is int and rs >= 0):
            raise Refused(f"`replay.scan` must be a non-negative integer, not {rs!r}"[:200])
        if params:
            raise Refused("a replay takes no source parameters (the files say what the scan was)")
        d = replay["directory"]
        if "\0" in d or os.path.isabs(d) or ".." in d.replace("\\", "/").split("/"):
            raise Refused("`replay.directory` is relative to the producers' output directory, inside it "
                          "(no absolute path, no `..`)")
    return {"params": params, "scan": scan, "replay": replay}
