"""MoGLo-Net training through the harness (`core.training.train`).

Data: a pool of sweeps made once per process (cached by its settings) and re-cut into random 5-frame
clips at every step, since the simulator costs ~0.1-0.25 s per frame. With ``data.source: simulate`` the
sweeps are simulated over the model's grid at ``data.sim_pixel_spacing_mm`` (null: on the grid itself);
with ``data.source: folder`` sweep files (``*.h5`` with ``tforms``) are read. Either way the frames are
resampled onto the grid as at inference (`sweep_windows`, grid from the top row, the offset carried into
the targets). Targets: per-pair (tx, ty, tz mm, YZX degrees) of T_{i<-i+1} on the grid, normalised
by the training pool's mean and standard deviation (stored in the model's buffers and the card).

Batch for step s: `batch_size` clips drawn from `step_numpy_rng(seed, rank, s)` (sweep uniformly, start
uniformly), so it depends only on (seed, rank, s). Loss: `moglo.losses.moglo_loss` (weighted L1 +
(1 - cosine) + 0.005 triplet). Optimiser: AdamW 1e-4, weight decay 1e-2 (the paper).

Validation on fixed held-out sweeps (whole sweeps through `moglo.method.predict_pairs`, overlap "last"):
``tz_mae_mm`` (first: picks best.pt) the mean absolute error of the out-of-plane translation per pair,
``tz_mae_const_mm`` the same for a constant-motion predictor (the training pool's mean motion),
``t_mae_mm``, ``angle_mae_deg``, ``fdr_pct`` (Luo), ``fdr_const_pct`` and ``oop_r`` (per sweep the Pearson r of
|predicted| vs |true| centre out-of-plane translation per pair, averaged; `best_metric: oop_r, best_mode: max`
selects on it).

Command (the CLI wiring `ultrasound-ai freehand train --method moglo` calls `train_moglo`)::

    python -c "from ultrasound_ai.freehand.moglo.training import train_moglo; train_moglo({'output_dir': 'runs/moglo'})"
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.training import TrainConfig, TrainResult, load_config, step_numpy_rng, train

__all__ = ["DEFAULT_CONFIG", "DATA_DEFAULTS", "MogloTask", "train_moglo", "model_config", "data_options",
           "SweepPool", "build_pool"]

METHOD = "moglo"

DATA_DEFAULTS: dict[str, Any] = {
    "source": "simulate",  # simulate | folder
    "train_seed": 100000,
    "train_sweeps": 24,
    "train_frames": 120,
    "val_seed": 200000,
    "val_sweeps": 4,
    "val_frames": 80,
    "tactic": None,  # None = random per sweep (linear, curved, loop, sector)
    # Simulated frames are formed at a scanner-like pixel size (jittered per sweep) and resampled onto the
    # network grid as a user's sweep is; null simulates on the grid itself.
    "sim_pixel_spacing_mm": 0.15,
    "sim_spacing_jitter": 0.1,
    # Speed within a sweep: "varied" (x0.3-x3 segments, pauses, up to 3 reversals) makes the frames the only
    # source of the speed; "smooth" (x0.8-1.2, at most one reversal) let the models learn a motion prior.
    "motion": "varied",
    # Per-sweep appearance: "randomised" (scatterer density, echogenicity contrast, gain/TGC, dynamic range,
    # noise, PSF, depth and pixel size drawn per sweep; simulator.RANDOMISED_RANGES) or "nominal".
    "appearance": "randomised",
    "train_dir": None,
    "val_dir": None,
    "weighted_l1": True,
    "triplet_weight": 0.005,
    "triplet_margin": 0.1,
    "val_overlap": "last",
    # Frame-skip augmentation: clips take every k-th frame, k drawn uniformly from these strides, so one
    # anatomy is seen at several speeds and the speed can only be read from the speckle decorrelation
    # (with one speed per sweep a small pool is memorised sweep by sweep). [1] = the paper's sampling.
    "frame_strides": [1],
    # Clip mirroring: a clip whose grid centre moves backwards over the clip (summed out-of-plane displacement
    # < 0) has its targets mirrored through the image plane (M T M). Two images cannot tell a motion from its
    # mirror image, so the unresolvable sign is taken out of the loss while the reversals within a clip (which
    # the frames can show) stay; at inference the clips' signs are linked (card inference.sign_linking).
    # false: off; "backwards" (or true): the rule above; "nearest": each clip is scored against whichever of
    # its targets and their mirror images is nearer the prediction (a loss invariant to the reflection, which
    # leaves the network free to keep one consistent branch, rotations included); "pairs": every pair whose frame
    # centre moves backwards is mirrored on its own, the convention inference orients pairs from (direction
    # "ordering": each pair forward, then mirrored where the frames' order says the probe went back).
    "clip_mirror": False,
}

DEFAULT_CONFIG: dict[str, Any] = {
    "method": METHOD,
    "name": "moglo_shipped",
    "output_dir": "runs/moglo_shipped",
    "seed": 0,
    "device": "auto",
    "data": {},
    "model": {"preset": "shipped"},
    "schedule": {
        "steps": 5000,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 1e-4,
        "weight_decay": 1e-2,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "min_lr_ratio": 0.05,
        "grad_clip": 5.0,
        "log_every": 20,
        "validate_every": 250,
        "checkpoint_every": 250,
        "best_metric": "tz_mae_mm",
        "best_mode": "min",
    },
}


# ------------------------------------------------------------------------------------------ options


def data_options(config) -> dict:
    raw = config.data if isinstance(config, TrainConfig) else dict(config)
    unknown = sorted(set(raw) - set(DATA_DEFAULTS))
    if unknown:
        raise InputError(f"moglo training config data: unknown key(s) {unknown}; expected some of {sorted(DATA_DEFAULTS)}")
    d = {**copy.deepcopy(DATA_DEFAULTS), **copy.deepcopy(dict(raw))}
    if d["source"] not in ("simulate", "folder"):
        raise InputError(f"data.source: expected 'simulate' or 'folder', got {d['source']!r}")
    if d["source"] == "folder":
        for key in ("train_dir", "val_dir"):
            if not d[key] or not Path(d[key]).is_dir():
                raise InputError(f"data.{key}: expected a folder of sweep files (.h5), got {d[key]!r}")
    for key in ("train_sweeps", "train_frames", "val_sweeps", "val_frames"):
        if not isinstance(d[key], int) or d[key] < (2 if key.endswith("frames") else 1):
            raise InputError(f"data.{key}: expected a positive integer (frames >= 2), got {d[key]!r}")
    strides = d["frame_strides"]
    if (not isinstance(strides, (list, tuple)) or not strides
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in strides)):
        raise InputError(f"data.frame_strides: expected a non-empty list of integers >= 1, got {strides!r}")
    d["frame_strides"] = [int(k) for k in strides]
    from ultrasound_ai.freehand.simulation.simulator import check_acquisition_options

    check_acquisition_options(d)
    if d["clip_mirror"] is True:
        d["clip_mirror"] = "backwards"
    if d["clip_mirror"] not in (False, None, "backwards", "nearest", "pairs"):
        raise InputError(f"data.clip_mirror: expected false, 'backwards', 'nearest' or 'pairs', got "
                         f"{d['clip_mirror']!r}")
    d["clip_mirror"] = d["clip_mirror"] or False
    if d["val_overlap"] not in ("last", "none"):
        raise InputError(f"data.val_overlap: expected 'last' or 'none', got {d['val_overlap']!r}")
    return d


def model_config(config):
    """MogloConfig from config.model = {"preset": ..., overrides...}."""
    from ultrasound_ai.freehand.moglo.model import make_config

    raw = dict(config.model if isinstance(config, TrainConfig) else config)
    raw.pop("init_from", None)  # a checkpoint to start from (MogloTask.build_model), not an architecture key
    preset = raw.pop("preset", "shipped")
    return make_config(preset, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})


# --------------------------------------------------------------------------------------------- pool


class SweepPool:
    """Sweeps on the network grid: frames [N, h, w] (uint8 or float32, 0..255), targets [N-1, 6], true
    tforms [N, 4, 4] (in the grid's image-mm coordinates, for FDR), names."""

    def __init__(self, frames: list, targets: list, tforms: list, names: list, spacing_xy, frame_shape_hw):
        self.frames, self.targets, self.tforms, self.names = frames, targets, tforms, names
        self.spacing_xy = tuple(float(v) for v in spacing_xy)
        self.frame_shape_hw = tuple(int(v) for v in frame_shape_hw)

    def __len__(self):
        return len(self.frames)

    def strided_targets(self, stride: int) -> list:
        """Per sweep, the targets [N-stride, 6] of the pairs (i, i+stride) (stride 1: `targets`)."""
        if stride == 1:
            return self.targets
        cache = self.__dict__.setdefault("_strided", {})
        if stride not in cache:
            from ultrasound_ai.core.geometry import invert_rigid, matrix_to_params
            from ultrasound_ai.freehand.moglo.model import PARAM_CONVENTION

            out = []
            for t in self.tforms:
                rel = invert_rigid(t[:-stride]) @ t[stride:] if len(t) > stride else np.zeros((0, 4, 4))
                out.append(matrix_to_params(rel, PARAM_CONVENTION, degrees=True).astype(np.float32)
                           if len(rel) else np.zeros((0, 6), np.float32))
            cache[stride] = out
        return cache[stride]

    def training_targets(self, strides: Sequence[int]) -> np.ndarray:
        """All pair targets at the given frame strides (the normalisation statistics of training)."""
        return np.concatenate([y for k in strides for y in self.strided_targets(int(k))], 0)


_POOLS: dict[str, SweepPool] = {}


def _pool_from_sweeps(sweeps: Sequence, names: Sequence[str], mcfg) -> SweepPool:
    from ultrasound_ai.freehand.moglo.model import PARAM_CONVENTION
    from ultrasound_ai.freehand.sweep_windows import grid_geometry, relative_params, resample_frames

    spacing = (mcfg.pixel_spacing_mm, mcfg.pixel_spacing_mm)
    frames, targets, tforms = [], [], []
    for sweep, name in zip(sweeps, names):
        if sweep.tforms is None:
            raise InputError(f"training sweep {name}: has no 'tforms' (ground truth needed for training)")
        geom = grid_geometry(sweep.frames.shape[1:], sweep.pixel_spacing_xy, mcfg.frame_shape, spacing)
        f = resample_frames(sweep.frames, geom)
        if np.allclose(geom.offset_mm, 0) and sweep.frames.shape[1:] == tuple(mcfg.frame_shape):
            f = sweep.frames  # already on the grid: keep uint8 (4x less memory)
        frames.append(f)
        targets.append(relative_params(sweep.tforms, geom, PARAM_CONVENTION).astype(np.float32))
        t = np.asarray(sweep.tforms, dtype=np.float64) @ geom.shift()  # grid image-mm -> world
        tforms.append(np.linalg.inv(t[0]) @ t)
    return SweepPool(frames, targets, tforms, list(names), spacing, mcfg.frame_shape)


_SHARED_DATA_KEYS = ("source", "tactic", "sim_pixel_spacing_mm", "sim_spacing_jitter", "motion",
                     "appearance")  # pool cache key


def build_pool(kind: str, d: Mapping, mcfg, progress: Callable[[str], None] | None = None) -> SweepPool:
    """The training ("train") or validation ("val") pool for data options `d`, cached per process."""
    key = json.dumps([kind, {k: d[k] for k in sorted(d) if k.startswith(kind) or k in _SHARED_DATA_KEYS},
                      list(mcfg.frame_shape), mcfg.pixel_spacing_mm], sort_keys=True, default=str)
    if key in _POOLS:
        return _POOLS[key]
    if d["source"] == "folder":
        from ultrasound_ai.io.sweep import read_sweep

        paths = sorted(Path(d[f"{kind}_dir"]).glob("*.h5"))
        if not paths:
            raise InputError(f"data.{kind}_dir {d[f'{kind}_dir']}: no .h5 sweep files found")
        sweeps, names = [read_sweep(p) for p in paths], [p.name for p in paths]
    else:
        from ultrasound_ai.freehand.simulation.simulator import simulate_sweep_for_grid

        seed0, count, n = d[f"{kind}_seed"], d[f"{kind}_sweeps"], d[f"{kind}_frames"]
        sweeps, names = [], []
        for i in range(count):
            if progress is not None:
                progress(f"simulating {kind} sweep {i + 1}/{count}")
            sweeps.append(simulate_sweep_for_grid(seed0 + i, n, mcfg.frame_shape, mcfg.pixel_spacing_mm,
                                                  d["sim_pixel_spacing_mm"], d["sim_spacing_jitter"],
                                                  tactic=d["tactic"], n_imus=0, motion=d["motion"],
                                                  appearance=d["appearance"]))
            names.append(f"sim-{seed0 + i}")
    pool = _pool_from_sweeps(sweeps, names, mcfg)
    _POOLS[key] = pool
    return pool


def draw_clips(pool: SweepPool, rng: np.random.Generator, n_clips: int, clip_frames: int,
               strides: Sequence[int] = (1,), mirror: bool | str = False):
    """(frames [B, T, h, w] float32, targets [B, T-1, 6] float32) of random clips from the pool: for each
    clip a stride k from `strides`, a sweep long enough for it, a start; frames s, s+k, ..., s+(T-1)k.
    mirror: a clip whose grid centre moves backwards over it gets its targets mirrored (data.clip_mirror);
    "pairs": each pair whose grid centre moves backwards, on its own."""
    from ultrasound_ai.freehand.moglo.method import centre_dz, forward_params, mirror_params
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    centre = frame_centre_mm(pool.frame_shape_hw, pool.spacing_xy)
    xs, ys = [], []
    span = {int(k): (clip_frames - 1) * int(k) + 1 for k in strides}
    if not any(len(f) >= span[min(span)] for f in pool.frames):
        raise InputError(f"training pool: no sweep has the {clip_frames} frames of one clip")
    for _ in range(n_clips):
        k = int(strides[int(rng.integers(len(strides)))]) if len(strides) > 1 else int(strides[0])
        usable = [i for i, f in enumerate(pool.frames) if len(f) >= span[k]]
        if not usable:  # this stride does not fit any sweep: fall back to the smallest
            k = min(span)
            usable = [i for i, f in enumerate(pool.frames) if len(f) >= span[k]]
        i = usable[int(rng.integers(len(usable)))]
        s = int(rng.integers(len(pool.frames[i]) - span[k] + 1))
        xs.append(np.asarray(pool.frames[i][s:s + span[k]:k], dtype=np.float32))
        y = pool.strided_targets(k)[i][s:s + span[k] - 1:k]
        if mirror == "pairs":
            y = forward_params(y, centre)
        elif mirror and centre_dz(y, centre).sum() < 0:
            y = mirror_params(y)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.float32))


