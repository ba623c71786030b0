"""Microbubble flow simulator for ULM: vessel tree, Poiseuille flow, complex PSF, tissue clutter, noise.

Geometry (docs/DATA_FORMATS.md): frames [T, Z, X], z = depth, x = lateral, mm; pixel (iz, ix) is centred at
(z0 + iz*dz, x0 + ix*dx). Default = the PALA in-silico setting: 15.625 MHz, c = 1540 m/s, so
lambda = 98.56 um, pixels of one lambda, 84 x 143 frames, 1 kHz.

Model
- Vessels: `vessels.build_vessel_tree` grows branching, smooth tortuous trees (radii 10-200 um) in a
  box 1 mm larger than the field of view (FOV), so bubbles enter and leave through the edges. Each
  tree is an artery (flow root -> leaves) or a vein (leaves -> root), chosen at random.
- Bubbles: a bubble sits at arclength s on a segment with a signed normalised offset rho in (-1, 1)
  across the vessel (a thin-slab view of the tube) and moves at the Poiseuille speed
  v = v_max(R) (1 - rho^2), with v_max proportional to the radius (`peak_speed_mm_s` for R = 200 um).
  At a bifurcation it takes a child with probability proportional to R^3 (Murray flow share). It
  disappears at a free end or when its lifetime ends (exponential, mean `bubble_lifetime_ms`, for
  out-of-plane motion). New bubbles are spawned uniformly over the vessel area of the box to keep the
  number inside the FOV at `bubbles_per_frame` on average. A bubble keeps its id while it lives.
- Image: each bubble adds a complex PSF evaluated analytically at its exact position (no grid
  snapping): a * exp(-(z-zb)^2 / 2 sz^2 - (x-xb)^2 / 2 sx^2) * exp(i 4 pi (z - zb) / lambda), an
  anisotropic Gaussian envelope (FWHM `psf_fwhm_lambda` = (axial, lateral), default 1.0 and 1.5
  lambda) times the two-way axial phase. Amplitudes a are log-normal with mean 1, so "the mean bubble
  peak amplitude" is 1 and is the 0 dB reference of both levels below.
- `clutter_db`: tissue clutter rms amplitude relative to the mean bubble peak amplitude (e.g. +20 dB
  = tissue 10x brighter than a bubble; None = no tissue). Real tissue clutter is strong but slow and
  low-rank in time (it moves with breathing and pulsation at <~ 1-10 Hz and decorrelates over hundreds
  of ms), which is why an SVD filter removing a few components works in vivo. The model follows
  that (`TissueModel`): two fixed Gaussian speckle patterns S1, S2 (circular white noise through the
  PSF's transfer function) mixed as cos(phi(t)) S1 + sin(phi(t)) S2, so the rms stays constant; phi is
  a smooth stationary Gaussian process (sd 1.5 rad, a sum of random-phase sinusoids with frequencies
  from a Gaussian spectrum) whose width makes the tissue's correlation fall to 1/e after
  `tissue_decorrelation_s`; the whole field moves rigidly by a slow sinusoidal displacement of
  `tissue_motion_lambda` at `tissue_motion_hz` (x at 0.7 times that frequency), which also turns the
  two-way carrier phase. Nothing in it is white in time, so its energy lies in a few singular
  components of a block (tested: the default SVD cutoff of 4 takes +20 dB tissue below the bubbles).
- `noise_db`: complex white Gaussian noise, rms |n| relative to the mean bubble peak amplitude
  (-20 dB: rms 0.1; -40 dB: rms 0.01; None = no noise).
Ground truth: (frame, z_mm, x_mm, bubble_id) of the bubbles whose centre lies in the FOV, i.e.
within half a pixel of the outer pixel centres.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.vessels import VesselNetwork, build_vessel_tree

# 1.1: temporally smooth, low-rank tissue clutter (1.0 had a white-in-time decorrelation term).
ULM_SIM_VERSION = "1.1"
# Concentrations are given per 84 x 143-lambda frame (the PALA grid, this simulator's default frame).
PALA_FRAME_PIXELS = 84 * 143
# Frames generated per internal step: fixed so that results do not depend on how callers stream.
_BLOCK = 100
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
# Tissue mixing angle: standard deviation (rad) and number of sinusoids summed to make it Gaussian-like.
_MIX_SD_RAD = 1.5
_MIX_SINES = 8


@dataclass
class UlmSimConfig:
    n_frames: int = 1000
    bubbles_per_frame: float = 40.0
    clutter_db: float | None = 20.0
    noise_db: float | None = -30.0
    seed: int = 0
    shape_zx: tuple[int, int] = (84, 143)
    center_frequency_hz: float = 15.625e6
    speed_of_sound_m_s: float = 1540.0
    frame_rate_hz: float = 1000.0
    pixel_size_lambda: tuple[float, float] = (1.0, 1.0)
    depth_start_mm: float = 3.0
    psf_fwhm_lambda: tuple[float, float] = (1.0, 1.5)
    amplitude_log_sd: float = 0.4
    peak_speed_mm_s: float = 40.0
    bubble_lifetime_ms: float = 200.0
    n_trees: int = 4
    margin_mm: float = 1.0
    tissue_motion_lambda: float = 0.05  # ~5 um: pulsatile / respiratory motion of a fixed head
    tissue_motion_hz: float = 1.5
    tissue_decorrelation_s: float = 0.3

    @property
    def wavelength_mm(self) -> float:
        return self.speed_of_sound_m_s / self.center_frequency_hz * 1e3

    @property
    def pixel_size_mm(self) -> tuple[float, float]:
        lam = self.wavelength_mm
        return (self.pixel_size_lambda[0] * lam, self.pixel_size_lambda[1] * lam)

    @property
    def origin_mm(self) -> tuple[float, float]:
        dz, dx = self.pixel_size_mm
        return (self.depth_start_mm, -(self.shape_zx[1] - 1) / 2.0 * dx)

    def validate(self) -> "UlmSimConfig":
        def bad(what):
            raise InputError(f"ULM simulation: {what}")

        if int(self.n_frames) < 1:
            bad(f"frames must be >= 1, got {self.n_frames}")
        if not (0 <= self.bubbles_per_frame <= 1000):
            bad(f"bubbles per frame must be in [0, 1000], got {self.bubbles_per_frame}")
        if len(self.shape_zx) != 2 or min(self.shape_zx) < 4:
            bad(f"frame shape must be two sizes >= 4 (Z, X), got {self.shape_zx}")
        for name in ("center_frequency_hz", "speed_of_sound_m_s", "frame_rate_hz", "peak_speed_mm_s",
                     "bubble_lifetime_ms", "tissue_decorrelation_s"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                bad(f"{name} must be a positive number, got {v}")
        if min(self.pixel_size_lambda) <= 0 or min(self.psf_fwhm_lambda) <= 0:
            bad("pixel size and PSF FWHM must be positive")
        for name in ("tissue_motion_lambda", "tissue_motion_hz"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                bad(f"{name} must be a number >= 0, got {v}")
        for name in ("clutter_db", "noise_db"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and -120 <= v <= 80):
                bad(f"{name} must be in [-120, 80] dB or None (off), got {v}")
        return self

    def as_attrs(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape_zx"] = list(self.shape_zx)
        return d


class TissueModel:
    """The slow tissue trajectory shared by the fast and the pymust simulators: mixing angle phi(t) of
    the two speckle patterns and rigid displacement (dz, dx)(t) in mm, as deterministic functions of
    the frame index (so results never depend on how frames are streamed).

    phi(t) = phi0 + s sqrt(2/J) sum_j cos(2 pi f_j t + theta_j), f_j ~ |N(0, sf)|: for many sinusoids a
    stationary Gaussian process with sd s and autocorrelation rho(tau) = exp(-2 pi^2 sf^2 tau^2). The
    tissue field's correlation is E cos(phi(t + tau) - phi(t)) = exp(-s^2 (1 - rho(tau))); sf is chosen
    so that it is 1/e at tau = `tissue_decorrelation_s` (sf = 0.17 / T for s = 1.5 rad).
    """

    def __init__(self, cfg: UlmSimConfig, rng: np.random.Generator):
        s = _MIX_SD_RAD
        rho = 1.0 - 1.0 / (s * s)
        sf = math.sqrt(-math.log(rho) / (2.0 * math.pi ** 2)) / float(cfg.tissue_decorrelation_s)
        self.dt = 1.0 / float(cfg.frame_rate_hz)
        self._f = np.abs(rng.normal(0.0, sf, _MIX_SINES))
        self._theta = rng.uniform(0.0, 2.0 * math.pi, _MIX_SINES)
        self._phi0 = float(rng.uniform(0.0, 2.0 * math.pi))
        self._motion_phase = rng.uniform(0.0, 2.0 * math.pi, 2)
        self._amp_mm = float(cfg.tissue_motion_lambda) * cfg.wavelength_mm
        self._w = 2.0 * math.pi * float(cfg.tissue_motion_hz)

    def angle(self, frames) -> np.ndarray:
        """Mixing angle (rad) at the given frame indices."""
        t = np.asarray(frames, dtype=np.float64).reshape(-1) * self.dt
        waves = np.cos(2.0 * math.pi * self._f[None, :] * t[:, None] + self._theta[None, :])
        return self._phi0 + _MIX_SD_RAD * math.sqrt(2.0 / _MIX_SINES) * waves.sum(axis=1)

    def displacement_mm(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """Rigid tissue displacement (dz, dx) in mm at the given frame indices."""
        t = np.asarray(frames, dtype=np.float64).reshape(-1) * self.dt
        return (self._amp_mm * np.sin(self._w * t + self._motion_phase[0]),
                self._amp_mm * np.sin(0.7 * self._w * t + self._motion_phase[1]))


@dataclass
class BubbleFrame:
    """One frame's bubbles, as `FlowSimulator.step()` returns them (before the move to the next frame)."""

    index: int                 # 0-based frame index
    positions: np.ndarray      # [B, 2] (z, x) mm of every live bubble (also those outside the FOV)
    amplitudes: np.ndarray     # [B] complex amplitudes
    ids: np.ndarray            # [B] bubble ids
    in_fov: np.ndarray         # [B] bool: centre inside the field of view (these are the ground truth)
    gt: np.ndarray             # [K, 4] (frame, z_mm, x_mm, bubble_id) of the bubbles in the FOV, by id


