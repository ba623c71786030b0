"""The training harness every method trains through.

A method supplies a `TrainingTask` (model, data, loss, validation, card); `train(config, task)` does the
rest: seeding, optimizer and lr schedule, gradient clipping, a CSV log, periodic validation, `best.pt`,
resumable `last.pt`, the final weights with their model card, progress, cancellation, and multi-process
data-parallel training when launched by `torchrun`.

Output folder::

    config.json          the resolved config of the run
    log.csv              step, elapsed_s, lr, every loss term, every validation metric (val_*); one row per
                         logged step, appended on resume
    last.pt              resume state (model, optimizer, step, RNG states, best metric, config)
    best.pt + .card.json weights with the best validation metric (schedule.best_metric)
    final.pt + .card.json weights after the last step

Determinism: the global python/numpy/torch RNGs are re-seeded from (seed, rank, step) before every step,
and a task's batch for step s must depend only on (seed, rank, s) -- `step_generator` gives the generator
to draw it from. So a run that is interrupted and resumed computes exactly the weights of an
uninterrupted one (on CPU), without replaying the data stream. Validation runs with the RNGs forked, so
how often it runs does not change training.

Multi-process: `python -m torch.distributed.run --nproc_per_node=N -m ultrasound_ai.core.training
CONFIG --task MODULE:CLASS`. Each rank draws its own shard (the task sees rank and world_size), gradients
are averaged by DistributedDataParallel, rank 0 alone validates and writes files.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import Cancelled, InputError, exit_code_for
from ultrasound_ai.core.training_config import (
    TrainConfig,
    add_training_arguments,
    config_differences,
    config_from_args,
    load_config,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingTask",
    "add_training_arguments",
    "config_from_args",
    "load_config",
    "lr_factor",
    "step_generator",
    "step_numpy_rng",
    "torchrun_command",
    "train",
]

LAST_STATE_FORMAT = 1
LOG_FIXED_COLUMNS = ("step", "elapsed_s", "lr")


# ---------------------------------------------------------------------------------------- task API


@runtime_checkable
class TrainingTask(Protocol):
    """What a method supplies to `train`. `parameter_groups` and `card` fields beyond the required ones
    are optional."""

    def build_model(self, config: TrainConfig) -> nn.Module:
        """A freshly initialised model (the global RNGs are seeded from config.seed just before)."""

    def batches(self, config: TrainConfig, rank: int, world_size: int, start_step: int) -> Iterator[Any]:
        """An endless iterator of this rank's batches for steps start_step, start_step + 1, ...

        The batch for step s must depend only on (config.seed, rank, s): draw it from
        `step_generator(config.seed, rank, s)` (or `step_numpy_rng`). Tensors may stay on the CPU; the
        task's `training_step` moves them to the device."""

    def training_step(self, model: nn.Module, batch: Any, device: torch.device) -> Mapping[str, torch.Tensor]:
        """Forward pass and loss. Returns scalar tensors; "loss" is the one back-propagated, every
        entry is logged."""

    def validate(self, model: nn.Module, config: TrainConfig, device: torch.device) -> Mapping[str, float]:
        """Metrics on fixed validation data (runs under torch.no_grad, model in eval mode, rank 0)."""

    def card(self, config: TrainConfig, metrics: Mapping[str, float]) -> dict:
        """The model card's method facts: at least "configuration" (what rebuilds the model) and "input"
        (what inference needs); may add "training" facts (simulator version, data seeds) and "metrics".
        The harness fills name, method and its own training facts."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics: dict  # validation metrics after the last step
    best_metrics: dict  # validation metrics of best.pt
    best_step: int
    final_path: Path  # final.pt
    best_path: Path | None  # best.pt (None when no validation metric was finite)
    last_path: Path  # last.pt (resume state)
    log_path: Path
    card: dict  # the completed card of final.pt
    world_size: int = 1
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ determinism


def _mix_seed(*parts: int) -> int:
    # SeedSequence hashes the tuple well, so nearby (seed, rank, step) give unrelated streams.
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, rank: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The torch generator a task draws the batch of `step` on `rank` from."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix_seed(seed, 1, rank, step))
    return g


def step_numpy_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The numpy generator a task draws the batch of `step` on `rank` from (simulators)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 1, int(rank), int(step)]))


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    # Plain tensors and ints only, so last.pt loads with weights_only=True.
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_version": int(version),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": None if gauss is None else float(gauss),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- schedule


def lr_factor(schedule: Mapping, step: int) -> float:
    """Multiplier of the base lr for the optimizer step with 0-based index `step`."""
    warmup = schedule["warmup_steps"]
    if warmup and step < warmup:
        return (step + 1) / warmup
    kind = schedule["lr_schedule"]
    if kind == "constant":
        return 1.0
    if kind == "step":
        return schedule["gamma"] ** (step // schedule["step_size"])
    # cosine from the end of the warm-up to schedule.steps, down to min_lr_ratio
    span = max(1, schedule["steps"] - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = schedule["min_lr_ratio"]
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _build_optimizer(params, schedule: Mapping) -> torch.optim.Optimizer:
    name, lr, wd = schedule["optimizer"], schedule["lr"], schedule["weight_decay"]
    if name == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=tuple(schedule["betas"]), weight_decay=wd)
    elif name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=tuple(schedule["betas"]), weight_decay=wd)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=schedule["momentum"], weight_decay=wd)
    for group in opt.param_groups:
        # Groups may carry their own lr (layer-wise decay); the schedule scales each group's own base.
        group.setdefault("initial_lr", group["lr"])
    return opt


def _apply_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------ distribution


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and int(os.environ["WORLD_SIZE"]) >= 1


def _setup_distributed(device_spec: str) -> tuple[_Dist, torch.device]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        owns = False
    elif _launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        owns = True
    else:
        return _Dist(), _resolve_device(device_spec)

    want_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise InputError(f"device {device_spec!r}: CUDA is not available on this machine (use cpu)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device_spec in ("auto", "cpu"):
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise InputError(f"device {device_spec!r}: multi-process training runs on cpu or cuda only")
    if owns:
        dist.init_process_group(backend=backend)
    return _Dist(rank=rank, world_size=world, local_rank=local, enabled=True, owns_group=owns), device


def _resolve_device(spec: str) -> torch.device:
    from ultrasound_ai.core.device import resolve_device

    return resolve_device(spec)


def _all_reduce(tensor: torch.Tensor, dist_ctx: _Dist, op: str = "sum") -> torch.Tensor:
    if not dist_ctx.enabled:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


# ------------------------------------------------------------------------------------------- logging


class _CsvLog:
    """log.csv: the header is fixed by the first row (resumed runs reuse the file's); rows are flushed."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] | None = None
        self._fh = None
        self._writer = None

    def open_for_resume(self, last_step: int) -> None:
        # Rows logged after the last checkpoint (a crash between checkpoints) will be logged again: drop
        # them so every step appears once.
        if not self.path.exists():
            return
        with open(self.path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            return
        header, body = rows[0], rows[1:]
        kept = [r for r in body if r and int(float(r[0])) <= last_step]
        if len(kept) != len(body):
            with atomic_output(self.path) as tmp:
                with open(tmp, "w", newline="", encoding="utf-8") as fh:
                    w = csv.writer(fh)
                    w.writerow(header)
                    w.writerows(kept)
        self.columns = header

    def write(self, row: Mapping[str, Any], columns: list[str] | None = None) -> None:
        if self.columns is None:
            self.columns = list(columns or row)
            new = True
        else:
            new = False
            unknown = [k for k in row if k not in self.columns]
            if unknown:
                raise RuntimeError(
                    f"{self.path}: values {unknown} are not among the log's columns {self.columns} (a task must "
                    "return the same loss terms and metrics at every step)"
                )
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w" if new else "a", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._fh, fieldnames=self.columns, restval="")
            if new:
                self._writer.writeheader()
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


# ------------------------------------------------------------------------------------------ helpers


def _scalar_terms(out: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
    if not isinstance(out, Mapping) or "loss" not in out:
        raise RuntimeError(f"training_step must return a mapping with a 'loss' entry (step {step}), got {type(out).__name__}")
    terms = {}
    for key, value in out.items():
        t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if t.numel() != 1:
            raise RuntimeError(f"training_step entry {key!r} must be a scalar, got shape {tuple(t.shape)}")
        terms[key] = t.detach().reshape(())
    return terms


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def _cpu_state_dict(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}


def _run_validation(task, model, config: TrainConfig, device: torch.device) -> dict[str, float]:
    inner = _unwrap(model)
    was_training = inner.training
    inner.eval()
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        # Forked RNGs, seeded alike every time: validation is reproducible and does not shift training.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            _seed_globals(config.seed)
            metrics = task.validate(inner, config, device)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        inner.train(was_training)
    if not isinstance(metrics, Mapping) or not metrics:
        raise RuntimeError("validate() must return a non-empty mapping of metric name -> number")
    return {str(k): float(v) for k, v in metrics.items()}


def _save_last(path: Path, state: dict) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _load_last(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"resume state {path}: cannot read it ({exc}); delete it or train with --no-resume") from exc
    if not isinstance(state, dict) or state.get("format") != LAST_STATE_FORMAT:
        raise InputError(f"resume state {path}: not a training state written by this harness (format {LAST_STATE_FORMAT})")
    return state


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _write_json(path: Path, data: Mapping) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _make_card(task, config: TrainConfig, metrics: dict, facts: dict) -> dict:
    card = dict(task.card(config, metrics) or {})
    card["name"] = config.model_name
    card["method"] = card.get("method") or config.method
    card.setdefault("configuration", dict(config.model))
    card.setdefault("input", {})
    training = dict(card.get("training") or {})
    training.update(facts)
    card["training"] = training
    card["metrics"] = {**dict(card.get("metrics") or {}), **metrics}
    return card


def _save_weights(model, path: Path, card: dict) -> dict:
    from ultrasound_ai.models.checkpoint import save_checkpoint

    return save_checkpoint(_cpu_state_dict(model), path, card, fp16=False)


# ---------------------------------------------------------------------------------------------- train


def train(
    config: TrainConfig | Mapping | str | os.PathLike,
    task: TrainingTask,
    *,
    resume: bool = True,
    progress: Callable[[float, str], None] | None = None,
    cancel_check: Callable[[], None] | None = None,
    progress_bar: bool | None = None,
) -> TrainResult:
    """Train `task`'s model as `config` says, writing the output folder; see the module docstring.

    resume: continue from OUTPUT/last.pt when present (the config must match except the keys in
        training_config.RESUME_MUTABLE_KEYS; schedule.steps may be raised); False starts afresh.
    progress: progress(fraction, message), called on rank 0 (the job runner passes one).
    cancel_check: called before every step; raising `Cancelled` stops after saving last.pt.
    progress_bar: a tqdm bar on stderr; default when stderr is a terminal and no `progress` is given.
    """
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    for attr in ("build_model", "batches", "training_step", "validate", "card"):
        if not callable(getattr(task, attr, None)):
            raise InputError(f"training task {type(task).__name__}: missing method {attr}()")

    dist_ctx, device = _setup_distributed(config.device)
    try:
        return _train(config, task, dist_ctx, device, resume, progress, cancel_check, progress_bar)
    finally:
        if dist_ctx.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class _TrainingRun:
    """The state of one `train` call and the steps of its loop: the model and optimizer, the output folder
    (last.pt, log.csv, best.pt, final.pt), the best and last validation metrics, progress reporting."""

    def __init__(self, config: TrainConfig, task, dist_ctx: _Dist, device: torch.device, progress):
        self.config, self.task, self.dist, self.device, self.progress = config, task, dist_ctx, device, progress
        self.sched = config.schedule
        self.total = self.sched["steps"]
        self.out = Path(config.output_dir)
        self.last_path, self.log_path = self.out / "last.pt", self.out / "log.csv"
        self.best_path, self.final_path = self.out / "best.pt", self.out / "final.pt"
        self.cfg_dict = config.to_dict()

        _seed_globals(config.seed)
        model = task.build_model(config)
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"build_model() must return a torch.nn.Module, got {type(model).__name__}")
        model.to(device)
        groups = task.parameter_groups(model, config) if callable(getattr(task, "parameter_groups", None)) else None
        self.optimizer = _build_optimizer(groups if groups else [p for p in model.parameters() if p.requires_grad],
                                          self.sched)
        self.model = model
        self.start_step, self.elapsed_before = 0, 0.0
        self.best = {"metric": self.sched["best_metric"], "value": None, "step": 0, "metrics": {}}
        self.last_metrics: dict = {}
        self.log = _CsvLog(self.log_path)
        self.bar = None
        self._t0 = time.monotonic()  # start_clock() restarts it when the steps begin
        self._last_progress = 0.0

    # ------------------------------------------------------------------ setup

    def resume(self) -> None:
        """Continue from last.pt: same config (but schedule.steps), weights, optimizer, RNG, best so far."""
        state = _load_last(self.last_path)
        diffs = config_differences(state["config"], self.cfg_dict)
        if diffs:
            raise InputError(
                f"resume state {self.last_path}: the config differs from the saved run in {'; '.join(diffs)} "
                "(only schedule.steps may be raised); use another output folder or --no-resume"
            )
        if self.total < state["step"]:
            raise InputError(
                f"schedule.steps {self.total}: the run in {self.out} has already done {state['step']} steps; "
                "ask for at least that many"
            )
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_step, self.elapsed_before = int(state["step"]), float(state["elapsed_s"])
        self.best = dict(state["best"])
        self.last_metrics = dict(state.get("metrics") or {})
        _set_rng_state(state["rng"])

    def wrap_distributed(self) -> None:
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = DistributedDataParallel(self.model, **ddp_kwargs)

    def prepare_output(self, resumed: bool) -> None:
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if resumed:
            self.log.open_for_resume(self.start_step)
        else:
            from ultrasound_ai.models.checkpoint import card_path_for

            # A fresh run (or --no-resume) in a used folder: nothing of the old run may pass for this one's.
            for stale in (self.last_path, self.log_path, self.best_path, card_path_for(self.best_path),
                          self.final_path, card_path_for(self.final_path)):
                if stale.exists():
                    stale.unlink()
        _write_json(self.out / "config.json", self.cfg_dict)

    def open_bar(self, progress_bar: bool | None) -> None:
        show = progress_bar if progress_bar is not None else (self.progress is None and sys.stderr.isatty())
        if self.dist.is_main and show:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start_step, desc=f"train {self.config.model_name}",
                            unit="step")

    # ------------------------------------------------------------------ during the loop

    def start_clock(self) -> None:
        """Wall time counts from here (plus the time of the run resumed)."""
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self._t0

    def checkpoint(self, step: int) -> None:
        if not self.dist.is_main:
            return
        _save_last(self.last_path, {
            "format": LAST_STATE_FORMAT,
            "step": step,
            "model": _cpu_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": {"kind": self.sched["lr_schedule"], "factor": lr_factor(self.sched, max(step - 1, 0))},
            "rng": _rng_state(),
            "best": self.best,
            "metrics": self.last_metrics,
            "config": self.cfg_dict,
            "elapsed_s": self.elapsed(),
            "world_size": self.dist.world_size,
        })

    def training_facts(self, step: int) -> dict:
        return {
            "seed": self.config.seed,
            "steps": step,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "wall_time_s": round(self.elapsed(), 3),
            "final_metrics": dict(self.last_metrics),
            "best_metrics": dict(self.best["metrics"]),
            "best_step": self.best["step"],
            "best_metric": self.best["metric"],
            "config": self.cfg_dict,
            "torch_version": torch.__version__,
        }

    def validate(self, step: int, track: bool = True) -> dict:
        """Validation metrics; with `track`, they become the last metrics and best.pt follows the best."""
        metrics = _run_validation(self.task, self.model, self.config, self.device)
        if self.best["metric"] is None:
            self.best["metric"] = next(iter(metrics))
        if self.best["metric"] not in metrics:
            raise InputError(
                f"schedule.best_metric {self.best['metric']!r}: validate() returns only {sorted(metrics)}"
            )
        if not track:
            return metrics
        self.last_metrics = metrics
        if _is_better(metrics[self.best["metric"]], self.best["value"], self.sched["best_mode"]):
            self.best.update(value=metrics[self.best["metric"]], step=step, metrics=dict(metrics))
            _save_weights(self.model, self.best_path,
                          _make_card(self.task, self.config, metrics, self.training_facts(step)))
        return metrics

    def baseline_row(self) -> dict | None:
        """Row "step 0" of a fresh log: the untrained model's metrics. It is written with the first step's
        row, once the loss terms, and so the log's columns, are known."""
        if not (self.dist.is_main and self.log.columns is None and self.start_step < self.total):
            return None
        row = {"step": 0, "elapsed_s": round(self.elapsed(), 3), "lr": None}
        row.update({f"val_{k}": v for k, v in self.validate(0, track=False).items()})
        return row

    def optimise(self, step: int, batch) -> tuple[float, dict]:
        """One optimisation step (step -> step + 1): (lr used, the scalar terms of training_step)."""
        # Re-seeding per step makes dropout and any in-step sampling a function of (seed, rank, step).
        _seed_globals(_mix_seed(self.config.seed, 2, self.dist.rank, step))
        lr = _apply_lr(self.optimizer, lr_factor(self.sched, step))
        self.optimizer.zero_grad(set_to_none=True)
        out_terms = self.task.training_step(self.model, batch, self.device)
        terms = _scalar_terms(out_terms, step + 1)
        loss = out_terms["loss"]
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise RuntimeError("training_step()['loss'] must be a tensor attached to the model's graph")
        loss.backward()
        if self.sched["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(_unwrap(self.model).parameters(), self.sched["grad_clip"])
        self.optimizer.step()
        return lr, terms

    def write_row(self, step: int, lr: float, losses: dict, validate: bool, baseline: dict | None) -> None:
        row = {"step": step, "elapsed_s": round(self.elapsed(), 3), "lr": lr, **losses}
        if validate and self.dist.is_main:
            row.update({f"val_{k}": v for k, v in self.validate(step).items()})
        if self.dist.is_main:
            if baseline is not None:
                val_cols = [k for k in baseline if k.startswith("val_")]
                self.log.write(baseline, columns=[*LOG_FIXED_COLUMNS, *losses, *val_cols])
            self.log.write(row)

    def report(self, step: int, force: bool = False) -> None:
        if not self.dist.is_main:
            return
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)  # tqdm throttles the redraws itself
        now = time.monotonic()
        if self.progress is not None and (force or now - self._last_progress >= 0.5):
            self._last_progress = now
            self.progress(step / self.total, f"step {step}/{self.total}")

    # ------------------------------------------------------------------ the end

    def finish(self) -> TrainResult:
        """final.pt and its card (rank 0), the result; every rank waits for the others."""
        if self.start_step >= self.total and self.dist.is_main and not self.last_metrics:
            self.validate(self.total)
        result = None
        if self.dist.is_main:
            card = _save_weights(self.model, self.final_path,
                                 _make_card(self.task, self.config, self.last_metrics, self.training_facts(self.total)))
            result = TrainResult(
                output_dir=self.out, steps=self.total, metrics=dict(self.last_metrics),
                best_metrics=dict(self.best["metrics"]), best_step=int(self.best["step"]),
                final_path=self.final_path, best_path=self.best_path if self.best_path.exists() else None,
                last_path=self.last_path, log_path=self.log_path, card=card, world_size=self.dist.world_size,
            )
        self.report(self.total, force=True)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
        if result is None:
            result = TrainResult(
                output_dir=self.out, steps=self.total, metrics={}, best_metrics={}, best_step=0,
                final_path=self.final_path, best_path=None, last_path=self.last_path, log_path=self.log_path,
                card={}, world_size=self.dist.world_size, extra={"rank": self.dist.rank},
            )
        return result

    def close(self) -> None:
        self.log.close()
        if self.bar is not None:
            self.bar.close()


class _LossWindow:
    """The loss terms summed since the last log row; their mean over the steps and the ranks."""

    def __init__(self):
        self.keys: list[str] | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, terms: Mapping[str, torch.Tensor], step: int) -> None:
        if self.keys is None:
            self.keys = ["loss"] + [k for k in terms if k != "loss"]
        for k in self.keys:
            if k not in terms:
                raise RuntimeError(f"training_step() returned no {k!r} at step {step} (it did before)")
            self.sums[k] = self.sums.get(k, 0.0) + terms[k].to(torch.float64)
        self.n += 1

    def take_mean(self, dist_ctx: _Dist, device, step: int) -> dict[str, float]:
        packed = torch.stack([self.sums[k] for k in self.keys]) / self.n
        packed = _all_reduce(packed.to(device), dist_ctx) / dist_ctx.world_size
        values = [float(v) for v in packed.cpu()]
        if not math.isfinite(values[0]):
            raise RuntimeError(f"the loss is not finite ({values[0]}) at step {step}; lower schedule.lr?")
        self.sums, self.n = {}, 0
        return dict(zip(self.keys, values))


