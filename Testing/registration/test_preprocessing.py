import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import params_to_matrix
from ultrasound_ai.io.volume import Volume
from ultrasound_ai.registration.preprocessing import check_overlap, prepare_input, roi_grid


def _box_volumes():
    """A fixed label box with a linear-ramp MRI, and a moving volume whose value is its L coordinate."""
    sp = np.array([0.8, 0.6, 2.0])
    lab = np.zeros((20, 60, 50), np.uint8)
    lab[5:15, 10:50, 10:40] = 1  # i 10..39, j 10..49, k 5..14
    fixed = Volume(np.random.default_rng(0).random(lab.shape).astype(np.float32), sp, (-20.0, -18.0, -20.0), np.eye(3))
    label = fixed.with_array(lab)
    msp = np.array([0.5, 0.5, 0.5])
    n = (120, 120, 120)
    x = (np.arange(n[2]) * msp[0] - 30.0)[None, None, :] * np.ones(n)
    moving = Volume(x.astype(np.float32), msp, (-30.0, -30.0, -30.0), np.eye(3))
    return fixed, label, moving


def test_roi_is_bbox_plus_30_percent():
    fixed, label, _ = _box_volumes()
    roi = roi_grid(label, (32, 96, 96), 0.30)
    assert roi.array.shape == (32, 96, 96)
    lo_idx = np.array([10, 10, 5.0])
    ext = np.array([29, 39, 9.0])
    lo = label.index_to_physical(lo_idx - 0.3 * ext)
    hi = label.index_to_physical(lo_idx + 1.3 * ext)
    assert np.allclose(roi.origin_lps, lo)
    assert np.allclose(roi.index_to_physical([95, 95, 31]), hi)


def test_channels_and_transform_direction():
    fixed, label, moving = _box_volumes()
    shift = params_to_matrix([5.0, 0, 0, 0, 0, 0])  # fixed p -> moving p + 5 mm in L
    a = prepare_input((fixed, label, moving), np.eye(4), mode="label")
    b = prepare_input((fixed, label, moving), shift, mode="label")
    assert a.array.shape == (2, 32, 96, 96) and a.array.dtype == np.float32
    assert a.array.min() >= 0 and a.array.max() <= 1 + 1e-6
    # Channel 0: the label; the box's centre is inside, ROI corners outside.
    assert a.array[0, 16, 48, 48] == pytest.approx(1.0) and a.array[0, 0, 0, 0] == 0
    assert np.allclose(a.centroid_lps, label.index_to_physical([24.5, 29.5, 9.5]))
    # Channel 1: moving holds its L coordinate, a ramp along the ROI's i axis, min-max scaled to 0..1; a
    # pure L shift of T changes the raw values but not the scaled ramp (test_transform_direction_with_structure
    # checks the direction of T).
    assert np.allclose(a.array[1, 0, 0, :], np.linspace(0, 1, 96), atol=1e-4)
    assert np.allclose(b.array[1], a.array[1], atol=1e-4)
    img = prepare_input((fixed, label, moving), shift, mode="image")
    assert not np.allclose(img.array[0], a.array[0])


def test_transform_direction_with_structure():
    fixed, label, moving = _box_volumes()
    # A moving volume holding a bright slab at L in [4, 6] mm: with T = +5 mm in L, the slab appears at
    # fixed L in [-1, 1] mm (ITK: moving is sampled at T(p)).
    arr = np.zeros(moving.array.shape, np.float32)
    x = np.arange(arr.shape[2]) * 0.5 - 30.0
    arr[:, :, (x >= 4) & (x <= 6)] = 1
    slab = moving.with_array(arr)
    out = prepare_input((fixed, label, slab), params_to_matrix([5.0, 0, 0, 0, 0, 0]))
    roi = out.roi
    cols = np.flatnonzero(out.array[1, 16, 48] > 0.5)
    xs = roi.index_to_physical(np.stack([cols, np.full_like(cols, 48), np.full_like(cols, 16)], 1).astype(float))[:, 0]
    assert xs.min() > -1.6 and xs.max() < 1.6 and len(cols) > 0


def test_bad_inputs():
    fixed, label, moving = _box_volumes()
    with pytest.raises(InputError, match="empty"):
        prepare_input((fixed, label.with_array(np.zeros_like(label.array)), moving), np.eye(4))
    with pytest.raises(InputError, match="do not overlap"):
        prepare_input((fixed, label, moving), params_to_matrix([300.0, 0, 0, 0, 0, 0]))
    with pytest.raises(InputError, match="do not overlap"):
        check_overlap(label, moving, params_to_matrix([0, 0, -200.0, 0, 0, 0]))
    flat = Volume(np.zeros((1, 50, 50), np.float32), (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(InputError, match="2D"):
        prepare_input((fixed, label, flat), np.eye(4))
    other = Volume(label.array, (1.0, 1.0, 1.0), label.origin_lps, np.eye(3))
    with pytest.raises(InputError, match="same grid"):
        prepare_input((fixed, other, moving), np.eye(4))
    with pytest.raises(InputError, match="mode"):
        prepare_input((fixed, label, moving), np.eye(4), mode="both")


def test_simulated_case_under_truth(small_case):
    # Under the truth, the TRUS gland (moving label) lands on the MR gland in the ROI.
    c = small_case
    import dataclasses

    with_label_as_moving = dataclasses.replace(c, moving=c.moving_label.with_array(c.moving_label.array * 200))
    good = prepare_input(with_label_as_moving, c.truth_fixed_to_moving)
    bad = prepare_input(with_label_as_moving, params_to_matrix([8.0, 0, 0, 0, 0, 0]) @ c.truth_fixed_to_moving)

    def dice(arr):
        a, b = arr[0] > 0.5, arr[1] > 0.5
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(good.array) > 0.85 and dice(bad.array) < dice(good.array) - 0.1
