"""A seeded B-mode image simulator with ground truth, for pre-training, fine-tuning and tests.

An image is built in four steps, each a crude but physically motivated stand-in:

1. Echogenicity map (linear backscatter amplitude, 1 = reference tissue) of an organ: curved tissue
   layers (skin, fat, gland, muscle, fascia...), vessels or cysts (anechoic, with posterior enhancement),
   and a smooth random texture modulation. Organs: breast, thyroid, liver, muscle.
2. An optional lesion, which decides the class label:
   * benign (label 0): round or oval, smooth boundary; hypo-, iso- (with a dark halo, as a capsule) or
     hyperechoic; no posterior effect or posterior enhancement;
   * malignant (label 1): irregular, spiculated boundary, hypoechoic and heterogeneous, with an echogenic
     rim and posterior acoustic shadowing;
   * normal (label 2): no lesion (an all-background mask).
   Posterior effects are applied per column below the lesion's deepest point, decaying with depth.
3. Speckle: complex Gaussian scatterers weighted by the echogenicity (an amplitude) convolved with a complex
   (baseband) point-spread function, axial resolution finer than lateral, then the envelope. Optionally
   sparse scatterers (not fully developed speckle) and a focused beam (lateral width growing away from
   the focus).
4. Depth attenuation (partly compensated, as TGC would), optional receiver noise, log compression to a
   45 dB dynamic range, and scaling to [0, 1].

Every scanner setting of steps 3-4 (and the lesion's contrast and size) is an argument of simulate_bmode;
an image set draws them per image from ranges (APPEARANCE_KEYS; SCANNER_VARIATION is the broad band real
scanners span), from a stream of its own, so the anatomy and label of image i do not depend on them.

Geometry: rows are depth (axial), columns lateral; the field of view is fov_mm (lateral, depth) whatever
the pixel count, so the speckle grain keeps its physical size. The class order follows BUSI's folders:
CLASS_NAMES = ("benign", "malignant", "normal").

Everything is drawn from one numpy Generator, so a seed gives the same image on every machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import InputError

__all__ = ["SIMULATOR_VERSION", "CLASS_NAMES", "ORGANS", "BModeImage", "simulate_bmode", "simulate_batch",
           "sample_seed", "write_busi_folder", "APPEARANCE_KEYS", "SCANNER_VARIATION", "check_appearance",
           "draw_appearance", "speckle_field"]

SIMULATOR_VERSION = "usfm-bmode-1"
CLASS_NAMES = ("benign", "malignant", "normal")
ORGANS = ("breast", "thyroid", "liver", "muscle")
LESION_CLASSES = (0, 1)
LESION_MODELS = ("v1", "birads")
DEFAULT_FOV_MM = (40.0, 40.0)  # (lateral, depth) field of view of every simulated data set


@dataclass
class BModeImage:
    image: np.ndarray  # float32 [H, W] in [0, 1]
    mask: np.ndarray  # uint8 [H, W]: 1 inside the lesion
    label: int  # index into CLASS_NAMES
    organ: str
    pixel_spacing_mm: tuple[float, float]  # (x = lateral column spacing, y = depth row spacing), ITK order
    info: dict = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def sample_seed(base_seed: int, index: int) -> np.random.SeedSequence:
    """The seed of image `index` of a simulated data set (independent streams per index)."""
    return np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, 7, int(index)])


def _smooth_noise(rng, shape, sigma_px) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="wrap")
    return n / (n.std() + 1e-12)


def _interface(rng, x_mm, depth_mm, amplitude_mm, period_range=(15.0, 60.0)) -> np.ndarray:
    """A smooth curved boundary depth(x) in mm."""
    period = rng.uniform(*period_range)
    phase = rng.uniform(0, 2 * np.pi)
    second = rng.uniform(-0.4, 0.4)
    return depth_mm + amplitude_mm * (np.sin(2 * np.pi * x_mm / period + phase) + second * np.sin(4 * np.pi * x_mm / period))


def _layers(rng, z, x_mm, boundaries_mm, values) -> np.ndarray:
    """Echogenicity of stacked layers: values[k] between boundaries k-1 and k (curves over x)."""
    e = np.full(z.shape, float(values[-1]))
    # Paint deepest first, so each shallower layer overwrites above its lower boundary.
    for k in range(len(boundaries_mm) - 1, -1, -1):
        e = np.where(z < boundaries_mm[k][None, :], values[k], e)
    return e


def _ellipse(z, x, cz, cx, a, b, angle) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = ((x - cx) * c + (z - cz) * s) / a
    v = (-(x - cx) * s + (z - cz) * c) / b
    return u * u + v * v


def _organ(rng, organ: str, z, x, depth_mm, width_mm, sigma_px, cysts: bool = True) -> tuple[np.ndarray, list]:
    """Echogenicity map of the organ's tissue and the anechoic structures (vessels, cysts) in it."""
    xs = x[0]
    skin = _interface(rng, xs, rng.uniform(1.0, 2.0), 0.2)
    anechoic = []
    if organ == "breast":
        fat = _interface(rng, xs, rng.uniform(5, 9), rng.uniform(0.5, 2.0))
        gland = _interface(rng, xs, rng.uniform(22, 30), rng.uniform(1.0, 3.0))
        retro = gland + rng.uniform(3, 6)
        e = _layers(rng, z, xs, [skin, fat, gland, retro], [2.2, 0.55, 1.3, 0.5, 0.9])
        # Fibrous striations in the gland and the muscle: thin oblique bright streaks.
        streak = np.sin(2 * np.pi * (z * np.cos(0.25) + x * np.sin(0.25)) / rng.uniform(2.5, 4.0))
        e = e * (1.0 + 0.25 * np.clip(streak, 0, None) * ((z > gland[None]) | ((z > fat[None]) & (z < gland[None]))))
    elif organ == "thyroid":
        strap = _interface(rng, xs, rng.uniform(4, 6), 0.5)
        capsule = _interface(rng, xs, rng.uniform(8, 11), 0.8)
        back = _interface(rng, xs, rng.uniform(28, 34), 1.5)
        e = _layers(rng, z, xs, [skin, strap, capsule, back], [2.0, 0.8, 0.7, 1.5, 0.8])
        side = rng.choice([0.15, 0.85])
        anechoic.append((rng.uniform(14, 22), side * width_mm, rng.uniform(3.0, 4.5), rng.uniform(3.0, 4.5), 0.0))
    elif organ == "liver":
        wall = _interface(rng, xs, rng.uniform(6, 10), 1.0)
        diaphragm = _interface(rng, xs, rng.uniform(0.8, 0.95) * depth_mm, 3.0)
        e = _layers(rng, z, xs, [skin, wall, diaphragm, diaphragm + 1.2], [2.0, 0.7, 1.0, 2.5, 0.6])
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(1.0, 2.5)
            anechoic.append((rng.uniform(12, depth_mm * 0.75), rng.uniform(0, width_mm), r * rng.uniform(1.0, 2.0), r,
                             rng.uniform(0, np.pi)))
    elif organ == "muscle":
        fat = _interface(rng, xs, rng.uniform(3, 6), 0.6)
        bounds = [skin, fat]
        values = [2.0, 0.6]
        d = fat
        while True:
            d = d + rng.uniform(6, 14)
            if d.min() > depth_mm:
                break
            bounds += [d, d + 0.8]
            values += [0.8, 2.2]  # muscle belly, then a bright fascia
        values.append(0.8)
        e = _layers(rng, z, xs, bounds, values)
        fib = np.sin(2 * np.pi * (z + 0.15 * x) / rng.uniform(1.5, 2.5))
        e = e * (1.0 + 0.3 * np.clip(fib, 0, None))
    else:
        raise InputError(f"B-mode simulator organ {organ!r}: unknown; expected one of {list(ORGANS)}")
    # Simple cysts: anechoic, smooth; they are not lesions of the label (distractors for thresholding).
    for _ in range(int(rng.integers(0, 2)) if cysts else 0):
        r = rng.uniform(1.2, 3.0)
        anechoic.append((rng.uniform(10, depth_mm * 0.8), rng.uniform(0.1, 0.9) * width_mm, r * rng.uniform(1.0, 1.5),
                         r, rng.uniform(0, np.pi)))
    e = e * np.exp(0.2 * _smooth_noise(rng, z.shape, 4 * sigma_px))
    return e, anechoic


