"""An independent freehand sweep generator, for validation only (never for training or model selection).

Written separately from the training simulator and importing nothing from it (a test checks), so
that a model which learned that simulator's motion prior, speckle texture or anatomy finds none of
them here. Only the sweep contract (`ultrasound_ai.io.sweep`) is shared; rotations and Euler angles
come from scipy, not from the engine's geometry module, so a convention slip on either side shows.

- **Speckle**: a world-fixed, band-limited complex Gaussian random field (white noise filtered by a
  Gaussian spectrum on periodic grids finer than the resolution cell), sampled along the image plane
  by trilinear interpolation, with the interpolation's variance loss divided out. Its intensity
  correlates as exp(-d^2 / 2 s^2) along each world axis, s = (lateral, axial, elevational) resolution
  of the probe. Two components with incommensurate periods are summed so that no pattern repeats
  within a sweep. A smooth Gamma-distributed texture multiplies the intensity: speckle from sparse
  scatterers (shape nu < ~5) is not fully developed.
- **Anatomy**: wavy skin / fat / muscle layers with septa and fibre striation, a deep bright
  interface with its shadow, straight vessels at any orientation, ellipsoidal nodules.
- **Imaging chain**: depth attenuation partly given back by TGC, a focal-zone gain, thermal noise,
  log compression with a per-sweep dynamic range and gain.
- **Motion**: per tactic (linear, curved, sector, loop) a speed profile made of segments with speed
  changes (x0.3 to x3), pauses and reversals, smoothed; hand wobble and tremor on top.
- **IMUs**: 4 units on the handle, in the docs/DATA_FORMATS.md convention (axes = image axes up to a small
  mounting error; static-xyz Euler angles of the orientation in an Earth frame with z up; specific
  force R^T (a - g)). The Earth frame has a random heading and a tilted bed per sweep. Readings are
  box-filtered over a frame interval (anti-aliasing) and carry bias, bias walk, white noise, angle
  noise and heading drift.

`generate_sweep(seed, tactic)` is deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage, special
from scipy.spatial.transform import Rotation

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.sweep import Sweep

__all__ = ["GENERATOR_VERSION", "TACTICS", "ProbeModel", "draw_probe", "generate_motion", "generate_sweep",
           "SpeckleField", "Anatomy"]

GENERATOR_VERSION = "freehand-indep-1"
TACTICS = ("linear", "curved", "sector", "loop")
FRAME_RATE_HZ = 20.0
GRAVITY_M_S2 = 9.81
_OVERSAMPLE = 8  # fine motion samples per frame interval (IMU derivatives and anti-aliasing)
_PAD = 2 * _OVERSAMPLE  # fine samples simulated before the first and after the last frame
# Earth (x, y, z up) from world LPS for a level bed with the patient supine: up is anterior = -y.
_LEVEL_EARTH_FROM_WORLD = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def _streams(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x1D3F, int(tag)]))


# ----------------------------------------------------------------------------------------------
# Probe and imaging chain
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeModel:
    """One sweep's imaging parameters. Resolutions are intensity correlation lengths (Gaussian std, mm)."""

    frame_shape_hw: tuple
    pixel_spacing_mm: float
    lateral_mm: float
    axial_mm: float
    elevational_mm: float
    attenuation_db_mm: float  # round trip, before TGC
    tgc_fraction: float
    focus_depth_mm: float
    dynamic_range_db: float
    headroom_db: float  # how far above reference tissue the top of the grey scale lies
    noise_db: float  # thermal noise power relative to reference tissue
    texture_shape: float  # Gamma shape of the scatterer-density texture (large: fully developed)


