"""MRI-TRUS registration phantom: one analytic pelvis seen by a T2-like MRI and by a 3D TRUS probe.

World space = the MRI's LPS frame (x = patient left, y = posterior, z = superior). The TRUS volume grid is
the probe frame: its voxel axes are fixed to the probe, with the probe axis along z at (x=0, y=PROBE_Y)
and the fan opening towards -y (anterior). The probe pose (probe frame -> world) is the nominal pose
(gland centre at the probe frame's origin) composed with a random rigid motion (±10 mm, ±15° by default),
so the gland's place inside the fan varies per case and the fan edge says nothing about the
misalignment. The ground truth fixed->moving transform is inv(pose).

Anatomy: an irregular gland (deformed ellipsoid with a random low-order polynomial of the direction, i.e.
low-order spherical harmonics; or a superquadric for the held-out family) with a brighter peripheral and
a darker transition zone, periprostatic fat, lateral pelvic muscle, the bladder above, the rectum around
the probe, and 3-6 small calcifications (dark on T2, bright with an acoustic shadow on TRUS) and cysts
(bright on T2, anechoic on TRUS), whose centres are the landmarks.

``PhantomConfig.randomised()`` (the training family since version 2.0) draws the appearance per case from
its own generator, so that nothing but the anatomy ties the TRUS to the MRI: TRUS echogenicity per
class independent of the MR intensities (hypo-, iso- or hyperechoic gland against the fat), interface
echoes of random strength, a capsule echo that is absent, partial or complete, a probe lying in the
rectum 1.5-8 mm behind the gland with random tilt, roll and offsets, fan angle, depth and length, a
pubic bone that shadows, attenuation with imperfect gain compensation, speckle size, MR class
intensities, bias field and noise, MR and TRUS voxel sizes, field-of-view crops, and an elastic
deformation of the anatomy seen by the TRUS (the probe's push plus a weak smooth field; the truth stays
the rigid pose). The default and held-out settings are unchanged (same seed, same case as version 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import apply_transform, invert_rigid, params_to_matrix
from ultrasound_ai.io.volume import Volume
from ultrasound_ai.registration.case import Case

REGISTRATION_SIM_VERSION = "2.0"
FAMILIES = ("ellipsoid_deformed", "superquadric")

# Tissue classes (painted in this order, later ones win).
BACKGROUND, FAT, MUSCLE, BLADDER, RECTUM_WALL, LUMEN, TZ, PZ, CALC, CYST, BONE = range(11)
N_CLASSES = 11
# T2-like MR intensities: urine and PZ bright, TZ darker, muscle and rectal wall dark, calcifications dark.
MR_INTENSITY = np.array([0.45, 0.85, 0.25, 1.0, 0.30, 0.08, 0.42, 0.72, 0.08, 0.95, 0.06], dtype=np.float32)
# TRUS echogenicity: fat hyperechoic, urine and cysts anechoic, calcifications and bone strong reflectors.
US_ECHO = np.array([0.5, 1.0, 0.3, 0.02, 0.8, 0.0, 0.28, 0.45, 2.5, 0.02, 3.0], dtype=np.float32)

PROBE_Y = 34.0  # probe axis y in the probe frame (mm); posterior of the nominal gland centre (origin)
PROBE_RADIUS = 9.0
RECTUM_WALL_RADIUS = 13.0


@dataclass
class PhantomConfig:
    """Simulator settings. Ranges are (low, high), drawn uniformly per case."""

    family: str = "ellipsoid_deformed"
    gland_semi_axes_mm: tuple = ((19.0, 25.0), (13.0, 17.0), (16.0, 21.0))  # LR, AP, SI
    deformation: tuple = (0.06, 0.16)  # largest relative radius change of the deformed ellipsoid
    superquadric_exponent: tuple = (2.8, 4.0)
    mr_spacing_xy_mm: tuple = (0.5, 0.8)
    mr_spacing_z_mm: tuple = (1.5, 3.0)
    mr_fov_mm: tuple = (80.0, 76.0, 72.0)
    us_spacing_mm: tuple = (0.65, 0.8)
    us_fov_mm: tuple = (76.0, 60.0, 66.0)  # lateral x, depth y, along the probe z
    probe_trans_mm: float = 10.0
    probe_rot_deg: float = 15.0
    fan_half_angle_deg: float = 65.0
    fan_depth_mm: float = 60.0  # from the probe axis; the far bladder wall is cut off (partial coverage)
    fan_half_length_mm: float = 30.0  # along the probe
    attenuation_db_per_mm: float = 0.08
    n_landmarks: tuple = (3, 6)
    mr_noise: float = 0.025
    surface_points: int = 1500
    randomise: bool = False  # draw the appearance, probe placement and deformation per case (_Style)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise InputError(f"phantom family: expected one of {', '.join(FAMILIES)}, got {self.family!r}")

    @classmethod
    def held_out(cls, **overrides) -> "PhantomConfig":
        """The generator setting the networks never see in training: superquadric glands, coarser MRI and
        TRUS voxels."""
        kw = dict(family="superquadric", mr_spacing_xy_mm=(0.85, 1.0), mr_spacing_z_mm=(3.0, 3.6),
                  us_spacing_mm=(0.8, 0.9))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def randomised(cls, **overrides) -> "PhantomConfig":
        """The randomised training family: wider anatomy and voxel-size ranges, appearance drawn per case."""
        kw = dict(randomise=True, gland_semi_axes_mm=((15.0, 29.0), (10.0, 20.0), (12.0, 25.0)),
                  deformation=(0.04, 0.22), mr_spacing_xy_mm=(0.45, 1.0), mr_spacing_z_mm=(1.0, 4.0),
                  us_spacing_mm=(0.5, 1.0), surface_points=1500)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def small(cls, **overrides) -> "PhantomConfig":
        """Coarse voxels for fast tests (same anatomy and geometry)."""
        kw = dict(mr_spacing_xy_mm=(1.2, 1.3), mr_spacing_z_mm=(2.5, 3.0), us_spacing_mm=(1.2, 1.3),
                  surface_points=600)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _xf(T: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to many points in float32 (the voxel grids; geometry stays float64)."""
    T = np.asarray(T, dtype=np.float32)
    return p @ T[:3, :3].T + T[:3, 3]


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def _monomials(u: np.ndarray) -> list:
    """Degree 1-3 monomials of unit directions [N, 3]: they span the real spherical harmonics l = 1..3."""
    x, y, z = u[:, 0], u[:, 1], u[:, 2]
    xx, yy, zz = x * x, y * y, z * z
    return [x, y, z, xx - yy, 2 * zz - xx - yy, x * y, x * z, y * z,
            x * y * z, xx * x, yy * y, zz * z, xx * z, yy * z, x * zz, y * zz]


