"""MoGLo-Net as a pose method ("moglo"): sensorless, images only.

Pipeline for one sweep: the frames are resampled onto the checkpoint's grid (card ``input``: frame shape and
pixel spacing; grid centred laterally from the top row, `sweep_windows`), cut into clips of `clip_frames`
(5) frames, the network predicts the relative transform of every consecutive pair on the grid, the
transforms are moved back to the sweep's own image-mm coordinates (the grid offset is carried through) and
chained, so ``tforms[0]`` = identity and ``tforms[i]`` maps frame i's image mm to frame 0's.

Clip overlap (parameter ``overlap``): "last" (default) slides the clip one frame at a time and takes each
pair from the clip in which it is the last pair, so its LSTM has seen the most context (the authors
score the last pair); the first clip supplies its first pairs. "none" cuts consecutive clips sharing
one frame (about clip_frames - 1 times faster). A sweep shorter than a clip runs as one shorter clip.

Direction (parameter ``direction``; default: the card's ``inference.direction``, else "network"): "network" keeps
each pair as the network gives it. "forward"
replaces every pair whose frame centre moves backwards (negative out-of-plane displacement) by its mirror image
through the image plane, M T M with M = diag(1, 1, -1): tz, rx and ry change sign. Two images cannot tell a
motion from its mirror image (the speckle decorrelates alike either way), and on the training family's sweeps
the network's sign was right for about half of the moving pairs (`bench/diagnose_freehand_drift.py`), so one
consistent direction, +z, as the images-only decorrelation baseline assumes, drifts less. "turns" does that
and then reverses the direction of travel at each turning point found in the frames
(`ultrasound_ai.freehand.turning_points`: where frames r - j and r + j are far more alike than frames 2j apart
on one side, the probe came back); sign linking does not apply to it. "ordering" does "forward" and then gives
each pair the direction of its step when all frames are put in order along the out-of-plane axis by how alike
their speckle is (`ultrasound_ai.freehand.frame_ordering`: where the probe comes back, its frames resemble those
it took on the way out); sign linking does not apply to it either.

Sign linking (card ``inference.sign_linking``, models trained with ``data.clip_mirror``): such a network gives
each clip's motion up to one sign (its clip moving forwards); `predict_pairs_linked` links the clips' signs
through their overlapping pairs, so reversals that the frames show are kept, and "forward" then mirrors the
whole sweep when its net motion is backwards (per pair nothing is mirrored); ``overlap`` does not apply.

Rotation (parameter ``rotation``; default the card's ``inference.rotation``, else "network"): "in-plane" sets the
tilts (rotation about the image's x and y axes, out of plane) of every pair's motion about the frame centre to zero
and keeps the rotation within the plane, for a network whose tilts do not follow the images (measured per
checkpoint on training-family sweeps; see its card).

Frame stride (parameter ``frame_stride``, "auto" by default): a sweep faster than the card's
``inference.min_pair_interval_s`` is read on every k-th frame, the frames between interpolated
(`ultrasound_ai.freehand.pair_interval`); a whole number sets k (1: every pair, as the paper).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.frame_ordering import MIRROR as _MIRROR
from ultrasound_ai.freehand.frame_ordering import mirror_pairs as _mirrored
from ultrasound_ai.freehand.methods import MethodContext, PoseEstimate, PoseMethod

__all__ = ["MogloMethod", "load_moglo", "predict_pairs", "predict_pairs_linked", "estimate_sweep", "forward_pairs",
           "forward_params", "mirror_params", "centre_dz", "DIRECTIONS", "ROTATIONS"]

METHOD = "moglo"
DIRECTIONS = ("network", "forward", "turns", "ordering")
ROTATIONS = ("network", "in-plane")


def forward_pairs(rel: np.ndarray, centre_mm) -> np.ndarray:
    """Pair transforms [M, 4, 4] with every pair whose point `centre_mm` (in the image plane) moves backwards
    (out of plane, z < 0) replaced by its mirror image M T M (module docstring)."""
    c = np.append(np.asarray(centre_mm, dtype=np.float64), 1.0)
    backwards = (rel @ c)[:, 2] < 0  # the centre has z = 0, so its displacement is its new z
    return _mirrored(rel, backwards)


def forward_params(params: np.ndarray, centre_mm) -> np.ndarray:
    """Network parameters [M, 6] with every pair whose point `centre_mm` moves backwards replaced by its mirror
    image (`forward_pairs` on parameters)."""
    params = np.asarray(params)
    return np.where((centre_dz(params, centre_mm) < 0)[:, None], mirror_params(params), params)


def mirror_params(params: np.ndarray) -> np.ndarray:
    """Network parameters [..., 6] (mm, degrees PARAM_CONVENTION) of the mirror images M T M of their transforms."""
    from ultrasound_ai.core.geometry import matrix_to_params, params_to_matrix
    from ultrasound_ai.freehand.moglo.model import PARAM_CONVENTION

    rel = params_to_matrix(np.asarray(params, dtype=np.float64), PARAM_CONVENTION, degrees=True)
    return matrix_to_params(_MIRROR @ rel @ _MIRROR, PARAM_CONVENTION, degrees=True)


def centre_dz(params: np.ndarray, centre_mm) -> np.ndarray:
    """Out-of-plane displacement [...] of the in-plane point `centre_mm` under each pair's transform."""
    from ultrasound_ai.core.geometry import params_to_matrix
    from ultrasound_ai.freehand.moglo.model import PARAM_CONVENTION

    rel = params_to_matrix(np.asarray(params, dtype=np.float64), PARAM_CONVENTION, degrees=True)
    return (rel @ np.append(np.asarray(centre_mm, dtype=np.float64), 1.0))[..., 2]


