"""FiMA (and its ablations) as a pose method ("fima"): images, optionally with M >= 1 IMUs.

One method name serves every variant: the checkpoint's card says which (ReM', ReM: images only; ReM+F':
exactly the card's n_imus IMUs; ReM+F and FiMA: any M >= 1 IMUs, adaptive fusion).

Pipeline for one sweep: the frames are resampled onto the checkpoint's grid (card ``input``: frame shape
and pixel spacing; the grid is anchored at the transducer face and centred laterally, `sweep_windows`);
the IMU arrays give per-pair inputs (`imu_pair_inputs`; IMU axes are the image axes, so the grid shift
leaves them unchanged). A sweep of up to the card's
``window_frames`` maximum runs as one window; a longer one as windows of that length whose starts advance
by about half a window, every pair's estimate being the mean over the windows holding it (so is its row
of fusion weights, which keeps it normalised). The network's features are computed window by window
(`encode(..., pair_chunk)` bounds the convolutions' memory) and kept: they are small (pooled per pair),
and online alignment re-decodes them. The per-pair transforms T_{i<-i+1} on the grid are moved back to
the sweep's image-mm coordinates (the grid offset carried through) and chained: ``tforms[0]`` = identity.

Parameters: ``online_align`` (bool; default: the card's ``online_alignment``, true for "fima"),
``rotation_from_imus`` (bool; default: the card's configuration): each pair's rotation is the IMUs' mean
relative rotation instead of the network's angles (IMU variants only; `FimaConfig.rotation_from_imus`),
``direction`` ("network" or "imus"; default: the card's ``inference.direction``, else "network"): "imus"
keeps each pair's out-of-plane distance |tz| (frame centre) but takes its sign from the accelerometers,
fitted to the image measurements (`ultrasound_ai.freehand.imu_travel`; IMU variants only),
``align_steps`` (60), ``align_lr`` (2e-6), ``align_whole_network`` (false: adapt only the fusion, SSM-C and
head on cached features), ``imus`` (indices of the sweep's IMUs to use; default all; the estimate's
``imu_weights`` keep one column per IMU of the sweep, 0 for those left out), ``pair_chunk`` (default
`auto_pair_chunk`: 16 pairs up to the shipped grid's 124 x 130 px, fewer on larger grids): each window
streams through the encoder that many pairs at a time, SSM-F's scan and convolution states carried between
chunks (the features of one pass, in memory that does not grow with the window; BENCHMARKS.md fima_memory),
``frame_stride`` ("auto": a sweep faster than the card's ``inference.min_pair_interval_s`` is read on every
k-th frame and the frames between interpolated, `ultrasound_ai.freehand.pair_interval`; or a whole number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.fima.align import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    DEFAULT_TAU,
    AlignOptions,
    AlignWindow,
    check_settings,
    online_align,
)
from ultrasound_ai.freehand.methods import MethodContext, PoseEstimate, PoseMethod

__all__ = ["FimaMethod", "Prediction", "AlignOptions", "align_sweep", "load_fima", "imu_inputs", "window_starts",
           "encode_windows", "predict_pairs", "estimate_sweep", "method_options", "auto_pair_chunk"]

METHOD = "fima"
PARAM_CONVENTION = "xyz"
DEFAULT_PAIR_CHUNK = 16
DIRECTIONS = ("network", "imus")
# Pairs x grid pixels run through the convolutions at once: the shipped grid's 16 pairs, fewer pairs on
# larger grids (the stage activations grow with the pixels).
PAIR_PIXEL_BUDGET = DEFAULT_PAIR_CHUNK * 124 * 130


def auto_pair_chunk(frame_shape) -> int:
    """Pairs encoded at once for a network grid of `frame_shape` (h, w): at most 16, within the budget."""
    h, w = (int(v) for v in frame_shape)
    return max(1, min(DEFAULT_PAIR_CHUNK, PAIR_PIXEL_BUDGET // (h * w)))


def window_memory_bytes(cfg, pairs: int) -> int:
    """Estimated working memory of encoding `pairs` frame pairs at once (core/memory.py check).

    Dominated by SSM-F's tensors over all tokens of the pairs: stage-1 tokens (H/4 x W/4 per pair) x
    expand x base_width channels x 4 bytes, about 28 such tensors alive at the peak (calibrated on
    bench/bench_fima_memory.py: the paper preset, 179 pairs at once, peaked 9.5 GiB above its start).
    """
    h, w = (int(v) for v in cfg.frame_shape)
    tokens = math.ceil(h / 4) * math.ceil(w / 4)
    return 28 * 4 * int(pairs) * tokens * int(cfg.expand) * int(cfg.base_width)


@dataclass
class Prediction:
    """params [N-1, 6] (mm, static-xyz degrees, on the network grid); imu_weights [N-1, M] or None;
    align_history: L_align + L_prior before each alignment step and after the last (None: no alignment)."""

    params: np.ndarray
    imu_weights: Optional[np.ndarray] = None
    align_history: Optional[List[float]] = None
    align_parts: dict = field(default_factory=dict)


def load_fima(checkpoint=None, device="cpu"):
    """(FimaNet in eval mode on `device`, card) from a .pt path or model name; None = the default "fima"
    model installed (Resources/Models or ULTRASOUND_AI_MODELS)."""
    from ultrasound_ai.models.loading import load_method_model

    return load_method_model(METHOD, checkpoint, device, _build_fima)


def _build_fima(conf: dict, pt):
    from ultrasound_ai.freehand.fima.model import VARIANTS, FimaConfig, FimaNet

    variant = conf.get("variant")
    if variant not in VARIANTS:
        raise InputError(f"checkpoint {pt}: unknown FiMA variant {variant!r} in its card's configuration; "
                         f"expected one of {sorted(VARIANTS)}")
    return FimaNet(FimaConfig.from_dict(conf))


def imu_inputs(imu_acc, imu_euler_deg, imus: Optional[Sequence[int]] = None):
    """Per-pair IMU inputs (acc [N-1, M, 3] m/s^2, angle [N-1, M, 3] degrees) of a sweep's IMU arrays
    [M, N, 3], restricted to the IMU indices `imus` (default all)."""
    from ultrasound_ai.freehand.fima.model import imu_pair_inputs

    a, e = np.asarray(imu_acc), np.asarray(imu_euler_deg)
    if imus is not None:
        a, e = a[list(imus)], e[list(imus)]
    return imu_pair_inputs(a, e)


def window_starts(n_frames: int, max_frames: int) -> tuple[list[int], int]:
    """(window starts, window length): one window when the sweep fits, else windows of `max_frames`
    starting about half a window apart, the last ending at the last frame."""
    from ultrasound_ai.freehand.sweep_windows import clip_starts

    n, w = int(n_frames), int(max_frames)
    if n <= w:
        return [0], n
    return clip_starts(n, w, stride=max(1, (w - 1) // 2)), w


@torch.no_grad()
def encode_windows(model, frames: np.ndarray, starts: Sequence[int], length: int, *, pair_chunk: int = DEFAULT_PAIR_CHUNK,
                   device=None, progress: Optional[Callable[[float, str], None]] = None) -> list:
    """`model.encode` of each window frames[s:s+length] (batch 1), without gradients."""
    dev = device if device is not None else next(model.parameters()).device
    feats = []
    for k, s in enumerate(starts):
        x = torch.from_numpy(np.ascontiguousarray(frames[s:s + length], dtype=np.float32))[None].to(dev)
        feats.append(model.encode(x, pair_chunk=pair_chunk))
        if progress is not None:
            progress((k + 1) / len(starts), "FiMA: encoding frames")
    return feats


def predict_pairs(model, frames: np.ndarray, imu_acc=None, imu_angle=None, *, pair_chunk: int = DEFAULT_PAIR_CHUNK,
                  align: Optional[AlignOptions] = None, device=None,
                  progress: Optional[Callable[[float, str], None]] = None,
                  rotation_from_imus: Optional[bool] = None) -> Prediction:
    """Per-pair estimates for frames [N, h, w] (0..255) already on the model's grid.

    imu_acc / imu_angle: per-pair IMU inputs [N-1, M, 3] (`imu_inputs`), needed by the IMU variants.
    align: run online alignment first (`fima.align.online_align`) on a copy of the model; the model given
    is never changed, so every sweep starts from the trained weights. rotation_from_imus: see `FimaNet.decode`
    (None: the model's configuration).
    """
    f = np.asarray(frames)
    n = f.shape[0]
    if n < 2:
        raise InputError(f"FiMA: a sweep needs at least 2 frames, got {n}")
    dev = device if device is not None else next(model.parameters()).device
    uses_imus = model.cfg.uses_imus
    if uses_imus:
        if imu_acc is None or imu_angle is None:
            raise InputError(f"FiMA variant {model.cfg.variant!r} fuses IMUs: IMU inputs are required")
        acc = torch.as_tensor(imu_acc, dtype=torch.float32).to(dev)
        ang = torch.as_tensor(imu_angle, dtype=torch.float32).to(dev)
        if acc.shape[0] != n - 1 or ang.shape != acc.shape:
            raise InputError(f"FiMA IMU inputs: expected [N-1, M, 3] = [{n - 1}, M, 3], got {list(acc.shape)} "
                             f"and {list(ang.shape)}")
    starts, length = window_starts(n, model.cfg.window_frames[1])
    report = progress if progress is not None else (lambda frac, msg: None)
    was_training = model.training
    model.eval()
    try:
        feats = encode_windows(model, f, starts, length, pair_chunk=pair_chunk, device=dev,
                               progress=lambda frac, msg: report(0.6 * frac if align else 0.9 * frac, msg))
        L = length - 1
        win_imu = [(acc[s:s + L][None], ang[s:s + L][None]) if uses_imus else (None, None) for s in starts]
        net, history, parts = model, None, {}
        if align is not None:
            windows = [AlignWindow(features=ft, imu_acc=a, imu_angle=r,
                                   frames=(torch.from_numpy(np.ascontiguousarray(f[s:s + length], dtype=np.float32))[None]
                                           .to(dev) if align.whole_network else None))
                       for ft, (a, r), s in zip(feats, win_imu, starts)]
            result = online_align(model, windows, steps=align.steps, lr=align.lr, tau=align.tau,
                                  whole_network=align.whole_network, pair_chunk=pair_chunk,
                                  progress=lambda frac, msg: report(0.6 + 0.3 * frac, msg))
            net, history, parts = result.model, result.history, {"info_nce": result.info_nce, "prior": result.prior}
            if align.whole_network:  # the encoder changed too: features of the adapted network
                feats = encode_windows(net, f, starts, length, pair_chunk=pair_chunk, device=dev)
        per_params, per_weights = [], []
        with torch.no_grad():
            for ft, (a, r) in zip(feats, win_imu):
                out = net.decode(ft, a, r, rotation_from_imus)
                per_params.append(out.params[0].double().cpu().numpy())
                if out.imu_weights is not None:
                    per_weights.append(out.imu_weights[0].double().cpu().numpy())
    finally:
        model.train(was_training)
    from ultrasound_ai.freehand.sweep_windows import average_overlapping

    params = average_overlapping(per_params, starts, n - 1)
    weights = average_overlapping(per_weights, starts, n - 1) if per_weights else None
    report(1.0, "FiMA: motion estimated")
    return Prediction(params=params, imu_weights=weights, align_history=history, align_parts=parts)


def align_sweep(model, frames: np.ndarray, imu_acc, imu_euler_deg, *, steps: int = DEFAULT_STEPS,
                lr: float = DEFAULT_LR, tau: float = DEFAULT_TAU, whole_network: bool = False,
                imus: Optional[Sequence[int]] = None, pair_chunk: int = DEFAULT_PAIR_CHUNK, device=None):
    """Online alignment of `model` to one sweep and the adapted estimate.

    frames [N, h, w] (0..255) on the model's grid; imu_acc / imu_euler_deg: the sweep's IMU arrays
    [M, N, 3] (contract units), `imus` the indices to use. Returns `Prediction`: params
    [N-1, 6] (mm, static-xyz degrees on the grid), imu_weights [N-1, M], align_history (L_align + L_prior
    before each step and after the last) and align_parts (its InfoNCE and prior terms).
    """
    check_settings(steps, lr, tau)
    if imu_acc is None or imu_euler_deg is None:
        raise InputError("online alignment: the sweep has no IMU data (imu_acc, imu_euler_deg [M, N, 3])")
    acc, ang = imu_inputs(imu_acc, imu_euler_deg, imus)
    return predict_pairs(model, frames, acc, ang, pair_chunk=pair_chunk, device=device,
                         align=AlignOptions(steps=int(steps), lr=float(lr), tau=float(tau),
                                            whole_network=bool(whole_network)))


def _flag(params: dict, key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"fima parameter {key}: expected true or false, got {value!r}")
    return bool(value)


def method_options(params: dict, cfg, n_imus_sweep: int, card_direction: str = "network") -> dict:
    """Check the method parameters against the model configuration and the sweep (InputError naming them).

    Returns {"imus": list or None, "align": AlignOptions or None, "pair_chunk": int, "rotation_from_imus": bool,
    "direction": "network" or "imus"}; card_direction: the card's inference.direction (the default).
    """
    steps = params.get("align_steps", AlignOptions.steps)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"fima parameter align_steps: expected an integer >= 1, got {steps!r}")
    lr = params.get("align_lr", AlignOptions.lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
        raise InputError(f"fima parameter align_lr: expected a positive finite number, got {lr!r}")
    whole = _flag(params, "align_whole_network", False)
    chunk = params.get("pair_chunk")
    if chunk is None:
        chunk = auto_pair_chunk(cfg.frame_shape)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"fima parameter pair_chunk: expected an integer >= 1, got {chunk!r}")
    direction_given = "direction" in params
    direction = params.get("direction", card_direction)
    if direction not in DIRECTIONS:
        raise InputError(f"fima parameter direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    online = _flag(params, "online_align", bool(cfg.online_alignment) and cfg.uses_imus)
    imu_rotation = _flag(params, "rotation_from_imus", bool(cfg.rotation_from_imus) and cfg.uses_imus)

    imus = params.get("imus")
    if not cfg.uses_imus:
        if imus is not None:
            raise InputError(f"fima parameter imus: model variant {cfg.variant!r} uses the images only; "
                             "it takes no IMUs")
        if online:
            raise InputError(f"fima parameter online_align: model variant {cfg.variant!r} has no IMU features "
                             "to align (online alignment needs an IMU variant: rem-f-prime, rem-f, fima)")
        if imu_rotation:
            raise InputError(f"fima parameter rotation_from_imus: model variant {cfg.variant!r} uses the images "
                             "only (the IMU rotation needs an IMU variant: rem-f-prime, rem-f, fima)")
        if not direction_given:
            direction = "network"  # a card's setting cannot make an images-only variant use IMUs
        if direction == "imus":
            raise InputError(f"fima parameter direction: model variant {cfg.variant!r} uses the images only "
                             "(direction 'imus' needs an IMU variant: rem-f-prime, rem-f, fima)")
        return {"imus": None, "align": None, "pair_chunk": int(chunk), "rotation_from_imus": False,
                "direction": direction, "direction_given": direction_given}
    if n_imus_sweep == 0:
        raise InputError(f"method 'fima': model variant {cfg.variant!r} fuses IMUs, but the sweep has no IMU data; "
                         "expected 'imu_acc' and 'imu_euler_deg' [M, N, 3]")
    if imus is not None:
        if (not isinstance(imus, (list, tuple)) or not imus
                or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in imus)):
            raise InputError(f"fima parameter imus: expected a non-empty list of IMU indices, got {imus!r}")
        bad = [int(i) for i in imus if not 0 <= int(i) < n_imus_sweep]
        if bad:
            raise InputError(f"fima parameter imus: indices {bad} out of range; the sweep has {n_imus_sweep} IMUs "
                             f"(0..{n_imus_sweep - 1})")
        if len(set(int(i) for i in imus)) != len(imus):
            raise InputError(f"fima parameter imus: repeated indices in {list(imus)}")
        imus = [int(i) for i in imus]
    m = len(imus) if imus is not None else n_imus_sweep
    if cfg.fusion == "linear" and m != cfg.n_imus:
        raise InputError(f"method 'fima': model variant {cfg.variant!r} (linear fusion, ReM+F') needs exactly "
                         f"{cfg.n_imus} IMUs, got {m} (from the sweep's imu_acc/imu_euler_deg"
                         f"{' and the imus parameter' if imus is not None else ''})")
    align = AlignOptions(steps=int(steps), lr=float(lr), whole_network=whole) if online else None
    return {"imus": imus, "align": align, "pair_chunk": int(chunk), "rotation_from_imus": imu_rotation,
            "direction": direction, "direction_given": direction_given}


def estimate_sweep(model, card: dict, sweep, options: dict, progress=None) -> tuple[np.ndarray, Optional[np.ndarray], dict]:
    """(tforms [N, 4, 4] in the sweep's image mm relative to frame 0, imu_weights [N-1, M_sweep] or None,
    facts) for a Sweep, its frames resampled to the card's grid first."""
    from ultrasound_ai.core.geometry import chain_relative, params_to_matrix
    from ultrasound_ai.freehand.sweep_windows import from_network_relative, grid_geometry, resample_frames

    cfg = model.cfg
    inp = card.get("input") or {}
    shape = inp.get("frame_shape_hw") or list(cfg.frame_shape)
    spacing = inp.get("pixel_spacing_mm") or [cfg.pixel_spacing_mm] * 2
    if [int(v) for v in shape] != list(cfg.frame_shape):
        raise InputError(f"model card {card.get('name')!r}: input.frame_shape_hw {shape} does not match its "
                         f"configuration {list(cfg.frame_shape)}")
    geom = grid_geometry(sweep.frames.shape[1:], sweep.pixel_spacing_xy, shape, spacing)
    net_frames = resample_frames(sweep.frames, geom)
    acc = ang = None
    if cfg.uses_imus:
        acc, ang = imu_inputs(sweep.imu_acc, sweep.imu_euler_deg, options["imus"])
    from ultrasound_ai.core.memory import check_memory

    pairs = min(int(options["pair_chunk"]), min(len(net_frames), int(cfg.window_frames[1])) - 1)
    check_memory(window_memory_bytes(cfg, max(1, pairs)), what=f"encoding {pairs} frame pairs of "
                 f"{cfg.frame_shape[0]}x{cfg.frame_shape[1]} px at once", option="pair_chunk (fima method parameter)",
                 device=str(next(model.parameters()).device))
    pred = predict_pairs(model, net_frames, acc, ang, pair_chunk=options["pair_chunk"], align=options["align"],
                         progress=progress, rotation_from_imus=options.get("rotation_from_imus"))
    rel = from_network_relative(params_to_matrix(pred.params, PARAM_CONVENTION, degrees=True), geom)
    direction_facts = {"direction": "network"}
    if options.get("direction") == "imus":
        from ultrasound_ai.freehand.imu_travel import apply_imu_direction, unfit_reason

        reason = unfit_reason(sweep)
        if reason is None:
            rel, direction_facts = apply_imu_direction(rel, sweep)
        elif options.get("direction_given"):
            raise InputError(f"fima parameter direction 'imus': {reason}")
        else:  # the card's default cannot apply: say so in the result rather than fail
            direction_facts["direction_skipped"] = f"the card's direction 'imus' was not applied: {reason}"
    weights = None
    if pred.imu_weights is not None:
        m = sweep.n_imus
        used = options["imus"] if options["imus"] is not None else list(range(m))
        weights = np.zeros((sweep.n_frames - 1, m), dtype=np.float32)
        weights[:, used] = pred.imu_weights  # IMUs left out get weight 0
    align = options["align"]
    facts = {"variant": cfg.variant, "network_frame_shape_hw": list(geom.frame_shape_hw),
             "network_pixel_spacing_mm": list(geom.spacing_xy), "network_grid_offset_mm": list(geom.offset_mm),
             "window_frames": int(cfg.window_frames[1]), "online_align": align is not None,
             "rotation_from_imus": bool(options.get("rotation_from_imus", False)), **direction_facts}
    if cfg.uses_imus:
        facts["imus_used"] = list(options["imus"]) if options["imus"] is not None else list(range(sweep.n_imus))
    if align is not None:
        facts.update(align_steps=align.steps, align_lr=align.lr, align_whole_network=align.whole_network,
                     align_loss_first=float(pred.align_history[0]), align_loss_last=float(pred.align_history[-1]))
    return chain_relative(rel), weights, facts


class FimaMethod(PoseMethod):
    """FiMA (Yan et al., MICCAI 2024) and its ablations: ReMamba on frame pairs, optional multi-IMU fusion
    and online alignment; the variant comes from the checkpoint's card."""

    name = METHOD
    accepted_params = ("online_align", "align_steps", "align_lr", "align_whole_network", "imus", "pair_chunk",
                       "rotation_from_imus", "direction", "frame_stride")

    def _estimate(self, sweep, ctx: MethodContext) -> PoseEstimate:
        from ultrasound_ai.freehand.pair_interval import estimate_at_card_interval

        ctx.report(0.0, "loading FiMA")
        model, card = load_fima(ctx.checkpoint, ctx.device)
        options = method_options(ctx.params, model.cfg, sweep.n_imus,
                                 card_direction=(card.get("inference") or {}).get("direction", "network"))
        progress = (lambda frac, msg: ctx.report(0.05 + 0.9 * frac, msg))
        tforms, weights, facts = estimate_at_card_interval(
            sweep, card, ctx.params.get("frame_stride"), METHOD,
            lambda s: estimate_sweep(model, card, s, options, progress=progress))
        ctx.report(1.0, "FiMA done")
        return PoseEstimate(tforms=tforms, imu_weights=weights,
                            attrs={"checkpoint": str(card.get("name", "")),
                                   "checkpoint_sha256": str(card.get("sha256", "")), **facts})
