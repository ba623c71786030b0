"""Training Attention-Reg (and Feature-Reg) through the shared harness (``ultrasound_ai.core.training``).

Data: a pool of cases (simulated once per process and cached: simulation costs seconds per case; or
case folders). Every training sample is drawn on the fly from the step's generator (so the batch of step
s depends only on (seed, rank, s)): a case from the pool, a target initial SRE uniform in
[0, max_sre_mm] (20 mm for stage 1, 8 mm for stage 2, as the paper's two stages), a random rigid
perturbation of the ground truth rescaled to exactly that SRE (``metrics.perturbation_with_sre``), the
pair prepared through the perturbed transform T_init, and the target = the correction that maps T_init
back to the truth exactly (``attention_reg.correction_target`` in the case's correction frame).

Loss: MSE on the 6 parameters as the paper, 1 mm of translation weighted like 1 degree of rotation
(``data.deg_weight`` = 1), divided by ``data.loss_scale``² (5², a constant so the loss starts near 1;
it changes no optimum).

Validation: fixed cases (their own seeds) with pre-drawn perturbations (``val_perturbation_seed``),
prepared once; the metric is the SRE after one corrected forward pass (``sre_mm``, the best.pt
criterion), beside the initial SRE of the same samples (``sre_initial_mm``: the no-correction
predictor's score).

Config (YAML/JSON, see ``DEFAULT_CONFIG``)::

    method: attention_reg
    name: attention_reg_label_stage1
    data: {stage: 1, mode: label, source: simulate, train_cases: 48, ...}
    model: {preset: half}          # original | half | tiny, plus field overrides (attention: false = Feature-Reg)
    schedule: {steps: ..., batch_size: 8, optimizer: adam, lr: 1.0e-3, best_metric: sre_mm}

Run: ``train_attention_reg(config)``, ``ultrasound-ai registration train --config C``, or multi-process
``python -m torch.distributed.run ... -m ultrasound_ai.core.training C --task
ultrasound_ai.registration.training:AttentionRegTask``.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.training import TrainConfig, TrainResult, load_config, step_numpy_rng, train
from ultrasound_ai.registration.attention_reg import (
    CENTRES,
    AttentionReg,
    apply_correction,
    config_from_dict,
    correction_target,
)
from ultrasound_ai.registration.inference import METHOD, MODES, correction_frame_for

__all__ = [
    "DEFAULT_CONFIG",
    "DATA_DEFAULTS",
    "AttentionRegTask",
    "data_options",
    "case_pool",
    "draw_sample",
    "train_attention_reg",
]

STAGE_MAX_SRE_MM = {1: 20.0, 2: 8.0}

DATA_DEFAULTS: dict[str, Any] = {
    "stage": 1,  # 1 or 2: sets max_sre_mm (20 / 8 mm) unless given
    "max_sre_mm": None,  # initial SRE ~ U[0, max_sre_mm]
    "mode": "label",  # fixed channel: the MRI gland label ("label") or the MRI ("image")
    "centre": "centroid",  # centre of the correction's rotation: "centroid" or "corner" (the original)
    "margin": 0.30,  # ROI: the fixed label's bounding box enlarged by this fraction per side
    "source": "simulate",  # "simulate" (phantom.simulate_case) or "folder" (case folders)
    "phantom": "default",  # "default", "small", "held_out", "randomised", or a mapping of PhantomConfig fields
    "train_cases": 48,  # pool size (simulate)
    "train_seed": 0,  # simulated training cases use seeds train_seed, train_seed + 1, ...
    "val_cases": 6,
    "val_seed": 500_000,  # validation cases use their own seeds, far from the training ones
    "train_dir": None,  # source "folder": a folder of case folders (each with truth.json)
    "val_dir": None,
    "val_perturbations": 8,  # pre-drawn perturbations per validation case
    "val_perturbation_seed": 12345,
    "perturb_rot_deg": 6.0,  # direction of a perturbation: U[-6, 6] mm and degrees, then rescaled to the SRE
    "perturb_trans_mm": 6.0,
    "deg_weight": 1.0,  # loss weight of a degree relative to a millimetre (1 = the paper's plain MSE)
    "loss_scale": 5.0,
    "init_weights": None,  # a checkpoint (.pt with its card) whose weights start the run (warm start)
}

DEFAULT_CONFIG: dict[str, Any] = {
    "method": METHOD,
    "name": "attention_reg_label_stage1",
    "output_dir": "runs/attention_reg_label_stage1",
    "seed": 0,
    "device": "auto",
    "data": {},
    "model": {"preset": "half"},
    "schedule": {
        "steps": 6000,
        "batch_size": 8,
        "optimizer": "adam",
        "lr": 1e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "min_lr_ratio": 0.05,
        "grad_clip": 10.0,
        "log_every": 20,
        "validate_every": 250,
        "checkpoint_every": 250,
        "best_metric": "sre_mm",
        "best_mode": "min",
    },
}


# ------------------------------------------------------------------------------------------ options


def data_options(config: TrainConfig | Mapping) -> dict:
    """config.data merged over DATA_DEFAULTS and checked (InputError naming the key)."""
    raw = config.data if isinstance(config, TrainConfig) else dict(config)
    unknown = sorted(set(raw) - set(DATA_DEFAULTS))
    if unknown:
        raise InputError(f"attention_reg training config data: unknown key(s) {unknown}; expected some of "
                         f"{sorted(DATA_DEFAULTS)}")
    d = {**copy.deepcopy(DATA_DEFAULTS), **copy.deepcopy(dict(raw))}
    if d["stage"] not in STAGE_MAX_SRE_MM:
        raise InputError(f"data.stage: expected 1 or 2, got {d['stage']!r}")
    if d["max_sre_mm"] is None:
        d["max_sre_mm"] = STAGE_MAX_SRE_MM[d["stage"]]
    for key in ("max_sre_mm", "margin", "perturb_rot_deg", "perturb_trans_mm", "loss_scale", "deg_weight"):
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise InputError(f"data.{key}: expected a finite number >= 0, got {v!r}")
        d[key] = float(v)
    if d["max_sre_mm"] <= 0 or d["loss_scale"] <= 0:
        raise InputError("data.max_sre_mm and data.loss_scale: expected numbers > 0")
    if d["mode"] not in MODES:
        raise InputError(f"data.mode: expected one of {list(MODES)}, got {d['mode']!r}")
    if d["centre"] not in CENTRES:
        raise InputError(f"data.centre: expected one of {list(CENTRES)}, got {d['centre']!r}")
    if d["source"] not in ("simulate", "folder"):
        raise InputError(f"data.source: expected 'simulate' or 'folder', got {d['source']!r}")
    for key in ("train_cases", "val_cases", "val_perturbations"):
        if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 1:
            raise InputError(f"data.{key}: expected an integer >= 1, got {d[key]!r}")
    for key in ("train_seed", "val_seed", "val_perturbation_seed"):
        if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 0:
            raise InputError(f"data.{key}: expected an integer >= 0, got {d[key]!r}")
    if d["init_weights"] is not None and not Path(d["init_weights"]).is_file():
        raise InputError(f"data.init_weights: expected an existing checkpoint file, got {d['init_weights']!r}")
    if d["source"] == "folder":
        for key in ("train_dir", "val_dir"):
            if not d[key] or not Path(d[key]).is_dir():
                raise InputError(f"data.{key}: source 'folder' needs a folder of case folders, got {d[key]!r}")
    return d


def _phantom_config(spec):
    from ultrasound_ai.registration.phantom import PhantomConfig

    if spec in (None, "default"):
        return PhantomConfig()
    if spec == "small":
        return PhantomConfig.small()
    if spec == "held_out":
        return PhantomConfig.held_out()
    if spec == "randomised":
        return PhantomConfig.randomised()
    if isinstance(spec, Mapping):
        fields = dict(spec)
        base = fields.pop("preset", "default")
        if base not in ("default", "small", "held_out", "randomised"):
            raise InputError(f"data.phantom.preset: expected default, small, held_out or randomised, got {base!r}")
        try:
            if base == "default":
                return PhantomConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
            maker = {"small": PhantomConfig.small, "held_out": PhantomConfig.held_out,
                     "randomised": PhantomConfig.randomised}[base]
            return maker(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        except TypeError as exc:
            raise InputError(f"data.phantom: {exc}") from exc
    raise InputError(f"data.phantom: expected 'default', 'small', 'held_out', 'randomised' or a mapping of PhantomConfig fields, "
                     f"got {spec!r}")


# --------------------------------------------------------------------------------------- case pools

_POOL_CACHE: dict[str, list] = {}
_POOL_LOCK = threading.Lock()


def case_pool(source: str, *, seeds: Sequence[int] = (), phantom=None, folder=None) -> list:
    """Cases for training or validation, cached per process (same key, same list object).

    source "simulate": ``simulate_case(seed, phantom)`` for each seed; "folder": every sub-folder of
    `folder` (sorted by name) read with ``case.read_case``; each needs a ground truth (truth.json).
    """
    from ultrasound_ai.registration.case import read_case

    if source == "simulate":
        cfg = _phantom_config(phantom)
        key = json.dumps(["simulate", [int(s) for s in seeds], cfg.to_dict()], sort_keys=True)
    elif source == "folder":
        key = json.dumps(["folder", str(Path(folder).resolve())])
    else:
        raise InputError(f"case pool source {source!r}: expected 'simulate' or 'folder'")
    with _POOL_LOCK:
        if key in _POOL_CACHE:
            return _POOL_CACHE[key]
    if source == "simulate":
        from ultrasound_ai.registration.phantom import simulate_case

        cases = [simulate_case(int(s), cfg) for s in seeds]
    else:
        dirs = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
        if not dirs:
            raise InputError(f"case folder pool {folder}: no case folders inside")
        cases = [read_case(p) for p in dirs]
    for c in cases:
        if c.truth_fixed_to_moving is None:
            raise InputError(f"case {c.name}: training needs a ground-truth transform (truth.json)")
    with _POOL_LOCK:
        _POOL_CACHE.setdefault(key, cases)
        return _POOL_CACHE[key]


# -------------------------------------------------------------------------------------------- task


def _sample(case, T_init, d: dict, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input [2, D, H, W] float32, target parameters [6], correction frame 4x4) of one perturbed case."""
    from ultrasound_ai.registration.preprocessing import prepare_input

    prepared = prepare_input(case, T_init, mode=d["mode"], size=tuple(size), margin=d["margin"])
    frame = correction_frame_for(prepared, d["centre"])
    target = correction_target(T_init, case.truth_fixed_to_moving, frame)
    return np.asarray(prepared.array, dtype=np.float32), target, frame


