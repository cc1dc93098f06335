"""Puts items (frames) back together from their parts (sectors) and hands them out in batches.

Parts of one item arrive in any order, through different threads, mixed with other items.
An item is complete when all its parts are in; at the end of a scan the incomplete ones go
out too, missing parts zero-filled and named, after the complete ones (as stempy does).
Memory is bounded by the items in flight, which the queues in front of us bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zpipe.topology.model import AssembleSpec
from zpipe.wire import BadMessage


@dataclass
class _Item:
    buffer: np.ndarray
    header: dict[str, Any]
    seen: int = 0  # bit mask of parts that arrived


@dataclass
class Assembler:
    spec: AssembleSpec
    batch: int
    pending: dict[int, _Item] = field(default_factory=dict)
    ready: list[_Item] = field(default_factory=list)
    incomplete: list[_Item] = field(default_factory=list)
    key_range: tuple[int, int] | None = None  # (first, count) when the source said which keys to expect
    seen: "KeySet" = None  # every key that showed at least one part
    done_complete: int = 0
    done_incomplete: int = 0
    _pool: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seen = KeySet(self.key_range)
        self.dtype = np.dtype(self.spec.dtype).newbyteorder("<")
        self.part_shape = tuple(self.spec.shape)
        self.part_bytes = int(np.prod(self.part_shape)) * self.dtype.itemsize
        self.item_shape = (self.spec.parts * self.part_shape[0], *self.part_shape[1:])
        self._full = (1 << self.spec.parts) - 1
        self._batch_buf = np.empty((self.batch, *self.item_shape), self.dtype)

    def add(self, header: dict[str, Any], payload) -> None:
        """Place one part; raises BadMessage (and changes nothing) if it does not fit."""
        spec = self.spec
        try:
            key = int(header[spec.key])
            part = int(header[spec.part])
        except KeyError as exc:
            raise BadMessage(f"header lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError):
            raise BadMessage(f"{spec.key!r} and {spec.part!r} must be integers") from None
        if not 0 <= part < spec.parts:
            raise BadMessage(f"{spec.part} {part} out of range 0..{spec.parts - 1}")
        view = memoryview(payload)
        if view.nbytes != self.part_bytes:
            raise BadMessage(f"payload of {view.nbytes} bytes; a part is {self.part_bytes} "
                             f"({'x'.join(map(str, self.part_shape))} {self.dtype.name})")
        item = self.pending.get(key)
        if item is None and key in self.seen:
            raise BadMessage(f"{spec.part} {part} of {spec.key} {key}, which was already complete")
        if item is None:
            self.seen.add(key)
            buf = self._pool.pop() if self._pool else np.empty(self.item_shape, self.dtype)
            item = self.pending[key] = _Item(buf, {k: v for k, v in header.items() if k != spec.part})
        elif item.seen & (1 << part):
            raise BadMessage(f"duplicate {spec.part} {part} of {spec.key} {key}")
        rows = self.part_shape[0]
        item.buffer[part * rows:(part + 1) * rows] = np.frombuffer(view, self.dtype).reshape(self.part_shape)
        item.seen |= 1 << part
        if item.seen == self._full:
            del self.pending[key]
            item.header["complete"] = True
            item.header["missing"] = []
            self.ready.append(item)

    def lagging(self, oldest: int = 32) -> int:
        """Bit mask of the parts that the oldest items in flight still wait for."""
        mask = 0
        for i, item in enumerate(self.pending.values()):
            if i == oldest:
                break
            mask |= self._full & ~item.seen
        return mask

    def flush(self) -> None:
        """End of scan: everything still pending goes out, zero-filled where parts are missing."""
        rows = self.part_shape[0]
        for key in sorted(self.pending):
            item = self.pending[key]
            missing = [p for p in range(self.spec.parts) if not item.seen & (1 << p)]
            for p in missing:
                item.buffer[p * rows:(p + 1) * rows] = 0
            item.header["complete"] = False
            item.header["missing"] = missing
            self.incomplete.append(item)
        self.pending.clear()

    def take(self, force: bool = False) -> tuple[np.ndarray, list[dict[str, Any]]] | None:
        """A batch of finished items (complete ones first), or None if fewer than `batch` wait and not `force`."""
        source = self.ready if self.ready else self.incomplete
        if not source or (len(source) < self.batch and not force and source is self.ready):
            return None
        items, source[:] = source[:self.batch], source[self.batch:]
        if source is self.ready:
            self.done_complete += len(items)
        else:
            self.done_incomplete += len(items)
        data = self._batch_buf[:len(items)]
        for i, item in enumerate(items):
            data[i] = item.buffer
            if len(self._pool) < self.batch * 2:  # keep a few buffers for reuse, not every one ever made
                self._pool.append(item.buffer)
        return data, [it.header for it in items]

    @property
    def in_flight(self) -> int:
        return len(self.pending) + len(self.ready) + len(self.incomplete)


class KeySet:
    """The keys seen in a scan: a bitmap over the announced range (one byte per frame, not a
    Python int each), so memory does not grow 60-fold with the scan; a set for strays."""

    def __init__(self, key_range: tuple[int, int] | None):
        self.first, count = key_range if key_range else (0, 0)
        self.bits = np.zeros(count, dtype=bool)
        self.extra: set[int] = set()

    def add(self, key: int) -> None:
        i = key - self.first
        if 0 <= i < len(self.bits):
            self.bits[i] = True
        else:
            self.extra.add(key)

    def __contains__(self, key: int) -> bool:
        i = key - self.first
        return bool(self.bits[i]) if 0 <= i < len(self.bits) else key in self.extra

    def merge(self, other: "KeySet") -> None:
        if len(self.bits) == len(other.bits) and self.first == other.first:
            self.bits |= other.bits
        else:
            for k in other.keys():
                self.add(int(k))
        self.extra |= other.extra

    def keys(self):
        yield from (np.flatnonzero(self.bits) + self.first).tolist()
        yield from self.extra