def _lesion_shape(rng, z, x, label, depth_mm, width_mm, scale=1.0) -> tuple[np.ndarray, dict]:
    """Boolean lesion mask from a polar radius function: smooth for benign, spiculated for malignant."""
    r0 = rng.uniform(3.5, 8.0) * float(scale)
    cz = rng.uniform(max(10.0, r0 + 4), max(11.0, depth_mm * 0.65))
    cx = rng.uniform(0.25, 0.75) * width_mm
    if label == 0:
        aspect = rng.uniform(1.0, 1.7)  # wider than tall ("parallel" orientation)
        angle = rng.uniform(-0.3, 0.3)
        harmonics = [(k, rng.uniform(0, 0.04), rng.uniform(0, 2 * np.pi)) for k in (2, 3)]
        spikes = []
    else:
        aspect = rng.uniform(0.7, 1.1)  # often taller than wide
        angle = rng.uniform(-np.pi, np.pi)
        harmonics = [(k, rng.uniform(0.05, 0.15), rng.uniform(0, 2 * np.pi)) for k in range(3, 8)]
        spikes = [(rng.uniform(-np.pi, np.pi), rng.uniform(0.25, 0.6), rng.uniform(0.05, 0.12))
                  for _ in range(int(rng.integers(4, 9)))]
    c, s = np.cos(angle), np.sin(angle)
    u = ((x - cx) * c + (z - cz) * s) / aspect
    v = -(x - cx) * s + (z - cz) * c
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k, amp, ph in harmonics:
        radius += amp * np.cos(k * theta + ph)
    for th, amp, width in spikes:
        d = np.angle(np.exp(1j * (theta - th)))
        radius += amp * np.exp(-0.5 * (d / width) ** 2)
    mask = rho < r0 * radius
    return mask, {"centre_mm": [float(cx), float(cz)], "radius_mm": float(r0)}


