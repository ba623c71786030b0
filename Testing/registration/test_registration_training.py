"""Attention-Reg training through the harness, and the cascade at inference from the harness's checkpoints.

The training data are small synthetic cases (an ellipsoid gland with an off-centre nodule, seen by a
label/MRI volume and by a "TRUS" volume under a known rigid transform), so a tiny network learns within
a few dozen steps on two CPU cores; the same code trains on the phantom simulator's cases.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ultrasound_ai.core import geometry
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.training import load_config
from ultrasound_ai.io.volume import Volume
from ultrasound_ai.models import registry
from ultrasound_ai.registration.attention_reg import apply_correction
from ultrasound_ai.registration.case import Case
from ultrasound_ai.registration.inference import (
    correction_frame_for,
    default_checkpoints,
    load_cascade,
    load_stage,
    register_attention,
)
from ultrasound_ai.registration.metrics import sre
from ultrasound_ai.registration.preprocessing import prepare_input
from ultrasound_ai.registration.training import (
    AttentionRegTask,
    data_options,
    draw_sample,
    train_attention_reg,
)

TINY_SIZE = (8, 24, 24)


# ------------------------------------------------------------------------------------ synthetic cases


def _grid_points(shape_kji, spacing, origin):
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    return np.stack([i, j, k], -1).reshape(-1, 3).astype(float) * spacing + origin


def _content(p, c, axes):
    u = (p - c) / axes
    gland = (np.sum(u ** 2, 1) <= 1).astype(np.float32)
    # an off-centre nodule makes rotations visible, not only translations
    nodule = (np.sum(((p - c - [5.0, -3.0, 2.0]) / 3.5) ** 2, 1) <= 1).astype(np.float32)
    return gland, gland * 0.6 + nodule * 0.4


def synthetic_case(seed: int) -> Case:
    """Fixed: MRI-like + gland label on a non-square grid; moving: the same anatomy under a random rigid
    truth (±8 mm, ±10°), with noise, on its own grid. 200 analytic surface points."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-5, 5, 3)
    axes = rng.uniform([10, 8, 9], [13, 10, 11])
    spacing_f, shape_f = np.array([1.6, 1.8, 2.5]), (14, 22, 22)
    origin_f = c - spacing_f * (np.array(shape_f[::-1]) - 1) / 2
    label, mri = _content(_grid_points(shape_f, spacing_f, origin_f), c, axes)
    T = geometry.params_to_matrix(np.r_[rng.uniform(-8, 8, 3), rng.uniform(-10, 10, 3)], "xyz", degrees=True)
    spacing_m, shape_m = np.array([1.5, 1.5, 1.5]), (30, 30, 30)
    origin_m = geometry.apply_transform(T, c) - spacing_m * (np.array(shape_m[::-1]) - 1) / 2
    pm = _grid_points(shape_m, spacing_m, origin_m)
    _, us = _content(geometry.apply_transform(geometry.invert_rigid(T), pm), c, axes)
    us = us + 0.1 * rng.standard_normal(us.shape).astype(np.float32)
    n = 200
    z = 1 - 2 * (np.arange(n) + 0.5) / n
    phi = np.pi * (1 + 5 ** 0.5) * np.arange(n)
    sphere = np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], 1)
    return Case(
        Volume(mri.reshape(shape_f), spacing_f, origin_f, np.eye(3)),
        Volume(label.reshape(shape_f).astype(np.uint8), spacing_f, origin_f, np.eye(3)),
        Volume(us.reshape(shape_m).astype(np.float32), spacing_m, origin_m, np.eye(3)),
        surface_fixed=c + sphere * axes,
        truth_fixed_to_moving=T,
        name=f"synthetic_{seed}",
    )


@pytest.fixture(scope="module")
def train_cases():
    return [synthetic_case(s) for s in range(4)]


@pytest.fixture(scope="module")
def val_cases():
    return [synthetic_case(100 + s) for s in range(2)]


