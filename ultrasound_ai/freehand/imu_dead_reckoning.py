"""IMU dead reckoning: the honest sensor-only baseline for freehand pose estimation.

Inputs (sweep contract): for M IMUs sampled at the frames, ``imu_euler_deg`` [M, N, 3] = the IMU's
orientation R in an Earth frame whose z axis points up, static-xyz Euler angles (R = Rz·Ry·Rx), and
``imu_acc`` [M, N, 3] = the specific force f in the IMU's axes, f = Rᵀ(a − g) with
g = (0, 0, −9.81) m/s²; IMU axes are the image axes; optional ``imu_position_mm`` [M, 3] = where each
IMU sits in image mm (zero, i.e. the image origin, when absent). Frame times from ``timestamps_s`` or
``frame_rate_hz``. The tracker's ``tforms`` are never read (the method registry does not even pass them).

Orientation. Each IMU's R_m,i comes from its angles. All IMUs share the probe's orientation, so the
fused R_i is their quaternion mean (signs aligned, averaged, normalised: the chordal L2 mean, accurate
for the sub-degree spread of sensor noise). The relative rotation of frame i is R_0ᵀ·R_i.

Translation. The Earth-frame acceleration of IMU m is a = R·f + g (converted from m/s² to mm/s²). All
IMUs ride on one rigid body, so the mean of their accelerations is the acceleration of their centroid
c = o + R·r̄ (o: image origin, r̄: mean lever arm), which is integrated twice with a cubic spline through
the samples (exact for motions the frame rate resolves; non-uniform timestamps are fine), and the image
origin follows as o = c − R·r̄: the lever arm is what makes rotation about the probe face come out right.

Drift and the unknowns of double integration. Two things are unobservable from the sensors: the
initial velocity v0 and a constant accelerometer bias b, which makes position error grow as ½·b·t².
The defensible assumption used here (the classic zero-velocity update at both ends of a recording):
**the probe is at rest when the sweep starts and when it ends.** Then v0 = 0 and the velocity change
over the sweep must vanish, ∫ a dt = 0, which determines a constant bias in the IMUs' axes from
(∫ R dt)·b = ∫ (R·f + g) dt (a 3×3 linear solve; R varies, so the bias is modelled in the sensor's own
axes, where it is constant). Either assumption can be replaced: ``initial_velocity_mm_s`` (a velocity
of the IMU centroid in the first frame's image axes, when it is known from elsewhere) and
``remove_bias=False``. A sweep already moving at its first frame breaks the assumption and its
translation drifts: that is what an IMU-only baseline honestly does; rotation stays good.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.sweep import GRAVITY_NORM_M_S2

__all__ = ["GRAVITY_M_S2", "DeadReckoningResult", "imu_rotations", "fuse_rotations", "smooth_rotations",
           "angle_noise_weights", "integrate_twice", "dead_reckon"]

GRAVITY_M_S2 = np.array([0.0, 0.0, -GRAVITY_NORM_M_S2])  # Earth frame, z up (the sweep contract)
_MM_PER_M = 1000.0


@dataclass
class DeadReckoningResult:
    """tforms [N, 4, 4] (frame i image mm -> frame 0 image mm, tforms[0] = I); imu_weights [N-1, M]
    (equal weights: every IMU counts the same); rotations_earth [N, 3, 3] and origin_earth_mm [N, 3]
    (the fused probe orientation and image origin in the Earth frame, origin_earth_mm[0] = 0);
    bias_m_s2 [3] the accelerometer bias removed (IMU axes); attrs for the estimate file."""

    tforms: np.ndarray
    imu_weights: np.ndarray
    rotations_earth: np.ndarray
    origin_earth_mm: np.ndarray
    bias_m_s2: np.ndarray
    attrs: dict = field(default_factory=dict)


def imu_rotations(imu_euler_deg) -> np.ndarray:
    """[M, N, 3, 3] IMU orientations in the Earth frame from static-xyz Euler angles in degrees."""
    from ultrasound_ai.core.geometry import euler_to_matrix

    e = np.asarray(imu_euler_deg, dtype=np.float64)
    if e.ndim != 3 or e.shape[-1] != 3:
        raise InputError(f"imu_euler_deg: expected [M, N, 3] degrees, got shape {e.shape}")
    return euler_to_matrix(e, "xyz", degrees=True)


def fuse_rotations(rotations, weights=None) -> np.ndarray:
    """Quaternion mean over the first axis of rotations [M, N, 3, 3] -> [N, 3, 3]; weights [M] (default equal)."""
    from ultrasound_ai.core.geometry import matrix_to_quaternion, quaternion_to_matrix

    R = np.asarray(rotations, dtype=np.float64)
    if R.shape[0] == 1:
        return R[0].copy()
    q = matrix_to_quaternion(R)  # [M, N, 4]
    # q and -q are the same rotation: align every IMU's sign with the first before averaging.
    sign = np.where(np.sum(q * q[:1], axis=-1, keepdims=True) < 0, -1.0, 1.0)
    w = np.ones(R.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    return quaternion_to_matrix(np.einsum("m,mnk->nk", w / w.sum(), q * sign))


def _quadratic_trend(a: np.ndarray, window: int, axis: int):
    """Local quadratic fit of `a` along `axis` over `window` samples (made odd), or None when the window is
    too short to smooth or longer than the series. A quadratic keeps the hand's turning, which a box filter
    bends; per-sample sensor noise it removes."""
    from scipy.signal import savgol_filter

    window = window + 1 - window % 2
    if window <= 3 or a.shape[axis] <= window:
        return None
    return savgol_filter(a, window, 2, axis=axis, mode="interp")


def smooth_rotations(rotations, window: int) -> np.ndarray:
    """Rotations [N, 3, 3] smoothed over `window` samples (local quadratic fit, back onto rotations by SVD)."""
    R = np.asarray(rotations, dtype=np.float64)
    trend = _quadratic_trend(R, window, axis=0)
    if trend is None:
        return R
    u, _, vt = np.linalg.svd(trend)
    return u @ vt


def angle_noise_weights(rotations, window: int) -> np.ndarray:
    """Inverse-variance weights [M] of the IMUs' orientations [M, N, 3, 3]: each IMU's jitter is its departure
    from a local quadratic fit over `window` samples (the hand's motion is smooth at that scale, noise is not)."""
    R = np.asarray(rotations, dtype=np.float64)
    trend = None if R.shape[0] == 1 else _quadratic_trend(R, window, axis=1)
    if trend is None:
        return np.ones(R.shape[0])
    var = np.maximum(((R - trend) ** 2).mean(axis=(1, 2, 3)), 1e-18)
    return (1.0 / var) / (1.0 / var).sum()


def _spline(t: np.ndarray, y: np.ndarray):
    from scipy.interpolate import CubicSpline

    # A 2-sample sweep cannot carry a cubic; a straight line is the only honest interpolant then.
    return CubicSpline(t, y, axis=0, bc_type="not-a-knot" if t.size >= 4 else "natural")


def integrate_twice(times_s, acc, v0=None) -> np.ndarray:
    """Positions [N, 3] (starting at 0) from accelerations acc [N, 3] sampled at times_s [N].

    The samples are joined by a cubic spline that is integrated exactly, so smooth motion sampled above
    its Nyquist rate is integrated without the O(dt²) bias of the trapezoidal rule. v0: initial velocity.
    """
    t = np.asarray(times_s, dtype=np.float64)
    a = np.asarray(acc, dtype=np.float64)
    if t.ndim != 1 or a.shape != (t.size, 3) or t.size < 2:
        raise InputError(f"integrate_twice: expected times [N] and accelerations [N, 3] with N >= 2, got {t.shape}, {a.shape}")
    # PPoly antiderivatives are zero at the first knot, so these are displacements from t[0].
    pos = _spline(t, a).antiderivative(2)(t)
    if v0 is not None:
        pos = pos + (t - t[0])[:, None] * np.asarray(v0, dtype=np.float64)[None, :]
    return pos


def _integral(t: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _spline(t, y).integrate(t[0], t[-1])


def dead_reckon(sweep, initial_velocity_mm_s=None, remove_bias: bool = True) -> DeadReckoningResult:
    """Dead-reckoned poses of `sweep` (see the module docstring for the model and the assumptions).

    initial_velocity_mm_s: velocity [3] of the IMUs' centroid at the first frame, in the first frame's
    image axes (mm/s); None = at rest. remove_bias: estimate and remove a constant accelerometer bias by
    assuming the probe ends the sweep with the velocity it started with.
    """
    from ultrasound_ai.core.geometry import make_rigid

    if sweep.imu_acc is None or sweep.imu_euler_deg is None:
        raise InputError("imu dead reckoning: the sweep has no IMU data ('imu_acc' and 'imu_euler_deg' [M, N, 3])")
    f = np.asarray(sweep.imu_acc, dtype=np.float64)  # [M, N, 3] m/s², IMU axes
    m, n = f.shape[:2]
    t = np.asarray(sweep.times_s(), dtype=np.float64)
    lever = (np.zeros((m, 3)) if sweep.imu_position_mm is None
             else np.asarray(sweep.imu_position_mm, dtype=np.float64))
    if initial_velocity_mm_s is None:
        v0_img = np.zeros(3)
    else:
        v0_img = np.asarray(initial_velocity_mm_s, dtype=np.float64).reshape(-1)
        if v0_img.shape != (3,) or not np.all(np.isfinite(v0_img)):
            raise InputError(f"initial_velocity_mm_s: expected three finite numbers (mm/s), got {initial_velocity_mm_s!r}")

    R = fuse_rotations(imu_rotations(sweep.imu_euler_deg))  # [N, 3, 3]
    f_mean = f.mean(axis=0)  # rigid body: mean specific force <-> the IMUs' centroid
    acc = np.einsum("nij,nj->ni", R, f_mean) + GRAVITY_M_S2  # m/s², Earth frame
    bias = np.zeros(3)
    if remove_bias:
        rot_int = _integral(t, R.reshape(n, 9)).reshape(3, 3)
        bias = np.linalg.lstsq(rot_int, _integral(t, acc), rcond=None)[0]
        acc = acc - np.einsum("nij,j->ni", R, bias)
    centroid = integrate_twice(t, acc * _MM_PER_M, v0=R[0] @ v0_img)  # mm, Earth, from frame 0
    r_bar = lever.mean(axis=0)
    origin = centroid - np.einsum("nij,j->ni", R, r_bar)
    origin -= origin[0]
    # Into the first frame's image axes: tforms_i = [R_0ᵀ R_i | R_0ᵀ (o_i − o_0)].
    R0t = R[0].T
    tforms = make_rigid(np.einsum("ij,njk->nik", R0t, R), origin @ R0t.T, check=False)
    tforms[0] = np.eye(4)
    weights = np.full((n - 1, m), 1.0 / m, dtype=np.float32)
    attrs = {
        "imu_count": int(m),
        "imu_bias_removed": bool(remove_bias),
        "imu_bias_estimate_m_s2": [float(x) for x in bias],
        "imu_initial_velocity_mm_s": [float(x) for x in v0_img],
        "imu_assumption": ("probe at rest at the first frame" if initial_velocity_mm_s is None
                           else "initial velocity given") + ("; same velocity at the last frame" if remove_bias else ""),
    }
    return DeadReckoningResult(tforms=tforms, imu_weights=weights, rotations_earth=R, origin_earth_mm=origin,
                               bias_m_s2=bias, attrs=attrs)
