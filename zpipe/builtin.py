"""Domain-neutral built-in plugins (registered through entry points like any third party's).

`counter` makes numbered messages with a checksum in each header, `checksum` verifies them,
`relay` passes messages on: enough to prove a topology moves data intact end to end.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
from pydantic import Field

from zpipe.plugin import Analysis, Batch, Context, Message, Params, Scan, Source, Stage


class CounterSource(Source):
    """`messages` numbered messages of `size` bytes per scan, for `scans` scans."""

    class Params(Params):
        messages: int = Field(1000, ge=0, description="messages per scan")
        size: int = Field(4096, ge=0, description="payload bytes per message")
        scans: int = Field(1, ge=1, description="number of scans")
        first_scan: int = Field(1, ge=0)

    def setup(self, ctx: Context) -> None:
        self.replica = ctx.replica
        self._base = np.random.default_rng(1234 + ctx.replica).integers(0, 256, self.params.size + 8, dtype=np.uint8)

    def scans(self) -> Iterator[Scan]:
        for i in range(self.params.scans):
            yield Scan(self.params.first_scan + i, {"messages": self.params.messages})

    def messages(self, scan: Scan, thread: int, threads: int) -> Iterator[Message]:
        size = self.params.size
        for index in range(thread, self.params.messages, threads):
            offset = index % 8
            payload = self._base[offset:offset + size]
            yield Message({"scan": scan.id, "index": index, "source": self.replica,
                           "crc": zlib.crc32(payload)}, payload)


class ChecksumSink(Stage):
    """Verifies each message's checksum; fails the scan's account on any mismatch."""

    class Params(Params):
        strict: bool = Field(True, description="raise on a checksum mismatch instead of only counting it")

    def begin(self, scan: Scan) -> None:
        self.messages = self.bytes = self.bad = 0

    def process(self, batch: Sequence[Message]) -> None:
        for msg in batch:
            self.messages += 1
            self.bytes += msg.nbytes
            if "crc" in msg.header and zlib.crc32(msg.payload) != msg.header["crc"]:
                self.bad += 1
                if self.params.strict:
                    raise ValueError(f"checksum mismatch in message {msg.header}")

    def finish(self, scan: Scan) -> dict:
        return {"messages": self.messages, "bytes": self.bytes, "checksum_errors": self.bad}


class Relay(Stage):
    """Passes every message on unchanged (zero-copy)."""

    def process(self, batch: Sequence[Message]) -> Sequence[Message]:
        return batch


class Discard(Analysis):
    """Counts items and does nothing else: the no-op stage benchmarks measure transport with."""

    class Params(Params):
        delay: float = Field(0.0, ge=0, description="seconds to sleep per item: a deliberately slow stage")

    def begin(self, scan: Scan) -> None:
        self.items = 0

    def process(self, batch: Batch) -> None:
        self.items += len(batch)
        if self.params.delay:
            time.sleep(self.params.delay * len(batch))

    def finish(self, scan: Scan) -> dict:
        return {"items": self.items}