def tiny_config(output_dir, stage=1, steps=100, **data):
    return {
        "method": "attention_reg",
        "name": f"attention_reg_test_stage{stage}",
        "output_dir": str(output_dir),
        "seed": 0,
        "device": "cpu",
        "data": {"stage": stage, "max_sre_mm": 10.0 if stage == 1 else 4.0, "val_perturbations": 6, **data},
        "model": {"preset": "tiny"},
        "schedule": {"steps": steps, "batch_size": 4, "lr": 2e-3, "lr_schedule": "constant", "warmup_steps": 0,
                     "log_every": 10, "validate_every": max(steps // 4, 1), "checkpoint_every": steps},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_cases, val_cases):
    out = tmp_path_factory.mktemp("attention_reg_stage1")
    result = train_attention_reg(tiny_config(out), train_cases=train_cases, val_cases=val_cases, resume=False,
                                 progress_bar=False)
    return result


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, train_cases, val_cases):
    out = tmp_path_factory.mktemp("attention_reg_stage2")
    return train_attention_reg(tiny_config(out, stage=2, steps=4), train_cases=train_cases, val_cases=val_cases,
                               resume=False, progress_bar=False)


# ------------------------------------------------------------------------------------------ options


def test_data_options_defaults_and_errors():
    d = data_options({})
    assert d["max_sre_mm"] == 20.0 and d["mode"] == "label" and d["centre"] == "centroid" and d["margin"] == 0.30
    assert data_options({"stage": 2})["max_sre_mm"] == 8.0
    assert data_options({"stage": 2, "max_sre_mm": 5})["max_sre_mm"] == 5.0
    for bad, match in [({"stage": 3}, "data.stage"), ({"mode": "mri"}, "data.mode"), ({"centre": "apex"}, "data.centre"),
                       ({"train_cases": 0}, "data.train_cases"), ({"volumes": 3}, "unknown key"),
                       ({"source": "folder", "train_dir": "/nonexistent"}, "data.train_dir")]:
        with pytest.raises(InputError, match=match):
            data_options(bad)


def test_wrong_method_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["method"] = "fima"
    with pytest.raises(InputError, match="attention_reg"):
        train_attention_reg(cfg)


# ------------------------------------------------------------------------------------------ samples


@pytest.mark.parametrize("centre", ["centroid", "corner"])
def test_samples_have_uniform_sre_and_exact_targets(train_cases, centre):
    d = data_options({"stage": 2, "centre": centre})
    rng = np.random.default_rng(3)
    sres = []
    for _ in range(12):
        s = draw_sample(train_cases, rng, d, TINY_SIZE)
        case = s["case"]
        assert s["x"].shape == (2, *TINY_SIZE) and s["x"].dtype == np.float32
        assert 0.0 <= s["sre_init_mm"] <= 8.0
        assert sre(s["T_init"], case.truth_fixed_to_moving, case.surface_fixed) == pytest.approx(s["sre_init_mm"], abs=1e-6)
        # the target correction maps T_init back to the truth exactly
        T_back = apply_correction(s["T_init"], s["target"], s["frame"])
        assert np.abs(T_back - case.truth_fixed_to_moving).max() < 1e-9
        sres.append(s["sre_init_mm"])
    assert np.ptp(sres) > 2.0  # spread over the range, not a constant


def test_corrected_input_is_aligned(train_cases):
    # After applying the exact target, the TRUS channel prepared through the truth matches the gland:
    # its correlation with the label channel is higher than through the perturbed transform.
    case = train_cases[0]
    d = data_options({"max_sre_mm": 10.0})
    s = draw_sample([case], np.random.default_rng(9), d, TINY_SIZE)
    aligned = prepare_input(case, case.truth_fixed_to_moving, size=TINY_SIZE).array
    corr = lambda a: np.corrcoef(a[0].ravel(), a[1].ravel())[0, 1]  # noqa: E731
    assert corr(aligned) > corr(s["x"]) or s["sre_init_mm"] < 1.0


def test_batches_depend_only_on_seed_rank_and_step(train_cases, val_cases, tmp_path):
    cfg = load_config(tiny_config(tmp_path))
    a = AttentionRegTask(train_cases, val_cases)
    b = AttentionRegTask(train_cases, val_cases)
    it_a = a.batches(cfg, 0, 1, 0)
    next(it_a)
    xa, ya = next(it_a)  # step 1
    xb, yb = next(b.batches(cfg, 0, 1, 1))  # a resumed run starting at step 1
    assert xa.shape == (4, 2, *TINY_SIZE) and ya.shape == (4, 6)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xr, _ = next(b.batches(cfg, 1, 2, 1))  # another rank draws other samples
    assert not torch.equal(xr, xa)


# ----------------------------------------------------------------------------------------- training


def test_training_beats_the_identity_predictor(trained):
    m, best = trained.metrics, trained.best_metrics
    # validation SRE after one corrected pass is below the initial SRE (the no-correction predictor),
    # well below at the best validation
    assert m["sre_mm"] < m["sre_initial_mm"], m
    assert best["sre_mm"] < 0.8 * best["sre_initial_mm"], best
    assert trained.card["metrics"]["sre_initial_mm"] == pytest.approx(m["sre_initial_mm"])
    assert trained.best_path is not None and trained.final_path.is_file()
    rows = trained.log_path.read_text().splitlines()
    assert rows[0].startswith("step,") and "val_sre_mm" in rows[0]


def test_card_says_method_stage_mode_and_input(trained, stage2):
    card = trained.card
    assert card["method"] == "attention_reg" and card["stage"] == 1 and card["mode"] == "label"
    assert card["input"]["size_dhw"] == list(TINY_SIZE) and card["input"]["margin"] == 0.30
    assert card["input"]["centre"] == "centroid" and "spacing_policy" in card["input"]
    assert card["configuration"]["attention"] is True and card["configuration"]["preset"] == "tiny"
    assert card["training"]["initial_sre_mm"] == [0.0, 10.0]
    assert card["training"]["train_cases"] == [f"synthetic_{s}" for s in range(4)]
    on_disk = json.loads(trained.final_path.with_name("final.card.json").read_text())
    assert on_disk["sha256"] == card["sha256"]
    assert stage2.card["stage"] == 2 and stage2.card["training"]["initial_sre_mm"] == [0.0, 4.0]


# ---------------------------------------------------------------------------------------- inference


def test_one_stage_equals_the_validation_computation(trained, val_cases):
    case = val_cases[0]
    T_init = geometry.params_to_matrix([3.0, -2.0, 1.0, 2.0, 0.0, -3.0]) @ case.truth_fixed_to_moving
    stage = load_stage(trained.final_path, device="cpu")
    T1 = load_cascade([trained.final_path], device="cpu").register(case, initial=T_init)
    # by hand: prepare through T_init, forward, compose in the correction frame
    prepared = prepare_input(case, T_init, mode="label", size=TINY_SIZE, margin=0.30)
    with torch.no_grad():
        p = stage.model(torch.from_numpy(prepared.array[None])).double().numpy()[0]
    expected = apply_correction(T_init, p, correction_frame_for(prepared, "centroid"))
    assert np.abs(T1 - expected).max() < 1e-9
    assert geometry.is_rigid(T1, atol=1e-9)


def test_cascade_runs_end_to_end_from_harness_checkpoints(trained, stage2, val_cases):
    case = val_cases[1]
    T_init = case.truth_fixed_to_moving @ geometry.params_to_matrix([4.0, 3.0, -2.0, 0.0, 3.0, 0.0])
    events = []
    cascade = load_cascade((trained.best_path, stage2.final_path), device="cpu")
    T, history, seconds = cascade.register(case, initial=T_init, progress=lambda f, m: events.append(f),
                                           return_stages=True)
    assert len(history) == 2 and len(seconds) == 2 and np.array_equal(T, history[-1])
    assert events[0] == 0.0 and events[-1] == 1.0
    T_api = register_attention(case, initial=T_init, checkpoints=(trained.best_path, stage2.final_path),
                               mode="label", device="cpu")
    assert np.abs(T_api - T).max() < 1e-9
    assert np.isfinite(sre(T, case.truth_fixed_to_moving, case.surface_fixed))
    # stage order and mode are checked
    with pytest.raises(InputError, match="stage 1 first"):
        load_cascade((stage2.final_path, trained.best_path), device="cpu")
    with pytest.raises(InputError, match="'label' mode"):
        register_attention(case, checkpoints=(trained.best_path,), mode="image", device="cpu")


def test_registry_default_and_missing_checkpoints(trained, stage2, val_cases, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", empty)
    monkeypatch.setenv(registry.ENV_VAR, str(empty))
    with pytest.raises(InputError, match="no shipped checkpoint exists.*train one"):
        register_attention(val_cases[0], device="cpu")
    models = tmp_path / "models"
    models.mkdir()
    for result, name in ((trained, "ar_stage1"), (stage2, "ar_stage2")):
        src = result.final_path
        shutil.copy(src, models / f"{name}.pt")
        shutil.copy(src.with_name("final.card.json"), models / f"{name}.card.json")
    monkeypatch.setenv(registry.ENV_VAR, str(models))
    assert [p.name for p in default_checkpoints("label")] == ["ar_stage1.pt", "ar_stage2.pt"]
    T = register_attention(val_cases[0], device="cpu")
    T_explicit = register_attention(val_cases[0], checkpoints=(models / "ar_stage1.pt", models / "ar_stage2.pt"),
                                    device="cpu")
    assert np.abs(T - T_explicit).max() < 1e-12
    with pytest.raises(InputError, match="'image' mode"):
        default_checkpoints("image")


def test_bad_checkpoints_and_inputs(trained, val_cases, tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_stage(tmp_path / "missing.pt")
    # a checkpoint of another method
    other = tmp_path / "other.pt"
    shutil.copy(trained.final_path, other)
    card = json.loads(trained.final_path.with_name("final.card.json").read_text())
    card["method"] = "fima"
    (tmp_path / "other.card.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="expected 'attention_reg'"):
        load_stage(other)
    with pytest.raises(InputError, match="mode"):
        register_attention(val_cases[0], checkpoints=(trained.final_path,), mode="mri")
    with pytest.raises(InputError, match="initial transform"):
        register_attention(val_cases[0], initial=np.diag([2.0, 1, 1, 1]), checkpoints=(trained.final_path,),
                           device="cpu")


@pytest.mark.gpu
def test_cascade_on_cuda_matches_cpu(trained, stage2, val_cases):
    case = val_cases[0]
    ckpts = (trained.best_path, stage2.final_path)
    T_cpu = register_attention(case, checkpoints=ckpts, device="cpu")
    T_gpu = register_attention(case, checkpoints=ckpts, device="cuda")
    assert np.abs(T_cpu - T_gpu).max() < 1e-3
