"""Per-pair motion estimates about the frame centre: temporal smoothing (a Gaussian low-pass along the sweep),
and the parameters the images did not tell set to zero (`zero_pair_motions`).

Images alone read the out-of-plane motion (tz and the tilts rx, ry) from speckle decorrelation, which gives
noisy per-pair estimates whose errors are nearly independent from pair to pair, while the hand's voluntary
out-of-plane motion changes over fractions of a second. The in-plane motion (tx, ty, rz) is seen directly
as image shifts, hand tremor (6-11 Hz) included, and is better left as measured: by default only the
out-of-plane parameters are smoothed. Each pair's motion is taken about the frame centre as (tx, ty, tz mm,
static-xyz degrees), the chosen parameters are convolved along the pairs with a normalised Gaussian (sigma in
pairs, truncated at 4 sigma; edges: the end pair repeated) and the motion is turned back into a transform.
Constant motion and the summed motion are kept; only the pair-to-pair noise is removed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ultrasound_ai.core.errors import InputError

__all__ = ["smooth_pair_motions", "smoothing_sigma_pairs", "zero_pair_motions", "OUT_OF_PLANE", "TILTS", "ALL"]

OUT_OF_PLANE = (2, 3, 4)  # tz, rx, ry of (tx, ty, tz, rx, ry, rz)
TILTS = (3, 4)  # rx, ry: the out-of-plane rotation
ALL = (0, 1, 2, 3, 4, 5)


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


def smooth_pair_motions(rel, centre_mm, sigma_pairs: float, which=OUT_OF_PLANE) -> np.ndarray:
    """Pair transforms [M, 4, 4] (image mm, T_{i<-i+1}) with the parameters `which` of their motion about
    `centre_mm` smoothed along the pairs (module docstring); sigma_pairs 0 returns them unchanged."""
    rel = np.asarray(rel, dtype=np.float64)
    if sigma_pairs <= 0 or len(rel) < 2:
        return rel
    cols = list(which)

    def smooth(p):
        p[:, cols] = gaussian_filter1d(p[:, cols], float(sigma_pairs), axis=0, mode="nearest", truncate=4.0)

    return _edit_about_centre(rel, centre_mm, smooth)


def zero_pair_motions(rel, centre_mm, which=TILTS) -> np.ndarray:
    """Pair transforms [M, 4, 4] (image mm, T_{i<-i+1}) with the parameters `which` of their motion about
    `centre_mm` (tx, ty, tz mm, static-xyz degrees) set to zero, the others kept."""
    rel = np.asarray(rel, dtype=np.float64)
    if not len(which) or not len(rel):
        return rel

    def zero(p):
        p[:, list(which)] = 0.0

    return _edit_about_centre(rel, centre_mm, zero)


def _edit_about_centre(rel, centre_mm, edit) -> np.ndarray:
    """Pair transforms with `edit` applied in place to their motion parameters [M, 6] about `centre_mm`."""
    from ultrasound_ai.core.geometry import matrix_to_params, params_to_matrix

    shift = np.eye(4)
    shift[:3, 3] = np.asarray(centre_mm, dtype=np.float64)
    p = matrix_to_params(np.linalg.inv(shift) @ rel @ shift, "xyz", degrees=True)
    edit(p)
    return shift @ params_to_matrix(p, "xyz", degrees=True) @ np.linalg.inv(shift)
