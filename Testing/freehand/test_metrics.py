"""Freehand metrics against hand-computed answers (FiMA Table 1 definitions, TUS-REC GPE/LPE/GLE/LLE)."""

import math

import numpy as np
import pytest

from ultrasound_ai.core import geometry
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand import metrics

SHAPE = (6, 9)  # H, W: tiny frames keep the brute-force checks cheap
SPACING = (0.3, 0.2)  # sx != sy so a swapped axis cannot pass


def translations(ts):
    T = np.tile(np.eye(4), (len(ts), 1, 1))
    T[:, :3, 3] = ts
    return T


def random_poses(rng, n, start=None):
    """A random rigid walk (rotations up to a few degrees per frame), optionally not starting at I."""
    rel = geometry.params_to_matrix(
        np.concatenate([rng.normal(0, 0.5, (n - 1, 3)), rng.normal(0, 2.0, (n - 1, 3))], axis=1), "xyz", True)
    first = np.eye(4) if start is None else start
    return geometry.chain_relative(rel, first)


def pixel_coords(shape, spacing):
    h, w = shape
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([c * spacing[0], r * spacing[1], np.zeros_like(r, dtype=float)], -1).reshape(-1, 3)


def brute_pixel_error(d_est, d_true, shape, spacing):
    x = pixel_coords(shape, spacing)
    errs = [np.linalg.norm(geometry.apply_transform(a, x) - geometry.apply_transform(b, x), axis=-1)
            for a, b in zip(d_est, d_true)]
    return float(np.mean(errs))


# ----------------------------------------------------------------------------------------------


def test_frame_points_are_centre_and_top_corners():
    T = translations([[1.0, 2.0, 3.0]])
    pts = metrics.frame_points(T, SHAPE, SPACING)
    h, w = SHAPE
    expected = np.array([[(w - 1) / 2 * 0.3, (h - 1) / 2 * 0.2, 0], [0, 0, 0], [(w - 1) * 0.3, 0, 0]]) + [1, 2, 3]
    assert pts.shape == (1, 3, 3)
    np.testing.assert_allclose(pts[0], expected, atol=1e-12)


def test_identical_sequences_give_zero_everywhere():
    rng = np.random.default_rng(0)
    true = random_poses(rng, 12, start=geometry.params_to_matrix([5, -3, 10, 20, 5, -7], "xyz", True))
    out = metrics.evaluate_sweep(true.copy(), true, SHAPE, SPACING, landmarks=[[3, 1.5, 2.0], [11, 0, 5]])
    assert set(out) == {"fdr_pct", "adr_pct", "md_mm", "sd_mm", "hd_mm", "mea_deg", "gpe_mm", "lpe_mm",
                        "gle_mm", "lle_mm"}
    for key, value in out.items():
        assert isinstance(value, float)
        assert value == pytest.approx(0.0, abs=1e-7), key


def test_constant_offset_known_answers():
    n, step = 8, 2.0
    true = translations([[0, 0, i * step] for i in range(n)])  # out-of-plane line, no rotation
    est = true.copy()
    est[1:, 0, 3] += 1.0  # every frame but the first 1 mm off in x
    out = metrics.evaluate_sweep(est, true, SHAPE, SPACING, landmarks=[[1, 2, 3], [4, 0, 0], [7, 8, 5]])
    D = np.arange(n) * step
    assert out["md_mm"] == pytest.approx(1.0)
    assert out["sd_mm"] == pytest.approx(n - 1)
    assert out["fdr_pct"] == pytest.approx(100.0 / D[-1])
    assert out["adr_pct"] == pytest.approx(np.mean(1.0 / D[1:]) * 100)
    assert out["hd_mm"] == pytest.approx(1.0)
    assert out["mea_deg"] == pytest.approx(0.0, abs=1e-12)
    assert out["gpe_mm"] == pytest.approx(1.0)
    # Locally only the step into frame 1 is wrong.
    assert out["lpe_mm"] == pytest.approx(1.0 / (n - 1))
    assert out["gle_mm"] == pytest.approx(1.0)
    assert out["lle_mm"] == pytest.approx(1.0 / 3)