def _birads_lesion(rng, e, z, x, label, depth_mm, width_mm, sigma_px, scale=1.0, contrast=1.0):
    """A mass drawn with the BI-RADS ultrasound descriptors that separate BUSI's benign and malignant
    classes, each a tendency with overlap, not a rule (see the probabilities):

    * benign: oval, circumscribed, parallel (wider than tall), homogeneous; mostly hypoechoic (some iso-
      or hyperechoic with a thin dark capsule); posterior enhancement or none, rarely shadowing;
      sometimes gently lobulated;
    * malignant: irregular (angular, microlobulated) or spiculated margin, often indistinct; not parallel
      (taller than wide); hypoechoic and heterogeneous; often an echogenic halo; posterior shadowing
      mostly, sometimes none or enhancement.

    Returns (mask, echogenicity map with the mass, posterior factor, its decay in mm, info)."""
    r0 = rng.uniform(3.5, 8.0) * float(scale)
    cz = rng.uniform(max(10.0, r0 + 4), max(11.0, depth_mm * 0.65))
    cx = rng.uniform(0.25, 0.75) * width_mm
    if label == 0:
        aspect = rng.uniform(1.2, 2.2)  # lateral / axial extent
        angle = rng.uniform(-0.25, 0.25)
        lobes = rng.random() < 0.25
        harmonics = [(k, rng.uniform(0.04, 0.12) if lobes else rng.uniform(0, 0.04), rng.uniform(0, 2 * np.pi))
                     for k in (2, 3, 4)]
        spikes = []
        margin = "lobulated" if lobes else "circumscribed"
    else:
        aspect = rng.uniform(0.55, 1.0)  # taller than wide
        angle = rng.uniform(-0.35, 0.35)
        spiculated = rng.random() < 0.6
        harmonics = [(k, rng.uniform(0.04, 0.14), rng.uniform(0, 2 * np.pi)) for k in range(3, 10)]
        spikes = [(rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 0.6), rng.uniform(0.04, 0.1))
                  for _ in range(int(rng.integers(5, 11)) if spiculated else 0)]
        margin = "spiculated" if spiculated else "angular/microlobulated"
    c, s = np.cos(angle), np.sin(angle)
    u = ((x - cx) * c + (z - cz) * s) / np.sqrt(aspect)
    v = (-(x - cx) * s + (z - cz) * c) * np.sqrt(aspect)
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k, amp, ph in harmonics:
        radius += amp * np.cos(k * theta + ph)
    for th, amp, width in spikes:
        radius += amp * np.exp(-0.5 * (np.angle(np.exp(1j * (theta - th))) / width) ** 2)
    mask = np.hypot(u, v) < r0 * radius
    tex = _smooth_noise(rng, z.shape, rng.uniform(0.6, 1.5) * sigma_px)
    if label == 0:
        echo = str(rng.choice(["hypo", "iso", "hyper"], p=[0.75, 0.15, 0.10]))
        level = {"hypo": rng.uniform(0.12, 0.4), "iso": rng.uniform(0.75, 1.0), "hyper": rng.uniform(1.6, 2.4)}[echo]
        inner = level * np.exp(rng.uniform(0.03, 0.12) * tex)  # homogeneous
        if echo != "hypo":  # a thin dark capsule delimits a mass as bright as its surroundings
            ring = ndimage.binary_dilation(mask, iterations=max(1, int(round(0.5 * sigma_px)))) & ~mask
            e = np.where(ring, e * 0.35, e)
        posterior = str(rng.choice(["enhancement", "none", "shadowing"], p=[0.5, 0.45, 0.05]))
        edge = 0.0
    else:
        echo = "hypo"
        inner = rng.uniform(0.08, 0.3) * np.exp(rng.uniform(0.25, 0.5) * tex)  # heterogeneous
        if rng.random() < 0.6:  # echogenic halo: tumour infiltrating the surrounding tissue
            ring = ndimage.binary_dilation(mask, iterations=max(1, int(round(rng.uniform(0.8, 1.6) * sigma_px)))) & ~mask
            e = np.where(ring, e * rng.uniform(1.4, 2.0), e)
        posterior = str(rng.choice(["shadowing", "none", "enhancement"], p=[0.65, 0.28, 0.07]))
        edge = rng.uniform(0.0, 0.6) * sigma_px  # indistinct margin
    if float(contrast) != 1.0:
        inner = inner ** float(contrast)
    weight = mask.astype(np.float64)
    if edge > 0:
        weight = np.clip(ndimage.gaussian_filter(weight, edge), 0, 1)
    e = e * (1 - weight) + inner * weight
    factor = {"enhancement": rng.uniform(1.3, 1.8), "none": 1.0, "shadowing": rng.uniform(0.15, 0.5)}[posterior]
    factor = factor ** float(contrast)
    return mask, e, factor, rng.uniform(8, 25), {
        "centre_mm": [float(cx), float(cz)], "radius_mm": float(r0), "aspect": float(aspect), "margin": margin,
        "echogenicity": echo, "posterior": posterior}


