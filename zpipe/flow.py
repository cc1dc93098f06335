"""Per-scan accounting in the key-value store: who sent how many messages where, who received them.

A receiving node knows a scan is complete when every upstream replica has declared it done
and the messages its replicas received add up to what was sent to it. Nothing here is per
message: counters are published a few times a second and when a scan ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from zpipe.kv import KVClient
from zpipe.topology import Topology

PREFIX = "flow/"


@dataclass(frozen=True)
class Upstream:
    node: str
    socket: str  # the upstream node's socket that feeds us
    replicas: int
    fanout: bool  # pub/sub: every replica of ours gets every message


def upstreams(topology: Topology, node: str, socket: str) -> list[Upstream]:
    """The sockets of other nodes linked to `node.socket`, whichever side declared the link."""
    spec = topology.nodes[node].sockets[socket]
    found: list[Upstream] = []
    if spec.connect:
        peer, _, psock = spec.connect.partition(".")
        found.append(Upstream(peer, psock, topology.nodes[peer].replicas, spec.pattern == "sub"))
    for name, other in topology.nodes.items():
        for sname, s in other.sockets.items():
            if s.connect == f"{node}.{socket}":
                found.append(Upstream(name, sname, other.replicas, spec.pattern == "sub"))
    return found


def flow_key(node: str, replica: int, scan: int | str) -> str:
    return f"{PREFIX}{node}/{replica}/{scan}"


def publish(kv: KVClient, node: str, replica: int, scan: int | str, **record) -> None:
    kv.set(flow_key(node, replica, scan), {**record, "updated": time.time()})


def expected(kv: KVClient, ups: list[Upstream], scan: int, departed=None) -> int | None:
    """Messages sent to us for `scan` by all upstream replicas, or None while any is still sending.

    `departed(node, replica)` (a reason, or None) lets a replica that died or left count as done,
    with what it last said it sent."""
    total = 0
    for up in ups:
        for r in range(up.replicas):
            rec = kv.get(flow_key(up.node, r, scan))
            rec = rec if isinstance(rec, dict) else {}
            if not rec.get("done") and not (departed and departed(up.node, r)):
                return None
            sent = rec.get("sent") if isinstance(rec.get("sent"), dict) else {}
            total += int(sent.get(up.socket, 0) or 0)
    return total


def received(kv: KVClient, node: str, replicas: int, scan: int) -> int:
    total = 0
    for r in range(replicas):
        rec = kv.get(flow_key(node, r, scan)) or {}
        total += rec.get("received", 0)
    return total


def ended(kv: KVClient, ups: list[Upstream], departed=None) -> bool:
    """True once every upstream replica has said it has no more scans (or, with `departed`, is gone)."""
    return all((kv.get(flow_key(u.node, r, "end")) or {}).get("done") or (departed and departed(u.node, r))
               for u in ups for r in range(u.replicas))


def scans_announced(kv: KVClient, ups: list[Upstream]) -> set[int]:
    ids: set[int] = set()
    for up in ups:
        for key in kv.items(f"{PREFIX}{up.node}/"):
            last = key.rsplit("/", 1)[-1]
            if last.isdigit():
                ids.add(int(last))
    return ids


def publish_scan(rt, scan: int, **record) -> dict:
    """A producer's or aggregator's figures for one scan: into the registry, and onto its own disk
    (zpipe.scans.record.write_part), so the scan's account can be made even if the registry is lost."""
    from zpipe.scans.record import write_part

    value = {**record, "pipe": rt.pipe, "label": rt.label, "updated": time.time()}
    rt.kv.set(flow_key(rt.name, rt.replica, scan), value)
    try:
        write_part(rt.output_dir, scan, rt.label, value)
    except OSError:
        pass  # the registry's copy stands; a full disk is the node group's to report
    return value
