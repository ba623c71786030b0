"""Temporal smoothing of per-pair motion (MoGLo-Net's `smoothing_s`): known answers, noise reduction, and
that the method applies it from the card, records it, and rejects bad values."""

import numpy as np
import pytest
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import chain_relative, matrix_to_params, params_to_matrix, to_relative
from ultrasound_ai.freehand.pair_smoothing import ALL, smooth_pair_motions, smoothing_sigma_pairs

CENTRE = np.array([5.0, 7.0, 0.0])


def _about(params, centre=CENTRE):
    """Pair transforms [M, 4, 4] in image mm whose motion about `centre` has the parameters [M, 6]."""
    shift = np.eye(4)
    shift[:3, 3] = centre
    return shift @ params_to_matrix(params, "xyz", degrees=True) @ np.linalg.inv(shift)


def _params(rel, centre=CENTRE):
    shift = np.eye(4)
    shift[:3, 3] = centre
    return matrix_to_params(np.linalg.inv(shift) @ rel @ shift, "xyz", degrees=True)


def test_constant_motion_is_kept_and_sigma_zero_is_the_identity():
    p = np.tile([0.02, -0.01, 0.3, 0.2, -0.1, 0.05], (40, 1))
    rel = _about(p)
    np.testing.assert_allclose(smooth_pair_motions(rel, CENTRE, 3.0, ALL), rel, atol=1e-12)
    q = np.random.default_rng(0).normal(0, 0.1, (30, 6))
    np.testing.assert_allclose(smooth_pair_motions(_about(q), CENTRE, 0.0), _about(q), atol=0)


def test_an_impulse_spreads_as_a_normalised_gaussian_about_the_frame_centre():
    p = np.zeros((41, 6))
    p[20, 2] = 1.0  # one pair moves 1 mm out of plane
    out = _params(smooth_pair_motions(_about(p), CENTRE, 2.0))
    k = np.arange(41) - 20
    w = np.where(np.abs(k) <= 8, np.exp(-0.5 * (k / 2.0) ** 2), 0.0)  # truncated at 4 sigma
    np.testing.assert_allclose(out[:, 2], w / w.sum(), atol=1e-6)
    np.testing.assert_allclose(out[:, [0, 1, 3, 4, 5]], 0.0, atol=1e-12)
    assert out[:, 2].sum() == pytest.approx(1.0, abs=1e-9)  # the path length along z is kept


def test_only_the_out_of_plane_motion_is_smoothed_by_default():
    """tz, rx, ry (read from decorrelation) are low-passed; tx, ty, rz (seen in the image, tremor
    included) are kept as given."""
    q = np.random.default_rng(2).normal(0, 0.05, (60, 6))
    out = _params(smooth_pair_motions(_about(q), CENTRE, 2.0))
    np.testing.assert_allclose(out[:, [0, 1, 5]], q[:, [0, 1, 5]], atol=1e-9)
    assert np.std(out[:, [2, 3, 4]], axis=0).max() < 0.5 * np.std(q[:, [2, 3, 4]], axis=0).min()


def test_smoothing_brings_noisy_pair_estimates_closer_to_a_smooth_motion():
    m = 200
    t = np.arange(m) / 20.0
    truth = np.column_stack([0.01 * np.sin(t), np.zeros(m), 0.3 + 0.2 * np.sin(2 * np.pi * 0.3 * t),
                             0.1 * np.cos(t), np.zeros(m), np.zeros(m)])
    noisy = truth + np.random.default_rng(1).normal(0, [0.02, 0.02, 0.15, 0.1, 0.1, 0.05], (m, 6))
    sm = _params(smooth_pair_motions(_about(noisy), CENTRE, smoothing_sigma_pairs(0.15, t), ALL))
    err_noisy, err_sm = np.abs(noisy - truth).mean(0), np.abs(sm - truth).mean(0)
    assert np.all(err_sm < 0.6 * err_noisy), (err_sm, err_noisy)


def test_sigma_in_pairs_from_seconds_and_bad_values():
    assert smoothing_sigma_pairs(0.15, np.arange(10) / 20.0) == pytest.approx(3.0)
    assert smoothing_sigma_pairs(0.0, None) == 0.0
    assert smoothing_sigma_pairs(0.15, None) is None  # no frame times: cannot convert
    for bad in (-0.1, float("nan"), "x"):
        with pytest.raises(InputError, match="smoothing_s"):
            smoothing_sigma_pairs(bad, np.arange(5) / 20.0)


