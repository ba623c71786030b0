"""ULM metrics, with PALA's definitions (Heiles et al., Nature Biomedical Engineering 2022).

Localization (per frame, then summed over frames):
- estimated and true positions of the same frame are paired greedily by increasing distance (each
  point used at most once; ties broken by estimate index, then truth index);
- a pair within λ/2 is *matched*; a matched pair within λ/4 is a true positive (TP);
- a matched pair in (λ/4, λ/2] counts as one false positive AND one false negative;
- unmatched estimates are FPs, unmatched true positions FNs;
- loc_error_lambda = mean Euclidean distance of the TP pairs, in wavelengths (loc_error_mm in mm)
  (PALA calls it "RMSE");
- jaccard = TP / (TP + FN + FP), precision = TP / (TP + FP), recall = TP / (TP + FN).
Rendering: SSIM (skimage, data_range=1) and RMSE between the estimated and the ground-truth density
images, each divided by its maximum; the ground truth is the true bubble tracks rendered on the same
grid. With a few hundred frames most pixels are empty in every rendering, so SSIM is dominated by the
background (an all-zero image scores ~0.95): two measures restricted to the vessels tell methods apart:
- vessel_dice: Dice (F1) of the vessel pixels with a tolerance of λ/4: precision = share of the
  estimated vessel pixels (density > 0) within λ/4 of a true vessel pixel, recall = share of the true
  vessel pixels within λ/4 of an estimated one, Dice = 2 P R / (P + R); a gap along a vessel lowers
  the recall, spurious tracks the precision;
- ssim_vessel: the mean of SSIM's local map (same window and constants as `ssim`) over the vessel
  mask, the true vessel pixels dilated by λ/4.
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["greedy_pairs", "localization_metrics", "rendering_metrics", "vessel_metrics", "evaluate_result"]


def _positions(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1 and a.size == 0:
        a = a.reshape(0, 3)
    if a.ndim != 2 or a.shape[1] < 3:
        raise InputError(f"{name}: expected positions [K, >=3] = (frame, z_mm, x_mm, ...), got shape {a.shape}")
    if not np.all(np.isfinite(a[:, :3])):
        raise InputError(f"{name}: positions contain NaN or infinite values")
    return a[:, :3]


def greedy_pairs(est: np.ndarray, truth: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy per-frame pairing by increasing distance, pairs up to `max_distance` (same units as z, x).

    est, truth: [K, 3] = (frame, z, x). Returns (est_index, truth_index, distance) of the chosen pairs.
    """
    from scipy.spatial import cKDTree

    est = _positions(est, "estimates")
    truth = _positions(truth, "ground truth")
    if est.shape[0] == 0 or truth.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    # Frames are separated along a third axis far beyond max_distance, so one KD-tree query finds
    # all same-frame candidate pairs at once.
    sep = 10.0 * max_distance + 1.0
    te = cKDTree(np.column_stack([est[:, 0] * sep, est[:, 1], est[:, 2]]))
    tt = cKDTree(np.column_stack([truth[:, 0] * sep, truth[:, 1], truth[:, 2]]))
    sdm = te.sparse_distance_matrix(tt, max_distance, output_type="ndarray")
    if sdm.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    i, j, d = sdm["i"].astype(np.int64), sdm["j"].astype(np.int64), sdm["v"]
    order = np.lexsort((j, i, d))
    used_e = np.zeros(est.shape[0], dtype=bool)
    used_t = np.zeros(truth.shape[0], dtype=bool)
    keep = []
    for k in order:
        a, b = i[k], j[k]
        if not used_e[a] and not used_t[b]:
            used_e[a] = used_t[b] = True
            keep.append(k)
    keep = np.asarray(keep, dtype=np.int64)
    return i[keep], j[keep], d[keep]


def localization_metrics(est, truth, wavelength_mm: float) -> dict:
    """TP/FP/FN counts, jaccard, precision, recall, loc_error_lambda / loc_error_mm (module docstring)."""
    if not np.isfinite(wavelength_mm) or wavelength_mm <= 0:
        raise InputError(f"wavelength_mm: expected a positive number, got {wavelength_mm!r}")
    est = _positions(est, "estimates")
    truth = _positions(truth, "ground truth")
    lam = float(wavelength_mm)
    _, _, d = greedy_pairs(est, truth, lam / 2)
    tp_mask = d <= lam / 4
    tp = int(tp_mask.sum())
    far = int((~tp_mask).sum())               # matched in (λ/4, λ/2]: one FP and one FN each
    fp = est.shape[0] - tp                    # = unmatched estimates + far pairs
    fn = truth.shape[0] - tp                  # = unmatched truths + far pairs
    denom = tp + fp + fn
    err_mm = float(d[tp_mask].mean()) if tp else float("nan")
    return {
        "tp": tp, "fp": int(fp), "fn": int(fn), "matched_far": far,
        "n_estimated": int(est.shape[0]), "n_true": int(truth.shape[0]),
        "jaccard": tp / denom if denom else float("nan"),
        "precision": tp / (tp + fp) if (tp + fp) else float("nan"),
        "recall": tp / (tp + fn) if (tp + fn) else float("nan"),
        "loc_error_mm": err_mm,
        "loc_error_lambda": err_mm / lam if tp else float("nan"),
    }


