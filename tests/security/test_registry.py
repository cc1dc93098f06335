"""The registry under CURVE (issue 12): outsiders cannot read or write it; a peer with a valid key
writes only its own keys. A real server and real clients on loopback; the outsiders are raw pyzmq."""

from __future__ import annotations

import logging
import os
import time

import pytest
import zmq

from zpipe import security
from zpipe.kv import KVClient, KVServer, protocol as p
from zpipe.topology.load import load_topology

TOPOLOGY = os.path.join(os.path.dirname(__file__), "..", "..", "topologies", "4dcamera-local.yaml")
ORIGIN = b"\x99" * 8 + (1).to_bytes(8, "big")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("keys"))
    security.create(d, [*security.SPECIAL, "producer", "aggregator", "nodegroup"])
    return d


@pytest.fixture
def secured(keys):
    topo = load_topology(TOPOLOGY, plugins_of=())
    pub, sec = security.load_secret(keys, security.REGISTRY)
    auth = security.ServerAuth(pub, sec, security.public_keys(keys), security.Policy.for_topology(topo))
    srv = KVServer("tcp://127.0.0.1:0", heartbeat=0.2, auth=auth).start()
    try:
        yield srv
    finally:
        srv.stop()


def client(srv, keys, who, subtrees=("",)) -> KVClient:
    return KVClient(srv.address, subtrees, name=who, curve=security.credentials(keys, who),
                    heartbeat_timeout=2.0).start()


def raw(kind, curve=None, server_key=None):
    s = zmq.Context.instance().socket(kind)
    s.linger = 0
    if curve is not None:
        s.curve_publickey, s.curve_secretkey = curve
        s.curve_serverkey = server_key
    return s


def hello(srv, sock, timeout=1.0):
    sock.connect(srv.address)
    sock.send_multipart([p.HELLO, b"1", b""])
    return sock.recv_multipart() if sock.poll(timeout * 1000) else None


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_no_security_is_as_before(server):
    with raw(zmq.DEALER) as d:
        assert hello(server, d) is not None  # the plain server answers anyone, as it always did


def test_outsider_cannot_read_or_write(secured, keys, caplog):
    caplog.set_level(logging.WARNING)
    reg_pub = security.load_public(keys, security.REGISTRY)
    with client(secured, keys, "registry") as owner:
        owner.set("endpoints/nodegroup/0/data@0", {"address": "tcp://127.0.0.1:1"})
        owner.wait(lambda items: "endpoints/nodegroup/0/data@0" in items)
        # A raw DEALER with no key, and one with a key of its own: no HELLO, no snapshot.
        stranger = zmq.curve_keypair()
        with raw(zmq.DEALER) as d0, raw(zmq.DEALER, stranger, reg_pub) as d1:
            assert hello(secured, d0) is None
            assert hello(secured, d1) is None
        # The update stream and the collector: nothing read, nothing written.
        info = p.unpack(hello(secured, _operator(keys, reg_pub))[2])
        with raw(zmq.SUB) as s0, raw(zmq.SUB, stranger, reg_pub) as s1, \
                raw(zmq.PUSH) as w0, raw(zmq.PUSH, stranger, reg_pub) as w1:
            for s in (s0, s1):
                s.subscribe(b"")
                s.connect(info["pub"])
            for w in (w0, w1):
                w.connect(info["collector"])
                _try_send(w, [b"endpoints/nodegroup/0/data@0", p.pack([None, False, ORIGIN]),
                              p.pack({"address": "tcp://10.6.6.6:1"})])
                _try_send(w, [b"scans/1", p.pack([None, False, ORIGIN]), b""])
            owner.set("status/producer/0", {"beat": 1})  # traffic the outsiders would see
            time.sleep(1.0)
            assert not s0.poll(0) and not s1.poll(0)
        assert owner.get("endpoints/nodegroup/0/data@0") == {"address": "tcp://127.0.0.1:1"}
        # Counted and named: the stranger's public key and address, in the log and in the registry.
        assert secured.auth.zap.rejected["unknown CURVE key"] >= 3
        assert wait_for(lambda: (owner.get(security.HANDSHAKES_KEY) or {}).get("rejected", 0) >= 5)
        hs = owner.get(security.HANDSHAKES_KEY)
        assert any(k.startswith("no CURVE handshake") for k in hs["by_reason"]), hs
        assert hs["last"]["key"] == stranger[0].decode() or hs["last"]["address"]
        text = caplog.text
        assert stranger[0].decode() in text and "127.0.0.1" in text
        # Nothing secret logged or published
        for who in security.SPECIAL:
            secret = security.load_secret(keys, who)[1].decode()
            assert secret not in text and secret not in repr(owner.items())


