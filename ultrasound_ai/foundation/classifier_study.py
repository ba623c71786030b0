"""Classifier study: benign / malignant / normal with 20 % and 100 % of the labels, a pre-trained encoder
vs the same network from scratch, scored on held-out images whose appearance was never trained on.

Data are frozen simulator sets (bmode_sim, all three classes): breast images whose masses carry the
BI-RADS descriptors (lesion_model "birads"). The labelled pool (``train_seed``) and the validation set
that picks each run's best.pt (``val_seed``) draw their scanner settings per image from TRAIN_APPEARANCE,
the broad band real scanners span (bmode_sim.SCANNER_VARIATION); the test set (``test_seed``) draws them
from TEST_APPEARANCE, a fixed narrow setting (strong log compression, coarse point-spread function) that
no training run selects on. Both arms pool the tokens with the same attention-pooling head; the
pre-trained arm starts from CLASSIFIER_STUDY["pretrained"]: the shipped encoder with its masked image
modelling continued on unlabelled images across the training band (``pretrain_encoder`` builds it). The 20 % label set is a nested
seeded subset of the pool (datasets.label_subset). The independent family bmode_indep is never used for
training or selection.

Metrics: accuracy, and macro F1 (the unweighted mean over classes of 2 TP / (2 TP + FP + FN), a class
never predicted and never present scoring 0, as scikit-learn's zero_division=0).

Each cell is one training run in its own folder, so cells can run as separate processes (``train_cell``)
and an interrupted study resumes; ``evaluate_study`` only evaluates the finished ones.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation.bmode_sim import SCANNER_VARIATION

__all__ = ["TRAIN_APPEARANCE", "TEST_APPEARANCE", "CLASSIFIER_STUDY", "cell_name", "cell_config", "train_cell",
           "macro_f1", "confusion", "evaluate_study", "evaluate_checkpoint", "format_table", "ship", "encoder_config",
           "pretrain_encoder", "ship_encoder", "study_summary", "paired_difference", "fit_logistic", "linear_probe"]

# Scanner settings drawn per image (bmode_sim.APPEARANCE_KEYS). Training: the broad band real scanners span
# (bmode_sim.SCANNER_VARIATION). The held-out test keeps the fixed narrow setting it has had since the study
# began (strong compression, coarse PSF, the simulator's nominal gain, TGC, speckle and lesions), so the
# figures stay comparable; it now lies inside the training band for its two PSF widths and compression.
# Every set of the study shows the breast (BUSI's organ) and draws its masses with the BI-RADS descriptors
# (bmode_sim lesion_model "birads").
LESIONS = {"lesion_model": "birads", "organs": ["breast"]}
TRAIN_APPEARANCE = {**copy.deepcopy(SCANNER_VARIATION), **LESIONS}
TEST_APPEARANCE = {"dynamic_range_db": [54.0, 60.0], "psf_axial_mm": [0.32, 0.38], "psf_lateral_mm": [0.65, 0.8]}

CLASSIFIER_STUDY: dict = {
    "output_dir": "runs/classifier_study",
    "device": "auto",
    "preset": "tiny",
    # Both arms pool the final tokens with heads.AttentionPool: a lesion covers a few of the 64 patches,
    # and averaging it with the background tokens (USFM's mean pooling) dilutes its signal.
    "pooling": "attention",
    # The encoder the pre-trained arm starts from: encoder["name"], the shipped usfm_vit_tiny_pretrained
    # with its masked image modelling continued on unlabelled images drawn across the broad scanner band
    # (--pretrain-encoder builds it into <output_dir>/encoder/installed). A logistic probe of the attention-pooled
    # tokens on the validation images chose it over the shipped encoder (0.44 vs 0.37 accuracy with 200 labels).
    # Its images: the band with the simulator's default lesions and organs (it was built before the BI-RADS
    # masses); no label is used.
    "pretrained": "usfm_vit_tiny_pretrained_wide",
    "encoder": {"name": "usfm_vit_tiny_pretrained_wide", "init": "usfm_vit_tiny_pretrained", "train_seed": 1_100_000, "train_count": 4096, "val_seed": 150_000,
                "val_count": 32, "steps": 600, "batch_size": 16, "lr": 3e-4, "warmup_steps": 30,
                "appearance": copy.deepcopy(SCANNER_VARIATION)},
    "fractions": [0.2, 1.0],
    "seeds": [0],
    "train_seed": 20_000,
    "train_count": 1000,
    "val_seed": 120_000,
    "val_count": 300,
    "test_seed": 320_000,
    "test_count": 150,
    "indep_seed": 520_000,  # the independent family ultrasound_ai.validation.bmode_indep (validation only)
    "indep_count": 150,
    # The pre-trained arm fine-tunes in two stages (LP-FT, Kumar et al. 2022): `probe` trains the pooling
    # and head on the frozen encoder, then `schedule` fine-tunes everything from there with layer-wise lr
    # decay; a random head on pre-trained features otherwise pulls the encoder towards one class before it
    # learns anything (every earlier pre-trained cell answered one class). The scratch arm trains
    # probe + schedule steps in one stage at scratch_lr, no decay. The probe's steps and lr: a pooling head
    # on the encoder's cached tokens (batch 12, label seeds 0-4) reached 0.34 validation accuracy after 150 steps
    # at 1e-3, 0.44 after 300 at 3e-3 (0.42 after 600, 0.40 at 1e-2).
    "probe": {"steps": 300, "lr": 3e-3, "warmup_steps": 10},
    "layer_decay": 0.75,
    "scratch_lr": 1e-3,
    "schedule": {"steps": 300, "batch_size": 12, "lr": 3e-4, "warmup_steps": 20, "validate_every": 100,
                 "checkpoint_every": 50, "log_every": 10, "best_metric": "accuracy", "best_mode": "max"},
}

INITS = ("pretrained", "scratch")


PROBE = "probe"  # the linear-probe stage of the pre-trained arm (its own cell folder)


def cell_name(init: str, fraction: float, seed: int) -> str:
    return f"{init}_f{fraction:g}_s{seed}"


def encoder_source(s: Mapping) -> str:
    """What the pre-trained arm loads: the study's own encoder from <output_dir>/encoder/installed, or an
    installed model's name."""
    if s["pretrained"] == s["encoder"]["name"]:
        return str(Path(s["output_dir"]) / "encoder" / "installed" / f"{s['encoder']['name']}.pt")
    return str(s["pretrained"])


