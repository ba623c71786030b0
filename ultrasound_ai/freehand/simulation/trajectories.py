"""Freehand probe trajectories for the scanning tactics of the FiMA paper: linear, curved, loop, sector.

World frame: LPS mm, patient supine, skin at y ≈ 0, depth = +y. The probe face centre sits on the skin
and the image looks into the tissue: at rest the image x axis is world x (lateral), image y (rows,
depth) is world +y, and image z = x × y is world z (the elevational / sweep direction, S-I).

Motion is built on a fine time grid (`oversample` samples per frame) from smooth functions - speed
profiles, heading and rocking sinusoids, a smooth tanh reversal, hand tremor at 3-9 Hz - integrated
cumulatively, so poses are C² and the IMU model can take second derivatives on the fine grid.
Voluntary motion is rescaled so that the mean face-centre speed (linear, curved, loop) and the mean
angular speed hit targets drawn in 5-15 mm/s and 4-13 °/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import euler_to_matrix, make_rigid

TACTICS = ("linear", "curved", "loop", "sector")
MOTIONS = ("smooth", "varied", "constant")
VARIED_SPEED_FACTORS = (0.3, 3.0)
SPEED_RANGE_MM_S = (5.0, 15.0)
ROTATION_RANGE_DEG_S = (4.0, 13.0)


@dataclass
class Trajectory:
    poses: np.ndarray  # [N, 4, 4] image mm -> world mm (LPS), at the frames
    timestamps_s: np.ndarray  # [N]
    tactic: str
    reversed: bool
    fine_poses: np.ndarray  # [K, 4, 4], K = (N - 1) * oversample + 1, the same motion sampled finely
    fine_dt_s: float
    oversample: int
    params: dict = field(default_factory=dict)

    @property
    def frame_rate_hz(self) -> float:
        return 1.0 / (self.fine_dt_s * self.oversample)


def _rot_y(a):
    c, s = np.cos(a), np.sin(a)
    z, o = np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def _cumint(y, dt):
    """Cumulative trapezoidal integral along axis 0, starting at 0."""
    out = np.zeros_like(y)
    out[1:] = np.cumsum(0.5 * (y[1:] + y[:-1]) * dt, axis=0)
    return out


def _sines(rng, t, n, freq_hz, amp):
    """Sum of n random sinusoids with the given frequency range; amplitude `amp` overall (RMS·√2)."""
    f = rng.uniform(*freq_hz, n)
    ph = rng.uniform(0, 2 * np.pi, n)
    a = rng.uniform(0.5, 1.0, n)
    a *= amp / np.sqrt((a**2).sum())
    return (a[None, :] * np.sin(2 * np.pi * f[None, :] * t[:, None] + ph[None, :])).sum(axis=1)


def _varied_progress(rng, tt):
    """(speed profile >= 0, direction in [-1, 1], number of reversals) for motion "varied".

    Segments of 0.4-2.5 s at a speed factor log-uniform in VARIED_SPEED_FACTORS, one in five a pause,
    joined smoothly (Gaussian, 0.15 s); 0-3 reversals at random times, each a tanh of 0.1-0.4 s.
    """
    dt = tt[1] - tt[0]
    step = np.empty_like(tt)
    start = 0.0
    while start <= tt[-1]:
        dur = rng.uniform(0.4, 2.5)
        pause = rng.random() < 0.2
        step[(tt >= start) & (tt < start + dur)] = 0.02 if pause else np.exp(
            rng.uniform(*np.log(VARIED_SPEED_FACTORS)))
        start += dur
    profile = np.maximum(_gaussian_smooth(step, 0.15 / dt), 0.01)
    profile = np.minimum(profile, 2.5 * profile.mean())  # the mean speed is rescaled to 5-15 mm/s later
    n_rev = int(rng.integers(0, 4))
    direction = np.ones_like(tt)
    for t_rev in np.sort(rng.uniform(0.1, 0.9, n_rev)) * tt[-1]:
        direction = direction * np.tanh((t_rev - tt) / rng.uniform(0.1, 0.4))
    return profile, direction, n_rev


def _gaussian_smooth(y, sigma_samples):
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(y, sigma_samples, mode="nearest")


def mean_speed_mm_s(positions: np.ndarray, dt: float) -> float:
    return float(np.linalg.norm(np.diff(positions, axis=0), axis=1).mean() / dt)


def mean_rotation_deg_s(rotations: np.ndarray, dt: float) -> float:
    rel = np.einsum("nji,njk->nik", rotations[:-1], rotations[1:])
    cos = np.clip((np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean() / dt)


def generate_trajectory(
    seed_or_rng,
    n_frames: int = 200,
    tactic: str | None = None,
    frame_rate_hz: float = 20.0,
    reverse: bool | None = None,
    face_center_image_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    speed_mm_s: float | None = None,
    rotation_deg_s: float | None = None,
    tremor: bool = True,
    oversample: int = 20,
    start_mm: tuple[float, float, float] | None = None,
    motion: str = "smooth",
) -> Trajectory:
    """A random freehand sweep. `face_center_image_mm` is the probe-face centre in image mm (the
    point that follows the path), normally ((W − 1) sx / 2, 0, 0). `reverse` None = random (30 %).

    motion "smooth": a gently varying speed (x0.8-1.2) and at most one reversal (the frozen sets'
    sweeps); "varied": segments of x0.3-x3 speed, pauses and up to three reversals within the sweep
    (`_varied_progress`), so that the speed must be read from the images, not from a prior; "constant":
    one speed and direction all along (a control: what a model trained on it can learn of speed)."""
    if motion not in MOTIONS:
        raise InputError(f"trajectory: motion must be one of {MOTIONS}, got {motion!r}")
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(
        np.random.SeedSequence([int(seed_or_rng), 0x7247]))
    if n_frames < 2:
        raise InputError(f"trajectory: n_frames must be at least 2, got {n_frames}")
    if not (frame_rate_hz > 0):
        raise InputError(f"trajectory: frame_rate_hz must be positive, got {frame_rate_hz}")
    if tactic is None:
        tactic = str(rng.choice(TACTICS))
    if tactic not in TACTICS:
        raise InputError(f"trajectory: tactic must be one of {TACTICS}, got {tactic!r}")
    if reverse is None:
        reverse = bool(rng.random() < 0.3)
    v_target = float(speed_mm_s if speed_mm_s is not None else rng.uniform(*SPEED_RANGE_MM_S))
    w_target = float(rotation_deg_s if rotation_deg_s is not None else rng.uniform(*ROTATION_RANGE_DEG_S))
    os_ = int(oversample)
    dt = 1.0 / (frame_rate_hz * os_)
    k = (n_frames - 1) * os_ + 1
    tt = np.arange(k) * dt
    duration = tt[-1]

    # Elevational progression: speed profile (mean ~1) and a smooth reversal.
    profile = 1.0 + _sines(rng, tt, 2, (0.05, 0.4), rng.uniform(0.1, 0.35))
    profile = np.maximum(profile, 0.2)
    t_rev = rng.uniform(0.35, 0.65) * duration
    direction = np.tanh((t_rev - tt) / rng.uniform(0.25, 0.5)) if reverse else np.ones(k)

    # Heading (rotation about the vertical) and rocking (tilt about image x, roll about image z,
    # yaw about image y). Curved: serpentine heading; loop: a continuous turn; sector: fanning tilt.
    heading_share = {"linear": 0.0, "curved": rng.uniform(0.5, 0.8), "loop": rng.uniform(0.7, 0.9),
                     "sector": 0.0}[tactic]
    psi0 = np.radians(rng.uniform(-10, 10))
    if tactic == "curved":
        shape = np.sin(2 * np.pi * rng.uniform(0.05, 0.12) * tt + rng.uniform(0, 2 * np.pi))
        heading_rate = np.sign(rng.random() - 0.5) * shape
    elif tactic == "loop":
        heading_rate = np.sign(rng.random() - 0.5) * (0.8 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * tt))
    else:
        heading_rate = np.zeros(k)
    wobble = np.stack([_sines(rng, tt, 2, (0.2, 0.8), 1.0) for _ in range(3)], axis=1)  # unit amplitude
    wobble *= np.array([1.0, 0.5, 0.8])  # tilt, yaw, roll: tilt and roll dominate in freehand rocking
    sector_rate = np.zeros(k)
    if tactic == "sector":
        sector_rate = (1.0 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * tt)) * direction
        sector_sign = np.sign(rng.random() - 0.5)
    if tremor:
        trem_t = np.stack([_sines(rng, tt, 3, (3.0, 9.0), rng.uniform(0.02, 0.08)) for _ in range(3)], axis=1)
        trem_r = np.radians(np.stack([_sines(rng, tt, 3, (3.0, 9.0), rng.uniform(0.02, 0.1)) for _ in range(3)], 1))
    else:
        trem_t = np.zeros((k, 3))
        trem_r = np.zeros((k, 3))
    x0 = np.array(start_mm, dtype=np.float64) if start_mm is not None else np.array([rng.uniform(-5, 5), 0.0, 0.0])
    face = np.asarray(face_center_image_mm, dtype=np.float64)
    n_reversals = int(reverse)
    if motion == "varied":  # drawn last: the "smooth" sweeps (and the frozen sets) stay as they were
        profile, direction, n_reversals = _varied_progress(rng, tt)
        if tactic == "sector":
            sector_rate = profile * direction
    elif motion == "constant":
        profile, direction, n_reversals = np.ones(k), np.ones(k), 0
        if tactic == "sector":
            sector_rate = np.ones(k)
    frames = slice(0, k, os_)

    def build(v_base, w_heading, w_wobble, w_sector):
        psi = psi0 + _cumint(heading_rate * w_heading, dt)
        ds = v_base * profile * direction if tactic != "sector" else 0.05 * v_base * profile * direction
        vel = np.stack([np.sin(psi) * ds, np.zeros(k), np.cos(psi) * ds], axis=1)
        pos = x0 + _cumint(vel, dt)
        ang = wobble * w_wobble
        if tactic == "sector":
            ang = ang.copy()
            fan = _cumint(sector_rate * w_sector, dt)
            ang[:, 0] += sector_sign * (fan - 0.5 * (fan.max() + fan.min()))  # fan centred on vertical
        ang = ang + trem_r
        # Probe rotation: heading about world y, then local tilt (x), yaw (y), roll (z).
        r_local = euler_to_matrix(np.stack([ang[:, 0], ang[:, 1], ang[:, 2]], 1), "xyz")
        rot = _rot_y(psi) @ r_local
        face_world = pos + trem_t
        # Image origin = face centre minus the rotated face offset (the face centre follows the path).
        t_img = face_world - (rot @ face)
        return make_rigid(rot, t_img, check=False), face_world, rot

    w_rad = np.radians(w_target)
    v_base, w_h, w_w, w_s = v_target, heading_share * w_rad, 0.5 * w_rad, 0.0
    if tactic == "sector":
        w_s, w_w = 0.85 * w_rad, 0.15 * w_rad
    for _ in range(4):  # rescale the voluntary motion toward the targets (nearly linear in the scales)
        poses, face_world, rot = build(v_base, w_h, w_w, w_s)
        frame_dt = 1.0 / frame_rate_hz
        if tactic != "sector":
            v_now = mean_speed_mm_s(face_world[frames], frame_dt)
            v_base *= v_target / max(v_now, 1e-9)
        w_now = np.radians(mean_rotation_deg_s(rot[frames], frame_dt))
        scale = w_rad / max(w_now, 1e-9)
        w_h, w_w, w_s = w_h * scale, w_w * scale, w_s * scale
    poses, face_world, rot = build(v_base, w_h, w_w, w_s)
    params = {
        "speed_target_mm_s": v_target,
        "rotation_target_deg_s": w_target,
        "mean_speed_mm_s": mean_speed_mm_s(face_world[frames], 1.0 / frame_rate_hz),
        "mean_rotation_deg_s": mean_rotation_deg_s(rot[frames], 1.0 / frame_rate_hz),
        "reversal_time_s": float(t_rev) if n_reversals and motion == "smooth" else -1.0,
        "n_reversals": float(n_reversals),
    }
    return Trajectory(
        poses=poses[frames].copy(),
        timestamps_s=tt[frames].copy(),
        tactic=tactic,
        reversed=bool(reverse),
        fine_poses=poses,
        fine_dt_s=dt,
        oversample=os_,
        params=params,
    )