def _ready(sock) -> bool:
    return bool(sock.poll(200, zmq.POLLOUT))


def _try_send(sock, frames) -> None:
    """An outsider's write, if its socket takes it at all (with the handshake refused it may not: a
    PUSH whose only peer never completed has nowhere to queue, and says so with Again)."""
    if _ready(sock):
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass


def _operator(keys, reg_pub):
    d = raw(zmq.DEALER, security.load_secret(keys, "operator"), reg_pub)
    return d


def test_a_valid_key_writes_only_its_own_keys(secured, keys, caplog):
    caplog.set_level(logging.WARNING)
    ng = client(secured, keys, "nodegroup")
    prod = client(secured, keys, "producer")
    view = client(secured, keys, "operator")
    try:
        ng.set("endpoints/nodegroup/0/data@0", {"address": "tcp://127.0.0.1:1"}, ttl=5)
        ng.set("scans/3/part/0", {"received": 10})
        prod.set("scans/3", {"pipe": "x", "node_groups": [0]})
        view.wait(lambda items: {"endpoints/nodegroup/0/data@0", "scans/3/part/0", "scans/3"} <= set(items))
        # The producer, with its valid key, tries the node group's keys and the accountant's
        prod.set("endpoints/nodegroup/0/data@0", {"address": "tcp://10.6.6.6:1"}, ttl=5)
        prod.delete("scans/3/part/0")
        prod.set("scans/3/report", {"outcome": "complete"})
        prod.set("pipeline", {"id": "forged"})
        view.set("nodes/nodegroup/0", {"pid": 1})  # the operator cannot either
        assert wait_for(lambda: (view.get("security/denied/producer") or {}).get("writes", 0) >= 4)
        denied = view.get("security/denied/producer")
        assert denied["writes"] >= 4 and denied["last_key"] in (
            "endpoints/nodegroup/0/data@0", "scans/3/part/0", "scans/3/report", "pipeline")
        assert wait_for(lambda: (view.get("security/denied/operator") or {}).get("writes", 0) >= 1)
        time.sleep(0.5)
        assert view.get("endpoints/nodegroup/0/data@0") == {"address": "tcp://127.0.0.1:1"}
        assert view.get("scans/3/part/0") == {"received": 10}
        assert "scans/3/report" not in view.items() and "pipeline" not in view.items()
        assert secured.denied["producer"]["writes"] >= 4
        assert "refused a write of 'endpoints/nodegroup/0/data@0' by 'producer'" in caplog.text
        # Its own keys still go through
        prod.set("status/producer/2", {"ok": True})
        view.wait(lambda items: "status/producer/2" in items)
    finally:
        for c in (ng, prod, view):
            c.close()


def test_a_client_with_a_wrong_server_key_gets_no_answer(secured, keys, tmp_path):
    other = str(tmp_path / "other")
    security.create(other, ["registry", "producer"])
    with pytest.raises(TimeoutError, match="CURVE"):
        KVClient(secured.address, name="stale", curve=security.credentials(other, "producer"),
                 connect_timeout=1.5).start()