def _probe_steps(s: Mapping) -> int:
    return int((s.get("probe") or {}).get("steps", 0))


def cell_config(s: Mapping, init: str, fraction: float, seed: int, stage: str | None = None) -> dict:
    """Training config of one cell. The arms share data, network and batch; the pre-trained arm starts
    from encoder_source(s) and, when s["probe"] has steps, runs in two stages: stage PROBE (encoder frozen,
    its own folder), then the fine-tuning cell initialised from the probe's best.pt with layer-wise lr decay
    s["layer_decay"]. The scratch arm trains probe + schedule steps at s["scratch_lr"], no decay."""
    if init not in INITS:
        raise InputError(f"classifier study init: expected one of {list(INITS)}, got {init!r}")
    if stage not in (None, PROBE) or (stage == PROBE and (init != "pretrained" or not _probe_steps(s))):
        raise InputError(f"classifier study stage: {stage!r} is not a stage of the {init} arm")
    name = cell_name(init if stage is None else f"{init}-{stage}", fraction, seed)
    schedule = dict(s["schedule"])
    model = {"preset": s["preset"], "pretrained": encoder_source(s) if init == "pretrained" else None,
             "pooling": s["pooling"], "layer_decay": float(s["layer_decay"]) if init == "pretrained" else 1.0}
    if init == "scratch":
        schedule.update(steps=int(schedule["steps"]) + _probe_steps(s), lr=float(s.get("scratch_lr", schedule["lr"])))
    elif stage == PROBE:
        schedule.update(s["probe"])
        model.update(freeze_encoder=True, layer_decay=1.0)
    elif _probe_steps(s):
        model["init_from"] = str(Path(s["output_dir"]) / cell_name(f"{init}-{PROBE}", fraction, seed) / "best.pt")
    return {
        "method": "usfm", "name": f"usfm_cls_{name}", "output_dir": str(Path(s["output_dir"]) / name), "seed": int(seed),
        "device": s["device"], "model": model,
        "data": {"source": "simulate", "train_seed": s["train_seed"], "train_count": s["train_count"],
                 "val_seed": s["val_seed"], "val_count": s["val_count"], "classes": [0, 1, 2],
                 "appearance": copy.deepcopy(TRAIN_APPEARANCE), "label_fraction": float(fraction),
                 "label_seed": int(seed)},
        "schedule": schedule,
    }