def test_moglo_applies_the_cards_smoothing_and_records_it():
    from ultrasound_ai.freehand.moglo.method import estimate_sweep
    from ultrasound_ai.freehand.moglo.model import MogloNet, make_config
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    torch.manual_seed(0)
    model = MogloNet(make_config("tiny", base_width=4)).eval()
    frames = np.random.default_rng(0).integers(0, 256, (14, 40, 50)).astype(np.uint8)
    spacing = (0.4, 0.35)
    raw, facts0 = estimate_sweep(model, {}, frames, spacing, frame_interval_s=0.05)
    assert facts0["smoothing_s"] == 0.0
    card = {"inference": {"smoothing_s": 0.1}}
    got, facts = estimate_sweep(model, card, frames, spacing, frame_interval_s=0.05)
    assert facts["smoothing_s"] == 0.1
    centre = frame_centre_mm(frames.shape[1:], spacing)
    want = chain_relative(smooth_pair_motions(to_relative(raw), centre, 2.0))
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert not np.allclose(got, raw, atol=1e-6)
    off, facts_off = estimate_sweep(model, card, frames, spacing, frame_interval_s=0.05, smoothing_s=0)
    np.testing.assert_allclose(off, raw, atol=1e-12)
    # Without frame times the smoothing cannot be placed in time: skipped, and said so.
    none, facts_none = estimate_sweep(model, card, frames, spacing)
    np.testing.assert_allclose(none, raw, atol=1e-12)
    assert facts_none["smoothing_s"] == 0.0 and "frame times" in facts_none["smoothing_skipped"]
    with pytest.raises(InputError, match="smoothing_s"):
        estimate_sweep(model, card, frames, spacing, frame_interval_s=0.05, smoothing_s=-1)


def test_zeroing_the_tilts_keeps_the_rest_of_each_pairs_motion_about_the_frame_centre():
    """zero_pair_motions: the chosen parameters of each pair's motion about the frame centre set to 0 (by default
    the tilts rx, ry: the out-of-plane rotation), the others kept exactly."""
    from ultrasound_ai.freehand.pair_smoothing import TILTS, zero_pair_motions

    p = np.random.default_rng(3).normal(0, [0.05, 0.05, 0.4, 0.3, 0.3, 0.2], (30, 6))
    got = _params(zero_pair_motions(_about(p), CENTRE))
    want = p.copy()
    want[:, list(TILTS)] = 0.0
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_allclose(_params(zero_pair_motions(_about(p), CENTRE, which=())), p, atol=1e-9)


def test_moglo_rotation_in_plane_drops_the_networks_tilts_from_the_card_or_the_parameter():
    """MoGLo-Net's `rotation`: "in-plane" keeps only the rotation about the beam-normal axis (z) of every pair,
    its translation about the frame centre unchanged; "network" (the default without a card entry) keeps all
    three; the card's inference.rotation sets the default; a bad value names the parameter."""
    from ultrasound_ai.freehand.moglo.method import estimate_sweep
    from ultrasound_ai.freehand.moglo.model import MogloNet, make_config
    from ultrasound_ai.freehand.pair_smoothing import zero_pair_motions
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    torch.manual_seed(0)
    model = MogloNet(make_config("tiny", base_width=4)).eval()
    model.set_normalisation(np.zeros(6), np.full(6, 2.0))  # tilts of a few degrees: far from zero
    frames = np.random.default_rng(0).integers(0, 256, (12, 40, 50)).astype(np.uint8)
    spacing = (0.4, 0.35)
    centre = frame_centre_mm(frames.shape[1:], spacing)
    raw, facts = estimate_sweep(model, {}, frames, spacing)
    assert facts["rotation"] == "network" and np.abs(_params(to_relative(raw), centre)[:, 3:5]).max() > 0.05
    want = chain_relative(zero_pair_motions(to_relative(raw), centre))
    got, facts = estimate_sweep(model, {}, frames, spacing, rotation="in-plane")
    assert facts["rotation"] == "in-plane"
    np.testing.assert_allclose(got, want, atol=1e-9)
    card = {"inference": {"rotation": "in-plane"}}
    np.testing.assert_allclose(estimate_sweep(model, card, frames, spacing)[0], want, atol=1e-9)
    np.testing.assert_allclose(estimate_sweep(model, card, frames, spacing, rotation="network")[0], raw, atol=1e-12)
    with pytest.raises(InputError, match="rotation"):
        estimate_sweep(model, {}, frames, spacing, rotation="none")
