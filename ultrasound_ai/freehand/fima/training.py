"""FiMA (and its ablations ReM', ReM, ReM+F', ReM+F) training through the harness (`core.training.train`).

Data: a pool of sweeps made once per process (cached by its settings) and re-cut into random windows at
every step. ``data.source: simulate`` simulates the sweeps over the model's grid (at
``data.sim_pixel_spacing_mm``, then resampled like any input; with ``n_imus`` IMUs for the IMU variants);
``data.source: folder`` reads sweep files
(``*.h5`` with ``tforms``, and IMU data for the IMU variants) and resamples their frames onto the grid
(`sweep_windows`, grid from the top row; the grid offset is carried into the targets).

A window is N frames of one sweep, N drawn per step from ``data.window_frames`` (default: the model's
``window_frames``, which is also the window length of inference). With ``data.frame_strides`` the frames
are taken every k-th: ``stride_mode: pair`` (default) draws k per pair, so the apparent speed varies inside
a window as in a real freehand sweep; ``stride_mode: window`` one k per window (MoGLo-Net's augmentation).
Several strides show one anatomy at several speeds, so speed must be read from speckle decorrelation and
cannot be memorised per sweep. Per-pair strides also keep the Pearson term meaningful: inside a
constant-stride window of a steady sweep the targets vary only by tremor, and correlating with that noise
held a tiny model back (measured). Targets per pair: (tx, ty, tz mm, static-xyz degrees) of T_{a<-b} on
the grid for the pair's frames a, b, the network's own output convention (`fima.model`). IMU inputs come
from `imu_pair_inputs` on the IMU samples of the window's own frames, so a strided pair's relative angle
is R_a^T R_b and its acceleration the mean of frames a and b (recomputed, never summed from consecutive
pairs). ``data.imu_subsets``: for the adaptive fusion, each batch uses a random non-empty subset of the
IMUs, so that a model trained with 4 IMUs also serves a probe with fewer. ``data.gravity_augment`` (default
on): each window is also seen with the whole scene turned by a uniformly random rotation (`turn_gravity`):
only the gravity part of the specific force changes, so the gravity direction cannot identify a training
sweep (without it, a small pool was memorised through the IMUs: good validation, poor held-out sweeps).

Batch for step s: ``batch_size`` windows (one N per step so they stack) drawn from
`step_numpy_rng(seed, rank, s)`. Loss: `fima.losses.supervised_loss` (paper eq. 2: L1 on translations +
1.745 x L1 on degrees (the authors' x100 on radians) + ``data.pearson_weight`` x (1 - Pearson) per
parameter across each window's pairs). Optimiser: Adam at the paper's initial lr 2e-4; the paper halves it
every 30 of 200 epochs, here a cosine decay to 5 % over ``schedule.steps`` (run-length independent, and it
survives raising the steps on resume); both are configurable (``schedule.lr_schedule: step``, gamma 0.5).
The head's bias starts at the training pool's mean motion (its weights scaled by 0.1), so training starts
from the constant-motion predictor instead of from noise.

Batch norm: training normalises with the statistics of small batches of a few sweeps, and the running
averages lag the moving weights; evaluated with them, estimates shifted by tenths of a millimetre between
validations (measured). Before each validation (and so before best.pt / final.pt are written) the running
statistics are re-estimated on ``data.bn_recalibration_batches`` fixed training batches
(`recalibrate_batch_norm`); training itself never reads them.

Validation on fixed held-out sweeps (whole sweeps through `fima.method.predict_pairs`, all IMUs, no online
alignment): ``tz_mae_mm`` (first: picks best.pt) the mean absolute error of the out-of-plane translation per
pair, ``tz_mae_const_mm`` the same for the constant-motion predictor (training-pool mean at the strides
trained on), ``t_mae_mm``, ``angle_mae_deg``, ``fdr_pct`` (Luo) and ``fdr_const_pct``.

Command::

    ultrasound-ai freehand train --method fima --config C.yaml --out runs/fima
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.training import TrainConfig, TrainResult, load_config, step_numpy_rng, train

__all__ = ["DEFAULT_CONFIG", "DATA_DEFAULTS", "PARAM_CONVENTION", "FimaTask", "FimaPool", "train_fima",
           "model_config", "data_options", "build_pool", "pool_from_sweeps", "window_indices", "pair_targets",
           "draw_windows", "validation_metrics"]

METHOD = "fima"
# The network's output angles (fima.model): static x, y, z rotations, R = Rz Ry Rx, degrees.
PARAM_CONVENTION = "xyz"

DATA_DEFAULTS: dict[str, Any] = {
    "source": "simulate",  # simulate | folder
    "train_seed": 300000,
    "train_sweeps": 24,
    "train_frames": 120,
    "val_seed": 400000,
    "val_sweeps": 4,
    "val_frames": 120,
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
    "window_frames": None,  # [min, max] frames per training window; None = the model's window_frames
    "frame_strides": [1],
    "stride_mode": "pair",  # pair: a stride per pair (speed varies in a window) | window: one per window
    "imu_subsets": False,
    # Each training window is also seen as if the whole scene were turned by a random rotation: the
    # relative rotations are unchanged, the gravity in the specific force turns with it. Without it the
    # gravity direction identifies a training sweep, and a small pool is memorised through the IMUs.
    "gravity_augment": True,
    "pearson_weight": 1.0,
    # Batch-norm statistics re-estimated on this many training batches before each validation (0: off).
    "bn_recalibration_batches": 16,
}

DEFAULT_CONFIG: dict[str, Any] = {
    "method": METHOD,
    "name": "fima_shipped",
    "output_dir": "runs/fima_shipped",
    "seed": 0,
    "device": "auto",
    "data": {},
    "model": {"preset": "shipped", "variant": "fima"},
    "schedule": {
        "steps": 5000,
        "batch_size": 2,
        "optimizer": "adam",
        "lr": 2e-4,
        "weight_decay": 0.0,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "min_lr_ratio": 0.05,
        "step_size": 750,  # used only with lr_schedule "step": halve every 15 % of a 5000-step run
        "gamma": 0.5,
        "grad_clip": 5.0,
        "log_every": 20,
        "validate_every": 250,
        "checkpoint_every": 250,
        "best_metric": "tz_mae_mm",
        "best_mode": "min",
    },
}


# ------------------------------------------------------------------------------------------ options


def _int_list(value, key: str, minimum: int) -> list:
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= minimum for k in value)):
        raise InputError(f"data.{key}: expected a non-empty list of integers >= {minimum}, got {value!r}")
    return [int(k) for k in value]


def data_options(config) -> dict:
    """The data section laid over DATA_DEFAULTS and checked (InputError naming the key)."""
    raw = config.data if isinstance(config, TrainConfig) else dict(config)
    unknown = sorted(set(raw) - set(DATA_DEFAULTS))
    if unknown:
        raise InputError(f"fima training config data: unknown key(s) {unknown}; expected some of {sorted(DATA_DEFAULTS)}")
    d = {**copy.deepcopy(DATA_DEFAULTS), **copy.deepcopy(dict(raw))}
    if d["source"] not in ("simulate", "folder"):
        raise InputError(f"data.source: expected 'simulate' or 'folder', got {d['source']!r}")
    if d["source"] == "folder":
        for key in ("train_dir", "val_dir"):
            if not d[key] or not Path(d[key]).is_dir():
                raise InputError(f"data.{key}: expected a folder of sweep files (.h5), got {d[key]!r}")
    for key in ("train_sweeps", "train_frames", "val_sweeps", "val_frames"):
        if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < (2 if key.endswith("frames") else 1):
            raise InputError(f"data.{key}: expected a positive integer (frames >= 2), got {d[key]!r}")
    d["frame_strides"] = _int_list(d["frame_strides"], "frame_strides", 1)
    if d["window_frames"] is not None:
        w = _int_list(d["window_frames"], "window_frames", 2)
        if len(w) != 2 or w[0] > w[1]:
            raise InputError(f"data.window_frames: expected [min, max] with 2 <= min <= max, got {d['window_frames']!r}")
        d["window_frames"] = w
    if d["stride_mode"] not in ("window", "pair"):
        raise InputError(f"data.stride_mode: expected 'window' or 'pair', got {d['stride_mode']!r}")
    for key in ("imu_subsets", "gravity_augment"):
        if not isinstance(d[key], bool):
            raise InputError(f"data.{key}: expected true or false, got {d[key]!r}")
    from ultrasound_ai.freehand.simulation.simulator import check_acquisition_options

    check_acquisition_options(d)
    nb = d["bn_recalibration_batches"]
    if isinstance(nb, bool) or not isinstance(nb, int) or nb < 0:
        raise InputError(f"data.bn_recalibration_batches: expected an integer >= 0, got {nb!r}")
    pw = d["pearson_weight"]
    if isinstance(pw, bool) or not isinstance(pw, (int, float)) or not np.isfinite(pw) or pw < 0:
        raise InputError(f"data.pearson_weight: expected a number >= 0, got {pw!r}")
    d["pearson_weight"] = float(pw)
    return d


def model_config(config):
    """FimaConfig from config.model = {"preset": ..., "variant": ..., overrides...}."""
    from ultrasound_ai.freehand.fima.model import make_config

    raw = dict(config.model if isinstance(config, TrainConfig) else config)
    raw.pop("init_from", None)  # a checkpoint to start from (FimaTask.build_model), not an architecture key
    preset = raw.pop("preset", "shipped")
    variant = raw.pop("variant", "fima")
    return make_config(preset, variant, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})


def window_range(d: Mapping, mcfg) -> tuple[int, int]:
    lo, hi = d["window_frames"] if d["window_frames"] is not None else mcfg.window_frames
    return int(lo), int(hi)


# --------------------------------------------------------------------------------------------- pool


class FimaPool:
    """Sweeps on the network grid: frames [N, h, w] (uint8 or float32, 0..255), targets [N-1, 6] (static
    xyz), true tforms [N, 4, 4] (grid image-mm relative to frame 0, for FDR), IMU arrays [M, N, 3] per sweep
    (or None), names."""

    def __init__(self, frames: list, targets: list, tforms: list, imu_acc: list, imu_euler: list, names: list,
                 spacing_xy, frame_shape_hw):
        self.frames, self.targets, self.tforms, self.names = frames, targets, tforms, names
        self.imu_acc, self.imu_euler = imu_acc, imu_euler
        self.spacing_xy = tuple(float(v) for v in spacing_xy)
        self.frame_shape_hw = tuple(int(v) for v in frame_shape_hw)
        self._strided: dict[int, list] = {}

    def __len__(self):
        return len(self.frames)

    @property
    def n_imus(self) -> int:
        """IMUs per sweep when every sweep has the same number (0: at least one sweep has none)."""
        counts = {0 if a is None else int(a.shape[0]) for a in self.imu_acc}
        return counts.pop() if len(counts) == 1 else 0

    def strided_targets(self, stride: int) -> list:
        """Per sweep, the targets [N-stride, 6] of the pairs (i, i+stride) (stride 1: `targets`)."""
        if stride == 1:
            return self.targets
        if stride not in self._strided:
            from ultrasound_ai.core.geometry import invert_rigid, matrix_to_params

            out = []
            for t in self.tforms:
                if len(t) <= stride:
                    out.append(np.zeros((0, 6), np.float32))
                    continue
                rel = invert_rigid(t[:-stride]) @ t[stride:]
                out.append(matrix_to_params(rel, PARAM_CONVENTION, degrees=True).astype(np.float32))
            self._strided[stride] = out
        return self._strided[stride]

    def training_targets(self, strides: Sequence[int]) -> np.ndarray:
        """All pair targets at the given frame strides (the constant-motion predictor's statistics)."""
        return np.concatenate([y for k in strides for y in self.strided_targets(int(k))], 0)


_POOLS: dict[str, FimaPool] = {}
# Batch-norm recalibration draws its batches as if at steps 2^40, 2^40 + 1, ...: never a training step's.
_RECALIBRATION_STEP = 2 ** 40


def pool_from_sweeps(sweeps: Sequence, names: Sequence[str], mcfg) -> FimaPool:
    """A FimaPool of `sweeps` (io.sweep.Sweep with tforms) on the grid of model config `mcfg`."""
    from ultrasound_ai.freehand.sweep_windows import grid_geometry, relative_params, resample_frames

    spacing = (mcfg.pixel_spacing_mm, mcfg.pixel_spacing_mm)
    frames, targets, tforms, accs, euls = [], [], [], [], []
    for sweep, name in zip(sweeps, names):
        if sweep.tforms is None:
            raise InputError(f"training sweep {name}: has no 'tforms' (ground truth needed for training)")
        geom = grid_geometry(sweep.frames.shape[1:], sweep.pixel_spacing_xy, mcfg.frame_shape, spacing)
        if np.allclose(geom.offset_mm, 0) and tuple(sweep.frames.shape[1:]) == tuple(mcfg.frame_shape):
            f = sweep.frames  # already on the grid: keep uint8 (4x less memory)
        else:
            f = resample_frames(sweep.frames, geom)
        frames.append(f)
        targets.append(relative_params(sweep.tforms, geom, PARAM_CONVENTION).astype(np.float32))
        t = np.asarray(sweep.tforms, dtype=np.float64) @ geom.shift()  # grid image-mm -> world
        tforms.append(np.linalg.inv(t[0]) @ t)
        # IMU axes are the image axes and the grid only shifts the origin, so the IMU data carry over as they are.
        accs.append(None if sweep.imu_acc is None else np.asarray(sweep.imu_acc, np.float32))
        euls.append(None if sweep.imu_euler_deg is None else np.asarray(sweep.imu_euler_deg, np.float32))
    return FimaPool(frames, targets, tforms, accs, euls, list(names), spacing, mcfg.frame_shape)


_SHARED_DATA_KEYS = ("source", "tactic", "sim_pixel_spacing_mm", "sim_spacing_jitter", "motion",
                     "appearance")  # pool cache key


def build_pool(kind: str, d: Mapping, mcfg, progress: Callable[[str], None] | None = None) -> FimaPool:
    """The training ("train") or validation ("val") pool for data options `d`, cached per process."""
    n_imus = mcfg.n_imus if mcfg.uses_imus else 0
    key = json.dumps([kind, {k: d[k] for k in sorted(d) if k.startswith(kind) or k in _SHARED_DATA_KEYS},
                      list(mcfg.frame_shape), mcfg.pixel_spacing_mm, n_imus], sort_keys=True, default=str)
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
                                                  tactic=d["tactic"], n_imus=n_imus, motion=d["motion"],
                                                  appearance=d["appearance"]))
            names.append(f"sim-{seed0 + i}")
    pool = pool_from_sweeps(sweeps, names, mcfg)
    _POOLS[key] = pool
    return pool


