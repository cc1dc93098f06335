"""Background and x-ray thresholds for electron counting, computed as stempy 3.6 computes them."""

# Deliberate differences from stempy (tests/test_counting.py checks the agreement):
# * Every frame passed in is sampled once. stempy draws `number_of_samples` frames at random,
#   with replacement, from a nondeterministically seeded generator. Pick the sample (complete
#   frames only) before calling.
# * Sample values keep their sign. stempy subtracts the dark in uint16, so a pixel below its dark
#   wraps to ~65535; that wrecks the statistics, the histogram bound then overflows an int and
#   stempy raises "cannot create std::vector larger than max_size()". Where nothing wraps the two
#   agree exactly.
# * The histogram: stempy's ends at min(max_sample, mean + x_ray_threshold * std_dev). Presumably
#   meant mean + n_sigma * std_dev (which is x_ray_threshold) but multiplied the threshold itself,
#   so for real data the bound lies past the largest sample, and the histogram runs from the
#   smallest sample to the largest (the largest value itself falls outside the last bin). That is
#   reproduced, bound in float so it cannot overflow: `number_of_bins` then matches stempy's
#   metadata, and the fit does not care, since the bins above the x-ray threshold hold almost
#   nothing.
# Kept on purpose: with a gain, stempy stores each sample through a uint16, truncating it after the
# dark subtraction and again after the gain. The counter works on exact float values, but matching
# the truncation keeps the background threshold equal to stempy's (it moves it by ~0.5 ADU, more
# than the 1 % we promise).

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numba import njit


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Everything stempy stores in /metadata/electron_counting, under the same names."""

    background_threshold: float
    x_ray_threshold: float
    number_of_samples: int
    min_sample: float
    max_sample: float
    mean: float
    variance: float
    std_dev: float
    number_of_bins: int
    x_ray_threshold_n_sigma: float
    background_threshold_n_sigma: float
    optimized_mean: float
    optimized_std_dev: float

    def to_attrs(self) -> dict:
        """HDF5 attributes for /metadata/electron_counting, as stempy writes them."""
        return {"threshold_calculated": True, **dataclasses.asdict(self)}


@njit(cache=True, nogil=True)
def _sample(raw, dark, gain, j):
    """One sample value, as an integer, following stempy's calculateThresholds arithmetic."""
    if gain is None:
        v = np.int64(raw)
        if dark is not None:
            v -= np.int64(np.int32(dark[j]))
        return v
    f = np.float32(raw)
    if dark is not None:
        f = np.float32(np.int64(f - dark[j]))
    return np.int64(f * gain[j])


@njit(cache=True, nogil=True)
def _value_range(frames, dark, gain):
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for i in range(frames.shape[0]):
        for j in range(frames.shape[1]):
            v = _sample(frames[i, j], dark, gain, j)
            lo, hi = min(lo, v), max(hi, v)
    return lo, hi


@njit(cache=True, nogil=True)
def _value_counts(frames, dark, gain, lo, counts):
    for i in range(frames.shape[0]):
        for j in range(frames.shape[1]):
            counts[_sample(frames[i, j], dark, gain, j) - lo] += 1


def _gaussian(params, x):
    amplitude, mu, sigma = params
    return amplitude * np.exp(-((x - mu) ** 2) / (2 * sigma**2))


