"""Simulated IMUs rigidly mounted on the probe (docs/DATA_FORMATS.md, "Freehand sweep", IMU fields).

Conventions (the one place they are defined for the simulator):
- Each IMU's axes are the image axes (x columns, y rows/depth, z = x × y); its position
  `imu_position_mm` is in image-mm coordinates (on the handle: y < 0 is above the probe face).
- Earth frame: z up. The patient lies supine, so "up" is anterior = −y in LPS. EARTH_FROM_WORLD maps
  LPS to Earth = (x_E, y_E, z_E) = (L, S, A) = (x_LPS, z_LPS, −y_LPS); it is a proper rotation.
- `imu_euler_deg`: the IMU orientation R (IMU axes -> Earth) as static-xyz Euler angles, R = Rz·Ry·Rx.
- `imu_acc`: specific force in the IMU axes, Rᵀ(a − g) with g = (0, 0, −9.81) m/s² in Earth, where a is
  the second time derivative of the IMU's own position (lever arm included) in m/s².
Noise per IMU (seeded): constant bias (≤ ±0.05 m/s² per axis), white noise (~150 µg/√Hz over the
frame-rate bandwidth), a bias random walk, orientation noise (0.1–0.5°) and heading drift (~1°/min
about Earth z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import euler_to_matrix, matrix_to_euler

EARTH_FROM_WORLD = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
GRAVITY_M_S2 = 9.81
GRAVITY_EARTH = np.array([0.0, 0.0, -GRAVITY_M_S2])


@dataclass(frozen=True)
class ImuNoise:
    acc_bias_max_m_s2: float = 0.05
    acc_noise_density_ug_sqrt_hz: float = 150.0
    acc_bias_walk_m_s2_sqrt_s: float = 0.002
    angle_noise_deg: tuple[float, float] = (0.1, 0.5)  # per-IMU σ drawn in this range
    heading_drift_deg_min: float = 1.0  # per-IMU rate drawn in ±[0.5, 1.5] × this


def default_imu_positions(n_imus: int = 4, face_center_x_mm: float = 19.4) -> np.ndarray:
    """Distinct IMU positions [M, 3] in image mm on the probe handle above the face (y < 0)."""
    if n_imus < 1:
        raise InputError(f"n_imus must be at least 1, got {n_imus}")
    k = np.arange(n_imus)
    # Alternate sides of the handle at increasing heights, a few mm apart in elevation.
    x = face_center_x_mm + np.where(k % 2 == 0, -8.0, 8.0) * (1.0 + 0.25 * (k // 2))
    y = -20.0 - 15.0 * k
    z = np.where((k // 2) % 2 == 0, 4.0, -4.0)
    return np.stack([x, y, z], axis=1).astype(np.float64)


def _second_derivative(q: np.ndarray, dt: float) -> np.ndarray:
    """d²q/dt² along axis 0: central differences, second-order one-sided at the ends (exact for
    quadratics)."""
    if q.shape[0] < 4:
        raise InputError("IMU simulation needs at least 4 fine samples")
    a = np.empty_like(q)
    a[1:-1] = (q[2:] - 2.0 * q[1:-1] + q[:-2]) / dt**2
    a[0] = (2.0 * q[0] - 5.0 * q[1] + 4.0 * q[2] - q[3]) / dt**2
    a[-1] = (2.0 * q[-1] - 5.0 * q[-2] + 4.0 * q[-3] - q[-4]) / dt**2
    return a


def imu_truth(fine_poses: np.ndarray, fine_dt_s: float, positions_mm: np.ndarray):
    """Noise-free readings on the fine grid: (specific force [M, K, 3] m/s² in IMU axes, R_earth_from_imu
    [K, 3, 3])."""
    poses = np.asarray(fine_poses, dtype=np.float64)
    pos = np.asarray(positions_mm, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise InputError(f"IMU simulation: poses must be [K, 4, 4], got {poses.shape}")
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise InputError(f"IMU simulation: positions must be [M, 3] (image mm), got {pos.shape}")
    rot = poses[:, :3, :3]
    r_earth = EARTH_FROM_WORLD @ rot  # IMU (= image) axes -> Earth
    q = np.einsum("kij,mj->mki", rot, pos) + poses[None, :, :3, 3]  # [M, K, 3] world mm
    acc_world = np.stack([_second_derivative(qm, fine_dt_s) for qm in q]) / 1000.0  # m/s²
    acc_earth = acc_world @ EARTH_FROM_WORLD.T
    specific = np.einsum("kji,mkj->mki", r_earth, acc_earth - GRAVITY_EARTH)  # Rᵀ(a − g)
    return specific, r_earth


def simulate_imus(
    fine_poses: np.ndarray,
    fine_dt_s: float,
    oversample: int,
    positions_mm: np.ndarray,
    noise: ImuNoise | None = ImuNoise(),
    seed: int | np.random.Generator = 0,
):
    """IMU readings at the frames (every `oversample`-th fine sample): (imu_acc float32 [M, N, 3] m/s²,
    imu_euler_deg float32 [M, N, 3], info dict). `noise=None` gives the exact readings."""
    specific, r_earth = imu_truth(fine_poses, fine_dt_s, positions_mm)
    specific = specific[:, ::oversample]
    r_earth = r_earth[::oversample]
    m, n = specific.shape[:2]
    frame_dt = fine_dt_s * oversample
    times = np.arange(n) * frame_dt
    rots = np.broadcast_to(r_earth, (m, n, 3, 3)).copy()
    info = {}
    if noise is not None:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(
            np.random.SeedSequence([int(seed), 0x1A0]))
        bias = rng.uniform(-noise.acc_bias_max_m_s2, noise.acc_bias_max_m_s2, (m, 1, 3))
        white = noise.acc_noise_density_ug_sqrt_hz * 1e-6 * GRAVITY_M_S2 * np.sqrt(0.5 / frame_dt)
        walk = np.cumsum(rng.normal(0.0, noise.acc_bias_walk_m_s2_sqrt_s * np.sqrt(frame_dt), (m, n, 3)), axis=1)
        specific = specific + bias + walk + rng.normal(0.0, white, (m, n, 3))
        ang_sigma = rng.uniform(*noise.angle_noise_deg, m)
        drift = rng.uniform(0.5, 1.5, m) * np.sign(rng.random(m) - 0.5) * noise.heading_drift_deg_min / 60.0
        for i in range(m):
            jitter = euler_to_matrix(rng.normal(0.0, ang_sigma[i], (n, 3)), "xyz", degrees=True)
            heading = euler_to_matrix(np.stack([np.zeros(n), np.zeros(n), drift[i] * times], 1), "xyz",
                                      degrees=True)
            rots[i] = heading @ jitter @ rots[i]
        info = {"imu_acc_bias_m_s2": bias[:, 0], "imu_angle_noise_deg": ang_sigma,
                "imu_heading_drift_deg_s": drift, "imu_acc_white_sigma_m_s2": white}
    euler = matrix_to_euler(rots, "xyz", degrees=True)
    return specific.astype(np.float32), np.asarray(euler, dtype=np.float32), info


def integrate_specific_force(imu_acc, imu_euler_deg, dt_s, p0_mm, v0_mm_s):
    """Dead reckoning of one IMU: world (LPS) positions [N, 3] mm from its readings [N, 3], start
    position and velocity (trapezoidal double integration; the inverse of the model above)."""
    r_earth = euler_to_matrix(np.asarray(imu_euler_deg, dtype=np.float64), "xyz", degrees=True)
    a_earth = np.einsum("nij,nj->ni", r_earth, np.asarray(imu_acc, dtype=np.float64)) + GRAVITY_EARTH
    a_world = a_earth @ EARTH_FROM_WORLD * 1000.0  # Earth -> LPS (rotation transpose), mm/s²
    v = np.zeros_like(a_world)
    v[0] = v0_mm_s
    v[1:] = v0_mm_s + np.cumsum(0.5 * (a_world[1:] + a_world[:-1]) * dt_s, axis=0)
    p = np.zeros_like(a_world)
    p[0] = p0_mm
    p[1:] = p0_mm + np.cumsum(0.5 * (v[1:] + v[:-1]) * dt_s, axis=0)
    return p
