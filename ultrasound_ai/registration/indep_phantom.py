"""Independent MRI-TRUS validation phantom: a second pelvis model, written separately from ``phantom.py``.

This generator exists only to check the registration methods on cases made differently from the ones
they were trained on. It imports nothing from the training phantom (a test checks its imports): its own
anatomy, its own MR contrast model, its own ultrasound formation model and its own geometry helpers.
Nothing here is ever used for training or model selection.

World = the MRI's LPS frame (x left, y posterior, z superior), mm.

Anatomy (``_Pelvis``): a gland whose radius is an ellipsoid modulated by a tapered apex, a flattened
posterior face and a few smooth bumps on the sphere; a transition zone around a curved urethra with BPH
nodules, an anterior fibromuscular band, a thin capsule; periprostatic fat of varying thickness,
obturator muscles, levator ani, the pubic arch (cortex and marrow), the bladder, two seminal vesicles,
the rectum, calcifications (landmarks).

MRI: T2-like class intensities drawn per case, smooth zone textures, thick slices (3 sub-slices averaged),
a small oblique tilt of the slice stack, a multiplicative bias field, Rician noise.

TRUS: a side-fire probe in the rectum (the MRI has a collapsed rectum; the probe distends it), its
surface 2-5 mm behind the gland. The echo signal is formed on the probe's polar grid (range, angle about
the probe axis, position along it): per-class backscatter drawn per case independently of the MR
intensities, scatterers convolved with a range/lateral/elevation PSF, interface reflections along the
beam, attenuation integrated along each ray (calcifications and bone cast shadows, urine enhances),
imperfect time-gain compensation, a reverberation of the rectal wall, electronic noise, log compression;
then scan-converted to a Cartesian grid in the probe frame at 0.55-0.75 mm. The anatomy the probe sees
is elastically deformed (the probe pushes the gland anteriorly; a weak random field on top): the
ground truth is the rigid probe pose, and the surface points for SRE are the undeformed MR gland's.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ultrasound_ai.io.volume import Volume
from ultrasound_ai.registration.case import Case

INDEP_SIM_VERSION = "1.0"
GENERATOR = "ultrasound_ai.registration.indep_phantom"

# Class indices of this phantom (its own list; painted in this order, later wins).
(SOFT, FAT, OBTURATOR, LEVATOR, MARROW, CORTEX, BLADDER, VESICLE, RECT_WALL, RECT_LUMEN,
 PZ, TZ, AFMS, CAPSULE, NODULE, URETHRA, CALCIF, PROBE) = range(18)
N_CLASS = 18


# ----------------------------------------------------------------------------------------- geometry

def _rot(axis, angle_rad: float) -> np.ndarray:
    """Rotation matrix about a unit axis (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1 - np.cos(angle_rad)) * K @ K


def _homog(R, t) -> np.ndarray:
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = t
    return M


def _inv(M) -> np.ndarray:
    R, t = M[:3, :3], M[:3, 3]
    return _homog(R.T, -R.T @ t)


def _map(M, p) -> np.ndarray:
    M = np.asarray(M)
    return p @ M[:3, :3].T.astype(p.dtype) + M[:3, 3].astype(p.dtype)


