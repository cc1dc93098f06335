"""The key-value server: the one place that orders state changes for every zpipe node.

A Clone-pattern server (ZeroMQ guide, chapter 5): clients push changes to the
collector, the server numbers each one and publishes it, and a client that joins
(or loses track) asks the bootstrap ROUTER for a snapshot. Ephemeral keys carry a
TTL that the server enforces, so a crashed client's keys disappear by themselves.
The state lives in memory only: after a restart, clients re-publish what they own.
"""

from __future__ import annotations

import heapq
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import zmq

from . import protocol as p

log = logging.getLogger(__name__)

@dataclass
class _Entry:
    body: bytes
    ttl: float | None
    origin: bytes


class KVServer:
    """Serve a key-value store; ``start()`` runs it in a background thread."""

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:0",
        *,
        heartbeat: float = 1.0,
        advertise: str | None = None,
        pub_bind: str | None = None,
        collector_bind: str | None = None,
    ):
        self.bind = bind
        self.heartbeat = heartbeat
        self.advertise = advertise
        self.pub_bind = pub_bind or p.sibling(bind, "pub")
        self.collector_bind = collector_bind or p.sibling(bind, "col")
        # A fresh random epoch per start lets clients tell a restarted server
        # from the old one at the first message they get from it.
        self.epoch = uuid.uuid4().hex[:16]
        self._address: str | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._drop = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> "KVServer":
        self._thread = threading.Thread(target=self._run_thread, name="kv-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._address is None:  # binding failed: the thread is ending
            self._thread.join()
            raise self._error or RuntimeError("KV server failed to start")
        return self

    def _run_thread(self) -> None:
        try:
            self.run(self._stop)
        except BaseException as exc:
            self._error = exc  # start() raises it if binding failed
            if self._address is not None:
                log.exception("KV server at %s stopped on an error", self._address)

    @property
    def address(self) -> str:
        """The bootstrap address clients connect to."""
        if self._address is None:
            raise RuntimeError("server not started")
        return self._address

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> "KVServer":
        return self if self._ready.is_set() else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def drop_next_updates(self, n: int) -> None:
        """For tests: number the next ``n`` updates but do not publish them,
        as if the PUB socket had lost them."""
        self._drop = n

    # -- the loop --------------------------------------------------------------

    def run(self, stop: threading.Event, on_ready: Callable[[str], None] | None = None) -> None:
        """Bind, then serve in the calling thread until ``stop`` is set."""
        ctx = zmq.Context()
        sockets = []

        def make(kind: int, where: str) -> zmq.Socket:
            s = ctx.socket(kind)
            s.linger = 0  # state is soft: nothing is worth waiting for at exit
            sockets.append(s)
            s.bind(where)
            return s

        try:
            router = make(zmq.ROUTER, self.bind)
            pub = ctx.socket(zmq.PUB)
            pub.linger = 0
            pub.sndhwm = p.HWM
            sockets.append(pub)
            pub.bind(self.pub_bind)
            collector = make(zmq.PULL, self.collector_bind)
            host = self.advertise or "127.0.0.1"
            self._address = p.reachable(router.last_endpoint.decode(), host)
            self._hello = p.pack(
                {
                    "epoch": self.epoch,
                    "pub": pub.last_endpoint.decode(),
                    "collector": collector.last_endpoint.decode(),
                    "heartbeat": self.heartbeat,
                }
            )
            self._ready.set()
            if on_ready is not None:
                on_ready(self._address)
            _Loop(self, router, pub, collector).run(stop)
        finally:
            self._ready.set()
            for s in sockets:
                s.close(linger=0)
            ctx.term()


class _Loop:
    """The server's state and its single-threaded event loop."""

    def __init__(self, server: KVServer, router, pub, collector):
        self.server = server
        self.router, self.pub, self.collector = router, pub, collector
        self.store: dict[str, _Entry] = {}
        self.seq = 0
        # Updates counted per subtree some client asked for (see protocol.py).
        self.counts: dict[str, int] = {}
        # Deadlines of ephemeral keys; a heap with stale entries skipped on pop,
        # because refreshes are far more frequent than expiries.
        self.deadline: dict[str, float] = {}
        self.heap: list[tuple[float, str]] = []

    def run(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.collector, zmq.POLLIN)
        next_beat = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat()
                next_beat = now + self.server.heartbeat
            self.expire(now)
            # Short waits keep expiry prompt and stop() responsive.
            timeout = max(0.0, min(0.05, next_beat - now))
            events = dict(poller.poll(timeout * 1000))
            if self.collector in events:
                self.drain_collector()
            if self.router in events:
                self.drain_requests()

    # -- requests --------------------------------------------------------------

    def drain_requests(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 3:
                continue  # not ours; a ROUTER must survive garbage
            identity, cmd, request_id = frames[:3]
            if cmd == p.HELLO:
                reply = self.server._hello
            elif cmd == p.SNAPSHOT:
                reply = self.snapshot(p.unpack(frames[3]) if len(frames) > 3 else {})
            else:
                continue
            self.router.send_multipart([identity, cmd, request_id, reply])

    def snapshot(self, request: dict) -> bytes:
        subtrees = [str(s) for s in request.get("subtrees", [""])] or [""]
        for s in subtrees:
            self.counts.setdefault(s, 0)
        entries = [
            [key, e.body, e.ttl]
            for key, e in self.store.items()
            if any(key.startswith(s) for s in subtrees)
        ]
        # One message: a ROUTER drops what exceeds its high-water mark, so a
        # snapshot sent as one message per key could silently lose keys.
        return p.pack(
            {
                "epoch": self.server.epoch,
                "seq": self.seq,
                "counts": {s: self.counts[s] for s in subtrees},
                "entries": entries,
            }
        )

    # -- updates ---------------------------------------------------------------

    def drain_collector(self) -> None:
        for _ in range(10_000):  # bounded, so requests and heartbeats still get a turn
            try:
                frames = self.collector.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                continue
            key_b, header, body = frames
            try:
                key = key_b.decode()
                ttl, refresh, origin = p.unpack(header)
            except Exception:
                continue
            if not key:
                continue
            self.apply(key, body, ttl, bool(refresh), origin)

    def apply(self, key: str, body: bytes, ttl: float | None, refresh: bool, origin: bytes) -> None:
        current = self.store.get(key)
        if body == p.DELETED:
            if current is None:
                return
            del self.store[key]
            self.deadline.pop(key, None)
        else:
            if ttl is not None and ttl > 0:
                deadline = time.monotonic() + ttl
                self.deadline[key] = deadline
                heapq.heappush(self.heap, (deadline, key))
            else:
                ttl = None
                self.deadline.pop(key, None)
            # A refresh of an unchanged key only moves its deadline: publishing
            # it would wake every client every ttl/3 for nothing.
            if refresh and current is not None and current.body == body and current.ttl == ttl:
                return
            self.store[key] = _Entry(body, ttl, origin)
        self.publish(key, body, ttl, origin)

    def publish(self, key: str, body: bytes, ttl: float | None, origin: bytes) -> None:
        self.seq += 1
        counts = {}
        for s in self.counts:
            if key.startswith(s):
                self.counts[s] += 1
                counts[s] = self.counts[s]
        if self.server._drop > 0:
            self.server._drop -= 1
            return
        header = p.pack([self.seq, self.server.epoch, ttl, origin, counts])
        self.pub.send_multipart([p.UPDATE_TOPIC + key.encode(), header, body])

    def heartbeat(self) -> None:
        beat = {"epoch": self.server.epoch, "seq": self.seq, "counts": self.counts}
        self.pub.send_multipart([p.HEARTBEAT_TOPIC, p.pack(beat)])

    def expire(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:
            deadline, key = heapq.heappop(self.heap)
            if self.deadline.get(key) == deadline:  # else refreshed or deleted since
                del self.deadline[key]
                del self.store[key]
                self.publish(key, p.DELETED, None, b"")


def serve(
    bind: str,
    *,
    advertise: str | None = None,
    heartbeat: float = 1.0,
    on_ready: Callable[[str], None] | None = None,
    pub_bind: str | None = None,
    collector_bind: str | None = None,
) -> None:
    """Run a server in this thread until SIGINT or SIGTERM (or KeyboardInterrupt).

    ``on_ready`` is called with the bootstrap address once the sockets are bound.
    """
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        server = KVServer(
            bind,
            heartbeat=heartbeat,
            advertise=advertise,
            pub_bind=pub_bind,
            collector_bind=collector_bind,
        )
        server.run(stop, on_ready)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