def check_pool(pool: FimaPool, mcfg, what: str, min_frames: int) -> None:
    """Refuse a pool the variant cannot train or validate on (InputError naming the sweep)."""
    if len(pool) == 0:
        raise InputError(f"{what}: no sweeps")
    if mcfg.uses_imus:
        for name, a in zip(pool.names, pool.imu_acc):
            if a is None:
                raise InputError(f"{what} sweep {name}: no IMU data; variant {mcfg.variant!r} fuses IMUs "
                                 "(expected imu_acc and imu_euler_deg [M, N, 3])")
        m = pool.n_imus
        if m == 0:
            counts = sorted({int(a.shape[0]) for a in pool.imu_acc})
            raise InputError(f"{what}: the sweeps have different IMU counts {counts}; one count is needed")
        if mcfg.fusion == "linear" and m != mcfg.n_imus:
            raise InputError(f"{what}: the sweeps have {m} IMUs; variant {mcfg.variant!r} (linear fusion) was "
                             f"configured for n_imus = {mcfg.n_imus}")
    longest = max(len(f) for f in pool.frames)
    if longest < min_frames:
        raise InputError(f"{what}: the longest sweep has {longest} frames, fewer than the {min_frames} of the "
                         "shortest training window (data.window_frames)")


def window_indices(rng: np.random.Generator, n_frames: int, strides: Sequence[int], mode: str,
                   lengths: Sequence[int]) -> tuple[int, np.ndarray]:
    """(sweep index, frame indices [n_frames]) of one training window.

    mode "window": one stride k per window, frames s, s+k, ..., s+(n-1)k. mode "pair": a stride per pair,
    so the apparent speed varies inside the window as in a real freehand sweep. A sweep too short for the
    drawn strides falls back to the smallest stride."""
    ks = np.asarray(strides, dtype=np.int64)
    if mode == "pair":
        steps = ks[rng.integers(len(ks), size=n_frames - 1)]
    else:
        steps = np.full(n_frames - 1, ks[int(rng.integers(len(ks)))])
    span = int(steps.sum()) + 1
    usable = [i for i, n in enumerate(lengths) if n >= span]
    if not usable:
        steps = np.full(n_frames - 1, int(ks.min()))
        span = int(steps.sum()) + 1
        usable = [i for i, n in enumerate(lengths) if n >= span]
    i = usable[int(rng.integers(len(usable)))]
    s = int(rng.integers(lengths[i] - span + 1))
    return i, s + np.concatenate([[0], np.cumsum(steps)])


