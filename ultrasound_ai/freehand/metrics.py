"""Freehand reconstruction metrics: Luo et al. / FiMA Table 1 and the TUS-REC challenge.

Both pose sequences (``[N, 4, 4]`` image-mm -> world mm, the sweep contract's ``tforms``) are first
normalised to their first frame (``inv(T_0) @ T_i``), because estimates are expressed with
``tforms[0]`` = identity; after that, frame 0 coincides in both by construction.

Trajectory metrics (FiMA Table 1) use three points of the frame: its centre and its two top corners
(``geometry.frame_reference_points``). Each metric is computed separately for each point's trajectory
and the three values are averaged. For one point, p_i true and p̂_i estimated position of frame i
(0-based), e_i = ‖p̂_i − p_i‖ and D_i = Σ_{k<i} ‖p_{k+1} − p_k‖ the true path length of that same
point up to frame i:

- FDR = e_{N−1} / D_{N−1} · 100 (%)
- ADR = mean over the frames with D_i ≥ 0.1 mm of e_i / D_i · 100 (%)
- MD = max_i e_i (mm), SD = Σ_i e_i (mm)
- HD = symmetric Hausdorff distance between the sets {p_i} and {p̂_i} (mm)
- MEA = mean over frames 1..N−1 and the three frame axes of the angle (degrees) between the true and
  the estimated axis; frame 0 is left out because it is the common reference (its angle is 0 by
  construction and would only dilute the mean).

TUS-REC metrics over every pixel x of the frame (image-mm, pixel (r, c) at (c·sx, r·sy, 0)) and the
frames i ≥ 1 (0-based; the first frame is the reference):

- GPE = mean ‖T̂_{0←i} x − T_{0←i} x‖ with the global transforms T_{0←i} = inv(T_0) T_i
- LPE = the same with the local transforms T_{i−1←i} = inv(T_{i−1}) T_i
- GLE / LLE = the same on landmarks (frame index, x, y) given in 0-based pixel coordinates
  (x along columns, y along rows); landmarks on frame 0 are left out (global error 0, no local one).

GPE and LPE are computed in blocks of frames × rows so that the full pixels × frames array (307k × N
for 480×640 frames) is never held in memory; every block is computed in float64.
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core import geometry
from ultrasound_ai.core.errors import InputError

__all__ = [
    "ADR_MIN_PATH_MM",
    "frame_points",
    "fdr",
    "adr",
    "md",
    "sd",
    "hd",
    "mea",
    "gpe",
    "lpe",
    "gle",
    "lle",
    "evaluate_sweep",
]

# Frames whose true path length is below this are left out of ADR (the ratio is meaningless near 0).
ADR_MIN_PATH_MM = 0.1
# Default block size for GPE/LPE: (frame, pixel) pairs evaluated at once (~100 MB of float64 work).
DEFAULT_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _poses(tforms, name: str, min_frames: int = 1) -> np.ndarray:
    try:
        a = np.asarray(tforms, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a float array [N, 4, 4] of frame poses") from None
    if a.ndim != 3 or a.shape[1:] != (4, 4):
        raise InputError(f"{name}: expected shape [N, 4, 4] (image-mm -> world mm per frame), got {list(a.shape)}")
    if a.shape[0] < min_frames:
        raise InputError(f"{name}: expected at least {min_frames} frames, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name}: contains NaN or infinite values; expected finite poses")
    return a


def _pair(tforms_est, tforms_true, min_frames: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both sequences checked, of equal length, normalised to their first frame."""
    est = _poses(tforms_est, "tforms_est", min_frames)
    true = _poses(tforms_true, "tforms_true", min_frames)
    if est.shape[0] != true.shape[0]:
        raise InputError(
            f"tforms_est: expected as many frames as tforms_true ({true.shape[0]}), got {est.shape[0]}"
        )
    return geometry.normalize_to_first(est), geometry.normalize_to_first(true)


def _frame_geometry(frame_shape_hw, pixel_spacing_xy) -> tuple[int, int, float, float]:
    # The reference points' checks, so every metric accepts and rejects the same frame geometry.
    geometry.frame_reference_points(frame_shape_hw, pixel_spacing_xy)
    h, w = (int(v) for v in frame_shape_hw)
    sx, sy = (float(v) for v in pixel_spacing_xy)
    return h, w, sx, sy


