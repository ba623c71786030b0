"""Attention-Reg network: parameter count, attention forms, shapes, Feature-Reg, correction algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrasound_ai.core import geometry
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.registration.attention_reg import (
    PRESETS,
    AttentionReg,
    CrossModalAttention,
    apply_correction,
    build_model,
    config_from_dict,
    correction_frame,
    correction_matrix,
    correction_target,
    count_parameters,
    cross_attention,
    preset,
)


def test_original_has_the_papers_parameter_count():
    model = build_model("original")
    assert count_parameters(model) == 1_248_777
    # fc1 alone, as the reference states: 9216 -> 128 with bias
    fc1 = [m for m in model.head if isinstance(m, torch.nn.Linear)][0]
    assert fc1.in_features == 9216 and sum(p.numel() for p in fc1.parameters()) == 1_179_776
    assert model.config.feature_size == (16, 24, 24)


def test_feature_reg_has_no_attention_parameters():
    att = build_model(preset("tiny"))
    feat = build_model(preset("tiny", attention=False))
    assert not any(isinstance(m, CrossModalAttention) for m in feat.modules())
    assert not any("attend" in name for name, _ in feat.named_parameters())
    # exactly the two attention blocks' parameters are missing (theta, phi, g, W_z with biases; BN)
    c, inner = 8, 4
    block = 3 * (c * inner + inner) + (inner * c + c) + 2 * c
    assert count_parameters(att) - count_parameters(feat) == 2 * block
    # and for the original: 2 x 2,192
    assert count_parameters(build_model("original")) - count_parameters(build_model(preset("original", attention=False))) == 4384


def test_half_preset_is_half_resolution():
    cfg = PRESETS["half"]
    assert cfg.input_size == (16, 48, 48) and cfg.width == 32 and cfg.inner == 16 and cfg.fc_hidden == (128, 32)
    assert cfg.feature_size == (8, 12, 12)


def test_sdpa_equals_explicit_softmax_attention_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 50, 4, dtype=torch.float64) for _ in range(3))
    a = cross_attention(q, k, v)
    b = cross_attention(q, k, v, explicit=True)
    # explicit eq. (1) without 1/sqrt(d): weights exp(q.k) / sum exp(q.k)
    w = torch.exp(q @ k.transpose(1, 2))
    c = (w / w.sum(-1, keepdim=True)) @ v
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(a, c, atol=1e-12)


def test_whole_network_sdpa_equals_explicit_float64():
    torch.manual_seed(1)
    model = build_model("tiny").double().eval()
    for m in model.modules():  # non-trivial BN statistics so the comparison covers them
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(3, 2, 8, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        a = model(x)
        model.set_explicit_attention(True)
        b = model(x)
    assert a.shape == (3, 6) and a.dtype == torch.float64
    assert torch.allclose(a, b, atol=1e-10)


def test_attention_queries_come_from_the_other_modality():
    # Y is a convex combination of g(P) rows: with g = identity-like embedding of P, a change in C alone
    # changes only the weights; a P that is constant over positions makes Y independent of C.
    torch.manual_seed(2)
    block = CrossModalAttention(4, 2).double().eval()
    p = torch.ones(1, 4, 2, 3, 3, dtype=torch.float64)
    c1, c2 = torch.randn(2, 1, 4, 2, 3, 3, dtype=torch.float64)
    assert torch.allclose(block(p, c1), block(p, c2), atol=1e-12)
    p2 = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    assert not torch.allclose(block(p2, c1), block(p2, c2), atol=1e-6)


@pytest.mark.parametrize("attention", [True, False])
def test_shapes_and_backward(attention):
    model = AttentionReg(preset("tiny", attention=attention))
    x = torch.rand(2, 2, 8, 24, 24)
    y = model(x)
    assert y.shape == (2, 6) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs_raise_clear_errors():
    model = build_model("tiny")
    with pytest.raises(InputError, match=r"expected a tensor \[B, 2, 8, 24, 24\]"):
        model(torch.rand(1, 2, 8, 24, 23))
    with pytest.raises(InputError, match="preset"):
        preset("huge")
    with pytest.raises(InputError, match="unknown key"):
        config_from_dict({"preset": "tiny", "depth": 3})
    with pytest.raises(InputError, match="input_size"):
        config_from_dict({"input_size": [8, 24]})


def test_config_round_trip():
    cfg = preset("tiny", attention=False)
    assert config_from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------------- correction algebra


def _random_rigid(rng, t_mm=15.0, r_deg=20.0):
    p = np.concatenate([rng.uniform(-t_mm, t_mm, 3), rng.uniform(-r_deg, r_deg, 3)])
    return geometry.params_to_matrix(p, "xyz", degrees=True)


@pytest.mark.parametrize("oblique", [False, True])
def test_target_correction_maps_init_back_to_truth(oblique):
    rng = np.random.default_rng(4)
    for _ in range(20):
        T_true = _random_rigid(rng)
        T_init = T_true @ _random_rigid(rng, 8, 10)
        axes = geometry.rotation(_random_rigid(rng, 0, 40)) * [0.7, 0.9, 2.5] if oblique else None
        frame = correction_frame(rng.uniform(-50, 50, 3), axes)
        delta = correction_target(T_init, T_true, frame)
        assert np.abs(apply_correction(T_init, delta, frame) - T_true).max() < 1e-9


def test_correction_semantics_known_answers():
    c = np.array([10.0, -20.0, 5.0])
    frame = correction_frame(c)
    # a pure rotation about the centre leaves the centre where it is
    M = correction_matrix([0, 0, 0, 0, 0, 30], frame)
    assert np.allclose(geometry.apply_transform(M, c), c, atol=1e-12)
    # 90 degrees about z: the point c + x goes to c + y
    M = correction_matrix([0, 0, 0, 0, 0, 90], frame)
    assert np.allclose(geometry.apply_transform(M, c + [1, 0, 0]), c + [0, 1, 0], atol=1e-12)
    # a translation acts in fixed space before T_cur: T_new(x) = T_cur(x + t)
    T_cur = _random_rigid(np.random.default_rng(5))
    T_new = apply_correction(T_cur, [1, 2, 3, 0, 0, 0], frame)
    x = np.array([3.0, 4.0, 5.0])
    assert np.allclose(geometry.apply_transform(T_new, x), geometry.apply_transform(T_cur, x + [1, 2, 3]))
    # an oblique ROI: the parameters' x axis is the ROI's first (i) axis
    axes = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) * 0.8  # i along +y, j along -x
    M = correction_matrix([2, 0, 0, 0, 0, 0], correction_frame(c, axes))
    assert np.allclose(geometry.apply_transform(M, c), c + [0, 2, 0], atol=1e-12)


def test_centroid_rotation_decouples_translation():
    # For a rotation-only perturbation about the centroid, the target has no translation part.
    c = np.array([5.0, 6.0, 7.0])
    frame = correction_frame(c)
    T_true = _random_rigid(np.random.default_rng(6))
    rot = correction_matrix([0, 0, 0, 4, -3, 6], frame)
    target = correction_target(T_true @ rot, T_true, frame)
    assert np.allclose(target[:3], 0, atol=1e-9)
    # about a distant corner the same perturbation needs a translation
    target_corner = correction_target(T_true @ rot, T_true, correction_frame(c - 60))
    assert np.abs(target_corner[:3]).max() > 1.0


def test_correction_bad_inputs():
    frame = correction_frame([0, 0, 0])
    with pytest.raises(InputError, match="6 finite numbers"):
        apply_correction(np.eye(4), [1, 2, 3], frame)
    with pytest.raises(InputError, match="current transform"):
        apply_correction(np.diag([2.0, 1, 1, 1]), np.zeros(6), frame)
    with pytest.raises(InputError, match="centre of rotation"):
        correction_frame([0, np.nan, 0])
    with pytest.raises(InputError, match="right-handed"):
        correction_frame([0, 0, 0], np.diag([1.0, 1.0, -1.0]))
