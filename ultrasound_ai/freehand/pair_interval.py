"""Frame pairs read at the time interval a freehand model was trained on.

A network that reads out-of-plane motion from a frame pair learns it at the pairs' interval in its training
data: the shipped models saw 20 Hz sweeps with pair strides of 1 and 2 frames (50-100 ms). On a 40 Hz sweep
the same hand speed gives each consecutive pair half that motion, where speckle has barely decorrelated and
the reading is mostly noise. So a faster sweep is read on its keyframes, every k-th frame with k the stride
whose interval is nearest the card's ``inference.min_pair_interval_s`` (and always the last frame),
and the poses of the frames in between are interpolated (rotation by slerp, the image origin linearly, both
in time). On training-simulator sweeps at 30 and 40 Hz this raised the per-pair out-of-plane correlation
from 0.51 / 0.40 to 0.65 / 0.61 (FiMA) and 0.55 / 0.35 to 0.71 / 0.67 (MoGLo-Net); BENCHMARKS.md
``freehand_frame_rate``. Slower sweeps (up to the trained interval) are read pair by pair as before.

Method parameter ``frame_stride`` (fima, moglo, decorrelation): "auto" (the default) as above, or a whole number
of frames (1: every consecutive pair, as the papers do). A card without ``min_pair_interval_s`` reads every pair.
A sweep slower than the card's ``max_pair_interval_s`` (the longest trained pairs) is read as it is, with
``pair_interval_warning`` in the result: there are no frames in between to read instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional

import numpy as np

from ultrasound_ai.core.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["median_frame_interval", "resolve_stride", "keyframe_indices", "subsample", "interpolate_poses", "spread_pair_values",
           "estimate_at_stride", "estimate_at_card_interval", "card_min_interval", "card_max_interval"]


def card_min_interval(card: dict) -> Optional[float]:
    """The card's ``inference.min_pair_interval_s`` (None when it has none)."""
    value = (card.get("inference") or {}).get("min_pair_interval_s")
    return None if value is None else float(value)


def card_max_interval(card: dict) -> Optional[float]:
    """The card's ``inference.max_pair_interval_s``: the longest pairs the model was trained on (None: unknown)."""
    value = (card.get("inference") or {}).get("max_pair_interval_s")
    return None if value is None else float(value)


def median_frame_interval(sweep, idx: Optional[np.ndarray] = None) -> Optional[float]:
    """Median interval (s) between the frames `idx` (default all) of a sweep; None without frame times."""
    if sweep.n_frames < 2 or (sweep.timestamps_s is None and sweep.frame_rate_hz is None):
        return None
    t = sweep.times_s()
    return float(np.median(np.diff(t if idx is None else t[idx])))


def resolve_stride(value, sweep, min_interval_s: Optional[float], method: str) -> int:
    """The frame stride for `sweep`: `value` "auto"/None (from min_interval_s and the sweep's median frame
    interval) or a whole number >= 1 (InputError naming the parameter otherwise)."""
    if value is None or (isinstance(value, str) and value == "auto"):
        dt = median_frame_interval(sweep)
        if min_interval_s is None or dt is None:
            return 1
        # the stride whose interval is nearest the trained one (halves up): at 25 Hz the 40 ms pairs are read as
        # they are (every second frame, 80 ms, did not lower FDR there), from 30 Hz every second frame
        return max(1, math.floor(min_interval_s / dt + 0.5 + 1e-9))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{method} parameter frame_stride: expected 'auto' or a whole number of frames >= 1, "
                         f"got {value!r}")
    return int(value)


def keyframe_indices(n_frames: int, stride: int) -> np.ndarray:
    """0, k, 2k, ... and the last frame; a last step shorter than k joins the one before (k+1 to 2k-1 frames,
    within the trained pairs, rather than a short pair, which is what the stride avoids)."""
    idx = list(range(0, int(n_frames), int(stride)))
    if idx[-1] != n_frames - 1:
        if len(idx) > 1:
            idx.pop()
        idx.append(int(n_frames) - 1)
    return np.asarray(idx, dtype=np.int64)