# --------------------------------------------------------------------------------------------- task

# The card's inference defaults of a model trained with data.clip_mirror: its clips' signs linked, or (pairs) each
# pair forward and then the direction from the frames' order.
_MIRROR_INFERENCE = {"backwards": {"sign_linking": True, "direction": "forward"},
                     "nearest": {"sign_linking": True, "direction": "forward"},
                     "pairs": {"direction": "ordering"}}


class MogloTask:
    """The harness's TrainingTask for MoGLo-Net. `train_pool` / `val_pool` (SweepPool) replace the
    configured pools (tests)."""

    def __init__(self, train_pool: SweepPool | None = None, val_pool: SweepPool | None = None):
        self._train_override, self._val_override = train_pool, val_pool
        self._loss_opts = {"weighted": True, "triplet_weight": 0.005, "margin": 0.1}

    def _pools(self, config: TrainConfig, kind: str) -> SweepPool:
        override = self._train_override if kind == "train" else self._val_override
        if override is not None:
            return override
        return build_pool(kind, data_options(config), model_config(config))

    def build_model(self, config: TrainConfig):
        from ultrasound_ai.freehand.moglo.model import MogloNet

        d = data_options(config)
        self._loss_opts = {"weighted": bool(d["weighted_l1"]), "triplet_weight": float(d["triplet_weight"]),
                           "margin": float(d["triplet_margin"])}
        mcfg = model_config(config)
        model = MogloNet(mcfg)
        self._strides, self._mirror = list(d["frame_strides"]), bool(d["clip_mirror"])
        pool = self._pools(config, "train")
        y = pool.training_targets(self._strides).astype(np.float64)
        if self._mirror:  # the statistics of forward pairs (clip-mirrored targets are mostly forward)
            from ultrasound_ai.freehand.moglo.method import forward_params
            from ultrasound_ai.validation.pose_agreement import frame_centre_mm

            y = forward_params(y, frame_centre_mm(pool.frame_shape_hw, pool.spacing_xy))
        model.set_normalisation(y.mean(0), np.maximum(y.std(0), 1e-3))
        init = (config.model or {}).get("init_from")
        if init:  # fine-tuning: every weight and the normalisation buffers from a moglo checkpoint
            from ultrasound_ai.models.loading import load_initial_weights

            load_initial_weights(model, init, METHOD, same_keys=("frame_shape",))
        return model

    def batches(self, config: TrainConfig, rank: int, world_size: int, start_step: int) -> Iterator:
        pool = self._pools(config, "train")
        t = model_config(config).clip_frames
        strides = data_options(config)["frame_strides"]
        step = start_step
        while True:
            rng = step_numpy_rng(config.seed, rank, step)
            mode = data_options(config)["clip_mirror"]
            frames, targets = draw_clips(pool, rng, config.schedule["batch_size"], t, strides,
                                         mirror=mode if mode in ("backwards", "pairs") else False)
            if mode == "nearest":
                from ultrasound_ai.freehand.moglo.method import mirror_params

                mirrored = torch.from_numpy(mirror_params(targets.double().numpy()).astype(np.float32))
                yield frames, targets, int(rng.integers(2 ** 31)), mirrored
            else:
                yield frames, targets, int(rng.integers(2 ** 31))
            step += 1

    def training_step(self, model, batch, device) -> dict:
        from ultrasound_ai.freehand.moglo.losses import moglo_loss

        frames, targets, triplet_seed = batch[:3]
        frames, targets = frames.to(device), targets.to(device)
        inner = model.module if hasattr(model, "module") else model
        out = model(frames)
        if len(batch) > 3:  # clip_mirror "nearest": per clip the branch (targets or mirror) nearer the prediction
            with torch.no_grad():
                raw = 0.5 * (out.local_raw + out.global_raw)
                mirrored = batch[3].to(device)
                far = ((raw - inner.normalise(targets)).abs().sum((1, 2))
                       > (raw - inner.normalise(mirrored)).abs().sum((1, 2)))
            targets = torch.where(far[:, None, None], mirrored, targets)
        g = torch.Generator().manual_seed(int(triplet_seed))
        terms = dict(moglo_loss(out.local_raw, out.global_raw, inner.normalise(targets), out.embedding,
                                weighted=self._loss_opts["weighted"], triplet_weight=self._loss_opts["triplet_weight"],
                                margin=self._loss_opts["margin"], generator=g))
        terms["tz_mae_mm"] = (out.params[..., 2] - targets[..., 2]).abs().mean().detach()
        return terms

    def validate(self, model, config: TrainConfig, device) -> dict:
        from ultrasound_ai.freehand.moglo.method import predict_pairs, predict_pairs_linked

        d = data_options(config)
        pool = self._pools(config, "val")
        inner = model.module if hasattr(model, "module") else model
        const = inner.param_mean.double().cpu().numpy()
        if d["clip_mirror"] == "pairs":  # each pair forward (the frames' order is for whole sweeps, at inference)
            from ultrasound_ai.freehand.moglo.method import forward_params
            from ultrasound_ai.validation.pose_agreement import frame_centre_mm

            centre = frame_centre_mm(pool.frame_shape_hw, pool.spacing_xy)
            preds = [forward_params(predict_pairs(inner, f, overlap=d["val_overlap"], device=device), centre)
                     for f in pool.frames]
        elif d["clip_mirror"]:
            preds = [predict_pairs_linked(inner, f, forward=True, device=device) for f in pool.frames]
        else:
            preds = [predict_pairs(inner, f, overlap=d["val_overlap"], device=device) for f in pool.frames]
        return validation_metrics(preds, pool, const)

    def card(self, config: TrainConfig, metrics: Mapping[str, float]) -> dict:
        from ultrasound_ai.freehand.moglo.model import PARAM_CONVENTION
        from ultrasound_ai.freehand.simulation.simulator import SIMULATOR_VERSION

        d = data_options(config)
        mcfg = model_config(config)
        training: dict = {"loss": (f"weighted L1 ((|y|+2)^1) + (1 - cosine) + {d['triplet_weight']} x triplet "
                                   f"(margin {d['triplet_margin']}) on normalised parameters; heads averaged"),
                          "clip_sampling": "uniform stride, uniform sweep, uniform start, per step from (seed, rank, step)",
                          "frame_strides": list(d["frame_strides"]), "clip_mirror": d["clip_mirror"]}
        if config.model.get("init_from"):
            training["init_from"] = str(config.model["init_from"])
        if self._train_override is not None:
            training["data"] = "sweep pools supplied by the caller"
            training["train_sweeps"] = list(self._train_override.names)
            training["val_sweeps"] = list((self._val_override or self._train_override).names)
        elif d["source"] == "simulate":
            training.update(simulator="ultrasound_ai.freehand.simulation.simulator", simulator_version=SIMULATOR_VERSION,
                            train_seeds=[d["train_seed"], d["train_seed"] + d["train_sweeps"] - 1],
                            train_frames=d["train_frames"],
                            val_seeds=[d["val_seed"], d["val_seed"] + d["val_sweeps"] - 1], val_frames=d["val_frames"],
                            tactic=d["tactic"] or "random", motion=d["motion"], appearance=d["appearance"])
        else:
            training.update(train_dir=str(d["train_dir"]), val_dir=str(d["val_dir"]))
        return {
            "method": METHOD,
            "description": f"MoGLo-Net ({config.model.get('preset', 'shipped')} size), images only",
            "configuration": {"preset": config.model.get("preset", "shipped"), **mcfg.to_dict()},
            "input": {
                "frame_shape_hw": list(mcfg.frame_shape),
                "pixel_spacing_mm": [mcfg.pixel_spacing_mm, mcfg.pixel_spacing_mm],
                "clip_frames": mcfg.clip_frames,
                "imus": 0,
                "intensity_normalisation": ("uint8 0..255 -> per frame (x - mean) / (3 sd), sd >= 1 (in the network)"
                                            if mcfg.input_normalisation == "frame"
                                            else "uint8 0..255 -> x / 127.5 - 1 (in the network)"),
                "resampling": ("frames resampled onto a grid of frame_shape_hw at pixel_spacing_mm (x first) "
                               "centred laterally, from the top row (transducer face) in depth; linear, anti-aliased "
                               "when shrinking; 0 outside"),
                "output": (f"per pair (tx, ty, tz) mm + Euler degrees '{PARAM_CONVENTION}' (intrinsic, "
                           "R = Ry Rz Rx) of T_i<-i+1 on the grid; local and global heads averaged"),
            },
            "training": training,
            **({"inference": dict(_MIRROR_INFERENCE[d["clip_mirror"]])} if d["clip_mirror"] else {}),
        }


