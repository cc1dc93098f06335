"""zpipe.transport.outbox: a send to a replica is bounded even when that replica is alive but its endpoint never
appears in our registry view (a fresh-clone run hung 140 s on that: producer[1] sent nothing, ever)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from zpipe.kv import KVClient
from zpipe.registry import Registry
from zpipe.topology.model import SocketSpec
from zpipe.transport import outbox as ob


class AliveRoster:
    """The roster's answer for a replica whose liveness key is there: not gone."""

    def gone(self, node, replica):
        return False

    def why(self, node, replica):
        return ""


@pytest.mark.timeout(30)
def test_a_send_to_a_live_replica_with_no_endpoint_ends_in_peer_gone(server, monkeypatch):
    monkeypatch.setattr(ob, "ENDPOINT_WAIT", 1.0)
    ctx = zmq.Context()
    kv = KVClient(server.address, name="sender").start()
    rt = SimpleNamespace(meter=SimpleNamespace(blocked_s=0.0), stop=threading.Event(), roster=AliveRoster(),
                         registry=Registry(kv), new_socket=lambda spec: ctx.socket(zmq.PUSH))
    out = ob.Outbox(rt, "out", "aggregator", "in@1", spec=SocketSpec(pattern="push", connect="aggregator.in"))
    try:
        t0 = time.monotonic()
        with pytest.raises(ob.PeerGone, match=r"aggregator\[0\]\.in@1 is gone: alive, but no endpoint of it was "
                                              r"registered for 1 s"):
            out.send(0, [b"header", b"payload"])
        took = time.monotonic() - t0
        print(f"a send to a live replica with no endpoint: PeerGone after {took:.2f} s (bound 1 s)")
        assert 1.0 <= took < 3.0
    finally:
        out.close(0)
        kv.close()
        ctx.term()
