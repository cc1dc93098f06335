"""Ship a dict of numpy arrays and plain values as ZeroMQ frames: a msgpack header, then each array's raw bytes."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np


def pack(meta: dict[str, Any], values: dict[str, Any] | None) -> list:
    """[header, array bytes...]: arrays travel as raw buffers (no pickling, no copies)."""
    arrays, plain = [], {}
    for name, v in (values or {}).items():
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            arrays.append((name, a.dtype.str, list(a.shape), a))
        else:
            plain[name] = v
    header = {**meta, "plain": plain, "arrays": [(n, d, s) for n, d, s, _ in arrays], "none": values is None}
    return [msgpack.packb(header, use_bin_type=True), *(a for *_, a in arrays)]


def unpack(frames) -> tuple[dict[str, Any], dict[str, Any] | None]:
    header = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=False)
    if header.pop("none"):
        return header, None
    values = dict(header.pop("plain"))
    specs = header.pop("arrays")
    if len(specs) != len(frames) - 1:
        raise ValueError(f"results message has {len(frames) - 1} arrays, header lists {len(specs)}")
    for (name, dtype, shape), frame in zip(specs, frames[1:]):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        values[name] = np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape).copy()
    return header, values