def _posterior(mask: np.ndarray, z_mm: np.ndarray, factor: float, decay_mm: float, sigma_px: float) -> np.ndarray:
    """Multiplicative map: below each column's deepest masked pixel, 1 + (factor - 1) exp(-dz / decay)."""
    rows = np.arange(mask.shape[0])[:, None]
    deepest = np.where(mask.any(axis=0), np.max(np.where(mask, rows, -1), axis=0), -1)
    dz_mm = z_mm[:, 0:1] - np.where(deepest >= 0, z_mm[np.clip(deepest, 0, None), 0], np.inf)[None, :]
    effect = np.where(dz_mm > 0, np.exp(-np.clip(dz_mm, 0, None) / decay_mm), 0.0)
    effect = ndimage.gaussian_filter1d(effect, sigma_px, axis=1)  # soft lateral edges
    return 1.0 + (factor - 1.0) * effect


def speckle_field(rng, echo: np.ndarray, spacing_mm: Sequence[float], psf_mm: Sequence[float],
                  scatterer_density_mm2: float | None = None, focus_depth_mm: float | None = None) -> np.ndarray:
    """Complex (baseband) echo field [H, W] of scatterers weighted by the amplitude map `echo`.

    spacing_mm: (row = depth, column = lateral) pixel size. psf_mm: (axial, lateral) Gaussian PSF sigmas.
    scatterer_density_mm2 None: one complex Gaussian per pixel (fully developed speckle: Rayleigh
    envelope); a number: Poisson-many unit scatterers per pixel at that density, so with few scatterers
    per resolution cell the envelope is not Rayleigh (K-distributed), as in sparse tissue.
    focus_depth_mm: the transmit focus; the lateral sigma is psf_mm[1] there and widens away from it as a
    focused beam does (sigma * sqrt(1 + (dz / 8 mm)^2)); None: a depth-invariant PSF.
    """
    h, w = echo.shape
    dz, dx = float(spacing_mm[0]), float(spacing_mm[1])
    scat = rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w))
    if scatterer_density_mm2 is not None:
        lam = float(scatterer_density_mm2) * dz * dx
        # A sum of n unit complex Gaussians is one of variance n: scale by sqrt(n / mean n).
        scat = scat * np.sqrt(rng.poisson(lam, (h, w)) / lam)
    scat = scat * np.clip(echo, 0, None)
    sig_z, sig_x = float(psf_mm[0]), float(psf_mm[1])
    fz = np.fft.fftfreq(h, d=dz)[:, None]
    fx = np.fft.fftfreq(w, d=dx)[None, :]
    spectrum = np.fft.fft2(scat)

    def blurred(sx):
        # Baseband (IQ) PSF: the carrier would alias on a coarse pixel grid and does not change the envelope.
        # Fourier transform of exp(-z^2/2sz^2 - x^2/2sx^2):
        return np.fft.ifft2(spectrum * np.exp(-2 * np.pi ** 2 * (fz ** 2 * sig_z ** 2 + fx ** 2 * sx ** 2)))

    if focus_depth_mm is None:
        return blurred(sig_x)
    depth = (np.arange(h) + 0.5) * dz
    sig_rows = sig_x * np.sqrt(1.0 + ((depth - float(focus_depth_mm)) / 8.0) ** 2)
    # Space-variant blur: fields at a few lateral widths, each row interpolated between the two nearest.
    levels = np.geomspace(sig_rows.min(), sig_rows.max() * 1.0001, 6)
    fields = [blurred(sx) for sx in levels]
    k = np.clip(np.searchsorted(levels, sig_rows) - 1, 0, len(levels) - 2)
    t = ((sig_rows - levels[k]) / (levels[k + 1] - levels[k]))[:, None]
    stack = np.stack(fields)
    rows = np.arange(h)
    return (1 - t) * stack[k, rows] + t * stack[k + 1, rows]


