"""Training the foundation model through the shared harness (``ultrasound_ai.core.training``).

Three TrainingTasks share one data layer:

* ``PretrainTask`` -- masked image modelling: dual-masked input (masking.dual_mask, eq. 7), SimMIM decoder,
  loss L1 + lambda * focal frequency loss (losses.mim_loss). Validation: the same loss on fixed images
  with fixed masks (``loss``, the best.pt criterion, lower is better).
* ``SegmentTask`` -- encoder + UPerNet head, cross-entropy + soft Dice. Validation: mean foreground Dice
  on the validation images (``dice``, higher is better).
* ``ClassifyTask`` -- encoder + linear head on the mean-pooled tokens, cross-entropy. Validation:
  ``accuracy``.

Fine-tuning uses AdamW (weight decay 0.05, none on biases, norms, LayerScale and bias tables), a cosine
schedule with warm-up, and layer-wise lr decay (``model.layer_decay``, 0.65): block i of a depth-L encoder
learns at lr * decay^(L - i), the patch embedding at lr * decay^(L + 1), the head at lr. The decay defaults to
1.0 (none) when the encoder starts from random weights (pre-training, fine-tuning from scratch).
``model.pretrained: PATH`` loads the encoder of a checkpoint written by this module (any task), after
checking its card: method "usfm" and the same ViT architecture.

Data (``config.data``, see DATA_DEFAULTS): ``source`` is ``simulate`` (the built-in simulator, fixed
seeded pools), ``folder`` (images only: pre-training), ``busi`` or ``camus``. Folder data sets are split
once with ``split_seed`` into train/val/test (70/10/20 %); ``label_fraction`` keeps a nested seeded subset
of the training labels (label-efficiency studies). Everything is resized to the model's input size once
and cached per process. The batch of step s is drawn from ``step_generator(seed, rank, s)``: indices into
the training pool, a horizontal flip, and (pre-training) the masks.

Run: ``train_foundation(config, "segment")``, ``ultrasound-ai foundation train --task segment``, or
``python -m torch.distributed.run --nproc_per_node=N -m ultrasound_ai.core.training CONFIG --task
ultrasound_ai.foundation.training:PretrainTask``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.training import TrainConfig, TrainResult, load_config, step_generator, train
from ultrasound_ai.foundation import datasets as ds
from ultrasound_ai.foundation.bmode_sim import CLASS_NAMES, SIMULATOR_VERSION
from ultrasound_ai.foundation.heads import build_model
from ultrasound_ai.foundation.losses import dice_per_class, mim_loss, segmentation_loss
from ultrasound_ai.foundation.masking import MaskingConfig, dual_mask
from ultrasound_ai.foundation.vit import ViTConfig, vit_config

__all__ = ["METHOD", "DATA_DEFAULTS", "MODEL_DEFAULTS", "default_config", "PretrainTask", "SegmentTask",
           "ClassifyTask", "task_for", "train_foundation", "data_options", "model_options", "load_pretrained_encoder",
           "load_whole_model",
           "prepared_data"]

METHOD = "usfm"

DATA_DEFAULTS: dict[str, Any] = {
    "source": "simulate",  # simulate | folder | busi | camus
    "root": None,  # folder / busi / camus: the data folder
    "train_seed": 0,  # simulate: training pool = simulator data set train_seed
    "train_count": 512,
    "val_seed": 100_000,
    "val_count": 32,
    "classes": None,  # simulate: class indices drawn (default: [0, 1] lesions for segment, all otherwise)
    "appearance": None,  # simulate: per-image scanner settings drawn from ranges (bmode_sim.APPEARANCE_KEYS)
    "split_seed": 0,  # folder data: the train/val/test split
    "split": [0.7, 0.1, 0.2],
    "label_fraction": 1.0,  # keep this fraction of the training labels (nested seeded subsets)
    "label_seed": 0,
    "flip": True,  # random horizontal flips
    "masking": {},  # MaskingConfig fields (pre-training)
    "freq_lambda": 1.0,  # weight of the focal frequency loss
    "freq_alpha": 1.0,
    "dice_weight": 1.0,  # segmentation: CE + dice_weight * soft Dice
}

MODEL_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",  # ViT preset; ViTConfig fields may be overridden here
    "head_channels": 64,
    "num_classes": None,  # default: 2 (segment; 4 for camus), the number of classes (classify)
    "dropout": 0.0,
    "pooling": "mean",  # classify: "mean" (USFM's mean-pooled tokens) or "attention" (heads.AttentionPool)
    "layer_decay": None,  # default 0.65 when fine-tuning a pre-trained encoder, else 1.0
    "pretrained": None,  # path of a usfm checkpoint whose encoder initialises the model
    # classify: a classification checkpoint of this module whose whole model (encoder, pooling, head)
    # initialises this one: the second stage of linear-probe-then-fine-tune (LP-FT)
    "init_from": None,
    # classify: train the pooling and head only, the encoder fixed (the linear-probe stage of LP-FT)
    "freeze_encoder": False,
}

_VIT_KEYS = {"img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
             "use_cls_token", "layerscale_init", "drop_path"}

_SCHEDULES = {
    "pretrain": {"steps": 20000, "batch_size": 32, "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.05,
                 "betas": [0.9, 0.999], "lr_schedule": "cosine", "warmup_steps": 500, "min_lr_ratio": 0.01,
                 "grad_clip": 3.0, "log_every": 20, "validate_every": 500, "checkpoint_every": 500,
                 "best_metric": "loss", "best_mode": "min"},
    "segment": {"steps": 3000, "batch_size": 8, "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.05,
                "betas": [0.9, 0.999], "lr_schedule": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.01,
                "grad_clip": 3.0, "log_every": 20, "validate_every": 250, "checkpoint_every": 250,
                "best_metric": "dice", "best_mode": "max"},
    "classify": {"steps": 3000, "batch_size": 16, "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.05,
                 "betas": [0.9, 0.999], "lr_schedule": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.01,
                 "grad_clip": 3.0, "log_every": 20, "validate_every": 250, "checkpoint_every": 250,
                 "best_metric": "accuracy", "best_mode": "max"},
}


def default_config(task: str) -> dict:
    """The default training config of a task (pretrain | segment | classify)."""
    if task not in _SCHEDULES:
        raise InputError(f"foundation task {task!r}: expected one of {list(_SCHEDULES)}")
    return {
        "method": METHOD,
        "name": f"usfm_tiny_{task}",
        "output_dir": f"runs/usfm_{task}",
        "seed": 0,
        "device": "auto",
        "data": {},
        "model": {"preset": "tiny"},
        "schedule": copy.deepcopy(_SCHEDULES[task]),
    }


# ------------------------------------------------------------------------------------------ options


def data_options(config: TrainConfig | Mapping, task: str) -> dict:
    raw = config.data if isinstance(config, TrainConfig) else dict(config)
    unknown = sorted(set(raw) - set(DATA_DEFAULTS))
    if unknown:
        raise InputError(f"usfm training config data: unknown key(s) {unknown}; expected some of {sorted(DATA_DEFAULTS)}")
    d = {**copy.deepcopy(DATA_DEFAULTS), **copy.deepcopy(dict(raw))}
    if d["source"] not in ("simulate", "folder", "busi", "camus"):
        raise InputError(f"data.source: expected simulate, folder, busi or camus, got {d['source']!r}")
    if d["source"] == "folder" and task != "pretrain":
        raise InputError("data.source 'folder' holds images without labels: it serves pre-training only "
                         "(use busi or camus to fine-tune)")
    if d["source"] == "camus" and task == "classify":
        raise InputError("data.source 'camus' has no class labels: use it for pretrain or segment")
    if d["source"] != "simulate" and not d["root"]:
        raise InputError(f"data.root: source {d['source']!r} needs a data folder")
    for key in ("train_count", "val_count"):
        if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 1:
            raise InputError(f"data.{key}: expected an integer >= 1, got {d[key]!r}")
    f = d["label_fraction"]
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise InputError(f"data.label_fraction: expected a number in (0, 1], got {f!r}")
    if d["classes"] is None:
        d["classes"] = [0, 1] if task == "segment" else [0, 1, 2]
    if d["appearance"]:
        from ultrasound_ai.foundation.bmode_sim import check_appearance

        d["appearance"] = check_appearance(d["appearance"], "data.appearance")
    try:
        d["masking_config"] = MaskingConfig(**dict(d["masking"] or {}))
    except TypeError as exc:
        raise InputError(f"data.masking: {exc}") from exc
    return d


def model_options(config: TrainConfig | Mapping, task: str, data: Mapping | None = None) -> dict:
    raw = config.model if isinstance(config, TrainConfig) else dict(config)
    unknown = sorted(set(raw) - set(MODEL_DEFAULTS) - _VIT_KEYS)
    if unknown:
        raise InputError(f"usfm training config model: unknown key(s) {unknown}; expected some of "
                         f"{sorted(set(MODEL_DEFAULTS) | _VIT_KEYS)}")
    m = {**MODEL_DEFAULTS, **dict(raw)}
    vit = vit_config(m["preset"], **{k: v for k, v in raw.items() if k in _VIT_KEYS})
    if m["num_classes"] is None:
        if task == "segment":
            m["num_classes"] = 4 if data and data.get("source") == "camus" else 2
        else:
            m["num_classes"] = len(data["classes"]) if data and data.get("source") == "simulate" else 3
    if m["layer_decay"] is None:
        # Decay protects pre-trained features; on a random encoder it would only slow the early blocks.
        m["layer_decay"] = 0.65 if (task != "pretrain" and m["pretrained"]) else 1.0
    if not 0 < float(m["layer_decay"]) <= 1:
        raise InputError(f"model.layer_decay: expected a number in (0, 1], got {m['layer_decay']!r}")
    m["vit"] = vit
    return m


def _configuration(task: str, m: Mapping, class_names) -> dict:
    out = {"task": task, "vit": m["vit"].to_dict()}
    if task == "segment":
        out.update(num_classes=int(m["num_classes"]), head_channels=int(m["head_channels"]))
        names = list(class_names)
        if len(names) == int(m["num_classes"]):
            out["label_names"] = names  # CAMUS: the names are the labels'
        elif int(m["num_classes"]) == 2:
            out["label_names"] = ["background", "lesion"]  # BUSI / simulator masks: one lesion label
    elif task == "classify":
        out.update(num_classes=int(m["num_classes"]), dropout=float(m["dropout"]), class_names=list(class_names))
        if m["pooling"] != "mean":
            out["pooling"] = str(m["pooling"])  # absent: mean (cards written before the option existed)
    return out


# ---------------------------------------------------------------------------------------------- data

_CACHE: dict[str, dict] = {}
_SIM_CACHE: dict[str, list] = {}
_LOCK = threading.Lock()


def _simulated(seed, count, size, classes, appearance) -> list:
    """Fresh copies (labels are renumbered in place) of a simulated set, generated once per process: the
    cells of a label study share their pool and validation images."""
    key = json.dumps([seed, count, size, classes, appearance], sort_keys=True)
    with _LOCK:
        items = _SIM_CACHE.get(key)
    if items is None:
        items = ds.simulated_set(seed, count, size, classes, appearance)
        with _LOCK:
            _SIM_CACHE[key] = items
    return [dataclasses.replace(it) for it in items]


def prepared_data(d: Mapping, task: str, size: int) -> dict:
    """{"train": (x [N, S, S] normalised float32, masks [N, S, S] uint8 or None, labels [N]), "val": ...,
    "test": ..., "class_names", "facts"} for the options `d`, cached per process."""
    key = json.dumps([task, size, {k: v for k, v in d.items() if k != "masking_config"}], sort_keys=True, default=str)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    src = d["source"]
    facts: dict = {"source": src}
    if src == "simulate":
        classes = [int(c) for c in d["classes"]]
        train_items = _simulated(d["train_seed"], d["train_count"], size, classes, d["appearance"])
        val_items = _simulated(d["val_seed"], d["val_count"], size, classes, d["appearance"])
        test_items: list = []
        # Labels are renumbered to positions in `classes`, so a 2-class task has labels 0 and 1.
        remap = {c: i for i, c in enumerate(classes)}
        for it in train_items + val_items:
            it.label = remap[it.label]
        class_names = [CLASS_NAMES[c] for c in classes]
        facts.update(simulator_version=SIMULATOR_VERSION, train_seed=d["train_seed"], train_count=d["train_count"],
                     val_seed=d["val_seed"], val_count=d["val_count"], classes=class_names)
        if d["appearance"]:
            facts["appearance"] = d["appearance"]
    else:
        if src == "folder":
            items = [ds.LabelledImage(ds.read_image(p), None, -1, str(p)) for p in ds.list_image_folder(d["root"])]
            class_names = []
        elif src == "busi":
            items, class_names = ds.load_busi(d["root"], require_masks=(task == "segment"))
        else:
            items, class_names = ds.load_camus(d["root"]), ["background", "lv_endocardium", "myocardium", "left_atrium"]
        parts = ds.fixed_split(len(items), d["split_seed"], d["split"])
        train_items, val_items, test_items = ([items[i] for i in p] for p in (list(parts) + [[], []])[:3])
        if not val_items:
            val_items = train_items[: max(1, min(len(train_items), 4))]
        facts.update(root=str(d["root"]), split_seed=d["split_seed"], split=list(d["split"]), count=len(items))
    if d["label_fraction"] < 1 and task != "pretrain":
        keep = ds.label_subset(np.arange(len(train_items)), d["label_fraction"], d["label_seed"])
        train_items = [train_items[i] for i in keep]
        facts.update(label_fraction=d["label_fraction"], label_seed=d["label_seed"], labelled=len(train_items))

    def pack(items):
        if not items:
            return None
        x = np.stack([ds.to_model_input(it.image, size) for it in items])
        masks = None
        if all(it.mask is not None for it in items):
            masks = np.stack([ds.resize_mask(it.mask, size) for it in items]).astype(np.uint8)
        labels = np.array([it.label for it in items], dtype=np.int64)
        return x, masks, labels

    out = {"train": pack(train_items), "val": pack(val_items), "test": pack(test_items), "class_names": class_names,
           "facts": facts}
    if task == "segment" and out["train"][1] is None:
        raise InputError(f"data {d.get('root') or src}: segmentation needs masks for every training image")
    with _LOCK:
        _CACHE.setdefault(key, out)
        return _CACHE[key]


# ---------------------------------------------------------------------------------------- encoders


def load_pretrained_encoder(model: torch.nn.Module, path, vit: ViTConfig) -> dict:
    """Copy the encoder of the usfm checkpoint `path` (a .pt path or an installed model's name) into
    `model.encoder`; returns its card."""
    from ultrasound_ai.models.checkpoint import load_checkpoint
    from ultrasound_ai.models.registry import find_model

    state, card = load_checkpoint(find_model(path))
    if card.get("method") != METHOD:
        raise InputError(f"pretrained checkpoint {path}: method {card.get('method')!r}, expected {METHOD!r}")
    theirs = card.get("configuration", {}).get("vit")
    try:
        their_arch = vit_config(dict(theirs)).architecture() if isinstance(theirs, Mapping) else None
    except InputError:
        their_arch = None
    if their_arch != vit.architecture():
        raise InputError(f"pretrained checkpoint {path}: its ViT configuration {their_arch} differs from this "
                         f"model's {vit.architecture()}; use the same preset and sizes")
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not enc:
        raise InputError(f"pretrained checkpoint {path}: holds no encoder weights (keys 'encoder.*')")
    missing, unexpected = model.encoder.load_state_dict(enc, strict=False)
    if missing or unexpected:
        raise InputError(f"pretrained checkpoint {path}: encoder keys do not fit (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return card


def load_whole_model(model: torch.nn.Module, path, configuration: Mapping) -> dict:
    """Copy every weight of the usfm checkpoint `path` (encoder, pooling and head) into `model`, after
    checking that its card's configuration is `configuration` (same task, architecture, pooling and
    classes); returns its card."""
    from ultrasound_ai.models.checkpoint import load_checkpoint
    from ultrasound_ai.models.registry import find_model

    state, card = load_checkpoint(find_model(path))
    if card.get("method") != METHOD:
        raise InputError(f"model.init_from {path}: method {card.get('method')!r}, expected {METHOD!r}")
    theirs = dict(card.get("configuration") or {})
    if theirs != dict(configuration):
        raise InputError(f"model.init_from {path}: its configuration {theirs} differs from this model's "
                         f"{dict(configuration)}; use the same task, preset, pooling and classes")
    model.load_state_dict(state)
    return card


# -------------------------------------------------------------------------------------------- tasks


def _flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    return torch.where(flips.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


class _FoundationTask:
    task = "pretrain"

    def __init__(self, data: Mapping | None = None):
        # `data` replaces prepared_data (tests, studies): {"train": (x, masks, labels), "val": ..., ...}.
        self._data = data

    def _opts(self, config: TrainConfig):
        d = data_options(config, self.task)
        m = model_options(config, self.task, d)
        return d, m

    def _get_data(self, config: TrainConfig):
        d, m = self._opts(config)
        data = self._data if self._data is not None else prepared_data(d, self.task, m["vit"].img_size)
        return d, m, data

    def build_model(self, config: TrainConfig) -> torch.nn.Module:
        d, m, data = self._get_data(config)
        model = build_model(_configuration(self.task, m, data.get("class_names", [])))
        if m["pretrained"]:
            load_pretrained_encoder(model, m["pretrained"], m["vit"])
        if m["init_from"]:
            load_whole_model(model, m["init_from"], _configuration(self.task, m, data.get("class_names", [])))
        if m["freeze_encoder"]:
            # No gradient reaches the encoder (so its forward builds no graph) and no parameter group holds it.
            model.encoder.requires_grad_(False)
        return model

    def parameter_groups(self, model: torch.nn.Module, config: TrainConfig) -> list[dict]:
        _, m = self._opts(config)
        lr, wd = config.schedule["lr"], config.schedule["weight_decay"]
        enc = model.encoder
        no_wd = {"encoder." + n for n in enc.no_weight_decay_names()}
        depth = enc.cfg.depth
        groups: dict[tuple, dict] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            scale = 1.0
            if name.startswith("encoder."):
                scale = float(m["layer_decay"]) ** (depth + 1 - enc.layer_id(name[len("encoder."):]))
            decay = 0.0 if (name in no_wd or p.ndim <= 1) else wd
            g = groups.setdefault((scale, decay), {"params": [], "lr": lr * scale, "weight_decay": decay})
            g["params"].append(p)
        return list(groups.values())

    def _draw(self, config, rank, step, n):
        g = step_generator(config.seed, rank, step)
        idx = torch.randint(0, n, (config.schedule["batch_size"],), generator=g)
        d = data_options(config, self.task)
        flips = (torch.rand(len(idx), generator=g) < 0.5) if d["flip"] else torch.zeros(len(idx), dtype=torch.bool)
        return g, idx, flips

    def card(self, config: TrainConfig, metrics: Mapping[str, float]) -> dict:
        d, m, data = self._get_data(config)
        vit = m["vit"]
        return {
            "method": METHOD,
            "configuration": _configuration(self.task, m, data.get("class_names", [])),
            "input": {
                "image_size_px": [vit.img_size, vit.img_size],
                "channels": vit.in_chans,
                "intensity_normalisation": f"grey in [0, 1] (8-bit / 255, else min-max; RGB -> BT.601 luma), then "
                                           f"(x - {ds.INTENSITY_MEAN}) / {ds.INTENSITY_STD}",
                "intensity_mean": ds.INTENSITY_MEAN,
                "intensity_std": ds.INTENSITY_STD,
                "resize": "resampled (bilinear, antialiased) to pixel_spacing_mm and read in image_size_px windows "
                          "(segment: overlapping windows averaged; classify: the most lesion-like window); without a "
                          "physical pixel size the whole image is resized to image_size_px; outputs come back on the "
                          "input's pixels",
                **_pixel_facts(d, vit.img_size),
            },
            "training_data": _training_data_line(data.get("facts", {})),
            "training": {"task": self.task, "data": data.get("facts", {}),
                         "pretrained": str(m["pretrained"]) if m["pretrained"] else None,
                         "init_from": str(m["init_from"]) if m["init_from"] else None,
                         "freeze_encoder": bool(m["freeze_encoder"]), "layer_decay": float(m["layer_decay"])},
            "metrics": dict(metrics),
        }


def _training_data_line(facts: Mapping) -> str:
    """The card's one-line "what was it trained on" (the panels show it beside the model selector)."""
    if facts.get("source") == "simulate":
        return (f"simulated B-mode images only (simulator {facts.get('simulator_version', SIMULATOR_VERSION)}, "
                f"seed {facts.get('train_seed')}); not validated on patient data")
    return f"{facts.get('source')} images from {facts.get('root')} (split seed {facts.get('split_seed')})"


