"""Label-efficiency study (issue 8, item 5): lesion segmentation Dice with 10, 20, 50 and 100 % of the
labels, a pre-trained encoder vs one trained from scratch, at least 3 seeds per cell, and a classical row
(Otsu threshold + largest connected component).

Data are frozen simulator sets (bmode_sim, lesion classes only): the labelled pool (``train_seed``), the
validation set that picks each run's best.pt (``val_seed``) and the test set (``test_seed``) are disjoint
seeded data sets; the pre-training pool (``pretrain.train_seed``) is another one, with all classes and no
labels used. The label subsets are nested (datasets.label_subset): for one seed, the 10 % set is inside
the 20 % set, and so on. Seed s fixes both the label subset and the fine-tuning run.

Every run goes through the training harness into its own folder, so an interrupted study resumes where it
stopped (finished runs are only re-evaluated). Both arms share data, label subset, seed and schedule; only the
encoder's start differs (and with it the default layer-wise lr decay: 0.65 pre-trained, none from scratch).
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["STUDY_DEFAULTS", "QUICK_SETTINGS", "study_settings", "run_study", "format_table", "check_claims",
           "cell_config", "given_pretraining_facts"]

STUDY_DEFAULTS: dict = {
    "output_dir": "runs/label_efficiency",
    "device": "auto",
    "preset": "tiny",
    "fractions": [0.1, 0.2, 0.5, 1.0],
    "seeds": [0, 1, 2],
    "train_seed": 0,
    "train_count": 200,  # labelled pool at 100 %
    "val_seed": 100_000,
    "val_count": 32,
    "test_seed": 300_000,
    "test_count": 100,
    "pretrained": None,  # an existing usfm checkpoint; otherwise pre-trained here
    "pretrain": {"train_seed": 1_000_000, "train_count": 2048, "steps": 4000, "batch_size": 32, "lr": 5e-4,
                 "warmup_steps": 200, "masking": {}},
    "finetune": {"steps": 600, "batch_size": 8, "lr": 5e-4, "warmup_steps": 50, "validate_every": 100,
                 "head_channels": 64},
}

# A setting small enough for a test (micro ViT, 32 px, a few steps); its numbers mean nothing.
QUICK_SETTINGS: dict = {
    "preset": "micro",
    "fractions": [0.5, 1.0],
    "seeds": [0, 1, 2],
    "train_count": 12,
    "val_count": 4,
    "test_count": 6,
    "pretrain": {"train_count": 32, "steps": 6, "batch_size": 4, "warmup_steps": 1, "masking": {"mask_patch_size": 8}},
    "finetune": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "validate_every": 4, "head_channels": 8},
}


def study_settings(overrides: Mapping | None = None) -> dict:
    from ultrasound_ai.core.training_config import deep_merge

    s = deep_merge(STUDY_DEFAULTS, dict(overrides or {}))
    if not s["seeds"] or len(set(s["seeds"])) != len(s["seeds"]):
        raise InputError(f"study seeds: expected distinct seeds, got {s['seeds']}")
    for f in s["fractions"]:
        if not 0 < f <= 1:
            raise InputError(f"study fractions: expected numbers in (0, 1], got {s['fractions']}")
    return s


def _schedule(part: Mapping, best_metric: str, best_mode: str) -> dict:
    return {"steps": int(part["steps"]), "batch_size": int(part["batch_size"]), "lr": float(part["lr"]),
            "warmup_steps": int(part["warmup_steps"]), "validate_every": int(part.get("validate_every", part["steps"])),
            "checkpoint_every": int(part.get("validate_every", part["steps"])), "log_every": 10,
            "best_metric": best_metric, "best_mode": best_mode}


def cell_config(s: Mapping, fraction: float, seed: int, init: str, pretrained: str | None) -> dict:
    """The fine-tuning config of one study cell (init: "pretrained" or "scratch"); both arms differ only
    in model.pretrained, so they share data, label subset, seed and schedule."""
    f = s["finetune"]
    out = Path(s["output_dir"])
    return {
        "method": "usfm", "name": f"usfm_study_{init}_f{fraction:g}_s{seed}",
        "output_dir": str(out / f"{init}_f{fraction:g}_s{seed}"), "seed": int(seed), "device": s["device"],
        "model": {"preset": s["preset"], "head_channels": int(f["head_channels"]),
                  "pretrained": str(pretrained) if init == "pretrained" else None},
        "data": {"source": "simulate", "train_seed": s["train_seed"], "train_count": s["train_count"],
                 "val_seed": s["val_seed"], "val_count": s["val_count"], "classes": [0, 1],
                 "label_fraction": float(fraction), "label_seed": int(seed)},
        "schedule": _schedule(f, "dice", "max"),
    }


def given_pretraining_facts(path) -> dict:
    """Pre-training facts of a given checkpoint, read from its card (steps, batch, wall time, data)."""
    from ultrasound_ai.models.checkpoint import read_card
    from ultrasound_ai.models.registry import find_model

    card = read_card(find_model(path))
    tr = card.get("training") or {}
    sched = (tr.get("config") or {}).get("schedule") or {}
    facts = {"given": str(path), "name": card.get("name"), "steps": tr.get("steps"),
             "batch_size": sched.get("batch_size"), "wall_time_s": tr.get("wall_time_s"),
             "val_loss": (tr.get("final_metrics") or {}).get("loss"), "data": tr.get("data") or {}}
    if facts["steps"] and facts["wall_time_s"]:
        facts["s_per_step"] = float(facts["wall_time_s"]) / int(facts["steps"])
    return facts


def _pretrain(s: dict, out: Path, progress_bar) -> tuple[str, dict]:
    from ultrasound_ai.foundation.training import train_foundation

    p = s["pretrain"]
    cfg = {
        "method": "usfm", "name": "usfm_study_pretrain", "output_dir": str(out / "pretrain"), "seed": 0,
        "device": s["device"], "model": {"preset": s["preset"]},
        "data": {"source": "simulate", "train_seed": p["train_seed"], "train_count": p["train_count"],
                 "val_seed": s["val_seed"] + 50_000, "val_count": s["val_count"], "classes": [0, 1, 2],
                 "masking": dict(p.get("masking") or {})},
        "schedule": _schedule({**p, "validate_every": max(1, p["steps"] // 4)}, "loss", "min"),
    }
    t0 = time.monotonic()
    res = train_foundation(cfg, "pretrain", progress_bar=progress_bar)
    wall = res.card.get("training", {}).get("wall_time_s", time.monotonic() - t0)
    return str(res.final_path), {"steps": res.steps, "batch_size": int(p["batch_size"]), "wall_time_s": wall,
                                 "s_per_step": wall / max(1, res.steps), "val_loss": res.metrics.get("loss"),
                                 "data": {"train_seed": p["train_seed"], "train_count": p["train_count"]}}


def run_study(settings: Mapping | None = None, *, progress: Callable[[float, str], None] | None = None,
              progress_bar: bool | None = False) -> dict:
    """Run every cell (fraction x seed x {pretrained, scratch}) and the Otsu row; returns the results
    (also written to OUTPUT/results.json)."""
    from ultrasound_ai.core.atomic import atomic_output
    from ultrasound_ai.foundation import datasets as ds
    from ultrasound_ai.foundation.inference import evaluate_segmentation, load_model, otsu_largest_component, segment
    from ultrasound_ai.foundation.training import train_foundation
    from ultrasound_ai.foundation.vit import vit_config

    s = study_settings(settings)
    out = Path(s["output_dir"])
    size = vit_config(s["preset"]).img_size
    test = ds.simulated_set(s["test_seed"], s["test_count"], size, [0, 1])
    test_images, test_masks = [t.image for t in test], [t.mask for t in test]

    otsu = evaluate_segmentation(otsu_largest_component, test_images, test_masks)
    pretrained, pre_facts = s["pretrained"], None
    if pretrained:
        pre_facts = given_pretraining_facts(pretrained)
    else:
        pretrained, pre_facts = _pretrain(s, out, progress_bar)

    cells = list(itertools.product(s["fractions"], s["seeds"], ("pretrained", "scratch")))
    runs = []
    for n, (fraction, seed, init) in enumerate(cells):
        cfg = cell_config(s, fraction, seed, init, pretrained)
        res = train_foundation(cfg, "segment", progress_bar=progress_bar)
        lm = load_model(res.best_path or res.final_path, s["device"], "segment")
        score = evaluate_segmentation(lambda im: segment(im, lm)[0], test_images, test_masks)
        wall = res.card.get("training", {}).get("wall_time_s", float("nan"))
        runs.append({"fraction": fraction, "seed": seed, "init": init, "test_dice": score["dice"],
                     "val_dice": res.best_metrics.get("dice"), "best_step": res.best_step,
                     "labelled_images": max(1, int(np.ceil(fraction * s["train_count"] - 1e-9))),
                     "wall_time_s": wall, "s_per_step": wall / max(1, res.steps)})
        if progress is not None:
            progress((n + 1) / len(cells), f"{init} {fraction:g} seed {seed}: Dice {score['dice']:.3f}")

    table = {}
    for fraction in s["fractions"]:
        for init in ("pretrained", "scratch"):
            vals = [r["test_dice"] for r in runs if r["fraction"] == fraction and r["init"] == init]
            table[f"{init}@{fraction:g}"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
    results = {"settings": s, "otsu": {"dice": otsu["dice"], "dice_std": otsu["dice_std"]}, "pretrain": pre_facts,
               "runs": runs, "table": table, "image_size_px": size,
               "simulator_version": __import__("ultrasound_ai.foundation.bmode_sim", fromlist=["x"]).SIMULATOR_VERSION}
    results["claims"] = check_claims(results)
    with atomic_output(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return results


def check_claims(results: Mapping) -> dict:
    """The issue's two acceptance claims, evaluated on the results (reported, never forced)."""
    s, t = results["settings"], results["table"]
    full = max(s["fractions"])
    low = [f for f in s["fractions"] if f <= 0.2] or [min(s["fractions"])]
    return {
        "scratch_full_beats_otsu_by_0.05": bool(t[f"scratch@{full:g}"]["mean"] >= results["otsu"]["dice"] + 0.05),
        "pretrained_beats_scratch_at_low_labels": {f"{f:g}": bool(t[f"pretrained@{f:g}"]["mean"] > t[f"scratch@{f:g}"]["mean"])
                                                   for f in low},
    }


