"""An analytic tissue phantom in world mm (LPS) and a scatterer-based B-mode frame renderer.

Anatomy (patient supine, skin near y = 0, depth = +y = posterior, vessels running along z = S-I):
coupling gel, skin, subcutaneous fat, fascia, muscle with fibre texture, a deep bright interface,
vessels (tubes with curved centre lines, bright walls and anechoic lumens) and hypo/hyperechoic
ellipsoidal inclusions. Echogenicity is a closed-form function of position (no voxel grid).

Speckle comes from point scatterers generated per cubic cell of side `cell_mm`: each cell's
scatterers depend only on (phantom seed, cell index) - a Poisson count, uniform continuous positions
- so every plane at any pose sees the same 3-D scatterer field, without grid artefacts.

Frame formation (`Phantom.render_plane`): scatterers within ±3.5 σ_b of the plane are weighted by
echogenicity × exp(−d²/2σ_b²) (d = out-of-plane distance) and by their carrier phase
exp(−2 i k0 y) (y = depth), splatted onto a grid finer than the pixels, convolved with the Gaussian
baseband PSF (axial along image rows, lateral along columns), then envelope, depth attenuation / TGC
and log compression with a noise-floor knee: B = clip(10 log10((I + c) / c) / DR, 0, 1), with I
normalised so that reference tissue (echogenicity 1) has mean intensity 1.

Calibration: the speckle intensity correlation of two planes a distance d apart is exp(−d²/2σ_b²);
after log compression the correlation of the *written frames* drops faster near d = 0. The beam
width σ_b = ELEVATION_CALIBRATION × σ_e (fitted by Monte Carlo for the default knee c = 0.1 and
DR = 36 dB, 8-bit output) makes the frame correlation follow exp(−d²/2σ_e²) within ±0.02 for
d ≤ 3σ_e, so σ_e (`Psf.sigma_e_mm`) is the decorrelation length of the frames as written.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ultrasound_ai.core.errors import InputError

SPEED_OF_SOUND_MM_PER_US = 1.54
# σ_b / σ_e for the default log compression (noise_floor 0.1, 36 dB, uint8); see module docstring.
ELEVATION_CALIBRATION = 1.106
_SLAB_SIGMAS = 3.5  # scatterers beyond ±3.5 σ_b contribute < 0.2 % of the amplitude
_PSF_TRUNCATE = 3.5
_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class Psf:
    """Imaging model: in-plane PSF, elevational beam, attenuation / TGC and log compression."""

    axial_fwhm_mm: float = 0.3  # envelope FWHM along the beam (image rows)
    lateral_fwhm_mm: float = 0.45  # along image columns
    sigma_e_mm: float = 0.6  # elevational decorrelation length of the written frames
    center_frequency_mhz: float = 7.5
    attenuation_db_cm_mhz: float = 0.5
    tgc_compensation: float = 1.0  # fraction of the round-trip attenuation the TGC gives back
    dynamic_range_db: float = 36.0
    noise_floor: float = 0.1  # intensity knee of the log compression, relative to reference tissue

    def __post_init__(self):
        for name in ("axial_fwhm_mm", "lateral_fwhm_mm", "sigma_e_mm", "center_frequency_mhz", "dynamic_range_db",
                     "noise_floor"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise InputError(f"Psf.{name} must be a positive number, got {v}")

    @property
    def sigma_axial_mm(self) -> float:
        return self.axial_fwhm_mm * _FWHM_TO_SIGMA

    @property
    def sigma_lateral_mm(self) -> float:
        return self.lateral_fwhm_mm * _FWHM_TO_SIGMA

    @property
    def sigma_beam_mm(self) -> float:
        """Width of the elevational amplitude weight exp(−d²/2σ_b²)."""
        return ELEVATION_CALIBRATION * self.sigma_e_mm

    @property
    def wavelength_mm(self) -> float:
        return SPEED_OF_SOUND_MM_PER_US / self.center_frequency_mhz

    def as_attrs(self) -> dict:
        return {f"psf_{k}": float(getattr(self, k)) for k in self.__dataclass_fields__}


# ------------------------------------------------------------------------------------------------
# Anatomy
# ------------------------------------------------------------------------------------------------


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass
class _Waves:
    """A smooth random surface offset: sum of plane waves over (x, z)."""

    amp: np.ndarray
    kx: np.ndarray
    kz: np.ndarray
    phase: np.ndarray

    @classmethod
    def random(cls, rng, n, amp_mm, wavelength_mm):
        lam = rng.uniform(*wavelength_mm, n)
        ang = rng.uniform(0, 2 * np.pi, n)
        k = 2 * np.pi / lam
        return cls(rng.uniform(0.5, 1.0, n) * amp_mm / np.sqrt(n), k * np.cos(ang), k * np.sin(ang),
                   rng.uniform(0, 2 * np.pi, n))

    def __call__(self, x, z):
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(z)), dtype=np.result_type(x, z, np.float32))
        for a, kx, kz, ph in zip(self.amp, self.kx, self.kz, self.phase):
            out += out.dtype.type(a) * np.sin(out.dtype.type(kx) * x + out.dtype.type(kz) * z + out.dtype.type(ph))
        return out


@dataclass
class Vessel:
    """A tube along z: centre (x0 + slope·z + ax sin(2πz/Lx + φx), y0 + ay sin(2πz/Ly + φy))."""

    x0: float
    y0: float
    slope: float
    ax: float
    lx: float
    phx: float
    ay: float
    ly: float
    phy: float
    radius: float
    wall: float
    ellipticity: float = 1.0  # lateral / axial semi-axis ratio (veins are flattened)
    lumen_echo: float = 0.02
    wall_echo: float = 2.6

    def centre(self, z):
        f = np.asarray(z).dtype.type if np.asarray(z).dtype.kind == "f" else np.float64
        cx = f(self.x0) + f(self.slope) * z + f(self.ax) * np.sin(f(2 * np.pi / self.lx) * z + f(self.phx))
        cy = f(self.y0) + f(self.ay) * np.sin(f(2 * np.pi / self.ly) * z + f(self.phy))
        return cx, cy

    def radial(self, x, y, z):
        """Approximate distance-like coordinate from the centre line (in-section, mm)."""
        # Measured in the z-section: the centre lines are gently sloped (< ~0.5), so an oblique tube
        # only looks slightly wider, as a real oblique vessel does.
        cx, cy = self.centre(z)
        return np.sqrt(((x - cx) / self.ellipticity) ** 2 + (y - cy) ** 2)


@dataclass
class Inclusion:
    centre: np.ndarray  # [3] world mm
    rotation: np.ndarray  # [3, 3] world <- ellipsoid axes
    semi_axes: np.ndarray  # [3] mm
    echo: float

    @property
    def bound(self) -> float:
        return float(self.semi_axes.max()) + 0.5


@dataclass
class Phantom:
    """Analytic tissue phantom plus a deterministic scatterer field; see the module docstring."""

    seed: int
    kind: str = "arm"  # "arm", "carotid" or "homogeneous"
    scatterer_density_per_mm3: float = 60.0
    cell_mm: float = 3.0
    homogeneous_echo: float = 1.0
    # Echogenicity contrast: amplitudes e -> e ** echo_gamma (1 = reference tissue stays 1); the training
    # simulator's randomised appearance draws it per sweep.
    echo_gamma: float = 1.0
    gel_mm: float = 0.6
    skin_mm: float = 1.6
    fat_mm: float = 5.0
    bright_depth_mm: float = 32.0
    skin_echo: float = 1.5
    fat_echo: float = 0.55
    fascia_echo: float = 1.9
    muscle_echo: float = 0.85
    gel_echo: float = 0.01
    surface: _Waves | None = None
    fat_waves: _Waves | None = None
    deep_waves: _Waves | None = None
    fibre_dir: np.ndarray | None = None
    fibre_k: np.ndarray | None = None  # [J, 3] wave vectors ⟂ fibre direction
    fibre_phase: np.ndarray | None = None
    vessels: list[Vessel] = field(default_factory=list)
    inclusions: list[Inclusion] = field(default_factory=list)
    max_cached_cells: int = 1500

    def __post_init__(self):
        if self.kind not in ("arm", "carotid", "homogeneous"):
            raise InputError(f"phantom kind must be 'arm', 'carotid' or 'homogeneous', got {self.kind!r}")
        if not (self.scatterer_density_per_mm3 > 0 and self.cell_mm > 0):
            raise InputError("phantom scatterer density and cell size must be positive")
        if not (np.isfinite(self.echo_gamma) and self.echo_gamma > 0):
            raise InputError(f"phantom echo_gamma must be a positive number, got {self.echo_gamma}")
        self._cells: OrderedDict = OrderedDict()

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def homogeneous(cls, seed: int, echogenicity: float = 1.0, **kw) -> "Phantom":
        """Uniform tissue of the given echogenicity (1 = reference tissue) everywhere."""
        return cls(seed=int(seed), kind="homogeneous", homogeneous_echo=float(echogenicity), **kw)

    @classmethod
    def random(cls, seed: int, kind: str | None = None, **kw) -> "Phantom":
        """Random arm or carotid anatomy from `seed`; the scatterers derive from the same seed."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA4A7]))
        if kind is None:
            kind = "arm" if rng.random() < 0.5 else "carotid"
        if kind == "homogeneous":
            return cls.homogeneous(seed, **kw)
        p = dict(
            seed=int(seed), kind=kind,
            gel_mm=rng.uniform(0.5, 0.8), skin_mm=rng.uniform(1.2, 2.2),
            fat_mm=rng.uniform(3.0, 8.0) if kind == "arm" else rng.uniform(2.5, 5.0),
            bright_depth_mm=rng.uniform(26.0, 40.0),
            skin_echo=rng.uniform(1.3, 1.8), fat_echo=rng.uniform(0.45, 0.7),
            fascia_echo=rng.uniform(1.6, 2.4), muscle_echo=rng.uniform(0.75, 1.0),
            surface=_Waves.random(rng, 4, 0.35, (25.0, 80.0)),
            fat_waves=_Waves.random(rng, 5, 2.0, (15.0, 60.0)),
            deep_waves=_Waves.random(rng, 4, 3.0, (30.0, 90.0)),
        )
        tilt = np.deg2rad(rng.uniform(-20, 20))
        fdir = np.array([np.sin(np.deg2rad(rng.uniform(-10, 10))), np.sin(tilt), np.cos(tilt)])
        fdir /= np.linalg.norm(fdir)
        e1 = np.cross(fdir, [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(fdir, e1)
        nj = 6
        ang = rng.uniform(0, np.pi, nj)
        kmag = 2 * np.pi / rng.uniform(0.8, 2.5, nj)
        p["fibre_dir"] = fdir
        p["fibre_k"] = kmag[:, None] * (np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2)
        p["fibre_phase"] = rng.uniform(0, 2 * np.pi, nj)
        vessels = []
        if kind == "carotid":
            # Common carotid (round, 3-4 mm radius) and the jugular vein beside it (flattened, larger).
            cy = rng.uniform(13.0, 20.0)
            vessels.append(Vessel(rng.uniform(-4, 4), cy, rng.uniform(-0.08, 0.08), rng.uniform(1, 4),
                                  rng.uniform(60, 150), rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 2),
                                  rng.uniform(60, 150), rng.uniform(0, 2 * np.pi), rng.uniform(3.0, 4.0),
                                  rng.uniform(0.7, 1.1), 1.0, 0.02, rng.uniform(2.4, 3.2)))
            side = rng.choice([-1.0, 1.0])
            vessels.append(Vessel(vessels[0].x0 + side * rng.uniform(9, 12), cy - rng.uniform(3, 6),
                                  rng.uniform(-0.08, 0.08), rng.uniform(1, 3), rng.uniform(60, 150),
                                  rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.5), rng.uniform(60, 150),
                                  rng.uniform(0, 2 * np.pi), rng.uniform(3.0, 4.5), rng.uniform(0.3, 0.5),
                                  rng.uniform(1.3, 1.8), 0.02, rng.uniform(1.6, 2.2)))
        else:
            for _ in range(int(rng.integers(1, 4))):
                vessels.append(Vessel(rng.uniform(-15, 15), rng.uniform(4.0, 18.0), rng.uniform(-0.15, 0.15),
                                      rng.uniform(1, 4), rng.uniform(60, 150), rng.uniform(0, 2 * np.pi),
                                      rng.uniform(0.5, 2.5), rng.uniform(60, 150), rng.uniform(0, 2 * np.pi),
                                      rng.uniform(1.2, 2.6), rng.uniform(0.4, 0.8), rng.uniform(1.0, 1.4),
                                      0.02, rng.uniform(2.0, 3.0)))
        p["vessels"] = vessels
        inclusions = []
        n_inc = int(rng.poisson(40))
        for _ in range(n_inc):
            c = np.array([rng.uniform(-60, 60), rng.uniform(6, 34), rng.uniform(-60, 200)])
            q = rng.normal(size=4)
            q /= np.linalg.norm(q)
            w, x, y, z = q
            rot = np.array([
                [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
            ])
            hyper = rng.random() < 0.4
            echo = rng.uniform(1.6, 2.4) if hyper else rng.uniform(0.15, 0.45)
            inclusions.append(Inclusion(c, rot, rng.uniform(1.5, 6.0, 3), echo))
        p["inclusions"] = inclusions
        p.update(kw)
        return cls(**p)

    def describe(self) -> dict:
        """Small JSON-able summary for sweep attributes."""
        out = {"phantom_kind": self.kind, "phantom_seed": int(self.seed), "n_vessels": len(self.vessels),
               "n_inclusions": len(self.inclusions),
               "scatterer_density_per_mm3": float(self.scatterer_density_per_mm3)}
        if self.echo_gamma != 1.0:  # only then: the attributes of the nominal phantoms stay as they were
            out["echo_gamma"] = float(self.echo_gamma)
        return out

    # -- echogenicity ------------------------------------------------------------------------------

    def skin_surface_y(self, x, z):
        """Depth (world y, mm) of the skin surface below the gel at (x, z)."""
        x, z = np.asarray(x), np.asarray(z)
        s = np.full(np.broadcast_shapes(x.shape, z.shape), self.gel_mm, dtype=np.result_type(x, z, np.float32))
        return s + (self.surface(x, z) if self.surface is not None else s.dtype.type(0))

    def echogenicity(self, points) -> np.ndarray:
        """Backscatter amplitude (1 = reference tissue; intensity ∝ its square) at points [K, 3] (mm)."""
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise InputError(f"echogenicity: points must be [K, 3] (mm), got shape {pts.shape}")
        return self._echo(pts, None)

    def _echo(self, pts, bbox):
        # float32 throughout: millions of scatterers per sweep go through here once.
        pts = np.asarray(pts, dtype=np.float32)
        if self.kind == "homogeneous":
            return np.full(len(pts), self.homogeneous_echo ** self.echo_gamma, dtype=np.float32)
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        inv_w = np.float32(1.0 / 0.12)  # boundary softness 0.12 mm: smooth interfaces, no staircase
        skin_top = self.skin_surface_y(x, z)
        fat_top = skin_top + np.float32(self.skin_mm)
        muscle_top = np.maximum(fat_top + np.float32(self.fat_mm) + self.fat_waves(x, z), fat_top + np.float32(0.8))
        deep = np.float32(self.bright_depth_mm) + self.deep_waves(x, z)
        t = np.zeros(len(pts), dtype=np.float32)
        for k, ph in zip(self.fibre_k.astype(np.float32), self.fibre_phase.astype(np.float32)):
            t += np.cos(pts @ k + ph)
        t *= np.float32(1.0 / np.sqrt(len(self.fibre_k) / 2.0))  # unit variance
        muscle = np.float32(self.muscle_echo) * (np.float32(0.8) + np.float32(0.7) * _sigmoid(np.float32(2.5) * (t - 1)))
        in_skin = _sigmoid((y - skin_top) * inv_w)
        in_fat = _sigmoid((y - fat_top) * inv_w)
        in_muscle = _sigmoid((y - muscle_top) * inv_w)
        e = np.float32(self.gel_echo) + np.float32(self.skin_echo - self.gel_echo) * in_skin
        e += np.float32(self.fat_echo - self.skin_echo) * in_fat
        e += (muscle - np.float32(self.fat_echo)) * in_muscle
        # Fascia: a thin bright sheet on the fat/muscle boundary.
        e += np.float32(self.fascia_echo - self.fat_echo) * np.exp(np.float32(-8.0) * (y - muscle_top) ** 2)
        # Deep bright interface (bone / deep fascia) with weak echoes below it.
        e += (np.float32(2.8) - muscle) * np.exp(np.float32(-2.47) * (y - deep) ** 2) * in_skin
        e += (np.float32(0.25) - muscle) * _sigmoid((y - deep - np.float32(0.9)) * inv_w)
        for inc in self.inclusions:
            b = inc.bound
            if bbox is not None and np.any(np.abs(inc.centre - np.clip(inc.centre, bbox[0], bbox[1])) > b):
                continue
            near = np.flatnonzero(np.all(np.abs(pts - inc.centre.astype(np.float32)) <= b, axis=1))
            if near.size == 0:
                continue
            local = (pts[near] - inc.centre.astype(np.float32)) @ inc.rotation.astype(np.float32)
            r = np.sqrt(((local / inc.semi_axes.astype(np.float32)) ** 2).sum(axis=1))
            m = _sigmoid((1 - r) * np.float32(inc.semi_axes.min()) * inv_w) * in_muscle[near]  # in the muscle only
            e[near] += (np.float32(inc.echo / max(self.muscle_echo, 1e-6)) * e[near] - e[near]) * m
        for v in self.vessels:
            r = v.radial(x, y, z)
            outer = _sigmoid((np.float32(v.radius + v.wall) - r) * np.float32(12.5))
            inner = _sigmoid((np.float32(v.radius) - r) * np.float32(12.5))
            vessel = np.float32(v.wall_echo) * (1 - inner) + np.float32(v.lumen_echo) * inner
            e = e * (1 - outer) + vessel * outer
        e = np.maximum(e, 0)
        if self.echo_gamma != 1.0:
            e = e ** np.float32(self.echo_gamma)
        return e.astype(np.float32)

    # -- scatterers --------------------------------------------------------------------------------

    def cell_scatterers(self, i: int, j: int, k: int):
        """(positions float32 [3, n] world mm (x, y, z rows), echogenicity float32 [n]) of cell (i, j, k);
        cached.

        The cell's generator is seeded from (phantom seed, cell index) only, so the field is the same
        whatever plane, order or cache state asks for it.
        """
        return self._cells_for([(int(i), int(j), int(k))])[0]

    def _cell_positions(self, key):
        off = 1 << 31
        ss = np.random.SeedSequence([int(self.seed) & 0xFFFFFFFF, key[0] + off, key[1] + off, key[2] + off, 0x5CA7])
        rng = np.random.default_rng(ss)
        c = self.cell_mm
        n = int(rng.poisson(self.scatterer_density_per_mm3 * c**3))
        return ((np.asarray(key, dtype=np.float64) + rng.random((n, 3))) * c).astype(np.float32).T.copy()

    def _cells_for(self, keys):
        """Cached cells for `keys`; missing ones are generated together (one vectorised echo pass)."""
        missing = [k for k in keys if k not in self._cells]
        if missing:
            pos = [self._cell_positions(k) for k in missing]
            lo = np.min(np.asarray(missing), axis=0) * self.cell_mm
            hi = (np.max(np.asarray(missing), axis=0) + 1) * self.cell_mm
            echo = self._echo(np.concatenate(pos, axis=1).T, (lo, hi))
            start = 0
            for k, p in zip(missing, pos):
                self._cells[k] = (p, echo[start:start + p.shape[1]])
                start += p.shape[1]
        out = []
        for k in keys:
            self._cells.move_to_end(k)
            out.append(self._cells[k])
        while len(self._cells) > max(self.max_cached_cells, len(keys)):
            self._cells.popitem(last=False)
        return out

    def _gather(self, R, t, x_range, y_range, half_thickness):
        """All scatterers of cells that can reach the slab |z| ≤ half_thickness over the frame area."""
        c = self.cell_mm
        corners = np.array([[x, y, zz] for x in x_range for y in y_range for zz in (-half_thickness, half_thickness)])
        world = corners @ R.T + t
        lo = np.floor(world.min(axis=0) / c).astype(int)
        hi = np.floor(world.max(axis=0) / c).astype(int)
        ii, jj, kk = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij")
        idx = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
        local = ((idx + 0.5) * c - t) @ R  # cell centres in plane coordinates
        half_diag = 0.5 * np.sqrt(3.0) * c
        keep = (np.abs(local[:, 2]) <= half_thickness + half_diag)
        keep &= (local[:, 0] >= x_range[0] - half_diag) & (local[:, 0] <= x_range[1] + half_diag)
        keep &= (local[:, 1] >= y_range[0] - half_diag) & (local[:, 1] <= y_range[1] + half_diag)
        parts = self._cells_for([tuple(int(v) for v in cell) for cell in idx[keep]])
        if not parts:
            return np.zeros((3, 0), np.float32), np.zeros(0, np.float32)
        return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts])

    # -- rendering ---------------------------------------------------------------------------------

    def render_plane(self, pose_image_to_world, shape_hw, spacing_xy, psf: Psf | None = None) -> np.ndarray:
        """Noise-free log-compressed B-mode (float32 [H, W] in [0, 1]) of the plane at a pose.

        pose_image_to_world: [4, 4] rigid, image mm (x columns, y rows = depth, z = x × y, origin
        at the centre of pixel (0, 0)) -> world mm (LPS). shape_hw = (H, W); spacing_xy = (sx, sy).
        """
        psf = psf or Psf()
        T = np.asarray(pose_image_to_world, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise InputError(f"render_plane: pose must be a finite [4, 4] matrix, got shape {T.shape}")
        R, t = T[:3, :3], T[:3, 3]
        if np.abs(R.T @ R - np.eye(3)).max() > 1e-6 or np.linalg.det(R) <= 0:
            raise InputError("render_plane: pose must be rigid (orthonormal rotation with det +1)")
        h, w = (int(v) for v in shape_hw)
        sx, sy = (float(v) for v in spacing_xy)
        if h < 1 or w < 1 or not (sx > 0 and sy > 0):
            raise InputError(f"render_plane: shape_hw {shape_hw} and spacing_xy {spacing_xy} must be positive")
        s_ax, s_lat, s_b = psf.sigma_axial_mm, psf.sigma_lateral_mm, psf.sigma_beam_mm
        # Fine grid: an integer subdivision of the pixels, ≥ 2.5 nodes per PSF σ.
        fy = max(1, int(np.ceil(3.0 * sy / s_ax)))
        fx = max(1, int(np.ceil(2.5 * sx / s_lat)))
        dy, dx = sy / fy, sx / fx
        my, mx = _PSF_TRUNCATE * s_ax, _PSF_TRUNCATE * s_lat
        py, px = int(np.ceil(my / dy)) + 1, int(np.ceil(mx / dx)) + 1
        x_range = (-mx, (w - 1) * sx + mx)
        y_range = (-my, (h - 1) * sy + my)
        half = _SLAB_SIGMAS * psf.sigma_e_mm  # ±3.5 σ_e ≈ ±3.2 σ_b: < 1e-4 of the intensity left out
        pos, echo = self._gather(R, t, x_range, y_range, half)
        # Plane coordinates in float32 (enough: 1e-5 mm over 200 mm), one coordinate row at a time
        # (structure of arrays: 1-D masks and gathers are several times faster than row gathers).
        Rt = R.T.astype(np.float32)  # rows: plane axes in world coordinates
        t_loc = (t @ R).astype(np.float32)  # plane coordinates = Rᵀ p − Rᵀ t
        X, Y, Z = pos
        lz = Rt[2, 0] * X + Rt[2, 1] * Y + Rt[2, 2] * Z - t_loc[2]
        keep = np.abs(lz) <= half
        X, Y, Z, lz, echo = X[keep], Y[keep], Z[keep], lz[keep], echo[keep]
        lx = Rt[0, 0] * X + Rt[0, 1] * Y + Rt[0, 2] * Z - t_loc[0]
        ly = Rt[1, 0] * X + Rt[1, 1] * Y + Rt[1, 2] * Z - t_loc[1]
        keep = (lx >= x_range[0]) & (lx <= x_range[1]) & (ly >= y_range[0]) & (ly <= y_range[1])
        lx, ly, lz, amp = lx[keep], ly[keep], lz[keep], echo[keep]
        amp = amp * np.exp(np.float32(-0.5 / s_b**2) * lz * lz)
        k2 = np.float32(4.0 * np.pi / psf.wavelength_mm)  # round-trip wavenumber 2·k0
        phase = k2 * ly
        w_re = amp * np.cos(phase)
        w_im = -amp * np.sin(phase)
        ny, nx = (h - 1) * fy + 1 + 2 * py, (w - 1) * fx + 1 + 2 * px
        # Splat: linear along x, nearest fine row along y (rows are ≥ 3 per axial σ; the carrier
        # phase above is exact, which is what speckle is sensitive to).
        u = lx * np.float32(1.0 / dx) + np.float32(px)
        j0 = u.astype(np.int32)  # u ≥ 0 here, so truncation is floor
        fu = u - j0
        i0 = (ly * np.float32(1.0 / dy) + np.float32(py + 0.5)).astype(np.int32)
        flat = i0.astype(np.int64) * nx + j0
        size = ny * nx
        w_re1, w_im1 = w_re * fu, w_im * fu
        g_re = np.bincount(flat, weights=w_re - w_re1, minlength=size)
        g_re[1:] += np.bincount(flat, weights=w_re1, minlength=size)[:-1]
        g_im = np.bincount(flat, weights=w_im - w_im1, minlength=size)
        g_im[1:] += np.bincount(flat, weights=w_im1, minlength=size)[:-1]
        g_re, g_im = g_re[:size].reshape(ny, nx), g_im[:size].reshape(ny, nx)
        # Separable Gaussian PSF, evaluated only at the pixel centres (every fy-th / fx-th node).
        ky = _gauss_kernel(s_ax / dy)
        kx = _gauss_kernel(s_lat / dx)
        rows = py + fy * np.arange(h)
        cols = px + fx * np.arange(w)
        re = ndimage.correlate1d(g_re, kx, axis=1, mode="constant")[:, cols]
        im = ndimage.correlate1d(g_im, kx, axis=1, mode="constant")[:, cols]
        re = ndimage.correlate1d(re, ky, axis=0, mode="constant")[rows]
        im = ndimage.correlate1d(im, ky, axis=0, mode="constant")[rows]
        # Mean intensity of reference tissue: ρ ∫K² dA ∫w² dz with a peak-1 Gaussian PSF K.
        norm = self.scatterer_density_per_mm3 * np.pi * s_ax * s_lat * np.sqrt(np.pi) * s_b
        intensity = (re**2 + im**2) / norm
        depth_cm = (np.arange(h) * sy / 10.0)[:, None]
        loss_db = 2.0 * psf.attenuation_db_cm_mhz * psf.center_frequency_mhz * depth_cm
        intensity *= 10.0 ** (-(1.0 - psf.tgc_compensation) * loss_db / 10.0)
        c = psf.noise_floor
        b = 10.0 * np.log10((intensity + c) / c) / psf.dynamic_range_db
        return np.clip(b, 0.0, 1.0).astype(np.float32)


def _gauss_kernel(sigma_nodes: float) -> np.ndarray:
    r = int(np.ceil(_PSF_TRUNCATE * sigma_nodes))
    x = np.arange(-r, r + 1, dtype=np.float64)
    return np.exp(-0.5 * (x / sigma_nodes) ** 2)  # peak 1: amplitude PSF, normalised analytically


def make_phantom(seed: int, kind: str | None = None, **kw) -> Phantom:
    """The phantom `simulate_sweep(seed)` uses (random arm or carotid anatomy unless `kind`)."""
    return Phantom.random(seed, kind=kind, **kw)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] B-mode image as frames are written."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