def _pixel_facts(d: Mapping, size: int) -> dict:
    """The physical pixel size the model was trained at (card input.pixel_spacing_mm, x then y), which
    inference resamples inputs to; only the simulator knows it (a folder of PNGs does not)."""
    if d["source"] != "simulate":
        return {"pixel_spacing_mm": None,
                "pixel_spacing_note": "training images had no recorded physical pixel size; inputs are resized whole"}
    from ultrasound_ai.foundation.bmode_sim import DEFAULT_FOV_MM

    return {"pixel_spacing_mm": [DEFAULT_FOV_MM[0] / size, DEFAULT_FOV_MM[1] / size],
            "field_of_view_mm": list(DEFAULT_FOV_MM)}


class PretrainTask(_FoundationTask):
    task = "pretrain"

    def batches(self, config, rank, world_size, start_step) -> Iterator[Any]:
        d, m, data = self._get_data(config)
        x = torch.from_numpy(data["train"][0])
        step = start_step
        while True:
            g, idx, flips = self._draw(config, rank, step, len(x))
            imgs = _flip(x[idx].unsqueeze(1), flips)
            masked = dual_mask(imgs, g, d["masking_config"])
            yield {"image": imgs, "input": masked["input"]}
            step += 1

    _lam = DATA_DEFAULTS["freq_lambda"]
    _alpha = DATA_DEFAULTS["freq_alpha"]

    def build_model(self, config):
        d = data_options(config, self.task)
        self._lam, self._alpha = float(d["freq_lambda"]), float(d["freq_alpha"])
        return super().build_model(config)

    def training_step(self, model, batch, device):
        rec = model(batch["input"].to(device))
        return mim_loss(rec, batch["image"].to(device), self._lam, self._alpha)

    def validate(self, model, config, device):
        d, m, data = self._get_data(config)
        x = torch.from_numpy(data["val"][0]).unsqueeze(1)
        g = torch.Generator().manual_seed(int(d["val_seed"]))  # the same masks at every validation
        masked = dual_mask(x, g, d["masking_config"])
        sums = {"loss": 0.0, "l1": 0.0, "freq": 0.0}
        for i in range(0, len(x), 16):
            rec = model(masked["input"][i:i + 16].to(device))
            out = mim_loss(rec, x[i:i + 16].to(device), float(d["freq_lambda"]), float(d["freq_alpha"]))
            n = len(rec)
            for k in sums:
                sums[k] += float(out[k]) * n
        return {k: v / len(x) for k, v in sums.items()}