def draw_sample(pool: Sequence, rng: np.random.Generator, d: dict, size) -> dict:
    """One training sample from `rng`: a case of `pool`, an initial SRE ~ U[0, max_sre_mm], T_init with
    exactly that SRE, the input prepared through T_init and the exact correction target.
    Returns {"case", "sre_init_mm", "T_init", "x" [2, D, H, W] float32, "target" [6], "frame" 4x4}."""
    case = pool[int(rng.integers(len(pool)))]
    target_sre = float(rng.uniform(0.0, d["max_sre_mm"]))
    T_init = _perturb(case, target_sre, rng, d)
    x, target, frame = _sample(case, T_init, d, size)
    return {"case": case, "sre_init_mm": target_sre, "T_init": T_init, "x": x, "target": target, "frame": frame}


class AttentionRegTask:
    """The harness's TrainingTask for Attention-Reg. `train_cases` / `val_cases` (lists of Case with a
    ground truth) replace the configured pools (tests, notebooks)."""

    def __init__(self, train_cases: Sequence | None = None, val_cases: Sequence | None = None):
        self._train_override = list(train_cases) if train_cases is not None else None
        self._val_override = list(val_cases) if val_cases is not None else None
        self._val: dict | None = None
        self._val_key: str | None = None
        self._loss_scale, self._deg_weight = DATA_DEFAULTS["loss_scale"], DATA_DEFAULTS["deg_weight"]

    # -- data ---------------------------------------------------------------------------------------
    def _train_pool(self, d: dict) -> list:
        if self._train_override is not None:
            return self._train_override
        if d["source"] == "folder":
            return case_pool("folder", folder=d["train_dir"])
        seeds = range(d["train_seed"], d["train_seed"] + d["train_cases"])
        return case_pool("simulate", seeds=seeds, phantom=d["phantom"])

    def _val_pool(self, d: dict) -> list:
        if self._val_override is not None:
            return self._val_override
        if d["source"] == "folder":
            return case_pool("folder", folder=d["val_dir"])
        seeds = range(d["val_seed"], d["val_seed"] + d["val_cases"])
        return case_pool("simulate", seeds=seeds, phantom=d["phantom"])

    def _validation_set(self, config: TrainConfig) -> dict:
        d = data_options(config)
        size = config_from_dict(config.model).input_size
        key = json.dumps([d, list(size)], sort_keys=True, default=str)
        if self._val is not None and self._val_key == key:
            return self._val
        cases = self._val_pool(d)
        rng = np.random.default_rng([d["val_perturbation_seed"], 77])
        xs, frames, inits, truths, surfaces = [], [], [], [], []
        for case in cases:
            for _ in range(d["val_perturbations"]):
                target_sre = rng.uniform(0.0, d["max_sre_mm"])
                T_init = _perturb(case, target_sre, rng, d)
                x, _, frame = _sample(case, T_init, d, size)
                xs.append(x)
                frames.append(frame)
                inits.append(T_init)
                truths.append(case.truth_fixed_to_moving)
                surfaces.append(case.surface_fixed)
        self._val = {"x": np.stack(xs), "frames": frames, "inits": inits, "truths": truths, "surfaces": surfaces}
        self._val_key = key
        return self._val

    # -- TrainingTask -------------------------------------------------------------------------------
    def build_model(self, config: TrainConfig) -> AttentionReg:
        d = data_options(config)  # also fails early on a bad data section
        # training_step sees no config: keep the loss settings of this run.
        self._loss_scale, self._deg_weight = d["loss_scale"], d["deg_weight"]
        model = AttentionReg(config_from_dict(config.model))
        if d["init_weights"]:
            from ultrasound_ai.models.checkpoint import load_into

            load_into(model, d["init_weights"])  # warm start; a resumed run's checkpoint overrides it
        return model

    def batches(self, config: TrainConfig, rank: int, world_size: int, start_step: int) -> Iterator:
        d = data_options(config)
        size = config_from_dict(config.model).input_size
        pool = self._train_pool(d)
        batch = config.schedule["batch_size"]
        step = start_step
        while True:
            rng = step_numpy_rng(config.seed, rank, step)
            xs, ys = [], []
            for _ in range(batch):
                sample = draw_sample(pool, rng, d, size)
                xs.append(sample["x"])
                ys.append(sample["target"])
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.float32))
            step += 1

    def training_step(self, model, batch, device) -> dict:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        pred = model(x)
        deg = self._deg_weight
        w = torch.tensor([1.0, 1.0, 1.0, deg, deg, deg], device=pred.device, dtype=pred.dtype)
        err = (pred - y) * w / self._loss_scale
        loss = (err ** 2).mean()
        with torch.no_grad():
            mse_t = ((pred[:, :3] - y[:, :3]) ** 2).mean()
            mse_r = ((pred[:, 3:] - y[:, 3:]) ** 2).mean()
        return {"loss": loss, "mse_t_mm2": mse_t, "mse_r_deg2": mse_r}

    def validate(self, model, config: TrainConfig, device) -> dict:
        from ultrasound_ai.registration.metrics import sre

        v = self._validation_set(config)
        preds = []
        for i in range(0, len(v["x"]), 8):
            x = torch.from_numpy(v["x"][i:i + 8]).to(device)
            preds.append(model(x).double().cpu().numpy())
        params = np.concatenate(preds)
        after, before = [], []
        for p, frame, T0, Tt, pts in zip(params, v["frames"], v["inits"], v["truths"], v["surfaces"]):
            after.append(sre(apply_correction(T0, p, frame), Tt, pts))
            before.append(sre(T0, Tt, pts))
        after, before = np.array(after), np.array(before)
        return {
            "sre_mm": float(after.mean()),  # first: the default best.pt criterion
            "sre_median_mm": float(np.median(after)),
            "sre_sd_mm": float(after.std()),
            "sre_initial_mm": float(before.mean()),
            "improved_fraction": float(np.mean(after < before)),
        }

    def card(self, config: TrainConfig, metrics: Mapping[str, float]) -> dict:
        from ultrasound_ai.registration.phantom import REGISTRATION_SIM_VERSION

        d = data_options(config)
        mcfg = config_from_dict(config.model)
        training: dict = {
            "stage": d["stage"],
            "initial_sre_mm": [0.0, d["max_sre_mm"]],
            "initial_sre_distribution": "uniform; random rigid direction (U[-perturb_trans_mm, +] mm, "
                                        "U[-perturb_rot_deg, +] deg about the surface centroid) rescaled to the SRE",
            "perturb_trans_mm": d["perturb_trans_mm"],
            "perturb_rot_deg": d["perturb_rot_deg"],
            "loss": f"MSE on the 6 parameters, 1 mm ~ {d['deg_weight']:g} deg, divided by {d['loss_scale']:g}^2",
            "val_perturbations_per_case": d["val_perturbations"],
            "val_perturbation_seed": d["val_perturbation_seed"],
        }
        if self._train_override is not None:
            training["data"] = "cases supplied by the caller"
            training["train_cases"] = [getattr(c, "name", "?") for c in self._train_override]
            training["val_cases"] = [getattr(c, "name", "?") for c in (self._val_override or [])]
        elif d["source"] == "simulate":
            training.update(
                simulator="ultrasound_ai.registration.phantom",
                registration_sim_version=REGISTRATION_SIM_VERSION,
                phantom=_phantom_config(d["phantom"]).to_dict(),
                train_seeds=[d["train_seed"], d["train_seed"] + d["train_cases"] - 1],
                val_seeds=[d["val_seed"], d["val_seed"] + d["val_cases"] - 1],
            )
        else:
            training.update(train_dir=str(d["train_dir"]), val_dir=str(d["val_dir"]))
            first = self._train_pool(d)[0].attrs  # simulated folders record their generator in truth.json
            for key in ("simulator", "registration_sim_version", "config"):
                if key in first:
                    training["phantom" if key == "config" else key] = first[key]
        if d["init_weights"]:
            training["init_weights"] = Path(d["init_weights"]).name
        return {
            "training_data": _training_data_line(training),
            "method": METHOD,
            "stage": d["stage"],
            "mode": d["mode"],
            "variant": "attention_reg" if mcfg.attention else "feature_reg",
            "description": (f"{'Attention-Reg' if mcfg.attention else 'Feature-Reg'} stage {d['stage']}, "
                            f"{d['mode']} mode, {config.model.get('preset', 'original')} size"),
            "configuration": {"preset": config.model.get("preset", "original"), **mcfg.to_dict()},
            "input": {
                "mode": d["mode"],
                "size_dhw": list(mcfg.input_size),
                "margin": d["margin"],
                "centre": d["centre"],
                "channels": ["MRI gland label" if d["mode"] == "label" else "MRI",
                             "TRUS resampled onto the ROI through the current fixed->moving estimate"],
                "spacing_policy": ("ROI = the fixed label's bounding box enlarged by margin on each side, "
                                   "resampled to size_dhw (z, y, x): the spacing follows the gland, per case"),
                "intensity_normalisation": "min-max to [0, 1] per channel",
                "output": ("(tx, ty, tz) mm, (rx, ry, rz) degrees, static xyz, in the correction frame F (ROI "
                           "axes, origin at the centre); T_new = T_cur . F . D . F^-1 (fixed -> moving, LPS)"),
            },
            "training": training,
        }