def test_normalisation_to_first_frame():
    # A sequence that does not start at the identity, and an estimate given in its own frame
    # (tforms[0] = I), must compare equal.
    rng = np.random.default_rng(1)
    start = geometry.params_to_matrix([10, 20, 30, 40, -50, 60], "xyz", True)
    true = random_poses(rng, 10, start=start)
    est = geometry.normalize_to_first(true)
    assert metrics.gpe(est, true, SHAPE, SPACING) == pytest.approx(0, abs=1e-9)
    assert metrics.md(est, true, SHAPE, SPACING) == pytest.approx(0, abs=1e-9)
    # A rigid motion of the whole estimate is invisible after normalisation.
    moved = geometry.params_to_matrix([1, 2, 3, 4, 5, 6], "xyz", True) @ true
    assert metrics.hd(moved, true, SHAPE, SPACING) == pytest.approx(0, abs=1e-9)
    assert metrics.mea(moved, true) == pytest.approx(0, abs=1e-6)


def test_in_plane_rotation_of_every_estimated_frame():
    n, theta = 6, math.radians(3.0)
    true = translations([[0, 0, 1.5 * i] for i in range(n)])
    rot = np.eye(4)
    rot[:3, :3] = geometry.euler_to_matrix([0, 0, theta], "xyz")
    est = true.copy()
    est[1:] = est[1:] @ rot  # each frame turned in its own plane about pixel (0, 0)
    h, w = SHAPE
    centre = np.hypot((w - 1) / 2 * SPACING[0], (h - 1) / 2 * SPACING[1])
    right = (w - 1) * SPACING[0]
    chord = 2 * math.sin(theta / 2)
    # x and y axes are off by theta, z not at all.
    assert metrics.mea(est, true) == pytest.approx(2 * 3.0 / 3)
    # Top-left corner sits on the rotation axis: error 0; the others move along a chord.
    assert metrics.md(est, true, SHAPE, SPACING) == pytest.approx((centre + right) * chord / 3)
    assert metrics.sd(est, true, SHAPE, SPACING) == pytest.approx((centre + right) * chord * (n - 1) / 3)
    mean_radius = np.linalg.norm(pixel_coords(SHAPE, SPACING), axis=-1).mean()
    assert metrics.gpe(est, true, SHAPE, SPACING) == pytest.approx(chord * mean_radius)
    # Locally only the first step carries the rotation; later steps agree exactly.
    assert metrics.lpe(est, true, SHAPE, SPACING) == pytest.approx(chord * mean_radius / (n - 1))


def test_scaled_path_gives_ten_percent_drift():
    direction = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    n = 15
    dist = np.cumsum(np.r_[0, np.linspace(0.5, 1.5, n - 1)])  # uneven steps along a straight line
    true = translations(dist[:, None] * direction)
    est = translations(1.1 * dist[:, None] * direction)
    out = metrics.evaluate_sweep(est, true, SHAPE, SPACING)
    assert out["fdr_pct"] == pytest.approx(10.0)
    assert out["adr_pct"] == pytest.approx(10.0)
    assert out["md_mm"] == pytest.approx(0.1 * dist[-1])
    assert out["sd_mm"] == pytest.approx(0.1 * dist.sum())
    assert out["gpe_mm"] == pytest.approx(0.1 * dist[1:].mean())
    assert out["lpe_mm"] == pytest.approx(0.1 * np.diff(dist).mean())
    # Both trajectories lie on the same line; the estimate overshoots the true end by 0.1 D_N.
    assert out["hd_mm"] == pytest.approx(0.1 * dist[-1])
    assert out["mea_deg"] == pytest.approx(0.0, abs=1e-12)


def test_adr_leaves_out_frames_before_a_tenth_of_a_millimetre():
    n, step = 6, 0.04
    true = translations([[0, 0, i * step] for i in range(n)])
    est = true.copy()
    est[1:, 1, 3] += 0.01
    D = np.arange(n) * step
    keep = D >= 0.1  # frames 3, 4, 5 only
    assert metrics.adr(est, true, SHAPE, SPACING) == pytest.approx(np.mean(0.01 / D[keep]) * 100)


def test_adr_uses_each_points_own_path_length():
    # Rotation about the top-left corner: that corner never moves (its D stays 0, so its drift rates are
    # undefined) -> the functions must say so rather than divide by zero.
    n = 4
    true = np.stack([geometry.params_to_matrix([0, 0, 0, 0, 0, 5.0 * i], "xyz", True) for i in range(n)])
    with pytest.raises(InputError, match="ADR"):
        metrics.adr(true, true, SHAPE, SPACING)
    with pytest.raises(InputError, match="zero length"):
        metrics.fdr(true, true, SHAPE, SPACING)