def pair_targets(tforms: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Targets [len(idx)-1, 6] (mm, static-xyz degrees) of T_{a<-b} = inv(T_a) T_b for consecutive a, b in idx."""
    from ultrasound_ai.core.geometry import invert_rigid, matrix_to_params

    t = tforms[idx]
    return matrix_to_params(invert_rigid(t[:-1]) @ t[1:], PARAM_CONVENTION, degrees=True).astype(np.float32)


def turn_gravity(imu_acc: np.ndarray, imu_euler_deg: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Specific force [M, n, 3] (m/s^2, IMU axes) of the same motion with the whole scene turned by the
    rotation q [3, 3] (Earth frame); imu_euler_deg [M, n, 3] the IMU orientations (static-xyz degrees).

    With f = R^T (a - g): turning the scene maps R -> qR and a -> qa while g stays, so
    f' = R^T q^T (q a - g) = f + R^T (g - q^T g); relative rotations R_i^T R_j are unchanged.
    """
    from ultrasound_ai.freehand.imu_dead_reckoning import GRAVITY_M_S2, imu_rotations

    rot = imu_rotations(imu_euler_deg)  # [M, n, 3, 3]
    delta = GRAVITY_M_S2 - q.T @ GRAVITY_M_S2
    return (np.asarray(imu_acc, np.float64) + np.einsum("mnji,j->mni", rot, delta)).astype(np.float32)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (a normalised Gaussian quaternion)."""
    w, x, y, z = (v := rng.normal(size=4)) / np.linalg.norm(v)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def draw_windows(pool: FimaPool, rng: np.random.Generator, n_windows: int, n_frames: int,
                 strides: Sequence[int] = (1,), imus: Optional[Sequence[int]] = None, with_imus: bool = False,
                 stride_mode: str = "window", gravity_augment: bool = False):
    """One batch: frames [B, n, h, w] float32, targets [B, n-1, 6], IMU acc / angle [B, n-1, M, 3] (or None).

    Each window's frames come from `window_indices` (a sweep, a start, strides from `strides`).
    `imus`: the IMU indices to use (default all). `gravity_augment`: each window's scene turned by a
    random rotation (`turn_gravity`).
    """
    from ultrasound_ai.freehand.fima.model import imu_pair_inputs

    lengths = [len(f) for f in pool.frames]
    if max(lengths) < n_frames:
        raise InputError(f"training pool: no sweep has the {n_frames} frames of one window")
    xs, ys, raw = [], [], []
    for _ in range(n_windows):
        i, idx = window_indices(rng, n_frames, strides, stride_mode, lengths)
        xs.append(np.asarray(pool.frames[i][idx], dtype=np.float32))
        ys.append(pair_targets(pool.tforms[i], idx))
        if with_imus:
            a, e = pool.imu_acc[i], pool.imu_euler[i]
            if imus is not None:
                a, e = a[list(imus)], e[list(imus)]
            raw.append((a[:, idx], e[:, idx]))
    accs, angs = [], []
    for a, e in raw:
        if gravity_augment:  # drawn after the windows: the windows are the same with or without it
            a = turn_gravity(a, e, random_rotation(rng))
        # Pair inputs of the selected frames themselves (frames a and b of each pair), never sums of
        # consecutive pairs: the relative rotation R_a^T R_b and the mean specific force of a and b.
        pa, pr = imu_pair_inputs(a, e)
        accs.append(pa)
        angs.append(pr)
    frames = torch.from_numpy(np.stack(xs))
    targets = torch.from_numpy(np.stack(ys))
    if not with_imus:
        return frames, targets, None, None
    return frames, targets, torch.stack(accs), torch.stack(angs)


@torch.no_grad()
def recalibrate_batch_norm(model, batches, device) -> int:
    """Replace every BatchNorm's running statistics by their plain average over `batches` (forward passes
    in train mode, no gradients); returns the number of BatchNorm layers. Training normalises with batch
    statistics, so the running averages (momentum 0.1 over small batches of a few sweeps, while the weights
    move) can be far from what the current weights produce; inference with them shifts every estimate.
    Re-estimating them for the current weights is the usual fix ("update_bn"); it does not change training,
    which never reads the running statistics."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        for frames, _, acc, ang in batches:
            model(frames.to(device), None if acc is None else acc.to(device), None if ang is None else ang.to(device))
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
    return len(norms)


