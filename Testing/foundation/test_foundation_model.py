"""ViT, dual masking and losses of the foundation model (known answers and equivalences)."""

import numpy as np
import pytest
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation.heads import (
    ClassificationModel,
    MaskedImageModel,
    SegmentationModel,
    build_model,
    feature_blocks,
)
from ultrasound_ai.foundation.losses import dice_score, focal_frequency_loss, mim_loss
from ultrasound_ai.foundation.masking import (
    MaskingConfig,
    band_edges,
    band_stop_filter,
    dual_mask,
    frequency_band_stop,
    radius_grid,
    random_patch_mask,
)
from ultrasound_ai.foundation.vit import (
    Attention,
    DropPath,
    RelativePositionBias,
    VisionTransformer,
    count_parameters,
    vit_config,
)


def test_base_preset_is_vit_b16_with_about_86m_parameters():
    cfg = vit_config("base")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size, cfg.in_chans) == (768, 12, 12, 16, 224, 3)
    with torch.device("meta"):  # shapes only: no 344 MB of weights to initialise
        n = count_parameters(VisionTransformer(cfg))
    assert 85.0e6 < n < 87.0e6


def test_tiny_preset_and_shapes_of_all_models():
    tiny = vit_config("tiny")
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.img_size, tiny.in_chans) == (192, 12, 3, 128, 1)
    cfg = vit_config("micro")
    x = torch.randn(2, 1, cfg.img_size, cfg.img_size)
    assert VisionTransformer(cfg)(x).shape == (2, cfg.embed_dim)
    assert MaskedImageModel(cfg)(x).shape == x.shape
    assert SegmentationModel(cfg, 3, channels=16)(x).shape == (2, 3, 32, 32)
    assert ClassificationModel(cfg, 3)(x).shape == (2, 3)
    assert feature_blocks(12) == (3, 5, 7, 11)  # blocks 4/6/8/12
    assert feature_blocks(4) == (0, 1, 2, 3)
    # A 3-channel model accepts a grey image (repeated over the channels).
    enc3 = VisionTransformer(vit_config("micro", in_chans=3))
    assert enc3(x).shape == (2, cfg.embed_dim)
    with pytest.raises(InputError, match="32x32"):
        VisionTransformer(cfg)(torch.randn(1, 1, 40, 40))
    with pytest.raises(InputError, match="channel"):
        VisionTransformer(cfg)(torch.randn(1, 2, 32, 32))
    with pytest.raises(InputError, match="preset"):
        vit_config("huge")
    with pytest.raises(InputError, match="task"):
        build_model({"task": "detect"})


