"""Speckle decorrelation: the classical sensorless freehand baseline (with IMU rotation and direction when present).

Out-of-plane distance from speckle decorrelation (Chen et al. 1997; Gee et al. 2006, "Sensorless freehand
3D ultrasound in real tissue: speckle decorrelation without fully developed speckle"), in-plane motion
by image registration.

Per frame pair (i, i+1):

1. Speckle images: each frame minus its Gaussian-blurred self (sigma `structure_mm`), so that smooth
   anatomy, which does not decorrelate with elevational distance, does not hold the correlation up.
2. In-plane translation (tx, ty): sub-pixel phase correlation of the two speckle images.
3. Per patch k of a grid over the frame (shifted by the in-plane translation): the Pearson correlation
   rho_k, inverted through the calibrated curve rho(d) = rho0 * exp(-d^2 / 2 sigma^2) to an unsigned
   out-of-plane distance d_k. Patches whose correlation is not below rho0 read 0; patches darker than
   the noise (shadows, lumens) are left out.
4. Pose. Without IMUs: d_k = tz + a (y_k - y_c) + b (x_k - x_c) fitted by least squares (the probe is
   assumed to move forward, +z, all along: decorrelation has no sign); the slopes give the rotations
   about x and y, none in plane. With IMUs: the rotation is the IMUs' relative rotation (quaternion mean
   over the IMUs); tz at the frame centre minimises sum_k (|tz + r_k| - d_k)^2 with r_k the out-of-plane
   offset the rotation gives patch k; its sign comes from the rotation's asymmetry when that decides
   clearly, otherwise from the direction of travel. `travel` "fit" (the default): the IMUs' accelerations,
   integrated twice with the initial velocity and a slowly varying bias fitted to the images' in-plane
   motion and out-of-plane distances (`ultrasound_ai.freehand.imu_travel`); "dips" (the earlier rule,
   kept as an option): at every dip of the speed profile the IMUs' integrated acceleration along z tells a
   reversal (velocity change about -2 v) from a pause (about 0). `travel` "ordering" (with or without IMUs):
   each pair's direction from the frames put in order by their speckle similarity
   (`ultrasound_ai.freehand.frame_ordering`; without IMUs the pair is then mirrored through the image plane, its
   rotation with it); otherwise, without IMUs, the probe is taken as moving forward. On 56 training-simulator
   sweeps (freehand-v2 settings, seeds 280000-280023 and 281000-281031) the fit lowered the mean / median FDR
   from 79.1 / 39.7 % to 66.2 / 20.3 % (sector sweeps, where decorrelation over-reads the distance
   by more than the fit's scale bound of 2, stay high).

Method parameter ``frame_stride`` ("auto" or a whole number, as FiMA's and MoGLo-Net's): a sweep faster than
20 Hz is read on every k-th frame and the frames between are interpolated (DEFAULT_MIN_PAIR_INTERVAL_S).

The calibration (sigma, rho0) belongs to a probe and its settings: `calibrate` fits it from sweeps with
known poses (e.g. a phantom scan with a tracker). The default is the nominal probe of the training
simulator (see DEFAULT_SIGMA_MM), which is what a user with another probe must replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.methods import MethodContext, PoseEstimate, PoseMethod

__all__ = ["Calibration", "DEFAULT_CALIBRATION", "speckle_image", "patch_correlations", "calibrate",
           "estimate_poses", "DecorrelationMethod"]

# The training simulator's nominal probe (elevational sigma_e 0.65 mm): `calibrate` on six of its sweeps
# (seeds 31-36, linear / curved / loop, 50 frames of 160 x 150 px at 0.15 mm). Registered patches of
# consecutive frames decorrelate more slowly than the written frames' nominal exp(-d^2/2 sigma_e^2).
DEFAULT_SIGMA_MM = 0.836
DEFAULT_RHO0 = 0.883
DEFAULT_RHO_INF = 0.0
# Pairs at least about this far apart in time (the calibration sweeps' 20 Hz): near the curve's flat top, below
# ~0.2 mm, a distance is mostly noise, so a faster sweep is read on every k-th frame (`pair_interval`; on 8
# training-simulator sweeps at 40 Hz the per-pair out-of-plane correlation rose from 0.66 to 0.80).
DEFAULT_MIN_PAIR_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Calibration:
    """The decorrelation curve rho(d) = rho_inf + (rho0 - rho_inf) exp(-d^2 / 2 sigma^2) and the patch layout.

    rho0 < 1: noise and the registration's residue; rho_inf > 0: what stays correlated far out of plane
    (structure the blur removal leaves, coherent scattering), as in Gee et al.'s partially developed speckle.
    """

    sigma_mm: float = DEFAULT_SIGMA_MM
    rho0: float = DEFAULT_RHO0
    rho_inf: float = DEFAULT_RHO_INF
    structure_mm: float = 1.0  # blur removed before correlating (anatomy is smoother than speckle)
    patch_mm: float = 4.0
    patch_step_mm: float = 3.0
    skip_top_mm: float = 1.5  # gel / skin line right under the face

    def __post_init__(self):
        for name in ("sigma_mm", "structure_mm", "patch_mm", "patch_step_mm"):
            if not getattr(self, name) > 0:
                raise InputError(f"decorrelation calibration: {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.rho_inf < self.rho0 <= 1:
            raise InputError(f"decorrelation calibration: expected 0 <= rho_inf < rho0 <= 1, got rho_inf "
                             f"{self.rho_inf} and rho0 {self.rho0}")

    def curve(self, d) -> np.ndarray:
        return self.rho_inf + (self.rho0 - self.rho_inf) * np.exp(-0.5 * (np.asarray(d) / self.sigma_mm) ** 2)

    def distance(self, rho: np.ndarray) -> np.ndarray:
        """Unsigned out-of-plane distance (mm) from correlation through the curve: 0 at or above rho0, at
        most 2.5 sigma (where the curve is too flat to invert)."""
        r = (np.asarray(rho, dtype=np.float64) - self.rho_inf) / (self.rho0 - self.rho_inf)
        r = np.clip(r, np.exp(-0.5 * 2.5 ** 2), 1.0)
        return self.sigma_mm * np.sqrt(-2.0 * np.log(r))


DEFAULT_CALIBRATION = Calibration()


def speckle_image(frame: np.ndarray, spacing_xy, structure_mm: float) -> np.ndarray:
    """Frame minus its Gaussian blur (sigma structure_mm): the speckle, without the anatomy."""
    f = np.asarray(frame, dtype=np.float64)
    sigma = (structure_mm / spacing_xy[1], structure_mm / spacing_xy[0])
    return f - ndimage.gaussian_filter(f, sigma, mode="nearest")


def _patch_grid(shape_hw, spacing_xy, cal: Calibration):
    """Patch slices and patch centres (x, y) in image mm."""
    h, w = shape_hw
    sx, sy = spacing_xy
    ph, pw = max(4, int(round(cal.patch_mm / sy))), max(4, int(round(cal.patch_mm / sx)))
    step_r, step_c = max(1, int(round(cal.patch_step_mm / sy))), max(1, int(round(cal.patch_step_mm / sx)))
    top = int(round(cal.skip_top_mm / sy))
    slices, centres = [], []
    for r in range(top, h - ph + 1, step_r):
        for c in range(0, w - pw + 1, step_c):
            slices.append((slice(r, r + ph), slice(c, c + pw)))
            centres.append(((c + (pw - 1) / 2) * sx, (r + (ph - 1) / 2) * sy))
    if not slices:
        raise InputError(f"decorrelation: frames of {h}x{w} pixels are smaller than one {cal.patch_mm}-mm patch")
    return slices, np.array(centres)


def patch_correlations(a: np.ndarray, b: np.ndarray, slices, shift_rc=(0.0, 0.0), min_std: float = 0.0):
    """Pearson correlation per patch between speckle images a and b (b shifted by shift_rc pixels);
    NaN where either patch's standard deviation is below min_std."""
    if shift_rc[0] or shift_rc[1]:
        # Fourier shift: exact for sub-pixel shifts; linear interpolation would blur b and lower rho
        b = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(b), shift_rc)).real
    out = np.full(len(slices), np.nan)
    for k, sl in enumerate(slices):
        x, y = a[sl].ravel(), b[sl].ravel()
        x, y = x - x.mean(), y - y.mean()
        sxx, syy = np.sqrt((x * x).mean()), np.sqrt((y * y).mean())
        if sxx > min_std and syy > min_std:
            out[k] = float((x * y).mean() / (sxx * syy))
    return out


