"""The ZAP handler's decisions (zpipe.security.Zap), and real loopback sockets secured by DataPlane."""

from __future__ import annotations

import os

import pytest
import zmq

from zpipe import security
from zpipe.topology.load import load_topology

TOPOLOGY = os.path.join(os.path.dirname(__file__), "..", "..", "topologies", "4dcamera-local.yaml")


def request(domain, address, mechanism, *creds):
    return [b"1.0", b"7", domain, address.encode(), b"", mechanism, *creds]


def test_decisions():
    ctx = zmq.Context()
    agg, prod, stranger = (zmq.curve_keypair()[0] for _ in range(3))
    keys = {zmq.utils.z85.decode(agg): "aggregator", zmq.utils.z85.decode(prod): "producer"}
    refused = []
    zap = security.Zap(ctx, keys=keys, allow=lambda: {"10.0.0.1", "127.0.0.1"},
                       domains={b"zpipe-link:nodegroup.data": frozenset({"aggregator"})},
                       on_refuse=lambda: refused.append(1), label="test")
    try:
        ok = lambda reply: reply[2] == b"200"
        link = b"zpipe-link:nodegroup.data"
        r = zap.answer(request(link, "127.0.0.1", b"CURVE", zmq.utils.z85.decode(agg)))
        assert ok(r) and r[4] == b"aggregator"  # the User-Id is the identity
        assert not ok(zap.answer(request(link, "127.0.0.1", b"CURVE", zmq.utils.z85.decode(prod))))
        assert not ok(zap.answer(request(link, "127.0.0.1", b"CURVE", zmq.utils.z85.decode(stranger))))
        assert ok(zap.answer(request(security.CURVE_DOMAIN, "127.0.0.1", b"CURVE", zmq.utils.z85.decode(prod))))
        assert ok(zap.answer(request(security.ALLOW_DOMAIN, "10.0.0.1", b"NULL")))
        assert not ok(zap.answer(request(security.ALLOW_DOMAIN, "10.0.0.9", b"NULL")))
        assert not ok(zap.answer(request(b"", "10.0.0.1", b"NULL")))  # NULL only where allow-listed
        assert not ok(zap.answer([b"bad"]))
        assert len(refused) == 4 and zap.total_rejected == 4
        assert zap.last["address"] == "10.0.0.1" and "NULL" in zap.last["reason"]
    finally:
        zap.stop()
        ctx.term()


@pytest.mark.parametrize("mode", ["curve", "allow"])
def test_data_plane_sockets(tmp_path, mode):
    """A node group's socket under `curve`/`allow`: its sender connects, an outsider does not."""
    keys = str(tmp_path)
    security.create(keys, [*security.SPECIAL, "producer", "aggregator", "nodegroup"])
    topo = load_topology(TOPOLOGY, plugins_of=())
    topo = topo.model_copy(update={"security": security_spec(keys, mode)})
    server_ctx, client_ctx = zmq.Context(), zmq.Context()
    plane = security.DataPlane(topo, "nodegroup", server_ctx)
    pull = server_ctx.socket(zmq.PULL)
    pull.linger = 0
    assert plane.secure(pull, "nodegroup", "data@0", True) == mode
    pull.bind("tcp://127.0.0.1:0")
    address = pull.last_endpoint.decode()
    sender = security.DataPlane(topo, "aggregator", client_ctx)
    try:
        good = client_ctx.socket(zmq.PUSH)
        sender.secure(good, "nodegroup", "data@0", False)
        good.connect(address)
        good.send(b"real")
        assert pull.poll(5000) and pull.recv() == b"real"
        outsider = client_ctx.socket(zmq.PUSH)
        outsider.connect(address)  # no key (allow: from an allowed address, so use a wrong identity's key)
        if mode == "curve":
            outsider.send(b"forged", zmq.NOBLOCK) if outsider.poll(500, zmq.POLLOUT) else None
            assert not pull.poll(1000)
            # No CURVE at all never reaches ZAP: refused in the handshake, counted by the socket's monitor
            assert wait_for(lambda: plane.zap.rejected["no CURVE handshake (nodegroup.data)"] >= 1)
            wrong = client_ctx.socket(zmq.PUSH)
            security.DataPlane(topo, "producer", client_ctx).secure(wrong, "nodegroup", "data@0", False)
            wrong.connect(address)
            wrong.send(b"forged by a valid key", zmq.NOBLOCK)
            assert not pull.poll(1000)
            assert wait_for(lambda: any("does not send on" in r for r in plane.zap.rejected))
    finally:
        plane.stop()
        pull.close(0)
        server_ctx.destroy(0)
        client_ctx.destroy(0)


def wait_for(cond, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def security_spec(keys, mode):
    from zpipe.topology.model import SecuritySpec

    return SecuritySpec(keys=keys, data=mode)
