"""Brings every node group's share of a scan (its part of the account and its analyses' results) to the scan's writer.

Over ZeroMQ by default: each node group binds a `results` socket in the registry, and the
writer is the first node group of the scan still alive, so a scan whose first node group died
is still written. With MPI when the node groups are MPI ranks (`mpiexec -n K zpipe run ...`), as
in the paper: a collective gather on the scan's first rank (MPI ends every rank if one dies).
Every wait is bounded: by the peers' liveness (zpipe.roster) and by `timeout`.
"""

from __future__ import annotations

import time
from typing import Any

from zpipe import arrays
from zpipe.runtime import NodeRuntime
from zpipe.scans.messages import Rejected, Rejects, brief
from zpipe.topology import SocketSpec
from zpipe.transport.outbox import Outbox, PeerGone

Share = dict[str, Any]  # {"part": summary of the node group's part, "results": {analysis: [worker values]}}
SPEC = SocketSpec(pattern="push", hwm=100_000)


class ZmqGather:
    def __init__(self, rt: NodeRuntime, timeout: float):
        self.rt, self.timeout = rt, timeout
        self.pull = rt.bind_as("results", SocketSpec(pattern="pull", hwm=100_000))
        self.outbox: Outbox | None = None
        self.early: dict[int, dict[int, Share]] = {}  # shares of scans we have not collected yet
        self.complete: dict[int, set[int]] = {}  # scan -> node groups whose share is all here
        self.rejects = Rejects(f"{rt.label}.results", rt.meter)
        self.collecting: int | None = None

    def collect(self, scan: int, node_groups: list[int], writer: int, mine: Share):
        """Writer: ({node group: share}, {node group: why it is missing}); others: send ours, (None, {})."""
        rt = self.rt
        if writer != rt.replica:
            return None, self._send(scan, writer, mine)
        got = {rt.replica: mine}
        missing: dict[int, str] = {}
        pending = set(node_groups) - {rt.replica}
        deadline = time.monotonic() + self.timeout
        self.collecting = scan
        while True:
            for g in list(pending):
                if g in self.complete.get(scan, ()):
                    share = self.early.get(scan, {}).pop(g, None)
                    if share is None:
                        missing[g] = "its results were dropped (too many scans ahead)"
                    else:
                        got[g] = share
                    pending.discard(g)
                elif rt.roster.gone(rt.name, g):
                    missing[g] = "it is gone"
                    pending.discard(g)
            if not pending:
                break
            if time.monotonic() > deadline:
                for g in pending:
                    missing[g] = f"nothing from it after {self.timeout:.0f} s"
                break
            if rt.stop.is_set():
                for g in pending:
                    missing[g] = "this node group was stopped"
                break
            if self.pull.poll(100):
                self._receive(self.pull.recv_multipart(copy=False), node_groups)
        self.early.pop(scan, None)
        self.complete.pop(scan, None)
        self.collecting = None
        return got, missing

    def _receive(self, frames, node_groups) -> None:
        header = None
        try:
            header, values = arrays.unpack(frames)
            if header.get("pipe") != self.rt.pipe:
                raise Rejected("not this pipeline")
            scan, sender = header.get("scan"), header.get("from")
            if (type(scan) is not int or type(sender) is not int or sender == self.rt.replica
                    or not 0 <= sender < self.rt.spec.replicas):
                raise Rejected("bad results header", f"scan {brief(scan)} from {brief(sender)}")
            if sender in self.complete.get(scan, ()):
                raise Rejected("results after their end", f"scan {scan} from {sender}")
            share = self.early.setdefault(scan, {}).setdefault(sender, {"part": None, "results": {}, "n": 0})
            if header.get("end"):
                part = header.get("part") if isinstance(header.get("part"), dict) else {}
                if header.get("results") != share["n"]:  # a message of it lost, or one forged among them
                    raise Rejected("results incomplete", f"scan {scan} from {sender}: {share['n']} of "
                                                         f"{brief(header.get('results'))}")
                share["part"] = part
                self.complete.setdefault(scan, set()).add(sender)
            elif isinstance(header.get("analysis"), str) and values is not None:
                share["results"].setdefault(header["analysis"], []).append(values)
                share["n"] += 1
            else:
                raise Rejected("bad results message")
            # Shares of scans nobody collects yet (a peer far ahead, a stale sender): the oldest go,
            # never the one being collected.
            while len(self.early) > 64:
                old = next(s for s in self.early if s != self.collecting)
                self.early.pop(old)
                self.complete.pop(old, None)
        except Rejected as exc:
            sender = header.get("from") if isinstance(header, dict) else None
            self.rejects.reject(exc, brief(sender) if sender is not None else "unknown sender")
        except Exception as exc:  # anything arrays.unpack cannot read
            self.rejects.add("malformed results message", "unknown sender", exc.__class__.__name__)

    def _send(self, scan: int, writer: int, mine: Share) -> dict[int, str]:
        rt = self.rt
        if self.outbox is None:
            self.outbox = Outbox(rt, "results", rt.name, "results", spec=SPEC)
        meta = {"pipe": rt.pipe, "scan": scan, "from": rt.replica}
        try:
            n = 0
            for name, parts in mine["results"].items():
                for values in parts:
                    self.outbox.send(writer, arrays.pack({**meta, "analysis": name}, values))
                    n += 1
            self.outbox.send(writer, arrays.pack({**meta, "end": True, "results": n, "part": mine["part"]}, None))
        except PeerGone as exc:
            return {writer: f"our results could not reach the writer: {exc}"}
        return {}

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close(linger_ms=5_000)


class MpiGather:
    """Node group replica r is MPI rank r; shares are gathered on the scan's first node group."""

    def __init__(self, comm):
        self.comm = comm

    def collect(self, scan: int, node_groups: list[int], writer: int, mine: Share):
        everything = self.comm.gather(mine, root=node_groups[0])
        if everything is None:
            return None, {}
        return {r: share for r, share in enumerate(everything) if share is not None}, {}

    def close(self) -> None:
        pass
