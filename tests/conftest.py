"""Shared fixtures."""

from __future__ import annotations

import pytest

from support import zpipe


@pytest.fixture
def run_zpipe():
    return zpipe


@pytest.fixture
def server():
    """An in-process registry (key-value) server on a free loopback port, with fast heartbeats."""
    from zpipe.kv import KVServer

    srv = KVServer("tcp://127.0.0.1:0", heartbeat=0.2).start()
    try:
        yield srv
    finally:
        srv.stop()
