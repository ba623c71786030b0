"""Foundation model: simulator, data loaders and their errors, training through the harness, inference,
CLI and the label-efficiency study code (micro configs, tiny data)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ultrasound_ai.cli import main as cli_main
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation import datasets as ds
from ultrasound_ai.foundation.bmode_sim import CLASS_NAMES, simulate_bmode, write_busi_folder
from ultrasound_ai.foundation.heads import SegmentationModel
from ultrasound_ai.foundation.inference import load_model, otsu_largest_component, segment, segment_file
from ultrasound_ai.foundation.training import load_pretrained_encoder, task_for, train_foundation
from ultrasound_ai.foundation.vit import vit_config


def _png(path: Path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(arr, dtype=np.uint8)), str(path))


# ------------------------------------------------------------------------------------------ simulator


def test_simulator_is_seeded_and_has_ground_truth():
    a, b = simulate_bmode(7, 64), simulate_bmode(7, 64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, simulate_bmode(8, 64).image)
    assert a.image.dtype == np.float32 and 0 <= a.image.min() and a.image.max() <= 1
    normal = simulate_bmode(1, 64, label=2)
    assert normal.mask.sum() == 0 and normal.class_name == "normal"
    for label in (0, 1):
        s = simulate_bmode(3, (64, 80), label=label, organ="breast")
        assert s.image.shape == (64, 80) and s.mask.any() and s.class_name == CLASS_NAMES[label]
    # Malignant: hypoechoic lesion with shadowing -> the lesion is darker than its surroundings.
    m = simulate_bmode(11, 128, label=1, organ="liver")
    assert m.image[m.mask > 0].mean() < m.image[m.mask == 0].mean() - 0.05
    assert m.info["posterior"] == "shadowing"
    with pytest.raises(InputError, match="organ"):
        simulate_bmode(0, 32, organ="brain")


# ---------------------------------------------------------------------------------------------- data


def test_busi_layout_round_trip_merges_masks(tmp_path):
    info = write_busi_folder(tmp_path / "busi", 6, seed=1, size=32)
    assert sum(info["counts"].values()) == 6
    # A second mask of one image is merged (union).
    cls = next(c for c in ("benign", "malignant") if info["counts"][c])
    extra = np.zeros((32, 32), np.uint8)
    extra[:3, :3] = 255
    _png(tmp_path / "busi" / cls / f"{cls} (1)_mask_1.png", extra)
    items, names = ds.load_busi(tmp_path / "busi")
    assert names == sorted(n for n, c in info["counts"].items() if c) and len(items) == 6
    it = next(i for i in items if i.name.endswith(f"{cls} (1).png"))
    assert it.mask[:3, :3].all() and it.mask.max() == 1 and it.image.shape == (32, 32)
    assert all(0 <= i.image.min() and i.image.max() <= 1 for i in items)


def test_busi_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no class folders"):
        (tmp_path / "empty").mkdir()
        ds.load_busi(tmp_path / "empty")
    root = tmp_path / "b1"
    _png(root / "benign" / "benign (1).png", np.zeros((8, 8)))
    _png(root / "benign" / "benign (2)_mask.png", np.zeros((8, 8)))
    with pytest.raises(InputError, match=r"benign \(2\)_mask.png.*no image"):
        ds.load_busi(root)
    root = tmp_path / "b2"
    _png(root / "benign" / "benign (1).png", np.zeros((8, 8)))
    with pytest.raises(InputError, match=r"benign \(1\).png.*no mask"):
        ds.load_busi(root)
    assert ds.load_busi(root, require_masks=False)[0][0].mask is None  # fine for classification
    root = tmp_path / "b3"
    _png(root / "benign" / "benign (1).png", np.zeros((8, 8)))
    _png(root / "benign" / "benign (1)_mask.png", np.zeros((8, 9)))
    with pytest.raises(InputError, match=r"benign \(1\)_mask.png.*9x8"):
        ds.load_busi(root)


def test_image_folder_rgb_to_grey_nrrd_and_empty(tmp_path):
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 200
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "a.png"))
    img = ds.read_image(tmp_path / "a.png")
    assert img.shape == (6, 5) and img[0, 0] == pytest.approx(round(0.299 * 100 + 0.587 * 200) / 255)
    sitk.WriteImage(sitk.GetImageFromArray(np.linspace(-5, 5, 20).reshape(4, 5).astype(np.float32)),
                    str(tmp_path / "b.nrrd"))
    _png(tmp_path / "b_mask.png", np.zeros((4, 5)))
    files = ds.list_image_folder(tmp_path)
    assert [f.name for f in files] == ["a.png", "b.nrrd"]
    b = ds.read_image(tmp_path / "b.nrrd")
    assert b.min() == 0 and b.max() == 1
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="empty"):
        ds.list_image_folder(tmp_path / "none")


def test_camus_layout(tmp_path):
    for view in ("2CH_ED", "4CH_ES"):
        img = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (20, 16)).astype(np.uint8))
        img.SetSpacing((0.3, 0.15))
        gt = np.zeros((20, 16), np.uint8)
        gt[5:10, 4:8], gt[10:14, 4:8] = 1, 3
        (tmp_path / "patient0001").mkdir(exist_ok=True)
        sitk.WriteImage(img, str(tmp_path / "patient0001" / f"patient0001_{view}.mhd"))
        sitk.WriteImage(sitk.GetImageFromArray(gt), str(tmp_path / "patient0001" / f"patient0001_{view}_gt.mhd"))
    items = ds.load_camus(tmp_path)
    assert len(items) == 2 and set(np.unique(items[0].mask)) == {0, 1, 3}
    (tmp_path / "patient0001" / "patient0001_4CH_ES.mhd").unlink()
    with pytest.raises(InputError, match="4CH_ES_gt.mhd: no image"):
        ds.load_camus(tmp_path)


def test_resize_splits_and_nested_label_subsets():
    m = np.zeros((10, 20), np.uint8)
    m[2:5, 3:9] = 2
    r = ds.resize_mask(m, (20, 40))
    assert set(np.unique(r)) == {0, 2} and (r == 2).sum() == 4 * (m == 2).sum()
    assert ds.resize_image(np.ones((10, 20)), 8).shape == (8, 8)
    parts = ds.fixed_split(50, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(50)) and [len(p) for p in parts] == [35, 5, 10]
    assert all(np.array_equal(a, b) for a, b in zip(parts, ds.fixed_split(50, seed=3)))
    sub10 = set(ds.label_subset(parts[0], 0.1, 1).tolist())
    sub50 = set(ds.label_subset(parts[0], 0.5, 1).tolist())
    assert len(sub10) == 4 and len(sub50) == 18 and sub10 <= sub50 <= set(parts[0].tolist())
    with pytest.raises(InputError):
        ds.label_subset(parts[0], 0.0, 1)


# ------------------------------------------------------------------------------------------ training

MICRO = {"preset": "micro"}
SCHED = {"batch_size": 8, "warmup_steps": 3, "log_every": 5, "checkpoint_every": 100}


pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("usfm")
    pre = train_foundation({"output_dir": str(root / "pre"), "device": "cpu", "model": MICRO,
                            "data": {"train_count": 48, "val_count": 8, "masking": {"mask_patch_size": 8}},
                            "schedule": {**SCHED, "steps": 30, "validate_every": 30}}, "pretrain", progress_bar=False)
    seg = train_foundation({"output_dir": str(root / "seg"), "device": "cpu",
                            "model": {**MICRO, "head_channels": 16, "pretrained": str(pre.final_path)},
                            "data": {"train_count": 48, "val_count": 12},
                            "schedule": {**SCHED, "steps": 60, "validate_every": 30, "lr": 1e-3}},
                           "segment", progress_bar=False)
    return {"root": root, "pre": pre, "seg": seg}


def _log(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_pretraining_lowers_reconstruction_loss(runs):
    rows = _log(runs["pre"].log_path)
    first, last = float(rows[0]["val_loss"]), float(rows[-1]["val_loss"])
    assert last < 0.85 * first
    assert float(rows[-1]["val_l1"]) < float(rows[0]["val_l1"])
    card = runs["pre"].card
    assert card["method"] == "usfm" and card["configuration"]["task"] == "pretrain"
    assert card["training"]["data"]["simulator_version"] == "usfm-bmode-1"


def test_segmentation_beats_trivial_predictor(runs):
    # All-background prediction scores Dice 0 on lesion images (micro ViT, 32 px, 60 steps).
    assert runs["seg"].best_metrics["dice"] > 0.15
    assert runs["seg"].card["training"]["pretrained"] == str(runs["pre"].final_path)


def test_layer_wise_lr_decay_and_no_decay_groups(runs):
    from ultrasound_ai.core.training import load_config
    from ultrasound_ai.foundation.training import default_config

    task = task_for("segment", data={"train": None, "class_names": []})
    model = SegmentationModel(vit_config("micro"), 2, 16)
    # From scratch: no layer decay by default.
    cfg = load_config({"output_dir": "x", "model": MICRO}, defaults=default_config("segment"))
    lr = cfg.schedule["lr"]
    assert all(g["lr"] == pytest.approx(lr) for g in task.parameter_groups(model, cfg))
    # From a pre-trained encoder: 0.65 per block (parameter_groups does not read the file).
    cfg = load_config({"output_dir": "x", "model": {**MICRO, "pretrained": "pre.pt"}},
                      defaults=default_config("segment"))
    groups = task.parameter_groups(model, cfg)
    by_param = {id(p): g for g in groups for p in g["params"]}
    depth = 4
    assert by_param[id(model.encoder.patch_embed.weight)]["lr"] == pytest.approx(lr * 0.65 ** (depth + 1))
    assert by_param[id(model.encoder.blocks[3].mlp[0].weight)]["lr"] == pytest.approx(lr * 0.65)
    assert by_param[id(model.head.classifier.weight)]["lr"] == pytest.approx(lr)
    assert by_param[id(model.encoder.blocks[0].gamma1)]["weight_decay"] == 0.0
    assert by_param[id(model.encoder.blocks[0].rel_pos_bias.table)]["weight_decay"] == 0.0
    assert by_param[id(model.encoder.blocks[0].attn.qkv.weight)]["weight_decay"] == 0.05


def test_pretrained_encoder_must_match_the_vit_config(runs):
    other = SegmentationModel(vit_config("micro", embed_dim=48, num_heads=2), 2, 16)
    with pytest.raises(InputError, match="ViT configuration"):
        load_pretrained_encoder(other, runs["pre"].final_path, other.encoder.cfg)
    same = SegmentationModel(vit_config("micro"), 2, 16)
    load_pretrained_encoder(same, runs["pre"].final_path, same.encoder.cfg)
    state = torch.load(runs["pre"].final_path, weights_only=True)
    torch.testing.assert_close(same.encoder.patch_embed.weight, state["encoder.patch_embed.weight"])


def test_pretrained_encoder_by_installed_name(runs, monkeypatch):
    from ultrasound_ai.models.registry import ENV_VAR, find_model

    monkeypatch.setenv(ENV_VAR, str(runs["pre"].final_path.parent))
    name = runs["pre"].card["name"]
    model = SegmentationModel(vit_config("micro"), 2, 16)
    assert load_pretrained_encoder(model, name, model.encoder.cfg)["name"] == name
    state = torch.load(find_model(name), weights_only=True)
    torch.testing.assert_close(model.encoder.patch_embed.weight, state["encoder.patch_embed.weight"])


def test_inference_returns_masks_in_the_input_geometry(runs, tmp_path):
    lm = load_model(runs["seg"].final_path, "cpu", "segment")
    frames = (np.random.default_rng(0).random((3, 45, 70)) * 255).astype(np.uint8)
    labels, probs = segment(frames, lm)
    assert labels.shape == (3, 45, 70) and probs.shape == (3, 2, 45, 70)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    one, _ = segment(frames[1], lm)
    assert np.array_equal(one, labels[1])  # a frame alone = the same frame in a stack
    img = sitk.GetImageFromArray(frames[:1].astype(np.float32))
    img.SetSpacing((0.2, 0.3, 1.0))
    img.SetOrigin((5.0, -2.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    segment_file(tmp_path / "in.nrrd", tmp_path / "out.nrrd", lm, probabilities_path=tmp_path / "p.nrrd")
    out = sitk.ReadImage(str(tmp_path / "out.nrrd"))
    assert out.GetSize() == (70, 45, 1) and out.GetSpacing() == (0.2, 0.3, 1.0) and out.GetOrigin() == (5.0, -2.0, 1.0)
    with pytest.raises(InputError, match="segment"):
        load_model(runs["pre"].final_path, "cpu", "segment")


def test_otsu_baseline_finds_a_dark_blob():
    img = np.full((40, 40), 0.8)
    img[10:20, 15:30] = 0.1
    img[35:37, 0:3] = 0.1  # a smaller dark spot: not the largest component
    m = otsu_largest_component(img)
    assert m[12:18, 17:28].all() and not m[36, 1] and m.sum() < 250


def test_cli_simulate_train_evaluate_segment(tmp_path, runs):
    data = tmp_path / "busi"
    assert cli_main(["foundation", "simulate", "--output", str(data), "--count", "10", "--size", "32",
                     "--classes", "0,1", "--quiet"]) == 0
    assert any(data.glob("*/* (1)_mask.png"))
    assert cli_main(["foundation", "train", "--task", "segment", "--data", str(data), "--preset", "micro",
                     "--steps", "3", "--output", str(tmp_path / "run"), "--device", "cpu", "--batch-size", "2",
                     "--pretrained", str(runs["pre"].final_path), "--quiet"]) == 0
    card = json.loads((tmp_path / "run" / "final.card.json").read_text())
    assert card["training"]["data"]["source"] == "busi" and card["configuration"]["num_classes"] == 2
    img = next(data.glob("benign/*).png"), None) or next(data.glob("malignant/*).png"))
    assert cli_main(["foundation", "segment", str(img), "--model", str(runs["seg"].final_path),
                     "--output", str(tmp_path / "m.png"), "--device", "cpu"]) == 0
    m = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.png")))
    assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 255}
    assert cli_main(["foundation", "evaluate", "--model", str(runs["seg"].final_path), "--data", str(data),
                     "--all", "--device", "cpu"]) == 0
    # Bad input -> exit code 2 with a message, no traceback.
    (tmp_path / "empty").mkdir()
    assert cli_main(["foundation", "pretrain", "--data", str(tmp_path / "empty"), "--preset", "micro",
                     "--output", str(tmp_path / "r2"), "--steps", "1", "--quiet"]) == 2


def test_label_efficiency_study_tiny_setting(tmp_path):
    from ultrasound_ai.foundation.study import QUICK_SETTINGS, format_table, run_study

    settings = {**QUICK_SETTINGS, "output_dir": str(tmp_path / "study"), "device": "cpu",
                "pretrain": {**QUICK_SETTINGS["pretrain"], "steps": 2},
                "finetune": {**QUICK_SETTINGS["finetune"], "steps": 2, "validate_every": 2}}
    res = run_study(settings)
    assert len(res["runs"]) == 2 * 3 * 2
    assert {r["labelled_images"] for r in res["runs"]} == {6, 12}
    assert set(res["table"]) == {"pretrained@0.5", "scratch@0.5", "pretrained@1", "scratch@1"}
    assert all(res["table"][k]["n"] == 3 for k in res["table"])
    assert 0.0 <= res["otsu"]["dice"] <= 1.0
    text = format_table(res)
    assert "Otsu + largest component" in text and "50 % labels" in text
    assert json.loads((tmp_path / "study" / "results.json").read_text())["table"] == res["table"]
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from report import write_section

    write_section("label_efficiency", "t", text, path=tmp_path / "B.md", command="test")
    assert "<!-- BEGIN label_efficiency:cpu -->" in (tmp_path / "B.md").read_text()


def test_study_with_a_given_encoder_reports_its_card_and_keeps_arms_equal(tmp_path, runs):
    from ultrasound_ai.foundation.study import QUICK_SETTINGS, cell_config, format_table, run_study, study_settings

    s = study_settings({**QUICK_SETTINGS, "output_dir": str(tmp_path / "study"), "device": "cpu",
                        "fractions": [1.0], "pretrained": str(runs["pre"].final_path),
                        "finetune": {**QUICK_SETTINGS["finetune"], "steps": 2, "validate_every": 2}})
    a, b = (cell_config(s, 1.0, 0, init, s["pretrained"]) for init in ("pretrained", "scratch"))
    assert a["model"].pop("pretrained") == s["pretrained"] and b["model"].pop("pretrained") is None
    assert {k: v for k, v in a.items() if k not in ("name", "output_dir")} == \
        {k: v for k, v in b.items() if k not in ("name", "output_dir")}
    res = run_study(s)
    pre = res["pretrain"]
    assert pre["steps"] == 30 and pre["batch_size"] == 8 and pre["data"]["train_count"] == 48
    assert not (tmp_path / "study" / "pretrain").exists()  # nothing pre-trained again
    assert "30 steps, batch 8, on 48 unlabelled images" in format_table(res)


def test_torchrun_ddp_pretraining_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    from ultrasound_ai.core.training import torchrun_command

    cfg = {"method": "usfm", "output_dir": str(tmp_path / "ddp"), "device": "cpu", "model": MICRO,
           "data": {"train_count": 8, "val_count": 2, "masking": {"mask_patch_size": 8}},
           "schedule": {"steps": 2, "batch_size": 2, "validate_every": 2, "checkpoint_every": 2, "log_every": 1,
                        "best_metric": "loss"}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    cmd = torchrun_command(tmp_path / "c.json", "ultrasound_ai.foundation.training:PretrainTask", 2,
                           python=sys.executable)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((tmp_path / "ddp" / "final.card.json").read_text())
    assert card["training"]["world_size"] == 2 and card["configuration"]["task"] == "pretrain"
