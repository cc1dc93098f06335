"""Analyses a node group runs on assembled 4D-Camera frames."""

from __future__ import annotations

import numpy as np

from zpipe.plugin import Analysis, Batch, Scan


class FrameSum(Analysis):
    """Sums every frame of a scan; the exact integer total makes a checksum of the whole stream."""

    def begin(self, scan: Scan) -> None:
        self.frames = 0
        self.total = 0
        self.pattern = None

    def process(self, batch: Batch) -> None:
        sums = batch.data.reshape(len(batch), -1).sum(axis=1, dtype=np.int64)
        self.frames += len(batch)
        self.total += int(sums.sum())
        summed = batch.data.sum(axis=0, dtype=np.int64)
        self.pattern = summed if self.pattern is None else self.pattern + summed

    def finish(self, scan: Scan) -> dict:
        return {"frames": self.frames, "sum": self.total}
