"""The result buffers the framework owns for an analysis and a scan: allocated, filled, merged, shipped.

A worker fills its own set (`ResultBuffers.place` after each `process`); the node group merges its
workers' sets, and the scan's writer merges the node groups' (`merge`), so an analysis writes no
merge code. Per-position buffers merge by position: a position only one side received is taken as
it is (bit for bit), one both received (several frames per position) is added up; `received`
says which positions arrived at all. Per-pixel buffers add up. A set travels as plain values and
numpy arrays (zpipe.codec): `share()` and `from_share()`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zpipe.plugin import Buffer

MAX_BUFFER_BYTES = 1 << 31  # one buffer of one scan: 2 GiB


class ResultBuffers:
    def __init__(self, decl: dict[str, Buffer], positions: int | None, item_shape: tuple[int, ...]):
        self.kinds = {name: b.kind for name, b in decl.items()}
        self.arrays: dict[str, np.ndarray] = {}
        has_positions = any(b.kind == "position" for b in decl.values())
        if has_positions and positions is None:
            raise ValueError("per-position buffers need the scan's geometry, and the source declares none")
        self.received = np.zeros(positions, bool) if has_positions else None
        for name, b in decl.items():
            if not isinstance(b, Buffer) or b.kind not in ("position", "pixel"):
                raise TypeError(f"buffer {name!r}: declare it with per_position() or per_pixel(), not {b!r}")
            shape = (positions, *b.shape) if b.kind == "position" else tuple(item_shape)
            dtype = np.dtype(b.dtype)
            if dtype.kind not in "biufc":
                raise TypeError(f"buffer {name!r}: dtype {dtype} (numbers and booleans only)")
            if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > MAX_BUFFER_BYTES:
                raise ValueError(f"buffer {name!r} of {shape} {dtype} is larger than {MAX_BUFFER_BYTES >> 30} GiB")
            self.arrays[name] = np.zeros(shape, dtype)

    def out(self, n: int) -> dict[str, np.ndarray]:
        """What `process(batch, out)` fills for a batch of n items: a zero row per item for each
        per-position buffer, and the running sum itself for each per-pixel one."""
        return {name: (np.zeros((n, *a.shape[1:]), a.dtype) if self.kinds[name] == "position" else a)
                for name, a in self.arrays.items()}

    def place(self, positions: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Put the batch's rows at the items' positions (-1: not placed); a position seen again adds up."""
        if self.received is None:
            return
        valid = positions >= 0
        pos = positions[valid]
        if not len(pos):
            return
        first = np.zeros(len(pos), bool)
        first[np.unique(pos, return_index=True)[1]] = True
        assign = first & ~self.received[pos]
        rest = ~assign
        for name, a in self.arrays.items():
            if self.kinds[name] != "position":
                continue
            rows = out[name][valid]
            a[pos[assign]] = rows[assign]
            if rest.any():
                np.add.at(a, pos[rest], rows[rest])
        self.received[pos] = True

    def merge(self, other: "ResultBuffers") -> None:
        if other.kinds != self.kinds:
            raise ValueError(f"buffers {sorted(other.kinds)} do not match {sorted(self.kinds)}")
        only = both = None
        if self.received is not None:
            if other.received is None or other.received.shape != self.received.shape:
                raise ValueError("per-position buffers over scans of different shapes")
            both = self.received & other.received
            only = other.received & ~self.received
        for name, a in self.arrays.items():
            b = other.arrays[name]
            if b.shape != a.shape or b.dtype != a.dtype:
                raise ValueError(f"buffer {name!r}: {b.shape} {b.dtype} does not match {a.shape} {a.dtype}")
            if self.kinds[name] == "pixel":
                a += b
            else:
                a[only] = b[only]
                a[both] += b[both]
        if self.received is not None:
            self.received |= other.received

    def share(self) -> dict[str, Any]:
        return {"kinds": dict(self.kinds), "arrays": dict(self.arrays), "received": self.received}

    @classmethod
    def from_share(cls, share: Any) -> "ResultBuffers":
        """A set as `share` made it, checked (it crossed a network)."""
        if not isinstance(share, dict) or not isinstance(share.get("kinds"), dict) or not isinstance(share.get("arrays"), dict):
            raise ValueError("not a share of result buffers")
        kinds, arrays, received = share["kinds"], share["arrays"], share.get("received")
        if set(kinds) != set(arrays) or any(k not in ("position", "pixel") for k in kinds.values()):
            raise ValueError("a share's buffers and their kinds do not match")
        if any(not isinstance(a, np.ndarray) for a in arrays.values()):
            raise ValueError("a share's buffer is not an array")
        if received is not None and not (isinstance(received, np.ndarray) and received.dtype == bool and received.ndim == 1):
            raise ValueError("a share's received mask is not a bool vector")
        if any(kinds[n] == "position" and (received is None or a.shape[:1] != received.shape) for n, a in arrays.items()):
            raise ValueError("a per-position buffer does not match the received mask")
        self = cls.__new__(cls)
        self.kinds, self.arrays, self.received = dict(kinds), dict(arrays), received
        return self
