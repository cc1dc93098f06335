"""The thread that owns a KVClient's sockets and runs the Clone protocol for it.

ZeroMQ sockets are not thread-safe, so everything that touches them lives here, in
one thread; the KVClient methods only queue commands for it and read the state it
maintains (the agent is their friend: it calls the client's underscored
methods). Split from client.py so the protocol logic reads on its own.

Whatever arrives malformed (protocol.py) is dropped, counted in
``KVClient.rejected`` and logged once per reason; a reply that is wrong makes the
agent ask again (never at full speed), an update that is wrong makes it
re-synchronise. Nothing a server sends can stop the agent.

Ownership: a key we set is ours. A plain key belongs to its last writer: once
another client's write lands after ours, we let it go. An ephemeral key (with a
TTL: endpoints, status, liveness) stays ours: when someone else overwrites or
deletes it we write our value again at once (a token bucket per key bounds how
often, so that two clients setting one key do not fight at full speed), until we
delete it ourselves or close.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as p

if TYPE_CHECKING:
    from .client import KVClient

log = logging.getLogger(__name__)


@dataclass
class Owned:
    body: bytes
    ttl: float | None
    write: int  # our write number for the current value, carried in its origin
    echoed: bool = False  # the server has published this write back to us


def _bad(value: Any, check: Callable[[Any], bool]) -> bool:
    try:
        return not check(value)
    except Exception:
        return True


class Agent:
    """Owns every socket of one KVClient and runs its protocol, in its thread.

    Phases: ``hello`` (ask the bootstrap for the server's epoch and ports),
    ``subscribing`` (a new SUB waits for its welcome: its subscriptions are in place),
    ``snapshot`` (ask for the state), ``live`` (apply updates). Any doubt about
    being in step sends it back to ``hello``.
    """

    HELLO_TIMEOUT = 0.5  # doubled on each retry, up to MAX_TIMEOUT
    SNAPSHOT_TIMEOUT = 5.0
    # A welcome not back by then (a server that sends none, say): take the snapshot
    # anyway; the counts catch what the SUB missed, at the price of a resync.
    WELCOME_TIMEOUT = 1.0
    MAX_TIMEOUT = 10.0
    # After a reply we cannot use, ask again after this long, times 1.5 each
    # time in a row, up to MAX_RETRY: a broken server is not asked at full speed.
    RETRY = 0.05
    MAX_RETRY = 2.0
    # Re-synchronisations closer together than this wait for it (a server that
    # keeps contradicting itself must not make us spin).
    MIN_RESYNC_INTERVAL = 0.1
    # Restores of one ephemeral key that someone else overwrote: a bucket of
    # RESTORE_BURST, refilled at RESTORE_RATE per second.
    RESTORE_BURST = 3
    RESTORE_RATE = 2.0

    def __init__(self, client: KVClient):
        self.c = client
        self.ctx = zmq.Context()
        self.ctx.set(zmq.THREAD_NAME_PREFIX, p.CLIENT_THREADS)
        self.poller = zmq.Poller()
        self.poller.register(client._wake_r.fileno(), zmq.POLLIN)
        self.dealer: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.push: zmq.Socket | None = None
        self.endpoints: tuple[str, str] | None = None
        self.welcome = b""  # the SUB's welcome topic (connect)
        self.bootstrap_host = (
            p.split_tcp(client.address)[0] if client.address.startswith("tcp://") else ""
        )
        self.old_epochs: set[str] = set()
        self.counts: dict[str, int] = {}
        self.owned: dict[str, Owned] = {}
        self.refresh_due: dict[str, float] = {}  # ephemeral owned key -> next refresh
        self.restore_due: dict[str, tuple[float, str]] = {}  # key -> (when, why)
        self.restore_budget: dict[str, tuple[float, float]] = {}  # key -> (tokens, as of)
        self.bad_replies = 0  # in a row
        self.last_resync = -math.inf
        self.writes = 0
        self.republish = False
        self.phase = "hello"
        self.pending = (b"", b"")  # (command, request id) awaiting a reply
        self.request_no = 0
        self.deadline = 0.0
        self.attempt = 0
        self.last_heard = 0.0
        self.heartbeat_timeout = client.heartbeat_timeout
        self.started = time.monotonic()

    # -- main loop -------------------------------------------------------------

    def run(self) -> None:
        self.new_dealer()
        self.hello()
        while True:
            now = time.monotonic()
            timeout = 0.05
            if self.refresh_due:
                timeout = max(0.0, min(timeout, min(self.refresh_due.values()) - now))
            if self.restore_due:
                timeout = max(0.0, min(timeout, min(d for d, _ in self.restore_due.values()) - now))
            events = dict(self.poller.poll(timeout * 1000))
            if self.c._wake_r.fileno() in events:
                self.drain_wake()
            if self.run_commands():
                return
            if self.monitor is not None and self.monitor in events:
                self.on_monitor()
            if self.dealer in events:
                self.on_replies()
            if self.phase == "live" and self.sub in events:
                self.on_updates()
            elif self.phase == "subscribing" and self.sub in events:
                self.on_welcome()
            self.timers(time.monotonic())

    def drain_wake(self) -> None:
        try:
            while self.c._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def run_commands(self) -> bool:
        commands = self.c._commands
        while commands:
            cmd = commands.popleft()
            if cmd[0] == "set":
                _, key, body, ttl = cmd
                self.writes += 1
                owned = self.owned[key] = Owned(body, ttl, self.writes)
                self.restore_due.pop(key, None)  # this write lands after what we meant to undo
                if ttl is None:
                    self.refresh_due.pop(key, None)
                else:
                    self.refresh_due[key] = time.monotonic() + ttl / 3
                self.send(key, owned)
            elif cmd[0] == "delete":
                key = cmd[1]
                self.owned.pop(key, None)
                self.refresh_due.pop(key, None)
                self.restore_due.pop(key, None)
                self.restore_budget.pop(key, None)
                self.send(key, None)
            elif cmd[0] == "close":
                if cmd[1]:
                    for key in self.refresh_due:
                        self.send(key, None)
                return True
        return False

    def timers(self, now: float) -> None:
        if self.phase != "live" and now >= self.deadline:
            # Lazy Pirate: a request unanswered in time may be stuck in a dead
            # connection's queue, so retry on a fresh socket with a longer wait.
            self.attempt += 1
            self.new_dealer()
            self.hello()
        elif self.phase == "live" and now - self.last_heard > self.heartbeat_timeout:
            self.resync(f"no heartbeat for {self.heartbeat_timeout:g} s")
        for key, due in self.refresh_due.items():
            if now >= due:
                owned = self.owned[key]
                self.send(key, owned, refresh=True)
                self.refresh_due[key] = now + owned.ttl / 3
        if self.restore_due:
            for key, (due, why) in list(self.restore_due.items()):
                if now >= due:
                    del self.restore_due[key]
                    self.restore(key, why, now)

    # -- talking to the server -------------------------------------------------

    def send(self, key: str, owned: Owned | None, refresh: bool = False) -> None:
        """Send our value of ``key``, or its deletion when ``owned`` is None."""
        if self.push is None:
            return  # not connected yet: owned keys go out when we are (republish)
        if owned is None:
            body, ttl, write = p.DELETED, None, 0
        else:
            body, ttl, write = owned.body, owned.ttl, owned.write
        origin = self.c.client_id + write.to_bytes(8, "big")
        header = p.pack([ttl, refresh, origin])
        try:
            self.push.send_multipart([key.encode(), header, body], zmq.NOBLOCK)
        except zmq.Again:
            # Queue full: the server is gone or stalled. Owned keys are
            # re-published to whichever server answers next.
            pass

    def request(self, cmd: bytes, payload: bytes, timeout: float) -> None:
        self.request_no += 1
        self.pending = (cmd, str(self.request_no).encode())
        self.deadline = time.monotonic() + min(timeout * 2**self.attempt, self.MAX_TIMEOUT)
        try:
            self.dealer.send_multipart([cmd, self.pending[1], payload], zmq.NOBLOCK)
        except zmq.Again:
            pass  # retried at the deadline

    def hello(self) -> None:
        if self.sub is not None:
            self.poller.register(self.sub, 0)  # leave updates queued until the snapshot
        self.phase = "hello"
        self.request(p.HELLO, b"", self.HELLO_TIMEOUT)

    def ask_again(self, delay: float) -> None:
        """Start over with a HELLO on a fresh socket, ``delay`` from now (timers)."""
        if self.sub is not None:
            self.poller.register(self.sub, 0)
        self.phase = "hello"
        self.pending = (b"", b"")
        self.deadline = time.monotonic() + delay

    def resync(self, why: str) -> None:
        # Right after joining, a gap is the expected race between the snapshot and a SUB
        # connection still being made (ZeroMQ guide, Clone): not worth a user's attention.
        now = time.monotonic()
        level = logging.DEBUG if now - self.started < 5.0 else logging.INFO
        log.log(level, "KV client %s re-synchronising: %s", self.c.name, why)
        self.c.resyncs += 1
        self.attempt = 0
        if now - self.last_resync < self.MIN_RESYNC_INTERVAL:
            self.ask_again(self.last_resync + self.MIN_RESYNC_INTERVAL - now)
        else:
            self.hello()
        self.last_resync = now

    def reject(self, reason: str, detail: str = "") -> None:
        p.reject(self.c.rejected, reason, log, f"KV client {self.c.name}", detail)

    def retry_delay(self) -> float:
        return min(self.RETRY * 1.5 ** min(self.bad_replies, 20), self.MAX_RETRY)

    def bad_reply(self, reason: str, detail: str = "") -> None:
        """Drop a reply we cannot use and ask again soon (timers does)."""
        self.reject(reason, detail)
        self.ask_again(self.retry_delay())
        self.bad_replies += 1

    def on_replies(self) -> None:
        while self.dealer is not None:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or (frames[0], frames[1]) != self.pending:
                # One request at a time per socket, and a fresh socket for each
                # retry: a reply we are not waiting for is not a late one.
                self.reject("reply: not the one awaited", f"{len(frames)} frames, {p.brief(frames[:2])}")
                continue
            self.pending = (b"", b"")
            try:
                if frames[0] == p.HELLO:
                    self.on_hello(frames[2])
                else:
                    self.on_snapshot(frames[2])
            except Exception:  # a bug of ours, or a check we missed: ask again
                self.internal_error("reply")
                self.ask_again(self.MAX_RETRY)

    def internal_error(self, what: str) -> None:
        reason = f"{what}: internal error"
        n = self.c.rejected.get(reason, 0)
        self.c.rejected[reason] = n + 1
        if n == 0:
            log.exception("KV client %s failed on a %s; further failures are only counted",
                          self.c.name, what)

    def decode(self, data: bytes, what: str) -> tuple[bool, Any]:
        try:
            return True, p.unpack(data)
        except Exception as exc:
            self.bad_reply(f"{what}: not msgpack", f"{type(exc).__name__}: {exc}")
            return False, None

    def on_hello(self, payload: bytes) -> None:
        ok, info = self.decode(payload, "hello reply")
        if not ok:
            return
        if not isinstance(info, dict):
            self.bad_reply("hello reply: not a map", p.brief(info))
            return
        checks = {
            "epoch": lambda v: isinstance(v, str) and 0 < len(v) <= p.MAX_EPOCH,
            "pub": lambda v: isinstance(v, str) and v,
            "collector": lambda v: isinstance(v, str) and v,
            "heartbeat": lambda v: type(v) in (int, float) and 0 < v <= p.MAX_HEARTBEAT,
        }
        for field, check in checks.items():
            if _bad(info.get(field), check):
                self.bad_reply("hello reply: bad field", f"{field}={p.brief(info.get(field))}")
                return
        try:
            endpoints = (self.locate(info["pub"]), self.locate(info["collector"]))
            connected = endpoints != self.endpoints
            if connected:
                self.connect(*endpoints)
        except (ValueError, zmq.ZMQError) as exc:
            self.close_data(push_linger=0)
            self.bad_reply("hello reply: bad endpoint", f"{p.brief(info['pub'])}, "
                           f"{p.brief(info['collector'])}: {exc}")
            return
        if info["epoch"] != self.c.epoch:
            if self.c.epoch is not None:
                self.old_epochs.add(self.c.epoch)
            self.c.epoch = info["epoch"]
            self.republish = True  # a new server knows nothing of our keys
            # Never give up on a live server faster than it beats.
            self.heartbeat_timeout = max(self.c.heartbeat_timeout, 2.5 * info["heartbeat"])
        if connected:
            # Subscriptions travel while the connection is made: wait until the server
            # has them (our welcome), or a snapshot could be older than our first update.
            self.phase = "subscribing"
            self.poller.register(self.sub, zmq.POLLIN)
            self.deadline = time.monotonic() + self.WELCOME_TIMEOUT
        else:
            self.ask_snapshot()

    def on_welcome(self) -> None:
        for _ in range(1000):  # bounded: a flood must leave the timers their turn
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames == [self.welcome]:
                self.ask_snapshot()
                return
            # Anything else is older than the snapshot still to come.

    def ask_snapshot(self) -> None:
        # The SUB is subscribed before we ask for the snapshot, so every update after
        # it is queued for us (the Clone pattern's order). Whatever is queued already
        # is older than the snapshot: drop it now, so that a backlog (a flood from a
        # misbehaving server, say) costs one snapshot, not one resync per message
        # that does not fit.
        self.poller.register(self.sub, 0)  # queued until the snapshot is in
        self.discard_queued()
        self.phase = "snapshot"
        self.request(p.SNAPSHOT, p.pack({"subtrees": list(self.c.subtrees)}), self.SNAPSHOT_TIMEOUT)

    def discard_queued(self) -> None:
        for _ in range(p.HWM):
            try:
                self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return

    def on_snapshot(self, payload: bytes) -> None:
        ok, snap = self.decode(payload, "snapshot reply")
        if not ok:
            return
        if not isinstance(snap, dict):
            self.bad_reply("snapshot reply: not a map", p.brief(snap))
            return
        checks = {
            "epoch": lambda v: isinstance(v, str),
            "seq": lambda v: p.is_int(v) and v >= 0,
            "counts": p.is_counts,
            "entries": lambda v: isinstance(v, list),
        }
        for field, check in checks.items():
            if _bad(snap.get(field), check):
                self.bad_reply("snapshot reply: bad field", f"{field}={p.brief(snap.get(field))}")
                return
        if snap["epoch"] != self.c.epoch:
            # A server restarted between our HELLO and SNAPSHOT (or one that
            # contradicts itself): start over, soon but not at once.
            log.debug("KV client %s: snapshot from epoch %s, not %s", self.c.name, snap["epoch"], self.c.epoch)
            self.c.resyncs += 1
            self.ask_again(self.retry_delay())
            self.bad_replies += 1
            return
        state: dict[str, Any] = {}
        bodies: dict[str, bytes] = {}
        for entry in snap["entries"]:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and entry[0]
                and isinstance(entry[1], bytes)
            ):
                self.reject("snapshot entry: malformed", p.brief(entry))
                continue
            key, body = entry[0], entry[1]
            if not self.follows(key):
                self.reject("snapshot entry: outside our subtrees", p.brief(key))
                continue
            try:
                state[key] = p.unpack(body)
            except Exception as exc:
                # Skip the key: the same rule as for an update (on_update).
                self.reject("snapshot entry: body not msgpack", f"{key!r}: {type(exc).__name__}: {exc}")
                continue
            bodies[key] = body
        self.counts = {s: snap["counts"].get(s, 0) for s in self.c.subtrees}
        self.c._install(state, snap["seq"])
        self.phase = "live"
        self.attempt = 0
        self.bad_replies = 0
        self.last_heard = time.monotonic()
        self.poller.register(self.sub, zmq.POLLIN)
        if self.republish:
            self.republish = False
            for key, owned in self.owned.items():
                self.send(key, owned)
        else:
            self.check_owned(bodies)
        self.c._synced.set()

    def follows(self, key: str) -> bool:
        return any(key.startswith(s) for s in self.c.subtrees)

    def check_owned(self, bodies: dict[str, bytes]) -> None:
        """After a resync: what happened to our keys while we were out of step."""
        for key, owned in list(self.owned.items()):
            if not self.follows(key):
                continue  # we cannot tell
            if bodies.get(key) == owned.body:
                owned.echoed = True  # landed, even if we missed its echo
            elif owned.echoed:  # else our write is still on its way
                self.overwritten(key, owned, "changed while we were re-synchronising")

    def on_updates(self) -> None:
        # Bounded batch, so commands and timers get a turn under a flood.
        for _ in range(1000):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.on_message(frames)
            except Exception:  # a bug of ours, or a check we missed: start afresh
                self.internal_error("update")
                self.resync("failed on an update")
            if self.phase != "live":
                return  # resynchronising: what is still queued waits for the snapshot

    def on_message(self, frames: list[bytes]) -> None:
        topic = frames[0]
        if topic == p.HEARTBEAT_TOPIC:
            if len(frames) != 2:
                self.reject("heartbeat: wrong frame count", f"{len(frames)} frames")
                return
            try:
                beat = p.unpack(frames[1])
            except Exception as exc:
                self.reject("heartbeat: not msgpack", f"{type(exc).__name__}: {exc}")
                return
            if not (
                isinstance(beat, dict)
                and isinstance(beat.get("epoch"), str)
                and p.is_int(beat.get("seq"))
                and p.is_counts(beat.get("counts"))
            ):
                self.reject("heartbeat: not {epoch, seq, counts}", p.brief(beat))
                return
            self.on_heartbeat(beat)
            return
        if topic.startswith(p.WELCOME_TOPIC):
            return  # ours again after a reconnection, or another's: nothing to do live
        if not topic.startswith(p.UPDATE_TOPIC):
            self.reject("update: unknown topic", p.brief(topic[:32]))
            return
        if len(frames) != 3:
            self.reject("update: wrong frame count", f"{len(frames)} frames")
            return
        try:
            key = topic[1:].decode()
        except UnicodeDecodeError:
            self.reject("update: key not UTF-8", p.brief(topic[:32]))
            return
        if not key:
            self.reject("update: empty key")
            return
        try:
            header = p.unpack(frames[1])
        except Exception as exc:
            self.reject("update: header not msgpack", f"{type(exc).__name__}: {exc}")
            return
        if not (
            isinstance(header, list)
            and len(header) == 5
            and p.is_int(header[0])
            and isinstance(header[1], str)
            and p.is_ttl(header[2])
            and isinstance(header[3], bytes)
            and p.is_counts(header[4])
        ):
            self.reject("update: header not [seq, epoch, ttl, origin, counts]", p.brief(header))
            return
        self.on_update(key, header, frames[2])

    def from_current_server(self, epoch: str) -> bool:
        if epoch == self.c.epoch:
            self.last_heard = time.monotonic()
            return True
        if epoch not in self.old_epochs:  # old servers' leftovers are just dropped
            self.resync("new server")
        return False

    def on_heartbeat(self, beat: dict) -> None:
        if not self.from_current_server(beat["epoch"]):
            return
        if beat["seq"] < self.c._seq:
            return  # sent before our snapshot
        for s in self.c.subtrees:
            # Catches a lost update that no later update of ours would reveal.
            if beat["counts"].get(s, 0) != self.counts[s]:
                self.resync(f"missed updates under {s!r} (heartbeat)")
                return

    def on_update(self, key: str, header: list, body: bytes) -> None:
        seq, epoch, ttl, origin, counts = header
        if not self.from_current_server(epoch) or seq <= self.c._seq:
            return  # older than our snapshot
        matched = [s for s in self.c.subtrees if key.startswith(s)]
        for s in matched:
            if counts.get(s) != self.counts[s] + 1:
                self.resync(f"sequence gap under {s!r} at update {seq}")
                return
        for s in matched:
            self.counts[s] = counts[s]
        deleted = body == p.DELETED
        value = None
        if not deleted:
            try:
                value = p.unpack(body)
            except Exception as exc:
                # In step all the same (seq and counts are fine): the key is
                # absent here, as it is from a snapshot that holds this body.
                self.reject("update: body not msgpack", f"{key!r}: {type(exc).__name__}: {exc}")
                deleted = True
        owned = self.owned.get(key)
        if owned is not None:
            self.on_owned(key, owned, origin, deleted)
        self.c._apply(key, value, deleted, seq)

    def on_owned(self, key: str, owned: Owned, origin: bytes, deleted: bool) -> None:
        """An update of a key we own: ours coming back, or someone else's."""
        if origin[:8] == self.c.client_id:
            if int.from_bytes(origin[8:], "big") == owned.write:
                owned.echoed = True
        elif not origin:
            if key in self.refresh_due:
                # The server let our key expire (we were stalled): put it back.
                self.refresh_due[key] = 0.0
        elif owned.echoed:
            # Else our latest write reaches the server after this one: it wins anyway.
            self.overwritten(key, owned, f"{'deleted' if deleted else 'overwritten'} by client {origin[:8].hex()}")

    def overwritten(self, key: str, owned: Owned, why: str) -> None:
        """Another client's write landed after ours."""
        if owned.ttl is None:
            # A plain key: the last writer owns it (several processes update one
            # scan record), so we do not put our value back after a restart.
            del self.owned[key]
            self.refresh_due.pop(key, None)
            return
        # An ephemeral key is its creator's (endpoints, status): restore it.
        if key in self.restore_due:
            return
        now = time.monotonic()
        tokens = self.tokens(key, now)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.RESTORE_RATE
        self.restore_due[key] = (now + wait, why)

    def tokens(self, key: str, now: float) -> float:
        tokens, since = self.restore_budget.get(key, (self.RESTORE_BURST, now))
        return min(self.RESTORE_BURST, tokens + (now - since) * self.RESTORE_RATE)

    def restore(self, key: str, why: str, now: float) -> None:
        owned = self.owned.get(key)
        if owned is None or owned.ttl is None:
            return  # deleted, or set as a plain key, since
        self.restore_budget[key] = (self.tokens(key, now) - 1, now)
        # A new write (not a refresh): its echo tells us when it has landed, and
        # until then, writes we see land before it and need no restore of their own.
        self.writes += 1
        owned.write, owned.echoed = self.writes, False
        self.send(key, owned)
        self.refresh_due[key] = now + owned.ttl / 3
        n = self.c.restored.get(key, 0)
        self.c.restored[key] = n + 1
        if n == 0:
            log.warning("KV client %s restored its ephemeral key %r (%s); further restores "
                        "of it are only counted", self.c.name, key, why)

    def on_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self.phase == "live":
                # A killed server closes its sockets at once: no need to wait
                # for the heartbeat timeout.
                self.resync("lost the connection to the server")

    # -- sockets ---------------------------------------------------------------

    def locate(self, endpoint: str) -> str:
        return p.reachable(endpoint, self.bootstrap_host) if self.bootstrap_host else endpoint

    def new_dealer(self) -> None:
        if self.dealer is not None:
            self.poller.unregister(self.dealer)
            self.dealer.close(linger=0)
        self.dealer = self.ctx.socket(zmq.DEALER)
        if self.c.curve is not None:
            self.c.curve.client(self.dealer)
        self.dealer.linger = 0
        self.dealer.connect(self.c.address)
        self.poller.register(self.dealer, zmq.POLLIN)

    def connect(self, pub: str, collector: str) -> None:
        self.close_data(push_linger=0)  # anything queued was for a server that is gone
        self.sub = self.ctx.socket(zmq.SUB)
        if self.c.curve is not None:
            self.c.curve.client(self.sub)
        self.sub.linger = 0
        self.sub.rcvhwm = p.HWM
        self.sub.subscribe(p.HEARTBEAT_TOPIC)
        for s in self.c.subtrees:
            self.sub.subscribe(p.UPDATE_TOPIC + s.encode())
        # A fresh random token: not the client id, which updates show to every subscriber.
        self.welcome = p.WELCOME_TOPIC + os.urandom(8)
        self.sub.subscribe(self.welcome)
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.sub.connect(pub)
        self.push = self.ctx.socket(zmq.PUSH)
        if self.c.curve is not None:
            self.c.curve.client(self.push)
        self.push.sndhwm = p.HWM
        self.push.connect(collector)
        self.endpoints = (pub, collector)

    def close_data(self, push_linger: int) -> None:
        if self.sub is not None:
            self.poller.register(self.sub, 0)
            self.poller.unregister(self.monitor)
            self.sub.disable_monitor()
            self.monitor.close(linger=0)
            self.sub.close(linger=0)
            self.sub = self.monitor = None
        if self.push is not None:
            self.push.close(linger=push_linger)
            self.push = None
        self.endpoints = None

    def shutdown(self) -> None:
        # A short linger lets a clean close's last writes (and withdrawals) out.
        self.close_data(push_linger=500)
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.ctx.term()
