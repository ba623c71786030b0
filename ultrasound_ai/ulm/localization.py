"""Classical ULM localization: regional-maximum detection and sub-pixel kernels, vectorised per block.

Chain (PALA's, reimplemented from its description):
1. envelope E = |IQ| (or the B-mode frames); a border of int(fwhm/2 + 1) pixels is zeroed so every
   kept maximum has a full window around it;
2. regional maxima with 8-connectivity: pixels equal to the maximum of their 3 x 3 neighbourhood and
   > 0 (a plateau of equal values yields each of its pixels; with float data plateaus are rare);
3. the N brightest maxima per frame (N an int, or one count per frame, e.g. from a counting network);
4. guards: a window holding more than `max_maxima` regional maxima is rejected (overlapping bubbles),
   and so is a sub-pixel shift larger than fwhm/2 along either axis;
5. sub-pixel position in a `window` x `window` patch around the maximum: weighted average ("wa") or
   radial symmetry ("rs", Parthasarathy, Nat. Methods 2012).

Every step works on all detections of a block at once (no per-detection Python loop).
Positions are returned in pixel units (0-based array indices, fractional); `to_mm` converts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["Detections", "envelope", "detect_maxima", "extract_windows", "weighted_average",
           "radial_symmetry", "localize", "to_mm", "KERNELS"]


@dataclass
class Detections:
    """Integer peak positions of a block: frame, row (z), column (x), peak value; plus the guard count."""

    frame: np.ndarray
    iz: np.ndarray
    ix: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return int(self.frame.shape[0])


def envelope(frames) -> np.ndarray:
    """float32 envelope [T, Z, X] of complex IQ (magnitude) or real frames (as is), validated."""
    a = np.asarray(frames)
    if a.ndim != 3:
        raise InputError(f"localization input: expected frames [T, Z, X], got shape {a.shape}")
    if min(a.shape) < 1:
        raise InputError(f"localization input: empty frames, shape {a.shape}")
    if a.dtype.kind == "c":
        return np.abs(a).astype(np.float32, copy=False)
    if a.dtype.kind not in "iuf":
        raise InputError(f"localization input: expected complex IQ or real frames, got dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


def _fwhm_pair(fwhm) -> tuple[float, float]:
    f = np.broadcast_to(np.asarray(fwhm, dtype=np.float64).reshape(-1), (2,)) if np.size(fwhm) in (1, 2) else None
    if f is None or not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise InputError(f"fwhm: expected one or two positive numbers of pixels (z, x), got {fwhm!r}")
    return float(f[0]), float(f[1])


def _counts(n_per_frame, n_frames: int) -> np.ndarray:
    c = np.asarray(n_per_frame)
    if c.ndim == 0:
        c = np.full(n_frames, c)
    if c.shape != (n_frames,) or c.dtype.kind not in "iuf":
        raise InputError(f"n_per_frame: expected an integer or one count per frame ({n_frames}), got shape {c.shape}")
    if np.any(~np.isfinite(c)) or np.any(c < 0):
        raise InputError("n_per_frame: counts must be finite and >= 0")
    return np.round(c).astype(np.int64)


def _local_max_mask(env: np.ndarray) -> np.ndarray:
    """Boolean [T, Z, X]: pixels equal to their 3 x 3 neighbourhood maximum and > 0."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(env))[:, None]
    mx = F.max_pool2d(t, kernel_size=3, stride=1, padding=1)
    return ((t == mx) & (t > 0))[:, 0].numpy()


