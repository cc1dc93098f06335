"""The public contract plugin authors implement: typed Params, per-process setup, per-batch work, end-of-scan finish.

A plugin class is a cheap, validated factory: `__init__` only keeps its `Params`; anything
heavy (buffers, compiled kernels, files) belongs in `setup`, which runs once in the
process and thread that will use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

__all__ = ["Analysis", "Batch", "Buffer", "Context", "Message", "Params", "Plugin", "Recorder", "Request", "Scan",
           "ScanResults", "Source", "Stage", "per_pixel", "per_position"]


class Params(BaseModel):
    """Base of every plugin's parameters; unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=Params)


@dataclass(slots=True)
class Message:
    """One message on the wire: a msgpack-able header and an optional raw payload (never copied)."""

    header: dict[str, Any]
    payload: Any = None  # bytes, memoryview, numpy array or anything with the buffer protocol

    @property
    def nbytes(self) -> int:
        if self.payload is None:
            return 0
        return memoryview(self.payload).nbytes


@dataclass(frozen=True)
class Scan:
    """One acquisition: an id unique within a run, and what the source knows about it.

    A source that knows where its items sit puts a `geometry` in `meta` (zpipe.geometry): the
    scan's shape and how an item maps to a scan position; analyses read `scan.geometry`."""

    id: int
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def geometry(self):
        from zpipe.geometry import Geometry

        return Geometry.from_meta(self.meta)


@dataclass
class Context:
    """Where a plugin instance runs; handed to `setup`."""

    node: str
    replica: int = 0
    replicas: int = 1
    thread: int = 0
    threads: int = 1
    host: str = "localhost"
    output_dir: str = "."
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("zpipe.plugin"))
    analysis: str = ""  # the analysis's name in its node group (an analysis may be listed twice)
    run: str = ""  # the same for every worker of one node group in one run, unique otherwise


class Plugin(Generic[P]):
    """Common base: `kind` says which roles can run it; `Params` types its parameters."""

    kind: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: P | None = None):
        self.params: P = params if params is not None else self.Params()  # type: ignore[assignment]

    def setup(self, ctx: Context) -> None:
        """Once per process/thread, before any data."""


class Recorder(Protocol):
    """Where a producer puts a scan's messages when nobody is there to receive them."""

    def write(self, msg: Message) -> None: ...

    def close(self) -> dict[str, Any]:
        """Make the files final (atomically) and return their manifest."""
        ...


class Request(Params):
    """What an acquisition may ask of a source (`zpipe acquire --set key=value`); nothing by default."""