def _poly(u: np.ndarray, coef: np.ndarray) -> np.ndarray:
    out = np.zeros(len(u), dtype=u.dtype)
    for c, m in zip(coef, _monomials(u)):
        out += c * m
    return out


class _Gland:
    """Star-shaped gland: inside when shape_norm(d) < 1 + delta(d / |d|), d = R^T (p - c) / semi_axes."""

    def __init__(self, rng: np.random.Generator, cfg: PhantomConfig, centre: np.ndarray):
        self.c = centre
        self.axes = np.array([rng.uniform(*r) for r in cfg.gland_semi_axes_mm])
        self.R = params_to_matrix(np.r_[0, 0, 0, rng.uniform(-8, 8, 3)])[:3, :3]  # small tilt
        self.family = cfg.family
        coef = rng.normal(size=16) * np.r_[np.ones(3) * 0.5, np.ones(5), np.ones(8) * 0.7]
        amp = rng.uniform(*cfg.deformation)
        ref = _poly(_fibonacci_sphere(2000), coef)
        self.coef = coef * (amp / np.abs(ref).max())
        self.exponent = rng.uniform(*cfg.superquadric_exponent)

    def _local(self, p):
        c, R, axes = (np.asarray(a, dtype=p.dtype) for a in (self.c, self.R, self.axes))
        return ((p - c) @ R) / axes

    def _delta(self, u):
        d = _poly(u, self.coef)
        if self.family == "superquadric":
            d = 0.4 * d  # the superquadric's boxy shape is the main difference; keep it only mildly deformed
        return d

    def _norm(self, d):
        if self.family == "superquadric":
            return (np.abs(d) ** self.exponent).sum(axis=1) ** (1.0 / self.exponent)
        return np.sqrt((d * d).sum(axis=1))

    def normalised_radius(self, p):
        """(rho, d): rho < 1 inside, 0 at the centre, 1 on the surface; d the scaled local coordinates.

        Far points (outside 1.6x the ellipsoid's box, beyond any deformation) get the plain box norm, which
        is all the fat shell and zone tests need there; this skips most of the costly evaluations."""
        d = self._local(p)
        rho = np.abs(d).max(axis=1)
        near = np.flatnonzero(rho < 1.6)
        dn = d[near]
        r2 = np.sqrt((dn * dn).sum(axis=1))
        u = dn / np.maximum(r2, 1e-9)[:, None]
        rho[near] = self._norm(dn) / (1.0 + self._delta(u))
        return rho, d

    def surface(self, n: int) -> np.ndarray:
        u = _fibonacci_sphere(n)
        t = (1.0 + self._delta(u)) / self._norm(u)
        return (u * t[:, None] * self.axes) @ self.R.T + self.c