def simulate_bmode(seed=None, size: int | Sequence[int] = 128, *, organ: str | None = None, label: int | None = None,
                   fov_mm: Sequence[float] = DEFAULT_FOV_MM, dynamic_range_db: float = 45.0,
                   psf_mm: Sequence[float] = (0.25, 0.5), gain_db: float = 0.0, tgc_slope_db_cm: float | None = None,
                   tgc_ripple_db: float = 0.0, scatterer_density_mm2: float | None = None,
                   noise_db: float | None = None, focus_depth_mm: float | None = None, lesion_contrast: float = 1.0,
                   lesion_scale: float = 1.0, lesion_model: str = "v1") -> BModeImage:
    """One simulated B-mode image [H, W] with its lesion mask and class label (see the module docstring).

    seed: an int, a SeedSequence or a numpy Generator. size: H = W, or (H, W). organ: one of ORGANS
    (random when None). label: 0 benign, 1 malignant, 2 normal (random when None).
    fov_mm: (lateral width, depth) of the field of view. psf_mm: (axial, lateral) point-spread widths.
    Scanner settings (the defaults give the original images): gain_db (overall gain after log
    compression, saturating), tgc_slope_db_cm (residual attenuation left by TGC; None: a random 0.4-1.7
    dB/cm), tgc_ripple_db (peak of a smooth random TGC error over depth), scatterer_density_mm2 and
    focus_depth_mm (see speckle_field), noise_db (receiver noise below the brightest tissue; None: a
    -60 dB floor). Lesion: lesion_contrast (exponent on its echogenicity and posterior effect: < 1 fainter),
    lesion_scale (size multiplier). lesion_model: "v1" (the original lesions; simple cysts in any organ) or
    "birads" (the BI-RADS descriptors of _birads_lesion, no simple cysts: a cyst is a benign finding).
    """
    rng = _rng(seed)
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if h < 8 or w < 8:
        raise InputError(f"B-mode simulator size: expected at least 8x8 pixels, got {h}x{w}")
    if label is not None and label not in (0, 1, 2):
        raise InputError(f"B-mode simulator label: expected 0 (benign), 1 (malignant) or 2 (normal), got {label!r}")
    if lesion_model not in LESION_MODELS:
        raise InputError(f"B-mode simulator lesion_model: expected one of {list(LESION_MODELS)}, got {lesion_model!r}")
    organ = organ if organ is not None else ORGANS[int(rng.integers(len(ORGANS)))]
    label = int(rng.integers(3)) if label is None else int(label)
    width_mm, depth_mm = float(fov_mm[0]), float(fov_mm[1])
    dx, dz = width_mm / w, depth_mm / h
    z, x = np.meshgrid((np.arange(h) + 0.5) * dz, (np.arange(w) + 0.5) * dx, indexing="ij")
    sigma_px = 1.0 / dx  # 1 mm in pixels, for smoothing scales

    e, anechoic = _organ(rng, organ, z, x, depth_mm, width_mm, sigma_px, cysts=lesion_model == "v1")
    post = np.ones_like(e)
    for cz, cx, a, b, ang in anechoic:
        inside = _ellipse(z, x, cz, cx, a, b, ang) < 1.0
        if not inside.any():
            continue
        wall = (_ellipse(z, x, cz, cx, a + 0.4, b + 0.4, ang) < 1.0) & ~inside
        e = np.where(wall, e * 1.8, e)
        e = np.where(inside, 0.02, e)
        post = post * _posterior(inside, z, rng.uniform(1.3, 1.7), rng.uniform(4, 10), 0.5 * sigma_px)

    mask = np.zeros((h, w), dtype=bool)
    info: dict = {"organ": organ, "class": CLASS_NAMES[label]}
    if label in LESION_CLASSES and lesion_model == "birads":
        mask, e, factor, decay, lesion_info = _birads_lesion(rng, e, z, x, label, depth_mm, width_mm, sigma_px,
                                                             lesion_scale, lesion_contrast)
        info.update(lesion_info)
        if factor != 1.0:
            post = post * _posterior(mask, z, factor, decay, 0.5 * sigma_px)
    elif label in LESION_CLASSES:
        mask, shape_info = _lesion_shape(rng, z, x, label, depth_mm, width_mm, lesion_scale)
        info.update(shape_info)
        tex = _smooth_noise(rng, (h, w), 1.5 * sigma_px)
        if label == 0:
            echo = rng.choice(["hypo", "iso", "hyper"], p=[0.6, 0.2, 0.2])
            level = {"hypo": rng.uniform(0.15, 0.35), "iso": rng.uniform(0.8, 1.0), "hyper": rng.uniform(1.8, 2.5)}[echo]
            inner = level * np.exp(0.1 * tex)
            ring = ndimage.binary_dilation(mask, iterations=max(1, int(round(0.6 * sigma_px)))) & ~mask
            # A thin dark halo (capsule) delimits iso- and hyperechoic lesions.
            e = np.where(ring, e * (0.35 if echo != "hypo" else 1.6), e)
            effect = rng.choice(["none", "enhancement"]) if echo == "hypo" else "none"
            factor = rng.uniform(1.3, 1.6) if effect == "enhancement" else 1.0
        else:
            echo = "hypo"
            inner = rng.uniform(0.12, 0.3) * np.exp(0.35 * tex)  # heterogeneous interior
            ring = ndimage.binary_dilation(mask, iterations=max(1, int(round(1.2 * sigma_px)))) & ~mask
            e = np.where(ring, e * rng.uniform(1.3, 1.8), e)  # echogenic halo
            effect = "shadowing"
            factor = rng.uniform(0.2, 0.5)
        if lesion_contrast != 1.0:
            inner, factor = inner ** float(lesion_contrast), factor ** float(lesion_contrast)
        e = np.where(mask, inner, e)
        if factor != 1.0:
            post = post * _posterior(mask, z, factor, rng.uniform(8, 25), 0.5 * sigma_px)
        info.update(echogenicity=str(echo), posterior=str(effect))
    e = e * post

    field = speckle_field(rng, e, (dz, dx), psf_mm, scatterer_density_mm2, focus_depth_mm)
    att = np.exp(-rng.uniform(0.005, 0.02) * z)  # residual attenuation after TGC
    floor = 1e-3 * rng.random((h, w))
    if tgc_slope_db_cm is not None or tgc_ripple_db:
        # The scanner's time-gain compensation left a residual slope (dB/cm) and a smooth ripple over depth.
        extra = np.random.default_rng(rng.integers(2 ** 63))
        profile = -float(tgc_slope_db_cm or 0.0) * z[:, 0] / 10.0
        if tgc_ripple_db:
            ripple = ndimage.gaussian_filter1d(extra.standard_normal(h), 0.12 * h, mode="nearest")
            profile = profile + float(tgc_ripple_db) * ripple / (np.abs(ripple).max() + 1e-12)
        att = np.repeat((10.0 ** (profile / 20.0))[:, None], w, axis=1)
    env = np.abs(field) * att
    if noise_db is not None:
        # Receiver noise: complex Gaussian at noise_db below the brightest tissue, after the gain stages.
        extra = np.random.default_rng(rng.integers(2 ** 63))
        level = np.percentile(env, 99.5) * 10.0 ** (float(noise_db) / 20.0)
        env = np.abs(env * np.exp(1j * np.angle(field))
                     + level * (extra.standard_normal((h, w)) + 1j * extra.standard_normal((h, w))) / np.sqrt(2))
    else:
        env = env + floor
    ref = np.percentile(env, 99.5) + 1e-12
    db = 20.0 * np.log10(env / ref + 1e-12) + float(gain_db)
    image = np.clip((db + dynamic_range_db) / dynamic_range_db, 0.0, 1.0).astype(np.float32)
    return BModeImage(image=image, mask=mask.astype(np.uint8), label=label, organ=organ,
                      pixel_spacing_mm=(float(dx), float(dz)), info=info)


