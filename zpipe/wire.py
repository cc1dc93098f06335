"""The data message on the wire: a msgpack header frame, then the raw payload frame, sent without copies."""

from __future__ import annotations

import msgpack

from zpipe.plugin import Message
from zpipe.scans.messages import Rejected, decode as decode_header

pack_header = msgpack.Packer(use_bin_type=True).pack


def decode(frames) -> Message:
    """A received message as header and payload (the payload a zero-copy buffer); Rejected if malformed."""
    if not 1 <= len(frames) <= 2:
        raise Rejected("wrong number of frames", f"{len(frames)}, expected 1 or 2 (header, payload)")
    header = decode_header(frames[0])
    payload = frames[1].buffer if len(frames) == 2 else None
    return Message(header, payload)
