"""The numba counter and threshold calculation give what stempy 3.6 gives on the same frames."""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from zpipe_4dcamera.counting import count_frame, count_frames, count_frames_serial, gain_multiplier
from zpipe_4dcamera.thresholds import calculate_thresholds, fit_gaussian

stempy_image = pytest.importorskip("stempy.image", reason="stempy is the reference (the test extra)")
stempy_io = pytest.importorskip("stempy.io")
from stempy import _image as stempy_native  # noqa: E402

SHAPE = (576, 576)


def realistic_frames(n, seed, dark=None, shape=SHAPE, electrons=300, xrays=1.0):
    """4D Camera-like frames: background 20.5 +- 2.4 ADU, charge clouds a few pixels wide peaking
    60-250 ADU (some on edges and corners, some with a flat two-pixel top), rare x-ray pixels."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    dy, dx = np.mgrid[-2:3, -2:3]
    frames = np.empty((n, rows, cols), np.uint16)
    for i in range(n):
        img = rng.normal(20.5, 2.4, shape) + (0 if dark is None else dark)
        k = rng.poisson(electrons)
        cy, cx = rng.uniform(-0.5, rows - 0.5, k), rng.uniform(-0.5, cols - 0.5, k)
        border = rng.integers(0, 4, 8)  # a few clouds centred exactly on each edge
        cy[:8] = np.where(border == 0, 0, np.where(border == 1, rows - 1, cy[:8]))
        cx[:8] = np.where(border == 2, 0, np.where(border == 3, cols - 1, cx[:8]))
        cy[8:10], cx[8:10] = (0, rows - 1), (cols - 1, 0)  # and two on corners
        peak, width = rng.uniform(60, 250, k), rng.uniform(0.6, 1.1, k)
        iy = np.rint(cy).astype(int)[:, None, None] + dy
        ix = np.rint(cx).astype(int)[:, None, None] + dx
        cloud = peak[:, None, None] * np.exp(
            -((iy - cy[:, None, None]) ** 2 + (ix - cx[:, None, None]) ** 2) / (2 * width[:, None, None] ** 2))
        inside = (iy >= 0) & (iy < rows) & (ix >= 0) & (ix < cols)
        np.add.at(img, (iy[inside], ix[inside]), cloud[inside])
        m = rng.poisson(xrays)
        img[rng.integers(0, rows, m), rng.integers(0, cols, m)] = rng.uniform(1500, 8000, m)
        frame = np.clip(np.rint(img), 0, 65535).astype(np.uint16)
        # Plateaus: copy some cloud tops onto a neighbour, a tie that must give no event.
        py = np.clip(np.rint(cy[10:30]).astype(int), 0, rows - 2)
        px = np.clip(np.rint(cx[10:30]).astype(int), 0, cols - 1)
        frame[py + 1, px] = frame[py, px]
        frames[i] = frame
    return frames


def stempy_events(frame, background, xray, dark=None, gain=None):
    """stempy's per-frame counter. `gain` as stempy's API takes it (it divides by it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stempy_image.electron_count_frame(frame, darkreference=dark, background_threshold=background,
                                                   xray_threshold=xray, gain=gain)
    return np.asarray(result.data[0, 0], dtype=np.uint32)


def ours(frame, background, xray, dark=None, gain=None):
    return count_frame(frame, background, xray, dark, None if gain is None else gain_multiplier(gain))


def split(events, offsets):
    return [events[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def stempy_blocks(frames):
    reader = stempy_io.PyReader(frames, np.arange(len(frames), dtype=np.uint32), (len(frames), 1), 32, len(frames))
    return [block._block for block in reader]


# ---------------------------------------------------------------- counting rules, by hand

def test_rules_on_a_handmade_frame():
    f = np.zeros((6, 8), np.uint16)
    f[0, 0] = 50                 # corner: only 3 neighbours exist
    f[0, 4] = 45                 # top edge: 5 neighbours
    f[5, 6] = f[5, 7] = 60       # tie on the bottom edge: no event
    f[2, 2] = f[2, 3] = 40       # plateau inside the frame: no event
    f[3, 1] = 100                # next to the plateau, and above it: an event
    f[3, 6] = 50
    f[3, 7] = 5000               # x-ray: zeroed first, so its neighbour still counts
    f[1, 7] = 10                 # equal to the background threshold: zeroed
    f[4, 4] = 1000               # equal to the x-ray threshold: zeroed
    expected = [0, 4, 3 * 8 + 1, 3 * 8 + 6]
    assert ours(f, 10, 1000).tolist() == expected
    assert stempy_events(f, 10, 1000).tolist() == expected


def test_tiny_frames():
    for frame in (np.array([[0]], np.uint16), np.array([[7]], np.uint16),
                  np.array([[0, 50, 0, 60]], np.uint16), np.array([[0], [50], [0], [60]], np.uint16)):
        assert np.array_equal(ours(frame, 1, 1000), stempy_events(frame, 1, 1000))


def test_dark_is_truncated_and_subtracted_in_uint16():
    frame = np.full((5, 5), 10, np.uint16)
    frame[2, 2] = 30
    dark = np.full((5, 5), 20.7, np.float32)  # 30 - 20.7 counts as 10, not 9.3
    assert ours(frame, 9.99, 1000, dark).tolist() == stempy_events(frame, 9.99, 1000, dark).tolist() == [12]
    assert ours(frame, 10, 1000, dark).tolist() == stempy_events(frame, 10, 1000, dark).tolist() == []
    # 10 - 20 wraps to 65526: an ordinary x-ray cut removes it (above), a huge one keeps it, and
    # then the centre pixel is no longer a maximum.
    assert ours(frame, 5, 1e6, dark).tolist() == stempy_events(frame, 5, 1e6, dark).tolist() == []


def test_gain_arithmetic_is_float():
    frame = np.zeros((5, 5), np.uint16)
    frame[2, 2] = 30
    dark = np.full((5, 5), 20.7, np.float32)
    gain = np.ones((5, 5), np.float32)  # with a gain, the dark is no longer truncated
    for background in (9.2, 9.4):
        assert np.array_equal(ours(frame, background, 1000, dark, gain),
                              stempy_events(frame, background, 1000, dark, gain))
    assert ours(frame, 9.2, 1000, dark, gain).tolist() == [12]


# ---------------------------------------------------------------- realistic frames

@pytest.fixture(scope="module")
def fixed_pattern():
    return np.random.default_rng(7).uniform(0, 8, SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def frames(fixed_pattern):
    return realistic_frames(6, seed=1, dark=fixed_pattern)


def test_frames_have_edge_and_corner_events_ties_and_x_rays(frames, fixed_pattern):
    events = [count_frame(f, 31.42, 1477.7, fixed_pattern) for f in frames]
    rows, cols = np.concatenate(events) // SHAPE[1], np.concatenate(events) % SHAPE[1]
    on_row_edge, on_col_edge = np.isin(rows, (0, SHAPE[0] - 1)), np.isin(cols, (0, SHAPE[1] - 1))
    assert (on_row_edge | on_col_edge).sum() > 30 and (on_row_edge & on_col_edge).sum() >= 6
    assert (frames > 1500).sum() >= 3
    above = frames > 60
    assert (above[:, 1:] & above[:, :-1] & (frames[:, 1:] == frames[:, :-1])).sum() > 100  # plateaus, vertical


CASES = ["plain", "dark", "dark_underflow", "gain", "dark_and_gain"]


@pytest.mark.parametrize("case", CASES)
def test_realistic_frames_match_stempy(case, frames, fixed_pattern):
    # dark_underflow: a dark at the background level, so half the pixels fall below it
    dark = {"dark": fixed_pattern, "dark_and_gain": fixed_pattern,
            "dark_underflow": fixed_pattern + np.float32(20.5)}.get(case)
    gain = np.random.default_rng(3).uniform(0.9, 1.1, SHAPE).astype(np.float32) if "gain" in case else None
    background, xray = (11.3, 1400.0) if case == "dark_underflow" else (31.42, 1477.7)
    expected = [stempy_events(f, background, xray, dark, gain) for f in frames]
    assert all(len(e) > 250 for e in expected)
    assert all(np.array_equal(ours(f, background, xray, dark, gain), e) for f, e in zip(frames, expected))
    mult = None if gain is None else gain_multiplier(gain)
    for batch in (count_frames, count_frames_serial):
        got = split(*batch(frames, background, xray, dark, mult))
        assert all(np.array_equal(g, e) for g, e in zip(got, expected)), batch.__name__


def test_random_small_frames_match_stempy():
    """Hypothesis-style: many seeded random frames, small value ranges so ties are common."""
    rng = np.random.default_rng(2024)
    for case in range(1500):
        rows, cols = rng.integers(1, 10, 2)
        frame = rng.integers(0, rng.choice([3, 12, 70_000]), (rows, cols)).astype(np.uint16)
        background = rng.choice([rng.uniform(-3, 6), float(rng.integers(-2, 6)), math.nan, -math.inf])
        xray = rng.choice([rng.uniform(2, 10), float(rng.integers(2, 10)), 70_000.0, math.inf, math.nan])
        dark = rng.uniform(-2, 6, (rows, cols)).astype(np.float32) if rng.random() < 0.6 else None
        gain = rng.uniform(0.3, 3, (rows, cols)).astype(np.float32) if rng.random() < 0.5 else None
        expected = stempy_events(frame, background, xray, dark, gain)
        got = ours(frame, background, xray, dark, gain)
        assert np.array_equal(got, expected), (case, frame, background, xray, dark, gain)


def test_thresholds_within_a_float32_step_of_the_value():
    """The float path cuts in float32; stempy cuts in float64. Probe values right at the cut."""
    rng = np.random.default_rng(11)
    frame = np.zeros((3, 3), np.uint16)
    for _ in range(300):
        frame[1, 1] = rng.integers(30, 300)
        gain = rng.uniform(0.5, 2, (3, 3)).astype(np.float32)
        value = float(np.float32(frame[1, 1]) * gain_multiplier(gain)[1, 1])
        ulp = float(np.spacing(np.float32(value)))
        for delta in (0.0, 1e-9, -1e-9, ulp / 2, -ulp / 2, ulp, -ulp):
            for background, xray in ((value + delta, 1e4), (1.0, value + delta)):
                assert np.array_equal(ours(frame, background, xray, gain=gain),
                                      stempy_events(frame, background, xray, gain=gain)), (value, delta)


def test_random_full_frames_match_stempy():
    rng = np.random.default_rng(99)
    frames = realistic_frames(4, seed=5, electrons=1500, xrays=5)
    for frame in frames:
        background, xray = rng.uniform(22, 40), rng.uniform(150, 3000)
        dark = rng.uniform(0, 25, SHAPE).astype(np.float32) if rng.random() < 0.7 else None
        gain = rng.uniform(0.8, 1.25, SHAPE).astype(np.float32) if rng.random() < 0.5 else None
        assert np.array_equal(ours(frame, background, xray, dark, gain),
                              stempy_events(frame, background, xray, dark, gain))


def test_batches_grow_past_their_first_guess():
    """A frame of nothing but events (every other pixel a maximum) holds the most a frame can."""
    frame = np.full(SHAPE, 50, np.uint16)
    frame[::2, ::2] = 100
    frames = np.stack([frame, frame[::-1, ::-1].copy(), np.zeros(SHAPE, np.uint16)])
    expected = [stempy_events(f, 10, 1000) for f in frames]
    assert len(expected[0]) == 288 * 288
    for batch in (count_frames, count_frames_serial):
        events, offsets = batch(frames, 10, 1000)
        assert offsets.tolist() == [0, 288 * 288, 2 * 288 * 288, 2 * 288 * 288]
        assert all(np.array_equal(g, e) for g, e in zip(split(events, offsets), expected))


def test_non_contiguous_frames(frames):
    flipped = frames[:, :, ::-1]
    expected = split(*count_frames(np.ascontiguousarray(flipped), 31.42, 1477.7))
    assert all(np.array_equal(g, e) for g, e in zip(split(*count_frames(flipped, 31.42, 1477.7)), expected))
    assert np.array_equal(count_frame(np.asfortranarray(flipped[0]), 31.42, 1477.7), expected[0])


def test_serial_variant_runs_in_parallel_threads(frames, fixed_pattern):
    events, offsets = count_frames(frames, 31.42, 1477.7, fixed_pattern)
    with ThreadPoolExecutor(3) as pool:
        chunks = [frames[:2], frames[2:4], frames[4:]]
        parts = list(pool.map(lambda f: count_frames_serial(f, 31.42, 1477.7, fixed_pattern), chunks))
    assert np.array_equal(np.concatenate([p[0] for p in parts]), events)


def test_rejects_wrong_inputs():
    with pytest.raises(TypeError):
        count_frame(np.zeros((4, 4), np.int32), 1, 10)
    with pytest.raises(TypeError):
        count_frames(np.zeros((4, 4), np.uint16), 1, 10)
    with pytest.raises(ValueError):
        count_frame(np.zeros((4, 4), np.uint16), 1, 10, dark=np.zeros((4, 5)))


# ---------------------------------------------------------------- thresholds

STATS = ["x_ray_threshold", "min_sample", "max_sample", "mean", "variance", "std_dev", "number_of_bins",
         "optimized_mean", "optimized_std_dev", "background_threshold"]


def stempy_stat(result, name):
    return getattr(result, "xray_threshold" if name == "x_ray_threshold" else name)


@pytest.mark.parametrize("use_dark,use_gain", [(False, False), (True, False), (False, True), (True, True)])
def test_thresholds_match_stempy_on_one_frame(use_dark, use_gain, frames, fixed_pattern):
    """With a single frame stempy's random sampling has one choice, so everything must agree."""
    dark = fixed_pattern if use_dark else None
    gain = np.random.default_rng(4).uniform(0.9, 1.1, SHAPE).astype(np.float32) if use_gain else None
    args = [a for a in (dark,) if a is not None] + [1, 4.5, 175.0] + [a for a in (gain,) if a is not None]
    expected = stempy_native.calculate_thresholds(stempy_blocks(frames[:1]), *args)
    got = calculate_thresholds(frames[:1], dark, gain, background_n_sigma=4.5, xray_n_sigma=175)
    for name in ("min_sample", "max_sample", "number_of_bins", "mean"):
        assert getattr(got, name) == stempy_stat(expected, name), name
    for name in ("variance", "std_dev", "x_ray_threshold"):
        assert getattr(got, name) == pytest.approx(stempy_stat(expected, name), rel=1e-9), name
    # stempy's Levenberg-Marquardt stops at a relative tolerance of 1.5e-8; ours runs to convergence.
    for name in ("optimized_mean", "optimized_std_dev", "background_threshold"):
        assert getattr(got, name) == pytest.approx(stempy_stat(expected, name), rel=1e-5), name


def test_thresholds_match_stempy_on_random_frames():
    """Hypothesis-style: backgrounds of any level and width (clipped at 0 too), bare electrons,
    x-rays up to 60000 ADU that blow up std_dev and the histogram's length."""
    rng = np.random.default_rng(123)
    for case in range(30):
        shape = tuple(rng.integers(64, 300, 2))
        image = rng.normal(rng.uniform(5, 100), rng.uniform(0.8, 6), shape)
        electrons = rng.integers(0, image.size, rng.integers(0, image.size // 100 + 1))
        image.flat[electrons] += rng.uniform(60, 250, electrons.size)
        x_rays = rng.integers(0, image.size, rng.integers(0, 20))
        image.flat[x_rays] = rng.uniform(1500, 60000, x_rays.size)
        frame = np.clip(np.rint(image), 0, 65535).astype(np.uint16)[None]
        background_n_sigma, xray_n_sigma = rng.uniform(3, 6), rng.choice([10.0, 50.0, 175.0])
        expected = stempy_native.calculate_thresholds(stempy_blocks(frame), 1, background_n_sigma, xray_n_sigma)
        got = calculate_thresholds(frame, background_n_sigma=background_n_sigma, xray_n_sigma=xray_n_sigma)
        assert got.number_of_bins == expected.number_of_bins, case
        assert got.x_ray_threshold == pytest.approx(expected.xray_threshold, rel=1e-9), case
        # Where the peak is flat (clipped at 0), stempy's solver stops ~1e-4 short of the minimum.
        assert got.background_threshold == pytest.approx(expected.background_threshold, rel=1e-3), case


def test_thresholds_match_stempy_on_a_sample(frames):
    """stempy draws frames at random with replacement: the fit agrees, the raw statistics roughly."""
    expected = stempy_native.calculate_thresholds(stempy_blocks(frames), len(frames), 4.5, 175.0)
    got = calculate_thresholds(frames)
    assert got.background_threshold == pytest.approx(expected.background_threshold, rel=0.01)
    assert got.optimized_mean == pytest.approx(expected.optimized_mean, rel=0.01)
    assert got.optimized_std_dev == pytest.approx(expected.optimized_std_dev, rel=0.03)
    assert got.mean == pytest.approx(expected.mean, rel=0.02)
    assert got.number_of_samples == expected.number_of_samples == len(frames)


def test_thresholds_where_stempy_breaks(frames, fixed_pattern):
    """A dark at the background level wraps half the samples in stempy, which then gives up."""
    dark = fixed_pattern + np.float32(20.5)
    with pytest.raises(ValueError, match="max_size"):
        stempy_native.calculate_thresholds(stempy_blocks(frames[:1]), dark, 1, 4.5, 175.0)
    got = calculate_thresholds(frames[:1], dark)
    assert got.optimized_mean == pytest.approx(0.5, abs=0.5)  # + 0.5 from truncating the dark
    assert got.optimized_std_dev == pytest.approx(2.4, rel=0.1)
    assert got.background_threshold == pytest.approx(got.optimized_mean + 4.5 * got.optimized_std_dev)


def test_gaussian_fit_recovers_a_known_curve():
    x = np.arange(0, 300, dtype=np.float64)
    y = 1e6 * np.exp(-((x - 20.3) ** 2) / (2 * 2.45**2))
    y[50] += 3  # an electron or two in the tail
    amplitude, mu, sigma = fit_gaussian(x, y, (y.max(), 25.0, 40.0))
    assert (amplitude, mu, abs(sigma)) == pytest.approx((1e6, 20.3, 2.45), rel=1e-6)


# ---------------------------------------------------------------- stempy's file-based workflow

def write_sector_files(directory, frames, scan_width):
    """stempy's version-5 raw files: each record a 16-byte header and one 144 x 576 sector."""
    paths = []
    for sector in range(4):
        path = directory / f"data_scan0000000001_module{sector}_dst0_file0.data"
        with open(path, "wb") as out:
            for i, frame in enumerate(frames):
                out.write(np.array([1, i], "<u4").tobytes())
                position = [scan_width, len(frames) // scan_width, i % scan_width, i // scan_width]
                out.write(np.array(position, "<u2").tobytes())
                out.write(frame[144 * sector : 144 * (sector + 1)].astype("<u2").tobytes())
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("use_gain", [False, True])
def test_stempy_file_workflow_agrees(tmp_path, frames, fixed_pattern, use_gain):
    """stempy's production path (multi-pass sector reader) counts as ours does with its thresholds."""
    gain = np.random.default_rng(6).uniform(0.9, 1.1, SHAPE).astype(np.float32) if use_gain else None
    reader = stempy_io.reader(write_sector_files(tmp_path, frames, scan_width=3), version=5, backend="multi-pass")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counted = stempy_image.electron_count(reader, darkreference=fixed_pattern, number_of_samples=len(frames),
                                              background_threshold_n_sigma=4.5, xray_threshold_n_sigma=175, gain=gain)
    metadata = counted.metadata["electron_counting"]
    mine = calculate_thresholds(frames, fixed_pattern, None if gain is None else gain_multiplier(gain))
    assert set(mine.to_attrs()) == set(metadata)
    assert mine.background_threshold == pytest.approx(metadata["background_threshold"], rel=0.01)
    events, offsets = count_frames(frames, metadata["background_threshold"], metadata["x_ray_threshold"],
                                   fixed_pattern, None if gain is None else gain_multiplier(gain))
    for position, got in enumerate(split(events, offsets)):
        assert np.array_equal(got, np.sort(counted.data[position][0]))