def _in_plane_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(rows, cols) shift that registers b onto a (sub-pixel phase correlation)."""
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(a, b, upsample_factor=10, normalization=None)
    return np.asarray(shift, dtype=np.float64)


def _centre(shape_hw, spacing_xy) -> np.ndarray:
    h, w = shape_hw
    return np.array([(w - 1) * spacing_xy[0] / 2.0, (h - 1) * spacing_xy[1] / 2.0, 0.0])


def calibrate(sweeps, cal: Calibration = DEFAULT_CALIBRATION, max_lag: int = 1) -> Calibration:
    """Fit (sigma, rho0) of rho(d) = rho0 exp(-d^2 / 2 sigma^2) on sweeps with known poses (tforms).

    Uses patch correlations of frame pairs up to max_lag apart (default 1: the pairs the estimate sees;
    pairs further apart carry more unregistered in-plane motion, which lowers rho and made the curve
    underestimate consecutive-frame distances by 30-50 %) against the true out-of-plane distance of
    each patch centre (in-plane motion is registered out first); the curve is fitted by least squares to
    the mean correlation in 0.1-mm distance bins.
    """
    from scipy.optimize import curve_fit

    ds, rs = [], []
    for sw in sweeps:
        if sw.tforms is None:
            raise InputError("decorrelation calibrate: every calibration sweep needs its true poses (tforms)")
        sp = sw.pixel_spacing_xy
        slices, centres = _patch_grid(sw.frames.shape[1:], sp, cal)
        pts = np.column_stack([centres, np.zeros(len(centres)), np.ones(len(centres))])
        spk = [speckle_image(f, sp, cal.structure_mm) for f in sw.frames]
        floor = 0.25 * np.median([s.std() for s in spk])
        for i in range(0, sw.n_frames - max_lag, 1 if max_lag == 1 else 2):
            for lag in range(1, max_lag + 1):
                rel = np.linalg.solve(sw.tforms[i], sw.tforms[i + lag])
                d = np.abs((pts @ rel.T)[:, 2])
                shift = _in_plane_shift(spk[i], spk[i + lag])
                r = patch_correlations(spk[i], spk[i + lag], slices, shift, floor)
                ok = np.isfinite(r)
                ds.append(d[ok])
                rs.append(r[ok])
    d, r = np.concatenate(ds), np.concatenate(rs)
    bins = np.floor(d / 0.1).astype(int)
    counts = np.bincount(bins)
    keep = np.flatnonzero(counts >= 5)
    if keep.size < 4:
        raise InputError("decorrelation calibrate: too few distances covered; give sweeps that move 0-2 mm "
                         f"between frames {max_lag} apart")
    centres = (keep + 0.5) * 0.1
    means = np.bincount(bins, weights=r)[keep] / counts[keep]

    def model(x, sigma, rho0):  # rho_inf = 0: with it free, sigma and rho_inf traded off from sweep to sweep
        return rho0 * np.exp(-0.5 * (x / sigma) ** 2)

    rho_inf = 0.0
    try:
        (sigma, rho0), _ = curve_fit(model, centres, means, p0=(0.6, 0.9), bounds=([0.05, 0.05], [5.0, 1.0]),
                                     sigma=1.0 / np.sqrt(counts[keep]))
    except RuntimeError as exc:
        raise InputError(f"decorrelation calibrate: the curve did not fit these sweeps ({exc})") from None
    if not rho_inf < rho0:
        raise InputError("decorrelation calibrate: correlation does not fall with distance in these sweeps")
    return Calibration(sigma_mm=float(sigma), rho0=float(rho0), rho_inf=float(rho_inf),
                       structure_mm=cal.structure_mm, patch_mm=cal.patch_mm, patch_step_mm=cal.patch_step_mm,
                       skip_top_mm=cal.skip_top_mm)


def _best_tz(rho: np.ndarray, r: np.ndarray, sign: float, cal: Calibration) -> tuple[float, float]:
    """tz with the given sign minimising sum_k (rho_k - curve(|tz + r_k|))^2 (the worst 20 % dropped), and
    that cost. Fitted in the correlation domain, where the noise is about even; inverting each patch's
    rho first amplifies the noise of the correlations near rho0."""
    reach = 2.5 * cal.sigma_mm + np.abs(r).max()
    grid = sign * np.linspace(0.0, reach, 101)
    for _ in range(2):  # coarse, then fine around the best
        res = np.abs(rho[None] - cal.curve(np.abs(grid[:, None] + r[None])))
        cost = (np.sort(res, axis=1)[:, : max(1, int(0.8 * rho.size))] ** 2).sum(1)
        j = int(np.argmin(cost))
        step = abs(grid[1] - grid[0])
        best, best_cost = float(grid[j]), float(cost[j])
        grid = np.clip(best + np.linspace(-step, step, 21), *sorted((0.0, sign * reach)))
    return best, best_cost


def _linear_accel_z(sweep, rots) -> np.ndarray:
    """IMU acceleration along the image z axis (mm/s^2) per frame, gravity removed with an orientation
    smoothed over ~0.5 s (per-frame angle noise would otherwise leak gravity)."""
    from ultrasound_ai.freehand.imu_dead_reckoning import GRAVITY_M_S2

    fps = 1.0 / np.median(np.diff(sweep.times_s()))
    smooth = ndimage.uniform_filter1d(rots, size=max(1, int(round(0.5 * fps))), axis=1, mode="nearest")
    u, _, vt = np.linalg.svd(smooth)
    smooth = u @ vt  # back to rotations
    lin = sweep.imu_acc.astype(np.float64) + np.einsum("mnji,j->mni", smooth, GRAVITY_M_S2)
    return 1000.0 * lin[..., 2].mean(0)


def _travel_signs(speed: np.ndarray, acc_z: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """Direction (+1/-1) per pair from the speed profile (mm/s per pair) and the z acceleration per frame.

    Forward at the start; at each dip of the speed (a local minimum below half the larger of the peak
    speeds within 1 s either side), the velocity change the IMUs integrate across the dip decides
    between "same direction" and "reversed".
    """
    n = speed.size
    sign = np.ones(n)
    if n < 5:
        return sign
    fps = 1.0 / np.median(dt)
    s = ndimage.uniform_filter1d(speed, 3, mode="nearest")
    half = max(2, int(round(0.3 * fps)))
    reach = max(half + 1, int(round(1.0 * fps)))
    # velocity change from frame a to frame b: integral of the acceleration (trapezoid)
    u = np.concatenate([[0.0], np.cumsum(0.5 * (acc_z[1:] + acc_z[:-1]) * dt)])
    current, last_dip = 1.0, -reach
    for i in range(1, n - 1):
        before, after = s[max(0, i - reach):i].max(initial=0.0), s[i + 1:i + 1 + reach].max(initial=0.0)
        is_dip = s[i] <= s[i - 1] and s[i] <= s[i + 1] and s[i] < 0.5 * max(before, after) and i - last_dip > half
        if is_dip:
            a, b = max(0, i - half), min(n - 1, i + half)
            measured = u[b + 1] - u[a + 1] if b + 1 < u.size else u[-1] - u[a]
            same = current * (s[b] - s[a])
            rev = current * (-s[b] - s[a])
            if abs(measured - rev) < abs(measured - same):
                current = -current
            last_dip = i
        sign[i] = current
    sign[-1] = current
    return sign


TRAVEL_MODES = ("fit", "dips", "ordering")


def estimate_poses(sweep, cal: Calibration = DEFAULT_CALIBRATION, use_imus: bool = True, report=None,
                   travel: str = "fit") -> tuple:
    """(relative transforms [N-1, 4, 4] T_{i<-i+1}, attrs) of a sweep (its tforms are not used)."""
    from ultrasound_ai.freehand.imu_dead_reckoning import fuse_rotations, imu_rotations

    frames = sweep.frames
    n = frames.shape[0]
    sp = tuple(float(v) for v in sweep.pixel_spacing_xy)
    slices, centres = _patch_grid(frames.shape[1:], sp, cal)
    centre = _centre(frames.shape[1:], sp)
    off = centres - centre[:2]  # patch centres relative to the frame centre (x, y)
    imu = use_imus and sweep.imu_acc is not None and sweep.imu_euler_deg is not None
    rel_rot = np.tile(np.eye(3), (n - 1, 1, 1))
    if imu:
        rots = imu_rotations(sweep.imu_euler_deg)  # [M, N, 3, 3], IMU axes = image axes
        fused = fuse_rotations(rots)
        rel_rot = np.einsum("nji,njk->nik", fused[:-1], fused[1:])
    spk_prev = speckle_image(frames[0], sp, cal.structure_mm)
    floor = 0.25 * spk_prev.std()
    tz_pos, tz_neg, cost_pos, cost_neg, inplane, slopes = (np.zeros(n - 1) for _ in range(6))
    inplane = np.zeros((n - 1, 2))
    slopes = np.zeros((n - 1, 2))
    for i in range(n - 1):
        spk = speckle_image(frames[i + 1], sp, cal.structure_mm)
        shift = _in_plane_shift(spk_prev, spk)
        rho = patch_correlations(spk_prev, spk, slices, shift, floor)
        ok = np.isfinite(rho)
        d = cal.distance(rho[ok])
        inplane[i] = (shift[1] * sp[0], shift[0] * sp[1])
        if d.size < 3:
            spk_prev = spk
            continue
        if imu:
            # out-of-plane offset of each patch centre that the rotation alone produces (about the centre)
            r = rel_rot[i][2, 0] * off[ok, 0] + rel_rot[i][2, 1] * off[ok, 1]
            tz_pos[i], cost_pos[i] = _best_tz(rho[ok], r, +1.0, cal)
            tz_neg[i], cost_neg[i] = _best_tz(rho[ok], r, -1.0, cal)
        else:
            a = np.column_stack([np.ones(d.size), off[ok, 1], off[ok, 0]])
            coef, *_ = np.linalg.lstsq(a, d, rcond=None)
            tz_pos[i], slopes[i] = coef[0], coef[1:]
        spk_prev = spk
        if report is not None and i % 10 == 0:
            report((i + 1) / (n - 1), "speckle decorrelation")
    if imu:
        from ultrasound_ai.freehand.imu_travel import fit_travel, unfit_reason

        distance = np.minimum(np.abs(tz_pos), np.abs(tz_neg))
        if travel == "fit" and unfit_reason(sweep) is not None:
            travel = "dips"  # a sweep the fit cannot take (too short; accelerations not in m/s^2)
        if travel == "fit":
            # (inplane, tz) is the frame centre's translation (the pose is assembled about the centre below)
            travel_signs = fit_travel(sweep, centre, inplane, distance).signs
        elif travel == "ordering":
            from ultrasound_ai.freehand.frame_ordering import travel_signs as order_signs
            from ultrasound_ai.freehand.pair_interval import median_frame_interval

            travel_signs = order_signs(frames, sp, distance, median_frame_interval(sweep))
        else:
            dt = np.diff(sweep.times_s())
            travel_signs = _travel_signs(distance / dt, _linear_accel_z(sweep, rots), dt)
        clear_pos = cost_pos < 0.25 * cost_neg
        clear_neg = cost_neg < 0.25 * cost_pos
        sign = np.where(clear_pos, 1.0, np.where(clear_neg, -1.0, travel_signs))
        tz = np.where(sign > 0, tz_pos, tz_neg)
    else:
        tz = np.maximum(tz_pos, 0.0)
        # small-angle rotation from the fitted slopes: R[2, 1] = a (about x), R[2, 0] = b (about y)
        from ultrasound_ai.core.geometry import euler_to_matrix

        ang = np.column_stack([np.arcsin(np.clip(slopes[:, 0], -0.5, 0.5)),
                               -np.arcsin(np.clip(slopes[:, 1], -0.5, 0.5)), np.zeros(n - 1)])
        rel_rot = euler_to_matrix(ang, "xyz", degrees=False)
    shift_c = np.eye(4)
    shift_c[:3, 3] = centre
    rel = np.tile(np.eye(4), (n - 1, 1, 1))
    rel[:, :3, :3] = rel_rot
    rel[:, :3, 3] = np.column_stack([inplane, tz])
    rel = shift_c @ rel @ np.linalg.inv(shift_c)  # the translation was measured at the frame centre
    if not imu and travel == "ordering":
        from ultrasound_ai.freehand.frame_ordering import orient_pairs
        from ultrasound_ai.freehand.pair_interval import median_frame_interval

        rel = orient_pairs(rel, frames, sp, median_frame_interval(sweep))
    attrs = {"sigma_mm": cal.sigma_mm, "rho0": cal.rho0, "rho_inf": cal.rho_inf, "imus_used": bool(imu),
             **({"travel": travel} if imu or travel == "ordering" else {})}
    return rel, attrs


class DecorrelationMethod(PoseMethod):
    """Speckle decorrelation (module docstring): no training, a calibration per probe."""

    name = "decorrelation"
    description = ("speckle decorrelation: out-of-plane distance from a calibrated decorrelation curve, in-plane "
                   "motion by phase correlation; rotation and direction of travel from the IMUs when present")
    accepted_params = ("sigma_mm", "rho0", "rho_inf", "use_imus", "travel", "frame_stride")

    def _estimate(self, sweep, ctx: MethodContext) -> PoseEstimate:
        from ultrasound_ai.core.geometry import chain_relative
        from ultrasound_ai.freehand.pair_interval import estimate_at_stride, resolve_stride

        p = dict(ctx.params)
        stride = resolve_stride(p.pop("frame_stride", "auto"), sweep, DEFAULT_MIN_PAIR_INTERVAL_S, self.name)
        use_imus = bool(p.pop("use_imus", True))
        travel = p.pop("travel", "fit")
        if travel not in TRAVEL_MODES:
            raise InputError(f"method 'decorrelation': parameter travel must be one of {', '.join(TRAVEL_MODES)}, "
                             f"got {travel!r}")
        try:
            cal = Calibration(**{k: float(v) for k, v in p.items()})
        except (TypeError, ValueError) as exc:
            raise InputError(f"method 'decorrelation': bad calibration parameter ({exc}); expected numbers "
                             "sigma_mm > 0 and rho0 in (0, 1]") from None
        ctx.report(0.0, "speckle decorrelation")

        def run(s):
            rel, attrs = estimate_poses(s, cal, use_imus=use_imus, report=ctx.report, travel=travel)
            return chain_relative(rel), None, attrs

        tforms, _, attrs = estimate_at_stride(sweep, stride, run)
        ctx.report(1.0, "speckle decorrelation done")
        return PoseEstimate(tforms=tforms, attrs=attrs)
