"""The public testing helper runs a plugin in-process exactly as the roles would."""

from __future__ import annotations

import zlib

import pytest
from pydantic import ValidationError

from zpipe.builtin import ChecksumSink, CounterSource, Relay
from zpipe.plugin import Message
from zpipe.testing import run_source, run_stage


def test_counter_messages_split_across_threads_once_each():
    one = run_source(CounterSource, {"messages": 10, "size": 32})
    three = run_source(CounterSource, {"messages": 10, "size": 32}, threads=3)
    assert sorted(m.header["index"] for m in three) == list(range(10))
    assert {m.header["index"]: bytes(m.payload) for m in one} == {m.header["index"]: bytes(m.payload) for m in three}
    assert all(zlib.crc32(m.payload) == m.header["crc"] for m in one)


def test_checksum_sink_counts_and_catches_corruption():
    msgs = run_source(CounterSource, {"messages": 5, "size": 64, "scans": 2})
    ok = run_stage(ChecksumSink, {}, msgs)
    assert ok.finished == {1: {"messages": 5, "bytes": 320, "checksum_errors": 0},
                           2: {"messages": 5, "bytes": 320, "checksum_errors": 0}}
    bad = list(msgs)
    bad[2] = Message(bad[2].header, bytes(64))
    counted = run_stage(ChecksumSink, {"strict": False}, bad)
    assert counted.finished[1]["checksum_errors"] == 1
    with pytest.raises(ValueError, match="checksum mismatch"):
        run_stage(ChecksumSink, {}, bad)


def test_relay_passes_messages_unchanged():
    msgs = run_source(CounterSource, {"messages": 3, "size": 8})
    assert run_stage(Relay, {}, msgs).outputs == msgs


def test_params_are_validated_like_the_topology():
    with pytest.raises(ValidationError, match="messages"):
        run_source(CounterSource, {"messages": -1})
    with pytest.raises(ValidationError, match="Extra inputs"):
        run_source(CounterSource, {"bogus": 1})