# Scanner / appearance settings an image set may draw per image and the organs it may show. Each numeric
# key is a [lo, hi] range of the simulate_bmode argument of the same name (psf_axial_mm / psf_lateral_mm:
# psf_mm's two entries), drawn uniformly per image; scatterer_density_mm2 is drawn log-uniformly (it spans
# decades). A held-out set may use ranges no training set used, to measure how a model carries over.
# "lesion_model" (not a range: one of LESION_MODELS) picks the lesion descriptors of the whole set.
_RANGE_KEYS = ("dynamic_range_db", "psf_axial_mm", "psf_lateral_mm", "gain_db", "tgc_slope_db_cm", "tgc_ripple_db",
               "scatterer_density_mm2", "noise_db", "focus_depth_mm", "lesion_contrast", "lesion_scale")
APPEARANCE_KEYS = _RANGE_KEYS + ("organs", "lesion_model")
_SIGNED_KEYS = ("gain_db", "tgc_slope_db_cm", "tgc_ripple_db", "noise_db")  # may be zero or negative
_LOG_UNIFORM_KEYS = ("scatterer_density_mm2",)

# How far real scanners and presets vary an image (a broad band, chosen from what clinical systems offer,
# not from any test set): log compression 30-80 dB; axial PSF sigma 0.1-0.5 mm (about 15 down to 3 MHz);
# lateral sigma at the focus 0.2-1.0 mm, the focus anywhere from 8 to 35 mm deep; gain -12 to +6 dB (the
# simulator already puts its brightest tissue at white, so more gain only saturates); TGC left
# uncompensated by -1.5 to +3 dB/cm with up to 6 dB of ripple; 0.5-50 scatterers per mm^2 (from about one
# per resolution cell, sparse speckle, to fully developed); receiver noise 35-70 dB below the brightest
# tissue; lesions 0.6-1.4x as contrasted and 0.7-1.4x as large as the simulator's nominal ones.
SCANNER_VARIATION = {
    "dynamic_range_db": [30.0, 80.0], "psf_axial_mm": [0.1, 0.5], "psf_lateral_mm": [0.2, 1.0],
    "gain_db": [-12.0, 6.0], "tgc_slope_db_cm": [-1.5, 3.0], "tgc_ripple_db": [0.0, 6.0],
    "scatterer_density_mm2": [0.5, 50.0], "noise_db": [-70.0, -35.0], "focus_depth_mm": [8.0, 35.0],
    "lesion_contrast": [0.6, 1.4], "lesion_scale": [0.7, 1.4],
}