def _unit_directions(n: int, rng=None) -> np.ndarray:
    """n unit vectors spread over the sphere: a regular latitude-longitude spiral."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    lon = k * 2.399963229728653  # golden angle
    s = np.sqrt(1 - z * z)
    return np.stack([s * np.cos(lon), s * np.sin(lon), z], axis=1)


class _SmoothField:
    """A smooth random scalar field (sum of random cosines), unit-ish amplitude."""

    def __init__(self, rng, n: int, k_lo: float, k_hi: float):
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.k = (dirs * rng.uniform(k_lo, k_hi, (n, 1))).astype(np.float32)
        self.ph = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        self.n = n

    def __call__(self, p):
        out = np.zeros(len(p), dtype=np.float32)
        for k, ph in zip(self.k, self.ph):
            out += np.cos(p @ k + ph)
        return out * np.float32(np.sqrt(2.0 / self.n))


# ------------------------------------------------------------------------------------------ anatomy

class _Gland:
    """Radius function r(u) on local unit directions u: ellipsoid x (apex taper) x (posterior flattening)
    x (1 + smooth bumps). Local frame: rows of self.R are the gland's LR, AP, SI axes in world."""

    def __init__(self, rng, centre):
        self.c = np.asarray(centre, dtype=np.float64)
        self.semi = np.array([rng.uniform(18, 26), rng.uniform(12, 18), rng.uniform(14, 22)])  # LR, AP, SI
        self.R = _rot([1, 0, 0], np.radians(rng.uniform(-12, 12))) @ _rot([0, 0, 1], np.radians(rng.uniform(-6, 6)))
        self.taper = rng.uniform(0.15, 0.35)  # apex (inferior) narrower than the base
        self.flat = rng.uniform(0.1, 0.25)  # the rectal face is flatter
        nb = int(rng.integers(3, 7))
        b = rng.normal(size=(nb, 3))
        self.bump_dir = b / np.linalg.norm(b, axis=1, keepdims=True)
        self.bump_amp = rng.uniform(-0.09, 0.09, nb)
        self.bump_kappa = rng.uniform(3.0, 8.0, nb)

    def local(self, p):
        return (p - self.c.astype(p.dtype)) @ self.R.astype(p.dtype)

    def radius(self, u):
        """Radius (mm) along local unit directions u [N, 3]."""
        e = 1.0 / np.sqrt((u[:, 0] / self.semi[0]) ** 2 + (u[:, 1] / self.semi[1]) ** 2 + (u[:, 2] / self.semi[2]) ** 2)
        taper = 1.0 - self.taper * np.clip(-u[:, 2], 0, None) ** 1.5 * (1 - np.abs(u[:, 1]))
        flat = 1.0 - self.flat * np.clip(u[:, 1], 0, None) ** 2
        bumps = np.ones(len(u))
        for d, a, k in zip(self.bump_dir, self.bump_amp, self.bump_kappa):
            bumps += a * np.exp(k * (u @ d - 1.0))
        return (e * taper * flat * bumps).astype(u.dtype)

    def rho(self, p):
        """|p - c| / r(direction): < 1 inside. Also the local coordinates."""
        q = self.local(p)
        n = np.sqrt((q * q).sum(axis=1))
        u = np.where(n[:, None] > 1e-6, q / np.maximum(n, 1e-6)[:, None], np.float32(1 / np.sqrt(3)))
        return n / self.radius(u), q

    def surface(self, n: int) -> np.ndarray:
        u = _unit_directions(n)
        return (u * self.radius(u)[:, None]) @ self.R.T + self.c


