"""Classification head pooling: attention pooling against its hand-written form, checkpoint round trip,
old cards (no pooling key) still build the mean-pooled model."""

import math

import pytest
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation.heads import AttentionPool, ClassificationModel, build_model
from ultrasound_ai.foundation.training import _configuration, model_options
from ultrasound_ai.foundation.vit import vit_config

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 3}


def test_attention_pool_equals_hand_written_multi_head_attention():
    torch.manual_seed(0)
    pool = AttentionPool(12, 3).eval()
    tokens = torch.randn(2, 5, 12)
    with torch.no_grad():
        got = pool(tokens)
        a = pool.attn
        w_q, w_k, w_v = a.in_proj_weight.chunk(3)
        b_q, b_k, b_v = a.in_proj_bias.chunk(3)
        q = (pool.query[0] @ w_q.T + b_q).view(1, 3, 4).transpose(0, 1)  # [heads, 1, 4]
        k = (tokens @ w_k.T + b_k).view(2, 5, 3, 4).permute(0, 2, 1, 3)  # [B, heads, 5, 4]
        v = (tokens @ w_v.T + b_v).view(2, 5, 3, 4).permute(0, 2, 1, 3)
        att = torch.softmax(q.unsqueeze(0) @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)  # [B, heads, 1, 5]
        x = (att @ v).permute(0, 2, 1, 3).reshape(2, 12) @ a.out_proj.weight.T + a.out_proj.bias
        want = x + pool.mlp(pool.norm(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A pooled summary does not depend on the order of the tokens.
    torch.testing.assert_close(pool(tokens[:, [4, 2, 0, 1, 3]]), got, rtol=1e-5, atol=1e-5)


def test_attention_pooling_round_trips_through_a_checkpoint(tmp_path):
    from ultrasound_ai.foundation.inference import load_model
    from ultrasound_ai.models.checkpoint import save_checkpoint

    m = model_options({"preset": "tiny", **SMALL, "pooling": "attention"}, "classify", {"source": "simulate",
                                                                                      "classes": [0, 1, 2]})
    conf = _configuration("classify", m, ["benign", "malignant", "normal"])
    assert conf["pooling"] == "attention"
    torch.manual_seed(1)
    model = build_model(conf).eval()
    assert isinstance(model.pool, AttentionPool)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want = model(x)
    save_checkpoint(model.state_dict(), tmp_path / "cls.pt", {"name": "cls", "method": "usfm", "configuration": conf,
                                                              "input": {}, "training": {}, "metrics": {}})
    lm = load_model(tmp_path / "cls.pt", "cpu", "classify")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), want)


def test_cards_without_pooling_build_the_mean_pooled_model_and_bad_pooling_is_named():
    conf = {"task": "classify", "vit": vit_config("tiny", **SMALL).to_dict(), "num_classes": 3}
    model = build_model(conf)
    assert model.pool is None and model.pooling == "mean"
    m = model_options({"preset": "tiny", **SMALL}, "classify", None)
    assert "pooling" not in _configuration("classify", m, [])  # mean: the configuration old cards have
    with pytest.raises(InputError, match="pooling"):
        ClassificationModel(vit_config("tiny", **SMALL), 3, pooling="max")


def test_both_arms_of_the_classifier_study_use_the_same_attention_pooling_head():
    from ultrasound_ai.foundation import classifier_study as cs

    a, b = (cs.cell_config(cs.settings(), init, 0.2, 0)["model"] for init in ("pretrained", "scratch"))
    assert a["pooling"] == b["pooling"] == "attention"
    # The encoder's start (the probe stage's model, see test_foundation_lpft) and its lr decay; the network is the same.
    arm = ("pretrained", "init_from", "layer_decay")
    assert {k: v for k, v in a.items() if k not in arm} == {k: v for k, v in b.items() if k not in arm}
    assert b["layer_decay"] == 1.0 and a["layer_decay"] < 1.0
