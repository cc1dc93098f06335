"""The Assembler: frames put back together from sectors held by reference, and the flow-control frontier."""

import numpy as np
import pytest

from zpipe.assemble import Assembler
from zpipe.plugin import Batch, Scan
from zpipe.topology.model import AssembleSpec
from zpipe.scans.messages import Rejected as BadMessage

SPEC = AssembleSpec(key="frame_number", part="module", parts=4, shape=[3, 5], dtype="uint16")


def sector(frame: int, module: int) -> np.ndarray:
    return np.full((3, 5), frame * 10 + module, np.uint16)


def add(asm: Assembler, frame: int, module: int, payload=None) -> bool:
    return asm.add({"frame_number": frame, "module": module, "scan": 1},
                   sector(frame, module) if payload is None else payload)


def test_parts_are_held_not_copied_and_stacked_once_on_demand():
    asm = Assembler(SPEC, batch=2)
    buffers = {m: sector(7, m) for m in range(4)}
    for m in (2, 0, 3):
        assert not add(asm, 7, m, buffers[m])
    assert add(asm, 7, 1, buffers[1])
    buffers[0][0, 0] = 999  # the assembler holds the very buffer it was given
    assert add(asm, 8, 0) is False
    (item,) = asm.take(force=True)
    assert item.header == {"frame_number": 7, "scan": 1, "complete": True, "missing": []}
    batch = Batch(Scan(1), headers=[item.header], stack=lambda: asm.stack([item]))
    assert batch._data is None  # nothing stacked until an analysis asks
    frame = batch.data[0]
    assert frame.shape == (12, 5)
    assert frame[0, 0] == 999 and frame[0, 1] == 70
    assert (frame[3:6] == 71).all() and (frame[9:12] == 73).all()


def test_missing_sectors_are_named_and_zero_filled_at_the_end():
    asm = Assembler(SPEC, batch=4)
    add(asm, 5, 0)
    add(asm, 5, 2)
    asm.flush()
    (item,) = asm.take(force=True)
    assert item.header["complete"] is False and item.header["missing"] == [1, 3]
    frame = asm.stack([item])[0]
    assert (frame[0:3] == 50).all() and (frame[3:6] == 0).all() and (frame[6:9] == 52).all()
    assert (frame[9:12] == 0).all()


@pytest.mark.parametrize("bad, reason", [
    ({"frame_number": 1}, "lacks 'module'"),
    ({"frame_number": 1, "module": 9}, "out of range"),
    ({"frame_number": "x", "module": 0}, "must be integers"),
])
def test_bad_headers_are_refused_and_change_nothing(bad, reason):
    asm = Assembler(SPEC, batch=1)
    with pytest.raises(BadMessage, match=reason):
        asm.add(bad, sector(1, 0))
    assert not asm.pending and not asm.ready


def test_wrong_size_duplicate_and_late_parts_are_refused():
    asm = Assembler(SPEC, batch=1)
    with pytest.raises(BadMessage, match="payload of 28 bytes; a part is 30"):
        add(asm, 1, 0, np.zeros(14, np.uint16))
    add(asm, 1, 0)
    with pytest.raises(BadMessage, match="duplicate module 0 of frame_number 1"):
        add(asm, 1, 0)
    for m in (1, 2, 3):
        add(asm, 1, m)
    with pytest.raises(BadMessage, match="already complete"):
        add(asm, 1, 2)


def test_frontier_is_the_oldest_frame_still_worth_waiting_for():
    asm = Assembler(SPEC, batch=8)
    assert asm.frontier(gap=10) is None
    for f in range(100, 106):  # frames 100..105 all lack sector 3
        for m in range(3):
            add(asm, f, m)
    assert asm.frontier(gap=10) == 100  # sector 3 has not moved on: it is late, not lost
    for m in range(4):  # sector 3's stream goes on to frame 111, well past 100..101
        add(asm, 111, m)
    assert asm.frontier(gap=10) == 102  # 100 and 101 are stale now: lost, most likely
    assert sorted(asm.stale) == [100, 101]
    assert add(asm, 100, 3)  # ... yet a late sector still completes its frame
    assert 100 not in asm.stale and asm.ready[-1].header["frame_number"] == 100
    asm.flush()
    assert [it.header["frame_number"] for it in asm.incomplete] == [101, 102, 103, 104, 105]