# ----------------------------------------------------------------------------------------------
# Trajectory metrics (FiMA Table 1)
# ----------------------------------------------------------------------------------------------


def frame_points(tforms, frame_shape_hw, pixel_spacing_xy) -> np.ndarray:
    """World positions ``[N, 3, 3]`` (frame, point, xyz) of the centre, top-left and top-right corner.

    The poses are used as given (no normalisation); the metric functions normalise first.
    """
    T = _poses(tforms, "tforms")
    ref = geometry.frame_reference_points(frame_shape_hw, pixel_spacing_xy)
    return geometry.apply_transform(T[:, None], ref[None])


def _normalised_points(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy):
    est, true = _pair(tforms_est, tforms_true)
    return (frame_points(est, frame_shape_hw, pixel_spacing_xy),
            frame_points(true, frame_shape_hw, pixel_spacing_xy))


def _errors_and_paths(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy):
    """e [N, 3] point errors and D [N, 3] true path lengths, per frame and reference point."""
    p_est, p_true = _normalised_points(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy)
    err = np.linalg.norm(p_est - p_true, axis=-1)
    steps = np.linalg.norm(np.diff(p_true, axis=0), axis=-1)
    path = np.concatenate([np.zeros((1, 3)), np.cumsum(steps, axis=0)], axis=0)
    return err, path


def fdr(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy) -> float:
    """Final drift rate (%): final-frame error over the true path length, averaged over the 3 points."""
    err, path = _errors_and_paths(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy)
    if np.any(path[-1] <= 0):
        raise InputError("tforms_true: the true trajectory has zero length; FDR (drift / path length) is undefined")
    return float(np.mean(err[-1] / path[-1]) * 100.0)


def adr(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy) -> float:
    """Average drift rate (%): mean of e_i / D_i over frames with D_i >= 0.1 mm, averaged over points."""
    err, path = _errors_and_paths(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy)
    per_point = []
    for p in range(3):
        keep = path[:, p] >= ADR_MIN_PATH_MM
        if not np.any(keep):
            raise InputError(
                f"tforms_true: no frame is {ADR_MIN_PATH_MM} mm or more along the true path; ADR is undefined"
            )
        per_point.append(np.mean(err[keep, p] / path[keep, p]))
    return float(np.mean(per_point) * 100.0)


def md(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy) -> float:
    """Maximum drift (mm): largest point error over frames, averaged over the 3 points."""
    err, _ = _errors_and_paths(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy)
    return float(np.mean(err.max(axis=0)))


def sd(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy) -> float:
    """Sum of drifts (mm): point errors summed over frames, averaged over the 3 points."""
    err, _ = _errors_and_paths(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy)
    return float(np.mean(err.sum(axis=0)))


def _directed_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """max over a of the distance to the nearest point of b (exact, via a k-d tree)."""
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(b).query(a, k=1)
    return float(np.max(dist))


def hd(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy) -> float:
    """Symmetric Hausdorff distance (mm) between true and estimated trajectories, averaged over points."""
    p_est, p_true = _normalised_points(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy)
    values = [
        max(_directed_hausdorff(p_est[:, p], p_true[:, p]), _directed_hausdorff(p_true[:, p], p_est[:, p]))
        for p in range(3)
    ]
    return float(np.mean(values))


def mea(tforms_est, tforms_true) -> float:
    """Mean error of angle (degrees) between true and estimated frame axes, frames 1..N−1, 3 axes."""
    est, true = _pair(tforms_est, tforms_true)
    # Columns of R are the frame's x, y, z axes in world coordinates.
    cos = np.einsum("nij,nij->nj", est[1:, :3, :3], true[1:, :3, :3])
    # Normalise in case an estimate is rigid only to float32 precision.
    cos /= np.linalg.norm(est[1:, :3, :3], axis=1) * np.linalg.norm(true[1:, :3, :3], axis=1)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).mean())


