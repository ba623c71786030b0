"""Linear-probe-then-fine-tune (LP-FT) of the classifier: the probe stage trains the pooling and head with
the encoder fixed, the fine-tuning stage starts from the probe's whole model, and the classifier study
wires the two stages (and the scratch arm's equal step budget) the same way."""

import numpy as np
import pytest
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation import classifier_study as cs
from ultrasound_ai.foundation.training import train_foundation

pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/conftest.py

MICRO = {"preset": "micro", "pooling": "attention"}
SCHED = {"batch_size": 8, "warmup_steps": 1, "log_every": 5, "checkpoint_every": 100, "validate_every": 4}


def _data():
    # Bright vs dark images: separable, so a few steps move the head.
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 2
    x = (rng.normal(0, 0.3, (24, 32, 32)) + np.where(labels, 1.0, -1.0)[:, None, None]).astype(np.float32)
    return {"train": (x[:16], None, labels[:16]), "val": (x[16:], None, labels[16:]), "test": None,
            "class_names": ["dark", "bright"], "facts": {}}


def _train(root, name, model, steps=4):
    return train_foundation({"output_dir": str(root / name), "device": "cpu", "model": {**MICRO, **model},
                             "schedule": {**SCHED, "steps": steps, "lr": 1e-2}},
                            "classify", data=_data(), progress_bar=False)


def _state(path):
    return torch.load(path, weights_only=True)


def test_probe_stage_keeps_the_encoder_and_fine_tuning_starts_from_the_whole_probe(tmp_path):
    torch.manual_seed(0)
    start = _train(tmp_path, "start", {}, steps=1)  # any encoder: the "pre-trained" one of this test
    probe = _train(tmp_path, "probe", {"pretrained": str(start.final_path), "freeze_encoder": True})
    s0, s1 = _state(start.final_path), _state(probe.final_path)
    enc = [k for k in s1 if k.startswith("encoder.")]
    head = [k for k in s1 if not k.startswith("encoder.")]
    assert enc and head
    assert all(torch.equal(s0[k], s1[k]) for k in enc)  # frozen: bit-identical to the loaded encoder
    assert any(not torch.equal(s0[k], s1[k]) for k in head)  # the pooling and head learned
    assert probe.card["training"]["freeze_encoder"] is True

    ft = _train(tmp_path, "ft", {"pretrained": str(start.final_path), "init_from": str(probe.final_path),
                                 "layer_decay": 0.75}, steps=2)
    assert ft.card["training"]["init_from"] == str(probe.final_path) and ft.card["training"]["freeze_encoder"] is False
    # Its step-0 validation is the probe's model (whole model loaded), then the encoder trains too.
    import csv

    with open(ft.log_path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val_loss")]
    with open(probe.log_path) as fh:
        last_probe = [r for r in csv.DictReader(fh) if r.get("val_loss")][-1]
    assert float(rows[0]["val_loss"]) == pytest.approx(float(last_probe["val_loss"]), rel=1e-4)
    s2 = _state(ft.final_path)
    assert any(not torch.equal(s1[k], s2[k]) for k in enc)


def test_init_from_refuses_a_model_of_another_configuration(tmp_path):
    torch.manual_seed(0)
    mean_pooled = _train(tmp_path, "mean", {"pooling": "mean"}, steps=1)
    with pytest.raises(InputError, match="model.init_from .*configuration"):
        _train(tmp_path, "bad", {"init_from": str(mean_pooled.final_path)}, steps=1)


def test_classifier_study_stages_and_equal_step_budget():
    s = cs.settings({"output_dir": "runs/x"})
    probe = cs.cell_config(s, "pretrained", 0.2, 3, cs.PROBE)
    ft = cs.cell_config(s, "pretrained", 0.2, 3)
    scratch = cs.cell_config(s, "scratch", 0.2, 3)
    assert probe["model"]["freeze_encoder"] is True and probe["schedule"]["steps"] == s["probe"]["steps"]
    assert ft["model"]["init_from"] == probe["output_dir"] + "/best.pt" and "freeze_encoder" not in ft["model"]
    assert probe["model"]["pretrained"] == ft["model"]["pretrained"] == cs.encoder_source(s)
    assert ft["model"]["layer_decay"] == s["layer_decay"] < 1.0 and scratch["model"]["layer_decay"] == 1.0
    assert scratch["model"]["pretrained"] is None and "init_from" not in scratch["model"]
    # Scratch: the pre-trained arm's two stages' steps in one run, its own lr; same data, batch and network.
    assert scratch["schedule"]["steps"] == probe["schedule"]["steps"] + ft["schedule"]["steps"]
    assert scratch["schedule"]["lr"] == s["scratch_lr"] and ft["schedule"]["lr"] == s["schedule"]["lr"]
    assert probe["data"] == ft["data"] == scratch["data"]
    assert probe["schedule"]["batch_size"] == ft["schedule"]["batch_size"] == scratch["schedule"]["batch_size"]
    with pytest.raises(InputError, match="stage"):
        cs.cell_config(s, "scratch", 0.2, 3, cs.PROBE)
    # Without a probe stage the pre-trained arm is one run from the encoder (the earlier recipe).
    one = cs.settings({"output_dir": "runs/x", "probe": {"steps": 0}})
    assert "init_from" not in cs.cell_config(one, "pretrained", 0.2, 3)["model"]
    assert cs.cell_config(one, "scratch", 0.2, 3)["schedule"]["steps"] == one["schedule"]["steps"]
