"""Where each item of a scan sits: the scan's shape, and how an item maps to a scan position.

A source says it in its scans' metadata (`Scan.meta["geometry"]`, see `Geometry.meta`), so an
analysis never reads a detector's header names to place a frame: the node group gives every
batch its items' positions (`Batch.positions`, flat indices into `shape`, row-major).

Two ways to place an item:
* by header fields: `fields=("scan_y", "scan_x")`, the item's coordinates along each axis of
  `shape` (how the 4D Camera says it: each frame header carries its scan position);
* by key: `key="frame_number", first=1000`: position = (key - first) // frames_per_position,
  in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Sequence

import numpy as np

MAX_POSITIONS = 2**26


class GeometryError(ValueError):
    """Metadata that does not describe a scan's geometry; says what is wrong."""


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, ...]  # scan positions along each axis, row-major: (height, width) for a raster
    frames_per_position: int = 1
    fields: tuple[str, ...] | None = None  # header fields holding an item's coordinates, in `shape` order
    first: int | None = None  # or: the key of the scan's first item (items in row-major order)
    key: str | None = None  # with `first`: the header field that holds an item's key

    def __post_init__(self) -> None:
        if not self.shape or any(type(n) is not int or n < 1 for n in self.shape):
            raise GeometryError(f"shape {self.shape!r}: positive integers, one per axis")
        if prod(self.shape) > MAX_POSITIONS:
            raise GeometryError(f"shape {self.shape}: more than {MAX_POSITIONS:,} positions")
        if type(self.frames_per_position) is not int or self.frames_per_position < 1:
            raise GeometryError(f"frames_per_position {self.frames_per_position!r}: a positive integer")
        if (self.fields is None) == (self.first is None):
            raise GeometryError("say how an item is placed: `fields` (header fields) or `first` (its key)")
        if self.fields is not None and (len(self.fields) != len(self.shape)
                                        or not all(isinstance(f, str) and f for f in self.fields)):
            raise GeometryError(f"fields {self.fields!r}: one header field name per axis of {self.shape}")
        if self.first is not None and (type(self.first) is not int or not isinstance(self.key, str) or not self.key):
            raise GeometryError(f"first {self.first!r} with key {self.key!r}: an integer key and its header field")

    @property
    def positions_count(self) -> int:
        return prod(self.shape)

    def meta(self) -> dict[str, Any]:
        """As it travels in a scan's metadata."""
        out: dict[str, Any] = {"shape": list(self.shape), "frames_per_position": self.frames_per_position}
        if self.fields is not None:
            out["fields"] = list(self.fields)
        else:
            out["first"], out["key"] = self.first, self.key
        return out

    @classmethod
    def from_meta(cls, meta: Any) -> "Geometry | None":
        """The geometry a scan's metadata declares (None if it declares none); GeometryError if malformed."""
        g = meta.get("geometry") if isinstance(meta, dict) else None
        if g is None:
            return None
        if not isinstance(g, dict):
            raise GeometryError(f"geometry is a {type(g).__name__}, not a map")
        shape = g.get("shape")
        if not isinstance(shape, list):
            raise GeometryError("geometry.shape: a list of positive integers")
        fields = g.get("fields")
        return cls(tuple(shape), g.get("frames_per_position", 1),
                   tuple(fields) if isinstance(fields, list) else fields, g.get("first"), g.get("key"))

    def positions(self, headers: Sequence[dict]) -> np.ndarray:
        """Flat position of each item (row-major into `shape`), -1 where its header does not place it."""
        n = len(headers)
        if self.fields is not None:
            coords = np.full((len(self.fields), n), -1, np.int64)
            for i, h in enumerate(headers):
                for a, f in enumerate(self.fields):
                    v = h.get(f)
                    if type(v) is int:
                        coords[a, i] = v
            inside = np.all((coords >= 0) & (coords < np.asarray(self.shape, np.int64)[:, None]), axis=0)
            flat = np.ravel_multi_index(np.where(inside, coords, 0), self.shape) if n else np.zeros(0, np.int64)
            return np.where(inside, flat, -1).astype(np.int64)
        key = self.key
        keys = np.fromiter(((h.get(key) if type(h.get(key)) is int else -1) for h in headers), np.int64, n)
        pos = (keys - self.first) // self.frames_per_position
        return np.where((keys >= self.first) & (pos < self.positions_count), pos, -1)
