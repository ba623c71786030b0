"""Regional-maximum detection, top-N, PALA's guards, weighted-average and radial-symmetry kernels."""

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.localization import detect_maxima, localize, radial_symmetry, to_mm, weighted_average

SIGMA = 3 / 2.3548  # fwhm 3 px


def _spots(shape, spots, sigma=(SIGMA, SIGMA)):
    """Frames [T, Z, X] holding Gaussian spots (frame, z, x, amplitude) at sub-pixel positions."""
    frames = np.zeros(shape, np.float32)
    zz, xx = np.mgrid[0:shape[1], 0:shape[2]]
    for t, z, x, a in spots:
        frames[int(t)] += a * np.exp(-((zz - z) ** 2) / (2 * sigma[0] ** 2) - ((xx - x) ** 2) / (2 * sigma[1] ** 2))
    return frames


def _random_spots(n_frames, per_frame, shape, seed):
    rng = np.random.default_rng(seed)
    spots = []
    for t in range(n_frames):
        placed = []
        while len(placed) < per_frame:
            z, x = rng.uniform(5, shape[0] - 6), rng.uniform(5, shape[1] - 6)
            if all(np.hypot(z - a, x - b) > 9 for a, b in placed):
                placed.append((z, x))
                spots.append((t, z, x, rng.uniform(0.5, 1.0)))
    return np.array(spots)


def _errors(locs, spots):
    errs = []
    for t, z, x, _ in spots:
        cand = locs[locs[:, 0] == t]
        errs.append(np.hypot(cand[:, 1] - z, cand[:, 2] - x).min())
    return np.array(errs)


def test_radial_symmetry_recovers_subpixel_gaussians():
    spots = _random_spots(20, 4, (48, 60), seed=0)
    frames = _spots((20, 48, 60), spots)
    locs = localize(frames, 10, "rs")
    assert len(locs) == len(spots)  # every spot found, nothing else
    assert _errors(locs, spots).max() < 0.05


def test_radial_symmetry_anisotropic_and_complex_input():
    spots = _random_spots(10, 3, (48, 60), seed=1)
    iq = _spots((10, 48, 60), spots, sigma=(1.0, 1.6)).astype(np.complex64) * np.exp(1j * 0.7)
    locs = localize(iq, 10, "rs", fwhm=(2.4, 3.8))
    assert len(locs) == len(spots)
    assert _errors(locs, spots).max() < 0.05


def test_weighted_average_is_biased_towards_the_centre_pixel_but_close():
    spots = _random_spots(10, 4, (48, 60), seed=2)
    locs = localize(_spots((10, 48, 60), spots), 10, "wa")
    err = _errors(locs, spots)
    assert err.max() < 0.3 and err.mean() > 0.01  # WA truncates the PSF tails: a known bias


def test_kernels_on_symmetric_window_give_zero_offset():
    win = _spots((1, 5, 5), [(0, 2, 2, 1.0)])
    for kernel in (radial_symmetry, weighted_average):
        dz, dx = kernel(win)
        assert abs(dz[0]) < 1e-9 and abs(dx[0]) < 1e-9


def test_top_n_keeps_the_brightest_per_frame():
    amps = [1.0, 0.9, 0.8, 0.7, 0.6]
    spots = [(0, 10, 8 + 10 * i, a) for i, a in enumerate(amps)] + [(1, 20, 8 + 10 * i, a) for i, a in enumerate(amps)]
    frames = _spots((2, 32, 60), spots)
    det = detect_maxima(frames, 3)
    assert det.frame.tolist() == [0, 0, 0, 1, 1, 1]
    assert det.ix.tolist() == [8, 18, 28, 8, 18, 28]  # decreasing brightness
    det = detect_maxima(frames, np.array([2, 4]))  # per-frame counts (the counting network's output)
    assert np.bincount(det.frame).tolist() == [2, 4]
    with pytest.raises(InputError, match="one count per frame"):
        detect_maxima(frames, np.array([1, 2, 3]))


def test_border_is_zeroed():
    # fwhm 3 -> int(3/2 + 1) = 2 border pixels: no maximum is taken there, windows stay inside the frame.
    frames = _spots((1, 30, 30), [(0, 0.0, 15, 1.0), (0, 15, 0.5, 1.0), (0, 15, 15, 0.5)])
    det = detect_maxima(frames, 10)
    assert det.iz.min() >= 2 and det.ix.min() >= 2 and det.iz.max() <= 27 and det.ix.max() <= 27
    assert (15, 15) in set(zip(det.iz.tolist(), det.ix.tolist()))
    assert (0, 15) not in set(zip(det.iz.tolist(), det.ix.tolist()))


def test_crowded_window_is_rejected():
    frames = np.zeros((1, 21, 21), np.float32)
    frames[0, 10, 10] = 1.0
    for dz, dx in [(-2, -2), (-2, 2), (2, -2), (2, 2)]:  # four more maxima inside the 5 x 5 window
        frames[0, 10 + dz, 10 + dx] = 0.3
    det = detect_maxima(frames, 1, max_maxima=3)
    assert len(det) == 0
    det = detect_maxima(frames, 1, max_maxima=5)
    assert len(det) == 1 and (det.iz[0], det.ix[0]) == (10, 10)
    frames[0, 12, 12] = 0.0  # now 4 maxima in the window: still more than 3
    assert len(detect_maxima(frames, 1, max_maxima=3)) == 0
    frames[0, 12, 8] = 0.0  # 3 maxima: kept
    assert len(detect_maxima(frames, 1, max_maxima=3)) == 1


def test_large_shift_is_rejected():
    frames = np.zeros((1, 21, 21), np.float32)
    frames[0, 10, 10] = 1.0
    frames[0, 8:13, 11:13] = 0.9  # mass to the right of the maximum: WA shift 1.35 px
    kept = localize(frames, 1, "wa", fwhm=(3, 3), max_maxima=None)
    assert len(kept) == 1 and 1.3 < kept[0, 2] - 10 < 1.4
    assert len(localize(frames, 1, "wa", fwhm=(2, 2), max_maxima=None)) == 0  # limit fwhm/2 = 1 px


def test_to_mm_uses_origin_at_pixel_centre():
    rows = np.array([[3, 2.0, 4.0, 1.5]])
    out = to_mm(rows, (0.1, 0.2), (5.0, -1.0), frame_offset=100)
    np.testing.assert_allclose(out, [[103, 5.2, -0.2, 1.5]])


def test_bad_inputs():
    with pytest.raises(InputError, match=r"\[T, Z, X\]"):
        localize(np.zeros((10, 10), np.float32), 2)
    with pytest.raises(InputError, match="method"):
        localize(np.zeros((1, 10, 10), np.float32), 2, method="gauss")
    with pytest.raises(InputError, match="dtype"):
        localize(np.zeros((1, 10, 10), dtype="U1"), 2)
    with pytest.raises(InputError, match="window"):
        localize(np.zeros((1, 10, 10), np.float32), 2, window=4)
