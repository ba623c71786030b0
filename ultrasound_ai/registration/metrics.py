"""Registration errors (SRE, TRE) and SRE-controlled perturbations of a ground-truth transform.

Transforms follow docs/DATA_FORMATS.md: 4x4 LPS matrices mapping a fixed-space point to the moving-space point.
SRE = mean over fixed-space gland-surface points p of ||T_est(p) - T_true(p)|| (mm).
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import apply_transform, is_rigid, params_to_matrix


def _matrix(T, name: str) -> np.ndarray:
    m = np.asarray(T, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputError(f"{name}: expected a finite 4x4 transform (fixed LPS -> moving LPS), got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise InputError(f"{name}: expected last row [0, 0, 0, 1], got {m[3].tolist()}")
    return m


def _points(p, name: str) -> np.ndarray:
    pts = np.asarray(p, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0 or not np.all(np.isfinite(pts)):
        raise InputError(f"{name}: expected a non-empty finite [K, 3] array of LPS mm points, got shape {pts.shape}")
    return pts


def point_errors(T_est, T_true, points) -> np.ndarray:
    """Per-point distances ||T_est(p) - T_true(p)|| (mm) for fixed-space points [K, 3]."""
    T_est = _matrix(T_est, "T_est")
    T_true = _matrix(T_true, "T_true")
    pts = _points(points, "points")
    return np.linalg.norm(apply_transform(T_est, pts) - apply_transform(T_true, pts), axis=1)


def sre(T_est, T_true, surface_points) -> float:
    """Surface registration error (mm): mean over fixed-space surface points of ||T_est(p) - T_true(p)||."""
    pts = _points(surface_points, "surface_points")
    return float(point_errors(T_est, T_true, pts).mean())


def tre(T_est, T_true=None, landmarks_fixed=None, landmarks_moving=None) -> float:
    """Target registration error (mm) over fixed-space landmarks [L, 3].

    With `landmarks_moving` (paired rows): mean ||T_est(l_f) - l_m||. Otherwise with `T_true`:
    mean ||T_est(l_f) - T_true(l_f)||.
    """
    if landmarks_fixed is None:
        raise InputError("tre: expected landmarks_fixed [L, 3] (fixed-space LPS mm)")
    lf = _points(landmarks_fixed, "landmarks_fixed")
    if landmarks_moving is not None:
        lm = _points(landmarks_moving, "landmarks_moving")
        if lm.shape != lf.shape:
            raise InputError(
                f"landmarks_moving: expected the same shape as landmarks_fixed {lf.shape} (paired rows), got {lm.shape}"
            )
        return float(np.linalg.norm(apply_transform(_matrix(T_est, "T_est"), lf) - lm, axis=1).mean())
    if T_true is None:
        raise InputError("tre: expected T_true or landmarks_moving to compare T_est against")
    return sre(T_est, T_true, lf)


def centred_perturbation(params, center) -> np.ndarray:
    """Rigid 4x4 D = Tr(c) @ M(params) @ Tr(-c): 6 parameters (tx, ty, tz mm; rx, ry, rz degrees, static
    xyz) applied about `center`, so rotation does not move the centre and is decoupled from translation."""
    c = np.asarray(center, dtype=np.float64).reshape(3)
    M = params_to_matrix(np.asarray(params, dtype=np.float64), "xyz", degrees=True)
    to_c = np.eye(4)
    to_c[:3, 3] = c
    from_c = np.eye(4)
    from_c[:3, 3] = -c
    return to_c @ M @ from_c


def perturbation_with_sre(
    T_true,
    target_sre_mm: float,
    surface_points,
    rng: np.random.Generator,
    rot_deg: float = 6.0,
    trans_mm: float = 6.0,
    center=None,
    return_params: bool = False,
):
    """An initial transform T_init whose SRE against `T_true` equals `target_sre_mm`.

    A random direction p0 is drawn uniformly in [-trans_mm, trans_mm]^3 x [-rot_deg, rot_deg]^3; the
    perturbation D(s) = centred_perturbation(s * p0, center) acts in fixed space about `center` (the
    surface points' centroid by default) and T_init = T_true @ D(s). Because T_true is rigid,
    SRE(s) = mean ||D(s) p - p||, which grows from 0 with s; s is found by bracketing and bisection so
    that SRE(T_init) == target (to ~1e-9 mm). With return_params, returns (T_init, s * p0).
    """
    T_true = _matrix(T_true, "T_true")
    if not is_rigid(T_true, atol=1e-5):
        raise InputError("T_true: expected a rigid transform")
    pts = _points(surface_points, "surface_points")
    target = float(target_sre_mm)
    if not np.isfinite(target) or target < 0:
        raise InputError(f"target_sre_mm: expected a finite value >= 0 mm, got {target_sre_mm!r}")
    c = pts.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64).reshape(3)
    scale = np.array([trans_mm] * 3 + [rot_deg] * 3, dtype=np.float64)
    while True:
        p0 = rng.uniform(-1.0, 1.0, size=6) * scale
        if np.linalg.norm(p0[:3]) > 1e-3 * max(trans_mm, 1e-9) or trans_mm == 0:
            break
    if not np.any(p0):
        raise InputError("perturbation_with_sre: rot_deg and trans_mm are both 0; no perturbation is possible")

    def err(s: float) -> float:
        D = centred_perturbation(s * p0, c)
        return float(np.linalg.norm(apply_transform(D, pts) - pts, axis=1).mean())

    if target == 0:
        s = 0.0
    else:
        lo, hi = 0.0, 1.0
        # Grow the bracket; translation makes the error unbounded, so this ends.
        for _ in range(200):
            if err(hi) >= target:
                break
            lo, hi = hi, hi * 2.0
        else:
            raise InputError(f"target_sre_mm {target} mm cannot be reached with this perturbation range")
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if err(mid) < target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-13 * max(hi, 1.0):
                break
        s = 0.5 * (lo + hi)
    params = s * p0
    T_init = T_true @ centred_perturbation(params, c)
    return (T_init, params) if return_params else T_init