class Source(Plugin[P]):
    """Makes the messages a producer sends: a sequence of scans, each split across sending threads.

    Run in batch (the default), the producer sends `scans()`. Run as a service (the node's
    `service: true`), it sends a scan for each acquisition requested while it runs (`zpipe acquire`):
    `acquire(scan_id, request)` makes it, in every replica and thread alike (so it must be a pure
    function of its arguments and the params), from a `Request` the source declares.
    """

    kind = "source"
    replay_plugin: ClassVar[str | None] = None  # the source that reads what `recorder` wrote, for `zpipe replay`
    Request: ClassVar[type[Request]] = Request

    def scans(self) -> Iterator[Scan]:
        raise NotImplementedError

    def acquire(self, scan_id: int, request: Request) -> Scan:
        """The scan an acquisition asks for (service mode); see the class's docstring."""
        raise NotImplementedError(f"{type(self).__name__} does not take acquisition requests")

    @classmethod
    def takes_requests(cls) -> bool:
        return cls.acquire is not Source.acquire

    def messages(self, scan: Scan, thread: int, threads: int) -> Iterable[Message]:
        """The messages thread `thread` of `threads` sends for `scan`; threads together send each once."""
        raise NotImplementedError

    def plan(self, scan: Scan, thread: int, threads: int) -> Iterable[dict[str, Any]]:
        """The headers `messages` will yield, in order, before any payload exists.

        Producers count from it how many messages each node group will get. The default
        makes the messages and drops the payloads; override it when headers are cheap.
        """
        return (m.header for m in self.messages(scan, thread, threads))

    def recorder(self, scan: Scan, directory: str) -> Recorder | None:
        """A writer for this thread's share of `scan` when it goes to disk; None: no disk fallback."""
        return None

    def finish_recording(self, scan: Scan, directory: str, manifests: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Once every thread of every replica has closed its recorder: write what ties the files together."""
        return None


class Stage(Plugin[P]):
    """Processes batches of messages; may return messages to pass downstream."""

    kind = "stage"

    def begin(self, scan: Scan) -> None:
        """Before the first batch of a scan."""

    def process(self, batch: Sequence[Message]) -> Iterable[Message] | None:
        raise NotImplementedError

    def finish(self, scan: Scan) -> dict[str, Any] | None:
        """After the last batch of a scan; the returned figures go into the scan's account."""
        return None


class Batch:
    """Assembled items of one scan, stacked: `data[i]` is the item whose header is `headers[i]`,
    at scan position `positions[i]`.

    Each header carries the first part's fields plus `complete` (all parts arrived) and
    `missing` (the part numbers that did not, zero-filled in `data`). `positions` are flat
    indices (row-major) into the scan's shape (`scan.geometry`), -1 for an item the source's
    geometry does not place; an analysis never reads a detector's header names to place a frame.

    `data` is stacked from the received parts when it is first asked for (one copy; an
    analysis that only reads headers costs none) into a buffer the node group reuses: it is
    valid during `process` only, so copy what you keep.
    """

    __slots__ = ("scan", "headers", "_data", "_stack", "_positions")

    def __init__(self, scan: Scan, data: np.ndarray | None = None, headers: list[dict[str, Any]] | None = None,
                 stack: Callable[[], np.ndarray] | None = None, positions: np.ndarray | None = None):
        if data is None and stack is None:
            raise ValueError("a Batch needs its data or a way to stack it")
        self.scan, self.headers = scan, headers if headers is not None else []
        self._data, self._stack = data, stack
        self._positions = positions

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data, self._stack = self._stack(), None
        return self._data

    @property
    def positions(self) -> np.ndarray:
        if self._positions is None:
            g = self.scan.geometry
            self._positions = (g.positions(self.headers) if g is not None
                               else np.full(len(self.headers), -1, np.int64))
        return self._positions

    def __len__(self) -> int:
        return len(self.headers)

    def __repr__(self) -> str:
        return f"Batch(scan={self.scan.id}, items={len(self)})"

    @property
    def complete(self) -> np.ndarray:
        return np.fromiter((h["complete"] for h in self.headers), bool, len(self.headers))


@dataclass(frozen=True)
class Buffer:
    """A result an analysis declares and the framework owns: allocated per scan, filled, merged
    across workers and node groups, marked where positions never arrived, and written.

    * `per_position(dtype, shape)`: one value (of `shape`) per scan position. In `process`,
      `out[name]` holds one row per item of the batch (zeros); what the analysis puts there is
      placed at the items' positions. Positions no item reached stay unreceived (NaN in float
      buffers when written, and in the `received` mask).
    * `per_pixel(dtype)`: one value per detector pixel (the item's shape), summed over the scan:
      `out[name]` is this worker's running sum; the framework adds workers and node groups up.
    """

    kind: str  # "position" or "pixel"
    dtype: str = "float64"
    shape: tuple[int, ...] = ()


def per_position(dtype: str = "float64", shape: tuple[int, ...] = ()) -> Buffer:
    return Buffer("position", str(np.dtype(dtype)), tuple(shape))


def per_pixel(dtype: str = "float64") -> Buffer:
    return Buffer("pixel", str(np.dtype(dtype)))


@dataclass
class ScanResults:
    """What a scan's writer gets: the merged buffers, which positions arrived, and every worker's `results`."""

    scan: Scan
    buffers: dict[str, np.ndarray]
    received: np.ndarray | None  # bool per position (None without per-position buffers)
    parts: list[Any]  # each worker's `results(scan)`, of every node group

    def filled(self) -> dict[str, np.ndarray]:
        """The buffers with unreceived positions set to NaN (float buffers) for saving or display."""
        out = {}
        for name, a in self.buffers.items():
            if self.received is not None and a.dtype.kind in "fc" and a.shape[:1] == self.received.shape[:1] \
                    and not self.received.all():
                a = a.copy()
                a[~self.received] = np.nan
            out[name] = a
        return out


class Analysis(Plugin[P]):
    """Runs in a node group's workers on batches of assembled items (frames), scan by scan.

    The node group gives each scan its own instance per worker (never two scans at once):
    `begin`, `process` for every batch, `finish`. Results come two ways:
    * buffers the analysis declares (`buffers`, see `Buffer`): the framework allocates, fills
      (`process(batch, out)`), merges and writes them: no merge or file code in the analysis;
    * `finish` returns figures that add up (counts, sums), and `results` anything else a custom
      `write` needs (it travels with zpipe.codec: numbers, strings, lists, dicts, numpy arrays).
    `write` runs once per scan where all node groups' results meet, on an instance made with the
    analysis's own params (no `setup`). See docs/analyses.md.
    """

    kind = "analysis"

    def buffers(self, scan: Scan) -> dict[str, Buffer]:
        """The result buffers this analysis fills for `scan` (by name): per position, per pixel."""
        return {}

    def begin(self, scan: Scan) -> None:
        """Before the first batch of a scan."""

    def process(self, batch: Batch, out: dict[str, np.ndarray] | None = None) -> None:
        raise NotImplementedError

    def finish(self, scan: Scan) -> dict[str, Any] | None:
        """After the last batch of a scan; figures that add up over workers and node groups."""
        return None

    def results(self, scan: Scan) -> Any:
        """This worker's results for `scan` beyond the buffers, for a custom `write`, after `finish`."""
        return None

    def write(self, scan: Scan, results: ScanResults, report: dict[str, Any], output_dir: str) -> str | None:
        """The scan's output file; by default, the buffers (unreceived positions NaN) and the
        `received` mask as `scan_{id}_{name}.npz`, or nothing without buffers. Returns its path."""
        if not results.buffers:
            return None
        import os

        name = getattr(self, "name", "") or type(self).__name__.lower()
        path = os.path.join(output_dir, f"scan_{scan.id}_{name}.npz")
        tmp = f"{path}.partial.npz"
        arrays = results.filled()
        if results.received is not None:
            arrays["received"] = results.received
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path


KINDS = {"source": Source, "stage": Stage, "analysis": Analysis}