# --------------------------------------------------------------------------------------------- task


class FimaTask:
    """The harness's TrainingTask for FiMA and its ablations. `train_pool` / `val_pool` (FimaPool) replace
    the configured pools (tests)."""

    def __init__(self, train_pool: FimaPool | None = None, val_pool: FimaPool | None = None):
        self._train_override, self._val_override = train_pool, val_pool
        self._const: Optional[np.ndarray] = None
        self._pearson_weight = DATA_DEFAULTS["pearson_weight"]

    def _pools(self, config: TrainConfig, kind: str) -> FimaPool:
        override = self._train_override if kind == "train" else self._val_override
        if override is not None:
            return override
        return build_pool(kind, data_options(config), model_config(config))

    def constant_motion(self, config: TrainConfig) -> np.ndarray:
        """The constant-motion predictor: the mean pair motion of the training pool at the trained strides."""
        if self._const is None:
            d = data_options(config)
            self._const = self._pools(config, "train").training_targets(d["frame_strides"]).astype(np.float64).mean(0)
        return self._const

    def build_model(self, config: TrainConfig):
        from ultrasound_ai.freehand.fima.model import FimaNet

        d = data_options(config)
        mcfg = model_config(config)
        self._pearson_weight = d["pearson_weight"]
        lo, _ = window_range(d, mcfg)
        check_pool(self._pools(config, "train"), mcfg, "training pool", lo)
        check_pool(self._pools(config, "val"), mcfg, "validation pool", 2)
        model = FimaNet(mcfg)
        const = self.constant_motion(config)
        with torch.no_grad():  # start from the constant-motion predictor (module docstring)
            model.head.weight.mul_(0.1)
            model.head.bias.copy_(torch.as_tensor(const, dtype=model.head.bias.dtype))
        init = (config.model or {}).get("init_from")
        if init:  # fine-tuning: every weight from a fima checkpoint of this configuration
            from ultrasound_ai.models.loading import load_initial_weights

            load_initial_weights(model, init, METHOD, same_keys=("frame_shape", "pixel_spacing_mm"))
        return model

    def batches(self, config: TrainConfig, rank: int, world_size: int, start_step: int) -> Iterator:
        d = data_options(config)
        mcfg = model_config(config)
        pool = self._pools(config, "train")
        lo, hi = window_range(d, mcfg)
        hi = min(hi, max(len(f) for f in pool.frames))
        m = pool.n_imus if mcfg.uses_imus else 0
        step = start_step
        while True:
            rng = step_numpy_rng(config.seed, rank, step)
            n = int(rng.integers(lo, hi + 1))
            imus = None
            if m and d["imu_subsets"] and mcfg.fusion == "adaptive":
                count = int(rng.integers(1, m + 1))
                imus = sorted(int(i) for i in rng.choice(m, size=count, replace=False))
            yield draw_windows(pool, rng, config.schedule["batch_size"], n, d["frame_strides"], imus,
                               with_imus=bool(m), stride_mode=d["stride_mode"], gravity_augment=d["gravity_augment"])
            step += 1

    def training_step(self, model, batch, device) -> dict:
        from ultrasound_ai.freehand.fima.losses import supervised_loss

        frames, targets, acc, ang = batch
        frames, targets = frames.to(device), targets.to(device)
        if acc is not None:
            acc, ang = acc.to(device), ang.to(device)
        out = model(frames, acc, ang)
        loss, parts = supervised_loss(out.params, targets, pearson_weight=self._pearson_weight)
        terms = {"loss": loss, **{k: torch.tensor(v) for k, v in parts.items()}}
        terms["tz_mae_mm"] = (out.params[..., 2] - targets[..., 2]).abs().mean().detach()
        return terms

    def validate(self, model, config: TrainConfig, device) -> dict:
        from ultrasound_ai.freehand.fima.method import imu_inputs, predict_pairs

        d = data_options(config)
        pool = self._pools(config, "val")
        inner = model.module if hasattr(model, "module") else model
        if d["bn_recalibration_batches"]:
            # Fixed batches (their own generator, not a training step's), so validation stays repeatable.
            fixed = self.batches(config, 0, 1, _RECALIBRATION_STEP)
            recalibrate_batch_norm(inner, (next(fixed) for _ in range(d["bn_recalibration_batches"])), device)
        preds = []
        for i, f in enumerate(pool.frames):
            acc, ang = (imu_inputs(pool.imu_acc[i], pool.imu_euler[i]) if inner.cfg.uses_imus else (None, None))
            preds.append(predict_pairs(inner, f, acc, ang, device=device).params)
        return validation_metrics(preds, pool, self.constant_motion(config))

    def card(self, config: TrainConfig, metrics: Mapping[str, float]) -> dict:
        from ultrasound_ai.freehand.simulation.simulator import SIMULATOR_VERSION

        d = data_options(config)
        mcfg = model_config(config)
        sched = config.schedule
        preset = config.model.get("preset", "shipped")
        lo, hi = window_range(d, mcfg)
        lr_text = (f"cosine to {sched['min_lr_ratio']} x lr over {sched['steps']} steps" if sched["lr_schedule"] == "cosine"
                   else f"x{sched['gamma']} every {sched['step_size']} steps" if sched["lr_schedule"] == "step"
                   else "constant")
        training: dict = {
            "loss": (f"L1(t mm) + {1.745:.3f} x L1(angles deg) + {d['pearson_weight']} x (1 - Pearson) per parameter "
                     "across each window's pairs (paper eq. 2)"),
            "optimizer": (f"{sched['optimizer']} lr {sched['lr']} ({lr_text}, {sched['warmup_steps']} warm-up steps), "
                          f"batch {sched['batch_size']} windows; the paper: Adam 2e-4 halved every 30 of 200 epochs"),
            "window_frames": [lo, hi],
            "window_sampling": "N uniform per step; per window uniform stride, sweep and start, from (seed, rank, step)",
            "frame_strides": list(d["frame_strides"]),
            "stride_mode": d["stride_mode"],
            "imu_subsets": bool(d["imu_subsets"]),
            "gravity_augment": bool(d["gravity_augment"]),
            "head_init": "bias = training mean motion, weights x 0.1",
            "constant_motion_params": [float(v) for v in self.constant_motion(config)],
        }
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
        imus = ("none (images only)" if not mcfg.uses_imus
                else f"exactly {mcfg.n_imus} (linear fusion)" if mcfg.fusion == "linear"
                else f"any M >= 1 (adaptive fusion; trained with {mcfg.n_imus})")
        return {
            "method": METHOD,
            "variant": mcfg.variant,
            "description": f"FiMA variant {mcfg.variant!r} ({preset} size)",
            "configuration": {"preset": preset, **mcfg.to_dict()},
            "input": {
                "frame_shape_hw": list(mcfg.frame_shape),
                "pixel_spacing_mm": [mcfg.pixel_spacing_mm, mcfg.pixel_spacing_mm],
                "window_frames": [int(v) for v in mcfg.window_frames],
                "n_imus": mcfg.n_imus if mcfg.uses_imus else 0,
                "imus": imus,
                "imu_inputs": (f"per pair: mean specific force of frames i, i+1 (m/s^2) and each IMU's relative "
                               f"rotation R_i^T R_i+1 as static-xyz degrees; the network divides them by "
                               f"{mcfg.imu_acc_unit_m_s2} m/s^2 and {mcfg.imu_angle_unit_deg} degrees"),
                "intensity_normalisation": "uint8 0..255 -> x * 2 / 255 - 1 (in the network)",
                "resampling": ("frames resampled onto a grid of frame_shape_hw at pixel_spacing_mm (x first) "
                               "centred laterally, from the top row (transducer face) in depth; linear, anti-aliased "
                               "when shrinking; 0 outside"),
                "output": ("per pair (tx, ty, tz) mm + Euler degrees static 'xyz' (R = Rz Ry Rx) of T_i<-i+1 = "
                           "inv(T_i) T_i+1 on the grid"),
                "online_alignment": bool(mcfg.online_alignment),
            },
            "training": training,
        }