def load_moglo(checkpoint=None, device="cpu"):
    """(MogloNet in eval mode on `device`, card) from a .pt path or model name; None = the default "moglo"
    model installed (Resources/Models or ULTRASOUND_AI_MODELS)."""
    from ultrasound_ai.models.loading import load_method_model

    return load_method_model(METHOD, checkpoint, device, _build_moglo)


def _build_moglo(conf: dict, pt):
    from ultrasound_ai.freehand.moglo.model import MogloConfig, MogloNet

    return MogloNet(MogloConfig.from_dict(conf))


def _clip_batches(n: int, t: int, overlap: str):
    """(starts, pairs_to_take): for each clip start, the (clip pair index, sweep pair index) it supplies."""
    if n <= t:
        return [0], [[(i, i) for i in range(n - 1)]]
    if overlap == "none":
        from ultrasound_ai.freehand.sweep_windows import clip_starts

        starts = clip_starts(n, t)
        taken, done = [], set()
        for s in starts:
            take = [(i, s + i) for i in range(t - 1) if s + i not in done]
            done.update(p for _, p in take)
            taken.append(take)
        return starts, taken
    starts = list(range(0, n - t + 1))
    taken = [[(i, i) for i in range(t - 1)]] + [[(t - 2, s + t - 2)] for s in starts[1:]]
    return starts, taken


@torch.no_grad()
def predict_pairs(model, frames: np.ndarray, *, overlap: str = "last", batch_clips: int = 16,
                  device=None, progress: Optional[Callable[[float, str], None]] = None) -> np.ndarray:
    """Per-pair parameters [N-1, 6] (mm, degrees "YZX", on the network grid) for frames [N, h, w] (0..255)
    already on the model's grid."""
    if overlap not in ("last", "none"):
        raise InputError(f"moglo parameter overlap: expected 'last' or 'none', got {overlap!r}")
    if int(batch_clips) < 1:
        raise InputError(f"moglo parameter batch_clips: expected >= 1, got {batch_clips}")
    f = np.asarray(frames)
    n = f.shape[0]
    starts, taken = _clip_batches(n, model.config.clip_frames, overlap)
    params = _clip_params(model, f, starts, min(n, model.config.clip_frames), batch_clips, device, progress)
    out = np.zeros((n - 1, 6))
    for k, take in enumerate(taken):
        for i, p in take:
            out[p] = params[k, i]
    return out


