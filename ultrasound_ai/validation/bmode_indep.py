"""An independent B-mode image family (``bmode-indep-v1``) for validating the foundation classifier only.

Written separately from the training simulator (ultrasound_ai.foundation.bmode_sim) and importing
nothing from it, so a model that learned that simulator's quirks is caught out. It differs in how an
image is formed, not only in settings:

* a convex (curvilinear) probe: the image is a fan of beams from an apex above the skin, black outside
  the fan, as scanner screens show it; the training images are rectangular (linear probe);
* echoes are formed along each beam in polar coordinates (sparse point scatterers with random
  amplitudes, a Gabor pulse along the beam and a Gaussian beam profile across it), then scan-converted
  to the Cartesian grid;
* posterior effects follow the beams (radially), not the image columns;
* tissue is a sum of random oriented gratings and smooth blobs, not curved layers; lesion outlines are
  super-ellipses (benign) and random star polygons (malignant).

Classes as BUSI: 0 benign (smooth, wider than tall, hypo- or anechoic, thin bright capsule, posterior
enhancement), 1 malignant (spiculated, taller than wide, heterogeneous and dark, posterior shadow),
2 normal (no lesion). Images are [size, size] float32 in [0, 1] over a 40 mm x 40 mm field
(0.3125 mm pixels at 128 px), the classifier's training pixel size. Image i of set `seed` depends only
on (seed, i).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FAMILY = "bmode-indep-v1"
FIELD_MM = 40.0


def _fan(size: int, rng):
    """Polar coordinates (r mm from the apex, angle rad) of every pixel, and the inside-the-fan mask."""
    apex_mm = rng.uniform(15.0, 30.0)  # apex above the top row
    half_angle = np.deg2rad(rng.uniform(28.0, 40.0))
    px = FIELD_MM / size
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    xm = (x + 0.5) * px - FIELD_MM / 2
    ym = (y + 0.5) * px + apex_mm
    r = np.hypot(xm, ym)
    theta = np.arctan2(xm, ym)
    inside = (np.abs(theta) <= half_angle) & (r >= apex_mm + 0.5)
    return r, theta, inside, apex_mm, px


def _tissue(shape, rng) -> np.ndarray:
    """Echogenicity: random oriented gratings plus smooth blobs around 1."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64) / max(shape)
    e = np.ones(shape)
    for _ in range(int(rng.integers(2, 5))):
        ang, freq, amp = rng.uniform(0, np.pi), rng.uniform(2.0, 9.0), rng.uniform(0.1, 0.35)
        e += amp * np.sin(2 * np.pi * freq * (x * np.cos(ang) + y * np.sin(ang)) + rng.uniform(0, 2 * np.pi))
    blobs = ndimage.gaussian_filter(rng.standard_normal(shape), max(shape) / 10)
    e *= np.exp(0.8 * blobs / (blobs.std() + 1e-9))
    return np.clip(e, 0.15, None)


def _lesion(r, theta, label: int, apex_mm: float, rng):
    """Mask of the lesion in polar terms (radial depth of its centre chosen inside the fan)."""
    rc = apex_mm + rng.uniform(12.0, 28.0)
    tc = rng.uniform(-0.2, 0.2)
    # Local Cartesian frame at the lesion centre: u across the beam, v along it (mm).
    u = r * np.sin(theta - tc)
    v = r * np.cos(theta - tc) - rc
    if label == 0:
        a, b = rng.uniform(4.0, 8.0), rng.uniform(2.5, 5.0)  # wider than tall
        p = rng.uniform(2.0, 3.0)
        return (np.abs(u / a) ** p + np.abs(v / b) ** p) <= 1.0
    k = int(rng.integers(7, 13))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(2.5, 7.0, k) * np.where(np.arange(k) % 2 == 0, 1.0, rng.uniform(0.4, 0.7))
    phi = np.arctan2(v * 0.8, u)  # taller than wide
    rho = np.hypot(u, v * 0.8)
    bound = np.interp(phi % (2 * np.pi), np.concatenate([ang, ang[:1] + 2 * np.pi]),
                      np.concatenate([rad, rad[:1]]))
    return rho <= bound


def _beam_shadow(mask, r, theta, factor: float, decay_mm: float, inside) -> np.ndarray:
    """Multiplicative map below the lesion along each beam: 1 + (factor - 1) exp(-(r - r_bottom) / decay)."""
    bins = np.linspace(theta[inside].min(), theta[inside].max(), 96)
    idx = np.clip(np.digitize(theta, bins), 0, len(bins))
    deepest = np.full(len(bins) + 1, -np.inf)
    np.maximum.at(deepest, idx[mask], r[mask])
    d = r - deepest[idx]
    effect = np.where(np.isfinite(deepest[idx]) & (d > 0), np.exp(-np.clip(d, 0, None) / decay_mm), 0.0)
    return 1.0 + (factor - 1.0) * ndimage.gaussian_filter(effect, 1.0)