def validation_metrics(preds: Sequence[np.ndarray], pool: FimaPool, const: np.ndarray) -> dict:
    """Metrics of per-sweep pair predictions [N-1, 6] against the pool's targets (module docstring)."""
    from ultrasound_ai.core.geometry import chain_relative, params_to_matrix
    from ultrasound_ai.freehand.metrics import fdr

    tz, tz_c, t_err, a_err, fdrs, fdrs_c = [], [], [], [], [], []
    for p, y, truth in zip(preds, pool.targets, pool.tforms):
        y = y.astype(np.float64)
        tz.append(np.abs(p[:, 2] - y[:, 2]))
        tz_c.append(np.abs(const[2] - y[:, 2]))
        t_err.append(np.abs(p[:, :3] - y[:, :3]).ravel())
        a_err.append(np.abs(p[:, 3:] - y[:, 3:]).ravel())
        for params, out in ((p, fdrs), (np.broadcast_to(const, p.shape), fdrs_c)):
            est = chain_relative(params_to_matrix(params, PARAM_CONVENTION, degrees=True))
            out.append(fdr(est, truth, pool.frame_shape_hw, pool.spacing_xy))
    cat = np.concatenate
    return {"tz_mae_mm": float(cat(tz).mean()), "tz_mae_const_mm": float(cat(tz_c).mean()),
            "t_mae_mm": float(cat(t_err).mean()), "angle_mae_deg": float(cat(a_err).mean()),
            "fdr_pct": float(np.mean(fdrs)), "fdr_const_pct": float(np.mean(fdrs_c))}


