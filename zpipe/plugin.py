"""The public contract plugin authors implement: typed Params, per-process setup, per-batch work, end-of-scan finish.

A plugin class is a cheap, validated factory: `__init__` only keeps its `Params`; anything
heavy (buffers, compiled kernels, files) belongs in `setup`, which runs once in the
process and thread that will use it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

__all__ = ["Context", "Message", "Params", "Plugin", "Scan", "Source", "Stage"]


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


class Plugin(Generic[P]):
    """Common base: `kind` says which roles can run it; `Params` types its parameters."""

    kind: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: P | None = None):
        self.params: P = params if params is not None else self.Params()  # type: ignore[assignment]

    def setup(self, ctx: Context) -> None:
        """Once per process/thread, before any data."""


class Source(Plugin[P]):
    """Makes the messages a producer sends: a sequence of scans, each split across sending threads."""

    kind = "source"

    def scans(self) -> Iterator[Scan]:
        raise NotImplementedError

    def messages(self, scan: Scan, thread: int, threads: int) -> Iterable[Message]:
        """The messages thread `thread` of `threads` sends for `scan`; threads together send each once."""
        raise NotImplementedError


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


KINDS = {"source": Source, "stage": Stage}
