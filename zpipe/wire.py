"""The data message on the wire: a msgpack header frame, then the raw payload frame, sent without copies."""

from __future__ import annotations

import msgpack
import zmq

from zpipe.plugin import Message

_pack = msgpack.Packer(use_bin_type=True).pack


class BadMessage(ValueError):
    """A message that cannot be decoded; carries the reason for the node's reject count."""


def send(sock: zmq.Socket, msg: Message, flags: int = 0) -> None:
    if msg.payload is None:
        sock.send(_pack(msg.header), flags)
    else:
        sock.send(_pack(msg.header), flags | zmq.SNDMORE)
        sock.send(msg.payload, flags, copy=False)


def send_frames(sock: zmq.Socket, frames, flags: int = 0) -> None:
    """Forward received frames unchanged (a relay never re-encodes)."""
    sock.send_multipart(frames, flags, copy=False)


def decode(frames) -> Message:
    if not 1 <= len(frames) <= 2:
        raise BadMessage(f"expected 1 or 2 frames (header, payload), got {len(frames)}")
    try:
        header = msgpack.unpackb(frames[0].buffer, raw=False)
    except Exception as exc:
        raise BadMessage(f"header is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise BadMessage(f"header must be a map, got {type(header).__name__}")
    payload = frames[1].buffer if len(frames) == 2 else None
    return Message(header, payload)
