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

from zpipe import codec
from zpipe.runtime import NodeRuntime
from zpipe.scans.messages import Rejected, Rejects, brief
from zpipe.topology import SocketSpec
from zpipe.transport.outbox import Outbox, PeerGone

Share = dict[str, Any]  # {"part": summary of the node group's part, "results": {analysis: {"buffers", "parts"}}}
SPEC = SocketSpec(pattern="push", hwm=100_000)
LEAVING_WAIT = 10.0  # s a leaving writer waits for the other node groups' shares


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
        # Our own share through the codec too, so the writer sees every node group's results alike
        # (numpy scalars as numbers, tuples as lists), as with MPI.
        got = {rt.replica: codec.decode(codec.encode(mine))}
        missing: dict[int, str] = {}
        pending = set(node_groups) - {rt.replica}
        # Leaving (our session ends), we wait for the others only briefly: what has not come is named.
        limit = min(self.timeout, LEAVING_WAIT) if rt.leave.is_set() else self.timeout
        deadline = time.monotonic() + limit
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
                    missing[g] = f"nothing from it after {limit:.0f} s" + (" (this node group was leaving)"
                                                                           if rt.leave.is_set() else "")
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
        sender = None
        try:
            msg = codec.decode(frames)
            if not isinstance(msg, dict) or msg.get("pipe") != self.rt.pipe:
                raise Rejected("not this pipeline")
            scan, sender, share = msg.get("scan"), msg.get("from"), msg.get("share")
            if (type(scan) is not int or type(sender) is not int or sender == self.rt.replica
                    or not 0 <= sender < self.rt.spec.replicas):
                raise Rejected("bad results header", f"scan {brief(scan)} from {brief(sender)}")
            if not isinstance(share, dict) or not isinstance(share.get("results"), dict):
                raise Rejected("bad results message", f"scan {scan} from {sender}")
            if sender in self.complete.get(scan, ()):
                raise Rejected("results twice", f"scan {scan} from {sender}")
            self.early.setdefault(scan, {})[sender] = share
            self.complete.setdefault(scan, set()).add(sender)
            # Shares of scans nobody collects yet (a peer far ahead, a stale sender): the oldest go,
            # never the one being collected.
            while len(self.early) > 64:
                old = next(s for s in self.early if s != self.collecting)
                self.early.pop(old)
                self.complete.pop(old, None)
        except Rejected as exc:
            self.rejects.reject(exc, brief(sender) if sender is not None else "unknown sender")
        except ValueError as exc:  # frames the codec refuses
            self.rejects.add("malformed results message", "unknown sender", str(exc)[:200])

    def _send(self, scan: int, writer: int, mine: Share) -> dict[int, str]:
        rt = self.rt
        if self.outbox is None:
            self.outbox = Outbox(rt, "results", rt.name, "results", spec=SPEC)
        try:
            self.outbox.send(writer, codec.encode({"pipe": rt.pipe, "scan": scan, "from": rt.replica, "share": mine}))
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
        # The same codec as over ZeroMQ (so what travels is the same on both): MPI moves the bytes.
        frames = [bytes(f) for f in codec.encode(mine)]
        everything = self.comm.gather(frames, root=node_groups[0])
        if everything is None:
            return None, {}
        return {r: codec.decode(f) for r, f in enumerate(everything) if f is not None}, {}

    def close(self) -> None:
        pass