def draw_probe(rng: np.random.Generator, frame_shape_hw=None, pixel_spacing_mm=None) -> ProbeModel:
    """Imaging parameters of a linear probe, drawn per sweep."""
    sp = float(pixel_spacing_mm) if pixel_spacing_mm is not None else float(rng.uniform(0.13, 0.18))
    if frame_shape_hw is None:
        depth, width = rng.uniform(20.0, 28.0), rng.uniform(20.0, 26.0)
        frame_shape_hw = (int(round(depth / sp)), int(round(width / sp)))
    dr = float(rng.uniform(40.0, 60.0))
    return ProbeModel(
        frame_shape_hw=tuple(int(v) for v in frame_shape_hw), pixel_spacing_mm=sp,
        lateral_mm=float(rng.uniform(0.2, 0.34)), axial_mm=float(rng.uniform(0.11, 0.19)),
        elevational_mm=float(rng.uniform(0.45, 0.85)), attenuation_db_mm=float(rng.uniform(0.5, 1.1)),
        tgc_fraction=float(rng.uniform(0.7, 1.0)), focus_depth_mm=float(rng.uniform(10.0, 25.0)),
        dynamic_range_db=dr, headroom_db=float(dr * rng.uniform(0.4, 0.55)), noise_db=float(rng.uniform(-24.0, -14.0)), texture_shape=float(np.exp(rng.uniform(np.log(0.8), np.log(30.0)))),
    )


class SpeckleField:
    """A world-fixed complex Gaussian field with E|f|^2 = 1 and intensity correlation exp(-d^2/2 s^2) per axis.

    corr_mm: s along world (x, y, z). Each component lives on a periodic grid with voxels of s / 2.5;
    the periods of the components differ by irrational factors.
    """

    def __init__(self, rng: np.random.Generator, corr_mm, period_mm: float = 13.0, n_components: int = 2):
        s = np.asarray(corr_mm, dtype=np.float64)
        self.components = []
        for j in range(n_components):
            period = period_mm * (1.0 + (np.sqrt(2.0) - 1.0) * j)
            n = [sfft.next_fast_len(int(np.ceil(period / (sj / 2.5)))) for sj in s]
            voxel = np.array([period / k for k in n])
            white = (rng.standard_normal(n, dtype=np.float32) + 1j * rng.standard_normal(n, dtype=np.float32))
            spec = sfft.fftn(white, workers=1)
            for axis in range(3):
                k = sfft.fftfreq(n[axis], d=voxel[axis])  # cycles / mm
                # The amplitude filter is a Gaussian of std s: the field's amplitude correlation has std
                # sqrt(2) s and the intensity correlation |rho|^2 has std s.
                shape = [1, 1, 1]
                shape[axis] = n[axis]
                spec *= np.exp(-0.5 * (2.0 * np.pi * k * s[axis]) ** 2).astype(np.float32).reshape(shape)
            field = sfft.ifftn(spec, workers=1)
            field /= np.sqrt(np.mean(np.abs(field) ** 2))
            # Correlation of the amplitude between neighbouring nodes, per axis (for the variance fix).
            rho = np.exp(-(voxel ** 2) / (4.0 * s ** 2))
            self.components.append((_periodic_grid([field.real, field.imag]), voxel,
                                    rng.uniform(0, 1, 3) * np.array(n), rho))

    def sample(self, points: np.ndarray) -> np.ndarray:
        """Complex field at world points [P, 3] (mm)."""
        out = np.zeros(points.shape[0], dtype=np.complex64)
        for grid, voxel, offset, rho in self.components:
            idx = points / voxel + offset
            value = _periodic_trilinear(grid, idx)
            frac = idx - np.floor(idx)
            # Trilinear interpolation of a correlated field loses variance between nodes: divide it out.
            var = np.prod(frac ** 2 + (1 - frac) ** 2 + 2 * frac * (1 - frac) * rho, axis=1)
            out += ((value[0] + 1j * value[1]) / np.sqrt(var)).astype(np.complex64)
        return out / np.sqrt(len(self.components))


def _periodic_grid(channels):
    """[C, nx, ny, nz] arrays -> a float32 tensor [1, C, nx + 1, ny + 1, nz + 1] wrapped by one node."""
    import torch

    a = np.stack(channels).astype(np.float32)
    a = np.concatenate([a, a[:, :1]], 1)
    a = np.concatenate([a, a[:, :, :1]], 2)
    a = np.concatenate([a, a[:, :, :, :1]], 3)
    return torch.from_numpy(np.ascontiguousarray(a))[None]