@pytest.mark.parametrize("cls", [False, True])
def test_sdpa_attention_equals_explicit_form_with_relative_bias(cls):
    torch.manual_seed(0)
    grid = (3, 4)
    bias_mod = RelativePositionBias(grid, num_heads=2, use_cls_token=cls)
    n_rel = (2 * 3 - 1) * (2 * 4 - 1)
    assert bias_mod.table.shape == (n_rel + (3 if cls else 0), 2)
    with torch.no_grad():
        bias_mod.table.normal_(0, 1.0)  # large bias, so a wrong mask would show
    bias = bias_mod()
    n = 12 + int(cls)
    assert bias.shape == (2, n, n)
    off = int(cls)
    # Same relative offset (0, +1) -> same bias: pairs (0,0)->(0,1) and (2,2)->(2,3).
    torch.testing.assert_close(bias[:, off + 0, off + 1], bias[:, off + 10, off + 11])
    attn = Attention(16, 2)
    x = torch.randn(2, n, 16)
    torch.testing.assert_close(attn(x, bias), attn(x, bias, explicit=True), atol=1e-5, rtol=1e-5)
    enc = VisionTransformer(vit_config("micro", use_cls_token=cls)).eval()
    img = torch.randn(1, 1, 32, 32)
    a, _ = enc.forward_features(img)
    b, _ = enc.forward_features(img, explicit=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layerscale_init_and_drop_path():
    enc = VisionTransformer(vit_config("micro", drop_path=0.3))
    assert torch.all(enc.blocks[0].gamma1 == 0.1)
    rates = [b.drop_path.p for b in enc.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    dp = DropPath(0.5).train()
    torch.manual_seed(1)
    y = dp(torch.ones(64, 5))
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0} and 0 < (y == 0).sum() < 64 * 5
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_spatial_mask_ratio_exact_and_mean_fill():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(4, 1, 32, 32)
    cfg = MaskingConfig(mask_patch_size=8, mask_ratio=0.6, frequency=False)
    out = dual_mask(img, g, cfg)
    assert torch.all(out["patch_mask"].flatten(1).sum(1) == round(0.6 * 16))
    pm = out["pixel_mask"]
    for i in range(4):
        m = pm[i, 0]
        assert torch.allclose(out["input"][i, 0][m], img[i].mean().expand(int(m.sum())))
        assert torch.equal(out["input"][i, 0][~m], img[i, 0][~m])
    for ratio in (0.0, 0.3, 1.0):
        assert int(random_patch_mask(g, 1, (5, 7), ratio).sum()) == round(ratio * 35)


def test_band_stop_removes_exactly_the_chosen_rings():
    torch.manual_seed(0)
    img = torch.rand(2, 1, 32, 48, dtype=torch.float64)
    edges = band_edges(6, 0.03, 1.4)
    assert edges[0] == pytest.approx(0.03) and np.all(np.diff(edges) > 0)
    widths = np.diff(edges)[:-1]
    np.testing.assert_allclose(widths[1:] / widths[:-1], 1.4, rtol=1e-9)  # geometric growth
    removed = np.array([False, True, False, True, False, False])
    filt = band_stop_filter(32, 48, edges, removed)
    out = frequency_band_stop(img, filt)
    r = radius_grid(32, 48)
    gone = ((r >= edges[1]) & (r < edges[2])) | ((r >= edges[3]) & (r < edges[4]))
    assert gone.sum() > 20
    f_in, f_out = torch.fft.fft2(img), torch.fft.fft2(out)
    assert f_out.abs()[..., gone].max() < 1e-9 * f_in.abs().max()
    torch.testing.assert_close(f_out[..., ~gone], f_in[..., ~gone], atol=1e-9, rtol=1e-9)
    # The DC (mean) lies in the protected disc and survives.
    torch.testing.assert_close(out.mean(dim=(-2, -1)), img.mean(dim=(-2, -1)))


def test_dual_mask_eq7_combines_both():
    g = torch.Generator().manual_seed(5)
    img = torch.rand(3, 1, 32, 32)
    out = dual_mask(img, g, MaskingConfig(mask_patch_size=16, mask_ratio=0.5, n_bands=4, band_probability=0.5))
    assert torch.all(out["bands"].any(dim=1))  # every image loses at least one ring
    edges = band_edges(4, 0.02, 1.4)
    for i in range(3):
        freq = frequency_band_stop(img[i:i + 1], band_stop_filter(32, 32, edges, out["bands"][i]))
        m = out["pixel_mask"][i, 0]
        torch.testing.assert_close(out["input"][i, 0][~m], freq[0, 0][~m], atol=1e-5, rtol=1e-5)
        assert torch.allclose(out["input"][i, 0][m], img[i].mean().expand(int(m.sum())))
    with pytest.raises(InputError, match="multiple"):
        dual_mask(torch.rand(1, 1, 30, 30), g, MaskingConfig(mask_patch_size=16))


def _dft(x):
    # Textbook orthonormal DFT, written out independently of torch.fft.
    h, w = x.shape
    u = np.arange(h)[:, None, None, None]
    v = np.arange(w)[None, :, None, None]
    yy = np.arange(h)[None, None, :, None]
    xx = np.arange(w)[None, None, None, :]
    return (x[None, None] * np.exp(-2j * np.pi * (u * yy / h + v * xx / w))).sum(axis=(2, 3)) / np.sqrt(h * w)


def test_focal_frequency_loss_hand_computed():
    # Constant image c against zeros on 4x4: only DC differs, |dF| = 4c there, w = 1 at DC and 0
    # elsewhere (min-max), so the loss is (4c)^2 / 16 = c^2.
    target = torch.full((1, 1, 4, 4), 0.5)
    assert focal_frequency_loss(torch.zeros_like(target), target).item() == pytest.approx(0.25)
    assert focal_frequency_loss(target, target).item() == 0.0
    # A general case against the textbook DFT and the definition.
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 4)), rng.random((4, 4))
    d = np.abs(_dft(a) - _dft(b))
    for alpha in (1.0, 2.0):
        w = d ** alpha
        w = (w - w.min()) / (w.max() - w.min())
        expected = np.mean(w * d ** 2)
        got = focal_frequency_loss(torch.tensor(a)[None, None], torch.tensor(b)[None, None], alpha).item()
        assert got == pytest.approx(expected, rel=1e-5)
    # The weights are detached: the gradient is that of mean(w * |dF|^2) with w fixed.
    p = torch.tensor(a, requires_grad=True)
    focal_frequency_loss(p, torch.tensor(b)).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    out = mim_loss(torch.zeros(1, 1, 4, 4), target, lam=2.0)
    assert out["loss"].item() == pytest.approx(0.5 + 2 * 0.25)


def test_dice_score_known_values():
    a = np.zeros((4, 4), int)
    b = np.zeros((4, 4), int)
    a[:2, :2] = 1
    b[:2, :] = 1
    assert dice_score(a, b) == pytest.approx(2 * 4 / (4 + 8))
    assert dice_score(np.zeros((4, 4)), b) == 0.0  # the trivial all-background predictor
    assert dice_score(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    with pytest.raises(InputError):
        dice_score(a, b[:3])
