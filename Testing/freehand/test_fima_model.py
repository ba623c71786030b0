"""FiMA network (tiny config) and losses: shapes, scan-order and time-reversal symmetries, IMU handling,
the encode/decode split, chunked inference, and hand-computed loss values."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from ultrasound_ai.core import geometry
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.fima import losses as fl
from ultrasound_ai.freehand.fima.model import (
    SSMC,
    SSMF,
    FimaConfig,
    FimaNet,
    count_parameters,
    imu_pair_inputs,
    make_config,
)


def _frames(b=2, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n, 32, 36), generator=g, dtype=torch.uint8)


def _imus(b=2, L=6, m=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, m, 3, generator=g) + torch.tensor([0, 0, 9.81]), torch.randn(b, L, m, 3, generator=g)


@pytest.fixture(scope="module")
def fima():
    torch.manual_seed(0)
    return FimaNet(make_config("tiny", "fima")).eval()


def test_configs_presets_variants():
    assert make_config("paper").widths == (64, 128, 256, 512)
    assert make_config("shipped").frame_shape == (124, 130) and make_config("shipped").base_width == 32
    assert make_config("tiny", "rem'") == make_config("tiny", "rem-prime")
    c = make_config("tiny", "rem+f'", n_imus=2)
    assert c.fusion == "linear" and c.n_imus == 2
    assert FimaConfig.from_dict(c.to_dict()) == c
    assert make_config("tiny", "rem-prime").ssmf_orders == ("row",)
    with pytest.raises(InputError, match="variant"):
        make_config("tiny", "resnet")
    with pytest.raises(InputError, match="preset"):
        make_config("huge")
    with pytest.raises(InputError, match="unknown fields"):
        FimaConfig.from_dict({"widthz": 3})
    # The ablations differ in parameters the way the paper's table says they should.
    n = {v: count_parameters(FimaNet(make_config("tiny", v))) for v in ("rem-prime", "rem", "rem-f-prime", "rem-f")}
    assert n["rem-prime"] < n["rem"] < n["rem-f-prime"] < n["rem-f"]


@pytest.mark.parametrize("variant,m", [("rem-prime", 0), ("rem", 0), ("rem-f-prime", 3), ("rem-f", 1), ("fima", 4)])
def test_forward_shapes(variant, m):
    torch.manual_seed(1)
    net = FimaNet(make_config("tiny", variant, n_imus=max(m, 1)))
    acc, ang = _imus(m=m) if m else (None, None)
    out = net(_frames(), acc, ang)
    assert out.params.shape == (2, 6, 6) and torch.isfinite(out.params).all()
    assert out.image_features.shape == (2, 6, net.cfg.feature_dim)
    if m:
        assert out.imu_weights.shape == (2, 6, m) and out.acc_features.shape == (2, 6, net.cfg.feature_dim)
        torch.testing.assert_close(out.imu_weights.sum(-1), torch.ones(2, 6))
    else:
        assert out.imu_weights is None and out.acc_features is None


def test_imu_permutation_equivariance(fima):
    acc, ang = _imus()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = fima(_frames(), acc, ang)
        b = fima(_frames(), acc[:, :, perm], ang[:, :, perm])
    torch.testing.assert_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.imu_weights[:, :, perm], b.imu_weights)


def test_encode_decode_split_and_chunked_inference(fima):
    acc, ang = _imus()
    frames = _frames()
    with torch.no_grad():
        full = fima(frames, acc, ang)
        split = fima.decode(fima.encode(frames).detach(), acc, ang)
        chunked = fima(frames, acc, ang, pair_chunk=4)
    torch.testing.assert_close(split.params, full.params)
    torch.testing.assert_close(chunked.params, full.params, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.imu_weights, full.imu_weights, rtol=1e-5, atol=1e-6)
    dec = {id(p) for p in fima.decoder_parameters()}
    assert all(id(p) not in dec for p in fima.stages.parameters())
    assert all(id(p) in dec for p in fima.head.parameters())


def test_imu_units_rescale_the_inputs_and_the_skip_keeps_each_pairs_reading(fima):
    acc, ang = _imus()
    feats = fima.encode(_frames()).detach()
    scaled = FimaNet(dataclasses.replace(fima.cfg, imu_acc_unit_m_s2=2 * fima.cfg.imu_acc_unit_m_s2,
                                         imu_angle_unit_deg=0.5 * fima.cfg.imu_angle_unit_deg)).eval()
    scaled.load_state_dict(fima.state_dict())
    with torch.no_grad():
        ref = fima.decode(feats, acc, ang)
        torch.testing.assert_close(scaled.decode(feats, 2 * acc, 0.5 * ang).params, ref.params)
        assert not torch.allclose(scaled.decode(feats, acc, ang).params, ref.params, atol=1e-4)
        # With the temporal attention silenced only the per-pair skip carries the IMUs: a change of pair
        # 3's IMU angle must then reach pair 3's fused feature and no other pair's.
        fusion = copy.deepcopy(fima.fusion)
        for attn in fusion.attn.values():
            attn.out_proj.weight.zero_()
            attn.out_proj.bias.zero_()
        bumped = ang.clone()
        bumped[:, 3] += 4.0
        a = acc / fima.cfg.imu_acc_unit_m_s2
        x0 = fusion(ref.image_features, a, ang / fima.cfg.imu_angle_unit_deg)[0]
        x1 = fusion(ref.image_features, a, bumped / fima.cfg.imu_angle_unit_deg)[0]
    change = (x1 - x0).norm(dim=-1)  # [B, L]
    assert bool((change[:, 3] > 1e-3).all())
    torch.testing.assert_close(change[:, [0, 1, 2, 4, 5]], torch.zeros(2, 5))
    with pytest.raises(InputError, match="imu_angle_unit_deg"):
        make_config("tiny", "fima", imu_angle_unit_deg=0.0)


def test_ssmf_column_order_is_the_row_order_of_the_transposed_map():
    torch.manual_seed(2)
    cfg = make_config("tiny", "rem", chunk_size=8)
    a, b = SSMF(4, cfg).double(), SSMF(4, cfg).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # b scans rows with a's column parameters and vice versa
        for name, p in a.scans["row"].named_parameters():
            dict(b.scans["col"].named_parameters())[name].copy_(p)
        for name, p in a.scans["col"].named_parameters():
            dict(b.scans["row"].named_parameters())[name].copy_(p)
    feat = torch.randn(1, 3, 4, 5, 6, dtype=torch.float64)
    out_a = a(feat)
    out_b = b(feat.transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(out_a, out_b)
    assert out_a.shape == feat.shape


def test_ssmc_time_reversal_swaps_the_two_scans():
    torch.manual_seed(3)
    cfg = make_config("tiny", "rem")
    a, b = SSMC(8, cfg, residual=True).double(), SSMC(8, cfg, residual=True).double()
    b.load_state_dict(a.state_dict())
    b.forward_scan.load_state_dict(a.backward_scan.state_dict())
    b.backward_scan.load_state_dict(a.forward_scan.state_dict())
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x.flip(1)).flip(1))
    # forward-only (ReM') SSM-C is causal in time
    c = SSMC(8, make_config("tiny", "rem-prime"), residual=False).double()
    x2 = x.clone()
    x2[:, 5:] += 1
    torch.testing.assert_close(c(x)[:, :5], c(x2)[:, :5])


def test_imu_pair_inputs_match_the_relative_transform_convention():
    rng = np.random.default_rng(0)
    n = 6
    params = np.cumsum(rng.normal(0, [0.3, 0.3, 0.5, 0.4, 0.4, 0.4], (n, 6)), axis=0)
    poses = geometry.params_to_matrix(params, "xyz", True)
    rel = geometry.matrix_to_params(geometry.to_relative(poses), "xyz", True)  # the network's targets
    earth = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # any fixed Earth rotation leaves R_i^T R_i+1 alone
    eul = geometry.matrix_to_euler(earth @ poses[:, :3, :3], "xyz", degrees=True)
    acc = rng.normal(size=(n, 3))
    imu_acc = np.stack([acc, acc + 1.0])  # 2 IMUs, [M, N, 3]
    imu_eul = np.stack([eul, eul])
    pacc, pang = imu_pair_inputs(imu_acc, imu_eul)
    assert pacc.shape == (n - 1, 2, 3) and pang.shape == (n - 1, 2, 3)
    np.testing.assert_allclose(pang[:, 0].numpy(), rel[:, 3:], atol=1e-4)
    np.testing.assert_allclose(pacc[:, 1].numpy(), 0.5 * (acc[:-1] + acc[1:]) + 1.0, atol=1e-5)
    with pytest.raises(InputError, match="imu_acc"):
        imu_pair_inputs(imu_acc[:, :1], imu_eul[:, :1])
    with pytest.raises(InputError, match="NaN"):
        imu_pair_inputs(np.full_like(imu_acc, np.nan), imu_eul)


def test_bad_inputs(fima):
    acc, ang = _imus()
    with pytest.raises(InputError, match="imu_acc and imu_angle"):
        fima(_frames())
    with pytest.raises(InputError, match="imu_acc"):
        fima(_frames(), acc[:, :3], ang[:, :3])
    with pytest.raises(InputError, match="at least 2 frames"):
        fima(_frames(n=1))
    with pytest.raises(InputError, match="32x32"):
        fima(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="NaN"):
        fima(torch.full((1, 3, 32, 36), float("nan")), acc[:1, :2], ang[:1, :2])
    net = FimaNet(make_config("tiny", "rem-f-prime", n_imus=3))
    with pytest.raises(InputError, match="3 IMUs"):
        net(_frames(), *_imus(m=2))


def test_training_steps_lower_the_loss():
    torch.manual_seed(4)
    net = FimaNet(make_config("tiny", "rem-f"))
    frames, (acc, ang) = _frames(b=1, n=9), _imus(b=1, L=8)
    target = torch.randn(1, 8, 6) * 0.5
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = fl.supervised_loss(net(frames, acc, ang).params, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------------------------- losses


def test_pearson_known_values_and_zero_variance_guard():
    a = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    b = torch.tensor([[2.0, 1.0], [4.0, 2.0], [7.0, 3.0]])
    r, valid = fl.pearson(a, b)
    expected = np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1]
    assert abs(float(r[0]) - expected) < 1e-6 and abs(float(r[1])) < 1e-6  # constant a -> r = 0
    assert valid.tolist() == [True, True]
    # constant target: left out; all constant: 0, with finite gradients
    pred = torch.randn(5, 2, requires_grad=True)
    tgt = torch.stack([torch.arange(5.0), torch.full((5,), 2.0)], 1)
    loss = fl.pearson_loss(pred, tgt)
    r0 = float(fl.pearson(pred[:, :1], tgt[:, :1])[0])
    assert abs(float(loss) - (1 - r0)) < 1e-6
    loss.backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad[:, 1].abs().sum()) == 0
    zero = fl.pearson_loss(torch.zeros(4, 3, requires_grad=True), torch.ones(4, 3))
    assert float(zero) == 0.0
    zero.backward()


def test_supervised_loss_hand_computed():
    pred = torch.zeros(1, 4, 6)
    target = torch.zeros(1, 4, 6)
    target[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # tx error mean 2.5 over 4 rows and 3 columns
    target[0, :, 3] = torch.tensor([0.0, 0.0, 0.0, 4.0])  # ax: mean |error| 1 / 3
    loss, parts = fl.supervised_loss(pred, target, pearson_weight=0.0)
    assert abs(parts["l1_translation_mm"] - 2.5 / 3) < 1e-6
    assert abs(parts["l1_angle_deg"] - 1.0 / 3) < 1e-6
    assert abs(float(loss) - (2.5 / 3 + fl.ANGLE_WEIGHT / 3)) < 1e-6
    assert abs(fl.ANGLE_WEIGHT - 100 * math.pi / 180) < 1e-12
    # Pearson part: perfect correlation gives 0 (prediction = truth up to scale and offset)
    _, parts = fl.supervised_loss(2 * target + 1, target)
    assert abs(parts["pearson"]) < 1e-6
    with pytest.raises(InputError, match="pred"):
        fl.supervised_loss(torch.zeros(1, 4, 5), torch.zeros(1, 4, 5))


def test_info_nce_aligned_vs_shuffled():
    e = torch.eye(2)
    aligned = fl.info_nce(e, e, tau=0.1)
    shuffled = fl.info_nce(e, e.flip(0), tau=0.1)
    assert abs(float(aligned) - math.log1p(math.exp(-10))) < 1e-6
    assert abs(float(shuffled) - math.log1p(math.exp(10))) < 1e-4
    # normalisation: scaling features changes nothing
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(3, 7, 5, generator=gen)
    g = f + 0.1 * torch.randn(3, 7, 5, generator=gen)
    torch.testing.assert_close(fl.info_nce(f, g), fl.info_nce(10 * f, 0.5 * g))
    assert float(fl.info_nce(f, g)) < float(fl.info_nce(f, g[:, torch.arange(7).roll(1)]))
    with pytest.raises(InputError, match="tau"):
        fl.info_nce(f, g, tau=0)


def test_pearson_prior_and_alignment_loss(fima):
    L = 6
    truth = torch.linspace(-1, 1, L)
    imu = torch.stack([truth, -truth, truth], -1)[:, None, :].repeat(1, 2, 1)  # 2 IMUs, [L, 2, 3]
    imu[:, 1] = torch.randn(L, 3)  # IMU 2 is noise; weights put all trust on IMU 1
    w = torch.tensor([1.0, 0.0]).expand(L, 2)
    pred = torch.stack([2 * truth, -truth + 1, 3 * truth], -1)
    prior = fl.pearson_prior(pred[None], imu[None], w[None])
    assert abs(float(prior)) < 1e-6
    assert float(fl.pearson_prior(-pred[None], imu[None], w[None])) > 1.99
    acc, ang = _imus()
    out = fima(_frames(), acc, ang)
    loss, parts = fl.alignment_loss(out, ang)
    assert math.isfinite(float(loss)) and set(parts) == {"info_nce", "prior"}
    loss.backward()
    assert any(p.grad is not None for p in fima.fusion.parameters())
    fima.zero_grad()
    with pytest.raises(InputError, match="no IMU features"):
        fl.alignment_loss(FimaNet(make_config("tiny", "rem"))(_frames(), None, None), ang)