def _periodic_trilinear(grid, idx: np.ndarray) -> np.ndarray:
    """Trilinear samples [C, P] of a wrapped grid (from `_periodic_grid`) at fractional node indices [P, 3]."""
    import torch

    n = np.array(grid.shape[2:]) - 1
    norm = 2.0 * np.mod(idx, n) / n - 1.0  # align_corners: -1 is node 0, +1 the wrapped node n
    g = torch.from_numpy(norm[:, ::-1].astype(np.float32).copy()).view(1, 1, 1, -1, 3)
    with torch.no_grad():
        v = torch.nn.functional.grid_sample(grid, g, mode="bilinear", padding_mode="border", align_corners=True)
    return v.view(grid.shape[1], -1).numpy().astype(np.float64)


class _DensityTexture:
    """A world-fixed smooth scatterer-density multiplier with a Gamma(nu, 1/nu) marginal (mean 1), periodic."""

    def __init__(self, rng: np.random.Generator, corr_mm: float, shape_nu: float, period_mm: float = 23.0):
        n = sfft.next_fast_len(int(np.ceil(period_mm / (corr_mm / 2.0))))
        self.voxel = period_mm / n
        f = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), corr_mm / self.voxel, mode="wrap")
        u = special.ndtr((f - f.mean()) / f.std()).clip(1e-6, 1 - 1e-6)
        self.grid = _periodic_grid([special.gammaincinv(shape_nu, u) / shape_nu])
        self.offset = rng.uniform(0, n, 3)

    def sample(self, points: np.ndarray) -> np.ndarray:
        return _periodic_trilinear(self.grid, points / self.voxel + self.offset)[0]


# ----------------------------------------------------------------------------------------------
# Anatomy: echogenicity in world mm (LPS, skin near y = 0, depth = +y)
# ----------------------------------------------------------------------------------------------


class Anatomy:
    """Closed-form echogenicity of a layered limb-like tissue block with vessels and nodules."""

    def __init__(self, rng: np.random.Generator):
        def wave():
            return dict(amp=rng.uniform(0.2, 1.5), lam=rng.uniform(15.0, 60.0), phi=rng.uniform(0, np.pi),
                        psi=rng.uniform(0, 2 * np.pi))

        self.skin = (rng.uniform(1.2, 2.4), wave())
        self.fat = (rng.uniform(4.0, 11.0), wave())
        self.deep = (rng.uniform(15.0, 32.0), wave())
        self.septa = [(rng.uniform(2.5, 10.0), wave()) for _ in range(rng.integers(1, 4))]
        self.e_fat = rng.uniform(0.3, 0.7)
        self.e_muscle = rng.uniform(0.8, 1.4)
        fibre = rng.normal(size=3) * np.array([1.0, 0.3, 1.0])
        self.fibre = fibre / np.linalg.norm(fibre)
        self.fibre_period = rng.uniform(0.8, 2.0)
        self.fibre_depth = rng.uniform(0.15, 0.45)
        self.vessels = []
        for _ in range(rng.integers(1, 4)):
            u = rng.normal(size=3) * np.array([1.0, 0.15, 1.0])
            self.vessels.append((np.array([rng.uniform(-12, 12), rng.uniform(5, 20), rng.uniform(-30, 30)]),
                                 u / np.linalg.norm(u), rng.uniform(1.2, 4.0)))
        self.nodules = []
        for _ in range(rng.integers(1, 5)):
            axes = rng.uniform(1.5, 6.0, 3)
            rot = Rotation.from_euler("xyz", rng.uniform(-180, 180, 3), degrees=True).as_matrix()
            self.nodules.append((np.array([rng.uniform(-14, 14), rng.uniform(4, 22), rng.uniform(-40, 40)]),
                                 rot.T / axes[:, None], rng.choice([0.15, 0.4, 2.0, 3.0])))

    @staticmethod
    def _surface(p, depth_and_wave):
        depth, w = depth_and_wave
        along = p[:, 0] * np.cos(w["phi"]) + p[:, 2] * np.sin(w["phi"])
        return depth + w["amp"] * np.sin(2 * np.pi * along / w["lam"] + w["psi"])

    def echogenicity(self, p: np.ndarray) -> np.ndarray:
        y = p[:, 1]
        skin, fat, deep = self._surface(p, self.skin), self._surface(p, self.fat), self._surface(p, self.deep)
        e = np.where(y < skin, 2.2, np.where(y < fat, self.e_fat, self.e_muscle))
        in_muscle = (y >= fat) & (y < deep)
        e = e * np.where(in_muscle, 1.0 + self.fibre_depth * np.sin(2 * np.pi * (p @ self.fibre) / self.fibre_period), 1.0)
        for d, w in self.septa:
            ys = self._surface(p, (d, w))
            e = e + np.where(y < fat, 1.5 * np.exp(-0.5 * ((y - ys) / 0.12) ** 2), 0.0)
        e = e + 1.8 * np.exp(-0.5 * ((y - fat) / 0.2) ** 2)  # fascia
        e = np.where(y > deep + 0.6, 0.04 * e, e) + 5.0 * np.exp(-0.5 * ((y - deep) / 0.25) ** 2)  # bone + shadow
        for a, u, r in self.vessels:
            d = p - a
            rho = np.linalg.norm(d - np.outer(d @ u, u), axis=1)
            lumen = special.expit((r - rho) / 0.08)
            e = e * (1.0 - 0.97 * lumen) + 2.0 * np.exp(-0.5 * ((rho - r) / 0.18) ** 2)
        for c, a, level in self.nodules:
            q = np.linalg.norm((p - c) @ a.T, axis=1)
            inside = special.expit((1.0 - q) / 0.06)
            e = e * (1.0 - inside) + level * inside
        return np.maximum(e, 0.0)