def encoder_config(s: Mapping) -> dict:
    """Pre-training config of the study's encoder (see CLASSIFIER_STUDY["encoder"])."""
    e = s["encoder"]
    return {
        "method": "usfm", "name": str(s["encoder"]["name"]), "output_dir": str(Path(s["output_dir"]) / "encoder"),
        "seed": 0, "device": s["device"],
        "model": {"preset": s["preset"], "pretrained": e["init"]},
        "data": {"source": "simulate", "train_seed": int(e["train_seed"]), "train_count": int(e["train_count"]),
                 "val_seed": int(e["val_seed"]), "val_count": int(e["val_count"]), "classes": [0, 1, 2],
                 "appearance": copy.deepcopy(e.get("appearance", TRAIN_APPEARANCE))},
        "schedule": {"steps": int(e["steps"]), "batch_size": int(e["batch_size"]), "lr": float(e["lr"]),
                     "warmup_steps": int(e["warmup_steps"]), "validate_every": 100, "checkpoint_every": 50,
                     "log_every": 10, "best_metric": "loss", "best_mode": "min"},
    }


def pretrain_encoder(s: Mapping, progress_bar: bool | None = False):
    """Train (or resume) the study's encoder; returns the harness's TrainResult."""
    from ultrasound_ai.foundation.training import train_foundation

    return train_foundation(encoder_config(s), "pretrain", progress_bar=progress_bar)


def ship_encoder(s: Mapping, models_dir) -> dict:
    """Install the trained encoder run as models_dir/<s["encoder"]["name"]>.pt (float16) with its card."""
    from ultrasound_ai.models.checkpoint import load_checkpoint, save_checkpoint

    cfg = encoder_config(s)
    state, card = load_checkpoint(_best(Path(cfg["output_dir"])))
    tr = card.get("training") or {}
    e = s["encoder"]
    name = str(s["encoder"]["name"])
    appearance = cfg["data"]["appearance"]
    masses = "BI-RADS masses" if appearance.get("lesion_model") == "birads" else "the simulator's default lesions"
    card = {**card, "name": name, "default": False,
            "training_data": f"simulated B-mode images only (simulator usfm-bmode-1, {masses}, seeds 1000000 and "
                             f"{e['train_seed']}, no labels used; scanner settings randomised per image across "
                             "a broad band); not validated on patient data"}
    card["description"] = (
        f"USFM-style ViT-Tiny encoder (192 dim, 12 blocks, 3 heads, patch 16, 1 channel, 128 px at 0.3125 mm) "
        f"pre-trained by masked image modelling with the spatial-frequency dual mask (SimMIM decoder, L1 + focal "
        f"frequency loss): {e['init']} (500 steps on 2048 images at the simulator's nominal settings) continued "
        f"{tr.get('steps', e['steps'])} steps, batch {e['batch_size']}, lr {e['lr']}, on {e['train_count']} "
        f"unlabelled simulated images (seed {e['train_seed']}) whose scanner settings are drawn per image from "
        f"{json.dumps(appearance)} (bmode_sim.SCANNER_VARIATION: compression, PSF and focus, gain, TGC, "
        f"scatterer density, noise, lesion contrast and size). The encoder the classifier study fine-tunes from. Trained on "
        f"simulated images only: not validated on patient data. Stored as float16.")
    return save_checkpoint(state, Path(models_dir) / f"{name}.pt", card, fp16=True)