def _train(config, task, dist_ctx, device, resume, progress, cancel_check, progress_bar) -> TrainResult:
    run = _TrainingRun(config, task, dist_ctx, device, progress)
    resumed = resume and run.last_path.exists()
    if resumed:
        run.resume()
    run.wrap_distributed()
    run.prepare_output(resumed)
    run.open_bar(progress_bar)
    run.start_clock()
    sched, total = run.sched, run.total
    step = run.start_step
    try:
        baseline = run.baseline_row()
        run.model.train()
        data = iter(task.batches(config, dist_ctx.rank, dist_ctx.world_size, run.start_step))
        window = _LossWindow()
        run.report(step, force=True)
        while step < total:
            _check_cancel(cancel_check, dist_ctx, device)
            lr, terms = run.optimise(step, next(data))
            step += 1
            window.add(terms, step)
            is_final = step == total
            do_val = step % sched["validate_every"] == 0 or is_final
            if step % sched["log_every"] == 0 or do_val:
                run.write_row(step, lr, window.take_mean(dist_ctx, device, step), do_val, baseline)
                baseline = None
            if step % sched["checkpoint_every"] == 0 or is_final:
                run.checkpoint(step)
            run.report(step)
        return run.finish()
    except Cancelled:
        # Cancellation is checked between steps, so model and optimizer are those of `step`.
        run.checkpoint(step)
        raise
    finally:
        run.close()


