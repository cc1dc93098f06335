"""Brings every node group's analysis results for a scan to the scan's first node group, which writes the file.

Over ZeroMQ by default (each node group binds a `results` socket in the registry); with
MPI when the node groups are MPI ranks (`mpiexec -n K zpipe run ...`), as in the paper.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from zpipe import arrays
from zpipe.runtime import NodeRuntime
from zpipe.topology import SocketSpec

Parts = dict[str, list[dict[str, Any]]]  # analysis name -> every worker's results


class ZmqGather:
    def __init__(self, rt: NodeRuntime, timeout: float):
        self.rt, self.timeout = rt, timeout
        self.pull = rt.bind_as("results", SocketSpec(pattern="pull", hwm=100_000))
        self.pushes: dict[str, zmq.Socket] = {}
        self.early: dict[int, list[tuple[dict, dict | None]]] = {}  # messages for scans not collected yet

    def collect(self, scan: int, node_groups: list[int], mine: Parts) -> Parts | None:
        """Leader: every node group's parts (ours included); others: send ours, return None."""
        leader = node_groups[0]
        if self.rt.replica != leader:
            self._send(scan, leader, mine)
            return None
        gathered: Parts = {name: list(parts) for name, parts in mine.items()}
        done: set[int] = {self.rt.replica}
        deadline = time.monotonic() + self.timeout
        pending = self.early.pop(scan, [])
        while len(done) < len(node_groups):
            while pending:
                header, values = pending.pop(0)
                if header.get("end"):
                    done.add(header["from"])
                elif values is not None:
                    gathered.setdefault(header["analysis"], []).append(values)
            if len(done) >= len(node_groups):
                break
            if time.monotonic() > deadline:
                missing = sorted(set(node_groups) - done)
                raise TimeoutError(f"scan {scan}: no results from node groups {missing} after {self.timeout:.0f} s")
            if self.pull.poll(100):
                header, values = arrays.unpack(self.pull.recv_multipart(copy=False))
                if header["scan"] == scan:
                    pending.append((header, values))
                else:
                    self.early.setdefault(header["scan"], []).append((header, values))
        return gathered

    def _send(self, scan: int, leader: int, mine: Parts) -> None:
        rt = self.rt
        key = str(leader)
        if key not in self.pushes:
            self.pushes[key] = rt.connect_to_endpoint(rt.name, "results", leader)
        sock = self.pushes[key]
        for name, parts in mine.items():
            for values in parts:
                sock.send_multipart(arrays.pack({"scan": scan, "from": rt.replica, "analysis": name}, values),
                                    copy=False)
        sock.send_multipart(arrays.pack({"scan": scan, "from": rt.replica, "end": True}, None))


class MpiGather:
    """Node group replica r is MPI rank r; results are gathered on the scan's first node group."""

    def __init__(self, comm):
        self.comm = comm

    def collect(self, scan: int, node_groups: list[int], mine: Parts) -> Parts | None:
        everything = self.comm.gather(mine, root=node_groups[0])
        if everything is None:
            return None
        gathered: Parts = {}
        for parts in everything:
            for name, values in parts.items():
                gathered.setdefault(name, []).extend(values)
        return gathered