def check_appearance(appearance, what: str = "appearance") -> dict:
    """Validated copy of an appearance mapping (see APPEARANCE_KEYS); InputError naming the bad entry."""
    if not isinstance(appearance, dict):
        raise InputError(f"{what}: expected a mapping with keys among {list(APPEARANCE_KEYS)}, got {appearance!r}")
    unknown = sorted(set(appearance) - set(APPEARANCE_KEYS))
    if unknown:
        raise InputError(f"{what}: unknown key(s) {unknown}; expected some of {list(APPEARANCE_KEYS)}")
    out = {}
    for key in _RANGE_KEYS:
        if key in appearance:
            v = appearance[key]
            signed = key in _SIGNED_KEYS
            if (not isinstance(v, (list, tuple)) or len(v) != 2
                    or not all(isinstance(t, (int, float)) and np.isfinite(t) for t in v)
                    or not v[0] <= v[1] or (not signed and not v[0] > 0)):
                expected = "lo <= hi" if signed else "0 < lo <= hi"
                raise InputError(f"{what}.{key}: expected [lo, hi] with {expected}, got {v!r}")
            out[key] = [float(v[0]), float(v[1])]
    if "organs" in appearance:
        organs = list(appearance["organs"])
        if not organs or any(o not in ORGANS for o in organs):
            raise InputError(f"{what}.organs: expected a non-empty list among {list(ORGANS)}, got {organs!r}")
        out["organs"] = organs
    if "lesion_model" in appearance:
        if appearance["lesion_model"] not in LESION_MODELS:
            raise InputError(f"{what}.lesion_model: expected one of {list(LESION_MODELS)}, "
                             f"got {appearance['lesion_model']!r}")
        out["lesion_model"] = str(appearance["lesion_model"])
    return out


