"""Direction of out-of-plane travel from the frames put in order by their speckle (spectral ordering)."""

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.frame_ordering import frame_similarity, spectral_order, travel_signs

SPACING = (0.15, 0.15)


def _sweep_through(z_mm, x_drift_mm=0.02, seed=4, shape=(72, 80)):
    """uint8 frames of the training simulator's phantom at out-of-plane positions z_mm (one per frame) with a
    slow in-plane drift; image noise drawn afresh per frame, so a frame taken again at the same place on the way
    back is alike, not equal."""
    from ultrasound_ai.freehand.simulation.phantom import Psf, to_uint8
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep

    start, phantom = simulate_sweep(seed, n_frames=2, frame_shape=shape, pixel_spacing=SPACING[0], n_imus=0,
                                    return_phantom=True)
    rng = np.random.default_rng(seed)
    frames = []
    for k, z in enumerate(np.asarray(z_mm, dtype=np.float64)):
        move = np.eye(4)
        move[:3, 3] = [x_drift_mm * k, 0.0, z]
        img = phantom.render_plane(start.tforms[0] @ move, shape, SPACING, Psf())
        frames.append(to_uint8(img + rng.normal(0.0, 0.01, img.shape)))
    return np.stack(frames)


def _agreement(signs, z):
    """Share of moving pairs whose direction is right, up to one sign per sweep."""
    true = np.sign(np.diff(z))
    moving = np.abs(np.diff(z)) > 0.05
    right = float(np.mean(signs[moving] == true[moving]))
    return max(right, 1.0 - right)


@pytest.mark.parametrize("kind", ["there and back", "zigzag"])
def test_reversals_are_read_from_the_frames(kind):
    if kind == "there and back":  # out at 0.25 mm/frame, slowing, back at 0.3 mm/frame
        z = np.concatenate([np.arange(30) * 0.25, 7.25 + np.cumsum(np.linspace(0.2, 0.05, 6)),
                            7.9 - np.arange(1, 26) * 0.3])
    else:  # three legs of different speeds and lengths
        z = np.concatenate([np.arange(25) * 0.3, 7.2 - np.arange(1, 20) * 0.2, 3.4 + np.arange(1, 25) * 0.25])
    signs = travel_signs(_sweep_through(z), SPACING, np.abs(np.diff(z)), 0.05)
    assert _agreement(signs, z) >= 0.9
    assert _agreement(signs, z) >= _agreement(np.ones(len(z) - 1), z) + 0.2  # one direction throughout is far off


def test_steady_travel_with_a_speed_change_and_a_pause_is_read_as_one_direction():
    rng = np.random.default_rng(2)
    z = np.concatenate([np.arange(20) * 0.3, 5.9 + rng.normal(0, 0.005, 10), 6.0 + np.arange(1, 30) * 0.15])
    signs = travel_signs(_sweep_through(z), SPACING, np.abs(np.diff(z)), 0.05)
    assert np.mean(signs[np.abs(np.diff(z)) > 0.05] > 0) >= 0.95


def test_similarity_is_symmetric_limited_in_lag_and_blank_frames_are_like_nothing():
    z = np.arange(24) * 0.25
    frames = _sweep_through(z)
    frames[10:13] = 0  # the probe lifted off for three frames
    r = frame_similarity(frames, SPACING, frame_interval_s=0.05, max_lag_s=0.5)
    assert r.shape == (24, 24) and np.allclose(np.diag(r), 1.0)
    assert np.array_equal(np.isnan(r), np.isnan(r.T)) and np.allclose(np.nan_to_num(r), np.nan_to_num(r.T))
    assert np.isnan(r[0, 11]) and np.isfinite(r[0, 10])  # 10 frames = 0.5 s apart: compared; 11: not
    assert np.allclose(r[10, 11], 0.0) and r[2, 3] > r[2, 8] > 0  # neighbours more alike than frames 1.5 mm apart
    signs = travel_signs(frames, SPACING, None, 0.05)
    assert signs.shape == (23,) and set(np.unique(signs)) <= {-1.0, 1.0}


def test_the_sweep_sign_follows_the_larger_share_of_distance():
    z = np.concatenate([np.arange(30) * 0.25, 7.25 - np.arange(1, 12) * 0.25])  # mostly out, a little back
    signs = travel_signs(_sweep_through(z), SPACING, np.abs(np.diff(z)), 0.05)
    assert np.mean(signs[:29] > 0) >= 0.9 and np.mean(signs[30:] < 0) >= 0.8