class _Style:
    """Per-case appearance, probe placement and deformation. Fixed (version-1 behaviour) unless the
    config is randomised; then drawn from its own generator so the anatomy draws stay as they were."""

    def __init__(self, cfg: PhantomConfig, seed: int):
        self.randomised = bool(cfg.randomise)
        self.mr_intensity = MR_INTENSITY.copy()
        self.us_echo = US_ECHO.copy()
        self.edge_gain, self.capsule_gain, self.capsule_cos = 1.5, 0.0, 1.0
        self.probe_gap_mm = None  # None: the version-1 pose (gland centre at the probe frame's origin, moved)
        self.probe_radius, self.wall_radius, self.mr_lumen_radius = PROBE_RADIUS, RECTUM_WALL_RADIUS, PROBE_RADIUS
        self.fan = (cfg.fan_half_angle_deg, cfg.fan_depth_mm, cfg.fan_half_length_mm)
        self.attenuation, self.tgc = cfg.attenuation_db_per_mm, None
        self.speckle_sigma = (1.2, 0.8, 1.2)
        self.mr_bias, self.mr_noise, self.mr_fov_scale, self.mr_centre_mm = 0.25, cfg.mr_noise, 1.0, 4.0
        self.push_mm, self.reach_mm, self.warp_mm = 0.0, 15.0, 0.0
        self.n_bone = 0
        if not self.randomised:
            return
        r = np.random.default_rng([int(seed), 7007])
        self.rng = r
        self.mr_intensity = (MR_INTENSITY * r.uniform(0.75, 1.25, N_CLASSES)).astype(np.float32)
        fat = r.uniform(0.5, 1.4)
        gland = fat * r.choice([r.uniform(0.2, 0.6), r.uniform(0.6, 1.1), r.uniform(1.1, 1.6)])  # hypo/iso/hyper
        echo = US_ECHO * r.uniform(0.6, 1.5, N_CLASSES)
        echo[FAT] = fat
        echo[PZ] = gland * r.uniform(0.8, 1.3)
        echo[TZ] = gland * r.uniform(0.6, 1.1)
        self.us_echo = echo.astype(np.float32)
        self.edge_gain = r.uniform(0.0, 1.8)
        kind = r.integers(3)  # capsule echo: absent, partial, complete
        self.capsule_gain = 0.0 if kind == 0 else r.uniform(0.2, 1.0)
        self.capsule_cos = r.uniform(-0.5, 0.6) if kind == 1 else -1.0
        self.capsule_dir = r.normal(size=3)
        self.capsule_dir /= np.linalg.norm(self.capsule_dir)
        self.probe_gap_mm = r.uniform(1.5, 8.0)
        self.probe_radius = r.uniform(7.0, 10.5)
        self.wall_radius = self.probe_radius + r.uniform(2.0, 4.0)
        self.mr_lumen_radius = r.uniform(3.0, 7.0)  # the MRI has no probe: a collapsed rectum
        self.probe_angles = np.r_[r.uniform(-20, 20), r.uniform(-8, 8), r.uniform(-15, 15)]  # tilt, yaw, roll
        self.probe_offsets = np.r_[r.uniform(-6, 6), r.uniform(-10, 10)]  # lateral, along the probe
        self.fan = (r.uniform(50, 80), r.uniform(42, 70), r.uniform(20, 33))
        self.attenuation = r.uniform(0.03, 0.15)
        self.tgc = r.uniform(0.4, 1.2)  # fraction of the attenuation the gain curve compensates
        self.speckle_sigma = tuple(r.uniform(0.5, 2.0, 3))
        self.mr_bias, self.mr_noise = r.uniform(0.1, 0.5), r.uniform(0.01, 0.05)
        self.mr_fov_scale, self.mr_centre_mm = r.uniform(0.75, 1.15), 10.0
        self.push_mm, self.reach_mm, self.warp_mm = r.uniform(0.0, 3.5), r.uniform(10, 22), r.uniform(0.0, 1.2)
        self.warp_k = r.normal(size=(3, 3, 3)) * 0.06
        self.warp_phase = r.uniform(0, 2 * np.pi, (3, 3))
        self.n_bone = int(r.integers(0, 5))
        self.us_texture_k = r.normal(size=(3, 3)) * 0.15  # TRUS echotexture: its own field, not the MR's
        self.us_texture_phase = r.uniform(0, 2 * np.pi, 3)