def _check_cancel(cancel_check, dist_ctx: _Dist, device) -> None:
    flag = 0
    if cancel_check is not None:
        try:
            cancel_check()
        except Cancelled:
            flag = 1
    if dist_ctx.enabled:
        # Every rank must stop at the same step, or the others would wait forever in the all-reduce.
        flag = int(_all_reduce(torch.tensor([flag], dtype=torch.int32, device=device), dist_ctx, "max").item())
    if flag:
        raise Cancelled("training cancelled")


# ------------------------------------------------------------------------------------- entry point


def resolve_task(reference: str):
    """'package.module:Name' -> a task object (a class or factory is called without arguments)."""
    module_name, _, attr = str(reference).partition(":")
    if not module_name or not attr:
        raise InputError(f"training task {reference!r}: expected 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"training task {reference!r}: cannot import {module_name} ({exc})") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise InputError(f"training task {reference!r}: {module_name} has no {attr}")
    if isinstance(obj, type) or not callable(getattr(obj, "training_step", None)):
        obj = obj()
    return obj


def torchrun_command(
    config_path: str | os.PathLike,
    task_reference: str,
    nproc_per_node: int,
    *,
    master_port: int | None = None,
    extra_args: list[str] | None = None,
    python: str | None = None,
) -> list[str]:
    """The command that trains on `nproc_per_node` processes of this machine (DDP)."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={int(nproc_per_node)}"]
    if master_port is not None:
        cmd.append(f"--master_port={int(master_port)}")
    else:
        cmd.append("--standalone")  # torchrun picks a free rendezvous port itself
    cmd += ["-m", "ultrasound_ai.core.training", str(config_path), "--task", task_reference]
    return cmd + list(extra_args or [])


def _sigterm_cancel_check() -> Callable[[], None]:
    # SIGTERM (the job runner's Cancel, or torchrun stopping its workers) -> stop cleanly between steps.
    requested = {"flag": False}

    def handler(signum, frame):
        requested["flag"] = True

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass

    def check() -> None:
        if requested["flag"]:
            raise Cancelled("training cancelled (SIGTERM)")

    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ultrasound_ai.core.training",
        description="Train a method's model from a config file (also the torchrun entry point).",
    )
    parser.add_argument("config_file", help="training config (.yaml, .yml or .json)")
    parser.add_argument("--task", required=True, help="the method's TrainingTask, as package.module:Name")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    args.config = args.config_file if args.config is None else args.config
    try:
        config = config_from_args(args)
        task = resolve_task(args.task)
        result = train(config, task, resume=args.resume, cancel_check=_sigterm_cancel_check())
    except BaseException as exc:  # noqa: BLE001 - a clear message and the job exit code
        if isinstance(exc, SystemExit):
            raise
        print(f"ultrasound_ai.core.training: error: {exc}", file=sys.stderr)
        if exit_code_for(exc) == 1:
            raise
        return exit_code_for(exc)
    if result.extra.get("rank", 0) == 0:
        print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps, "metrics": result.metrics}))
    return 0


if __name__ == "__main__":
    code = main()
    if _launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        # After destroy_process_group a gloo worker thread can still be joinable when C++ statics are
        # torn down at interpreter exit, which aborts the rank (SIGABRT, "terminate called without an
        # active exception") about one run in ten on a loaded CPU. Everything is written and closed
        # by now, so skip the finalisers.
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