# ----------------------------------------------------------------------------------------------
# Motion
# ----------------------------------------------------------------------------------------------


def _speed_profile(rng, t, reversals: bool, limits=(0.3, 3.0)):
    """A smooth speed multiplier over the times t: segments of cruise (x0.3..x3), pauses and reversals."""
    step = np.empty_like(t)
    start, kinds = t[0], []
    while start <= t[-1]:
        dur = rng.uniform(0.6, 2.5)
        kind = rng.choice(["cruise", "cruise", "cruise", "pause", "reverse"] if reversals else ["cruise", "cruise", "pause"])
        if kinds == [] and kind != "cruise":  # sweeps start moving
            kind = "cruise"
        value = {"cruise": np.exp(rng.uniform(np.log(limits[0]), np.log(limits[1]))), "pause": 0.0,
                 "reverse": -np.exp(rng.uniform(np.log(0.3), np.log(1.5)))}[kind]
        step[(t >= start) & (t < start + dur)] = value
        kinds.append(str(kind))
        start += dur
    dt = t[1] - t[0]
    smooth = ndimage.gaussian_filter1d(step, 0.12 / dt, mode="nearest")
    return smooth, {"n_reversals": kinds.count("reverse"), "n_pauses": kinds.count("pause"),
                    "n_segments": len(kinds)}


def _wobble(rng, t, amp, freq=(0.1, 0.6), n=3):
    """Sum of n sinusoids (random frequency, phase) scaled to peak amplitude about `amp`."""
    f = rng.uniform(*freq, n)
    ph = rng.uniform(0, 2 * np.pi, n)
    return amp / np.sqrt(n) * np.sin(2 * np.pi * f[None, :] * t[:, None] + ph).sum(1)


@dataclass
class Motion:
    times_s: np.ndarray  # fine times, frame k at index _PAD + k * _OVERSAMPLE
    rotations: np.ndarray  # [K, 3, 3] image axes -> world
    face_mm: np.ndarray  # [K, 3] world position of the face centre
    info: dict