def validation_metrics(preds: Sequence[np.ndarray], pool: SweepPool, const: np.ndarray) -> dict:
    """Metrics of per-sweep pair predictions against the pool's targets (module docstring)."""
    from ultrasound_ai.core.geometry import chain_relative, params_to_matrix
    from ultrasound_ai.freehand.metrics import fdr
    from ultrasound_ai.freehand.moglo.model import PARAM_CONVENTION
    from ultrasound_ai.validation.pose_agreement import out_of_plane_correlation, rescale_translations

    tz, tz_c, t_err, a_err, fdrs, fdrs_c, rs, scaled, scaled_c = [], [], [], [], [], [], [], [], []
    for p, y, truth in zip(preds, pool.targets, pool.tforms):
        y = y.astype(np.float64)
        tz.append(np.abs(p[:, 2] - y[:, 2]))
        tz_c.append(np.abs(const[2] - y[:, 2]))
        t_err.append(np.abs(p[:, :3] - y[:, :3]).ravel())
        a_err.append(np.abs(p[:, 3:] - y[:, 3:]).ravel())
        for params, out, out_s in ((p, fdrs, scaled), (np.broadcast_to(const, p.shape), fdrs_c, scaled_c)):
            est = chain_relative(params_to_matrix(params, PARAM_CONVENTION, degrees=True))
            out.append(fdr(est, truth, pool.frame_shape_hw, pool.spacing_xy))
            # FDR after one least-squares scale of the centre translations per sweep (issue 15's criterion)
            est_s = rescale_translations(est, truth, pool.frame_shape_hw, pool.spacing_xy)[1]
            out_s.append(fdr(est_s, truth, pool.frame_shape_hw, pool.spacing_xy))
            if out is fdrs:  # does the speed follow the images (issue 15's correlation; None: constant truth)
                rs.append(out_of_plane_correlation(est, truth, pool.frame_shape_hw, pool.spacing_xy))
    rs = [r for r in rs if r is not None]
    cat = np.concatenate
    return {"tz_mae_mm": float(cat(tz).mean()), "tz_mae_const_mm": float(cat(tz_c).mean()),
            "t_mae_mm": float(cat(t_err).mean()), "angle_mae_deg": float(cat(a_err).mean()),
            "fdr_pct": float(np.mean(fdrs)), "fdr_const_pct": float(np.mean(fdrs_c)),
            "oop_r": float(np.mean(rs)) if rs else 0.0, "fdr_scaled_pct": float(np.mean(scaled)),
            "fdr_scaled_const_pct": float(np.mean(scaled_c))}


