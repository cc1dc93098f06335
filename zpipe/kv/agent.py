"""The thread that owns a KVClient's sockets and runs the Clone protocol for it.

ZeroMQ sockets are not thread-safe, so everything that touches them lives here, in
one thread; the KVClient methods only queue commands for it and read the state it
maintains (the agent is their friend: it calls the client's underscored
methods). Split from client.py so the protocol logic reads on its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


class Agent:
    """Owns every socket of one KVClient and runs its protocol, in its thread.

    Phases: ``hello`` (ask the bootstrap for the server's epoch and ports),
    ``snapshot`` (ask for the state), ``live`` (apply updates). Any doubt about
    being in step sends it back to ``hello``.
    """

    HELLO_TIMEOUT = 0.5  # doubled on each retry, up to MAX_TIMEOUT
    SNAPSHOT_TIMEOUT = 5.0
    MAX_TIMEOUT = 10.0

    def __init__(self, client: KVClient):
        self.c = client
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.poller.register(client._wake_r.fileno(), zmq.POLLIN)
        self.dealer: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.push: zmq.Socket | None = None
        self.endpoints: tuple[str, str] | None = None
        self.bootstrap_host = (
            p.split_tcp(client.address)[0] if client.address.startswith("tcp://") else ""
        )
        self.old_epochs: set[str] = set()
        self.counts: dict[str, int] = {}
        self.owned: dict[str, Owned] = {}
        self.refresh_due: dict[str, float] = {}  # ephemeral owned key -> next refresh
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
                if ttl is None:
                    self.refresh_due.pop(key, None)
                else:
                    self.refresh_due[key] = time.monotonic() + ttl / 3
                self.send(key, owned)
            elif cmd[0] == "delete":
                key = cmd[1]
                self.owned.pop(key, None)
                self.refresh_due.pop(key, None)
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

    def resync(self, why: str) -> None:
        # Right after joining, a gap is the expected race between the snapshot and a SUB
        # connection still being made (ZeroMQ guide, Clone): not worth a user's attention.
        level = logging.DEBUG if time.monotonic() - self.started < 5.0 else logging.INFO
        log.log(level, "KV client %s re-synchronising: %s", self.c.name, why)
        self.c.resyncs += 1
        self.attempt = 0
        self.hello()

    def on_replies(self) -> None:
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or (frames[0], frames[1]) != self.pending:
                continue  # an answer to a request we gave up on
            self.pending = (b"", b"")
            if frames[0] == p.HELLO:
                self.on_hello(p.unpack(frames[2]))
            else:
                self.on_snapshot(p.unpack(frames[2]))

    def on_hello(self, info: dict) -> None:
        if info["epoch"] != self.c.epoch:
            if self.c.epoch is not None:
                self.old_epochs.add(self.c.epoch)
            self.c.epoch = info["epoch"]
            self.republish = True  # a new server knows nothing of our keys
            # Never give up on a live server faster than it beats.
            self.heartbeat_timeout = max(self.c.heartbeat_timeout, 2.5 * info["heartbeat"])
        endpoints = (self.locate(info["pub"]), self.locate(info["collector"]))
        if endpoints != self.endpoints:
            self.connect(*endpoints)
        # The SUB is connected and subscribed before we ask for the snapshot, so
        # every update after it is queued for us (the Clone pattern's order).
        self.phase = "snapshot"
        self.request(p.SNAPSHOT, p.pack({"subtrees": list(self.c.subtrees)}), self.SNAPSHOT_TIMEOUT)

    def on_snapshot(self, snap: dict) -> None:
        if snap["epoch"] != self.c.epoch:
            self.resync("server restarted during snapshot")
            return
        self.counts = {s: snap["counts"].get(s, 0) for s in self.c.subtrees}
        state = {key: p.unpack(body) for key, body, _ttl in snap["entries"]}
        self.c._install(state, snap["seq"])
        self.phase = "live"
        self.attempt = 0
        self.last_heard = time.monotonic()
        self.poller.register(self.sub, zmq.POLLIN)
        if self.republish:
            self.republish = False
            for key, owned in self.owned.items():
                self.send(key, owned)
        self.c._synced.set()

    def on_updates(self) -> None:
        # Bounded batch, so commands and timers get a turn under a flood.
        for _ in range(1000):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            topic = frames[0]
            if topic == p.HEARTBEAT_TOPIC:
                self.on_heartbeat(p.unpack(frames[1]))
            elif len(frames) == 3:
                self.on_update(topic[1:].decode(), p.unpack(frames[1]), frames[2])
            if self.phase != "live":
                return  # resynchronising: what is still queued waits for the snapshot

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
        owned = self.owned.get(key)
        if owned is not None:
            if origin[:8] == self.c.client_id:
                if int.from_bytes(origin[8:], "big") == owned.write:
                    owned.echoed = True
            elif origin:
                # Another client wrote the key after our last write reached the
                # server: the last writer owns it (else two owners would fight
                # over it at every refresh).
                if owned.echoed:
                    del self.owned[key]
                    self.refresh_due.pop(key, None)
            elif key in self.refresh_due:
                # The server let our key expire (we were stalled): put it back.
                self.refresh_due[key] = 0.0
        deleted = body == p.DELETED
        self.c._apply(key, None if deleted else p.unpack(body), deleted, seq)

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
        self.dealer.linger = 0
        self.dealer.connect(self.c.address)
        self.poller.register(self.dealer, zmq.POLLIN)

    def connect(self, pub: str, collector: str) -> None:
        self.close_data(push_linger=0)  # anything queued was for a server that is gone
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.rcvhwm = p.HWM
        self.sub.subscribe(p.HEARTBEAT_TOPIC)
        for s in self.c.subtrees:
            self.sub.subscribe(p.UPDATE_TOPIC + s.encode())
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.sub.connect(pub)
        self.push = self.ctx.socket(zmq.PUSH)
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