def test_a_long_sweep_is_ordered_in_overlapping_windows_with_the_same_answer():
    """More frames than max_frames: windows overlapping by a quarter, each window's sign set on the overlap; on a
    there-and-back-and-there sweep the windowed signs agree with the one-shot ones and with the truth."""
    z = np.concatenate([np.arange(25) * 0.3, 7.2 - np.arange(1, 25) * 0.25, 1.2 + np.arange(1, 20) * 0.3])
    frames = _sweep_through(z)
    whole = travel_signs(frames, SPACING, np.abs(np.diff(z)), 0.05)
    windowed = travel_signs(frames, SPACING, np.abs(np.diff(z)), 0.05, max_frames=24)
    assert windowed.shape == whole.shape == (len(z) - 1,)
    assert _agreement(windowed, z) >= 0.9 and np.mean(windowed == whole) >= 0.9


def test_bad_input_names_what_was_expected():
    with pytest.raises(InputError, match=r"frames \[N >= 2, H, W\]"):
        frame_similarity(np.zeros((1, 8, 8)), SPACING)
    with pytest.raises(InputError, match="square similarity"):
        spectral_order(np.zeros((3, 4)))
    with pytest.raises(InputError, match="pair distances"):
        travel_signs(np.zeros((5, 16, 16)), SPACING, np.ones(7))
    with pytest.raises(InputError, match="max_frames"):
        travel_signs(np.zeros((5, 16, 16)), SPACING, max_frames=3)


def test_moglo_direction_ordering_mirrors_the_pairs_the_order_says_went_back():
    """direction="ordering": every pair forward (as "forward"), then mirrored through the image plane where the
    frames' order says the probe went back; sign linking does not apply."""
    import torch

    from ultrasound_ai.freehand.moglo.method import estimate_sweep
    from ultrasound_ai.freehand.moglo.model import MogloNet, make_config
    from ultrasound_ai.validation.pose_agreement import centre_out_of_plane_mm

    z = np.concatenate([np.arange(20) * 0.3, 5.7 - np.arange(1, 16) * 0.3])
    frames = _sweep_through(z)
    torch.manual_seed(0)
    model = MogloNet(make_config("tiny", base_width=4)).eval()
    fwd, _ = estimate_sweep(model, {}, frames, SPACING, direction="forward")
    ordered, facts = estimate_sweep(model, {"inference": {"sign_linking": True}}, frames, SPACING,
                                    direction="ordering", frame_interval_s=0.05)
    assert facts["direction"] == "ordering" and facts["sign_linking"] is False
    zf = centre_out_of_plane_mm(fwd, frames.shape[1:], SPACING)
    zo = centre_out_of_plane_mm(ordered, frames.shape[1:], SPACING)
    assert (zf >= 0).all() and np.abs(zf).max() > 0
    np.testing.assert_allclose(np.abs(zo), np.abs(zf), atol=1e-9)
    assert _agreement(np.where(zo < 0, -1.0, 1.0), z) >= 0.9


def test_decorrelation_travel_ordering_turns_back_where_the_probe_did():
    """Images-only decorrelation takes the probe as moving forward unless travel="ordering": then the pairs the
    frames' order says went back are mirrored through the image plane."""
    from ultrasound_ai.freehand.methods import get_method
    from ultrasound_ai.io.sweep import Sweep
    from ultrasound_ai.validation.pose_agreement import centre_out_of_plane_mm

    z = np.concatenate([np.arange(20) * 0.3, 5.7 - np.arange(1, 16) * 0.3])
    frames = _sweep_through(z)
    sweep = Sweep(frames=frames, pixel_spacing_xy=SPACING, frame_rate_hz=20.0)
    forward = get_method("decorrelation").estimate(sweep)
    ordered = get_method("decorrelation").estimate(sweep, travel="ordering")
    assert ordered.attrs["travel"] == "ordering" and "travel" not in forward.attrs
    zf = centre_out_of_plane_mm(forward.tforms, frames.shape[1:], SPACING)
    zo = centre_out_of_plane_mm(ordered.tforms, frames.shape[1:], SPACING)
    assert (zf >= 0).all()
    np.testing.assert_allclose(np.abs(zo), np.abs(zf), atol=1e-9)
    assert _agreement(np.where(zo < 0, -1.0, 1.0), z) >= 0.9
    assert abs(np.sum(zo) - (z[-1] - z[0])) < 0.5 * abs(np.sum(zf) - (z[-1] - z[0]))  # ends nearer where it did
