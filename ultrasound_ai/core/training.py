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


def _train(config, task, dist_ctx, device, resume, progress, cancel_check, progress_bar) -> TrainResult:
    sched = config.schedule
    total = sched["steps"]
    out = Path(config.output_dir)
    last_path, log_path = out / "last.pt", out / "log.csv"
    best_path, final_path = out / "best.pt", out / "final.pt"
    cfg_dict = config.to_dict()

    _seed_globals(config.seed)
    model = task.build_model(config)
    if not isinstance(model, nn.Module):
        raise RuntimeError(f"build_model() must return a torch.nn.Module, got {type(model).__name__}")
    model.to(device)
    groups = task.parameter_groups(model, config) if callable(getattr(task, "parameter_groups", None)) else None
    optimizer = _build_optimizer(groups if groups else [p for p in model.parameters() if p.requires_grad], sched)

    start_step, elapsed_before = 0, 0.0
    best = {"metric": sched["best_metric"], "value": None, "step": 0, "metrics": {}}
    last_metrics: dict = {}
    state = None
    if resume and last_path.exists():
        state = _load_last(last_path)
        diffs = config_differences(state["config"], cfg_dict)
        if diffs:
            raise InputError(
                f"resume state {last_path}: the config differs from the saved run in {'; '.join(diffs)} "
                "(only schedule.steps may be raised); use another output folder or --no-resume"
            )
        if total < state["step"]:
            raise InputError(
                f"schedule.steps {total}: the run in {out} has already done {state['step']} steps; "
                "ask for at least that many"
            )
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        best = dict(state["best"])
        last_metrics = dict(state.get("metrics") or {})
        _set_rng_state(state["rng"])

    if dist_ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = DistributedDataParallel(model, **ddp_kwargs)

    log = _CsvLog(log_path)
    if dist_ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            log.open_for_resume(start_step)
        else:
            from ultrasound_ai.models.checkpoint import card_path_for

            # A fresh run (or --no-resume) in a used folder: nothing of the old run may pass for this one's.
            for stale in (last_path, log_path, best_path, card_path_for(best_path), final_path, card_path_for(final_path)):
                if stale.exists():
                    stale.unlink()
        _write_json(out / "config.json", cfg_dict)

    t0 = time.monotonic()

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - t0

    def checkpoint(step: int) -> None:
        if dist_ctx.is_main:
            _save_last(
                last_path,
                {
                    "format": LAST_STATE_FORMAT,
                    "step": step,
                    "model": _cpu_state_dict(model),
                    "optimizer": optimizer.state_dict(),
                    "lr_schedule": {"kind": sched["lr_schedule"], "factor": lr_factor(sched, max(step - 1, 0))},
                    "rng": _rng_state(),
                    "best": best,
                    "metrics": last_metrics,
                    "config": cfg_dict,
                    "elapsed_s": elapsed(),
                    "world_size": dist_ctx.world_size,
                },
            )

    def training_facts(step: int) -> dict:
        return {
            "seed": config.seed,
            "steps": step,
            "world_size": dist_ctx.world_size,
            "device": str(device),
            "wall_time_s": round(elapsed(), 3),
            "final_metrics": dict(last_metrics),
            "best_metrics": dict(best["metrics"]),
            "best_step": best["step"],
            "best_metric": best["metric"],
            "config": cfg_dict,
            "torch_version": torch.__version__,
        }

    def validate_and_track(step: int, track: bool = True) -> dict:
        nonlocal last_metrics
        metrics = _run_validation(task, model, config, device)
        if best["metric"] is None:
            best["metric"] = next(iter(metrics))
        if best["metric"] not in metrics:
            raise InputError(
                f"schedule.best_metric {best['metric']!r}: validate() returns only {sorted(metrics)}"
            )
        if not track:
            return metrics
        last_metrics = metrics
        if _is_better(metrics[best["metric"]], best["value"], sched["best_mode"]):
            best.update(value=metrics[best["metric"]], step=step, metrics=dict(metrics))
            _save_weights(model, best_path, _make_card(task, config, metrics, training_facts(step)))
        return metrics

    bar = None
    show_bar = progress_bar if progress_bar is not None else (progress is None and sys.stderr.isatty())
    if dist_ctx.is_main and show_bar:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, desc=f"train {config.model_name}", unit="step")
    last_progress = 0.0

    def report(step: int, force: bool = False) -> None:
        nonlocal last_progress
        if not dist_ctx.is_main:
            return
        if bar is not None and step > bar.n:
            bar.update(step - bar.n)  # tqdm throttles the redraws itself
        now = time.monotonic()
        if progress is not None and (force or now - last_progress >= 0.5):
            last_progress = now
            progress(step / total, f"step {step}/{total}")

    step = start_step
    try:
        baseline = None
        if dist_ctx.is_main and log.columns is None and start_step < total:
            # Baseline row (step 0): the untrained model's metrics. It is written with the first step's
            # row, once the loss terms, and so the log's columns, are known.
            metrics = validate_and_track(0, track=False)
            baseline = {"step": 0, "elapsed_s": round(elapsed(), 3), "lr": None}
            baseline.update({f"val_{k}": v for k, v in metrics.items()})
        model.train()
        data = iter(task.batches(config, dist_ctx.rank, dist_ctx.world_size, start_step))
        window: dict[str, torch.Tensor] = {}
        window_n = 0
        loss_keys: list[str] | None = None
        report(step, force=True)
        while step < total:
            _check_cancel(cancel_check, dist_ctx, device)
            # Re-seeding per step makes dropout and any in-step sampling a function of (seed, rank, step).
            _seed_globals(_mix_seed(config.seed, 2, dist_ctx.rank, step))
            lr = _apply_lr(optimizer, lr_factor(sched, step))
            batch = next(data)
            optimizer.zero_grad(set_to_none=True)
            out_terms = task.training_step(model, batch, device)
            terms = _scalar_terms(out_terms, step + 1)
            loss = out_terms["loss"]
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise RuntimeError("training_step()['loss'] must be a tensor attached to the model's graph")
            loss.backward()
            if sched["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(_unwrap(model).parameters(), sched["grad_clip"])
            optimizer.step()
            step += 1

            if loss_keys is None:
                loss_keys = ["loss"] + [k for k in terms if k != "loss"]
            for k in loss_keys:
                if k not in terms:
                    raise RuntimeError(f"training_step() returned no {k!r} at step {step} (it did before)")
                window[k] = window.get(k, 0.0) + terms[k].to(torch.float64)
            window_n += 1

            is_final = step == total
            do_val = step % sched["validate_every"] == 0 or is_final
            if step % sched["log_every"] == 0 or do_val:
                # Mean over the steps since the last row, averaged over ranks.
                packed = torch.stack([window[k] for k in loss_keys]) / window_n
                packed = _all_reduce(packed.to(device), dist_ctx) / dist_ctx.world_size
                values = [float(v) for v in packed.cpu()]
                if not math.isfinite(values[0]):
                    raise RuntimeError(f"the loss is not finite ({values[0]}) at step {step}; lower schedule.lr?")
                window, window_n = {}, 0
                row = {"step": step, "elapsed_s": round(elapsed(), 3), "lr": lr}
                row.update(zip(loss_keys, values))
                if do_val and dist_ctx.is_main:
                    row.update({f"val_{k}": v for k, v in validate_and_track(step).items()})
                if dist_ctx.is_main:
                    if baseline is not None:
                        val_cols = [k for k in baseline if k.startswith("val_")]
                        log.write(baseline, columns=[*LOG_FIXED_COLUMNS, *loss_keys, *val_cols])
                        baseline = None
                    log.write(row)
            if step % sched["checkpoint_every"] == 0 or is_final:
                checkpoint(step)
            report(step)

        if start_step >= total and dist_ctx.is_main and not last_metrics:
            validate_and_track(total)
        result = None
        if dist_ctx.is_main:
            card = _save_weights(model, final_path, _make_card(task, config, last_metrics, training_facts(total)))
            result = TrainResult(
                output_dir=out,
                steps=total,
                metrics=dict(last_metrics),
                best_metrics=dict(best["metrics"]),
                best_step=int(best["step"]),
                final_path=final_path,
                best_path=best_path if best_path.exists() else None,
                last_path=last_path,
                log_path=log_path,
                card=card,
                world_size=dist_ctx.world_size,
            )
        report(total, force=True)
        if dist_ctx.enabled:
            import torch.distributed as dist

            dist.barrier()
        if result is None:
            result = TrainResult(
                output_dir=out, steps=total, metrics={}, best_metrics={}, best_step=0, final_path=final_path,
                best_path=None, last_path=last_path, log_path=log_path, card={}, world_size=dist_ctx.world_size,
                extra={"rank": dist_ctx.rank},
            )
        return result
    except Cancelled:
        # Cancellation is checked between steps, so model and optimizer are those of `step`.
        checkpoint(step)
        raise
    finally:
        log.close()
        if bar is not None:
            bar.close()


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