class _Pelvis:
    def __init__(self, rng):
        g = self.gland = _Gland(rng, rng.uniform(-5, 5, 3))
        c, s = g.c, g.semi
        ax = g.R  # columns: world directions of the local LR, AP, SI axes
        # Transition zone: an ellipsoid around the urethra, anterior-superior; BPH makes it large.
        self.tz_frac = rng.uniform(0.35, 0.7)
        self.tz_c = np.array([0.0, -0.15 * s[1], 0.1 * s[2]])
        self.urethra_bend = rng.uniform(0.005, 0.02)
        self.urethra_r = rng.uniform(2.0, 3.5)
        nn = int(rng.integers(2, 6))
        self.nodules = [(self.tz_c + rng.uniform(-0.5, 0.5, 3) * self.tz_frac * s, rng.uniform(3, 7)) for _ in range(nn)]
        self.nodule_mr = rng.uniform(0.2, 0.65, nn)
        self.nodule_us = rng.uniform(0.4, 1.6, nn)
        # Calcifications (landmarks): inside the gland, mostly around the urethra and in the TZ/PZ border.
        nc = int(rng.integers(2, 6))
        pts = []
        while len(pts) < nc:
            d = rng.uniform(-0.55, 0.55, 3) * s
            if np.linalg.norm(d / s) < 0.6 and all(np.linalg.norm(d - q) > 6 for q in pts):
                pts.append(d)
        self.calc_local = np.array(pts)
        self.calc_r = rng.uniform(0.9, 1.8, nc)
        self.calc_world = self.calc_local @ ax.T + c
        self.fat_thick = rng.uniform(2.0, 6.0)
        self.fat_var = _SmoothField(rng, 4, 0.05, 0.15)
        self.capsule_mm = rng.uniform(0.6, 1.2)
        # Surroundings in world coordinates.
        self.bladder_c = c + ax @ np.array([rng.uniform(-4, 4), rng.uniform(-10, -2), s[2] + rng.uniform(12, 22)])
        self.bladder_semi = np.array([rng.uniform(25, 40), rng.uniform(18, 28), rng.uniform(14, 24)])
        self.sv = []
        for side in (-1, 1):
            cc = c + ax @ np.array([side * rng.uniform(12, 20), s[1] + rng.uniform(0, 6), s[2] + rng.uniform(2, 8)])
            R = _rot([0, 1, 0], side * np.radians(rng.uniform(25, 45)))
            self.sv.append((cc, R, np.array([rng.uniform(12, 18), rng.uniform(3, 5), rng.uniform(4, 7)])))
        self.obt_x = s[0] + rng.uniform(12, 20)
        self.lev_r = s[0] + rng.uniform(4, 9)
        # Pubic arch: a curved bar of bone anterior to the gland.
        self.pubis_y = c[1] - s[1] - rng.uniform(14, 24)
        self.pubis_half_w = rng.uniform(18, 28)
        self.pubis_thick = rng.uniform(6, 9)
        self.pubis_z = (c[2] - rng.uniform(0, 10), c[2] + rng.uniform(15, 30))
        # Rectum: along a line behind the gland, tilted anteriorly from below (the probe's path).
        tilt = np.radians(rng.uniform(8, 28))
        self.rect_dir = _rot([1, 0, 0], -tilt) @ np.array([0.0, 0.0, 1.0])
        self.rect_dir /= np.linalg.norm(self.rect_dir)
        self.probe_r = rng.uniform(7.5, 10.0)
        self.wall = rng.uniform(2.0, 5.0)  # rectal wall + fat between the probe surface and the gland
        back = self._posterior_extent(c)  # y of the gland's posterior surface below the centre
        self.rect_point = np.array([c[0] + rng.uniform(-4, 4), back + self.wall + self.probe_r, c[2]])
        self.mr_rect_r = rng.uniform(4.0, 7.0)  # collapsed rectum on the MRI (no probe)
        self.tex_pz = _SmoothField(rng, 6, 0.3, 0.9)
        self.tex_tz = _SmoothField(rng, 6, 0.15, 0.5)
        self.tex_soft = _SmoothField(rng, 5, 0.1, 0.4)

    def _posterior_extent(self, c):
        ys = c[1] + np.arange(0, 60, 0.25)
        p = np.stack([np.full_like(ys, c[0]), ys, np.full_like(ys, c[2])], axis=1)
        inside = self.gland.rho(p)[0] < 1.0
        return float(ys[np.flatnonzero(inside)[-1]])

    def axis_distance(self, p, point, direction):
        d = p - point.astype(p.dtype)
        along = d @ direction.astype(p.dtype)
        perp = d - along[:, None] * direction.astype(p.dtype)
        return np.sqrt((perp * perp).sum(axis=1)), along

    def classes(self, p, probe: bool):
        """Class per world point; with probe=True the rectum holds the TRUS probe (distended)."""
        g = self.gland
        rho, q = g.rho(p)
        s = g.semi.astype(p.dtype)
        cls = np.full(len(p), SOFT, dtype=np.uint8)
        # Periprostatic fat: a shell of varying thickness around the gland.
        r_here = np.sqrt((q * q).sum(axis=1)) / np.maximum(rho, 1e-6)
        fat = rho < 1.0 + (self.fat_thick * (1 + 0.4 * self.fat_var(p))) / np.maximum(r_here, 1.0)
        cls[fat] = FAT
        x_rel = np.abs(p[:, 0] - np.float32(g.c[0]))
        cls[x_rel > self.obt_x] = OBTURATOR
        lev = (np.hypot(q[:, 0], q[:, 1] - 0.3 * s[1]) - self.lev_r)
        cls[(np.abs(lev) < 3.0) & (q[:, 1] > -0.2 * s[1]) & (q[:, 2] < 0.3 * s[2])] = LEVATOR
        # Pubic arch (bone): marrow inside a cortex shell.
        pz_in = (p[:, 2] > self.pubis_z[0]) & (p[:, 2] < self.pubis_z[1])
        curve = self.pubis_y + 0.012 * (p[:, 0] - np.float32(g.c[0])) ** 2
        dy = curve - p[:, 1]
        bone = pz_in & (dy > 0) & (dy < self.pubis_thick) & (x_rel < self.pubis_half_w + 15)
        cls[bone] = CORTEX
        marrow = bone & (dy > 1.5) & (dy < self.pubis_thick - 1.5) & (p[:, 2] > self.pubis_z[0] + 1.5) \
            & (p[:, 2] < self.pubis_z[1] - 1.5)
        cls[marrow] = MARROW
        b = (p - self.bladder_c.astype(p.dtype)) / self.bladder_semi.astype(p.dtype)
        cls[(b * b).sum(axis=1) < 1] = BLADDER
        for cc, R, semi in self.sv:
            e = ((p - cc.astype(p.dtype)) @ R.astype(p.dtype)) / semi.astype(p.dtype)
            cls[(e * e).sum(axis=1) < 1] = VESICLE
        r_axis, _ = self.axis_distance(p, self.rect_point, self.rect_dir)
        lumen_r = self.probe_r if probe else self.mr_rect_r
        cls[r_axis < lumen_r + 3.0] = RECT_WALL
        cls[r_axis < lumen_r] = PROBE if probe else RECT_LUMEN
        # Gland and its zones (drawn over the surroundings it displaces).
        inside = rho < 1.0
        cls[inside & (rho > 1.0 - self.capsule_mm / np.maximum(r_here, 1.0))] = CAPSULE
        core = inside & (rho <= 1.0 - self.capsule_mm / np.maximum(r_here, 1.0))
        cls[core] = PZ
        t = (q - self.tz_c.astype(p.dtype)) / (self.tz_frac * s)
        tz = core & ((t * t).sum(axis=1) < 1)
        cls[tz] = TZ
        cls[core & (q[:, 1] < -0.55 * s[1]) & (np.abs(q[:, 0]) < 0.5 * s[0])] = AFMS
        self._nodule_index = np.full(len(p), -1, dtype=np.int16)
        for i, (nc, nr) in enumerate(self.nodules):
            e = q - nc.astype(p.dtype)
            hit = tz & ((e * e).sum(axis=1) < nr * nr)
            cls[hit] = NODULE
            self._nodule_index[hit] = i
        ux = q[:, 0]
        uy = q[:, 1] - (-0.2 * s[1] + self.urethra_bend * q[:, 2] ** 2)
        cls[core & (np.hypot(ux, uy) < self.urethra_r)] = URETHRA
        for cc, r in zip(self.calc_local, self.calc_r):
            e = q - cc.astype(p.dtype)
            cls[(e * e).sum(axis=1) < r * r] = CALCIF
        return cls, inside