class _Anatomy:
    def __init__(self, rng: np.random.Generator, cfg: PhantomConfig, style: _Style | None = None):
        self.cfg = cfg
        self.style = style = style or _Style(cfg, 0)
        centre = rng.uniform(-3, 3, 3)
        self.gland = _Gland(rng, cfg, centre)
        # Probe pose: nominal (gland centre at the probe-frame origin) then a random rigid motion about it.
        motion = params_to_matrix(np.r_[rng.uniform(-cfg.probe_trans_mm, cfg.probe_trans_mm, 3),
                                        rng.uniform(-cfg.probe_rot_deg, cfg.probe_rot_deg, 3)])
        nominal = np.eye(4)
        nominal[:3, 3] = centre
        self.pose = nominal @ motion  # probe frame -> world
        if style.probe_gap_mm is not None:
            self.pose = self._pose_in_rectum(style)
        self.world_to_probe = invert_rigid(self.pose)
        ax = self.gland.axes
        self.bladder_c = centre + np.array([0.0, rng.uniform(-8, -2), ax[2] + rng.uniform(14, 20)])
        self.bladder_axes = np.array([rng.uniform(26, 34), rng.uniform(20, 26), rng.uniform(15, 20)])
        self.muscle_x = ax[0] + rng.uniform(9, 14)
        self.fat_shell = rng.uniform(1.25, 1.4)
        # Landmarks: small calcifications and cysts well inside the gland.
        n = int(rng.integers(cfg.n_landmarks[0], cfg.n_landmarks[1] + 1))
        pts = []
        while len(pts) < n:
            d = rng.uniform(-0.6, 0.6, 3)
            if np.linalg.norm(d) > 0.6:
                continue
            p = (d * ax) @ self.gland.R.T + centre
            if all(np.linalg.norm(p - q) > 7.0 for q in pts):
                pts.append(p)
        self.landmarks = np.array(pts)
        self.kinds = np.where(rng.random(n) < 0.5, CALC, CYST)
        self.kinds[0] = CALC  # at least one shadowing reflector
        self.radii = np.where(self.kinds == CALC, rng.uniform(1.2, 1.8, n), rng.uniform(1.8, 2.6, n))
        self.texture_k = rng.normal(size=(3, 3)) * 0.12  # smooth tissue texture wave vectors (rad/mm)
        self.texture_phase = rng.uniform(0, 2 * np.pi, 3)
        # Pubic bone (randomised family): a chain of spheres anterior to the gland; it shadows the far field.
        r = getattr(style, "rng", None)
        self.bones = [] if r is None else [
            (centre + np.r_[x, -(ax[1] + r.uniform(12, 24)), r.uniform(-2, 14)], r.uniform(4.0, 7.0))
            for x in np.linspace(-22, 22, style.n_bone)]

    def _pose_in_rectum(self, style: _Style) -> np.ndarray:
        """Probe frame -> world with the probe axis behind the gland: its surface style.probe_gap_mm from
        the gland's posterior boundary, then tilted, turned and rolled about its axis point."""
        c = self.gland.c
        ys = np.arange(0.0, 60.0, 0.2)
        line = np.stack([np.full_like(ys, c[0]), c[1] + ys, np.full_like(ys, c[2])], axis=1)
        inside = self.gland.normalised_radius(line)[0] < 1.0
        back = c[1] + ys[np.flatnonzero(inside)[-1]] if inside.any() else c[1]
        axis_world = np.array([c[0] + style.probe_offsets[0], back + style.probe_gap_mm + style.probe_radius,
                               c[2] + style.probe_offsets[1]])
        tilt, yaw, roll = style.probe_angles
        R = params_to_matrix(np.r_[0, 0, 0, tilt, yaw, 0])[:3, :3] @ params_to_matrix(np.r_[0, 0, 0, 0, 0, roll])[:3, :3]
        pose = np.eye(4)
        pose[:3, :3] = R
        pose[:3, 3] = axis_world - R @ np.array([0.0, PROBE_Y, 0.0])
        return pose

    def displacement(self, p_world: np.ndarray) -> np.ndarray:
        """World displacement (mm) of the tissue under the probe: a push away from the probe near its
        contact plus a weak smooth field (zero for the fixed style)."""
        st = self.style
        out = np.zeros_like(p_world)
        if st.push_mm == 0 and st.warp_mm == 0:
            return out
        contact = _xf(self.pose, np.array([[0.0, PROBE_Y - st.probe_radius, 0.0]], dtype=np.float32))[0]
        away = (self.pose[:3, :3] @ np.array([0.0, -1.0, 0.0])).astype(np.float32)
        d = p_world - contact
        w = np.exp(-(d * d).sum(axis=1) / np.float32(2 * st.reach_mm ** 2))
        out += (st.push_mm * w)[:, None] * away[None]
        for i in range(3):
            for k, ph in zip(st.warp_k[i].astype(np.float32), st.warp_phase[i]):
                out[:, i] += np.float32(st.warp_mm / 3) * np.sin(p_world @ k + np.float32(ph))
        return out

    def classes(self, p_world: np.ndarray, us: bool = True):
        """Tissue class per world point [N, 3] -> (uint8 [N], gland mask [N], normalised gland radius [N]).
        us=False: the MRI's view (the rectum without the probe)."""
        g = self.gland
        rho, d = g.normalised_radius(p_world)
        cls = np.full(len(p_world), BACKGROUND, dtype=np.uint8)
        cls[rho < self.fat_shell] = FAT
        cls[np.abs(p_world[:, 0] - g.c[0]) > self.muscle_x] = MUSCLE
        b = (p_world - self.bladder_c.astype(np.float32)) / self.bladder_axes.astype(np.float32)
        bl = (b * b).sum(axis=1) < 1.0
        cls[bl] = BLADDER
        q = _xf(self.world_to_probe, p_world)
        r_axis = np.hypot(q[:, 0], q[:, 1] - PROBE_Y)
        st = self.style
        cls[r_axis < (st.wall_radius if us else max(st.wall_radius - st.probe_radius + st.mr_lumen_radius,
                                                      st.mr_lumen_radius))] = RECTUM_WALL
        inside = rho < 1.0
        # Peripheral zone: the outer, posterior part of the gland.
        pz = inside & (rho > 0.62) & (d[:, 1] > -0.3)
        cls[inside] = TZ
        cls[pz] = PZ
        cls[r_axis < (st.probe_radius if us else st.mr_lumen_radius)] = LUMEN
        for c, kind, rad in zip(self.landmarks, self.kinds, self.radii):
            e = p_world - c.astype(np.float32)
            cls[(e * e).sum(axis=1) < rad * rad] = kind
        for c, rad in self.bones:
            e = p_world - c.astype(np.float32)
            cls[(e * e).sum(axis=1) < rad * rad] = BONE
        return cls, inside, rho

    def texture(self, p_world, us: bool = False):
        t = np.zeros(len(p_world), dtype=np.float32)
        ks, phs = self.texture_k, self.texture_phase
        if us and self.style.randomised:
            ks, phs = self.style.us_texture_k, self.style.us_texture_phase
        for k, ph in zip(ks.astype(np.float32), phs):
            t += np.sin(p_world @ k + np.float32(ph))
        return t / len(self.texture_k)