class SegmentTask(_FoundationTask):
    task = "segment"

    def batches(self, config, rank, world_size, start_step):
        _, _, data = self._get_data(config)
        x = torch.from_numpy(data["train"][0])
        y = torch.from_numpy(data["train"][1].astype(np.int64))
        step = start_step
        while True:
            _, idx, flips = self._draw(config, rank, step, len(x))
            yield {"image": _flip(x[idx].unsqueeze(1), flips), "mask": _flip(y[idx], flips)}
            step += 1

    def training_step(self, model, batch, device):
        logits = model(batch["image"].to(device))
        return segmentation_loss(logits, batch["mask"].to(device), self._dice_weight)

    _dice_weight = 1.0

    def build_model(self, config):
        self._dice_weight = float(data_options(config, self.task)["dice_weight"])
        return super().build_model(config)

    def validate(self, model, config, device):
        _, m, data = self._get_data(config)
        x, masks, _ = data["val"]
        dices, loss = [], 0.0
        for i in range(0, len(x), 16):
            xb = torch.from_numpy(x[i:i + 16]).unsqueeze(1).to(device)
            yb = torch.from_numpy(masks[i:i + 16].astype(np.int64)).to(device)
            logits = model(xb)
            loss += float(segmentation_loss(logits, yb, self._dice_weight)["loss"]) * len(xb)
            pred = logits.argmax(1).cpu().numpy()
            dices += [dice_per_class(p, t, int(m["num_classes"])).mean() for p, t in zip(pred, masks[i:i + 16])]
        return {"dice": float(np.mean(dices)), "loss": loss / len(x)}