def generate_motion(rng: np.random.Generator, tactic: str, n_frames: int) -> Motion:
    """Face-centre position and probe orientation on a fine time grid for one sweep."""
    if tactic not in TACTICS:
        raise InputError(f"generate_motion: tactic must be one of {TACTICS}, got {tactic!r}")
    dt = 1.0 / (FRAME_RATE_HZ * _OVERSAMPLE)
    k = (n_frames - 1) * _OVERSAMPLE + 1 + 2 * _PAD
    t = (np.arange(k) - _PAD) * dt
    profile, info = _speed_profile(rng, t, reversals=tactic in ("linear", "curved"))
    speed = np.clip(rng.uniform(4.0, 9.0) * profile, -24.0, 24.0)  # mm/s of the face centre
    s = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * dt)])  # path progress, mm
    s -= s[_PAD]
    face = np.zeros((k, 3))
    heading = np.zeros(k)  # rotation about world y (the depth axis)
    tilt = np.zeros(k)  # rocking about the image x axis (sector)
    if tactic == "linear":
        beta = np.radians(rng.uniform(-12, 12))
        face[:, 0], face[:, 2] = s * np.sin(beta), s * np.cos(beta)
        heading[:] = beta
    elif tactic == "curved":
        radius, side = rng.uniform(25.0, 90.0), rng.choice([-1.0, 1.0])
        psi = s / radius
        face[:, 0], face[:, 2] = side * radius * (1.0 - np.cos(psi)), radius * np.sin(psi)
        heading = side * psi  # the image z axis follows the arc's tangent (side sin psi, 0, cos psi)
        info["radius_mm"] = float(side * radius)
    elif tactic == "sector":
        amp = np.radians(rng.uniform(12.0, 30.0))
        omega = np.radians(rng.uniform(5.0, 12.0))  # mean angular speed scale, rad/s
        phase = np.concatenate([[0.0], np.cumsum(0.5 * (profile[1:] + profile[:-1]) * dt)]) * omega / amp
        tilt = amp * np.sin(phase - phase[_PAD] + rng.uniform(-0.3, 0.3))
        face[:, 0] = _wobble(rng, t, 0.6)
        face[:, 2] = _wobble(rng, t, 0.8)
        info["sector_amplitude_deg"] = float(np.degrees(amp))
    else:  # loop: around an ellipse, orientation kept, so the elevational motion reverses
        ax, az = rng.uniform(6.0, 20.0), rng.uniform(15.0, 40.0)
        side = rng.choice([-1.0, 1.0])
        phi = np.zeros(k)
        for i in range(1, k):
            r = np.hypot(ax * np.sin(phi[i - 1]), az * np.cos(phi[i - 1]))
            phi[i] = phi[i - 1] + abs(speed[i - 1]) * dt / max(r, 1e-3)
        phi -= phi[_PAD]
        face[:, 0], face[:, 2] = side * ax * (1.0 - np.cos(phi)), az * np.sin(phi)
        heading = np.radians(rng.uniform(-10, 10)) + _wobble(rng, t, np.radians(4.0))
        info.update(loop_axes_mm=[float(ax), float(az)])
    face[:, 1] = _wobble(rng, t, rng.uniform(0.1, 0.5))  # pressing
    tremor = [_wobble(rng, t, a, freq=(6.0, 11.0), n=2) for a in (0.03, 0.03, 0.03)]
    face += np.stack(tremor, 1)
    base = rng.uniform(-4, 4, 3)
    wob = np.stack([_wobble(rng, t, np.radians(a)) + _wobble(rng, t, np.radians(0.04), freq=(6.0, 11.0), n=2)
                    for a in (1.5, 2.0, 1.5)], 1)
    rot = (Rotation.from_euler("y", heading[:, None]) * Rotation.from_euler("xyz", base, degrees=True)
           * Rotation.from_euler("x", tilt[:, None]) * Rotation.from_euler("xyz", wob))
    face -= face[_PAD]
    info.update(mean_speed_mm_s=float(np.abs(speed).mean()), tactic=tactic)
    return Motion(times_s=t, rotations=rot.as_matrix(), face_mm=face, info=info)


# ----------------------------------------------------------------------------------------------
# IMUs
# ----------------------------------------------------------------------------------------------


def _earth_from_world(rng) -> np.ndarray:
    """A random heading and a bed tilted by up to ~10 degrees."""
    tilt = Rotation.from_euler("xy", rng.uniform(-10, 10, 2), degrees=True)
    yaw = Rotation.from_euler("z", rng.uniform(-180, 180), degrees=True)
    return (yaw * tilt).as_matrix() @ _LEVEL_EARTH_FROM_WORLD