def settings(overrides: Mapping | None = None) -> dict:
    from ultrasound_ai.core.training_config import deep_merge

    return deep_merge(CLASSIFIER_STUDY, dict(overrides or {}))


def train_cell(s: Mapping, init: str, fraction: float, seed: int, progress_bar: bool | None = False):
    """Train (or resume) one cell, its probe stage first where it has one; returns the harness's
    TrainResult of the last stage."""
    from ultrasound_ai.foundation.training import train_foundation

    if init == "pretrained" and _probe_steps(s):
        train_foundation(cell_config(s, init, fraction, seed, PROBE), "classify", progress_bar=progress_bar)
    return train_foundation(cell_config(s, init, fraction, seed), "classify", progress_bar=progress_bar)


def confusion(truth: Sequence[int], pred: Sequence[int], k: int) -> np.ndarray:
    """[k, k] counts, rows = truth, columns = prediction."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (np.asarray(truth, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return m


def macro_f1(truth: Sequence[int], pred: Sequence[int], k: int) -> float:
    """Unweighted mean over the k classes of F1 = 2 TP / (2 TP + FP + FN) (0 where the denominator is 0)."""
    m = confusion(truth, pred, k)
    tp = np.diag(m).astype(np.float64)
    denom = 2 * tp + (m.sum(0) - tp) + (m.sum(1) - tp)
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(f1.mean())


def test_set(s: Mapping, size: int):
    from ultrasound_ai.foundation import datasets as ds

    return ds.simulated_set(s["test_seed"], s["test_count"], size, [0, 1, 2], {**TEST_APPEARANCE, **LESIONS})


def _test_arrays(s: Mapping):
    from ultrasound_ai.foundation import datasets as ds
    from ultrasound_ai.foundation.vit import vit_config

    size = vit_config(s["preset"]).img_size
    test = test_set(s, size)
    return np.stack([ds.to_model_input(t.image, size) for t in test]), np.array([t.label for t in test])


def _indep_arrays(s: Mapping):
    from ultrasound_ai.foundation import datasets as ds
    from ultrasound_ai.foundation.vit import vit_config
    from ultrasound_ai.validation.bmode_indep import generate_set

    images, labels = generate_set(s["indep_seed"], s["indep_count"], vit_config(s["preset"]).img_size)
    return ds.normalise(images), labels


def evaluate_checkpoint(pt, s: Mapping, arrays=None) -> dict:
    """Accuracy, macro F1 and the confusion matrix of one classifier on the held-out test set (each
    image is one model input: the simulated images are at the training pixel size and field)."""
    import torch

    from ultrasound_ai.foundation.inference import load_model

    x, truth = arrays if arrays is not None else _test_arrays(s)
    lm = load_model(pt, s["device"], "classify")
    with torch.no_grad():
        probs = torch.cat([lm.model(torch.from_numpy(x[i:i + 32]).unsqueeze(1).to(lm.device)).softmax(1).cpu()
                           for i in range(0, len(x), 32)]).numpy()
    pred = probs.argmax(1)
    train = lm.card.get("training", {})
    return {"checkpoint": str(pt), "accuracy": float((pred == truth).mean()), "macro_f1": macro_f1(truth, pred, 3),
            "confusion": confusion(truth, pred, 3).tolist(),
            "val_accuracy": (train.get("best_metrics") or {}).get("accuracy"), "best_step": train.get("best_step"),
            "steps": train.get("steps"), "labelled": (train.get("data") or {}).get("labelled", s["train_count"]),
            "wall_time_s": train.get("wall_time_s")}


def _best(folder: Path) -> Path:
    return folder / "best.pt" if (folder / "best.pt").is_file() else folder / "final.pt"


def evaluate_study(s: Mapping) -> dict:
    """Accuracy and macro F1 of every finished cell's best.pt on the held-out test set and on the
    independent family (keys indep_accuracy, indep_macro_f1)."""
    arrays, indep = _test_arrays(s), _indep_arrays(s)
    runs = []
    for fraction in s["fractions"]:
        for seed in s["seeds"]:
            for init in INITS:
                pt = _best(Path(s["output_dir"]) / cell_name(init, fraction, seed))
                if pt.is_file():
                    other = evaluate_checkpoint(pt, s, indep)
                    runs.append({"init": init, "fraction": fraction, "seed": seed, **evaluate_checkpoint(pt, s, arrays),
                                 "indep_accuracy": other["accuracy"], "indep_macro_f1": other["macro_f1"],
                                 "indep_confusion": other["confusion"]})
    return {"settings": dict(s), "runs": runs, "test_counts": np.bincount(arrays[1], minlength=3).tolist(),
            "indep_counts": np.bincount(indep[1], minlength=3).tolist()}


def study_summary(results: Mapping) -> dict:
    """{"<init>_f<fraction>": {"seeds", "heldout_macro_f1_mean", "indep_macro_f1_mean", ...}} over the
    finished cells of an evaluate_study result (the figures a model card quotes)."""
    out: dict = {}
    for r in results["runs"]:
        out.setdefault(f"{r['init']}_f{r['fraction']:g}", []).append(r)
    return {key: {"seeds": [r["seed"] for r in rs],
                  **{f"{p}{m}_mean": float(np.mean([r[p_key + m] for r in rs]))
                     for p, p_key in (("heldout_", ""), ("indep_", "indep_")) for m in ("accuracy", "macro_f1")}}
            for key, rs in out.items()}


def paired_difference(results: Mapping, fraction: float, metric: str = "macro_f1") -> dict | None:
    """Pre-trained minus scratch `metric` seed by seed (the same label subset), over the seeds where both arms
    are finished: {"seeds", "n", "ahead" (seeds where pre-trained is higher), "differences", "mean", "se"
    (sample standard deviation / sqrt(n); 0 for one pair)}; None when no seed has both."""
    arms = {init: {r["seed"]: r[metric] for r in results["runs"] if r["init"] == init and r["fraction"] == fraction}
            for init in INITS}
    seeds = sorted(set(arms["pretrained"]) & set(arms["scratch"]))
    if not seeds:
        return None
    d = np.array([arms["pretrained"][k] - arms["scratch"][k] for k in seeds])
    return {"seeds": seeds, "n": len(seeds), "ahead": int((d > 0).sum()), "differences": d.tolist(),
            "mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0}


def ship(run_folder, s: Mapping, name: str, models_dir, comparison=None, study: Mapping | None = None) -> dict:
    """Write a trained cell's best.pt as the installed model NAME.pt (float16) + NAME.card.json, its card
    holding the held-out accuracy and macro F1 (and, given `comparison` = {"init": folder}, those of the
    same-size model trained from scratch on the same labels and schedule; given `study`, an evaluate_study
    result, the per-arm means of the whole study)."""
    from ultrasound_ai.models.checkpoint import load_checkpoint, save_checkpoint

    pt = _best(Path(run_folder))
    state, card = load_checkpoint(pt)
    arrays = _test_arrays(s)
    held = evaluate_checkpoint(pt, s, arrays)
    metrics = dict(card.get("metrics") or {})
    metrics.update(heldout_accuracy=held["accuracy"], heldout_macro_f1=held["macro_f1"],
                   heldout_confusion=held["confusion"], heldout_images=int(len(arrays[1])),
                   heldout_seed=int(s["test_seed"]), heldout_appearance=TEST_APPEARANCE)
    indep_arrays = _indep_arrays(s)
    indep = evaluate_checkpoint(pt, s, indep_arrays)
    metrics.update(indep_family="bmode-indep-v1", indep_seed=int(s["indep_seed"]), indep_images=int(s["indep_count"]),
                   indep_accuracy=indep["accuracy"], indep_macro_f1=indep["macro_f1"])
    for label, folder in (comparison or {}).items():
        if not _best(Path(folder)).is_file():
            continue  # not trained (yet): nothing to compare with
        other = evaluate_checkpoint(_best(Path(folder)), s, arrays)
        metrics[f"{label}_heldout_accuracy"] = other["accuracy"]
        metrics[f"{label}_heldout_macro_f1"] = other["macro_f1"]
        other = evaluate_checkpoint(_best(Path(folder)), s, indep_arrays)
        metrics[f"{label}_indep_accuracy"] = other["accuracy"]
        metrics[f"{label}_indep_macro_f1"] = other["macro_f1"]
    study_text = ""
    if study is not None:
        metrics["label_study"] = summary = study_summary(study)
        pairs = [(f, summary.get(f"pretrained_f{f:g}"), summary.get(f"scratch_f{f:g}")) for f in s["fractions"]]
        study_text = " Label study (mean held-out macro F1, pre-trained vs from scratch, same labels and schedule): " + \
            "; ".join(f"{f * 100:g} % labels {p['heldout_macro_f1_mean']:.3f} vs {q['heldout_macro_f1_mean']:.3f} "
                      f"(seeds {p['seeds']})" for f, p, q in pairs if p and q) + "."
    total = ((card.get("training") or {}).get("config") or {}).get("schedule", {}).get("steps", held["steps"])
    card = {**card, "name": name, "metrics": metrics, "default": True,
            "training_data": f"simulated B-mode images only (simulator usfm-bmode-1, BI-RADS masses, {held['labelled']} labelled images, "
                             "scanner settings randomised per image across a broad band); not validated on patient "
                             "data"}
    card["description"] = (
        f"Benign / malignant / normal classification of B-mode images (BUSI's classes): the encoder "
        f"{_encoder_text(s)} (ViT-Tiny, 128 px at 0.3125 mm, 1 channel) + a linear head on the "
        f"{_pooled(s)} tokens, {_recipe_text(s, total)} (best.pt at step {held['best_step']}, chosen on validation "
        f"accuracy) on {held['labelled']} labelled simulated images "
        f"(scanner settings drawn per image from {json.dumps(TRAIN_APPEARANCE)}). Held-out test ({len(arrays[1])} "
        f"simulated images, seed {s['test_seed']}, a fixed setting {json.dumps(TEST_APPEARANCE)} never used for "
        f"training or selection): accuracy {held['accuracy']:.3f}, "
        f"macro F1 {held['macro_f1']:.3f}; independent family bmode-indep-v1 ({s['indep_count']} images): accuracy "
        f"{indep['accuracy']:.3f}, macro F1 {indep['macro_f1']:.3f}.{study_text} Trained on simulated images only: not "
        f"validated on patient data. "
        f"Stored as float16.")
    return save_checkpoint(state, Path(models_dir) / f"{name}.pt", card, fp16=True)


def fit_logistic(x: np.ndarray, y: np.ndarray, k: int, c: float = 1.0):
    """Multinomial logistic regression on standardised features (L2 penalty 1 / (2 C n), LBFGS); returns
    predict(x) -> class indices."""
    import torch

    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + (w ** 2).sum() / (2 * c * len(yt))
        loss.backward()
        return loss

    opt.step(closure)

    def predict(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (torch.tensor((z - mu) / sd, dtype=torch.float64) @ w + b).argmax(1).numpy()

    return predict


def linear_probe(s: Mapping, encoders: Mapping, fractions=(0.2, 1.0)) -> list[dict]:
    """How much class information an encoder's mean-pooled features hold before any fine-tuning: a
    logistic regression on them, fitted on the labelled training images (label seed 0) and scored on the
    validation images (the training distribution; never the held-out or independent sets).
    encoders: {label: installed name or .pt path, or None for a randomly initialised encoder}."""
    import torch

    from ultrasound_ai.foundation import datasets as ds
    from ultrasound_ai.foundation.heads import build_model
    from ultrasound_ai.foundation.training import load_pretrained_encoder
    from ultrasound_ai.foundation.vit import vit_config

    vit = vit_config(s["preset"])
    pool = ds.simulated_set(s["train_seed"], s["train_count"], vit.img_size, [0, 1, 2], TRAIN_APPEARANCE)
    val = ds.simulated_set(s["val_seed"], s["val_count"], vit.img_size, [0, 1, 2], TRAIN_APPEARANCE)

    def arrays(items):
        return (torch.from_numpy(np.stack([ds.to_model_input(it.image, vit.img_size) for it in items])).unsqueeze(1),
                np.array([it.label for it in items]))

    (xp, yp), (xv, yv) = arrays(pool), arrays(val)
    rows = []
    for label, name in encoders.items():
        torch.manual_seed(0)
        model = build_model({"task": "classify", "vit": vit.to_dict(), "num_classes": 3})
        if name:
            load_pretrained_encoder(model, name, vit)
        model.eval()
        with torch.no_grad():
            fp, fv = (torch.cat([model.encoder(x[i:i + 50]) for i in range(0, len(x), 50)]).numpy() for x in (xp, xv))
        for f in fractions:
            keep = ds.label_subset(np.arange(len(yp)), f, 0)
            predict = fit_logistic(fp[keep], yp[keep], 3)
            rows.append({"encoder": label, "fraction": f, "labelled": int(len(keep)),
                         "train_accuracy": float((predict(fp[keep]) == yp[keep]).mean()),
                         "val_accuracy": float((predict(fv) == yv).mean()),
                         "val_macro_f1": macro_f1(yv, predict(fv), 3)})
    return rows


def _encoder_text(s: Mapping) -> str:
    e = s["encoder"]
    if s["pretrained"] != e.get("name"):
        return f"the shipped {s['pretrained']} (masked image modelling on unlabelled simulated images; see its card)"
    lesions = "BI-RADS masses" if e.get("appearance", TRAIN_APPEARANCE).get("lesion_model") == "birads" else \
        "the simulator's default lesions and organs"
    return (f"{s['pretrained']}: the shipped {e['init']} with its masked image modelling continued for {e['steps']} "
            f"steps, batch {e['batch_size']}, lr {e['lr']}, on {e['train_count']} unlabelled simulated images drawn "
            f"across the same scanner band with {lesions} (seed {e['train_seed']}; no label used)")


def _recipe_text(s: Mapping, steps=None) -> str:
    """How the pre-trained arm is fine-tuned (LP-FT when s["probe"] has steps)."""
    sc = s["schedule"]
    ft = (f"{steps or sc['steps']} steps, batch {sc['batch_size']}, AdamW lr {sc['lr']}, cosine with "
          f"{sc['warmup_steps']} warm-up steps, layer decay {s['layer_decay']}")
    if not _probe_steps(s):
        return f"fine-tuned {ft}"
    p = s["probe"]
    return (f"fine-tuned in two stages (LP-FT): the pooling and head alone on the frozen encoder for {p['steps']} "
            f"steps (lr {p['lr']}, {p['warmup_steps']} warm-up), then everything from that model for {ft}")


def _pooled(s: Mapping) -> str:
    return "attention-pooled" if s.get("pooling") == "attention" else "mean-pooled"


def _paired_text(results: Mapping) -> str:
    """Seed-by-seed rows (validation accuracy that chose best.pt, held-out and independent macro F1 of both arms)
    and the paired pre-trained minus scratch differences of macro F1 (mean ± standard error, seeds ahead)."""
    rows = ["| labels | seed | pre-trained: val acc / held-out F1 / indep F1 | scratch: val acc / held-out F1 / indep F1 |",
            "|---|---|---|---|"]
    sums = []
    for f in results["settings"]["fractions"]:
        cells = {(r["init"], r["seed"]): r for r in results["runs"] if r["fraction"] == f}
        for k in sorted({seed for _, seed in cells}):
            arm = [cells.get((init, k)) for init in INITS]
            rows.append(f"| {f * 100:g} % | {k} | " + " | ".join(
                f"{r['val_accuracy']:.3f} / {r['macro_f1']:.3f} / {r['indep_macro_f1']:.3f}" if r else "not run"
                for r in arm) + " |")
        for metric, label in (("macro_f1", "held-out"), ("indep_macro_f1", "independent family")):
            p = paired_difference(results, f, metric)
            if p:
                sums.append(f"{f * 100:g} % {label} {p['mean']:+.3f} ± {p['se']:.3f}, pre-trained ahead on {p['ahead']} "
                            f"of {p['n']} seeds")
    return ("\n".join(rows) + "\n\nPaired by seed (the same labelled images), pre-trained minus scratch macro F1, "
            "mean ± standard error over the seeds where both arms ran: " + "; ".join(sums) + ".\n")


def format_table(results: Mapping) -> str:
    """Markdown table (mean ± std over seeds) with the data and schedule facts."""
    s = results["settings"]
    fr = s["fractions"]
    lines = ["| test set | encoder | " + " | ".join(f"accuracy @ {f * 100:g} % | macro F1 @ {f * 100:g} %" for f in fr)
             + " |", "|" + "---|" * (2 * len(fr) + 2)]
    for prefix, set_label in (("", "held-out settings (simulator)"), ("indep_", "independent family bmode-indep-v1")):
        for init, label in (("pretrained", f"pre-trained ({s['pretrained']}) + {_pooled(s)} head"),
                            ("scratch", f"same ViT-Tiny from scratch + {_pooled(s)} head")):
            cells = []
            for f in fr:
                rs = [r for r in results["runs"] if r["init"] == init and r["fraction"] == f]
                for key in ("accuracy", "macro_f1"):
                    v = [r[prefix + key] for r in rs]
                    cells.append((f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "")) if v else "not run")
            lines.append(f"| {set_label} | {label} | " + " | ".join(cells) + " |")
    n_lab = {f: max(1, int(np.ceil(f * s["train_count"] - 1e-9))) for f in fr}
    sc = s["schedule"]
    text = "\n".join(lines) + "\n\n" + _paired_text(results) + "\n"
    text += (f"Held-out test: {s['test_count']} simulated images (seed {s['test_seed']}, classes benign / malignant / "
             f"normal = {results['test_counts']}) drawn with the fixed scanner setting {json.dumps(TEST_APPEARANCE)} "
             "(the simulator's nominal gain, TGC and speckle; breast images with BI-RADS masses, as in training), never "
             "used for training or selection. "
             f"Training and validation images draw their settings per image from the broad band "
             f"{json.dumps(TRAIN_APPEARANCE)} (bmode_sim.SCANNER_VARIATION, what clinical scanners span; the held-out "
             "compression and PSF widths lie inside it). Labelled images: "
             + ", ".join(f"{n_lab[f]} at {f * 100:g} %" for f in fr)
             + f" (nested subsets of a pool of {s['train_count']}, seed {s['train_seed']}); seeds {s['seeds']}. "
             f"Pre-trained arm {_recipe_text(s)}. From scratch: {sc['steps'] + _probe_steps(s)} steps (the pre-trained "
             f"arm's stages together), batch {sc['batch_size']}, AdamW lr {s.get('scratch_lr', sc['lr'])}, cosine with "
             f"{sc['warmup_steps']} warm-up steps, no layer decay; in every run "
             f"best.pt chosen by accuracy on {s['val_count']} validation images (seed {s['val_seed']}, training "
             f"settings). ViT-Tiny at 128 px, both arms the same size. Encoder of the pre-trained arm: {_encoder_text(s)}. "
             "Independent family: "
             f"{s['indep_count']} images of ultrasound_ai.validation.bmode_indep (seed {s['indep_seed']}, classes "
             f"{results.get('indep_counts')}): convex-probe fans, echoes formed along beams and scan-converted, its "
             "own tissue and lesion shapes; written apart from the training simulator and never used for training or "
             "model selection. Chance: accuracy about 0.33, macro F1 about 0.33 (0.17 when one class is always "
             "predicted).\n")
    return text
