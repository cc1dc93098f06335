"""The key-value server: the one place that orders state changes for every zpipe node.

A Clone-pattern server (ZeroMQ guide, chapter 5): clients push changes to the
collector, the server numbers each one and publishes it, and a client that joins
(or loses track) asks the bootstrap ROUTER for a snapshot. Ephemeral keys carry a
TTL that the server enforces, so a crashed client's keys disappear by themselves.
The state lives in memory only: after a restart, clients re-publish what they own.

Anyone who can reach its ports can send it anything: whatever is malformed (see
protocol.py) is dropped, counted in ``KVServer.rejected`` and logged once per
reason; nothing a peer sends can stop the loop or reach the other clients.

With ``auth`` (zpipe.security.ServerAuth, from a topology's ``security:``) its three
sockets are CURVE servers: only clients whose public key is in the key directory
complete a handshake (a ZAP handler in the server's context decides, and counts and
names whoever it refuses), and every write is checked against its writer's
authenticated identity (the User-Id of the message): one the policy does not allow
is dropped, counted per identity in ``KVServer.denied`` and under the key
``security/denied/{identity}``, and logged once per identity and key kind.
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

# Messages handled per socket per turn of the loop, so that a flood on one socket
# leaves heartbeats, expiry and the other socket their turn.
BATCH = 1000


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
        auth=None,
    ):
        if not 0 < heartbeat <= p.MAX_HEARTBEAT:  # clients would refuse its HELLO
            raise ValueError(f"heartbeat must be in (0, {p.MAX_HEARTBEAT:g}] seconds, got {heartbeat}")
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
        # Malformed messages dropped, by reason (see protocol.py); written by the
        # server's thread only.
        self.rejected: dict[str, int] = {}
        self.auth = auth  # zpipe.security.ServerAuth, or None: no CURVE, no checks (as before)

    @property
    def denied(self) -> dict[str, dict]:
        """Writes refused (security on): identity -> {"writes", "last_key", "at"}."""
        return self.auth.denied if self.auth is not None else {}

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
        ctx.set(zmq.THREAD_NAME_PREFIX, p.SERVER_THREADS)
        sockets = []
        auth = self.auth
        if auth is not None:
            from zpipe.security import Zap

            # Bound before the sockets: a CURVE server with no ZAP handler would accept any key.
            auth.zap = Zap(ctx, keys=auth.keys, label=f"the registry bound at {self.bind}")

        # linger 0 everywhere: state is soft, nothing is worth waiting for at exit.
        try:
            router = ctx.socket(zmq.ROUTER)
            if auth is not None:
                auth.serve(router)
            router.linger = 0
            # Beyond this ZeroMQ drops the connection before we see the message:
            # a memory guard, far above MAX_REQUEST (which we count).
            router.maxmsgsize = 16 * p.MAX_REQUEST
            sockets.append(router)
            router.bind(self.bind)
            # XPUB, verbose: every subscription reaches us, so that we can welcome each
            # client's SUB once its subscriptions are in place (see protocol.py).
            pub = ctx.socket(zmq.XPUB)
            if auth is not None:
                auth.serve(pub)
            pub.linger = 0
            pub.sndhwm = p.HWM
            pub.xpub_verbose = True
            sockets.append(pub)
            pub.bind(self.pub_bind)
            collector = ctx.socket(zmq.PULL)
            if auth is not None:
                auth.serve(collector)
            collector.linger = 0
            collector.maxmsgsize = 2 * p.MAX_BODY  # the same kind of guard
            sockets.append(collector)
            collector.bind(self.collector_bind)
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
            if self.rejected:
                log.warning(
                    "KV server dropped %d malformed message(s): %s",
                    sum(self.rejected.values()), self.rejected,
                )
            for s in sockets:
                s.close(linger=0)
            if auth is not None and auth.zap is not None:
                auth.zap.stop()
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
        self.auth = server.auth
        self.denied_dirty: set[str] = set()  # identities whose count of refused writes is not yet published
        self.denied_logged: set[tuple[str, str]] = set()
        self.handshakes_published = 0
        self.protocol_failed: dict[str, int] = {}  # socket -> handshakes failed before ZAP (no CURVE)

    def run(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.collector, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        monitors = {}
        if self.auth is not None:
            # A peer without CURVE (or with a broken handshake) never reaches the ZAP handler:
            # the sockets' monitors count it.
            events = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            for what, sock in (("snapshot", self.router), ("updates", self.pub), ("collector", self.collector)):
                mon = sock.get_monitor_socket(events)
                monitors[mon] = what
                poller.register(mon, zmq.POLLIN)
        try:
            self._run(stop, poller, monitors)
        finally:
            for mon in monitors:
                mon.close(linger=0)

    def on_monitor(self, mon, what: str) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            n = self.protocol_failed.get(what, 0)
            self.protocol_failed[what] = n + 1
            if n == 0:
                log.warning("KV server at %s: a peer failed the CURVE handshake on its %s socket (no key, or "
                            "not CURVE; event %d); further ones are only counted (%s)", self.server._address,
                            what, event["event"], "security/handshakes")

    def _run(self, stop: threading.Event, poller, monitors) -> None:
        next_beat = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                if self.auth is not None:
                    self.publish_security()
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
            if self.pub in events:
                self.drain_subscriptions()
            for mon, what in monitors.items():
                if mon in events:
                    self.on_monitor(mon, what)

    # -- requests --------------------------------------------------------------

    def reject(self, reason: str, detail: str = "") -> None:
        p.reject(self.server.rejected, reason, log, f"KV server at {self.server._address}", detail)

    def internal_error(self, what: str) -> None:
        reason = f"{what}: internal error"
        n = self.server.rejected.get(reason, 0)
        self.server.rejected[reason] = n + 1
        if n == 0:
            log.exception("KV server failed on a%s %s; further failures are only counted",
                          "n" if what[0] in "aeiou" else "", what)

    def drain_subscriptions(self) -> None:
        """Welcome each SUB that subscribes to a welcome topic: its subscriptions travel in
        order on one connection, so the ones it sent before are in place by now."""
        for _ in range(BATCH):
            try:
                msg = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            welcome = p.welcome_for(msg)
            if welcome is not None:
                self.pub.send(welcome)

    def drain_requests(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self.request(frames)
                if reply is not None:
                    self.router.send_multipart([frames[0], frames[1], frames[2], reply])
            except Exception:  # a bug of ours: the server must go on regardless
                self.internal_error("request")

    def request(self, frames: list[bytes]) -> bytes | None:
        """The reply to ``[identity, cmd, request_id, payload?]``, or None to drop it."""
        if len(frames) not in (3, 4):
            self.reject("request: wrong frame count", f"{len(frames) - 1} frames")
            return None
        size = sum(len(f) for f in frames[1:])
        if size > p.MAX_REQUEST:
            self.reject("request: too large", f"{size} bytes")
            return None
        cmd = frames[1]
        if cmd == p.HELLO:
            return self.server._hello  # a payload, if any, means nothing
        if cmd != p.SNAPSHOT:
            self.reject("request: unknown command", p.brief(cmd))
            return None
        subtrees = self.subtrees(frames[3] if len(frames) == 4 else None)
        return None if subtrees is None else self.snapshot(subtrees)

    def subtrees(self, payload: bytes | None) -> list[str] | None:
        """The subtrees a SNAPSHOT request asks for (None: malformed, dropped)."""
        if payload is None:
            return [""]
        try:
            request = p.unpack(payload)
        except Exception as exc:
            self.reject("snapshot request: not msgpack", f"{type(exc).__name__}: {exc}")
            return None
        if not isinstance(request, dict):
            self.reject("snapshot request: not a map", p.brief(request))
            return None
        subtrees = request.get("subtrees", [""])
        if not (
            isinstance(subtrees, list)
            and len(subtrees) <= p.MAX_SUBTREES
            and all(isinstance(s, str) and len(s.encode(errors="replace")) <= p.MAX_KEY for s in subtrees)
        ):
            self.reject("snapshot request: subtrees not a list of strings", p.brief(subtrees))
            return None
        subtrees = list(dict.fromkeys(subtrees)) or [""]
        new = [s for s in subtrees if s not in self.counts]
        if len(self.counts) + len(new) > p.MAX_COUNTED_SUBTREES:
            # Every heartbeat carries every count: the table must stay small.
            self.reject("snapshot request: too many distinct subtrees", f"{len(self.counts)} counted")
            return None
        return subtrees

    def snapshot(self, subtrees: list[str]) -> bytes:
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
        secure = self.auth is not None
        writer = None
        for _ in range(BATCH):
            try:
                if secure:
                    parts = self.collector.recv_multipart(zmq.NOBLOCK, copy=False)
                    # The identity the ZAP handler gave this peer's key (security.Zap)
                    try:
                        writer = parts[0].get("User-Id")
                    except (zmq.ZMQError, KeyError):  # none: not authenticated, so not allowed to write
                        writer = None
                    frames = [f.bytes for f in parts]
                else:
                    frames = self.collector.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.update(frames, writer)
            except Exception:  # a bug of ours: the server must go on regardless
                self.internal_error("update")

    def update(self, frames: list[bytes], writer: str | None = None) -> None:
        """Check ``[key, packb([ttl, refresh, origin]), body]`` (and, with security, that ``writer``
        may write the key), then apply it."""
        if len(frames) != 3:
            self.reject("update: wrong frame count", f"{len(frames)} frames")
            return
        key_b, header, body = frames
        if not key_b:
            self.reject("update: empty key")
            return
        if len(key_b) > p.MAX_KEY:
            self.reject("update: key too long", f"{len(key_b)} bytes")
            return
        try:
            key = key_b.decode()
        except UnicodeDecodeError:
            self.reject("update: key not UTF-8", p.brief(key_b))
            return
        if len(header) > 128:  # a real one is about 30 bytes
            self.reject("update: header not [ttl, refresh, origin]", f"{len(header)} bytes")
            return
        try:
            fields = p.unpack(header)
        except Exception as exc:
            self.reject("update: header not msgpack", f"{type(exc).__name__}: {exc}")
            return
        if not (isinstance(fields, list) and len(fields) == 3):
            self.reject("update: header not [ttl, refresh, origin]", p.brief(fields))
            return
        ttl, refresh, origin = fields
        if not p.is_ttl(ttl):
            self.reject("update: bad ttl", p.brief(ttl))
            return
        if type(refresh) is not bool:
            self.reject("update: bad refresh flag", p.brief(refresh))
            return
        if not (isinstance(origin, bytes) and len(origin) == p.ORIGIN_LEN):
            # b"" is kept for the server's own updates (expiries).
            self.reject("update: bad origin", p.brief(origin))
            return
        if len(body) > p.MAX_BODY:
            self.reject("update: body too large", f"{len(body)} bytes")
            return
        # Decoded once here so that no client ever has to meet a body it cannot decode.
        if body != p.DELETED and not p.decodes(body):
            self.reject("update: body not msgpack", f"{len(body)} bytes {p.brief(body[:16])}")
            return
        if self.auth is not None and not (writer and self.auth.policy.allows(writer, key)):
            self.deny(writer or "(unauthenticated)", key, body == p.DELETED)
            return
        self.apply(key, body, ttl, refresh, origin)

    # -- security (with auth only) ---------------------------------------------

    def deny(self, writer: str, key: str, delete: bool) -> None:
        """A write the writer's identity may not make: counted and named; the key is untouched."""
        from zpipe.security import DENIED_PREFIX

        if len(self.auth.denied) >= 4096 and writer not in self.auth.denied:
            writer = "(others)"  # identities come from the key directory: never this many
        rec = self.auth.denied.setdefault(writer, {"writes": 0})
        rec.update(writes=rec["writes"] + 1, last_key=key, delete=delete, at=time.time())
        self.denied_dirty.add(writer)
        kind = key.split("/", 1)[0]
        if (writer, kind) not in self.denied_logged and len(self.denied_logged) < 10_000:
            self.denied_logged.add((writer, kind))
            log.warning("KV server at %s refused %s of %r by %r: not a key that identity may write; further "
                        "refusals of its %s/ writes are only counted (%s%s)", self.server._address,
                        "a delete" if delete else "a write", key, writer, kind, DENIED_PREFIX, writer)

    def publish_security(self) -> None:
        """The counts of refused writes and handshakes, as keys anyone in the pipeline can read
        (at most once a heartbeat: a flood of refusals costs one update per identity per beat)."""
        from zpipe.security import DENIED_PREFIX, HANDSHAKES_KEY

        for writer in self.denied_dirty:
            self.apply(DENIED_PREFIX + writer, p.pack(self.auth.denied[writer]), None, False, b"")
        self.denied_dirty.clear()
        zap = self.auth.zap
        total = (zap.total_rejected if zap is not None else 0) + sum(self.protocol_failed.values())
        if total != self.handshakes_published:
            try:
                by_reason = dict(zap.rejected) if zap is not None else {}
            except RuntimeError:  # the ZAP thread changed the counter as we copied it: next beat
                return
            by_reason.update({f"no CURVE handshake ({what})": n for what, n in self.protocol_failed.items()})
            value = {"rejected": sum(by_reason.values()), "by_reason": by_reason,
                     "last": zap.last if zap is not None else None}
            self.handshakes_published = total
            self.apply(HANDSHAKES_KEY, p.pack(value), None, False, b"")

    def apply(self, key: str, body: bytes, ttl: float | None, refresh: bool, origin: bytes) -> None:
        current = self.store.get(key)
        if body == p.DELETED:
            if current is None:
                return
            del self.store[key]
            self.deadline.pop(key, None)
        else:
            if ttl is not None:
                deadline = time.monotonic() + ttl
                self.deadline[key] = deadline
                heapq.heappush(self.heap, (deadline, key))
                if len(self.heap) > 2 * len(self.deadline) + 1024:
                    # Every refresh leaves a stale entry until its deadline; a
                    # flood of refreshes with long TTLs must not pile them up.
                    self.heap = [(d, k) for k, d in self.deadline.items()]
                    heapq.heapify(self.heap)
            else:
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
    auth=None,
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
            auth=auth,
        )
        server.run(stop, on_ready)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