def _clip_params(model, f: np.ndarray, starts: list, length: int, batch_clips: int, device,
                 progress: Optional[Callable[[float, str], None]]) -> np.ndarray:
    """The network's pair parameters [len(starts), length - 1, 6] of the clips f[s:s + length], batch_clips
    clips per call, in eval mode (the model's mode is restored)."""
    dev = device if device is not None else model.param_mean.device
    out = np.zeros((len(starts), length - 1, 6))
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(starts), int(batch_clips)):
            chunk = starts[b0:b0 + int(batch_clips)]
            clips = torch.from_numpy(np.stack([f[s:s + length] for s in chunk]).astype(np.float32)).to(dev)
            out[b0:b0 + len(chunk)] = model(clips).params.double().cpu().numpy()
            if progress is not None:
                progress(min(1.0, (b0 + len(chunk)) / len(starts)), "MoGLo-Net: estimating motion")
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def predict_pairs_linked(model, frames: np.ndarray, *, forward: bool = False, batch_clips: int = 16, device=None,
                         progress: Optional[Callable[[float, str], None]] = None) -> np.ndarray:
    """Per-pair parameters [N-1, 6] on the grid from a model trained on clip-mirrored targets (each clip's
    sign canonical: its grid centre moves forwards over the clip), with the clips' signs linked.

    Clips start at every frame; each pair is taken from the clip in which it is last (as overlap "last").
    A clip's sign is relative to its own net motion, so before its last pair is taken the whole clip is
    mirrored (M T M) when its other pairs disagree with the pairs already decided (sum of the products of
    their centre out-of-plane displacements < 0). The first clip keeps its sign: the chain moves forwards
    at its start; only reversals within and between clips are resolved from the images. forward: the whole
    chain is mirrored when its centre's summed out-of-plane displacement is negative (net motion forwards).
    """
    f = np.asarray(frames)
    n, t = f.shape[0], model.config.clip_frames
    if n <= t:
        return predict_pairs(model, f, overlap="last", batch_clips=batch_clips, device=device, progress=progress)
    starts = list(range(0, n - t + 1))
    clips = _clip_params(model, f, starts, t, batch_clips, device, progress)
    dz = centre_dz(clips, _grid_centre(model))
    out = np.zeros((n - 1, 6))
    out[:t - 1], decided = clips[0], np.zeros(n - 1)
    decided[:t - 1] = dz[0]
    for s in starts[1:]:
        clip, d = clips[s], dz[s]
        if float((d[:-1] * decided[s:s + t - 2]).sum()) < 0:
            clip, d = mirror_params(clip), -d
        out[s + t - 2], decided[s + t - 2] = clip[-1], d[-1]
    return mirror_params(out) if forward and decided.sum() < 0 else out


def _grid_centre(model) -> np.ndarray:
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    return frame_centre_mm(model.config.frame_shape, (model.config.pixel_spacing_mm,) * 2)


def estimate_sweep(model, card: dict, frames: np.ndarray, pixel_spacing_xy, *, overlap: str = "last",
                   batch_clips: int = 16, direction: Optional[str] = None, sign_linking: Optional[bool] = None,
                   smoothing_s=None, frame_interval_s: Optional[float] = None, rotation: Optional[str] = None,
                   progress=None) -> tuple[np.ndarray, dict]:
    """(tforms [N, 4, 4] in the sweep's image mm relative to frame 0, facts) for uint8 frames [N, H, W] at
    pixel_spacing_xy (x first), resampled to the card's grid first; direction: "network" or "forward" (None:
    the card's inference.direction, else "network"); sign_linking: None = the card's inference.sign_linking;
    smoothing_s: None = the card's inference.smoothing_s, else 0 (off); it needs frame_interval_s (seconds),
    without which it is skipped and the facts say so."""
    from ultrasound_ai.core.geometry import chain_relative, params_to_matrix
    from ultrasound_ai.freehand.moglo.model import PARAM_CONVENTION
    from ultrasound_ai.freehand.sweep_windows import from_network_relative, grid_geometry, resample_frames

    if direction is None:
        direction = (card.get("inference") or {}).get("direction", "network")
    if direction not in DIRECTIONS:
        raise InputError(f"moglo parameter direction: expected one of {list(DIRECTIONS)}, got {direction!r}")
    if rotation is None:
        rotation = (card.get("inference") or {}).get("rotation", "network")
    if rotation not in ROTATIONS:
        raise InputError(f"moglo parameter rotation: expected one of {list(ROTATIONS)}, got {rotation!r}")
    inp = card.get("input") or {}
    shape = inp.get("frame_shape_hw") or list(model.config.frame_shape)
    spacing = inp.get("pixel_spacing_mm") or [model.config.pixel_spacing_mm] * 2
    if [int(v) for v in shape] != list(model.config.frame_shape):
        raise InputError(f"model card {card.get('name')!r}: input.frame_shape_hw {shape} does not match its "
                         f"configuration {list(model.config.frame_shape)}")
    geom = grid_geometry(frames.shape[1:], pixel_spacing_xy, shape, spacing)
    net_frames = resample_frames(frames, geom)
    if sign_linking is None:
        sign_linking = (card.get("inference") or {}).get("sign_linking", False)
    if not isinstance(sign_linking, bool):
        raise InputError(f"moglo parameter sign_linking: expected true or false, got {sign_linking!r}")
    linked = sign_linking and direction not in ("turns", "ordering")
    if linked:
        params = predict_pairs_linked(model, net_frames, forward=direction == "forward", batch_clips=batch_clips,
                                      progress=progress)
    else:
        params = predict_pairs(model, net_frames, overlap=overlap, batch_clips=batch_clips, progress=progress)
    rel = from_network_relative(params_to_matrix(params, PARAM_CONVENTION, degrees=True), geom)
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    centre = frame_centre_mm(frames.shape[1:], pixel_spacing_xy)
    if rotation == "in-plane":
        from ultrasound_ai.freehand.pair_smoothing import zero_pair_motions

        rel = zero_pair_motions(rel, centre)
    turns = None
    if direction in ("forward", "turns", "ordering") and not linked:
        rel = forward_pairs(rel, centre)
    if direction == "turns":
        from ultrasound_ai.freehand.turning_points import travel_signs, turning_points

        turns = turning_points(frames)
        rel = _mirrored(rel, travel_signs(len(rel), turns) < 0)
    if direction == "ordering":
        if progress is not None:
            progress(1.0, "ordering the frames by their speckle")
        from ultrasound_ai.freehand.frame_ordering import orient_pairs

        rel = orient_pairs(rel, frames, pixel_spacing_xy, frame_interval_s)
    rel, smoothing = _smoothed(rel, card, smoothing_s, frame_interval_s, frames.shape[1:], pixel_spacing_xy)
    facts = {"network_frame_shape_hw": list(geom.frame_shape_hw), "network_pixel_spacing_mm": list(geom.spacing_xy),
             "network_grid_offset_mm": list(geom.offset_mm), "overlap": overlap, "direction": direction,
             "sign_linking": linked, "rotation": rotation, **smoothing, **({"turning_points": turns} if turns is not None else {})}
    return chain_relative(rel), facts