def _training_data_line(training: dict) -> str:
    """The card's one-line "training_data" (shown by the panels): what the model saw, and that it is
    simulated only when it is."""
    simulator = training.get("simulator")
    if simulator:
        phantom = training.get("phantom") or {}
        family = "randomised family" if phantom.get("randomise") else f"{phantom.get('family', '?')} family"
        return (f"simulated MRI-TRUS phantoms only ({simulator} version {training.get('registration_sim_version')}, "
                f"{family}); not validated on patient data")
    if "train_dir" in training:
        return f"case folders in {training['train_dir']} (see the training record)"
    return "cases supplied by the caller (see the training record)"


def _perturb(case, target_sre: float, rng: np.random.Generator, d: dict) -> np.ndarray:
    from ultrasound_ai.registration.metrics import perturbation_with_sre

    return perturbation_with_sre(case.truth_fixed_to_moving, float(target_sre), case.surface_fixed, rng,
                                 rot_deg=d["perturb_rot_deg"], trans_mm=d["perturb_trans_mm"])


def train_attention_reg(config, progress: Callable[[float, str], None] | None = None,
                        cancel_check: Callable[[], None] | None = None, *, resume: bool = True,
                        train_cases: Sequence | None = None, val_cases: Sequence | None = None,
                        progress_bar: bool | None = None) -> TrainResult:
    """Train one Attention-Reg stage; `config` is a path (YAML/JSON), a mapping or a TrainConfig, laid over
    DEFAULT_CONFIG. Returns the harness's TrainResult (final.pt, best.pt with cards, log.csv)."""
    cfg = load_config(config, defaults=DEFAULT_CONFIG) if not isinstance(config, TrainConfig) else config
    if cfg.method != METHOD:
        raise InputError(f"training config method: expected {METHOD!r}, got {cfg.method!r}")
    data_options(cfg)
    config_from_dict(cfg.model)
    task = AttentionRegTask(train_cases=train_cases, val_cases=val_cases)
    return train(cfg, task, resume=resume, progress=progress, cancel_check=cancel_check, progress_bar=progress_bar)