def format_table(results: Mapping) -> str:
    """Markdown: the Dice table (mean ± std over seeds) with the Otsu row, the setting and the claims."""
    s = results["settings"]
    fr = s["fractions"]
    header = "| method | " + " | ".join(f"{f * 100:g} % labels" for f in fr) + " |"
    lines = [header, "|" + "---|" * (len(fr) + 1)]
    for init, label in (("pretrained", "ViT pre-trained (dual masking MIM) + UPerNet"),
                        ("scratch", "ViT from scratch + UPerNet")):
        cells = [f"{results['table'][f'{init}@{f:g}']['mean']:.3f} ± {results['table'][f'{init}@{f:g}']['std']:.3f}"
                 for f in fr]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    o = results["otsu"]["dice"]
    lines.append("| Otsu + largest component (no labels) | " + " | ".join(f"{o:.3f}" for _ in fr) + " |")
    n_lab = {f: max(1, int(np.ceil(f * s["train_count"] - 1e-9))) for f in fr}
    pre = results.get("pretrain") or {}
    pdata = pre.get("data") or {}
    sps = [r["s_per_step"] for r in results["runs"] if np.isfinite(r.get("s_per_step", np.nan))]
    text = "\n".join(lines) + "\n\n"
    text += (f"Test Dice of the lesion (mean ± std over seeds {s['seeds']}) on {s['test_count']} simulated lesion "
             f"images (simulator {results['simulator_version']}, test seed {s['test_seed']}); ViT-{s['preset']} at "
             f"{results['image_size_px']} px. Labelled images per column: "
             + ", ".join(f"{n_lab[f]}" for f in fr) + f" (nested subsets of a pool of {s['train_count']}, seed "
             f"{s['train_seed']}). Fine-tuning: {s['finetune']['steps']} steps, batch {s['finetune']['batch_size']}, "
             f"AdamW lr {s['finetune']['lr']}, layer decay 0.65 for the pre-trained encoder and none from scratch; "
             f"best.pt chosen on {s['val_count']} validation images. "
             f"Pre-training{' (' + str(pre['name']) + ')' if pre.get('name') else ''}: {pre.get('steps', '?')} steps, "
             f"batch {pre.get('batch_size', '?')}, on {pdata.get('train_count', '?')} unlabelled images "
             f"(seed {pdata.get('train_seed', '?')})")
    if "s_per_step" in pre:
        text += f", {pre['s_per_step']:.3f} s/step"
    if sps:
        text += f"; fine-tuning {np.mean(sps):.3f} s/step"
    text += ".\n\n"
    c = results.get("claims") or check_claims(results)
    text += (f"Claims: from scratch at 100 % beats Otsu by ≥ 0.05 Dice: {'yes' if c['scratch_full_beats_otsu_by_0.05'] else 'no'}; "
             "pre-trained above from scratch at low label fractions: "
             + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in c["pretrained_beats_scratch_at_low_labels"].items())
             + ".\n")
    return text


def _copy(d):
    return copy.deepcopy(d)