def _smoothed(rel, card: dict, smoothing_s, frame_interval_s, shape_hw, spacing_xy):
    """(pair transforms low-passed in time, facts) (`ultrasound_ai.freehand.pair_smoothing`)."""
    from ultrasound_ai.freehand.pair_smoothing import smooth_pair_motions, smoothing_sigma_pairs
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    if smoothing_s is None:
        smoothing_s = (card.get("inference") or {}).get("smoothing_s", 0.0)
    times = None if frame_interval_s is None else np.array([0.0, float(frame_interval_s)])
    try:
        sigma = smoothing_sigma_pairs(smoothing_s, times)
    except InputError as exc:
        raise InputError(f"moglo parameter {exc}") from None
    if sigma is None:
        return rel, {"smoothing_s": 0.0, "smoothing_skipped": "the sweep has no frame times (timestamps_s or "
                                                              "frame_rate_hz)"}
    return smooth_pair_motions(rel, frame_centre_mm(shape_hw, spacing_xy), sigma), {"smoothing_s": float(smoothing_s)}


class MogloMethod(PoseMethod):
    """MoGLo-Net (Kim et al., IEEE TMI 2025): sensorless pose estimation from the images alone."""

    name = METHOD
    accepted_params = ("overlap", "batch_clips", "direction", "sign_linking", "smoothing_s", "frame_stride",
                       "rotation")

    def _estimate(self, sweep, ctx: MethodContext) -> PoseEstimate:
        from ultrasound_ai.freehand.pair_interval import estimate_at_card_interval, median_frame_interval

        ctx.report(0.0, "loading MoGLo-Net")
        model, card = load_moglo(ctx.checkpoint, ctx.device)
        progress = (lambda frac, msg: ctx.report(0.05 + 0.9 * frac, msg))

        def run(s):
            tforms, facts = estimate_sweep(model, card, s.frames, s.pixel_spacing_xy,
                                           overlap=ctx.params.get("overlap", "last"),
                                           batch_clips=ctx.params.get("batch_clips", 16),
                                           direction=ctx.params.get("direction"),
                                           sign_linking=ctx.params.get("sign_linking"),
                                           smoothing_s=ctx.params.get("smoothing_s"),
                                           rotation=ctx.params.get("rotation"),
                                           frame_interval_s=median_frame_interval(s), progress=progress)
            return tforms, None, facts

        tforms, _, facts = estimate_at_card_interval(sweep, card, ctx.params.get("frame_stride"), METHOD, run)
        ctx.report(1.0, "MoGLo-Net done")
        return PoseEstimate(tforms=tforms, attrs={"checkpoint": str(card.get("name", "")),
                                                  "checkpoint_sha256": str(card.get("sha256", "")), **facts})
