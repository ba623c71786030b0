"""Training 3DML-ResNet and the counting network on simulated microbubbles, through the shared harness.

Targets (the paper). For a window of N frames and a bubble at continuous pixel coordinates (u, v)
(pixel centres at integers: u = (z_mm - z0) / dz, v = (x_mm - x0) / dx), the pixel holding it is
(round(u), round(v)) with halves rounded up (floor(u + 0.5)); there
    Pos = 1,  X_E = u - iz + 0.5,  Y_E = v - ix + 0.5   (both in [0, 1); 0.5 = the pixel centre),
and Pos = X_E = Y_E = 0 elsewhere. When two bubbles fall in one pixel the first one listed sets the
offsets (a pixel holds one detection); the count target is the number of bubbles whose pixel lies
in the frame, all of them.

Loss per frame (the paper's Eq. 1-3), averaged over the frames of the batch:
    L_pos = || H * Pos - H * Pos_hat ||_F^2        (H: normalised 2D Gaussian, sigma 1 px, 5 x 5)
    L_loc = 1/2 || M (X_E - X_E_hat) ||_F^2 + 1/2 || M (Y_E - Y_E_hat) ||_F^2   (M: pixels with a bubble)
    loss  = L_pos + L_loc + count_weight * L_count
L_count trains the counting network: the Huber loss (delta = 1 bubble) of the predicted count of
each frame (robust to the occasional crowded crop; quadratic within one bubble). Its parameters are
disjoint from the ResNet's, so with Adam (per-parameter steps) adding it changes nothing for the
ResNet: the two networks train as if separately, as the paper does, but live in one checkpoint.

Data. A pool of simulated acquisitions (`ultrasound_ai.ulm.simulator`, PALA grid: lambda pixels,
84 x 143, 1 kHz) is simulated lazily and cached per process (simulation costs seconds per
acquisition): entry i has simulator seed train_seed * 1,000,000 + i and, drawn from its own
generator, a concentration in `bubbles_per_frame` (per 84 x 143-lambda frame, scaled to the simulated
area) and a noise level in `noise_db`. Tissue clutter (`clutter_db`, default +20 dB as the
simulator's default) is simulated and removed with the SVD filter of `ultrasound_ai.ulm.clutter`
(`svd_cutoff`, default 4 as the pipeline's), so the network sees what the pipeline gives it;
`clutter_db: null` trains on ideal, clutter-free frames instead. A batch for step s
(drawn from `step_numpy_rng(seed, rank, s)` only) is `batch_size` windows: a random entry, N
consecutive frames, a `crop_zx` crop, a random lateral flip and time reversal (both keep the physics).
With `pymust_dir` (pieces of `ultrasound_ai.ulm.pymust_training_set`, formed physically with
pymust and randomised per piece) and `pymust_fraction` > 0, each window comes from a random piece with
that probability (clutter-filtered the same way, cropped inside the piece), else from the pool.

Validation: fixed held-out acquisitions (seeds val_seed + j, whole frames, `val_sets` = (bubbles per
frame, noise dB) pairs), run through the sliding-window inference with the counting network's N_i,
scored with the PALA localization metrics (greedy pairing, lambda/2 match, lambda/4 true positive):
`jaccard` (mean over the sets; best.pt criterion), one `jaccard_b<count>_n<dB>` per set,
`loc_error_lambda`, and `count_rel_error` (mean |N_hat - N| / N over frames).

Run: `train_dml(config)`, `ultrasound-ai ulm train --config C`, or multi-process
`python -m torch.distributed.run ... -m ultrasound_ai.core.training C --task
ultrasound_ai.ulm.dml_training:DmlTask`.
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.training import TrainConfig, TrainResult, load_config, step_numpy_rng, train
from ultrasound_ai.ulm.dml_resnet import METHOD, DmlLocalizer, dml_config

__all__ = [
    "DATA_DEFAULTS",
    "DEFAULT_CONFIG",
    "DmlTask",
    "count_loss",
    "data_options",
    "dml_loss",
    "draw_window",
    "gaussian_kernel",
    "localization_scores",
    "pixel_targets",
    "positions_to_pixels",
    "pymust_entry",
    "simulated_entry",
    "train_dml",
]


DATA_DEFAULTS: dict[str, Any] = {
    "pool_size": 48,  # simulated acquisitions in the per-process pool
    "pool_frames": 200,  # frames per pool acquisition
    "sim_shape_zx": [84, 143],  # simulated frame size (crops are cut from it)
    "crop_zx": [64, 64],
    "bubbles_per_frame": [40.0, 200.0],  # uniform range, per 84 x 143-lambda frame
    "noise_db": [-40.0, -20.0],  # uniform range, rms noise relative to the mean bubble peak
    "clutter_db": 20.0,  # tissue clutter, then removed by the SVD filter as the pipeline does; None = no tissue
    "svd_cutoff": 4,  # singular components the SVD filter removes (the pipeline's default)
    "train_seed": 0,
    "flip": True,
    "time_reverse": True,
    "val_sets": [[40.0, -30.0], [100.0, -30.0], [200.0, -30.0]],  # (bubbles per frame, noise dB)
    "val_frames": 24,
    "val_shape_zx": [84, 143],
    "val_seed": 900_000,
    "val_window_stride": 1,
    # Frames dropped at each end of a validation window (its estimates count for the others only): 1 with
    # val_window_stride N - 2 validates the pipeline's default "inner" windows, each frame estimated once.
    "val_keep_margin": 0,
    "count_weight": 1.0,
    "blur_sigma_px": 1.0,
    "blur_radius_px": 2,
    # pymust-formed training pieces (`ultrasound_ai.ulm.pymust_training_set`) mixed with the fast
    # simulator's pool: each window comes from a piece with probability pymust_fraction.
    "pymust_dir": None,
    "pymust_fraction": 0.0,
    # Use the first pymust_count pieces (sorted by name) so that a resumed run draws from the same
    # pieces while generation goes on; null = every piece found (fixed for one run only).
    "pymust_count": None,
    # Acquisition files with ground truth validated on beside val_sets (e.g. the frozen pymust set's
    # validation pieces): metrics jaccard_files (their mean) and jaccard_file_<stem>.
    "val_files": [],
}

DEFAULT_CONFIG: dict[str, Any] = {
    "method": METHOD,
    "name": "ulm_3dml_resnet",
    "output_dir": "runs/ulm_3dml_resnet",
    "seed": 0,
    "device": "auto",
    "data": copy.deepcopy(DATA_DEFAULTS),
    "model": {"preset": "shipped"},
    "schedule": {
        "steps": 30000,
        "batch_size": 4,  # windows of N frames per step (the paper: one batch of 10 frames)
        "optimizer": "adam",  # the paper: Adam, lr 1e-3
        "lr": 1.0e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 200,
        "min_lr_ratio": 0.05,
        "grad_clip": 1.0,
        "log_every": 50,
        "validate_every": 1000,
        "checkpoint_every": 1000,
        "best_metric": "jaccard",
        "best_mode": "max",
    },
}


# -------------------------------------------------------------------------------- targets and loss


def positions_to_pixels(gt: np.ndarray, origin_mm, pixel_size_mm) -> np.ndarray:
    """gt rows (frame, z_mm, x_mm, ...) -> (frame, u, v) continuous pixel coordinates (centres at integers)."""
    g = np.asarray(gt, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] < 3:
        raise InputError(f"ground-truth positions: expected [K, 3+] = (frame, z_mm, x_mm, ...), got shape {g.shape}")
    out = np.empty((g.shape[0], 3))
    out[:, 0] = g[:, 0]
    out[:, 1] = (g[:, 1] - float(origin_mm[0])) / float(pixel_size_mm[0])
    out[:, 2] = (g[:, 2] - float(origin_mm[1])) / float(pixel_size_mm[1])
    return out


def pixel_targets(positions_px: np.ndarray, n_frames: int, shape_zx) -> tuple[np.ndarray, ...]:
    """(frame, u, v) rows -> targets Pos, X_E, Y_E [n_frames, Z, X] float32 and counts [n_frames] float32.

    Rows whose frame is outside [0, n_frames) or whose pixel is outside the grid are ignored.
    """
    p = np.asarray(positions_px, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise InputError(f"bubble positions: expected [K, 3] = (frame, z_px, x_px), got shape {p.shape}")
    z_n, x_n = (int(s) for s in shape_zx)
    pos = np.zeros((n_frames, z_n, x_n), np.float32)
    zoff = np.zeros_like(pos)
    xoff = np.zeros_like(pos)
    counts = np.zeros(n_frames, np.float32)
    if p.shape[0] == 0:
        return pos, zoff, xoff, counts
    if not np.all(np.isfinite(p)):
        raise InputError("bubble positions: NaN or infinite values")
    f = p[:, 0].astype(np.int64)
    iz = np.floor(p[:, 1] + 0.5).astype(np.int64)
    ix = np.floor(p[:, 2] + 0.5).astype(np.int64)
    ok = (f >= 0) & (f < n_frames) & (iz >= 0) & (iz < z_n) & (ix >= 0) & (ix < x_n)
    f, iz, ix, p = f[ok], iz[ok], ix[ok], p[ok]
    np.add.at(counts, f, 1.0)
    flat = (f * z_n + iz) * x_n + ix
    _, first = np.unique(flat, return_index=True)  # the first bubble listed in a pixel sets its offsets
    pos.reshape(-1)[flat[first]] = 1.0
    zoff.reshape(-1)[flat[first]] = (p[first, 1] - iz[first] + 0.5).astype(np.float32)
    xoff.reshape(-1)[flat[first]] = (p[first, 2] - ix[first] + 0.5).astype(np.float32)
    return pos, zoff, xoff, counts


def gaussian_kernel(sigma_px: float = 1.0, radius_px: int = 2) -> torch.Tensor:
    """The blur H of L_pos: a (2r+1) x (2r+1) sampled Gaussian normalised to sum 1."""
    if not (sigma_px > 0 and int(radius_px) >= 0):
        raise InputError(f"blur kernel: sigma must be > 0 and radius >= 0 pixels, got {sigma_px}, {radius_px}")
    r = torch.arange(-int(radius_px), int(radius_px) + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / float(sigma_px)) ** 2)
    k = g[:, None] * g[None, :]
    return (k / k.sum()).float()


def dml_loss(maps: torch.Tensor, pos_t: torch.Tensor, zoff_t: torch.Tensor, xoff_t: torch.Tensor,
             kernel: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_pos and L_loc (per-frame Frobenius sums, averaged over frames) for maps [B, N, 3, Z, X]."""
    b, n, _, z, x = maps.shape
    diff = (pos_t - maps[:, :, 0]).reshape(b * n, 1, z, x)
    r = kernel.shape[-1] // 2
    # H * Pos - H * Pos_hat = H * (Pos - Pos_hat): one convolution (zero padding: no bubble outside).
    blurred = F.conv2d(diff, kernel.to(diff)[None, None], padding=r)
    l_pos = blurred.pow(2).sum() / (b * n)
    mask = pos_t
    l_loc = 0.5 * ((mask * (zoff_t - maps[:, :, 1])).pow(2).sum() + (mask * (xoff_t - maps[:, :, 2])).pow(2).sum())
    l_loc = l_loc / (b * n)
    return {"loss_pos": l_pos, "loss_loc": l_loc}


