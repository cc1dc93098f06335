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
from zpipe.scans.messages import Rejected, Rejects
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

    def collect(self, scan: int, node_groups: list[int], writer: int, mine: Share):
        """Writer: ({node group: share}, {node group: why it is missing}); others: send ours, (None, {})."""
        rt = self.rt
        if writer != rt.replica:
            return None, self._send(scan, writer, mine)
        got = {rt.replica: mine}
        missing: dict[int, str] = {}
        pending = set(node_groups) - {rt.replica}
        deadline = time.monotonic() + self.timeout
        while True:
            for g in list(pending):
                if g in self.complete.get(scan, ()):
                    got[g] = self.early.get(scan, {}).pop(g)
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
        return got, missing

    def _receive(self, frames, node_groups) -> None:
        header = None
        try:
            header, values = arrays.unpack(frames)
            if header.get("pipe") != self.rt.pipe:
                raise Rejected("not this pipeline")
            scan, sender = header.get("scan"), header.get("from")
            if type(scan) is not int or type(sender) is not int or sender == self.rt.replica:
                raise Rejected("bad results header", f"scan {scan!r} from {sender!r}")
            if sender in self.complete.get(scan, ()):
                raise Rejected("results after their end", f"scan {scan} from {sender}")
            share = self.early.setdefault(scan, {}).setdefault(sender, {"part": None, "results": {}})
            if header.get("end"):
                share["part"] = header.get("part") if isinstance(header.get("part"), dict) else {}
                self.complete.setdefault(scan, set()).add(sender)
            elif isinstance(header.get("analysis"), str) and values is not None:
                share["results"].setdefault(header["analysis"], []).append(values)
            else:
                raise Rejected("bad results message")
            while len(self.early) > 64:  # shares for scans nobody collects (a stale sender): forget the oldest
                self.early.pop(next(iter(self.early)))
        except Rejected as exc:
            self.rejects.reject(exc, str(header.get("from")) if isinstance(header, dict) else "unknown sender")
        except Exception as exc:  # anything arrays.unpack cannot read
            self.rejects.add("malformed results message", "unknown sender", f"{exc.__class__.__name__}: {exc}"[:200])

    def _send(self, scan: int, writer: int, mine: Share) -> dict[int, str]:
        rt = self.rt
        if self.outbox is None:
            self.outbox = Outbox(rt, "results", rt.name, "results", spec=SPEC)
        meta = {"pipe": rt.pipe, "scan": scan, "from": rt.replica}
        try:
            for name, parts in mine["results"].items():
                for values in parts:
                    self.outbox.send(writer, arrays.pack({**meta, "analysis": name}, values))
            self.outbox.send(writer, arrays.pack({**meta, "end": True, "part": mine["part"]}, None))
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
