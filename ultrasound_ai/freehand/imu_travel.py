"""Direction of out-of-plane travel from the IMUs' accelerations, anchored by what the images measure.

Images tell how far a frame pair moved out of plane but not which way (a motion and its mirror through
the image plane give the same pair of frames); the accelerometers tell which way, but double integration
needs the initial velocity and the accelerometer bias, which the sensors cannot give and which swamp a
few mm/s of probe speed within a second. Each fills the other's gap: the unknowns are few and smooth, the
image measurements many, so they are fitted together.

Model. The IMUs' mean specific force, turned into the Earth frame with their fused orientation (each IMU
weighted by the inverse variance of its angle jitter, then smoothed over ~0.5 s: per-sample angle noise
times gravity is the largest acceleration error) and with gravity added back, is integrated twice to the
IMUs' centroid; the frame centre follows through the lever arm (with the same smoothed orientation). Unknown: the centroid's initial velocity v0 (Earth, 3) and the bias b(t) (IMU axes), piecewise
linear in time with a knot every `knot_s` seconds (constant bias plus its slow random walk). Each frame
pair's translation of the frame centre in the first frame's axes is then affine in theta = (v0, b):
t_i = t0_i + B_i theta. The image side gives per pair the in-plane translation (tx, ty, signed) and the
out-of-plane distance s_i = |tz_i|, the latter only up to a scale kappa (a network or a decorrelation curve
reads distance through the training or calibration probe's elevational beam width; the accelerometers are
in absolute units and tell the scale). theta and kappa minimise

    sum_i ((t_ix - tx_i)^2 + (t_iy - ty_i)^2) / sxy^2 + (|t_iz| - kappa s_i)^2 / sz^2 + |b|^2 / sb^2
        + (log kappa)^2 / 0.5^2,     kappa within [1/2, 2]

(a smooth |.|; several starts, each with the signs fixed for a linear solve first). kappa is bounded because a
free one can shrink until the fitted velocity hovers at zero and follows the noise; it is reported
(`imu_travel_distance_scale`), not applied: per sweep it is too noisy to rescale the distances with. The direction
of each pair is the sign of the fitted t_iz (`TravelFit.tz` keeps the margin: near a pause or a turn it is small).
The fit's signs replace the expected ones (the network's, else forward) only when the evidence is
clear: the cost of the best fit with the expected signs held, minus the free fit's, over the free fit's
reduced chi-square and the correlation time of its out-of-plane residuals (the integrated IMU noise is a
random walk: neighbouring pairs are not independent evidence) must reach 5 (`imu_travel_evidence`,
`imu_travel_applied`). On a steady sweep whose IMUs are all noisy, noise alone can fit a reversal a little
better; on 56 training-family sweeps the gate cost nothing (mean / median FDR 30.1 / 27.6 % vs 30.6 / 27.6 %)
and it keeps the demo's steady sweep forward (evidence 4; FDR 21 % instead of 54 %).
Chosen on training-simulator sweeps only (bench/diagnose_freehand_direction.py; BENCHMARKS.md).

A constant acceleration over the whole sweep is the one motion the bias can mimic (a linear velocity
ramp through zero fits either way); real hand motion, with its pauses and turns, does not look like it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.imu_dead_reckoning import GRAVITY_M_S2

__all__ = ["TravelFit", "imu_translation_model", "fit_travel", "apply_imu_direction", "unfit_reason", "MIN_FRAMES"]

_MM_PER_M = 1000.0
DEFAULT_KNOT_S = 5.0
DEFAULT_SMOOTH_S = 0.5
MIN_FRAMES = 4  # the cubic spline through the accelerations
# The image distances' scale is fitted too (log-normal prior, sd 0.5): a network reads out-of-plane distance
# through the training probe's elevational beam width, so on another probe its distances are off by a factor
# the accelerometers (absolute units) can tell; a fixed scale made the signs follow the wrong distances.
DEFAULT_SCALE_SD = 0.5
MAX_SCALE = 2.0  # kappa within [1 / MAX_SCALE, MAX_SCALE]
DEFAULT_MIN_EVIDENCE = 5.0  # chosen on 56 training-family sweeps and the demo sweep (module docstring)


def unfit_reason(sweep):
    """Why the fit cannot run on this sweep (a sentence), or None when it can."""
    if sweep.imu_acc is None or sweep.imu_euler_deg is None:
        return "the sweep has no IMU data ('imu_acc' and 'imu_euler_deg')"
    if sweep.n_frames < MIN_FRAMES:
        return f"the sweep has {sweep.n_frames} frames; the IMU fit needs at least {MIN_FRAMES}"
    from ultrasound_ai.io.sweep import specific_force_problem

    problem = specific_force_problem(sweep.imu_acc)  # a validated sweep has passed this already
    return None if problem is None else f"imu_acc {problem}"


@dataclass
class TravelFit:
    """signs [N-1] (+1 / -1), tz [N-1] the IMU-anchored out-of-plane translation of each pair (mm),
    theta the fitted unknowns, cost the final cost, attrs for the estimate file."""

    signs: np.ndarray
    tz: np.ndarray
    theta: np.ndarray
    cost: float
    attrs: dict


def _hat_basis(t: np.ndarray, knot_s: float) -> np.ndarray:
    """[N, K] piecewise-linear interpolation weights of knots every knot_s seconds spanning t."""
    span = max(float(t[-1] - t[0]), 1e-9)
    k = max(2, int(np.ceil(span / knot_s)) + 1)
    knots = np.linspace(t[0], t[-1], k)
    eye = np.eye(k)
    return np.stack([np.interp(t, knots, eye[j]) for j in range(k)], axis=1)


def imu_translation_model(sweep, frame_centre_mm, knot_s: float = DEFAULT_KNOT_S,
                          smooth_s: float = DEFAULT_SMOOTH_S, weighted: bool = True):
    """(t0 [N-1, 3], B [N-1, 3, P], n_bias_knots): the frame-centre translation of each pair in the first
    frame's axes, t_i = t0_i + B_i theta, theta = (v0 [3] mm/s Earth, bias knots [K, 3] mm/s^2 IMU axes)."""
    from ultrasound_ai.freehand.imu_dead_reckoning import (
        angle_noise_weights,
        fuse_rotations,
        imu_rotations,
        integrate_twice,
        smooth_rotations,
    )

    reason = unfit_reason(sweep)
    if reason is not None:
        raise InputError(f"IMU direction of travel: {reason}")
    f = np.asarray(sweep.imu_acc, dtype=np.float64)
    t = np.asarray(sweep.times_s(), dtype=np.float64)
    fps = 1.0 / float(np.median(np.diff(t)))
    rots = imu_rotations(sweep.imu_euler_deg)
    weights = angle_noise_weights(rots, int(round(smooth_s * fps))) if weighted else None
    R = fuse_rotations(rots, weights)
    Rs = smooth_rotations(R, int(round(smooth_s * fps)))
    acc = (np.einsum("nij,nj->ni", Rs, f.mean(axis=0)) + GRAVITY_M_S2) * _MM_PER_M
    lever = (np.zeros(3) if sweep.imu_position_mm is None
             else np.asarray(sweep.imu_position_mm, dtype=np.float64).mean(axis=0))
    # the smoothed orientation for the lever arm too: its per-sample angle noise times the ~10 cm from the
    # IMUs to the frame centre would otherwise add a fraction of a millimetre of jitter to every pair
    arm = np.einsum("nij,j->ni", Rs, np.asarray(frame_centre_mm, dtype=np.float64) - lever)
    centre0 = integrate_twice(t, acc) + arm  # Earth positions of the frame centre, theta = 0
    hats = _hat_basis(t, knot_s)
    k = hats.shape[1]
    cols = [np.outer(t - t[0], e) for e in np.eye(3)]  # v0 along each Earth axis
    for j in range(k):
        for a in range(3):
            cols.append(integrate_twice(t, -Rs[:, :, a] * hats[:, j:j + 1]))  # bias knot j, IMU axis a
    basis = np.stack(cols, axis=-1)  # [N, 3, P] Earth positions per unit parameter
    Rt = np.transpose(Rs[:-1], (0, 2, 1))
    t0 = np.einsum("nij,nj->ni", Rt, np.diff(centre0, axis=0))
    B = np.einsum("nij,njp->nip", Rt, np.diff(basis, axis=0))
    return t0, B, k


