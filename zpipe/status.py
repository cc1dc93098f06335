"""Each node's status and counters, published into the key-value store a few times a second, never per message.

Roles bump plain integer counters on a `Meter` in their hot loops (a few nanoseconds
each); a background thread copies them to `status/{node}/{replica}` every `interval`
seconds as an ephemeral key. Viewers (`zpipe run`'s live view, `zpipe status`) derive
rates from successive snapshots.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

PREFIX = "status/"


class Meter:
    """Counters of one node replica; plain attributes so the hot path pays only an add."""

    def __init__(self, node: str, replica: int, role: str, host: str, pid: int):
        self.node, self.replica, self.role, self.host, self.pid = node, replica, role, host, pid
        self.state = "starting"  # idle, streaming, processing, writing, done, failed, stopping
        self.scan: int | None = None
        self.msgs_in = self.bytes_in = self.msgs_out = self.bytes_out = 0
        self.blocked_s = 0.0  # time spent waiting on a full queue downstream
        self.rejected = self.errors = 0
        self.refused = 0  # connections refused by the data sockets' authentication (zpipe.security)
        self.flow_overrides = 0  # node group: frames started although sectors were far apart (see nodegroup)
        self.queue = 0  # items waiting inside the node now (node group: parts for its workers)
        self.queue_max = 0
        self.scans: dict[int, dict[str, Any]] = {}  # per scan: received, expected (node groups)
        self.warnings: collections.deque[str] = collections.deque(maxlen=5)
        self.started = time.time()

    def refuse(self) -> None:
        self.refused += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "node": self.node, "replica": self.replica, "role": self.role, "host": self.host, "pid": self.pid,
            "state": self.state, "scan": self.scan, "time": time.time(), "started": self.started,
            "msgs_in": self.msgs_in, "bytes_in": self.bytes_in, "msgs_out": self.msgs_out,
            "bytes_out": self.bytes_out, "blocked_s": round(self.blocked_s, 4), "rejected": self.rejected,
            "errors": self.errors, "queue": self.queue, "queue_max": self.queue_max,
            "flow_overrides": self.flow_overrides, "refused": self.refused,
            "scans": {str(k): dict(v) for k, v in list(self.scans.items())[-4:]},
            "warnings": list(self.warnings),
        }


class WarningsToMeter(logging.Handler):
    """Keeps a node's latest warnings in its status, so every viewer sees them."""

    def __init__(self, meter: Meter):
        super().__init__(logging.WARNING)
        self.meter = meter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.meter.warnings.append(f"{time.strftime('%H:%M:%S')} {record.getMessage()}"[:300])
            if record.levelno >= logging.ERROR:
                self.meter.errors += 1
        except Exception:  # a status line must never take a node down
            pass


class Publisher(threading.Thread):
    """Copies the meter into the store every `interval` seconds (0: never, status off)."""

    def __init__(self, kv, meter: Meter, interval: float, ttl: float = 3.0):
        super().__init__(name="status", daemon=True)
        self.kv, self.meter, self.interval = kv, meter, interval
        self.ttl = max(ttl, interval * 3)
        self.key = f"{PREFIX}{meter.node}/{meter.replica}"
        self.stopped = threading.Event()

    def publish(self) -> None:
        try:
            self.kv.set(self.key, self.meter.snapshot(), ttl=self.ttl)
        except Exception:
            pass

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.publish()

    def stop(self) -> None:
        self.stopped.set()
        self.publish()  # the final state (done, failed) reaches viewers