def imu_positions(rng, face_x_mm: float) -> np.ndarray:
    """Four IMU positions [4, 3] on the handle (image mm, y < 0 above the face)."""
    x = face_x_mm + np.array([-1, 1, -1, 1]) * rng.uniform(5.0, 12.0, 4)
    y = -rng.uniform(15.0, 70.0, 4)
    z = np.array([1, 1, -1, -1]) * rng.uniform(3.0, 9.0, 4)
    return np.stack([x, y, z], 1)


def simulate_imus(rng, motion: Motion, poses_fine: np.ndarray, positions_mm: np.ndarray, earth: np.ndarray):
    """(imu_acc [M, N, 3] m/s^2, imu_euler_deg [M, N, 3], info) sampled at the frames."""
    dt = motion.times_s[1] - motion.times_s[0]
    m = positions_mm.shape[0]
    rot = poses_fine[:, :3, :3]
    g_earth = np.array([0.0, 0.0, -GRAVITY_M_S2])
    frames = np.arange(_PAD, len(motion.times_s) - _PAD + 1, _OVERSAMPLE)
    n = len(frames)
    half = _OVERSAMPLE // 2
    acc, euler = np.empty((m, n, 3)), np.empty((m, n, 3))
    info = {"imu_acc_bias_m_s2": [], "imu_angle_noise_deg": [], "imu_heading_drift_deg_min": [],
            "imu_misalignment_deg": []}
    for j in range(m):
        q = np.einsum("kab,b->ka", rot, positions_mm[j]) + poses_fine[:, :3, 3]  # world mm
        a_world = np.zeros_like(q)
        a_world[1:-1] = (q[2:] - 2 * q[1:-1] + q[:-2]) / dt ** 2 / 1000.0  # m/s^2
        mis_deg = rng.normal(0, 0.15, 3)
        mount = Rotation.from_euler("xyz", mis_deg, degrees=True).as_matrix()
        r_earth = earth @ rot @ mount  # IMU axes -> Earth
        specific = np.einsum("kba,kb->ka", r_earth, a_world @ earth.T - g_earth)
        # anti-aliasing: mean over one frame interval around each frame
        acc[j] = np.stack([specific[f - half:f + half + 1].mean(0) for f in frames])
        density = rng.uniform(100.0, 250.0) * 1e-6 * GRAVITY_M_S2  # m/s^2 / sqrt(Hz)
        bias = rng.uniform(-0.04, 0.04, 3)
        walk = np.cumsum(rng.normal(0.0, 0.001 * np.sqrt(1 / FRAME_RATE_HZ), (n, 3)), axis=0)
        acc[j] += bias + walk + rng.normal(0.0, density * np.sqrt(FRAME_RATE_HZ / 2), (n, 3))
        sigma = rng.uniform(0.05, 0.3)
        drift = rng.uniform(0.3, 1.5) * rng.choice([-1, 1])  # deg / min about Earth z
        times = motion.times_s[frames]
        measured = (Rotation.from_euler("z", drift * times[:, None] / 60.0, degrees=True)
                    * Rotation.from_matrix(r_earth[frames])
                    * Rotation.from_euler("xyz", rng.normal(0, sigma, (n, 3)), degrees=True))
        euler[j] = measured.as_euler("xyz", degrees=True)
        for key, v in zip(info, (bias, sigma, drift, mis_deg)):
            info[key].append(v)
    return acc.astype(np.float32), euler.astype(np.float32), {k: np.asarray(v, dtype=np.float64) for k, v in info.items()}


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def _poses(motion: Motion, face_img: np.ndarray) -> np.ndarray:
    """Image mm -> world mm [K, 4, 4]: the face centre (image point face_img) follows motion.face_mm."""
    k = len(motion.times_s)
    poses = np.tile(np.eye(4), (k, 1, 1))
    poses[:, :3, :3] = motion.rotations
    poses[:, :3, 3] = motion.face_mm - motion.rotations @ face_img
    return poses


