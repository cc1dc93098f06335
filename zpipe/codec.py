"""One codec for what analyses hand between processes: the same bytes over ZeroMQ and MPI, checked on arrival.

What travels (documented in docs/analyses.md, "What results may hold"):
  None, bool, int (64-bit, signed or not), float, str, bytes, lists (tuples arrive as lists),
  dicts with str keys, numpy arrays of numbers or booleans (any shape, any nesting), and numpy
  scalars (they arrive as Python numbers); nested at most 32 deep.
Anything else is refused where it is made (TypeError naming it), never half-way across.

Frames: a msgpack header that holds the structure, each array replaced by a small reference,
then one frame per array, its raw bytes (no pickling, no copy on the way out). A decoder never
trusts the frames: references, dtypes and sizes are checked, and ValueError says what is wrong.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

ARRAY = 1  # msgpack ext type: [index, dtype, shape] of an array frame
MAX_DEPTH = 32
MAX_ARRAYS = 100_000
KINDS = "biufc"  # bool, int, uint, float, complex: no objects, strings or datetimes


class CodecError(ValueError):
    """Frames that are not what `encode` makes; says what is wrong."""


def encode(value: Any) -> list:
    """[header, array frames...] for `value`; TypeError/ValueError if it holds what cannot travel."""
    arrays: list[np.ndarray] = []

    def check(v: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"a value nested more than {MAX_DEPTH} deep")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise TypeError(f"a dict key {type(k).__name__} (keys must be str)")
                check(x, depth + 1)
        elif isinstance(v, (list, tuple)):
            for x in v:
                check(x, depth + 1)
        elif isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**64:
            raise ValueError(f"an integer of {v.bit_length()} bits (at most 64)")
        elif isinstance(v, np.ndarray):
            if v.dtype.kind not in KINDS:
                raise TypeError(f"a numpy array of dtype {v.dtype} (numbers and booleans only)")
        elif not (v is None or isinstance(v, (bool, int, float, str, bytes, np.generic))):
            raise TypeError(f"a {type(v).__name__}, which cannot travel between processes")
        elif isinstance(v, np.generic) and v.dtype.kind not in KINDS:
            raise TypeError(f"a numpy {v.dtype} scalar")

    def default(v: Any):
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            arrays.append(a)
            return msgpack.ExtType(ARRAY, msgpack.packb([len(arrays) - 1, a.dtype.str, list(a.shape)]))
        if isinstance(v, np.generic):
            return v.item()
        raise TypeError(f"a {type(v).__name__}, which cannot travel between processes")

    check(value, 0)
    header = msgpack.packb(value, default=default, use_bin_type=True)
    return [header, *arrays]


def decode(frames) -> Any:
    """The value `encode` made of these frames (arrays are copied out of the frames, writable)."""
    bufs = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    if not bufs:
        raise CodecError("no frames")
    if len(bufs) - 1 > MAX_ARRAYS:
        raise CodecError(f"{len(bufs) - 1} array frames (at most {MAX_ARRAYS})")
    used: set[int] = set()

    def ext(code: int, data: bytes):
        if code != ARRAY:
            raise CodecError(f"unknown msgpack extension {code}")
        ref = msgpack.unpackb(data, raw=False)
        if not (isinstance(ref, list) and len(ref) == 3 and type(ref[0]) is int and isinstance(ref[1], str)
                and isinstance(ref[2], list) and all(type(n) is int and n >= 0 for n in ref[2])):
            raise CodecError("a malformed array reference")
        index, dtype_str, shape = ref
        if not 0 <= index < len(bufs) - 1 or index in used:
            raise CodecError(f"array reference {index} is not one of the {len(bufs) - 1} frames (or used twice)")
        used.add(index)
        try:
            dtype = np.dtype(dtype_str)
        except TypeError:
            raise CodecError(f"array dtype {dtype_str[:20]!r} is not one numpy knows") from None
        if dtype.kind not in KINDS or dtype.itemsize > 16:
            raise CodecError(f"array dtype {dtype} (numbers and booleans only)")
        buf = memoryview(bufs[index + 1])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != buf.nbytes:
            raise CodecError(f"array of {shape} {dtype} in a frame of {buf.nbytes} bytes")
        return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()

    try:
        value = msgpack.unpackb(bufs[0], raw=False, ext_hook=ext, strict_map_key=True)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"the header is not what encode makes: {exc.__class__.__name__}") from None
    if len(used) != len(bufs) - 1:
        raise CodecError(f"{len(bufs) - 1 - len(used)} array frames no reference points to")
    return value