def _speckle(echo, r, theta, inside, px, rng) -> np.ndarray:
    """Envelope of sparse scatterers imaged by a Gabor pulse along the beam and a Gaussian beam across it,
    formed on a polar grid and scan-converted."""
    n_r, n_t = 256, 160
    r_axis = np.linspace(r[inside].min(), r[inside].max(), n_r)
    t_axis = np.linspace(theta[inside].min(), theta[inside].max(), n_t)
    dr = r_axis[1] - r_axis[0]
    # Echogenicity sampled on the polar grid (nearest Cartesian pixel).
    rr, tt = np.meshgrid(r_axis, t_axis, indexing="ij")
    ys = rr * np.cos(tt)
    xs = rr * np.sin(tt)
    apex = r[inside].min() - 0.5
    col = np.clip(((xs + FIELD_MM / 2) / px - 0.5).round().astype(int), 0, echo.shape[1] - 1)
    row = np.clip(((ys - (apex - 0.5)) / px - 0.5).round().astype(int), 0, echo.shape[0] - 1)
    e_polar = echo[row, col]
    density = rng.uniform(0.3, 0.7)
    scat = (rng.random((n_r, n_t)) < density) * rng.rayleigh(1.0, (n_r, n_t)) * np.exp(1j * rng.uniform(0, 2 * np.pi, (n_r, n_t)))
    scat = scat * e_polar
    f0_cyc_mm = rng.uniform(1.2, 2.2)  # pulse carrier (cycles per mm, two-way)
    sig_r = rng.uniform(0.2, 0.35)
    kr = np.arange(-int(4 * sig_r / dr) - 1, int(4 * sig_r / dr) + 2) * dr
    pulse = np.exp(-0.5 * (kr / sig_r) ** 2) * np.exp(2j * np.pi * f0_cyc_mm * kr)
    rf = ndimage.convolve1d(scat.real, pulse.real, axis=0) - ndimage.convolve1d(scat.imag, pulse.imag, axis=0)
    rf = rf + 1j * (ndimage.convolve1d(scat.real, pulse.imag, axis=0) + ndimage.convolve1d(scat.imag, pulse.real, axis=0))
    rf = ndimage.gaussian_filter1d(rf.real, rng.uniform(0.8, 1.5), axis=1) + 1j * ndimage.gaussian_filter1d(
        rf.imag, rng.uniform(0.8, 1.5), axis=1)
    env = np.abs(rf)
    # Scan conversion: bilinear lookup of every Cartesian pixel in the polar envelope.
    ri = (r - r_axis[0]) / dr
    ti = (theta - t_axis[0]) / (t_axis[1] - t_axis[0])
    return ndimage.map_coordinates(env, [ri, ti], order=1, mode="constant") * inside


def generate(seed: int, index: int, size: int = 128, label: int | None = None) -> tuple[np.ndarray, int]:
    """(image float32 [size, size] in [0, 1], label) of image `index` of the set `seed`."""
    rng = np.random.default_rng([int(seed), 4049, int(index)])
    label = int(rng.integers(3)) if label is None else int(label)
    r, theta, inside, apex_mm, px = _fan(size, rng)
    echo = _tissue((size, size), rng)
    if label in (0, 1):
        mask = _lesion(r, theta, label, apex_mm, rng) & inside
        if label == 0:
            capsule = ndimage.binary_dilation(mask, iterations=1) & ~mask
            echo = np.where(capsule, echo * rng.uniform(1.8, 2.6), echo)
            echo = np.where(mask, rng.uniform(0.02, 0.3), echo)
            echo = echo * _beam_shadow(mask, r, theta, rng.uniform(1.3, 1.8), rng.uniform(4, 12), inside)
        else:
            inner = rng.uniform(0.1, 0.3) * np.exp(0.5 * ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.5))
            echo = np.where(mask, inner, echo)
            echo = echo * _beam_shadow(mask, r, theta, rng.uniform(0.15, 0.45), rng.uniform(10, 30), inside)
    env = _speckle(echo, r, theta, inside, px, rng)
    env = env * np.exp(-rng.uniform(0.0, 0.02) * (r - apex_mm))  # residual attenuation after TGC
    dyn = rng.uniform(40.0, 60.0)
    ref = np.percentile(env[inside], 99.0) + 1e-12
    db = 20 * np.log10(env / ref + 1e-9)
    img = np.clip((db + dyn) / dyn, 0.0, 1.0) * inside
    return img.astype(np.float32), label


def generate_set(seed: int, count: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Images [count, size, size] and labels [count] of the set `seed`."""
    pairs = [generate(seed, i, size) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.int64)