def _normalised_pair(est_density, gt_density) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(est_density, dtype=np.float64)
    b = np.asarray(gt_density, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise InputError(f"rendering metrics: expected two 2-D images of the same shape, got {a.shape} and {b.shape}")
    if min(a.shape) < 7:
        raise InputError(f"rendering metrics: images must be at least 7 x 7 pixels for SSIM, got {a.shape}")
    a = a / a.max() if a.max() > 0 else a
    b = b / b.max() if b.max() > 0 else b
    return a, b


def rendering_metrics(est_density: np.ndarray, gt_density: np.ndarray) -> dict:
    """SSIM (data_range=1) and RMSE of the max-normalised density images."""
    from skimage.metrics import structural_similarity

    a, b = _normalised_pair(est_density, gt_density)
    return {"ssim": float(structural_similarity(a, b, data_range=1.0)),
            "rmse": float(np.sqrt(np.mean((a - b) ** 2)))}


def vessel_metrics(est_density: np.ndarray, gt_density: np.ndarray, tolerance_px: float) -> dict:
    """vessel_dice (with its precision and recall) and ssim_vessel (module docstring); tolerance in
    rendering pixels (λ/4 in `evaluate_result`)."""
    from scipy.ndimage import distance_transform_edt
    from skimage.metrics import structural_similarity

    if not np.isfinite(tolerance_px) or tolerance_px < 0:
        raise InputError(f"vessel metrics: tolerance must be a number of pixels >= 0, got {tolerance_px!r}")
    a, b = _normalised_pair(est_density, gt_density)
    est_mask, gt_mask = a > 0, b > 0
    if not gt_mask.any():
        raise InputError("vessel metrics: the ground-truth rendering is empty (no vessel to compare with)")
    near_gt = distance_transform_edt(~gt_mask) <= tolerance_px
    near_est = distance_transform_edt(~est_mask) <= tolerance_px if est_mask.any() else np.zeros_like(est_mask)
    precision = float(near_gt[est_mask].mean()) if est_mask.any() else float("nan")
    recall = float(near_est[gt_mask].mean())
    dice = 2 * precision * recall / (precision + recall) if est_mask.any() and precision + recall > 0 else 0.0
    _, ssim_map = structural_similarity(a, b, data_range=1.0, full=True)
    return {"vessel_dice": dice, "vessel_precision": precision, "vessel_recall": recall,
            "ssim_vessel": float(ssim_map[near_gt].mean())}


def evaluate_result(result, gt_positions: np.ndarray, wavelength_mm: float, frame_rate_hz: float) -> dict:
    """All metrics of a UlmResult against ground truth: tracked (top level and "tracked"), raw, rendering."""
    from .rendering import RenderGrid, render_ground_truth

    loc = np.asarray(result.localizations, dtype=np.float64)
    gt = np.asarray(gt_positions, dtype=np.float64)
    if gt.ndim != 2 or gt.shape[1] not in (3, 4):
        raise InputError(f"ground truth: expected gt_positions [K, 4] or [K, 3], got shape {gt.shape}")
    raw = localization_metrics(loc[:, :3], gt[:, :3], wavelength_mm)
    tracked = localization_metrics(loc[loc[:, 4] >= 0, :3], gt[:, :3], wavelength_mm)
    out = {k: tracked[k] for k in ("jaccard", "precision", "recall", "loc_error_lambda", "loc_error_mm")}
    if result.density is not None:
        if gt.shape[1] != 4:
            raise InputError("ground truth: rendering metrics need bubble ids (gt_positions [K, 4])")
        grid = RenderGrid(origin_mm=tuple(result.origin_mm), pixel_size_mm=tuple(result.pixel_size_mm),
                          shape=tuple(result.density.shape))
        gt_img = render_ground_truth(gt, grid, frame_rate_hz)["density"]
        out.update(rendering_metrics(result.density, gt_img))
        if gt_img.max() > 0:
            out.update(vessel_metrics(result.density, gt_img, wavelength_mm / 4 / min(grid.pixel_size_mm)))
    out["tracked"] = tracked
    out["raw"] = raw
    out["wavelength_mm"] = float(wavelength_mm)
    return out
