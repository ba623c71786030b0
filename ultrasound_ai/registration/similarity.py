"""MR/US image similarity (LC², Wein et al.) and an intensity refinement that maximises it.

Why LC²: a TRUS image is neither a function of the MR intensity (which mutual information assumes
globally) nor of its structure alone (MIND): it shows tissue echogenicity, which loosely follows the
tissue the MR shows, plus reflections at interfaces, where the MR gradient is large. LC² models the US
intensity in each small neighbourhood as a linear combination of the MR intensity and the MR gradient
magnitude, fitted per neighbourhood (so unknown per-tissue echogenicity, attenuation and gain do not
matter), and scores the fraction of the local US variance that fit explains, weighted by the local US
standard deviation (textureless patches count little). It needs no training, so it cannot learn the
cues of a simulator; it serves as the cascade's guard (keep a stage's proposal only if it does not
lower LC²) and as the objective of the optional refinement.

Implementation: the MRI and its gradient magnitude are resampled once onto a fixed-space grid around
the gland (the label's bounding box enlarged by ``margin``, at ``spacing_mm``, smoothed by ``blur_mm``);
the TRUS is sampled there through the candidate fixed->moving transform; local moments come from box
filters of ``patch`` voxels. Only patches lying wholly inside the TRUS fan (non-zero samples) count, so
the MR moments of every patch are computed once and each evaluation filters five TRUS products.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import params_to_matrix
from ultrasound_ai.io.volume import Volume, resample_volume
from ultrasound_ai.registration.preprocessing import label_bbox_ijk, label_centroid

__all__ = ["LC2", "refine_lc2", "capture_search"]


class LC2:
    """LC² between a fixed MRI and a moving TRUS for candidate fixed -> moving LPS transforms."""

    def __init__(self, fixed: Volume, fixed_label: Volume, moving: Volume, spacing_mm: float = 1.5,
                 margin: float = 0.25, patch: int = 5, blur_mm: float = 0.0, label_channels: tuple = ()):
        """label_channels: extra regressors from the gland label: "label" (the label smoothed over 1.5 mm:
        the gland's own echogenicity against its surroundings) and/or "edge" (its gradient magnitude: an
        echo at the capsule). The MR image may not show the capsule (bright PZ beside bright fat); the
        label always does."""
        if spacing_mm <= 0 or patch < 3:
            raise InputError(f"LC2: expected spacing_mm > 0 and patch >= 3, got {spacing_mm}, {patch}")
        self.patch = int(patch)
        lo, hi = label_bbox_ijk(fixed_label)
        ext = np.maximum(hi - lo, 1.0)
        lo_p = fixed_label.index_to_physical(lo - margin * ext)
        hi_p = fixed_label.index_to_physical(hi + margin * ext)
        D = fixed_label.direction
        # The grid follows the MRI's axes; its extent is the enlarged box in those axes.
        a, b = D.T @ lo_p, D.T @ hi_p
        lo_a, hi_a = np.minimum(a, b), np.maximum(a, b)
        size = np.maximum(np.ceil((hi_a - lo_a) / spacing_mm).astype(int) + 1, patch + 1)
        grid = Volume(np.zeros(size[::-1], dtype=np.uint8), np.full(3, float(spacing_mm)), D @ lo_a, D)
        mr = resample_volume(fixed, grid, None, "linear", 0.0, output_dtype=np.float32).array
        if blur_mm > 0:
            mr = ndimage.gaussian_filter(mr, blur_mm / spacing_mm)
        mr = mr / (np.percentile(mr, 99) + 1e-6)
        grad = np.sqrt(sum(g * g for g in np.gradient(mr)))
        regressors = [mr, grad]
        unknown = set(label_channels) - {"label", "edge"}
        if unknown:
            raise InputError(f"LC2 label_channels: expected 'label' and/or 'edge', got {sorted(unknown)}")
        if label_channels:
            lab = resample_volume(fixed_label.with_array(fixed_label.array.astype(np.float32)), grid, None, "linear",
                                  0.0, output_dtype=np.float32).array
            lab = ndimage.gaussian_filter(lab, 1.5 / spacing_mm)
            if "label" in label_channels:
                regressors.append(lab)
            if "edge" in label_channels:
                regressors.append(np.sqrt(sum(g * g for g in np.gradient(lab))) * spacing_mm)
        f = self._box
        self.x = [r.astype(np.float32) for r in regressors]
        self.mu_x = [f(r) for r in self.x]
        k = len(self.x)
        C = np.empty(mr.shape + (k, k), dtype=np.float64)
        for i in range(k):
            for j in range(i, k):
                C[..., i, j] = C[..., j, i] = f(self.x[i] * self.x[j]) - self.mu_x[i] * self.mu_x[j]
        # Patches where the MR regressors are (nearly) collinear carry no fit: a small ridge keeps C invertible.
        scale = np.trace(C, axis1=-2, axis2=-1)[..., None, None] / k
        self.c_inv = np.linalg.inv(C + (1e-4 * scale + 1e-9) * np.eye(k)).astype(np.float32)
        self.det_ok = scale[..., 0, 0] > 1e-8
        kji = np.indices(mr.shape).reshape(3, -1).T
        self.points = grid.index_to_physical(kji[:, ::-1].astype(np.float64))
        self.shape = mr.shape
        self.moving = moving
        self.us = np.asarray(moving.array, dtype=np.float32)
        self.blur = blur_mm / max(float(np.min(moving.spacing_xyz)), 1e-6) if blur_mm > 0 else 0.0
        if self.blur > 0:
            self.us = ndimage.gaussian_filter(self.us, self.blur)
        self.centre = label_centroid(fixed_label)
        self.evaluations = 0

    def sample_us(self, T) -> tuple[np.ndarray, np.ndarray]:
        """TRUS on the grid through T (fixed -> moving) and the mask of grid voxels inside its fan."""
        idx = self.moving.physical_to_index(self.points @ np.asarray(T)[:3, :3].T + np.asarray(T)[:3, 3])
        coords = idx[:, ::-1].T  # (k, j, i) order of the array axes
        us = ndimage.map_coordinates(self.us, coords, order=1, mode="constant", cval=0.0).reshape(self.shape)
        return us.astype(np.float32), us > 0

    def _box(self, a):
        return ndimage.uniform_filter(a, size=self.patch, mode="constant")

    def __call__(self, T) -> float:
        """LC² in [0, 1] (higher = better aligned); 0 when the TRUS fan misses the region."""
        self.evaluations += 1
        us, mask = self.sample_us(T)
        if mask.sum() < 0.05 * mask.size:
            return 0.0
        f = self._box
        ok = f(mask.astype(np.float32)) > 0.999  # patches wholly inside the fan
        us = us / np.float32(255.0 if us.max() > 1.5 else 1.0)
        mu_u = f(us)
        var_u = f(us * us) - mu_u ** 2
        b = np.stack([f(us * x) - mu_u * mx for x, mx in zip(self.x, self.mu_x)], axis=-1)
        good = ok & (var_u > 1e-6) & self.det_ok
        # Explained variance of the local least-squares fit on the regressors: b^T C^-1 b / var_u.
        expl = np.einsum("...i,...ij,...j->...", b, self.c_inv, b)
        local = np.clip(expl / np.where(good, var_u, 1.0), 0.0, 1.0)
        sd = np.sqrt(np.clip(var_u, 0, None)) * good
        total = sd.sum()
        return float((local * sd).sum() / total) if total > 0 else 0.0


def _about(centre, params) -> np.ndarray:
    """Rigid motion of `params` (mm, degrees, static xyz) rotating about `centre` (fixed space)."""
    D = params_to_matrix(np.asarray(params, dtype=np.float64))
    C = np.eye(4)
    C[:3, 3] = centre
    Ci = np.eye(4)
    Ci[:3, 3] = -np.asarray(centre)
    return C @ D @ Ci


def refine_lc2(metric: LC2, T0, step_mm: float = 3.0, min_step_mm: float = 0.25, max_evals: int = 400,
               deg_per_mm: float = 1.0) -> tuple[np.ndarray, float, int]:
    """Maximise LC² from T0 by a compass (pattern) search over the 6 rigid parameters about the gland
    centroid, halving the step when no move helps; returns (T, LC² at T, evaluations). Deterministic."""
    T0 = np.asarray(T0, dtype=np.float64)
    c = metric.centre
    x = np.zeros(6)
    best = metric(T0)
    evals, step = 1, float(step_mm)
    scale = np.array([1.0, 1.0, 1.0, deg_per_mm, deg_per_mm, deg_per_mm])
    while step >= min_step_mm and evals < max_evals:
        improved = False
        for i in range(6):
            for sign in (1.0, -1.0):
                cand = x.copy()
                cand[i] += sign * step * scale[i]
                v = metric(T0 @ _about(c, cand))
                evals += 1
                if v > best:
                    best, x, improved = v, cand, True
                    break
        if not improved:
            step *= 0.5
    return T0 @ _about(c, x), best, evals


def capture_search(wide: LC2, metric: LC2, T0, reach_mm: float = 12.0, grid_mm: float = 6.0, keep: int = 3,
                   max_evals: int = 150) -> tuple[np.ndarray, float, int, list]:
    """Widen the refinement's capture range: score `wide` (a coarse, blurred LC²) at the translations of a
    cubic grid (multiples of grid_mm within reach_mm on each axis, about the gland centroid) from T0, then
    refine T0 and the (keep - 1) best-scoring grid starts that score above T0 on `metric` by ``refine_lc2`` and
    return the one with the highest `metric`: (T, value, evaluations, [(offset mm, value) per start]).
    A compass search from a start 10-16 mm off can settle on a side lobe; the grid lets it begin in the
    basin of the highest LC² instead."""
    T0 = np.asarray(T0, dtype=np.float64)
    n = int(np.floor(reach_mm / grid_mm + 1e-9))
    ticks = grid_mm * np.arange(-n, n + 1)
    offsets = np.array([(x, y, z) for x in ticks for y in ticks for z in ticks], dtype=np.float64)
    c = wide.centre
    scores = np.array([wide(T0 @ _about(c, np.r_[o, 0.0, 0.0, 0.0])) for o in offsets])
    evals = len(offsets)
    zero = int(np.argmin(np.abs(offsets).sum(axis=1)))
    # Only grid starts that score above the start itself are worth a refinement (near the optimum, none do).
    better = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) != zero and scores[i] > scores[zero]]
    order = [zero] + better[: max(keep - 1, 0)]
    best, tried = None, []
    for i in order:
        T, v, k = refine_lc2(metric, T0 @ _about(c, np.r_[offsets[i], 0.0, 0.0, 0.0]), step_mm=4.0, min_step_mm=1.0,
                             max_evals=max_evals)
        evals += k
        tried.append((offsets[i].tolist(), float(v)))
        if best is None or v > best[1]:
            best = (T, float(v))
    return best[0], best[1], evals, tried
