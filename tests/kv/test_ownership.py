"""Who owns a key: an ephemeral key is its creator's, a plain key its last writer's.

Real server and clients in one process over loopback; the outsider is either
another KVClient or a raw PUSH to the collector (anything can write there).
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import zmq

from zpipe.kv import KVClient, KVServer, protocol as p
from zpipe.kv.agent import Agent

OUTSIDER = b"\x42" * 8


@pytest.fixture
def connect(server):
    made: list[KVClient] = []

    def make(subtrees=("",), name="", **kw) -> KVClient:
        kw.setdefault("heartbeat_timeout", 2.0)
        c = KVClient(server.address, subtrees, name=name, **kw)
        made.append(c)
        return c.start()

    try:
        yield make
    finally:
        for c in made:
            c.close(withdraw=False)


class Raw:
    """A PUSH to the collector that writes as a foreign client would."""

    def __init__(self, server: KVServer):
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.linger = 0
        with zmq.Context.instance().socket(zmq.DEALER) as d:
            d.linger = 0
            d.connect(server.address)
            d.send_multipart([p.HELLO, b"1", b""])
            assert d.poll(5000)
            self.sock.connect(p.unpack(d.recv_multipart()[2])["collector"])
        self.writes = 0

    def write(self, key: str, value=None, *, delete: bool = False, ttl=None) -> None:
        self.writes += 1
        origin = OUTSIDER + self.writes.to_bytes(8, "big")
        body = p.DELETED if delete else p.pack(value)
        self.sock.send_multipart([key.encode(), p.pack([ttl, False, origin]), body])

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def raw(server):
    r = Raw(server)
    try:
        yield r
    finally:
        r.close()


class Recorder:
    """Every change an observer sees, with when it saw it."""

    def __init__(self, client: KVClient, key: str):
        self.key = key
        self.seen: list[tuple[float, object]] = []
        self.lock = threading.Lock()
        client.on_change(self._on)

    def _on(self, key, value) -> None:
        if key == self.key:
            with self.lock:
                self.seen.append((time.monotonic(), value))

    def wait_for(self, value, after: int, timeout: float = 5.0) -> tuple[int, float]:
        """Index and time of the first ``value`` seen at index >= ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                for i in range(after, len(self.seen)):
                    if self.seen[i][1] == value:
                        return i, self.seen[i][0]
            assert time.monotonic() < deadline, f"{value!r} not seen: {self.seen}"
            time.sleep(0.002)


@pytest.mark.timeout(20)
def test_outsider_overwrite_and_delete_are_undone_by_the_owner(connect, raw, caplog):
    caplog.set_level(logging.WARNING, logger="zpipe.kv")
    key = "endpoints/n/0/out"
    owner = connect(name="owner")
    observers = [connect(name="everything"), connect(["endpoints/"], name="endpoints")]
    owner.set(key, "owner's", ttl=3.0)
    for c in (owner, *observers):
        c.wait(lambda items: items.get(key) == "owner's")
    rec = Recorder(observers[0], key)

    raw.write(key, "intruder's")
    i, t_bad = rec.wait_for("intruder's", 0)
    _, t_back = rec.wait_for("owner's", i)
    overwrite = t_back - t_bad

    raw.write(key, delete=True)
    i, t_bad = rec.wait_for(None, i)
    _, t_back = rec.wait_for("owner's", i)
    deletion = t_back - t_bad

    # Twice more in quick succession: a third restore, or a fourth that the
    # rate limit holds back for up to 1 / RESTORE_RATE seconds.
    raw.write(key, "again")
    raw.write(key, "and again", ttl=1.0)
    rec.wait_for("and again", i)
    time.sleep(1 / Agent.RESTORE_RATE + 0.2)
    for c in (owner, *observers):
        c.wait(lambda items: items.get(key) == "owner's", timeout=2)
    print(f"restored {overwrite * 1000:.1f} ms after an overwrite was seen, "
          f"{deletion * 1000:.1f} ms after a deletion; restored={owner.restored}")
    assert overwrite < 0.1 and deletion < 0.1
    assert owner.restored[key] in (3, 4)  # the last two writes may land before one restore
    for c in (owner, *observers):
        assert c.get(key) == "owner's"
    logged = [r for r in caplog.records if "restored its ephemeral key" in r.getMessage()]
    assert len(logged) == 1
    # The restored key is still refreshed: it outlives its TTL.
    time.sleep(1.2)
    assert observers[1].get(key) == "owner's"


