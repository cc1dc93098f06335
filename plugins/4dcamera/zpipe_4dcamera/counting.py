"""Electron counting of 4D Camera frames in numba, event for event identical to stempy 3.6's counter."""

# stempy's rules, reproduced exactly (tests/test_counting.py checks them against stempy itself):
# * Without a gain the arithmetic stays in uint16: the dark is truncated toward zero to an integer
#   and subtracted modulo 2**16, so a pixel below its dark wraps to ~65535, which the x-ray cut
#   then removes (unless the x-ray threshold lies above the wrapped value).
# * With a gain it is float32: (float32(raw) - dark) * gain. `gain` here is the factor that is
#   multiplied; stempy's Python API takes its reciprocal, see `gain_multiplier`.
# * A pixel is zeroed unless background < value < xray (stempy compares in float64).
# * An event is a pixel strictly greater than each of its existing 8 neighbours, compared on the
#   zeroed frame: an x-ray next to an electron is removed first, so the electron still counts.
#   Ties give no event. Event id = row * cols + col, in row-major order.

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, nogil=True)


def gain_multiplier(gain: np.ndarray) -> np.ndarray:
    """The float32 factor stempy's Python API multiplies by for a user-supplied gain map."""
    return np.power(gain, -1).astype(np.float32)


@njit(**_JIT)
def max_events(rows, cols):
    """Most events a frame can hold: strict maxima never touch, so a 2x2 block holds at most one."""
    return ((rows + 1) // 2) * ((cols + 1) // 2)


@njit(inline="always", **_JIT)
def _threshold_row_int(frame, dark, r, lo, hi, out):
    for c in range(frame.shape[1]):
        v = np.int32(frame[r, c])
        if dark is not None:
            # stempy: frame -= (uint16)dark, wrapping modulo 2**16
            v = (v - np.int32(dark[r, c])) & np.int32(0xFFFF)
        out[c + 1] = v if (v >= lo) & (v <= hi) else np.int32(0)


@njit(inline="always", **_JIT)
def _threshold_row_float(frame, dark, gain, r, background, xray, out):
    for c in range(frame.shape[1]):
        v = np.float32(frame[r, c])
        if dark is not None:
            v = v - dark[r, c]
        v = v * gain[r, c]
        # Written as stempy writes it, so NaN survives the cut exactly as it does there.
        out[c + 1] = np.float32(0) if (v <= background) | (v >= xray) else v


@njit(inline="always", **_JIT)
def _maxima_row(up, mid, down, floor, is_max):
    # Branch-free on purpose, so that LLVM turns it into SIMD compares.
    for c in range(mid.size - 2):
        v = mid[c + 1]
        is_max[c] = ((v > floor) & (v > up[c]) & (v > up[c + 1]) & (v > up[c + 2]) & (v > mid[c])
                     & (v > mid[c + 2]) & (v > down[c]) & (v > down[c + 1]) & (v > down[c + 2]))


@njit(inline="always", **_JIT)
def _scan_row(up, mid, down, floor, base, is_max, events, n):
    _maxima_row(up, mid, down, floor, is_max)
    # Events are rare: test eight flags at a time and look closer only where one is set.
    words = is_max.view(np.uint64)
    for w in range(words.size):
        if words[w] != 0:
            for c in range(8 * w, 8 * w + 8):
                if is_max[c]:
                    events[n] = base + c
                    n += 1
    return n


@njit(**_JIT)
def _count_into(frame, dark, gain, lo, hi, floor, sentinel, events):
    """Counts one frame into `events` (capacity >= max_events) and returns how many it wrote.

    The zeroed frame lives in a ring of three rows padded with `sentinel`, which every candidate
    pixel beats, so missing neighbours at edges and corners never block an event.
    """
    rows, cols = frame.shape
    if rows * cols == 1:
        events[0] = 0  # no neighbours at all: stempy counts the pixel whatever its value
        return 1
    ring = np.full((3, cols + 2), sentinel)
    is_max = np.zeros((cols + 7) // 8 * 8, np.bool_)
    n = 0
    # Row r lives in ring[(r + 1) % 3]; row -1 is the sentinel row ring[0].
    for r in range(-1, rows):
        nxt = ring[(r + 2) % 3]
        if r + 1 == rows:
            nxt[:] = sentinel
        elif gain is None:
            _threshold_row_int(frame, dark, r + 1, lo, hi, nxt)
        else:
            _threshold_row_float(frame, dark, gain, r + 1, lo, hi, nxt)
        if r >= 0:
            n = _scan_row(ring[r % 3], ring[(r + 1) % 3], nxt, floor, r * cols, is_max, events, n)
    return n


@njit(**_JIT)
def _append(flat, offsets, i, events, k):
    """Stores frame i's k events after frame i-1's, growing `flat` as needed; returns `flat`."""
    start = offsets[i]
    if start + k > flat.size:
        bigger = np.empty(max(start + k, 2 * flat.size), flat.dtype)
        bigger[:start] = flat[:start]
        flat = bigger
    flat[start : start + k] = events[:k]
    offsets[i + 1] = start + k
    return flat


@njit(**_JIT)
def _count_one(frame, dark, gain, lo, hi, floor, sentinel):
    events = np.empty(max_events(frame.shape[0], frame.shape[1]), np.uint32)
    n = _count_into(frame, dark, gain, lo, hi, floor, sentinel, events)
    return events[:n].copy()


@njit(**_JIT)
def _count_frames_serial(frames, dark, gain, lo, hi, floor, sentinel):
    n_frames, rows, cols = frames.shape
    scratch = np.empty(max_events(rows, cols), np.uint32)
    offsets = np.zeros(n_frames + 1, np.int64)
    flat = np.empty(max(1024, 64 * n_frames), np.uint32)
    for i in range(n_frames):
        k = _count_into(frames[i], dark, gain, lo, hi, floor, sentinel, scratch)
        flat = _append(flat, offsets, i, scratch, k)
    return flat[: offsets[n_frames]].copy(), offsets


@njit(parallel=True, **_JIT)
def _count_frames_parallel(frames, batch, dark, gain, lo, hi, floor, sentinel):
    n_frames, rows, cols = frames.shape
    # Frames go in batches so that the per-frame scratch (sized for the worst case) stays small.
    batch = max(1, min(n_frames, batch))
    scratch = np.empty((batch, max_events(rows, cols)), np.uint32)
    counts = np.empty(batch, np.int64)
    offsets = np.zeros(n_frames + 1, np.int64)
    flat = np.empty(max(1024, 64 * n_frames), np.uint32)
    for start in range(0, n_frames, batch):
        m = min(batch, n_frames - start)
        for j in prange(m):
            counts[j] = _count_into(frames[start + j], dark, gain, lo, hi, floor, sentinel, scratch[j])
        for j in range(m):
            flat = _append(flat, offsets, start + j, scratch[j], counts[j])
    return flat[: offsets[n_frames]].copy(), offsets


def _float32_at_or_below(x: float) -> np.float32:
    """Largest float32 <= x: for any float32 v, `v <= x` in float64 equals `v <= this` in float32."""
    with np.errstate(over="ignore"):
        f = np.float32(x)
    # float(f): numpy would compare a float32 with a Python float in float32
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > x else f


def _params(background: float, xray: float, float_path: bool) -> tuple:
    """Kernel scalars (lo, hi, floor, sentinel); their types select the uint16 or float32 kernel.

    stempy compares in float64. The same cut is made here with bounds in the pixels' own type,
    so that the per-pixel work stays in narrow SIMD lanes: on the uint16 path
    `background < v < xray` is `lo <= v <= hi` with integer bounds; on the float path the bounds
    are the float32 neighbours of the thresholds. A NaN threshold cuts nothing, as in stempy.
    `floor` lets the scan skip pixels that cannot be events: zeroed ones, unless a negative
    background lets float values go below zero. `sentinel` pads the missing neighbours.
    """
    background, xray = float(background), float(xray)
    if float_path:
        floor = 0.0 if background >= 0 else -math.inf
        return (_float32_at_or_below(background), -_float32_at_or_below(-xray),
                np.float32(floor), np.float32(-math.inf))
    lo = 0 if math.isnan(background) else math.floor(min(max(background, -2.0), 65536.0)) + 1
    hi = 65535 if math.isnan(xray) else math.ceil(min(max(xray, -1.0), 65537.0)) - 1
    # Zero pads the uint16 path: a zeroed pixel can never be an event there (floor = 0).
    return np.int32(max(lo, 0)), np.int32(min(hi, 65535)), np.uint16(0), np.uint16(0)


def _prepare(frames, ndim, dark, gain):
    frames = np.asarray(frames)
    if frames.dtype != np.uint16 or frames.ndim != ndim:
        raise TypeError(f"expected a {ndim}-D uint16 array, got {frames.ndim}-D {frames.dtype}")
    shape = frames.shape[-2:]
    out = []
    for name, ref in (("dark", dark), ("gain", gain)):
        if ref is not None:
            # float32 first, as stempy casts it, so truncation of the dark sees the same value
            ref = np.ascontiguousarray(ref, dtype=np.float32)
            if ref.shape != shape:
                raise ValueError(f"{name} has shape {ref.shape}, frames have {shape}")
        out.append(ref)
    return frames, out[0], out[1]


def count_frame(frame, background: float, xray: float, dark=None, gain=None) -> np.ndarray:
    """Event ids (uint32, row-major) of one 2-D uint16 frame. Releases the GIL while it runs."""
    frame, dark, gain = _prepare(frame, 2, dark, gain)
    return _count_one(frame, dark, gain, *_params(background, xray, gain is not None))


def count_frames(frames, background: float, xray: float, dark=None, gain=None) -> tuple[np.ndarray, np.ndarray]:
    """Counts frames[n, rows, cols] on all numba threads: (events uint32, offsets int64[n + 1]).

    Frame i's events are ``events[offsets[i]:offsets[i + 1]]``. Calling it from several Python
    threads at once needs numba's omp or tbb threading layer; use `count_frames_serial` there.
    """
    frames, dark, gain = _prepare(frames, 3, dark, gain)
    batch = 4 * numba.get_num_threads()
    return _count_frames_parallel(frames, batch, dark, gain, *_params(background, xray, gain is not None))


def count_frames_serial(frames, background: float, xray: float, dark=None, gain=None) -> tuple[np.ndarray, np.ndarray]:
    """Same result as `count_frames` on the calling thread only, with the GIL released.

    For worker threads that each own a stream of frames: N threads use N cores.
    """
    frames, dark, gain = _prepare(frames, 3, dark, gain)
    return _count_frames_serial(frames, dark, gain, *_params(background, xray, gain is not None))
