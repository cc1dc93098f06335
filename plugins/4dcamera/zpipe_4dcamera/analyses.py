"""Analyses a node group runs on assembled 4D-Camera frames."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from zpipe.plugin import Analysis, Batch, Params, Scan, per_position


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


class Detector(Params):
    """A disk (inner 0) or an annulus of the diffraction pattern, in pixels."""

    centre: tuple[float, float] = Field(description="(row, column) of the centre")
    outer: float = Field(gt=0, description="outer radius: pixels closer than this count")
    inner: float = Field(0.0, ge=0, description="inner radius: pixels closer than this do not (0: a disk)")


class VirtualDetectors(Analysis):
    """Virtual detectors (bright field, annular dark field, ...): each one's total counts per scan position,
    all of them in one pass over the frames. Sums are integers, so exact whatever the batching."""

    class Params(Params):
        detectors: dict[str, Detector] = Field(min_length=1, description="name -> disk or annulus")

    def buffers(self, scan: Scan) -> dict:
        return {name: per_position("float64") for name in self.params.detectors}  # sums exact below 2**53

    def process(self, batch: Batch, out: dict) -> None:
        frames = batch.data.reshape(len(batch), -1)
        for name, pixels in self._pixels(batch.data.shape[1:]).items():
            out[name][:] = frames[:, pixels].sum(axis=1, dtype=np.int64)

    def _pixels(self, shape) -> dict[str, np.ndarray]:
        """Each detector's pixels (flat indices), made once per frame shape."""
        if getattr(self, "_shape", None) != shape:
            rows, cols = np.indices(shape)
            self._shape, self._by_name = shape, {}
            for name, d in self.params.detectors.items():
                r2 = (rows - d.centre[0]) ** 2 + (cols - d.centre[1]) ** 2
                self._by_name[name] = np.flatnonzero((r2 < d.outer ** 2) & (r2 >= d.inner ** 2))
        return self._by_name


class CentreOfMass(Analysis):
    """Centre of mass of each frame, (row, column) in pixels, per scan position; NaN for an empty frame.
    Moments are integer sums, divided once: exact whatever the batching."""

    def buffers(self, scan: Scan) -> dict:
        return {"com_y": per_position(), "com_x": per_position()}

    def process(self, batch: Batch, out: dict) -> None:
        rows, cols = batch.data.sum(axis=2, dtype=np.int64), batch.data.sum(axis=1, dtype=np.int64)
        total = rows.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["com_y"][:] = rows @ np.arange(rows.shape[1]) / total
            out["com_x"][:] = cols @ np.arange(cols.shape[1]) / total
