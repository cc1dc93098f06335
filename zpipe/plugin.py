"""The public contract plugin authors implement: typed Params, per-process setup, per-batch work, end-of-scan finish.

A plugin class is a cheap, validated factory: `__init__` only keeps its `Params`; anything
heavy (buffers, compiled kernels, files) belongs in `setup`, which runs once in the
process and thread that will use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

__all__ = ["Analysis", "Batch", "Context", "Message", "Params", "Plugin", "Recorder", "Scan", "Source", "Stage"]


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


@dataclass(frozen=True, slots=True)
class Scan:
    """One acquisition: an id unique within a run, and what the source knows about it."""

    id: int
    meta: dict[str, Any] = field(default_factory=dict)


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


class Source(Plugin[P]):
    """Makes the messages a producer sends: a sequence of scans, each split across sending threads."""

    kind = "source"
    replay_plugin: ClassVar[str | None] = None  # the source that reads what `recorder` wrote, for `zpipe replay`

    def scans(self) -> Iterator[Scan]:
        raise NotImplementedError

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
    """Assembled items of one scan, stacked: `data[i]` is the item whose header is `headers[i]`.

    Each header carries the first part's fields plus `complete` (all parts arrived) and
    `missing` (the part numbers that did not, zero-filled in `data`).

    `data` is stacked from the received parts when it is first asked for (one copy; an
    analysis that only reads headers costs none) into a buffer the node group reuses: it is
    valid during `process` only, so copy what you keep.
    """

    __slots__ = ("scan", "headers", "_data", "_stack")

    def __init__(self, scan: Scan, data: np.ndarray | None = None, headers: list[dict[str, Any]] | None = None,
                 stack: Callable[[], np.ndarray] | None = None):
        if data is None and stack is None:
            raise ValueError("a Batch needs its data or a way to stack it")
        self.scan, self.headers = scan, headers if headers is not None else []
        self._data, self._stack = data, stack

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data, self._stack = self._stack(), None
        return self._data

    def __len__(self) -> int:
        return len(self.headers)

    def __repr__(self) -> str:
        return f"Batch(scan={self.scan.id}, items={len(self)})"

    @property
    def complete(self) -> np.ndarray:
        return np.fromiter((h["complete"] for h in self.headers), bool, len(self.headers))


class Analysis(Plugin[P]):
    """Runs in a node group's workers on batches of assembled items (frames), scan by scan.

    One instance per worker thread: state kept on `self` is per worker; `finish` returns
    what this worker found, and the node group adds the figures up.
    """

    kind = "analysis"

    def begin(self, scan: Scan) -> None:
        """Before the first batch of a scan."""

    def process(self, batch: Batch) -> None:
        raise NotImplementedError

    def finish(self, scan: Scan) -> dict[str, Any] | None:
        return None

    def results(self, scan: Scan) -> dict[str, Any] | None:
        """This worker's results for `scan` (numpy arrays and plain values), after `finish`.

        The node groups ship every worker's results to one place (over ZeroMQ, or with
        MPI when run under mpiexec) and call `write` there once per scan.
        """
        return None

    @classmethod
    def write(cls, scan: Scan, parts: list[dict[str, Any]], report: dict[str, Any], output_dir: str) -> str | None:
        """Combine every worker's `results` into the scan's output file; return its path."""
        return None


KINDS = {"source": Source, "stage": Stage, "analysis": Analysis}