# -------------------------------------------------------------------------------------------- MRI

def _mri(pelvis: _Pelvis, rng, coarse: float = 1.0):
    # T2-like means drawn per case: fluid and PZ bright, TZ and muscle dark, bone cortex and gas black.
    mean = np.zeros(N_CLASS, dtype=np.float32)
    mean[[SOFT, FAT, OBTURATOR, LEVATOR, MARROW, CORTEX, BLADDER, VESICLE, RECT_WALL, RECT_LUMEN]] = [
        rng.uniform(0.35, 0.5), rng.uniform(0.75, 0.95), rng.uniform(0.18, 0.3), rng.uniform(0.15, 0.28),
        rng.uniform(0.5, 0.7), 0.04, rng.uniform(0.9, 1.0), rng.uniform(0.75, 0.95), rng.uniform(0.2, 0.3), 0.03]
    mean[[PZ, TZ, AFMS, CAPSULE, NODULE, URETHRA, CALCIF]] = [
        rng.uniform(0.55, 0.85), rng.uniform(0.3, 0.48), rng.uniform(0.12, 0.22), rng.uniform(0.12, 0.25), 0.0,
        rng.uniform(0.5, 0.8), 0.05]
    in_plane = rng.uniform(0.6, 0.9)
    slice_mm = rng.uniform(2.8, 3.6)
    spacing = np.array([in_plane, in_plane, slice_mm]) * coarse
    size = np.array([int(round(rng.uniform(95, 110) / spacing[0])), int(round(rng.uniform(95, 110) / spacing[1])),
                     int(round(rng.uniform(80, 95) / spacing[2]))])
    direction = _rot([1, 0, 0], np.radians(rng.uniform(-8, 8))) @ _rot([0, 1, 0], np.radians(rng.uniform(-4, 4)))
    centre = pelvis.gland.c + rng.uniform(-8, 8, 3)
    origin = centre - direction @ (0.5 * (size - 1) * spacing)
    # Thick slices: three sub-slices per slice, averaged (partial volume across the slice).
    kk, jj, ii = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(np.float32)
    shape = (size[2], size[1], size[0])
    img = np.zeros(shape, dtype=np.float32)
    label = None
    for sub in (-1 / 3, 0.0, 1 / 3):
        pts = (ijk + np.float32([0, 0, sub])) * spacing.astype(np.float32)
        p = pts @ direction.T.astype(np.float32) + origin.astype(np.float32)
        cls, inside = pelvis.classes(p, probe=False)
        v = mean[cls]
        nod = cls == NODULE
        v[nod] = pelvis.nodule_mr[pelvis._nodule_index[nod]]
        pzm, tzm = cls == PZ, (cls == TZ) | nod
        v[pzm] *= 1 + 0.12 * pelvis.tex_pz(p[pzm])
        v[tzm] *= 1 + 0.18 * pelvis.tex_tz(p[tzm])
        soft = (cls == SOFT) | (cls == FAT)
        v[soft] *= 1 + 0.08 * pelvis.tex_soft(p[soft])
        img += v.reshape(shape) / 3
        if sub == 0.0:
            label = inside.reshape(shape).astype(np.uint8)
    img = ndimage.gaussian_filter(img, sigma=(0.0, 0.5, 0.5))
    # Receive-coil bias: a smooth multiplicative field, stronger posteriorly (endorectal/pelvic coil).
    u = ijk / np.maximum(size - 1, 1).astype(np.float32) - 0.5
    c = rng.uniform(-0.4, 0.4, 7)
    bias = np.exp(c[0] * u[:, 0] + c[1] * u[:, 1] + c[2] * u[:, 2] + c[3] * u[:, 0] ** 2 + c[4] * u[:, 1] ** 2
                  + c[5] * u[:, 1] * u[:, 2] + c[6] * u[:, 2] ** 2).reshape(shape)
    img = img * bias.astype(np.float32)
    sigma = rng.uniform(0.015, 0.04)
    img = np.hypot(img + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))  # Rician magnitude
    scale = rng.uniform(300, 2000)  # scanner units are arbitrary
    vol = Volume((img * scale).astype(np.float32), spacing, origin, direction)
    return vol, vol.with_array(label)