def _grid(spacing, fov, centre):
    size = np.maximum(np.round(np.asarray(fov) / spacing).astype(int), 4)
    origin = np.asarray(centre) - 0.5 * (size - 1) * spacing
    return size, origin


def _points_of(size_ijk, spacing, origin):
    i, j, k = size_ijk
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(np.float32)
    return ijk * spacing.astype(np.float32) + origin.astype(np.float32)


def _simulate_mr(anat: _Anatomy, rng, cfg: PhantomConfig):
    st = anat.style
    sxy = rng.uniform(*cfg.mr_spacing_xy_mm)
    spacing = np.array([sxy, sxy, rng.uniform(*cfg.mr_spacing_z_mm)])
    size, origin = _grid(spacing, np.asarray(cfg.mr_fov_mm) * st.mr_fov_scale,
                         rng.uniform(-st.mr_centre_mm, st.mr_centre_mm, 3))
    pts = _points_of(size, spacing, origin)
    cls, inside, _ = anat.classes(pts, us=False)
    shape = (size[2], size[1], size[0])
    img = st.mr_intensity[cls] * (1.0 + 0.08 * anat.texture(pts)).astype(np.float32)
    img = img.reshape(shape)
    # Slice profile / in-plane blur (partial volume), in voxels.
    img = ndimage.gaussian_filter(img, sigma=(0.35, 0.6, 0.6))
    # Smooth multiplicative bias field (receive-coil sensitivity).
    u = (pts - pts.mean(axis=0)) / (np.ptp(pts, axis=0) + 1e-9)
    a = rng.uniform(-st.mr_bias, st.mr_bias, 6)
    bias = np.exp(a[0] * u[:, 0] + a[1] * u[:, 1] + a[2] * u[:, 2] + a[3] * u[:, 0] * u[:, 1]
                  + a[4] * u[:, 1] ** 2 + a[5] * u[:, 2] ** 2).reshape(shape)
    img = img * bias
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
    s = st.mr_noise
    img = np.sqrt((img + rng.normal(0, s, shape)) ** 2 + rng.normal(0, s, shape) ** 2)
    vol = Volume((img * 1000).astype(np.float32), spacing, origin, np.eye(3))
    label = vol.with_array(inside.reshape(shape).astype(np.uint8))
    return vol, label


