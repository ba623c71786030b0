"""Reversals of the direction of travel found from the images alone (mirror correlation)."""

import numpy as np
import pytest
from scipy import ndimage

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.turning_points import mirror_scores, travel_signs, turning_points


def _frames(z_positions, seed=0):
    """Frames sampled at elevations z (in voxels) of a smooth 3D random field: speckle that decorrelates
    over a few voxels out of plane, alike for motions towards +z and -z."""
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.standard_normal((80, 40, 44)), sigma=(2.0, 1.0, 1.0))
    z = np.asarray(z_positions, dtype=np.float64)
    i = np.floor(z).astype(int)
    w = (z - i)[:, None, None]
    return (1 - w) * vol[i] + w * vol[i + 1]


def test_a_reversal_is_found_where_the_probe_turns_and_nowhere_else():
    out = np.arange(30) * 1.2 + 5  # forward 1.2 voxels per frame ...
    back = out[-1] - np.arange(1, 30) * 1.0  # ... turning at frame 29, back at 1.0 per frame
    z = np.concatenate([out, back])
    turns = turning_points(_frames(z))
    assert len(turns) == 1 and abs(turns[0] - 29) <= 1
    signs = travel_signs(len(z) - 1, turns)
    true = np.sign(np.diff(z))
    assert np.mean(signs == true) >= 0.95


@pytest.mark.parametrize("kind", ["steady", "speed change", "pause"])
def test_no_turn_is_found_in_steady_travel_a_speed_change_or_a_pause(kind):
    if kind == "steady":
        z = 3 + np.arange(55) * 1.2
    elif kind == "speed change":
        z = 3 + np.concatenate([np.arange(25) * 0.5, 12 + np.arange(30) * 1.8])
    else:  # travel, stand still for 12 frames (tiny tremor), travel on in the same direction
        rng = np.random.default_rng(1)
        z = np.concatenate([3 + np.arange(20) * 1.2, 26 + rng.normal(0, 0.02, 12), 26.5 + np.arange(25) * 1.2])
    assert turning_points(_frames(z, seed=2)) == []
    s = mirror_scores(_frames(z, seed=2))
    assert np.nanmax(s) < 0.15


def test_bad_input_names_what_was_expected():
    with pytest.raises(InputError, match=r"frames \[N, H, W\]"):
        mirror_scores(np.zeros((5, 4)))
    with pytest.raises(InputError, match="lags"):
        mirror_scores(np.zeros((20, 4, 4)), lags=0)
    assert np.isnan(mirror_scores(np.zeros((8, 4, 4)))).all()  # too short for any score


def test_moglo_direction_turns_reverses_the_forward_pairs_after_the_turn():
    """direction="turns": every pair forward (as "forward"), then mirrored through the image plane after each
    turning point found in the frames; the facts name the turning points."""
    import torch

    from ultrasound_ai.freehand.moglo.method import estimate_sweep
    from ultrasound_ai.freehand.moglo.model import MogloNet, make_config
    from ultrasound_ai.validation.pose_agreement import centre_out_of_plane_mm

    z = np.concatenate([np.arange(20) * 1.2 + 5, 5 + 19 * 1.2 - np.arange(1, 20) * 1.1])
    f = _frames(z, seed=3)
    frames = np.clip((f - f.min()) / (f.max() - f.min()) * 255, 0, 255).astype(np.uint8)
    spacing = (0.4, 0.35)
    torch.manual_seed(0)
    model = MogloNet(make_config("tiny", base_width=4)).eval()
    fwd, _ = estimate_sweep(model, {}, frames, spacing, direction="forward")
    turned, facts = estimate_sweep(model, {"inference": {"sign_linking": True}}, frames, spacing, direction="turns")
    assert len(facts["turning_points"]) == 1 and abs(facts["turning_points"][0] - 19) <= 1
    assert facts["direction"] == "turns" and facts["sign_linking"] is False
    t = facts["turning_points"][0]
    zf = centre_out_of_plane_mm(fwd, frames.shape[1:], spacing)
    zt = centre_out_of_plane_mm(turned, frames.shape[1:], spacing)
    assert (zf >= 0).all() and np.abs(zf).max() > 0
    np.testing.assert_allclose(zt[:t], zf[:t], atol=1e-9)
    np.testing.assert_allclose(zt[t:], -zf[t:], atol=1e-9)