# ----------------------------------------------------------------------------------------------
# TUS-REC pixel and landmark errors
# ----------------------------------------------------------------------------------------------


def _local(poses: np.ndarray) -> np.ndarray:
    """T_{i−1←i} = inv(T_{i−1}) T_i for i = 1..N−1."""
    return geometry.invert_rigid(poses[:-1]) @ poses[1:]


def _mean_pixel_error(d_est: np.ndarray, d_true: np.ndarray, h: int, w: int, sx: float, sy: float,
                      chunk: int, progress=None) -> float:
    """Mean over the given frame transforms and all H×W pixels of ‖(T̂ − T) x‖, in blocks.

    (T̂ − T) x = A (c·sx, r·sy, 0) + d is affine in the pixel, so a pixel's error vector is the row
    term (r·sy·A[:, 1] + d) plus the column term c·sx·A[:, 0]; blocks are [frames, rows, W, 3].
    """
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"chunk: expected a positive number of (frame, pixel) pairs per block, got {chunk!r}")
    diff = d_est - d_true  # [M, 4, 4]
    m = diff.shape[0]
    cols = np.arange(w, dtype=np.float64) * sx
    rows = np.arange(h, dtype=np.float64) * sy
    col_term = cols[None, :, None] * diff[:, None, :3, 0]  # [M, W, 3]
    rows_per_block = max(1, min(h, chunk // w))
    frames_per_block = max(1, chunk // (rows_per_block * w))
    total = 0.0
    for f0 in range(0, m, frames_per_block):
        if progress is not None:
            progress(f0 / m)  # may raise Cancelled (the reconstruction's evaluation phase)
        f1 = min(m, f0 + frames_per_block)
        for r0 in range(0, h, rows_per_block):
            r1 = min(h, r0 + rows_per_block)
            row_term = rows[None, r0:r1, None] * diff[f0:f1, None, :3, 1] + diff[f0:f1, None, :3, 3]
            vec = row_term[:, :, None, :] + col_term[f0:f1, None, :, :]  # [F, R, W, 3]
            total += float(np.sqrt(np.einsum("frwk,frwk->frw", vec, vec)).sum())
    return total / (m * h * w)


def gpe(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy, chunk: int = DEFAULT_CHUNK,
        progress=None) -> float:
    """Global pixel error (mm): all pixels, frames i ≥ 1, global transforms T_{0←i}.

    progress(fraction) is called before every block (it may raise to stop the computation)."""
    h, w, sx, sy = _frame_geometry(frame_shape_hw, pixel_spacing_xy)
    est, true = _pair(tforms_est, tforms_true)
    return _mean_pixel_error(est[1:], true[1:], h, w, sx, sy, chunk, progress)


def lpe(tforms_est, tforms_true, frame_shape_hw, pixel_spacing_xy, chunk: int = DEFAULT_CHUNK,
        progress=None) -> float:
    """Local pixel error (mm): all pixels, frames i ≥ 1, local transforms T_{i−1←i} (progress: see gpe)."""
    h, w, sx, sy = _frame_geometry(frame_shape_hw, pixel_spacing_xy)
    est, true = _pair(tforms_est, tforms_true)
    return _mean_pixel_error(_local(est), _local(true), h, w, sx, sy, chunk, progress)


def _landmarks(landmarks, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame indices [L] int, pixel coords [L, 2] (x, y)) of the landmarks not on frame 0."""
    try:
        lm = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("landmarks: expected an array [L, 3] of (frame index, x, y)") from None
    if lm.ndim != 2 or lm.shape[1] != 3 or lm.shape[0] == 0:
        raise InputError(f"landmarks: expected shape [L, 3] (frame index, x, y) with L >= 1, got {list(lm.shape)}")
    if not np.all(np.isfinite(lm)):
        raise InputError("landmarks: contains NaN or infinite values; expected finite (frame, x, y)")
    frames = lm[:, 0]
    if np.any(frames != np.round(frames)) or np.any(frames < 0) or np.any(frames >= n_frames):
        raise InputError(f"landmarks: frame indices must be integers in 0..{n_frames - 1} (0-based)")
    keep = frames >= 1
    if not np.any(keep):
        raise InputError("landmarks: every landmark is on frame 0, the reference frame; expected some on frames >= 1")
    return frames[keep].astype(np.int64), lm[keep, 1:]


def _landmark_error(d_est: np.ndarray, d_true: np.ndarray, frames: np.ndarray, xy: np.ndarray,
                    sx: float, sy: float) -> float:
    pts = np.stack([xy[:, 0] * sx, xy[:, 1] * sy, np.zeros(len(xy))], axis=-1)
    diff = geometry.apply_transform(d_est[frames], pts) - geometry.apply_transform(d_true[frames], pts)
    return float(np.linalg.norm(diff, axis=-1).mean())


def gle(tforms_est, tforms_true, landmarks, pixel_spacing_xy) -> float:
    """Global landmark error (mm): mean ‖T̂_{0←f} x − T_{0←f} x‖ over landmarks (f, x, y), f ≥ 1."""
    est, true = _pair(tforms_est, tforms_true)
    sx, sy = _spacing(pixel_spacing_xy)
    frames, xy = _landmarks(landmarks, est.shape[0])
    return _landmark_error(est, true, frames, xy, sx, sy)


def lle(tforms_est, tforms_true, landmarks, pixel_spacing_xy) -> float:
    """Local landmark error (mm): the same with T_{f−1←f}."""
    est, true = _pair(tforms_est, tforms_true)
    sx, sy = _spacing(pixel_spacing_xy)
    frames, xy = _landmarks(landmarks, est.shape[0])
    # _local()[i − 1] is T_{i−1←i}.
    return _landmark_error(_local(est), _local(true), frames - 1, xy, sx, sy)


def _spacing(pixel_spacing_xy) -> tuple[float, float]:
    sp = np.asarray(pixel_spacing_xy, dtype=np.float64) if pixel_spacing_xy is not None else np.zeros(0)
    if sp.shape != (2,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise InputError(
            f"pixel_spacing_xy: expected two positive finite spacings (sx, sy) in mm, got {pixel_spacing_xy!r}"
        )
    return float(sp[0]), float(sp[1])


# ----------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------


def evaluate_sweep(est_tforms, true_tforms, frame_shape_hw, pixel_spacing_xy, landmarks=None,
                   chunk: int = DEFAULT_CHUNK, progress=None) -> dict:
    """All metrics of one sweep as a dict whose keys carry their units (docs/ARCHITECTURE.md, command line).

    Keys: fdr_pct, adr_pct, md_mm, sd_mm, hd_mm, mea_deg, gpe_mm, lpe_mm, and gle_mm, lle_mm when
    landmarks [L, 3] (frame index, x, y; 0-based pixels) are given. progress(fraction, message) is
    called between the metrics and between the blocks of GPE and LPE (which take most of the time:
    every pixel of every frame); it may raise (e.g. Cancelled) to stop.
    """
    def report(lo: float, hi: float, message: str):
        if progress is None:
            return None
        return lambda f: progress(lo + (hi - lo) * f, message)

    args = (est_tforms, true_tforms, frame_shape_hw, pixel_spacing_xy)
    if progress is not None:
        progress(0.0, "trajectory metrics")
    err, path = _errors_and_paths(*args)
    if np.any(path[-1] <= 0):
        raise InputError("true_tforms: the true trajectory has zero length; drift rates are undefined")
    out = {
        "fdr_pct": fdr(*args),
        "adr_pct": adr(*args),
        "md_mm": float(np.mean(err.max(axis=0))),
        "sd_mm": float(np.mean(err.sum(axis=0))),
        "hd_mm": hd(*args),
        "mea_deg": mea(est_tforms, true_tforms),
        "gpe_mm": gpe(*args, chunk=chunk, progress=report(0.1, 0.55, "global pixel error")),
        "lpe_mm": lpe(*args, chunk=chunk, progress=report(0.55, 1.0, "local pixel error")),
    }
    if landmarks is not None:
        out["gle_mm"] = gle(est_tforms, true_tforms, landmarks, pixel_spacing_xy)
        out["lle_mm"] = lle(est_tforms, true_tforms, landmarks, pixel_spacing_xy)
    return out