@pytest.mark.parametrize("chunk", [1, 5, 9, 40, 1 << 20])
def test_gpe_lpe_chunked_equal_brute_force(chunk):
    rng = np.random.default_rng(2)
    true = random_poses(rng, 7)
    est = random_poses(rng, 7)
    nt, ne = geometry.normalize_to_first(true), geometry.normalize_to_first(est)
    want_g = brute_pixel_error(ne[1:], nt[1:], SHAPE, SPACING)
    lt = np.stack([np.linalg.inv(nt[i - 1]) @ nt[i] for i in range(1, 7)])
    le = np.stack([np.linalg.inv(ne[i - 1]) @ ne[i] for i in range(1, 7)])
    want_l = brute_pixel_error(le, lt, SHAPE, SPACING)
    assert metrics.gpe(est, true, SHAPE, SPACING, chunk=chunk) == pytest.approx(want_g, rel=1e-12)
    assert metrics.lpe(est, true, SHAPE, SPACING, chunk=chunk) == pytest.approx(want_l, rel=1e-12)
    assert want_g > 0.1 and want_l > 0.01


def test_landmark_errors_brute_force():
    rng = np.random.default_rng(3)
    true = random_poses(rng, 9)
    est = random_poses(rng, 9)
    lm = np.array([[0, 3.0, 2.0], [2, 1.5, 4.25], [8, 0.0, 5.0], [5, 8.0, 0.0]])
    nt, ne = geometry.normalize_to_first(true), geometry.normalize_to_first(est)
    g, loc = [], []
    for f, x, y in lm[1:]:  # the frame-0 landmark is left out
        f = int(f)
        p = np.array([x * SPACING[0], y * SPACING[1], 0.0])
        g.append(np.linalg.norm(geometry.apply_transform(ne[f], p) - geometry.apply_transform(nt[f], p)))
        a = np.linalg.inv(ne[f - 1]) @ ne[f]
        b = np.linalg.inv(nt[f - 1]) @ nt[f]
        loc.append(np.linalg.norm(geometry.apply_transform(a, p) - geometry.apply_transform(b, p)))
    assert metrics.gle(est, true, lm, SPACING) == pytest.approx(np.mean(g), rel=1e-12)
    assert metrics.lle(est, true, lm, SPACING) == pytest.approx(np.mean(loc), rel=1e-12)


def test_hausdorff_brute_force():
    rng = np.random.default_rng(4)
    true = random_poses(rng, 20)
    est = random_poses(rng, 20)
    pe = metrics.frame_points(geometry.normalize_to_first(est), SHAPE, SPACING)
    pt = metrics.frame_points(geometry.normalize_to_first(true), SHAPE, SPACING)
    vals = []
    for p in range(3):
        d = np.linalg.norm(pe[:, None, p] - pt[None, :, p], axis=-1)
        vals.append(max(d.min(axis=0).max(), d.min(axis=1).max()))
    assert metrics.hd(est, true, SHAPE, SPACING) == pytest.approx(np.mean(vals), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_input_error():
    good = translations([[0, 0, i] for i in range(4)])
    with pytest.raises(InputError, match=r"tforms_est.*\[N, 4, 4\]"):
        metrics.gpe(good[:, :3], good, SHAPE, SPACING)
    with pytest.raises(InputError, match="as many frames"):
        metrics.md(good[:3], good, SHAPE, SPACING)
    bad = good.copy()
    bad[2, 0, 3] = np.nan
    with pytest.raises(InputError, match="tforms_true.*NaN"):
        metrics.sd(good, bad, SHAPE, SPACING)
    with pytest.raises(InputError, match="at least 2 frames"):
        metrics.fdr(good[:1], good[:1], SHAPE, SPACING)
    with pytest.raises(InputError, match="pixel_spacing_xy"):
        metrics.gpe(good, good, SHAPE, (0.1, -1))
    with pytest.raises(InputError, match="frame_shape_hw"):
        metrics.evaluate_sweep(good, good, (5,), SPACING)
    with pytest.raises(InputError, match="chunk"):
        metrics.lpe(good, good, SHAPE, SPACING, chunk=0)
    with pytest.raises(InputError, match="landmarks"):
        metrics.gle(good, good, [[1, 2]], SPACING)
    with pytest.raises(InputError, match="frame indices"):
        metrics.lle(good, good, [[4, 1, 1]], SPACING)
    with pytest.raises(InputError, match="frame 0"):
        metrics.gle(good, good, [[0, 1, 1]], SPACING)
    with pytest.raises(InputError, match="landmarks.*NaN"):
        metrics.gle(good, good, [[1, np.nan, 1]], SPACING)