# ------------------------------------------------------------------------------------------- TRUS

class _Probe:
    """Probe frame: origin on the probe axis level with the gland centre, z along the axis (towards the
    bladder), y from the axis towards the gland, x = y x z. pose: probe frame -> world."""

    def __init__(self, pelvis: _Pelvis, rng):
        z = pelvis.rect_dir
        towards = pelvis.gland.c - pelvis.rect_point
        y = towards - (towards @ z) * z
        y /= np.linalg.norm(y)
        roll = np.radians(rng.uniform(-12, 12))  # the sonographer's rotation about the probe axis
        y = _rot(z, roll) @ y
        x = np.cross(y, z)
        self.pose = _homog(np.stack([x, y, z], axis=1), pelvis.rect_point + z * rng.uniform(-6, 6))
        self.radius = pelvis.probe_r
        self.depth = rng.uniform(50, 65)  # max range from the axis
        self.half_angle = np.radians(rng.uniform(62, 80))
        self.half_len = rng.uniform(24, 30)


def _deformation(pelvis: _Pelvis, probe: _Probe, rng):
    """World displacement field (mm) of the anatomy under the probe: a push away from the probe near its
    contact, plus a weak smooth random field. Returns f(points) -> displacement."""
    push = rng.uniform(1.0, 3.0)
    reach = rng.uniform(12, 20)
    contact = probe.pose[:3, 3] + probe.pose[:3, 1] * probe.radius
    away = probe.pose[:3, 1]
    rand = [_SmoothField(rng, 3, 0.03, 0.08) for _ in range(3)]
    amp = rng.uniform(0.3, 1.0)

    def f(p):
        d = p - contact.astype(p.dtype)
        w = np.exp(-(d * d).sum(axis=1) / np.float32(2 * reach * reach))
        out = (push * w)[:, None] * away.astype(p.dtype)[None]
        for i in range(3):
            out[:, i] += amp * rand[i](p)
        return out.astype(p.dtype)

    return f