def _simulate_us(anat: _Anatomy, rng, cfg: PhantomConfig):
    st = anat.style
    fan_half_angle, fan_depth, fan_half_length = st.fan
    s = rng.uniform(*cfg.us_spacing_mm)
    spacing = np.array([s, s, s * rng.uniform(0.95, 1.1)])
    fov = np.asarray(cfg.us_fov_mm, dtype=float)
    centre = np.array([0.0, PROBE_Y - 0.5 * fov[1], 0.0])  # the grid ends at the probe axis (depth 0)
    size, origin = _grid(spacing, fov, centre)
    q = _points_of(size, spacing, origin)  # probe-frame points
    p_world = _xf(anat.pose, q)
    p_world = p_world - anat.displacement(p_world)  # the tissue now at p came from p - u(p) (small field)
    cls, inside, rho = anat.classes(p_world)
    shape = (size[2], size[1], size[0])
    echo = st.us_echo[cls] * (1.0 + 0.15 * anat.texture(p_world, us=True)).astype(np.float32)
    if st.capsule_gain > 0:  # a thin echo at the gland boundary, over all or part of it
        rim = (rho > 0.94) & (rho < 1.04)
        u = p_world[rim] - anat.gland.c.astype(np.float32)
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-6)
        echo[np.flatnonzero(rim)[u @ st.capsule_dir.astype(np.float32) > st.capsule_cos]] += st.capsule_gain
    echo = echo.reshape(shape)
    # Specular reflection at tissue interfaces (capsule, bladder wall): gradient of the smooth echo map.
    smooth = ndimage.gaussian_filter(np.minimum(echo, 1.0), 1.0)
    edges = np.sqrt(sum(g ** 2 for g in np.gradient(smooth)))
    echo = echo + st.edge_gain * edges
    # Correlated multiplicative speckle: Rayleigh amplitude of low-pass filtered complex Gaussian noise.
    sig = st.speckle_sigma
    re = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sig)
    im = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sig)
    speckle = np.hypot(re, im)
    speckle /= speckle.mean()
    # Fan geometry in the probe frame (polar about the probe axis).
    dx, dy = q[:, 0], PROBE_Y - q[:, 1]
    r = np.hypot(dx, dy)
    angle = np.degrees(np.arctan2(np.abs(dx), dy))
    fan = (r >= st.probe_radius) & (r <= fan_depth) & (angle <= fan_half_angle) \
        & (np.abs(q[:, 2]) <= fan_half_length)
    depth = np.maximum(r - st.probe_radius, 0.0)
    if st.tgc is None:
        gain = 10 ** (-st.attenuation * depth / 20.0) * (1.0 + 0.012 * depth)  # attenuation, partly TGC-compensated
    else:
        gain = 10 ** (-(1.0 - st.tgc) * st.attenuation * depth / 20.0)
    # Acoustic shadows behind calcifications: points whose ray from the probe axis passes through one.
    shadow = np.ones(len(q))
    blockers = [(c, r_) for c, k, r_ in zip(anat.landmarks, anat.kinds, anat.radii) if k == CALC] + list(anat.bones)
    for c_w, rad in blockers:
        c = apply_transform(anat.world_to_probe, c_w)
        cin = np.array([c[0], PROBE_Y - c[1]])  # calcification in the (x, depth) plane of its slice
        ux, uy = dx / np.maximum(r, 1e-9), dy / np.maximum(r, 1e-9)
        along = ux * cin[0] + uy * cin[1]
        perp = np.abs(ux * cin[1] - uy * cin[0])
        hit = (np.hypot(perp, q[:, 2] - c[2]) < rad) & (along > 0) & (r > along + rad)
        shadow[hit] *= 0.12
    amp = echo.ravel() * speckle.ravel() * gain * shadow
    img = np.log1p(4.0 * amp) / np.log1p(4.0 * 3.0)  # log compression
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) * fan
    vol = Volume(np.round(img * 255).astype(np.uint8).reshape(shape), spacing, origin, np.eye(3))
    label = vol.with_array(inside.reshape(shape).astype(np.uint8))
    return vol, label, fan.reshape(shape)