class FlowSimulator:
    """Stateful simulator: `blocks()` yields (start, iq [n, Z, X] complex64, gt rows [K, 4])."""

    def __init__(self, config: UlmSimConfig):
        self.cfg = cfg = config.validate()
        seeds = np.random.SeedSequence(int(cfg.seed)).spawn(4)
        self._rng_tree, self._rng_bub, self._rng_clutter, self._rng_noise = (np.random.default_rng(s) for s in seeds)
        self.Z, self.X = (int(v) for v in cfg.shape_zx)
        self.lam = cfg.wavelength_mm
        self.dz, self.dx = cfg.pixel_size_mm
        self.z0, self.x0 = cfg.origin_mm
        self.dt = 1.0 / cfg.frame_rate_hz
        # FOV: half a pixel beyond the outer pixel centres.
        self.fov = (self.z0 - self.dz / 2, self.z0 + (self.Z - 0.5) * self.dz,
                    self.x0 - self.dx / 2, self.x0 + (self.X - 0.5) * self.dx)
        m = cfg.margin_mm
        box = (self.fov[0] - m, self.fov[1] + m, self.fov[2] - m, self.fov[3] + m)
        self.network: VesselNetwork = build_vessel_tree(self._rng_tree, box, n_trees=cfg.n_trees)
        net = self.network
        self.parent = np.full(net.n_segments, -1, dtype=np.int64)
        for v in range(net.n_segments):
            for c in net.children[v]:
                if c >= 0:
                    self.parent[c] = v
        root = np.arange(net.n_segments)
        for _ in range(64):  # walk up to each segment's tree root
            up = self.parent[root]
            root = np.where(up >= 0, up, root)
        tree_sign = np.where(self._rng_tree.random(net.n_segments) < 0.5, 1.0, -1.0)
        self.flow_sign = tree_sign[root]
        self.vmax = cfg.peak_speed_mm_s * net.radius_mm / 0.2
        # Spawning: sample points weighted by vessel width (uniform over vessel area).
        seg_of_point = np.repeat(np.arange(net.n_segments), net.n_points)
        w = net.radius_mm[seg_of_point].copy()
        last = net.offset + net.n_points - 1
        w[last] = 0.0  # a point at the very end has no length after it
        self._spawn_p = w / w.sum()
        self._seg_of_point = seg_of_point
        p = net.points
        in_fov = (p[:, 0] >= self.fov[0]) & (p[:, 0] <= self.fov[1]) & (p[:, 1] >= self.fov[2]) & (p[:, 1] <= self.fov[3])
        frac = float(self._spawn_p[in_fov].sum())
        self._target = float(cfg.bubbles_per_frame)
        self._n_total = self._target / max(frac, 1e-3)
        self._fov_avg = self._target
        # Bubble state.
        self._next_id = 0
        self.seg = np.zeros(0, np.int64)
        self.s = np.zeros(0)
        self.rho = np.zeros(0)
        self.amp = np.zeros(0, np.complex128)
        self.ids = np.zeros(0, np.int64)
        self.death = np.zeros(0, np.int64)
        self.frame = 0
        self._spawn(int(round(self._n_total)))
        # PSF.
        self.sig_z = cfg.psf_fwhm_lambda[0] * self.lam * _FWHM_TO_SIGMA
        self.sig_x = cfg.psf_fwhm_lambda[1] * self.lam * _FWHM_TO_SIGMA
        self.rz = int(math.ceil(3.8 * self.sig_z / self.dz)) + 1
        self.rx = int(math.ceil(3.8 * self.sig_x / self.dx)) + 1
        # Tissue clutter: two fixed speckle spectra (baseband, padded grid) and the slow trajectory.
        self._clutter_on = cfg.clutter_db is not None
        if self._clutter_on:
            self._pad = 8 + int(math.ceil(cfg.tissue_motion_lambda * self.lam / min(self.dz, self.dx)))
            zp, xp = self.Z + 2 * self._pad, self.X + 2 * self._pad
            kz = np.fft.fftfreq(zp, d=self.dz)[:, None]
            kx = np.fft.fftfreq(xp, d=self.dx)[None, :]
            self._kz, self._kx = kz, kx
            h = np.exp(-2.0 * math.pi ** 2 * (self.sig_z ** 2 * kz ** 2 + self.sig_x ** 2 * kx ** 2))
            rms = 10.0 ** (cfg.clutter_db / 20.0)
            h = h * (rms / math.sqrt(np.mean(h ** 2)))  # unit-variance white spectra -> rms `clutter_db`
            self._patterns = (self._cnormal(self._rng_clutter, (2, zp, xp)) * h.astype(np.float32)).astype(np.complex64)
            self.tissue = TissueModel(cfg, self._rng_clutter)
        z = self.z0 + self.dz * np.arange(self.Z)
        self._carrier_z = np.exp(1j * 4.0 * math.pi * z / self.lam)[:, None]

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _cnormal(rng, shape):
        # Unit-variance circular complex Gaussian (complex64), drawn in one call so the stream does not
        # depend on how the caller splits it.
        g = rng.standard_normal(tuple(shape) + (2,), dtype=np.float32)
        g *= np.float32(math.sqrt(0.5))
        return g.view(np.complex64)[..., 0]

    def _spawn(self, n: int) -> None:
        if n <= 0:
            return
        rng = self._rng_bub
        net = self.network
        k = rng.choice(self._spawn_p.size, size=n, p=self._spawn_p)
        seg = self._seg_of_point[k]
        s = (k - net.offset[seg] + rng.random(n)) * net.ds_mm
        s = np.minimum(s, net.length_mm[seg] * (1 - 1e-9))
        rho = rng.uniform(-1.0, 1.0, n)
        sd = self.cfg.amplitude_log_sd
        a = np.exp(rng.standard_normal(n) * sd - sd * sd / 2.0)  # log-normal, mean 1
        amp = a * np.exp(1j * rng.uniform(0, 2 * math.pi, n))
        life = np.maximum(1, np.round(rng.exponential(self.cfg.bubble_lifetime_ms * 1e-3 / self.dt, n))).astype(np.int64)
        self.seg = np.concatenate([self.seg, seg])
        self.s = np.concatenate([self.s, s])
        self.rho = np.concatenate([self.rho, rho])
        self.amp = np.concatenate([self.amp, amp])
        self.ids = np.concatenate([self.ids, np.arange(self._next_id, self._next_id + n)])
        self.death = np.concatenate([self.death, self.frame + life])
        self._next_id += n

    def positions(self) -> np.ndarray:
        """Current bubble positions [B, 2] (z, x) mm."""
        net = self.network
        centre, normal = net.locate(self.seg, self.s)
        return centre + (self.rho * net.radius_mm[self.seg])[:, None] * normal

    def speeds_mm_s(self) -> np.ndarray:
        return self.vmax[self.seg] * (1.0 - self.rho ** 2)

    def _advance(self) -> None:
        """Move every bubble by one frame; drop the dead; top the population up."""
        net = self.network
        rng = self._rng_bub
        sign = self.flow_sign[self.seg]
        s = self.s + sign * self.speeds_mm_s() * self.dt
        seg = self.seg.copy()
        alive = np.ones(seg.size, bool)
        for _ in range(32):
            over = alive & (s >= net.length_mm[seg]) & (self.flow_sign[seg] > 0)
            under = alive & (s < 0) & (self.flow_sign[seg] < 0)
            if not (over.any() or under.any()):
                break
            if over.any():
                i = np.nonzero(over)[0]
                c = net.children[seg[i]]
                r3 = np.where(c >= 0, net.radius_mm[np.maximum(c, 0)] ** 3, 0.0)
                tot = r3.sum(axis=1)
                dead = tot <= 0
                pick = np.where(rng.random(i.size) * np.where(dead, 1.0, tot) < r3[:, 0], c[:, 0], c[:, 1])
                alive[i[dead]] = False
                ok = i[~dead]
                s[ok] -= net.length_mm[seg[ok]]
                old = seg[ok]
                seg[ok] = pick[~dead]
                self._keep_lateral(ok, old, seg[ok], net.offset[old] + net.n_points[old] - 1, net.offset[seg[ok]])
            if under.any():
                i = np.nonzero(under)[0]
                par = self.parent[seg[i]]
                alive[i[par < 0]] = False
                ok = i[par >= 0]
                old = seg[ok]
                seg[ok] = par[par >= 0]
                s[ok] += net.length_mm[seg[ok]]
                self._keep_lateral(ok, old, seg[ok], net.offset[old], net.offset[seg[ok]] + net.n_points[seg[ok]] - 1)
        s = np.clip(s, 0.0, net.length_mm[seg] * (1 - 1e-9))
        self.frame += 1
        alive &= self.death > self.frame
        self.seg, self.s = seg[alive], s[alive]
        self.rho, self.amp, self.ids, self.death = self.rho[alive], self.amp[alive], self.ids[alive], self.death[alive]

    def _keep_lateral(self, idx, old_seg, new_seg, old_point, new_point) -> None:
        """After bubbles `idx` crossed a junction (sample old_point of old_seg = sample new_point of
        new_seg), re-express their lateral offset in the new segment so that their position stays
        continuous: the two normals differ by the branching angle."""
        net = self.network
        p = net.points[old_point] + (self.rho[idx] * net.radius_mm[old_seg])[:, None] * net.normals[old_point]
        lateral = np.einsum("ij,ij->i", p - net.points[new_point], net.normals[new_point])
        self.rho[idx] = np.clip(lateral / net.radius_mm[new_seg], -0.98, 0.98)

    def _regulate(self, n_in_fov: int) -> None:
        # Gentle integral control of the population so the FOV count averages the target.
        if self._target <= 0:
            return
        self._fov_avg += 0.05 * (n_in_fov - self._fov_avg)
        ratio = self._target / max(self._fov_avg, 0.5)
        self._n_total *= float(np.clip(ratio, 0.9, 1.1)) ** 0.05
        self._spawn(int(round(self._n_total)) - self.seg.size)

    # -- image formation -------------------------------------------------------------------------
    def _render_bubbles(self, out: np.ndarray, frame_idx: np.ndarray, pos: np.ndarray, amp: np.ndarray) -> None:
        """Add PSFs for bubbles (frame_idx within the block, pos (z, x) mm, complex amp) to out [F, Z, X]."""
        if pos.shape[0] == 0:
            return
        F, Z, X = out.shape
        rz, rx = self.rz, self.rx
        uz = (pos[:, 0] - self.z0) / self.dz
        ux = (pos[:, 1] - self.x0) / self.dx
        iz = np.floor(uz).astype(np.int64)[:, None] + np.arange(-rz + 1, rz + 1)[None, :]
        ix = np.floor(ux).astype(np.int64)[:, None] + np.arange(-rx + 1, rx + 1)[None, :]
        dzm = self.z0 + iz * self.dz - pos[:, :1]
        dxm = self.x0 + ix * self.dx - pos[:, 1:2]
        ez = np.exp(-0.5 * (dzm / self.sig_z) ** 2 + 1j * 4.0 * math.pi * dzm / self.lam) * amp[:, None]
        ex = np.exp(-0.5 * (dxm / self.sig_x) ** 2)
        val = (ez[:, :, None] * ex[:, None, :]).reshape(-1)
        # Accumulate on a grid padded by twice the PSF reach (callers only pass bubbles whose pixel lies
        # within one reach of the grid), so no index needs masking; the padding is cropped afterwards.
        pz, px = 2 * rz, 2 * rx
        Zp, Xp = Z + 2 * pz, X + 2 * px
        flat = ((frame_idx[:, None, None] * Zp + (iz + pz)[:, :, None]) * Xp + (ix + px)[:, None, :]).reshape(-1)
        n = F * Zp * Xp
        acc = np.bincount(flat, weights=val.real, minlength=n) + 1j * np.bincount(flat, weights=val.imag, minlength=n)
        out += acc.reshape(F, Zp, Xp)[:, pz:pz + Z, px:px + X]

    def _clutter_block(self, start: int, F: int) -> np.ndarray:
        """Tissue clutter for frames start..start+F-1: [F, Z, X] complex64."""
        frames = start + np.arange(F)
        phi = self.tissue.angle(frames)
        dz, dx = self.tissue.displacement_mm(frames)
        c = np.cos(phi).astype(np.float32)[:, None, None]
        s = np.sin(phi).astype(np.float32)[:, None, None]
        spec = c * self._patterns[0][None] + s * self._patterns[1][None]
        # Sub-pixel rigid shift by a phase ramp (separable in z and x), then back to space.
        spec *= np.exp(-2j * math.pi * self._kz[None] * dz[:, None, None]).astype(np.complex64)
        spec *= np.exp(-2j * math.pi * self._kx[None] * dx[:, None, None]).astype(np.complex64)
        field = np.fft.ifft2(spec, norm="ortho", axes=(1, 2))
        p = self._pad
        # Axial motion also turns the carrier phase (two-way): exp(-i 4 pi dz / lambda).
        turn = np.exp(-1j * 4.0 * math.pi * dz / self.lam)[:, None, None]
        return (field[:, p:p + self.Z, p:p + self.X] * self._carrier_z[None] * turn).astype(np.complex64)

    def step(self) -> BubbleFrame:
        """The current frame's bubbles (positions, amplitudes, ids, ground truth), then move every bubble
        to the next frame (advance, drop the dead, regulate the population). One call per frame."""
        fz0, fz1, fx0, fx1 = self.fov
        pos = self.positions()
        in_fov = (pos[:, 0] >= fz0) & (pos[:, 0] < fz1) & (pos[:, 1] >= fx0) & (pos[:, 1] < fx1)
        g = np.empty((int(in_fov.sum()), 4))
        g[:, 0] = self.frame
        g[:, 1:3] = pos[in_fov]
        g[:, 3] = self.ids[in_fov]
        state = BubbleFrame(index=int(self.frame), positions=pos, amplitudes=self.amp.copy(), ids=self.ids.copy(),
                            in_fov=in_fov, gt=g[np.argsort(g[:, 3], kind="stable")])
        self._advance()
        self._regulate(int(in_fov.sum()))
        return state

    def blocks(self, progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        cfg = self.cfg
        T = int(cfg.n_frames)
        for start in range(0, T, _BLOCK):
            F = min(_BLOCK, T - start)
            fr_list, pos_list, amp_list, gt_list = [], [], [], []
            for f in range(F):
                st = self.step()
                pos = st.positions
                # Bubbles outside the FOV still shine into it: keep those within one PSF reach.
                pz = np.floor((pos[:, 0] - self.z0) / self.dz)
                px = np.floor((pos[:, 1] - self.x0) / self.dx)
                near = (pz >= -self.rz) & (pz <= self.Z - 1 + self.rz) & (px >= -self.rx) & (px <= self.X - 1 + self.rx)
                fr_list.append(np.full(int(near.sum()), f, np.int64))
                pos_list.append(pos[near])
                amp_list.append(st.amplitudes[near])
                gt_list.append(st.gt)
            bub = np.zeros((F, self.Z, self.X), np.complex128)
            self._render_bubbles(bub, np.concatenate(fr_list), np.concatenate(pos_list), np.concatenate(amp_list))
            block = bub.astype(np.complex64)
            if self._clutter_on:
                block += self._clutter_block(start, F)
            if cfg.noise_db is not None:
                noise = self._cnormal(self._rng_noise, block.shape)
                noise *= np.float32(10.0 ** (cfg.noise_db / 20.0))
                block += noise
            if progress is not None:
                progress(start + F, T)
            yield start, block, np.concatenate(gt_list)

    def attrs(self) -> dict:
        return {
            "simulator": "ultrasound_ai.ulm.simulator (fast analytic PSF)",
            "ulm_sim_version": ULM_SIM_VERSION,
            "sim_seed": int(self.cfg.seed),
            "sim_bubbles_per_frame": float(self.cfg.bubbles_per_frame),
            "sim_clutter_db": "off" if self.cfg.clutter_db is None else float(self.cfg.clutter_db),
            "sim_noise_db": "off" if self.cfg.noise_db is None else float(self.cfg.noise_db),
            "sim_config": self.cfg.as_attrs(),
            "sim_db_reference": "mean bubble peak amplitude (0 dB); clutter and noise are rms amplitudes",
            "sim_n_vessel_segments": int(self.network.n_segments),
        }


def simulate_acquisition(config: UlmSimConfig | None = None, progress=None, **overrides):
    """Simulate a whole acquisition in memory; returns an `Acquisition` (iq + gt_positions)."""
    from ultrasound_ai.io.ulm_files import Acquisition

    cfg = dataclasses.replace(config or UlmSimConfig(), **overrides)
    sim = FlowSimulator(cfg)
    frames = np.empty((int(cfg.n_frames), sim.Z, sim.X), np.complex64)
    gts = []
    for start, block, gt in sim.blocks(progress):
        frames[start:start + block.shape[0]] = block
        gts.append(gt)
    return Acquisition(iq=frames, pixel_size_mm=cfg.pixel_size_mm, origin_mm=cfg.origin_mm,
                       frame_rate_hz=cfg.frame_rate_hz, wavelength_mm=cfg.wavelength_mm,
                       gt_positions=np.concatenate(gts), attrs=sim.attrs(), source="simulated acquisition")


def simulate_to_file(path, config: UlmSimConfig | None = None, progress=None, **overrides):
    """Simulate straight to an acquisition file, block by block (long acquisitions never sit in memory)."""
    from ultrasound_ai.io.ulm_files import AcquisitionWriter

    cfg = dataclasses.replace(config or UlmSimConfig(), **overrides)
    sim = FlowSimulator(cfg)
    with AcquisitionWriter(path, (int(cfg.n_frames), sim.Z, sim.X), "iq", pixel_size_mm=cfg.pixel_size_mm,
                           origin_mm=cfg.origin_mm, frame_rate_hz=cfg.frame_rate_hz,
                           wavelength_mm=cfg.wavelength_mm, attrs=sim.attrs()) as w:
        for start, block, gt in sim.blocks(progress):
            w.write(start, block)
            w.add_gt_positions(gt)
    return path
