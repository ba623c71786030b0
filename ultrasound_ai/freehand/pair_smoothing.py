"""Temporal smoothing of per-pair motion estimates: a Gaussian low-pass along the sweep.

A hand moves a probe smoothly at video rates: its voluntary motion carries little above 1-2 Hz, while an
image-based estimator's per-pair errors are nearly independent from pair to pair. Each pair's motion is
taken about the frame centre as (tx, ty, tz mm, static-xyz degrees), every parameter is convolved along the
pairs with a normalised Gaussian (sigma in pairs; edges: the end pair repeated) and turned back into a
transform. Small per-pair motions make this the average of the motions, so constant motion and the summed
path are kept; only the pair-to-pair noise is removed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ultrasound_ai.core.errors import InputError

__all__ = ["smooth_pair_motions", "smoothing_sigma_pairs"]


def smoothing_sigma_pairs(smoothing_s, times_s):
    """Gaussian sigma in pairs for sigma `smoothing_s` seconds at the median frame interval of `times_s`;
    0.0 when off, None when frame times are needed and `times_s` is None."""
    try:
        s = float(smoothing_s)
    except (TypeError, ValueError):
        raise InputError(f"smoothing_s: expected a number of seconds >= 0, got {smoothing_s!r}") from None
    if not math.isfinite(s) or s < 0:
        raise InputError(f"smoothing_s: expected a number of seconds >= 0, got {smoothing_s!r}")
    if s == 0:
        return 0.0
    if times_s is None:
        return None
    dt = float(np.median(np.diff(np.asarray(times_s, dtype=np.float64))))
    if not dt > 0:
        raise InputError(f"frame times: expected increasing times for smoothing_s, got a median interval {dt}")
    return s / dt


def smooth_pair_motions(rel, centre_mm, sigma_pairs: float) -> np.ndarray:
    """Pair transforms [M, 4, 4] (image mm, T_{i<-i+1}) with their motion about `centre_mm` smoothed along
    the pairs (module docstring); sigma_pairs 0 returns them unchanged."""
    from ultrasound_ai.core.geometry import matrix_to_params, params_to_matrix

    rel = np.asarray(rel, dtype=np.float64)
    if sigma_pairs <= 0 or len(rel) < 2:
        return rel
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(centre_mm, dtype=np.float64)
    p = matrix_to_params(np.linalg.inv(shift) @ rel @ shift, "xyz", degrees=True)
    p = gaussian_filter1d(p, float(sigma_pairs), axis=0, mode="nearest", truncate=4.0)
    return shift @ params_to_matrix(p, "xyz", degrees=True) @ np.linalg.inv(shift)
