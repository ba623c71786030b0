"""Training configuration shared by every method: load, validate, override, and the CLI arguments.

Kept free of torch so that the group CLIs can add `--config/--out/...` without slowing `--help`.

A config file (YAML or JSON) looks like::

    method: fima
    name: fima-sim            # model name written in the card (default: the method)
    output_dir: runs/fima
    seed: 0
    device: auto              # auto | cpu | cuda | cuda:N | mps
    data: {source: simulate, ...}     # method-specific
    model: {...}                      # method-specific sizes
    schedule:
      steps: 2000             # total optimizer steps
      batch_size: 8           # per process unless the method says otherwise
      optimizer: adamw        # adam | adamw | sgd
      lr: 3.0e-4
      lr_schedule: cosine     # constant | step | cosine
      warmup_steps: 100
      grad_clip: 1.0
      log_every: 10
      validate_every: 200
      checkpoint_every: 200
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ultrasound_ai.core.deprecation import add_argument
from ultrasound_ai.core.errors import InputError

SCHEDULE_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 8,
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "momentum": 0.9,  # sgd only
    "lr_schedule": "constant",
    "step_size": 1000,  # lr_schedule "step": multiply by gamma every step_size steps
    "gamma": 0.1,
    "warmup_steps": 0,  # linear warm-up, any lr_schedule
    "min_lr_ratio": 0.0,  # cosine floor as a fraction of the base lr
    "grad_clip": 0.0,  # max global gradient norm; 0 = off
    "log_every": 10,
    "validate_every": 100,
    "checkpoint_every": 100,
    "best_metric": None,  # validation metric that picks best.pt; None = the first one validate() returns
    "best_mode": "min",  # min | max
}

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "step", "cosine")
TOP_LEVEL_KEYS = ("method", "name", "description", "output_dir", "seed", "device", "data", "model", "schedule")

# Keys that may change when a run is resumed: they do not change the weights a step computes.
# (Raising schedule.steps is also allowed; with a cosine schedule it stretches the remaining decay.)
RESUME_MUTABLE_KEYS = frozenset(
    {
        "output_dir",
        "device",
        "description",
        "schedule.steps",
        "schedule.log_every",
        "schedule.validate_every",
        "schedule.checkpoint_every",
    }
)


@dataclass
class TrainConfig:
    method: str
    output_dir: str
    seed: int = 0
    device: str = "auto"
    name: str | None = None
    description: str = ""
    data: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=lambda: dict(SCHEDULE_DEFAULTS))

    @property
    def model_name(self) -> str:
        return self.name or self.method

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "name": self.model_name,
            "description": self.description,
            "output_dir": str(self.output_dir),
            "seed": self.seed,
            "device": self.device,
            "data": copy.deepcopy(self.data),
            "model": copy.deepcopy(self.model),
            "schedule": copy.deepcopy(self.schedule),
        }


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"training config {path}: file not found (expected a .yaml, .yml or .json file)")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise InputError(f"training config {path}: unsupported extension {suffix!r} (expected .yaml, .yml or .json)")
    except InputError:
        raise
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise InputError(f"training config {path}: cannot parse ({exc})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"training config {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Return `base` updated by `update`; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _expand_dotted(overrides: Mapping) -> dict:
    # {"schedule.steps": 20} -> {"schedule": {"steps": 20}} so CLI code can override one leaf.
    nested: dict = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"config override {key!r}: {part!r} is both a value and a section")
        node[parts[-1]] = value
    return nested


def _int(value, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise InputError(f"training config {what}: expected an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"training config {what}: expected an integer >= {minimum}, got {value}")
    return value


def _float(value, what: str, minimum: float | None = None, strictly: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InputError(f"training config {what}: expected a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value < minimum or (strictly and value == minimum)):
        rel = ">" if strictly else ">="
        raise InputError(f"training config {what}: expected a number {rel} {minimum}, got {value}")
    return value


def _validate_schedule(raw: Mapping) -> dict:
    if not isinstance(raw, Mapping):
        raise InputError(f"training config schedule: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SCHEDULE_DEFAULTS))
    if unknown:
        raise InputError(
            f"training config schedule: unknown key(s) {unknown}; expected some of {sorted(SCHEDULE_DEFAULTS)}"
        )
    s = deep_merge(SCHEDULE_DEFAULTS, raw)
    s["steps"] = _int(s["steps"], "schedule.steps", 1)
    s["batch_size"] = _int(s["batch_size"], "schedule.batch_size", 1)
    if s["optimizer"] not in OPTIMIZERS:
        raise InputError(f"training config schedule.optimizer: expected one of {list(OPTIMIZERS)}, got {s['optimizer']!r}")
    s["lr"] = _float(s["lr"], "schedule.lr", 0.0, strictly=True)
    s["weight_decay"] = _float(s["weight_decay"], "schedule.weight_decay", 0.0)
    betas = s["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise InputError(f"training config schedule.betas: expected two numbers, got {betas!r}")
    s["betas"] = [_float(b, "schedule.betas", 0.0) for b in betas]
    if not all(b < 1 for b in s["betas"]):
        raise InputError(f"training config schedule.betas: expected numbers in [0, 1), got {betas!r}")
    s["momentum"] = _float(s["momentum"], "schedule.momentum", 0.0)
    if s["lr_schedule"] not in LR_SCHEDULES:
        raise InputError(
            f"training config schedule.lr_schedule: expected one of {list(LR_SCHEDULES)}, got {s['lr_schedule']!r}"
        )
    s["step_size"] = _int(s["step_size"], "schedule.step_size", 1)
    s["gamma"] = _float(s["gamma"], "schedule.gamma", 0.0, strictly=True)
    s["warmup_steps"] = _int(s["warmup_steps"], "schedule.warmup_steps", 0)
    s["min_lr_ratio"] = _float(s["min_lr_ratio"], "schedule.min_lr_ratio", 0.0)
    if s["min_lr_ratio"] > 1:
        raise InputError(f"training config schedule.min_lr_ratio: expected a number in [0, 1], got {s['min_lr_ratio']}")
    s["grad_clip"] = _float(s["grad_clip"] or 0.0, "schedule.grad_clip", 0.0)
    for key in ("log_every", "validate_every", "checkpoint_every"):
        s[key] = _int(s[key], f"schedule.{key}", 1)
    if s["best_metric"] is not None and not isinstance(s["best_metric"], str):
        raise InputError(f"training config schedule.best_metric: expected a metric name or null, got {s['best_metric']!r}")
    if s["best_mode"] not in ("min", "max"):
        raise InputError(f"training config schedule.best_mode: expected 'min' or 'max', got {s['best_mode']!r}")
    return s


def config_from_dict(raw: Mapping, source: str = "training config") -> TrainConfig:
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise InputError(f"{source}: unknown top-level key(s) {unknown}; expected some of {list(TOP_LEVEL_KEYS)}")
    for key in ("method", "output_dir"):
        if key not in raw or raw[key] in (None, ""):
            raise InputError(f"{source}: missing required key {key!r}")
    method = raw["method"]
    if not isinstance(method, str):
        raise InputError(f"{source}: 'method' must be a string, got {method!r}")
    for key in ("data", "model"):
        if not isinstance(raw.get(key, {}) or {}, Mapping):
            raise InputError(f"{source}: {key!r} must be a mapping, got {type(raw[key]).__name__}")
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not device:
        raise InputError(f"{source}: 'device' must be a string such as auto, cpu, cuda or cuda:0, got {device!r}")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name or "/" in name or "\\" in name):
        raise InputError(f"{source}: 'name' must be a plain model name without slashes, got {name!r}")
    return TrainConfig(
        method=method,
        output_dir=str(raw["output_dir"]),
        seed=_int(raw.get("seed", 0), "seed", 0),
        device=device,
        name=name or method,
        description=str(raw.get("description", "") or ""),
        data=copy.deepcopy(dict(raw.get("data") or {})),
        model=copy.deepcopy(dict(raw.get("model") or {})),
        schedule=_validate_schedule(raw.get("schedule") or {}),
    )


def load_config(source, overrides: Mapping | None = None, *, defaults: Mapping | None = None) -> TrainConfig:
    """Load a TrainConfig from a YAML/JSON path, a dict, or a TrainConfig.

    `defaults` (a method's default config) lie under the file; `overrides` (nested or dotted keys,
    e.g. {"schedule.steps": 20}) lie over it. Unknown keys, wrong types and a missing file raise InputError.
    """
    if isinstance(source, TrainConfig):
        raw, where = source.to_dict(), "training config"
    elif isinstance(source, Mapping):
        raw, where = dict(source), "training config"
    elif isinstance(source, (str, Path)):
        raw, where = _read_file(Path(source)), f"training config {source}"
    else:
        raise InputError(f"training config: expected a path, a mapping or a TrainConfig, got {type(source).__name__}")
    if defaults:
        raw = deep_merge(defaults, raw)
    if overrides:
        raw = deep_merge(raw, _expand_dotted(overrides))
    return config_from_dict(raw, where)


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: Mapping, current: Mapping, ignore=RESUME_MUTABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring the resume-mutable ones."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        # JSON round trips turn tuples into lists; compare like with like.
        if json.dumps(va, sort_keys=True, default=str) != json.dumps(vb, sort_keys=True, default=str):
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


# ----------------------------------------------------------------------------------------------- CLI


def add_training_arguments(parser) -> None:
    """Add the shared training options to a group's `train` sub-command parser."""
    parser.add_argument("--config", help="training config file (.yaml, .yml or .json)")
    add_argument(parser, "--out", deprecated=("--output",), dest="output",
                 help="output folder (overrides output_dir in the config)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (overrides schedule.steps)")
    parser.add_argument("--seed", type=int, help="random seed (overrides seed)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (overrides device)")
    parser.add_argument(
        "--resume",
        action=_BooleanFlag,
        default=True,
        help="continue from OUTPUT/last.pt when it exists (default); --no-resume starts afresh",
    )


def _boolean_flag_class():
    import argparse

    # argparse.BooleanOptionalAction exists from Python 3.9, which all supported versions have.
    return argparse.BooleanOptionalAction


_BooleanFlag = _boolean_flag_class()


def config_from_args(args, defaults: Mapping | None = None) -> TrainConfig:
    """Build a TrainConfig from the method's `defaults`, then `--config`, then the explicit options."""
    overrides: dict = {}
    if getattr(args, "output", None):
        overrides["output_dir"] = args.output
    if getattr(args, "steps", None) is not None:
        overrides["schedule.steps"] = args.steps
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    if getattr(args, "device", None):
        overrides["device"] = args.device
    source = getattr(args, "config", None) or {}
    return load_config(source, overrides, defaults=defaults)
