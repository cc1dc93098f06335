"""Small pictures of per-position results while a scan streams: made by node groups, drawn by viewers.

A node group merges its workers' per-position buffers a few times a second (status.interval),
shrinks each to at most SIDE x SIDE cells (the mean of the positions received in each cell) and
publishes it at `preview/{scan}/{analysis}.{buffer}/{replica}` (ephemeral). Viewers (`zpipe run`'s
live view, `zpipe status`) put the node groups' pictures together (they cover different
positions) and draw them with Unicode half blocks, two cells a character, so a microscopist sees
a bright-field image build up. Only 1- and 2-D scan shapes are drawn.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

PREFIX = "preview/"
SIDE = 32  # cells along each axis at most
TTL = 10.0


def shrink(values: np.ndarray, received: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """A float32 grid of at most SIDE x SIDE cells: each the mean of its received positions, NaN if none."""
    if len(shape) not in (1, 2) or values.ndim != 1 or values.shape != received.shape:
        return None
    h, w = (1, shape[0]) if len(shape) == 1 else shape
    v = values.astype(np.float64).reshape(h, w)
    r = received.reshape(h, w)
    fh, fw = -(-h // SIDE), -(-w // SIDE)  # cells per grid cell, rounded up
    gh, gw = -(-h // fh), -(-w // fw)
    total = np.zeros((gh * fh, gw * fw))
    count = np.zeros((gh * fh, gw * fw))
    total[:h, :w] = np.where(r, np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    count[:h, :w] = r & np.isfinite(v)
    total = total.reshape(gh, fh, gw, fw).sum(axis=(1, 3))
    count = count.reshape(gh, fh, gw, fw).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


def value(grid: np.ndarray) -> dict[str, Any]:
    return {"shape": list(grid.shape), "data": grid.astype("<f4").tobytes(), "time": time.time()}


def grid_of(v: Any) -> np.ndarray | None:
    """A published preview back as a grid; None if it is not one (anyone can write the registry)."""
    try:
        shape = v["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and 0 < n <= SIDE for n in shape)):
            return None
        grid = np.frombuffer(v["data"], "<f4")
        return grid.reshape(shape) if grid.size == shape[0] * shape[1] else None
    except (KeyError, TypeError, ValueError):
        return None


def combine(grids: list[np.ndarray]) -> np.ndarray | None:
    """Node groups' pictures of one buffer (they cover different positions): the mean where several say."""
    grids = [g for g in grids if g is not None]
    if not grids or any(g.shape != grids[0].shape for g in grids):
        return grids[0] if grids else None
    stack = np.stack(grids)
    seen = np.isfinite(stack)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen.any(axis=0), np.where(seen, stack, 0).sum(axis=0) / seen.sum(axis=0), np.nan)


def halfblocks(grid: np.ndarray) -> list[list[tuple[str, str]]]:
    """Lines of (character, rich style): two grid rows a character, grey levels from the grid's range."""
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo or 1.0

    def colour(x: float) -> str:  # the terminal's 24 greys, 232 (black) to 255 (white); blank where unknown
        return "default" if not np.isfinite(x) else f"color({232 + int(round((x - lo) / span * 23))})"

    rows = grid.shape[0]
    lines = []
    for y in range(0, rows, 2):
        line = []
        for x in range(grid.shape[1]):
            top = colour(grid[y, x])
            bottom = colour(grid[y + 1, x]) if y + 1 < rows else "default"
            line.append(("▀", f"{top} on {bottom}"))
        lines.append(line)
    return lines
