"""Puts items (frames) back together from their parts (sectors) and hands them out in batches.

Parts of one item arrive in any order, through different threads, mixed with other items.
An item is complete when all its parts are in; at the end of a scan the incomplete ones go
out too, missing parts zero-filled and named, after the complete ones (as stempy does).
Parts are held by reference (zero-copy receive buffers), not copied into frames: the one
copy happens when an analysis asks for the batch's stacked data. Memory is bounded by the
items in flight, which the node group's flow control bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zpipe.topology.model import AssembleSpec
from zpipe.wire import BadMessage


@dataclass
class _Item:
    parts: list  # per part number: its payload (a buffer, held, never copied) or None
    header: dict[str, Any]
    seen: int = 0  # bit mask of parts that arrived


@dataclass
class Assembler:
    """Not thread-safe: the node group holds its worker's lock around every call."""

    spec: AssembleSpec
    batch: int
    pending: dict[int, _Item] = field(default_factory=dict)  # waiting for parts, in order of first arrival
    stale: dict[int, _Item] = field(default_factory=dict)  # waiting for parts whose streams moved on: lost, likely
    ready: list[_Item] = field(default_factory=list)
    incomplete: list[_Item] = field(default_factory=list)
    key_range: tuple[int, int] | None = None  # (first, count) when the source said which keys to expect
    seen: "KeySet" = None  # every key that showed at least one part
    done_complete: int = 0
    done_incomplete: int = 0

    def __post_init__(self) -> None:
        self.seen = KeySet(self.key_range)
        self.dtype = np.dtype(self.spec.dtype).newbyteorder("<")
        self.part_shape = tuple(self.spec.shape)
        self.part_bytes = int(np.prod(self.part_shape)) * self.dtype.itemsize
        self.item_shape = (self.spec.parts * self.part_shape[0], *self.part_shape[1:])
        self._full = (1 << self.spec.parts) - 1
        self.newest = [None] * self.spec.parts  # per part number, the highest key it came with
        self._batch_buf: np.ndarray | None = None  # made when an analysis first asks for stacked data

    def add(self, header: dict[str, Any], payload) -> bool:
        """Place one part (kept by reference, not copied); True if it completed its item.

        Raises BadMessage (and changes nothing) if the part does not fit.
        """
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
        if item is None:
            item = self.stale.get(key)  # a late part of an item given up for lost: still welcome
        if item is None:
            if key in self.seen:
                raise BadMessage(f"{spec.part} {part} of {spec.key} {key}, which was already complete")
            self.seen.add(key)
            header = dict(header)
            del header[spec.part]
            item = self.pending[key] = _Item([None] * spec.parts, header)
        elif item.seen & (1 << part):
            raise BadMessage(f"duplicate {spec.part} {part} of {spec.key} {key}")
        item.parts[part] = view
        item.seen |= 1 << part
        newest = self.newest[part]
        if newest is None or key > newest:
            self.newest[part] = key
        if item.seen != self._full:
            return False
        if self.pending.pop(key, None) is None:
            del self.stale[key]
        item.header["complete"] = True
        item.header["missing"] = []
        self.ready.append(item)
        return True

    def frontier(self, gap: int) -> int | None:
        """The key of the oldest item still worth waiting for, or None when none waits.

        An item whose every missing part has come with keys `gap` or more beyond it
        (its streams moved on) is set aside as stale, probably lost upstream: it stays
        completable, but no longer holds the frontier back.
        """
        pending = self.pending
        while pending:
            key = next(iter(pending))
            item = pending[key]
            missing = self._full & ~item.seen
            p = 0
            while missing:
                if missing & 1 and (self.newest[p] is None or self.newest[p] < key + gap):
                    return key
                missing >>= 1
                p += 1
            self.stale[key] = pending.pop(key)
        return None

    def flush(self) -> None:
        """End of scan: everything still pending goes out, missing parts named (and zero-filled when stacked)."""
        waiting = {**self.pending, **self.stale}
        for key in sorted(waiting):
            item = waiting[key]
            item.header["complete"] = False
            item.header["missing"] = [p for p in range(self.spec.parts) if not item.seen & (1 << p)]
            self.incomplete.append(item)
        self.pending.clear()
        self.stale.clear()

    def take(self, force: bool = False) -> list[_Item] | None:
        """Up to `batch` finished items (complete ones first), or None if fewer than `batch` wait and not `force`."""
        source = self.ready if self.ready else self.incomplete
        if not source or (len(source) < self.batch and not force and source is self.ready):
            return None
        items, source[:] = source[:self.batch], source[self.batch:]
        if source is self.ready:
            self.done_complete += len(items)
        else:
            self.done_incomplete += len(items)
        return items

    def stack(self, items: list[_Item]) -> np.ndarray:
        """The items' parts, one copy, into a buffer reused batch after batch: `out[i]` is `items[i]`."""
        if self._batch_buf is None:
            self._batch_buf = np.empty((self.batch, *self.item_shape), self.dtype)
        out = self._batch_buf[:len(items)]
        rows = self.part_shape[0]
        for i, item in enumerate(items):
            for p, part in enumerate(item.parts):
                dest = out[i, p * rows:(p + 1) * rows]
                if part is None:
                    dest[...] = 0
                else:
                    dest[...] = np.frombuffer(part, self.dtype).reshape(self.part_shape)
        return out

    @property
    def in_flight(self) -> int:
        return len(self.pending) + len(self.stale) + len(self.ready) + len(self.incomplete)


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