def _trus(pelvis: _Pelvis, probe: _Probe, rng, coarse: float = 1.0):
    # Per-case backscatter (linear amplitude) per class, independent of the MR intensities.
    bsc = np.zeros(N_CLASS, dtype=np.float32)
    gland_level = rng.uniform(0.35, 0.9)  # hypo- to iso-echoic gland
    bsc[[SOFT, FAT, OBTURATOR, LEVATOR, MARROW, CORTEX, BLADDER, VESICLE, RECT_WALL, RECT_LUMEN, PROBE]] = [
        rng.uniform(0.6, 1.0), rng.uniform(0.9, 1.6), rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.7),
        0.2, rng.uniform(3.0, 5.0), 0.01, rng.uniform(0.05, 0.25), rng.uniform(0.8, 1.4), 0.01, 0.0]
    bsc[[PZ, TZ, AFMS, CAPSULE, NODULE, URETHRA, CALCIF]] = [
        gland_level * rng.uniform(0.9, 1.3), gland_level * rng.uniform(0.6, 1.0), gland_level * rng.uniform(0.5, 0.9),
        gland_level * rng.uniform(0.8, 1.5), 0.0, rng.uniform(0.2, 0.5), rng.uniform(3.0, 6.0)]
    # Attenuation (dB/mm, round trip) per class: bone and calcifications block the beam, urine passes it.
    att = np.full(N_CLASS, rng.uniform(0.06, 0.11), dtype=np.float32)
    att[[BLADDER, VESICLE, RECT_LUMEN, PROBE]] = [0.002, 0.01, 0.002, 0.0]
    att[[CORTEX, MARROW, CALCIF]] = [6.0, 1.0, 5.0]
    att[FAT] *= rng.uniform(1.0, 1.4)
    # Acoustic impedance (relative) for interface reflections along the beam.
    imp = np.full(N_CLASS, 1.0, dtype=np.float32)
    imp[[FAT, BLADDER, VESICLE, CORTEX, MARROW, CALCIF, PROBE, RECT_LUMEN]] = [0.9, 0.95, 0.96, 4.0, 1.4, 3.0, 1.0, 1.0]
    imp[CAPSULE] = rng.uniform(1.0, 1.06)

    dr = 0.22 * coarse
    r = np.arange(probe.radius, probe.depth, dr, dtype=np.float32)
    dth = np.float32(0.45 * coarse / 35.0)
    th = np.arange(-probe.half_angle, probe.half_angle + dth, dth, dtype=np.float32)
    dz = 0.55 * coarse
    zz = np.arange(-probe.half_len, probe.half_len + dz, dz, dtype=np.float32)
    Z, TH, RR = np.meshgrid(zz, th, r, indexing="ij")  # [z, angle, range]: range fastest
    q = np.stack([RR * np.sin(TH), RR * np.cos(TH), Z], axis=-1).reshape(-1, 3)
    p = _map(probe.pose, q)
    deform = _deformation(pelvis, probe, rng)
    p_tissue = p - deform(p)  # the tissue now at p came from p - u(p) (small field: first-order inverse)
    cls, inside = pelvis.classes(p_tissue, probe=True)
    shape = RR.shape
    amp = bsc[cls]
    nod = cls == NODULE
    amp[nod] = gland_level * pelvis.nodule_us[pelvis._nodule_index[nod]]
    echo_tex = _SmoothField(rng, 6, 0.2, 0.7)
    g = (cls == PZ) | (cls == TZ) | nod
    amp[g] *= 1 + 0.25 * echo_tex(p_tissue[g])
    amp = amp.reshape(shape)
    # Speckle: complex scatterers weighted by the backscatter, convolved with the PSF (range, lateral, elevation).
    psf = (rng.uniform(0.7, 1.2), rng.uniform(1.0, 1.8), rng.uniform(1.2, 2.2))  # sigma in samples: z, angle, range
    sig = (psf[0], psf[1], psf[2])
    re = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32) * amp, sig)
    im = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32) * amp, sig)
    env = np.hypot(re, im)
    env /= np.float32(np.percentile(env[amp > 0.3], 50) + 1e-6)
    # Specular reflections where the impedance changes along the beam.
    z_imp = ndimage.gaussian_filter1d(imp[cls].reshape(shape), 1.5, axis=2)
    refl = np.abs(np.diff(z_imp, axis=2, prepend=z_imp[:, :, :1])) / dr
    env = env + rng.uniform(2.0, 5.0) * refl * (0.6 + 0.4 * np.abs(np.cos(TH)))
    # Attenuation integrated along each ray (shadows behind bone and calcifications; enhancement behind urine).
    loss_db = np.cumsum(att[cls].reshape(shape), axis=2) * dr
    nominal = float(np.median(att[[SOFT, PZ, TZ]]))
    tgc_db = nominal * (1 + rng.uniform(-0.35, 0.25)) * (r - probe.radius)  # imperfect gain compensation
    env = env * 10 ** ((tgc_db[None, None, :] - loss_db) / 20.0)
    # Reverberation of the probe/rectal-wall interface at multiples of its depth.
    wall_echo = env[:, :, : int(4.0 / dr)].mean(axis=2)
    for k in (2, 3):
        i0 = int(k * 3.0 / dr)
        if i0 < shape[2]:
            env[:, :, i0:i0 + 4] += (0.25 / k) * wall_echo[:, :, None]
    env = env + rng.uniform(0.005, 0.02) * np.abs(rng.normal(size=shape)).astype(np.float32)  # electronic noise
    dyn_db = rng.uniform(45, 60)
    ref = np.percentile(env, 99.0)
    db = 20 * np.log10(np.maximum(env / ref, 1e-6))
    bmode = np.clip(1 + db / dyn_db, 0, 1) * rng.uniform(0.85, 1.0)
    # Scan conversion to a Cartesian grid in the probe frame.
    s = rng.uniform(0.55, 0.75) * coarse
    spacing = np.array([s, s, s * rng.uniform(0.95, 1.15)])
    xmax = probe.depth * np.sin(probe.half_angle)
    ymin = probe.radius * np.cos(probe.half_angle) - 1.0
    size = np.array([int(2 * xmax / spacing[0]) + 1, int((probe.depth - ymin) / spacing[1]) + 1,
                     int(2 * probe.half_len / spacing[2]) + 1])
    origin = np.array([-xmax, ymin, -probe.half_len])
    kk, jj, ii = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    cart = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1) * spacing + origin
    rad = np.hypot(cart[:, 0], cart[:, 1])
    ang = np.arctan2(cart[:, 0], cart[:, 1])
    coords = np.stack([(cart[:, 2] - zz[0]) / dz, (ang - th[0]) / dth, (rad - r[0]) / dr])
    in_fan = (rad >= r[0]) & (rad <= r[-1]) & (np.abs(ang) <= probe.half_angle) & (np.abs(cart[:, 2]) <= probe.half_len)
    img = ndimage.map_coordinates(bmode.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    img = np.where(in_fan, img, 0.0)
    lab = ndimage.map_coordinates(inside.reshape(shape).astype(np.float32), coords, order=1, mode="constant") > 0.5
    out_shape = (size[2], size[1], size[0])
    vol = Volume(np.round(img * 255).astype(np.uint8).reshape(out_shape), spacing, origin, np.eye(3))
    label = vol.with_array((lab & in_fan).reshape(out_shape).astype(np.uint8))
    return vol, label, deform


def simulate_indep_case(seed: int, name: str | None = None, coarse: float = 1.0) -> Case:
    """One independent-family MRI-TRUS case (same seed, same case). coarse > 1 multiplies every sample
    spacing (fast cases for tests; the frozen sets use 1)."""
    if not coarse >= 1.0:
        raise ValueError(f"coarse: expected a factor >= 1, got {coarse!r}")
    rng = np.random.default_rng([int(seed), 0x1DE9])
    pelvis = _Pelvis(rng)
    mr, mr_label = _mri(pelvis, rng, coarse)
    probe = _Probe(pelvis, rng)
    us, us_label, deform = _trus(pelvis, probe, rng, coarse)
    world_to_probe = _inv(probe.pose)
    lm_world = pelvis.calc_world
    lm_tissue_now = lm_world + deform(lm_world.astype(np.float32)).astype(np.float64)  # first-order forward push
    attrs = {
        "simulator": GENERATOR,
        "indep_sim_version": INDEP_SIM_VERSION,
        "seed": int(seed),
        "probe_gap_mm": float(pelvis.wall),
        "probe_radius_mm": float(pelvis.probe_r),
        "coarse": float(coarse),
        "note": "validation only: never used to train or select models",
    }
    return Case(fixed=mr, fixed_label=mr_label, moving=us, moving_label=us_label,
                surface_fixed=pelvis.gland.surface(1500), landmarks_fixed=lm_world,
                landmarks_moving=_map(world_to_probe, lm_tissue_now), truth_fixed_to_moving=world_to_probe,
                name=name or f"indep_{int(seed):05d}", attrs=attrs)
