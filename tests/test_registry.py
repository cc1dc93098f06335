"""Endpoint registry over a real KV server, with real PUSH/PULL sockets."""

from __future__ import annotations

import os
import time

import pytest
import zmq

from zpipe.kv import KVClient
from zpipe.registry import Endpoint, Registry, reachable

TTL = 1.0


@pytest.fixture
def registry(server):
    """Factory: a Registry on its own KV client, as each node process has one."""
    clients: list[KVClient] = []

    def make() -> Registry:
        kv = KVClient(server.address, ["endpoints/"], heartbeat_timeout=2.0)
        clients.append(kv)
        return Registry(kv.start(), ttl=TTL)

    try:
        yield make
    finally:
        for kv in clients:
            kv.close(withdraw=False)


@pytest.fixture
def sockets():
    ctx = zmq.Context()
    made: list[zmq.Socket] = []

    def make(kind: int) -> zmq.Socket:
        s = ctx.socket(kind)
        s.linger = 0
        s.rcvtimeo = 5000
        s.sndtimeo = 5000
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close(linger=0)
        ctx.term()


def bound_endpoint(node: str, replica: int, sock: zmq.Socket) -> Endpoint:
    """Bind ``sock`` to any port and describe it as a peer would reach it."""
    sock.bind("tcp://127.0.0.1:0")
    address = reachable(sock.last_endpoint.decode(), "127.0.0.1")
    return Endpoint(node, replica, "out", address, host="127.0.0.1", pid=os.getpid())


@pytest.mark.timeout(30)
def test_resolve_follow_and_expiry(registry, sockets):
    source0, source1, sink = registry(), registry(), registry()

    push0 = sockets(zmq.PUSH)
    ep0 = bound_endpoint("source", 0, push0)
    source0.publish(ep0)
    assert sink.resolve("source", "out", timeout=5) == [ep0]

    pull = sockets(zmq.PULL)
    pull.connect(ep0.address)
    push0.send(b"frame 0")
    assert pull.recv() == b"frame 0"

    follower = sink.follow("source", "out")
    try:
        assert follower.changes() == ([ep0], [])  # what was there already
        assert follower.changes() == ([], [])

        push1 = sockets(zmq.PUSH)
        ep1 = bound_endpoint("source", 1, push1)
        source1.publish(ep1)
        follower.wait(lambda eps: len(eps) == 2)
        assert follower.changes() == ([ep1], [])
        assert sink.resolve("source", "out", replicas=2, timeout=5) == [ep0, ep1]
        pull.connect(ep1.address)
        push1.send(b"frame 1")
        assert pull.recv() == b"frame 1"

        # A clean exit withdraws at once ...
        source1.kv.close()
        follower.wait(lambda eps: eps == [ep0], timeout=2)
        assert follower.changes() == ([], [ep1])
        # ... a crash (no withdrawal, no refresh) lets the key expire.
        source0.kv.close(withdraw=False)
        follower.wait(lambda eps: eps == [], timeout=TTL + 2)
        assert follower.changes() == ([], [ep0])
        assert sink.endpoints("source", "out") == []
    finally:
        follower.close()


@pytest.mark.timeout(30)
def test_endpoints_stay_while_their_owner_lives(registry, sockets):
    owner, reader = registry(), registry()
    ep = bound_endpoint("relay", 0, sockets(zmq.PUSH))
    owner.publish(ep)
    follower = reader.follow("relay", "out")
    try:
        follower.wait(lambda eps: eps == [ep])
        follower.changes()
        time.sleep(TTL * 2.5)  # refreshed by the owner's KV client
        assert follower.changes() == ([], [])
        owner.withdraw(ep)
        follower.wait(lambda eps: eps == [], timeout=2)
    finally:
        follower.close()


@pytest.mark.timeout(30)
def test_resolve_timeout_names_what_is_missing(server, registry, sockets):
    source, sink = registry(), registry()
    source.publish(bound_endpoint("source", 0, sockets(zmq.PUSH)))
    sink.resolve("source", "out")
    with pytest.raises(LookupError) as err:
        sink.resolve("sink", "in", timeout=0.3)
    assert str(err.value) == (
        f"no endpoint for 'sink.in' after 0.3 s (registry {server.address}): "
        "waiting for replicas 0 of 0..0; registered: source.out[0]"
    )
    with pytest.raises(LookupError, match=r"only 1 endpoint\(s\) for 'source.out'.*replicas 1, 2 of 0..2"):
        sink.resolve("source", "out", replicas=3, timeout=0.3)


def test_reachable_never_returns_a_wildcard():
    assert reachable("tcp://0.0.0.0:41234", "10.0.0.7") == "tcp://10.0.0.7:41234"
    assert reachable("tcp://*:41234", "node7") == "tcp://node7:41234"
    assert reachable("tcp://[::]:41234", "fe80::1") == "tcp://[fe80::1]:41234"
    assert reachable("tcp://0.0.0.0:41234", "0.0.0.0") == "tcp://127.0.0.1:41234"
    assert reachable("tcp://192.168.1.5:41234", "10.0.0.7") == "tcp://192.168.1.5:41234"
    assert reachable("ipc:///tmp/zpipe.sock", "10.0.0.7") == "ipc:///tmp/zpipe.sock"
    assert reachable("inproc://x", "10.0.0.7") == "inproc://x"


def test_registry_needs_a_client_that_follows_endpoints(server):
    kv = KVClient(server.address, ["status/"])
    try:
        with pytest.raises(ValueError, match="endpoints/"):
            Registry(kv)
    finally:
        kv.close()


def test_names_must_not_contain_slashes(server):
    kv = KVClient(server.address, ["endpoints/"])
    try:
        with pytest.raises(ValueError, match="no '/'"):
            Registry(kv).publish(Endpoint("a/b", 0, "out", "tcp://127.0.0.1:1"))
    finally:
        kv.close()