def subsample(sweep, idx: np.ndarray):
    """The sweep on the frames `idx` (frames, times, tforms and the IMUs' per-frame samples; a stored
    estimate's per-pair imu_weights do not carry over)."""
    def take(a, axis):
        return None if a is None else np.take(a, idx, axis=axis)

    return dataclasses.replace(
        sweep, frames=sweep.frames[idx], tforms=take(sweep.tforms, 0), timestamps_s=sweep.times_s()[idx],
        frame_rate_hz=None, imu_acc=take(sweep.imu_acc, 1), imu_euler_deg=take(sweep.imu_euler_deg, 1),
        imu_weights=None)


def interpolate_poses(key_tforms: np.ndarray, idx: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    """Poses [N, 4, 4] at every time from those at the keyframes `idx` (slerp; the origin linearly)."""
    from scipy.spatial.transform import Rotation, Slerp

    key = np.asarray(key_tforms, dtype=np.float64)
    t = np.asarray(times_s, dtype=np.float64)
    out = np.tile(np.eye(4), (len(t), 1, 1))
    out[:, :3, :3] = Slerp(t[idx], Rotation.from_matrix(key[:, :3, :3]))(t).as_matrix()
    for a in range(3):
        out[:, a, 3] = np.interp(t, t[idx], key[:, a, 3])
    out[idx] = key  # the keyframes exactly as estimated
    return out


def spread_pair_values(values: np.ndarray, idx: np.ndarray, n_frames: int) -> np.ndarray:
    """Per-pair values of the keyframe pairs [K-1, ...] given to every frame pair they span [N-1, ...]."""
    values = np.asarray(values)
    which = np.searchsorted(idx, np.arange(n_frames - 1), side="right") - 1
    return values[which]


def _interval_facts(sweep, idx: np.ndarray, max_interval_s: Optional[float]) -> dict:
    """pair_interval_s of the pairs read, and a warning when they are longer than any the model was trained on."""
    interval = median_frame_interval(sweep, idx)
    if interval is None:
        return {}
    facts = {"pair_interval_s": interval}
    if max_interval_s is not None and interval > 1.05 * max_interval_s:
        facts["pair_interval_warning"] = (
            f"the frame pairs read are {1000 * interval:.0f} ms apart; the model was trained on pairs up to "
            f"{1000 * max_interval_s:.0f} ms apart: expect larger errors on a sweep this slow")
        log.warning("freehand: %s", facts["pair_interval_warning"])
    return facts


def estimate_at_stride(sweep, stride: int, estimate: Callable, max_interval_s: Optional[float] = None) -> tuple:
    """(tforms [N, 4, 4], per-pair values [N-1, ...] or None, facts) of `estimate(sweep) -> (tforms,
    per-pair values or None, facts)` run on the keyframes of `sweep` when stride > 1, else on the sweep;
    facts gain frame_stride, pair_interval_s and, beyond max_interval_s, pair_interval_warning."""
    if stride <= 1 or sweep.n_frames <= 2:
        tforms, per_pair, facts = estimate(sweep)
        return tforms, per_pair, {**facts, "frame_stride": 1,
                                  **_interval_facts(sweep, np.arange(sweep.n_frames), max_interval_s)}
    idx = keyframe_indices(sweep.n_frames, stride)
    key_tforms, per_pair, facts = estimate(subsample(sweep, idx))
    tforms = interpolate_poses(key_tforms, idx, sweep.times_s())
    spread = None if per_pair is None else spread_pair_values(per_pair, idx, sweep.n_frames)
    return tforms, spread, {**facts, "frame_stride": int(stride), **_interval_facts(sweep, idx, max_interval_s)}


def estimate_at_card_interval(sweep, card: dict, frame_stride, method: str, estimate: Callable) -> tuple:
    """`estimate_at_stride` with the stride from the method parameter `frame_stride` and the card's intervals."""
    stride = resolve_stride(frame_stride, sweep, card_min_interval(card), method)
    return estimate_at_stride(sweep, stride, estimate, max_interval_s=card_max_interval(card))