def fit_travel(sweep, frame_centre_mm, inplane_mm, distance_mm, prior_signs=None,
               sigma_xy_mm: float = 0.05, sigma_z_rel: float = 0.3, bias_sd_mm_s2: float = 50.0,
               knot_s: float = DEFAULT_KNOT_S, weighted: bool = True,
               scale_sd: float | None = DEFAULT_SCALE_SD, min_evidence: float = DEFAULT_MIN_EVIDENCE) -> TravelFit:
    """Fit the IMU unknowns to the image measurements (module docstring) and return the signs of travel.

    inplane_mm [N-1, 2]: the pairs' in-plane translation of the frame centre (first frame's axes);
    distance_mm [N-1]: their unsigned out-of-plane distance; prior_signs: an extra start (e.g. a network's);
    scale_sd: the distances are matched up to a scale kappa (log-normal prior of this sd; None: kappa = 1).
    """
    from scipy.optimize import least_squares

    t0, B, k = imu_translation_model(sweep, frame_centre_mm, knot_s=knot_s, weighted=weighted)
    npairs = t0.shape[0]
    xy = np.asarray(inplane_mm, dtype=np.float64)
    s = np.abs(np.asarray(distance_mm, dtype=np.float64))
    if xy.shape != (npairs, 2) or s.shape != (npairs,):
        raise InputError(f"IMU direction of travel: expected in-plane [{npairs}, 2] and distances [{npairs}], "
                         f"got {xy.shape} and {s.shape}")
    sz = sigma_z_rel * max(float(np.median(s)), 1e-3) + 0.02
    eps = 0.05 * sz
    p = B.shape[2]
    prior = np.zeros(p)
    prior[3:] = 1.0 / bias_sd_mm_s2
    prior[:3] = 1.0 / 1000.0  # v0: a weak pull towards rest (mm/s)

    free = scale_sd is not None

    def log_scale(u):  # bounded: beyond a factor MAX_SCALE the fit would trade the scale for the signs
        return np.log(MAX_SCALE) * np.tanh(u)

    def residuals(x, signs=None):
        theta, log_k = (x[:-1], log_scale(x[-1])) if free else (x, 0.0)
        tt = t0 + B @ theta
        z = np.sqrt(tt[:, 2] ** 2 + eps ** 2) if signs is None else signs * tt[:, 2]  # signs given: held
        rz = (z - np.exp(log_k) * s) / sz
        extra = [log_k / scale_sd] if free else []
        return np.concatenate([((tt[:, :2] - xy) / sigma_xy_mm).ravel(), rz, prior * theta, extra])

    def linear_start(signs):
        # z fixed to signs * s: every residual is linear in theta
        a = np.concatenate([(B[:, :2, :] / sigma_xy_mm).reshape(-1, p), B[:, 2, :] / sz, np.diag(prior)])
        y = np.concatenate([((xy - t0[:, :2]) / sigma_xy_mm).ravel(), (signs * s - t0[:, 2]) / sz, np.zeros(p)])
        return np.linalg.lstsq(a, y, rcond=None)[0]

    expected = np.ones(npairs) if prior_signs is None else np.where(np.asarray(prior_signs) < 0, -1.0, 1.0)
    def start(signs):  # z fixed to the signs for a linear solve; the scale starts at 1
        x0 = linear_start(signs)
        return np.append(x0, 0.0) if free else x0

    starts = [expected] + [c for c in (np.ones(npairs), -np.ones(npairs)) if not np.array_equal(c, expected)]
    x_expected = start(expected)
    best = min((least_squares(residuals, x_expected if i == 0 else start(signs), method="lm", max_nfev=200 * p)
                for i, signs in enumerate(starts)), key=lambda sol: sol.cost)
    # The expected signs held fixed (the same unknowns, scale included), and the evidence against them in units
    # of the fit's own noise: its reduced chi-square, and the correlation time of the out-of-plane residuals
    # (the integrated IMU noise is a random walk: neighbouring pairs are not independent evidence). Where the
    # IMUs' noise swamps the probe's speed, every sign pattern fits about as badly and the expected signs stand.
    held = least_squares(residuals, x_expected, method="lm", max_nfev=200 * p, kwargs={"signs": expected})
    dof = max(1, best.fun.size - best.x.size)
    tau = _correlation_time(best.fun[2 * npairs:3 * npairs])
    evidence = 2.0 * (held.cost - best.cost) / max(2.0 * best.cost / dof, 1.0) / tau
    if evidence < min_evidence:
        best = held
    theta, kappa = (best.x[:-1], float(np.exp(log_scale(best.x[-1])))) if free else (best.x, 1.0)
    tz = (t0 + B @ theta)[:, 2]
    signs = expected if best is held else np.where(tz < 0, -1.0, 1.0)
    attrs = {"imu_travel_knot_s": float(knot_s), "imu_travel_bias_knots": int(k),
             "imu_travel_cost_per_pair": float(2.0 * best.cost / npairs), "imu_travel_distance_scale": kappa,
             "imu_travel_evidence": float(evidence), "imu_travel_applied": bool(best is not held)}
    return TravelFit(signs, tz, theta, float(best.cost), attrs)