def count_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber loss (delta = 1 bubble) of the per-frame counts, averaged over frames."""
    return F.huber_loss(pred, target, delta=1.0)


# ---------------------------------------------------------------------------------- options


def _pair_of(value, what: str, cast=float, positive=False):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(f"training config data.{what}: expected two numbers, got {value!r}")
    try:
        a, b = cast(value[0]), cast(value[1])
    except (TypeError, ValueError):
        raise InputError(f"training config data.{what}: expected two numbers, got {value!r}") from None
    if positive and min(a, b) <= 0:
        raise InputError(f"training config data.{what}: expected positive numbers, got {value!r}")
    return [a, b]


def data_options(config: TrainConfig | Mapping) -> dict:
    """config.data laid over DATA_DEFAULTS and checked (InputError naming the bad key)."""
    raw = config.data if isinstance(config, TrainConfig) else dict(config)
    unknown = sorted(set(raw) - set(DATA_DEFAULTS))
    if unknown:
        raise InputError(f"training config data: unknown key(s) {unknown}; expected some of {sorted(DATA_DEFAULTS)}")
    d = {**copy.deepcopy(DATA_DEFAULTS), **copy.deepcopy(dict(raw))}
    for key in ("pool_size", "pool_frames", "val_frames", "train_seed", "val_seed", "svd_cutoff",
                "val_window_stride", "val_keep_margin", "blur_radius_px"):
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key in ("train_seed", "val_seed", "svd_cutoff", "blur_radius_px", "val_keep_margin") else 1):
            raise InputError(f"training config data.{key}: expected a non-negative integer (positive for sizes), got {v!r}")
    for key in ("sim_shape_zx", "crop_zx", "val_shape_zx"):
        d[key] = _pair_of(d[key], key, int, positive=True)
    if d["crop_zx"][0] > d["sim_shape_zx"][0] or d["crop_zx"][1] > d["sim_shape_zx"][1]:
        raise InputError(f"training config data.crop_zx {d['crop_zx']} must fit in sim_shape_zx {d['sim_shape_zx']}")
    d["bubbles_per_frame"] = sorted(_pair_of(d["bubbles_per_frame"], "bubbles_per_frame"))
    d["noise_db"] = sorted(_pair_of(d["noise_db"], "noise_db"))
    if d["bubbles_per_frame"][0] < 0:
        raise InputError(f"training config data.bubbles_per_frame: expected counts >= 0, got {d['bubbles_per_frame']}")
    sets = d["val_sets"]
    if not isinstance(sets, (list, tuple)) or not sets:
        raise InputError(f"training config data.val_sets: expected a list of [bubbles_per_frame, noise_db], got {sets!r}")
    d["val_sets"] = [_pair_of(s, "val_sets[]") for s in sets]
    for key in ("count_weight", "blur_sigma_px"):
        if not isinstance(d[key], (int, float)) or d[key] < 0 or (key == "blur_sigma_px" and d[key] == 0):
            raise InputError(f"training config data.{key}: expected a positive number, got {d[key]!r}")
    if d["clutter_db"] is not None and not isinstance(d["clutter_db"], (int, float)):
        raise InputError(f"training config data.clutter_db: expected a level in dB or null, got {d['clutter_db']!r}")
    f = d["pymust_fraction"]
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
        raise InputError(f"training config data.pymust_fraction: expected a fraction in [0, 1], got {f!r}")
    if f > 0 and d["pymust_dir"] is None:
        raise InputError("training config data.pymust_dir: pymust_fraction > 0 needs a directory of pymust pieces")
    files = d["val_files"]
    if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files):
        raise InputError(f"training config data.val_files: expected a list of acquisition file paths, got {files!r}")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise InputError(f"training config data.val_files: not found: {missing}")
    d["val_files"] = list(files)
    k = d["pymust_count"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"training config data.pymust_count: expected a positive integer or null, got {k!r}")
    if d["pymust_dir"] is not None:
        selected_pieces(d)
    return d


def selected_pieces(d: dict) -> list[Path]:
    """The pymust pieces a run draws from: the first data.pymust_count files of data.pymust_dir (all: null)."""
    from ultrasound_ai.ulm.pymust_training_set import piece_files

    try:
        files = piece_files(d["pymust_dir"])
    except InputError as exc:
        raise InputError(f"training config data.pymust_dir: {exc}") from None
    k = d["pymust_count"]
    if k is not None and len(files) < k:
        raise InputError(f"training config data.pymust_count: {k} pieces wanted, {d['pymust_dir']} holds {len(files)}")
    return files if k is None else files[:k]


# ---------------------------------------------------------------------------------- data pool

_CACHE: dict[tuple, dict] = {}
_CACHE_LOCK = threading.Lock()


def simulated_entry(seed: int, bubbles_per_frame: float, noise_db: float, n_frames: int, shape_zx,
                    clutter_db: float | None = None, svd_cutoff: int = 4) -> dict:
    """One simulated acquisition, cached per process: {"envelope" [T, Z, X] float16, "pixels" (frame, u, v)
    rows sorted by frame, "frame_starts" [T + 1], "pixel_size_mm", "origin_mm", "wavelength_mm",
    "gt" (the simulator's rows), "sim_attrs"}. `bubbles_per_frame` is per 84 x 143 frame."""
    from ultrasound_ai.ulm.simulator import PALA_FRAME_PIXELS, UlmSimConfig, simulate_acquisition

    shape = (int(shape_zx[0]), int(shape_zx[1]))
    key = (int(seed), float(bubbles_per_frame), float(noise_db), int(n_frames), shape,
           None if clutter_db is None else float(clutter_db), int(svd_cutoff))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    density = float(bubbles_per_frame) * shape[0] * shape[1] / PALA_FRAME_PIXELS
    cfg = UlmSimConfig(n_frames=int(n_frames), bubbles_per_frame=density, clutter_db=clutter_db,
                       noise_db=float(noise_db), seed=int(seed), shape_zx=shape)
    acq = simulate_acquisition(cfg)
    entry = _acquisition_entry(acq, None if clutter_db is None else int(svd_cutoff),
                               {"ulm_sim_version": acq.attrs.get("ulm_sim_version"), "seed": int(seed),
                                "bubbles_per_frame": float(bubbles_per_frame), "noise_db": float(noise_db),
                                "clutter_db": clutter_db})
    with _CACHE_LOCK:
        _CACHE[key] = entry
    return entry


def _acquisition_entry(acq, svd_cutoff: int | None, sim_attrs: dict) -> dict:
    """Entry of an acquisition with ground truth: SVD-filtered (svd_cutoff None: not filtered) envelope."""
    iq = acq.iq
    if svd_cutoff is not None:
        from ultrasound_ai.ulm.clutter import svd_filter

        iq = np.asarray(svd_filter(iq, cutoff=int(svd_cutoff)))
    env = np.abs(iq).astype(np.float16)
    gt = acq.gt_positions[np.argsort(acq.gt_positions[:, 0], kind="stable")]
    pix = positions_to_pixels(gt, acq.origin_mm, acq.pixel_size_mm)
    starts = np.searchsorted(pix[:, 0], np.arange(int(env.shape[0]) + 1), side="left")
    return {"envelope": env, "pixels": pix, "frame_starts": starts, "pixel_size_mm": acq.pixel_size_mm,
            "origin_mm": acq.origin_mm, "wavelength_mm": acq.wavelength_mm, "gt": gt, "sim_attrs": sim_attrs}


def pymust_entry(path, svd_cutoff: int = 4) -> dict:
    """A pymust training piece as a pool entry (cached per process), clutter-filtered as the pipeline does
    (a piece simulated without tissue is not filtered)."""
    from ultrasound_ai.io.ulm_files import read_acquisition

    key = ("pymust", str(path), int(svd_cutoff))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    acq = read_acquisition(path)
    if acq.gt_positions is None:
        raise InputError(f"pymust training piece {path}: no ground-truth positions")
    a = acq.attrs
    tissue = a.get("sim_clutter_db", "off") != "off"
    entry = _acquisition_entry(acq, int(svd_cutoff) if tissue else None,
                               {"source": "pymust", "seed": a.get("sim_seed"),
                                "bubbles_per_frame": a.get("sim_bubbles_per_frame"),
                                "noise_db": a.get("sim_noise_db"), "clutter_db": a.get("sim_clutter_db")})
    with _CACHE_LOCK:
        _CACHE[key] = entry
    return entry


def _pool_spec(d: dict, i: int) -> dict:
    # Entry i's concentration and noise come from its own generator, so the pool does not depend on
    # the order in which entries are first used.
    rng = np.random.default_rng([int(d["train_seed"]), 7, int(i)])
    return dict(seed=int(d["train_seed"]) * 1_000_000 + int(i),
                bubbles_per_frame=float(rng.uniform(*d["bubbles_per_frame"])),
                noise_db=float(rng.uniform(*d["noise_db"])), n_frames=d["pool_frames"], shape_zx=d["sim_shape_zx"],
                clutter_db=d["clutter_db"], svd_cutoff=d["svd_cutoff"])


def crop_sample(entry: dict, t0: int, n: int, z0: int, x0: int, crop_zx, flip: bool = False,
                reverse: bool = False) -> tuple[np.ndarray, ...]:
    """Frames [n, cz, cx] float32 and targets (Pos, X_E, Y_E, counts) of one window crop of an entry."""
    cz, cx = (int(s) for s in crop_zx)
    frames = entry["envelope"][t0:t0 + n, z0:z0 + cz, x0:x0 + cx].astype(np.float32)
    s = entry["frame_starts"]
    rows = entry["pixels"][s[t0]:s[t0 + n]].copy()
    rows[:, 0] -= t0
    rows[:, 1] -= z0
    rows[:, 2] -= x0
    if flip:
        frames = frames[:, :, ::-1]
        rows[:, 2] = (cx - 1) - rows[:, 2]
    if reverse:
        frames = frames[::-1]
        rows[:, 0] = (n - 1) - rows[:, 0]
    pos, zoff, xoff, counts = pixel_targets(rows, n, (cz, cx))
    return np.ascontiguousarray(frames), pos, zoff, xoff, counts


def draw_window(rng: np.random.Generator, d: dict, n: int, pieces: list) -> dict:
    """One training window: {"source" ("sim" | "pymust"), "index", "entry", "t0", "z0", "x0", "flip", "reverse"}.

    Without pymust pieces the draws are exactly the simulated pool's (entry, start, crop, flip,
    reversal); with them one more uniform number first picks the source at `pymust_fraction`, and the
    crop is drawn inside the piece's own frame count and size.
    """
    cz, cx = d["crop_zx"]
    if pieces and rng.random() < d["pymust_fraction"]:
        i = int(rng.integers(len(pieces)))
        entry = pymust_entry(pieces[i], d["svd_cutoff"])
        t, sz, sx = entry["envelope"].shape
        if t < n or sz < cz or sx < cx:
            raise InputError(f"training config data.pymust_dir: piece {pieces[i]} ({t} frames of {sz} x {sx}) is "
                             f"smaller than a window of {n} frames of {cz} x {cx} (data.crop_zx)")
        source = "pymust"
    else:
        i = int(rng.integers(d["pool_size"]))
        entry = None
        t, (sz, sx) = d["pool_frames"], d["sim_shape_zx"]
        source = "sim"
    t0 = int(rng.integers(t - n + 1))
    z0 = int(rng.integers(sz - cz + 1))
    x0 = int(rng.integers(sx - cx + 1))
    flip = bool(d["flip"]) and bool(rng.random() < 0.5)
    rev = bool(d["time_reverse"]) and bool(rng.random() < 0.5)
    if entry is None:
        entry = simulated_entry(**_pool_spec(d, i))
    return {"source": source, "index": i, "entry": entry, "t0": t0, "z0": z0, "x0": x0, "flip": flip, "reverse": rev}


# ---------------------------------------------------------------------------------- metrics


def localization_scores(est: np.ndarray, truth: np.ndarray, wavelength_mm: float) -> dict[str, float]:
    """PALA localization scores (`ultrasound_ai.ulm.metrics.localization_metrics`: greedy pairing,
    lambda/2 match, lambda/4 true positive) of est [K, 4+] against truth [M, 3+]."""
    from ultrasound_ai.ulm.metrics import localization_metrics

    out = localization_metrics(est, truth, wavelength_mm)
    return {k: float(out[k]) for k in ("jaccard", "precision", "recall", "loc_error_lambda")}


# ---------------------------------------------------------------------------------- the task


class DmlTask:
    """TrainingTask of 3DML-ResNet + counting network (see the module docstring)."""

    def __init__(self):
        self._d: dict | None = None

    def build_model(self, config: TrainConfig) -> DmlLocalizer:
        # The harness builds the model first: keep the run's data options for training_step (loss
        # weights, blur), which receives no config.
        self._d = data_options(config)
        model = DmlLocalizer(model_spec(config))
        init = init_from(config)
        if init is not None:  # fine-tuning: every weight from a checkpoint of this configuration
            from ultrasound_ai.ulm.dml_inference import load_dml_model

            net, card = load_dml_model(init, device="cpu")
            if net.config != model.config:
                raise InputError(f"training config model.init_from {init}: its configuration "
                                 f"{card.get('configuration')} differs from this model's {model.config.to_dict()}")
            model.load_state_dict(net.state_dict())
        return model

    def parameter_groups(self, model, config):
        return None

    def batches(self, config: TrainConfig, rank: int, world_size: int, start_step: int) -> Iterator[Any]:
        d = data_options(config)
        n = model_spec(config).window_frames
        if n > d["pool_frames"]:
            raise InputError(f"training config data.pool_frames {d['pool_frames']} must be at least the window "
                             f"of {n} frames")
        pieces = self.pymust_pieces(d)
        bsz = int(config.schedule["batch_size"])
        for step in itertools.count(start_step):
            rng = step_numpy_rng(config.seed, rank, step)
            samples = []
            for _ in range(bsz):
                w = draw_window(rng, d, n, pieces)
                samples.append(crop_sample(w["entry"], w["t0"], n, w["z0"], w["x0"], d["crop_zx"], w["flip"], w["reverse"]))
            yield tuple(torch.from_numpy(np.stack(parts)) for parts in zip(*samples))

    @staticmethod
    def pymust_pieces(d: dict) -> list:
        """The pieces' files when the mix is on, else []."""
        return selected_pieces(d) if d["pymust_fraction"] > 0 else []

    def _losses(self, model, batch, device, d) -> dict[str, torch.Tensor]:
        frames, pos, zoff, xoff, counts = (t.to(device) for t in batch)
        out = model(frames)
        kernel = gaussian_kernel(d["blur_sigma_px"], d["blur_radius_px"]).to(device)
        terms = dml_loss(out["maps"], pos, zoff, xoff, kernel)
        terms["loss_count"] = count_loss(out["count"], counts)
        terms["loss"] = terms["loss_pos"] + terms["loss_loc"] + float(d["count_weight"]) * terms["loss_count"]
        return terms

    def training_step(self, model, batch, device) -> Mapping[str, torch.Tensor]:
        return self._losses(model, batch, device, self._d if self._d is not None else dict(DATA_DEFAULTS))

    def validation_entries(self, config: TrainConfig) -> list[tuple[str, dict]]:
        d = data_options(config)
        out = []
        for j, (b, nd) in enumerate(d["val_sets"]):
            e = simulated_entry(seed=int(d["val_seed"]) + j, bubbles_per_frame=b, noise_db=nd,
                                n_frames=d["val_frames"], shape_zx=d["val_shape_zx"], clutter_db=d["clutter_db"],
                                svd_cutoff=d["svd_cutoff"])
            out.append((f"b{b:g}_n{nd:g}".replace("-", "m"), e))
        for f in d["val_files"]:
            out.append((f"file_{Path(f).stem}", pymust_entry(f, d["svd_cutoff"])))
        return out

    def validate(self, model, config: TrainConfig, device) -> Mapping[str, float]:
        from ultrasound_ai.ulm.dml_inference import SlidingWindowRunner, estimates_to_localizations, model_predictor

        d = data_options(config)
        n = model.config.window_frames
        metrics: dict[str, float] = {}
        jac, jac_files, errs, rel = [], [], [], []
        for name, e in self.validation_entries(config):
            runner = SlidingWindowRunner(model_predictor(model, device), n, stride=d["val_window_stride"],
                                         keep_margin=d["val_keep_margin"])
            est = runner.push(e["envelope"].astype(np.float32)) + runner.finish()
            loc = estimates_to_localizations(est, e["pixel_size_mm"], e["origin_mm"])
            s = localization_scores(loc, e["gt"], e["wavelength_mm"])
            truth_counts = np.diff(e["frame_starts"]).astype(np.float64)
            rel.extend(abs(x.count - truth_counts[x.index]) / max(truth_counts[x.index], 1.0) for x in est)
            metrics[f"jaccard_{name}"] = s["jaccard"]
            (jac_files if name.startswith("file_") else jac).append(s["jaccard"])
            if math.isfinite(s.get("loc_error_lambda", math.nan)):
                errs.append(s["loc_error_lambda"])
        if jac_files:
            metrics["jaccard_files"] = float(np.mean(jac_files))
        metrics = {"jaccard": float(np.mean(jac)), **metrics,
                   "loc_error_lambda": float(np.mean(errs)) if errs else math.nan,
                   "count_rel_error": float(np.mean(rel))}
        return metrics

    def card(self, config: TrainConfig, metrics: Mapping[str, float]) -> dict:
        from ultrasound_ai.ulm.simulator import ULM_SIM_VERSION, UlmSimConfig

        d = data_options(config)
        cfg = model_spec(config)
        sim = UlmSimConfig()
        return {
            "method": METHOD,
            "configuration": cfg.to_dict(),
            "input": {
                "pixel_size_lambda": list(sim.pixel_size_lambda),
                "frames_per_window": cfg.window_frames,
                "frame_rate_hz": sim.frame_rate_hz,
                "psf_fwhm_lambda": list(sim.psf_fwhm_lambda),
                "intensity": "envelope |IQ| of clutter-filtered IQ; each window divided by its maximum",
                "output": "per frame and low-resolution pixel: Pos, X_E (z offset + 0.5 px), Y_E (x offset + 0.5 px)",
            },
            "training": {
                "data": "ultrasound_ai.ulm.simulator (analytic PSF), crops generated on the fly",
                "ulm_sim_version": ULM_SIM_VERSION,
                "train_seeds": f"train_seed * 1000000 + i for i < {d['pool_size']} (train_seed {d['train_seed']})",
                "pool_size": d["pool_size"],
                "pool_frames": d["pool_frames"],
                "crop_zx": d["crop_zx"],
                "bubbles_per_frame_range": d["bubbles_per_frame"],
                "noise_db_range": d["noise_db"],
                "clutter_db": d["clutter_db"],
                "svd_cutoff": d["svd_cutoff"] if d["clutter_db"] is not None else None,
                "validation_sets": d["val_sets"],
                "validation_seeds": [d["val_seed"] + j for j in range(len(d["val_sets"]))],
                "validation_frames": d["val_frames"],
                "validation_files": [Path(f).name for f in d["val_files"]],
                **_init_card(init_from(config)),
                "loss": "L_pos (Gaussian blur sigma "
                        f"{d['blur_sigma_px']} px) + L_loc + {d['count_weight']} * Huber(count)",
                "batch_size_windows": int(config.schedule["batch_size"]),
                **_pymust_card(d),
            },
            "training_data": _training_data_line(d),
            "metrics": {},
        }


def model_spec(config: TrainConfig):
    """The DmlConfig of config.model (its init_from is a starting checkpoint, not an architecture key)."""
    spec = dict(config.model)
    spec.pop("init_from", None)
    return dml_config(spec)


def init_from(config: TrainConfig):
    """config.model.init_from: the checkpoint (a model name or .pt path) fine-tuning starts from, or None."""
    init = dict(config.model).get("init_from")
    if init is not None and not isinstance(init, str):
        raise InputError(f"training config model.init_from: expected a model name or .pt path, got {init!r}")
    return init


def _training_data_line(d: dict) -> str:
    """The card's one-line "training_data" (shown by the panels): what the model saw; simulated only."""
    sources = "the fast simulator (ultrasound_ai.ulm.simulator, analytic PSF)"
    if d["pymust_fraction"] > 0:
        sources = (f"{sources} and, for {100 * d['pymust_fraction']:g} % of the windows, pymust-formed acquisitions "
                   "(SIMUS + delay-and-sum; ultrasound_ai.ulm.pymust_training_set)")
    return f"simulated acquisitions only: {sources}; no real or patient data; not validated on patient data"


def _init_card(init) -> dict:
    """The card's record of the checkpoint fine-tuning started from (its sha256: a name can be re-shipped)."""
    if init is None:
        return {"init_from": None}
    from ultrasound_ai.models.checkpoint import read_card
    from ultrasound_ai.models.registry import find_model

    card = read_card(find_model(str(init)))
    return {"init_from": str(init), "init_from_sha256": card.get("sha256"),
            "init_from_metrics": card.get("metrics", {})}


def _pymust_card(d: dict) -> dict:
    """The training card's record of the pymust pieces mixed in (none: a fraction of 0)."""
    if not d["pymust_fraction"] > 0:
        return {"pymust_fraction": 0.0}
    from ultrasound_ai.io.ulm_files import acquisition_info
    from ultrasound_ai.ulm.pymust_training_set import BANDS

    files = selected_pieces(d)
    infos = [acquisition_info(f) for f in files]  # attributes and shapes only: no frames read
    seeds = [int(i.attrs.get("sim_seed", -1)) for i in infos]
    frames = sum(i.shape[0] for i in infos)
    return {"pymust_fraction": float(d["pymust_fraction"]), "pymust_dir": str(d["pymust_dir"]),
            "pymust_data": "ultrasound_ai.ulm.pymust_training_set (pymust SIMUS + delay-and-sum, three compounded "
                           "plane waves; randomised per piece), clutter-filtered as the pipeline does",
            "pymust_pieces": len(files), "pymust_frames": frames, "pymust_seeds": seeds,
            "pymust_bands": {k: list(v) for k, v in BANDS.items()}}


def train_dml(config, progress: Callable[[float, str], None] | None = None,
              cancel_check: Callable[[], None] | None = None, *, resume: bool = True,
              progress_bar: bool | None = None) -> TrainResult:
    """Train 3DML-ResNet + the counting network; `config` is a path (YAML/JSON), a mapping or a
    TrainConfig, laid over DEFAULT_CONFIG. Returns the harness's TrainResult (final.pt, best.pt, log.csv)."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, defaults=DEFAULT_CONFIG)
    if cfg.method != METHOD:
        raise InputError(f"training config method: expected {METHOD!r}, got {cfg.method!r}")
    data_options(cfg)
    model_spec(cfg)
    init_from(cfg)
    return train(cfg, DmlTask(), resume=resume, progress=progress, cancel_check=cancel_check,
                 progress_bar=progress_bar)
