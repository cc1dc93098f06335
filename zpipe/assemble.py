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
from zpipe.scans.account import KeySet
from zpipe.scans.messages import Rejected


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
    seen: KeySet = None  # every key that showed at least one part
    missing: dict = field(default_factory=dict)  # incomplete item's key -> the parts it went without
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
        self._over = 0  # bit mask of part numbers that will come no more (their sender is gone)
        self._batch_buf: np.ndarray | None = None  # made when an analysis first asks for stacked data

    def add(self, header: dict[str, Any], payload) -> bool:
        """Place one part (kept by reference, not copied); True if it made its item ready for a worker:
        complete, or with every missing part one that will come no more (see `over`).

        Raises Rejected (and changes nothing) if the part does not fit.
        """
        spec = self.spec
        key, part = header.get(spec.key), header.get(spec.part)
        if type(key) is not int or type(part) is not int:
            missing = spec.key if spec.key not in header else spec.part if spec.part not in header else None
            if missing is not None:
                raise Rejected("part without its key", f"header lacks {missing!r}")
            raise Rejected("part without its key", f"{spec.key!r} and {spec.part!r} must be integers")
        if not 0 <= part < spec.parts:
            raise Rejected("part number out of range", f"{spec.part} {part} out of range 0..{spec.parts - 1}")
        if self.key_range is not None and not 0 <= key - self.key_range[0] < self.key_range[1]:
            first, count = self.key_range
            raise Rejected("item outside the scan", f"{spec.key} {key} is not in {first}..{first + count - 1}")
        view = memoryview(payload)
        if view.nbytes != self.part_bytes:
            raise Rejected("part of the wrong size", f"payload of {view.nbytes} bytes; a part is {self.part_bytes} "
                           f"({'x'.join(map(str, self.part_shape))} {self.dtype.name})")
        item = self.pending.get(key)
        if item is None:
            item = self.stale.get(key)  # a late part of an item given up for lost: still welcome
        if item is None:
            if key in self.seen:
                raise Rejected("part of an item already complete", f"{spec.part} {part} of {spec.key} {key}, which was already complete")
            self.seen.add(key)
            header = dict(header)
            del header[spec.part]
            item = self.pending[key] = _Item([None] * spec.parts, header)
        elif item.seen & (1 << part):
            raise Rejected("duplicate part", f"duplicate {spec.part} {part} of {spec.key} {key}")
        item.parts[part] = view
        item.seen |= 1 << part
        newest = self.newest[part]
        if newest is None or key > newest:
            self.newest[part] = key
        if item.seen != self._full:
            if item.seen | self._over == self._full:  # as complete as it will ever be: out now
                self._give_up(key, item)
                return True
            return False
        if self.pending.pop(key, None) is None:
            del self.stale[key]
        item.header["complete"] = True
        item.header["missing"] = []
        self.ready.append(item)
        return True

    def over(self, parts: set[int]) -> int:
        """Parts `parts` will come no more (their senders are gone): items that lack only those go to
        the workers now, as incomplete, instead of waiting for the scan's end (and holding memory).
        Returns how many items went."""
        mask = 0
        for p in parts:
            if 0 <= p < self.spec.parts:
                mask |= 1 << p
                self.newest[p] = float("inf")  # its stream has moved on for good: no frontier waits for it
        if mask & ~self._over == 0:
            return 0
        self._over |= mask
        gone = [(k, it) for waiting in (self.pending, self.stale) for k, it in waiting.items()
                if it.seen | self._over == self._full]
        for key, item in gone:
            self._give_up(key, item)
        return len(gone)

    def _give_up(self, key: int, item: _Item) -> None:
        if self.pending.pop(key, None) is None:
            self.stale.pop(key, None)
        item.header["complete"] = False
        item.header["missing"] = self.missing[key] = [p for p in range(self.spec.parts) if not item.seen & (1 << p)]
        self.incomplete.append(item)

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
            item.header["missing"] = self.missing[key] = [p for p in range(self.spec.parts) if not item.seen & (1 << p)]
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
