"""A deterministic simulated 4D Camera, so pipelines can be built and tested without the detector."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import FRAME_SHAPE, SECTOR_SHAPE, SECTORS

SECTOR_PIXELS = SECTOR_SHAPE[0] * SECTOR_SHAPE[1]
# A flat pool of ready-made background pixels; every sector copies a window of it
# starting at a random (not row-aligned) offset, so there are ~4 million distinct
# backgrounds and no sector pays for drawing 82,944 Gaussians.
_POOL_PIXELS = 1 << 22
# Half-width of the square stamp an electron's charge cloud is drawn into (7x7):
# at sigma <= 1 px the cloud is below 1 ADU beyond 3 px.
_STAMP = 3
_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=4)
def _noise_pool(seed: int, background: float, noise: float) -> np.ndarray:
    # Rounding to integers adds 1/12 ADU^2 of variance; take it out so the
    # stored pixels have the requested std.
    sigma = float(np.sqrt(max(noise**2 - 1.0 / 12.0, 0.0)))
    rng = np.random.default_rng((seed, 0x6E6F697365))  # "noise": its own stream
    pool = np.rint(rng.normal(background, sigma, _POOL_PIXELS))
    pool = np.clip(pool, 0, np.iinfo(np.uint16).max).astype(np.uint16)
    pool.flags.writeable = False  # shared between cameras through the cache
    return pool


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class SimulatedCamera:
    """Frames and sectors of a simulated scan, each reproducible on its own.

    Everything random in a frame is drawn from one generator seeded by
    (seed, frame_index), so a producer that simulates only sector k and a
    consumer that simulates whole frames get identical pixels. ``frame_index``
    counts acquisitions from 0; the header's frame number is
    ``first_frame + frame_index``.

    ``electrons_per_frame`` is the Poisson mean of electrons per frame (most in
    a bright-field disk of ``disk_radius`` px, the rest anywhere);
    ``xray_probability`` the chance a frame holds one x-ray hit; ``loss`` the
    chance each sector is lost upstream (see lost()).
    """

    def __init__(
        self,
        scan_shape: tuple[int, int] = (16, 16),
        electrons_per_frame: float = 40.0,
        xray_probability: float = 0.0,
        background: float = 20.5,
        noise: float = 2.4,
        seed: int = 0,
        first_frame: int = 0,
        scan_number: int = 1,
        frames_per_position: int = 1,
        loss: float = 0.0,
        cloud_sigma: tuple[float, float] = (0.6, 1.0),
        peak_adu: tuple[float, float] = (60.0, 250.0),
        xray_adu: tuple[int, int] = (2000, 9000),
        disk_radius: float = 60.0,
    ):
        width, height = (int(v) for v in scan_shape)
        if not (0 < width <= 0xFFFF and 0 < height <= 0xFFFF):
            raise ValueError(f"scan_shape {scan_shape} must fit the header's uint16 width and height")
        if not 0.0 <= loss <= 1.0 or not 0.0 <= xray_probability <= 1.0:
            raise ValueError("loss and xray_probability are probabilities in [0, 1]")
        if frames_per_position < 1 or electrons_per_frame < 0 or seed < 0:
            raise ValueError("frames_per_position >= 1, electrons_per_frame >= 0 and seed >= 0 are required")
        self.scan_shape = (width, height)
        self.electrons_per_frame = float(electrons_per_frame)
        self.xray_probability = float(xray_probability)
        self.background, self.noise = float(background), float(noise)
        self.seed, self.first_frame, self.scan_number = int(seed), int(first_frame), int(scan_number)
        self.frames_per_position = int(frames_per_position)
        self.loss = float(loss)
        self.cloud_sigma, self.peak_adu, self.xray_adu = cloud_sigma, peak_adu, xray_adu
        self.disk_radius = float(disk_radius)
        if self.first_frame + self.n_frames - 1 > 0xFFFFFFFF:
            raise ValueError("frame numbers must fit the header's uint32")
        self._pool = _noise_pool(self.seed, self.background, self.noise)
        self._stamp = np.arange(-_STAMP, _STAMP + 1)

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1] * self.frames_per_position

    def frame_number(self, frame_index: int) -> int:
        return self.first_frame + frame_index

    def scan_position(self, frame_index: int) -> tuple[int, int]:
        """(scan_x, scan_y); a position's repeated frames are acquired back to back."""
        position = frame_index // self.frames_per_position
        width, height = self.scan_shape
        if not 0 <= position < width * height:
            raise IndexError(f"frame index {frame_index} is outside the scan ({self.n_frames} frames)")
        return position % width, position // width

    def header(self, frame_index: int, k: int) -> dict:
        scan_x, scan_y = self.scan_position(frame_index)
        return {
            "scan_number": self.scan_number,
            "frame_number": self.frame_number(frame_index),
            "scan_width": self.scan_shape[0],
            "scan_height": self.scan_shape[1],
            "scan_x": scan_x,
            "scan_y": scan_y,
            "module": k,
        }

    def lost(self, frame_index: int, k: int) -> bool:
        """Whether sector k of this frame is dropped upstream (as UDP loss would).

        A hash rather than a generator so it costs ~1 us and stays independent of
        the pixel draws: changing ``loss`` never changes the pixels.
        """
        if self.loss <= 0.0:
            return False
        h = _splitmix64(_splitmix64(_splitmix64(self.seed) ^ int(frame_index)) ^ (int(k) + 1))
        return (h >> 11) * (1.0 / (1 << 53)) < self.loss

    def frame(self, frame_index: int) -> np.ndarray:
        draws = self._draws(frame_index)
        out = np.empty(FRAME_SHAPE, dtype=np.uint16)
        for k in range(SECTORS):
            self._render(draws, k, out[k * SECTOR_SHAPE[0] : (k + 1) * SECTOR_SHAPE[0]])
        return out

    def sector(self, frame_index: int, k: int) -> np.ndarray:
        if not 0 <= k < SECTORS:
            raise ValueError(f"sector {k} is not one of 0..{SECTORS - 1}")
        out = np.empty(SECTOR_SHAPE, dtype=np.uint16)
        self._render(self._draws(frame_index), k, out)
        return out

    def _transmission(self, frame_index: int) -> float:
        # Fraction of electrons landing in the bright-field disk; a lattice-like
        # pattern over the scan so virtual images of the simulated data show structure.
        x, y = self.scan_position(frame_index)
        return 0.6 + 0.3 * np.cos(2 * np.pi * x / 8.0) * np.cos(2 * np.pi * y / 8.0)

    def _draws(self, frame_index: int) -> dict:
        # All per-frame randomness, drawn in one fixed order: whichever sector is
        # rendered, the generator sees the same sequence of calls.
        rng = np.random.default_rng((self.seed, frame_index))
        offsets = rng.integers(0, _POOL_PIXELS - SECTOR_PIXELS, SECTORS)
        n = int(rng.poisson(self.electrons_per_frame))
        in_disk = rng.random(n) < self._transmission(frame_index)
        radius = self.disk_radius * np.sqrt(rng.random(n))
        angle = rng.uniform(0, 2 * np.pi, n)
        anywhere = rng.uniform(0, FRAME_SHAPE[0] - 1, (2, n))
        centre = (FRAME_SHAPE[0] - 1) / 2
        rows = np.where(in_disk, centre + radius * np.sin(angle), anywhere[0])
        cols = np.where(in_disk, centre + radius * np.cos(angle), anywhere[1])
        peaks = rng.uniform(*self.peak_adu, n)
        sigmas = rng.uniform(*self.cloud_sigma, n)
        xray = None
        if rng.random() < self.xray_probability:
            xray = (int(rng.integers(0, FRAME_SHAPE[0] * FRAME_SHAPE[1])), int(rng.integers(*self.xray_adu)))
        return {"offsets": offsets, "rows": rows, "cols": cols, "peaks": peaks, "sigmas": sigmas, "xray": xray}

    def _render(self, draws: dict, k: int, out: np.ndarray) -> None:
        offset = int(draws["offsets"][k])
        out[...] = self._pool[offset : offset + SECTOR_PIXELS].reshape(SECTOR_SHAPE)
        top = k * SECTOR_SHAPE[0]
        rows = draws["rows"]
        # Clouds near a sector edge spill into the neighbour; both sides draw their part.
        near = (rows > top - _STAMP - 1) & (rows < top + SECTOR_SHAPE[0] + _STAMP)
        if near.any():
            self._add_clouds(out, top, rows[near], draws["cols"][near], draws["peaks"][near], draws["sigmas"][near])
        if draws["xray"] is not None:
            pixel, adu = draws["xray"]
            row, col = divmod(pixel, FRAME_SHAPE[1])
            if top <= row < top + SECTOR_SHAPE[0]:
                out[row - top, col] = min(int(out[row - top, col]) + adu, 0xFFFF)

    def _add_clouds(self, out, top, rows, cols, peaks, sigmas) -> None:
        # One 7x7 Gaussian stamp per electron, sub-pixel centred, all at once.
        s = self._stamp
        r = np.rint(rows).astype(np.int64)[:, None, None] + s[None, :, None]
        c = np.rint(cols).astype(np.int64)[:, None, None] + s[None, None, :]
        d2 = (r - rows[:, None, None]) ** 2 + (c - cols[:, None, None]) ** 2
        adu = np.rint(peaks[:, None, None] * np.exp(-d2 / (2 * sigmas[:, None, None] ** 2)))
        r = r - top
        keep = (adu > 0) & (r >= 0) & (r < SECTOR_SHAPE[0]) & (c >= 0) & (c < SECTOR_SHAPE[1])
        # add.at so overlapping clouds pile up; values stay far below uint16 overflow.
        np.add.at(out.reshape(-1), (r * SECTOR_SHAPE[1] + c)[keep], adu[keep].astype(np.uint16))