class ClassifyTask(_FoundationTask):
    task = "classify"

    def batches(self, config, rank, world_size, start_step):
        _, _, data = self._get_data(config)
        x = torch.from_numpy(data["train"][0])
        y = torch.from_numpy(data["train"][2])
        step = start_step
        while True:
            _, idx, flips = self._draw(config, rank, step, len(x))
            yield {"image": _flip(x[idx].unsqueeze(1), flips), "label": y[idx]}
            step += 1

    def training_step(self, model, batch, device):
        logits = model(batch["image"].to(device))
        loss = torch.nn.functional.cross_entropy(logits, batch["label"].to(device))
        return {"loss": loss}

    def validate(self, model, config, device):
        _, _, data = self._get_data(config)
        x, _, y = data["val"]
        correct, loss = 0, 0.0
        for i in range(0, len(x), 32):
            logits = model(torch.from_numpy(x[i:i + 32]).unsqueeze(1).to(device)).cpu()
            yb = torch.from_numpy(y[i:i + 32])
            loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        return {"accuracy": correct / len(x), "loss": loss / len(x)}


_TASKS = {"pretrain": PretrainTask, "segment": SegmentTask, "classify": ClassifyTask}


def task_for(task: str, data: Mapping | None = None) -> _FoundationTask:
    if task not in _TASKS:
        raise InputError(f"foundation task {task!r}: expected one of {list(_TASKS)}")
    return _TASKS[task](data)


def train_foundation(config, task: str, *, data: Mapping | None = None, resume: bool = True, progress=None,
                     cancel_check=None, progress_bar: bool | None = None) -> TrainResult:
    """Train one task (pretrain | segment | classify); `config` is a path, a mapping or a TrainConfig and
    is laid over default_config(task)."""
    cfg = load_config(config, defaults=default_config(task)) if not isinstance(config, TrainConfig) else config
    if cfg.method != METHOD:
        raise InputError(f"training config method {cfg.method!r}: the foundation model trains method {METHOD!r}")
    return train(cfg, task_for(task, data), resume=resume, progress=progress, cancel_check=cancel_check,
                 progress_bar=progress_bar)