def detect_maxima(env: np.ndarray, n_per_frame, fwhm=(3.0, 3.0), window: int = 5,
                  max_maxima: int | None = 3) -> Detections:
    """Regional maxima of `env` [T, Z, X] (float), brightest `n_per_frame` per frame, crowded windows removed."""
    import torch

    env = envelope(env)
    t_n, nz, nx = env.shape
    fz, fx = _fwhm_pair(fwhm)
    if window < 3 or window % 2 == 0:
        raise InputError(f"window: expected an odd size >= 3, got {window}")
    half = window // 2
    # PALA zeros int(fwhm/2 + 1) pixels; never less than the half window, so windows stay inside.
    bz, bx = max(int(fz / 2 + 1), half), max(int(fx / 2 + 1), half)
    counts = _counts(n_per_frame, t_n)
    empty = Detections(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if nz <= 2 * bz or nx <= 2 * bx or counts.max(initial=0) == 0:
        return empty
    inner = np.zeros_like(env)
    inner[:, bz:nz - bz, bx:nx - bx] = env[:, bz:nz - bz, bx:nx - bx]
    mask = _local_max_mask(inner)
    k = int(min(counts.max(), nz * nx))
    scored = torch.from_numpy(np.where(mask, inner, -1.0).reshape(t_n, -1))
    vals, idx = torch.topk(scored, k, dim=1, sorted=True)
    vals, idx = vals.numpy(), idx.numpy()
    keep = (vals > 0) & (np.arange(k)[None, :] < counts[:, None])
    frame = np.broadcast_to(np.arange(t_n)[:, None], idx.shape)[keep]
    flat = idx[keep]
    iz, ix = np.divmod(flat, nx)
    det = Detections(frame.astype(np.int64), iz.astype(np.int64), ix.astype(np.int64), vals[keep].astype(np.float32))
    if max_maxima is not None and len(det):
        n_max = extract_windows(mask.astype(np.uint8), det, window).sum(axis=(1, 2))
        ok = n_max <= max_maxima
        det = Detections(det.frame[ok], det.iz[ok], det.ix[ok], det.value[ok])
    return det


def extract_windows(frames: np.ndarray, det: Detections, window: int = 5) -> np.ndarray:
    """[K, window, window] patches of `frames` centred on the detections (which must be >= window//2 inside)."""
    half = window // 2
    off = np.arange(-half, half + 1)
    zz = det.iz[:, None, None] + off[None, :, None]
    xx = det.ix[:, None, None] + off[None, None, :]
    return frames[det.frame[:, None, None], zz, xx]


def weighted_average(win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centroid offsets (dz, dx) from each window's centre pixel, in pixels."""
    w = np.asarray(win, dtype=np.float64)
    n = w.shape[-1]
    off = np.arange(n) - n // 2
    total = w.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        dz = (w.sum(axis=2) * off).sum(axis=1) / total
        dx = (w.sum(axis=1) * off).sum(axis=1) / total
    return dz, dx


def radial_symmetry(win: np.ndarray, aspect: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Radial-symmetry centre (Parthasarathy 2012) of each window: offsets (dz, dx) from the centre pixel.

    Gradients sit on the (n-1) x (n-1) grid of points between pixels (Roberts cross over each 2 x 2
    cell). Each gradient defines a line through its grid point; the centre is the point nearest to all
    lines in weighted least squares, weights = |gradient|^2 / (distance of the grid point to the
    |gradient|^2-weighted centroid), which favours strong gradients near the spot.
    `aspect` = PSF width along x / width along z: x is first rescaled by 1/aspect so an elliptical
    PSF becomes radially symmetric (the method's assumption), and the result scaled back.
    """
    w = np.asarray(win, dtype=np.float64)
    n = w.shape[-1]
    # Roberts cross: d1 along the (+z, +x) diagonal, d2 along (+z, -x); gradient in (z, x) axes.
    d1 = w[:, 1:, 1:] - w[:, :-1, :-1]
    d2 = w[:, 1:, :-1] - w[:, :-1, 1:]
    a = float(aspect)
    gz = (d1 + d2) / 2.0
    gx = (d1 - d2) / 2.0 * a  # d/dx' = a d/dx for x' = x / a
    # Grid point coordinates relative to the centre pixel: midpoints between pixels.
    c = np.arange(n - 1) - (n - 2) / 2.0
    pz = np.broadcast_to(c[:, None], gz.shape[1:])
    px = np.broadcast_to(c[None, :] / a, gz.shape[1:])
    g2 = gz * gz + gx * gx
    gsum = g2.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cz = (g2 * pz).sum(axis=(1, 2)) / gsum
        cx = (g2 * px).sum(axis=(1, 2)) / gsum
        dist = np.sqrt((pz[None] - cz[:, None, None]) ** 2 + (px[None] - cx[:, None, None]) ** 2)
        # A grid point exactly on the centroid would get an infinite weight; bound it at 1/100 px.
        wgt = g2 / np.maximum(dist, 1e-2)
        norm = np.sqrt(g2)
        uz = np.where(norm > 0, gz / norm, 0.0)
        ux = np.where(norm > 0, gx / norm, 0.0)
    # Distance^2 of c to the line through p with unit direction u: (c-p)^T (I - u u^T) (c-p).
    # Normal equations: sum w (I - u u^T) c = sum w (I - u u^T) p.
    a_zz = (wgt * (1 - uz * uz)).sum(axis=(1, 2))
    a_xx = (wgt * (1 - ux * ux)).sum(axis=(1, 2))
    a_zx = (wgt * (-uz * ux)).sum(axis=(1, 2))
    bz_ = (wgt * ((1 - uz * uz) * pz - uz * ux * px)).sum(axis=(1, 2))
    bx_ = (wgt * (-uz * ux * pz + (1 - ux * ux) * px)).sum(axis=(1, 2))
    det = a_zz * a_xx - a_zx * a_zx
    with np.errstate(invalid="ignore", divide="ignore"):
        dz = (a_xx * bz_ - a_zx * bx_) / det
        dx = (a_zz * bx_ - a_zx * bz_) / det * a
    return dz, dx


KERNELS = {"wa": weighted_average, "rs": radial_symmetry}


def localize(frames, n_per_frame, method: str = "rs", fwhm=(3.0, 3.0), window: int = 5,
             max_maxima: int | None = 3) -> np.ndarray:
    """Detect and localize bubbles in a block of frames [T, Z, X] (complex IQ or real envelope).

    Returns float64 [K, 4] = (frame, z_px, x_px, intensity): frame 0-based in the block, positions in
    fractional 0-based pixel indices, intensity = the envelope at the maximum. Sorted by frame, then
    by decreasing intensity.
    """
    if method not in KERNELS:
        raise InputError(f"localization method: expected one of {sorted(KERNELS)}, got {method!r}")
    env = envelope(frames)
    fz, fx = _fwhm_pair(fwhm)
    det = detect_maxima(env, n_per_frame, (fz, fx), window, max_maxima)
    if not len(det):
        return np.zeros((0, 4))
    win = extract_windows(env, det, window)
    dz, dx = radial_symmetry(win, fx / fz) if method == "rs" else weighted_average(win)
    ok = np.isfinite(dz) & np.isfinite(dx) & (np.abs(dz) <= fz / 2) & (np.abs(dx) <= fx / 2)
    out = np.stack([det.frame, det.iz + dz, det.ix + dx, det.value], axis=1)[ok]
    return out.astype(np.float64)


def to_mm(locs_px: np.ndarray, pixel_size_mm, origin_mm, frame_offset: int = 0) -> np.ndarray:
    """(frame, z_px, x_px, intensity) -> (frame + offset, z_mm, x_mm, intensity): origin = centre of pixel (0, 0)."""
    out = np.array(locs_px, dtype=np.float64, copy=True).reshape(-1, locs_px.shape[-1] if np.ndim(locs_px) == 2 else 4)
    out[:, 0] += frame_offset
    out[:, 1] = origin_mm[0] + out[:, 1] * pixel_size_mm[0]
    out[:, 2] = origin_mm[1] + out[:, 2] * pixel_size_mm[1]
    return out