@pytest.mark.timeout(20)
def test_restore_when_the_owner_missed_the_overwrite(server, connect, raw):
    """Overwritten while the owner was out of step (a lost update): the owner's
    next snapshot shows it, and the owner restores its key then."""
    key = "eph"
    owner = connect(name="owner", heartbeat_timeout=30)
    observer = connect(name="observer", heartbeat_timeout=30)
    owner.set(key, "owner's", ttl=3.0)
    observer.wait(lambda items: items.get(key) == "owner's")
    time.sleep(0.1)  # the echo has reached the owner
    server.drop_next_updates(1)
    raw.write(key, "intruder's")  # numbered, not published: nobody sees it
    time.sleep(0.1)
    assert owner.get(key) == "owner's"
    owner.set("other", 1)  # whose sequence number reveals the gap
    observer.wait(lambda items: items.get(key) == "owner's" and "other" in items, timeout=5)
    assert owner.restored == {key: 1} and owner.resyncs == 1


@pytest.mark.timeout(20)
def test_keys_the_owner_deleted_or_withdrew_are_not_restored(connect, raw):
    owner = connect(name="owner")
    observer = connect(name="observer")
    owner.set("deleted", 1, ttl=3.0)
    owner.set("withdrawn", 2, ttl=3.0)
    observer.wait(lambda items: len(items) == 2)
    raw.write("deleted", "intruder's")
    observer.wait(lambda items: items.get("deleted") == 1 and owner.restored.get("deleted") == 1)
    owner.delete("deleted")
    observer.wait(lambda items: "deleted" not in items)
    raw.write("deleted", "intruder's again")  # no longer the owner's business
    observer.wait(lambda items: items.get("deleted") == "intruder's again")
    owner.close()  # withdraws "withdrawn"
    observer.wait(lambda items: "withdrawn" not in items)
    raw.write("withdrawn", "someone else's")
    observer.wait(lambda items: items.get("withdrawn") == "someone else's")
    time.sleep(0.3)
    assert observer.items() == {"deleted": "intruder's again", "withdrawn": "someone else's"}
    assert owner.restored == {"deleted": 1}


@pytest.mark.timeout(20)
def test_two_owners_of_one_ephemeral_key_do_not_fight_at_full_speed(connect):
    a, b = connect(name="a"), connect(name="b")
    observer = connect(name="observer")
    a.set("contested", "a", ttl=3.0)
    a.wait(lambda items: items.get("contested") == "a")
    seq0 = observer.sequence
    b.set("contested", "b", ttl=3.0)
    t0 = time.monotonic()
    time.sleep(1.5)
    elapsed = time.monotonic() - t0
    restores = a.restored.get("contested", 0) + b.restored.get("contested", 0)
    updates = observer.sequence - seq0
    print(f"two owners over {elapsed:.1f} s: {restores} restores ({a.restored} / {b.restored}), "
          f"{updates} updates seen by an observer")
    # Each restores at most a burst plus a steady rate: a few per second, not thousands.
    bound = 2 * (Agent.RESTORE_BURST + Agent.RESTORE_RATE * (elapsed + 0.2))
    assert 2 <= restores <= bound
    assert updates <= restores + 2
    # Whoever lets go (deletes) leaves the key to the other (once a restore of
    # its own still on its way, and the other's answer to it, have landed).
    a.delete("contested")
    time.sleep(1 / Agent.RESTORE_RATE + 0.2)
    observer.wait(lambda items: items.get("contested") == "b", timeout=3)
    seq = observer.sequence
    time.sleep(0.5)
    assert observer.sequence == seq and observer.get("contested") == "b"