def _correlation_time(r: np.ndarray) -> float:
    """Integrated autocorrelation time of a residual series (1 for white noise)."""
    r = r - r.mean()
    var = float(r @ r)
    if r.size < 4 or var <= 0:
        return 1.0
    tau = 1.0
    for lag in range(1, r.size // 4):
        rho = float(r[:-lag] @ r[lag:]) / var
        if rho <= 0:
            break
        tau += 2.0 * rho
    return tau


def apply_imu_direction(rel, sweep, **fit_kw):
    """(rel with each pair's out-of-plane translation of the frame centre signed by the IMU fit, facts).

    rel [N-1, 4, 4]: the pairs' transforms T_i<-i+1 in the sweep's image mm. Their in-plane translation and
    |tz| (about the frame centre) are the image measurements and their own signs the expected ones (kept
    unless the IMUs clearly say otherwise); rotation and |tz| are kept, only the sign of tz may change.
    """
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    rel = np.array(rel, dtype=np.float64, copy=True)
    centre = frame_centre_mm(sweep.frames.shape[1:], sweep.pixel_spacing_xy)
    rot = rel[:, :3, :3]
    t_c = np.einsum("nij,j->ni", rot, centre) + rel[:, :3, 3] - centre  # the frame centre's translation
    fit = fit_travel(sweep, centre, t_c[:, :2], np.abs(t_c[:, 2]), prior_signs=t_c[:, 2], **fit_kw)
    flipped = int(np.sum(np.sign(t_c[:, 2]) * fit.signs < 0))
    t_c[:, 2] = np.abs(t_c[:, 2]) * fit.signs
    rel[:, :3, 3] = t_c - np.einsum("nij,j->ni", rot, centre) + centre
    return rel, {"direction": "imus", "direction_pairs_flipped": flipped, **fit.attrs}