def peak_start(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Starting point for the fit: height and position of the highest bin, width from its FWHM."""
    top = int(np.argmax(y))
    below = np.flatnonzero(y <= y[top] / 2)
    left = below[below < top].max(initial=0)
    right = below[below > top].min(initial=len(y) - 1)
    return float(y[top]), float(x[top]), max((x[right] - x[left]) / 2.3548, 0.5)


def fit_gaussian(x: np.ndarray, y: np.ndarray, start) -> np.ndarray:
    """Least-squares fit of ``A exp(-(x-mu)^2 / 2 sigma^2)`` to (x, y) by Levenberg-Marquardt.

    Three parameters and a smooth residual do not need scipy: this is Marquardt's damped
    Gauss-Newton with diagonal scaling, run to machine-precision convergence.
    """
    p = np.asarray(start, dtype=np.float64)
    r = _gaussian(p, x) - y
    cost = r @ r
    damping = 1e-3
    for _ in range(500):
        amplitude, mu, sigma = p
        e = np.exp(-((x - mu) ** 2) / (2 * sigma**2))
        d_mu = amplitude * e * (x - mu) / sigma**2
        jac = np.stack([e, d_mu, d_mu * (x - mu) / sigma], axis=1)
        jtj, grad = jac.T @ jac, jac.T @ r
        scale = np.diag(np.diag(jtj))
        while True:
            try:
                step = np.linalg.solve(jtj + damping * scale, -grad)
            except np.linalg.LinAlgError:
                step = None
            if step is not None:
                trial = p + step
                r_trial = _gaussian(trial, x) - y
                cost_trial = r_trial @ r_trial
                if cost_trial <= cost:
                    break
            damping *= 10
            if damping > 1e20:
                return p  # no step lowers the cost: p is the minimum to machine precision
        converged = cost - cost_trial <= 1e-15 * cost and np.all(np.abs(step) <= 1e-12 * (np.abs(p) + 1e-12))
        p, r, cost = trial, r_trial, cost_trial
        damping = max(damping / 10, 1e-15)
        if converged:
            return p
    raise RuntimeError("Gaussian fit of the background histogram did not converge")


def calculate_thresholds(frames, dark=None, gain=None, background_n_sigma: float = 4.5,
                         xray_n_sigma: float = 175) -> Thresholds:
    """Thresholds from sample frames[n, rows, cols] (uint16), as stempy's calculate_thresholds.

    `dark` and `gain` are the arrays passed to the counter (`gain` multiplies; see
    `counting.gain_multiplier` for a stempy-style gain map).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint16 or frames.ndim not in (2, 3):
        raise TypeError(f"expected uint16 frames[n, rows, cols], got {frames.ndim}-D {frames.dtype}")
    if frames.ndim == 2:
        frames = frames[None]
    shape = frames.shape[1:]
    flat = np.ascontiguousarray(frames).reshape(len(frames), -1)
    refs = []
    for name, ref in (("dark", dark), ("gain", gain)):
        if ref is not None:
            ref = np.ascontiguousarray(ref, dtype=np.float32)
            if ref.shape != shape:
                raise ValueError(f"{name} has shape {ref.shape}, frames have {shape}")
            ref = ref.ravel()
        refs.append(ref)
    dark, gain = refs

    # Every sample is an integer, so a count per value gives all the statistics exactly,
    # in memory independent of the sample size (production samples 1200 frames, 400 M values).
    lo, hi = _value_range(flat, dark, gain)
    counts = np.zeros(hi - lo + 1, np.int64)
    _value_counts(flat, dark, gain, lo, counts)
    values = np.arange(lo, hi + 1, dtype=np.float64)
    n = flat.size
    mean = float(np.dot(counts, np.arange(lo, hi + 1, dtype=np.int64))) / n
    variance = float(counts @ (values - mean) ** 2) / (n - 1)
    std_dev = math.sqrt(variance)
    x_ray_threshold = mean + xray_n_sigma * std_dev

    # stempy's bounds, quirk included (see the notes at the top), computed without overflow.
    max_bin = math.trunc(min(float(hi), mean + x_ray_threshold * std_dev))
    min_bin = math.trunc(max(float(lo), mean - x_ray_threshold * std_dev))
    number_of_bins = max_bin - min_bin
    if number_of_bins <= 0:
        raise ValueError("sample values span no histogram bin: all pixels equal?")
    histogram = counts[min_bin - lo : max_bin - lo].astype(np.float64)
    bins = np.arange(min_bin, max_bin, dtype=np.float64)

    # stempy starts at (highest count, mean, std_dev) and its MINPACK-style solver then reaches the
    # background peak; this simpler solver can wander off from there to a wide Gaussian on the
    # electron tail when x-rays inflate std_dev, so it starts at the peak itself: same minimum.
    _, mu, sigma = (float(p) for p in fit_gaussian(bins, histogram, peak_start(bins, histogram)))
    return Thresholds(
        background_threshold=mu + background_n_sigma * abs(sigma),
        x_ray_threshold=x_ray_threshold,
        number_of_samples=len(frames),
        min_sample=float(lo),
        max_sample=float(hi),
        mean=mean,
        variance=variance,
        std_dev=std_dev,
        number_of_bins=number_of_bins,
        x_ray_threshold_n_sigma=float(xray_n_sigma),
        background_threshold_n_sigma=float(background_n_sigma),
        optimized_mean=mu,
        optimized_std_dev=abs(sigma),
    )