def resolve_config(config, variant: Optional[str] = None) -> TrainConfig:
    """A TrainConfig for FiMA from a path / mapping / TrainConfig laid over DEFAULT_CONFIG; `variant`
    (e.g. from `--method rem`) replaces model.variant."""
    overrides = {"model.variant": variant} if variant is not None else None
    if isinstance(config, TrainConfig):
        cfg = load_config(config, overrides)
    else:
        cfg = load_config(config, overrides, defaults=DEFAULT_CONFIG)
    if cfg.method != METHOD:
        raise InputError(f"training config method: expected {METHOD!r} (the variant goes in model.variant), "
                         f"got {cfg.method!r}")
    model_config(cfg)  # an unknown preset or variant fails here, before any simulation
    return cfg


def train_fima(config, progress: Callable[[float, str], None] | None = None,
               cancel_check: Callable[[], None] | None = None, *, variant: Optional[str] = None,
               resume: bool = True, train_pool: FimaPool | None = None, val_pool: FimaPool | None = None,
               progress_bar: bool | None = None) -> TrainResult:
    """Train FiMA or one of its ablations; `config` is a path (YAML/JSON), a mapping or a TrainConfig, laid
    over DEFAULT_CONFIG; `variant` overrides model.variant. Returns the harness's TrainResult (final.pt and
    best.pt with their cards, log.csv, last.pt)."""
    cfg = resolve_config(config, variant)
    d = data_options(cfg)
    mcfg = model_config(cfg)
    if train_pool is None:
        # Simulate the pools before the harness starts, reporting progress (minutes on CPU).
        note = (lambda msg: progress(0.0, msg)) if progress is not None else None
        build_pool("train", d, mcfg, note)
        if val_pool is None:
            build_pool("val", d, mcfg, note)
    task = FimaTask(train_pool=train_pool, val_pool=val_pool)
    return train(cfg, task, resume=resume, progress=progress, cancel_check=cancel_check, progress_bar=progress_bar)