def test_a_replica_key_writes_only_its_own_replica(tmp_path):
    """With a key per replica (what `zpipe keys --topology` makes), replica 1 of the node groups cannot write
    replica 0's keys, and the node's shared key (every replica holds it, for the data plane) writes nothing."""
    topo = load_topology(TOPOLOGY, plugins_of=())
    keys = str(tmp_path / "keys")
    security.create(keys, security.identities(topo))
    assert {"nodegroup.0", "nodegroup.1", "producer.3"} <= set(security.public_keys(keys).values())
    auth = security.server_auth(topo.model_copy(update={"security": security_spec(keys)}))
    srv = KVServer("tcp://127.0.0.1:0", heartbeat=0.2, auth=auth).start()
    ng0, ng1, shared, view = (client(srv, keys, who) for who in ("nodegroup.0", "nodegroup.1", "nodegroup", "operator"))
    try:
        ng0.set("status/nodegroup/0", {"state": "streaming"}, ttl=5)
        ng0.set("scans/3/part/0", {"received": 10})
        ng1.set("status/nodegroup/1", {"state": "streaming"}, ttl=5)
        view.wait(lambda items: {"status/nodegroup/0", "scans/3/part/0", "status/nodegroup/1"} <= set(items))
        ng1.set("status/nodegroup/0", {"state": "forged"}, ttl=5)
        ng1.set("scans/3/part/0", {"received": 0})
        ng1.delete("scans/3/part/0")
        shared.set("status/nodegroup/1", {"state": "forged"}, ttl=5)
        shared.set("scans/4/part/1", {"received": 0})
        assert wait_for(lambda: (view.get("security/denied/nodegroup.1") or {}).get("writes", 0) >= 3)
        assert wait_for(lambda: (view.get("security/denied/nodegroup") or {}).get("writes", 0) >= 2)
        assert view.get("security/denied/nodegroup.1")["last_key"] in ("status/nodegroup/0", "scans/3/part/0")
        time.sleep(0.5)
        assert view.get("status/nodegroup/0") == {"state": "streaming"}
        assert view.get("status/nodegroup/1") == {"state": "streaming"}
        assert view.get("scans/3/part/0") == {"received": 10} and "scans/4/part/1" not in view.items()
        assert "security/denied/nodegroup.0" not in view.items()
    finally:
        for c in (ng0, ng1, shared, view):
            c.close()
        srv.stop()


def test_a_replica_uses_its_own_key_when_it_has_one(tmp_path):
    topo = load_topology(TOPOLOGY, plugins_of=())
    keys = str(tmp_path / "keys")
    security.create(keys, [*security.SPECIAL, *topo.nodes, "nodegroup.1"])
    secured = topo.model_copy(update={"security": security_spec(keys)})
    assert security.registry_identity(secured, "nodegroup", 1) == "nodegroup.1"
    assert security.registry_identity(secured, "nodegroup", 0) == "nodegroup"  # a key directory without it
    assert security.client_for(secured, "nodegroup", 1).public == security.load_public(keys, "nodegroup.1")
    # What its host must hold: its registry key, and the node's when one of its links is under CURVE (a node
    # group's results gather follows the registry's mode; a producer's data links are `none` here)
    assert security.secrets_needed(secured, "nodegroup", 1) == ["nodegroup.1", "nodegroup"]
    assert security.secrets_needed(secured, "producer", 2) == ["producer"]  # no producer.2 key: the node's
    curve = topo.model_copy(update={"security": security_spec(keys, data="curve")})
    assert security.secrets_needed(curve, "producer", 2) == ["producer"]
    plain = topo.model_copy(update={"security": security_spec(keys, registry="none", data="allow")})
    assert security.secrets_needed(plain, "nodegroup", 1) == []


def security_spec(keys, **kw):
    from zpipe.topology.model import SecuritySpec

    return SecuritySpec(keys=keys, **kw)


def test_a_secured_client_sees_every_change_made_after_it_started(secured, keys):
    """As tests/kv: the CURVE handshake makes a SUB slower to subscribe, and the welcome still
    holds the snapshot back until it has."""
    from tests.kv.test_server_client import changes_missed_after_start

    who = {"writer": "registry", "observer": "producer"}
    missed, resyncs = changes_missed_after_start(
        secured.address, lambda name: security.credentials(keys, who[name]))
    print(f"curve: 30 clients started, a write right after each: {missed} missed as updates, {resyncs} resyncs")
    assert missed == 0 and resyncs == 0