def draw_appearance(base_seed: int, index: int, appearance: dict) -> dict:
    """simulate_bmode keyword arguments for image `index`, drawn from its own stream (so the anatomy
    stream, hence the lesion and label of image i, is the same with or without an appearance)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, 17, int(index)]))
    kw: dict = {}
    # The first three draws keep their order, so sets drawn before the other keys existed are unchanged.
    if "dynamic_range_db" in appearance:
        kw["dynamic_range_db"] = float(rng.uniform(*appearance["dynamic_range_db"]))
    ax = rng.uniform(*appearance.get("psf_axial_mm", (0.25, 0.25)))
    lat = rng.uniform(*appearance.get("psf_lateral_mm", (0.5, 0.5)))
    kw["psf_mm"] = (float(ax), float(lat))
    if "organs" in appearance:
        kw["organ"] = str(appearance["organs"][int(rng.integers(len(appearance["organs"])))])
    for key in _RANGE_KEYS[3:]:
        if key in appearance:
            lo, hi = appearance[key]
            kw[key] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))) if key in _LOG_UNIFORM_KEYS
                            else rng.uniform(lo, hi))
    if "lesion_model" in appearance:
        kw["lesion_model"] = appearance["lesion_model"]
    return kw


def simulate_batch(base_seed: int, indices: Sequence[int], size=128, *, labels: Sequence[int] | None = None,
                   organ: str | None = None, appearance: dict | None = None) -> list[BModeImage]:
    """Images `indices` of the data set `base_seed` (image i depends only on (base_seed, i)). With
    `labels`, each image's class is drawn from that list (from the image's own stream). With
    `appearance` (see APPEARANCE_KEYS), each image's scanner settings (and organ) are drawn from it."""
    app = check_appearance(appearance) if appearance else None
    out = []
    for i in indices:
        rng = np.random.default_rng(sample_seed(base_seed, i))
        label = None if not labels else int(labels[int(rng.integers(len(labels)))])
        kw = draw_appearance(base_seed, i, app) if app else {}
        if organ is not None:
            kw["organ"] = organ
        out.append(simulate_bmode(rng, size, label=label, **kw))
    return out


def _write_png(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array)), str(tmp))


def write_busi_folder(folder: str | os.PathLike, count: int, seed: int = 0, size=128,
                      labels: Sequence[int] = (0, 1, 2), progress=None) -> dict:
    """Write `count` simulated images in the BUSI layout: CLASS/CLASS (n).png (8-bit grey) with
    CLASS (n)_mask.png (0/255), n from 1 per class. Returns {"counts": {class: n}, "seed", "version"}."""
    if count < 1:
        raise InputError(f"simulate count: expected at least 1 image, got {count}")
    labels = [int(v) for v in labels]
    if not labels or any(v not in (0, 1, 2) for v in labels):
        raise InputError(f"simulate labels: expected some of 0, 1, 2 (benign, malignant, normal), got {labels}")
    folder = Path(folder)
    counts = {name: 0 for name in CLASS_NAMES}
    for i in range(count):
        rng = np.random.default_rng(sample_seed(seed, i))
        sample = simulate_bmode(rng, size, label=labels[int(rng.integers(len(labels)))])
        name = sample.class_name
        counts[name] += 1
        stem = f"{name} ({counts[name]})"
        _write_png(np.round(sample.image * 255).astype(np.uint8), folder / name / f"{stem}.png")
        _write_png(sample.mask.astype(np.uint8) * 255, folder / name / f"{stem}_mask.png")
        if progress is not None:
            progress((i + 1) / count)
    return {"counts": counts, "seed": int(seed), "simulator_version": SIMULATOR_VERSION, "size": size}