def train_moglo(config, progress: Callable[[float, str], None] | None = None,
                cancel_check: Callable[[], None] | None = None, *, resume: bool = True,
                train_pool: SweepPool | None = None, val_pool: SweepPool | None = None,
                progress_bar: bool | None = None) -> TrainResult:
    """Train MoGLo-Net; `config` is a path (YAML/JSON), a mapping or a TrainConfig, laid over DEFAULT_CONFIG.
    Returns the harness's TrainResult (final.pt and best.pt with their cards, log.csv, last.pt)."""
    cfg = load_config(config, defaults=DEFAULT_CONFIG) if not isinstance(config, TrainConfig) else config
    if cfg.method != METHOD:
        raise InputError(f"training config method: expected {METHOD!r}, got {cfg.method!r}")
    d = data_options(cfg)
    mcfg = model_config(cfg)
    if train_pool is None:
        # Simulate the pools before the harness starts, reporting progress (minutes on CPU).
        note = (lambda msg: progress(0.0, msg)) if progress is not None else None
        build_pool("train", d, mcfg, note)
        build_pool("val", d, mcfg, note)
    task = MogloTask(train_pool=train_pool, val_pool=val_pool)
    return train(cfg, task, resume=resume, progress=progress, cancel_check=cancel_check, progress_bar=progress_bar)