def simulate_case(seed: int, config: PhantomConfig | None = None, name: str | None = None) -> Case:
    """Simulate one MRI-TRUS case (same seed and config, same case)."""
    cfg = config or PhantomConfig()
    if not isinstance(cfg, PhantomConfig):
        raise InputError(f"config: expected a PhantomConfig, got {type(cfg).__name__}")
    rng = np.random.default_rng([int(seed), 6006])
    anat = _Anatomy(rng, cfg, _Style(cfg, seed))
    mr, mr_label = _simulate_mr(anat, rng, cfg)
    us, us_label, fan = _simulate_us(anat, rng, cfg)
    truth = anat.world_to_probe
    surface = anat.gland.surface(cfg.surface_points)
    attrs = {
        "simulator": "ultrasound_ai.registration.phantom",
        "registration_sim_version": REGISTRATION_SIM_VERSION,
        "seed": int(seed),
        "family": cfg.family,
        "config": cfg.to_dict(),
        "landmark_kinds": ["calcification" if k == CALC else "cyst" for k in anat.kinds],
        "gland_fan_coverage": float(us_label.array[fan].sum() / max(us_label.array.sum(), 1)),
    }
    return Case(
        fixed=mr, fixed_label=mr_label, moving=us, moving_label=us_label, surface_fixed=surface,
        landmarks_fixed=anat.landmarks,
        landmarks_moving=apply_transform(truth, anat.landmarks + anat.displacement(anat.landmarks.astype(np.float32))),
        truth_fixed_to_moving=truth, name=name or f"sim_{int(seed):05d}", attrs=attrs,
    )
