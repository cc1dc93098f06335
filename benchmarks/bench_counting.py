"""How much faster the numba electron counter is than stempy's, on one core and on two."""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from stempy import image as stempy_image

from zpipe_4dcamera.counting import count_frame, count_frames, count_frames_serial, gain_multiplier
from zpipe_4dcamera.thresholds import calculate_thresholds

N_FRAMES = 400
SHAPE = (576, 576)
ROUNDS = 3  # every figure is the best of these, taken in turn, so a busy neighbour hurts all alike
MIN_SECONDS = 0.4  # our counters repeat over the frames until a measurement lasts this long


def realistic_frames(n, seed=0):
    """Background 20.5 +- 2.4 ADU, ~300 charge clouds peaking 60-250 ADU, ~1 x-ray pixel a frame."""
    rng = np.random.default_rng(seed)
    rows, cols = SHAPE
    dy, dx = np.mgrid[-2:3, -2:3]
    frames = np.empty((n, rows, cols), np.uint16)
    for i in range(n):
        img = rng.normal(20.5, 2.4, SHAPE)
        k = rng.poisson(300)
        cy, cx = rng.uniform(-0.5, rows - 0.5, k), rng.uniform(-0.5, cols - 0.5, k)
        peak, width = rng.uniform(60, 250, k), rng.uniform(0.6, 1.1, k)
        iy = np.rint(cy).astype(int)[:, None, None] + dy
        ix = np.rint(cx).astype(int)[:, None, None] + dx
        cloud = peak[:, None, None] * np.exp(
            -((iy - cy[:, None, None]) ** 2 + (ix - cx[:, None, None]) ** 2) / (2 * width[:, None, None] ** 2))
        inside = (iy >= 0) & (iy < rows) & (ix >= 0) & (ix < cols)
        np.add.at(img, (iy[inside], ix[inside]), cloud[inside])
        m = rng.poisson(1.0)
        img[rng.integers(0, rows, m), rng.integers(0, cols, m)] = rng.uniform(1500, 8000, m)
        frames[i] = np.clip(np.rint(img), 0, 65535)
    return frames


@numba.njit(nogil=True, cache=True)
def _spin(n):
    s = 0.0
    for i in range(n):
        s += np.sqrt(i + s * 1e-9)
    return s


def rate(run, frames_per_call, min_seconds=MIN_SECONDS):
    """Frames per second of `run`, repeated until it has lasted `min_seconds`."""
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * frames_per_call / elapsed


def main():
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    frames = realistic_frames(N_FRAMES)
    rng = np.random.default_rng(1)
    dark = rng.uniform(0, 8, SHAPE).astype(np.float32)
    gain = rng.uniform(0.9, 1.1, SHAPE).astype(np.float32)  # stempy's convention: it divides by this
    thresholds = calculate_thresholds(frames[:40])
    background, xray = thresholds.background_threshold, thresholds.x_ray_threshold
    pool = ThreadPoolExecutor(2)
    halves = [frames[: N_FRAMES // 2], frames[N_FRAMES // 2 :]]

    configs = {"no dark, no gain": (None, None), "dark + gain": (dark, gain)}
    results = {}
    for label, (d, g) in configs.items():
        mult = None if g is None else gain_multiplier(g)

        def stempy_all():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return [np.asarray(stempy_image.electron_count_frame(
                    f, darkreference=d, background_threshold=background, xray_threshold=xray, gain=g).data[0, 0])
                    for f in frames]

        def prange_on(threads):
            def run():
                numba.set_num_threads(threads)
                count_frames(frames, background, xray, d, mult)
            return run

        variants = {
            "stempy electron_count_frame, 1 core": (stempy_all, 0.0),
            "ours count_frame loop, 1 core": (
                lambda: [count_frame(f, background, xray, d, mult) for f in frames], MIN_SECONDS),
            "ours count_frames_serial, 1 core": (
                lambda: count_frames_serial(frames, background, xray, d, mult), MIN_SECONDS),
            "ours count_frames (prange), 1 thread": (prange_on(1), MIN_SECONDS),
            "ours count_frames (prange), 2 threads": (prange_on(2), MIN_SECONDS),
            "ours count_frames_serial, 2 Python threads": (
                lambda: list(pool.map(lambda h: count_frames_serial(h, background, xray, d, mult), halves)),
                MIN_SECONDS),
        }
        # Warm-up: compiles (or loads from numba's cache) every kernel; not timed.
        expected = stempy_all()
        for run, _ in list(variants.values())[1:]:
            run()
        events, offsets = count_frames(frames, background, xray, d, mult)
        same = all(np.array_equal(events[offsets[i] : offsets[i + 1]], e) for i, e in enumerate(expected))
        best = dict.fromkeys(variants, 0.0)
        for _ in range(ROUNDS):
            for name, (run, seconds) in variants.items():
                best[name] = max(best[name], rate(run, N_FRAMES, seconds))
        results[label] = (best, same, len(events) / N_FRAMES)

    print(f"{os.cpu_count()} CPUs, load average {load_before:.2f} before the run; "
          f"numba threading layer {numba.threading_layer()}")
    print(f"{N_FRAMES} frames {SHAPE[0]}x{SHAPE[1]} uint16; background {background:.2f}, x-ray {xray:.1f} ADU "
          f"(from 40 frames); JIT compile time excluded (every kernel warmed up first); best of {ROUNDS} rounds.")
    frame_mb = SHAPE[0] * SHAPE[1] * 2 / 1e6
    for label, (best, same, per_frame) in results.items():
        base = best["stempy electron_count_frame, 1 core"]
        print(f"\n{label}: {per_frame:.0f} events/frame, events identical to stempy: {same}")
        print(f"  {'':46s} {'frames/s':>9s} {'MB/s':>7s} {'x stempy':>8s}")
        for name, fps in best.items():
            print(f"  {name:46s} {fps:9.0f} {fps * frame_mb:7.0f} {fps / base:8.1f}")
        prange = best["ours count_frames (prange), 2 threads"] / best["ours count_frames (prange), 1 thread"]
        threads = best["ours count_frames_serial, 2 Python threads"] / best["ours count_frames_serial, 1 core"]
        print(f"  scaling 1 -> 2 cores: prange {prange:.2f}x, 2 Python threads {threads:.2f}x")

    # The machine's own ceiling, measured the same way: a pure compute loop on 1 then 2 threads.
    _spin(10)
    work = 20_000_000
    single = max(rate(lambda: _spin(work), 1) for _ in range(ROUNDS))
    double = max(rate(lambda: list(pool.map(_spin, [work, work])), 2) for _ in range(ROUNDS))
    print(f"\nceiling: a pure compute loop scales {double / single:.2f}x from 1 to 2 threads on this machine now")
    print(f"(load average {os.getloadavg()[0]:.2f}); total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