def render_frame(pose, probe: ProbeModel, anatomy: Anatomy, speckle: SpeckleField, texture: _DensityTexture,
                 noise_rng: np.random.Generator) -> np.ndarray:
    """One uint8 B-mode frame [H, W] at `pose` (image mm -> world mm)."""
    h, w = probe.frame_shape_hw
    sp = probe.pixel_spacing_mm
    rows, cols = np.meshgrid(np.arange(h) * sp, np.arange(w) * sp, indexing="ij")
    img = np.stack([cols.ravel(), rows.ravel(), np.zeros(h * w)], 1)
    world = img @ pose[:3, :3].T + pose[:3, 3]
    amp = speckle.sample(world)
    density = texture.sample(world)
    depth = img[:, 1]
    gain_db = (-probe.attenuation_db_mm * (1.0 - probe.tgc_fraction) * depth
               + 3.0 * np.exp(-0.5 * ((depth - probe.focus_depth_mm) / 8.0) ** 2))
    intensity = anatomy.echogenicity(world) * density * np.abs(amp) ** 2 * 10.0 ** (gain_db / 10.0)
    intensity = intensity + 10.0 ** (probe.noise_db / 10.0) * noise_rng.exponential(1.0, h * w)
    level = 10.0 * np.log10(intensity + 1e-9)
    grey = (level - (probe.headroom_db - probe.dynamic_range_db)) / probe.dynamic_range_db
    return np.round(255.0 * np.clip(grey, 0.0, 1.0)).astype(np.uint8).reshape(h, w)


def generate_sweep(seed: int, tactic: str, n_frames: int | None = None, frame_shape_hw=None,
                   pixel_spacing_mm: float | None = None, n_imus: int = 4) -> Sweep:
    """One validation sweep (deterministic in its arguments), as a contract `Sweep` with the truth in tforms."""
    if tactic not in TACTICS:
        raise InputError(f"generate_sweep: tactic must be one of {TACTICS}, got {tactic!r}")
    if not 0 <= int(n_imus) <= 4:
        raise InputError(f"generate_sweep: n_imus must be 0..4, got {n_imus}")
    rng_setup = _streams(seed, 1)
    n = int(n_frames) if n_frames is not None else int(rng_setup.integers(160, 241))
    if n < 2:
        raise InputError(f"generate_sweep: n_frames must be at least 2, got {n}")
    probe = draw_probe(rng_setup, frame_shape_hw, pixel_spacing_mm)
    anatomy = Anatomy(_streams(seed, 2))
    speckle = SpeckleField(_streams(seed, 3), (probe.lateral_mm, probe.axial_mm, probe.elevational_mm))
    texture = _DensityTexture(_streams(seed, 4), rng_setup.uniform(0.4, 1.2), probe.texture_shape)
    motion = generate_motion(_streams(seed, 5), tactic, n)
    h, w = probe.frame_shape_hw
    face_img = np.array([(w - 1) * probe.pixel_spacing_mm / 2.0, 0.0, 0.0])
    fine = _poses(motion, face_img)
    frame_idx = _PAD + np.arange(n) * _OVERSAMPLE
    tforms = fine[frame_idx]
    noise_rng = _streams(seed, 6)
    frames = np.stack([render_frame(p, probe, anatomy, speckle, texture, noise_rng) for p in tforms])
    attrs = {"generator": GENERATOR_VERSION, "seed": int(seed), "tactic": tactic,
             **{f"probe_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(probe).items()},
             **{f"motion_{k}": v for k, v in motion.info.items() if k != "tactic"}}
    acc = euler = pos = None
    if n_imus > 0:
        imu_rng = _streams(seed, 7)
        earth = _earth_from_world(imu_rng)
        pos = imu_positions(imu_rng, face_img[0])[:n_imus]
        acc, euler, info = simulate_imus(imu_rng, motion, fine, pos, earth)
        attrs.update(earth_from_world=earth, **info)
    return Sweep(frames=frames, pixel_spacing_xy=(probe.pixel_spacing_mm,) * 2, tforms=tforms,
                 timestamps_s=np.arange(n) / FRAME_RATE_HZ, frame_rate_hz=FRAME_RATE_HZ, imu_acc=acc,
                 imu_euler_deg=euler, imu_position_mm=pos, attrs=attrs).validate(name=f"independent sweep {seed}")
