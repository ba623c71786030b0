"""Which way each frame pair of a freehand sweep moved out of plane, from the images alone (spectral ordering).

Two frames cannot tell a motion from its mirror image through the image plane, so an images-only method
knows how far each pair moved out of plane but not which way. The whole sweep can tell more: where the
probe comes back, its frames look like the frames it took on the way out, however far apart in time. So
the frames are put in order along the out-of-plane axis from how alike they are, all pairs at once, and
each pair's direction is the sign of its step in that order.

1. Speckle images: each frame minus its Gaussian blur (1 mm: smooth anatomy does not decorrelate with
   elevational distance), on a central crop of at most `CROP_PX` pixels a side at a pixel size of at least
   `MIN_SPACING_MM` (speckle is resolved there; finer pixels only cost time).
2. Similarity of every pair of frames up to `DENSE_LAG_S` apart, and beyond that up to `max_lag_s` of every
   `LONG_LAG_STEP`-th frame: the peak of their normalised circular cross-correlation within +-`max_shift_mm` in
   plane (in-plane motion registered out; one FFT per pair).
3. Similarities normalised per sweep: 0 at the median of pairs at least `FLOOR_LAG` frames apart (what far
   frames share: the floor), 1 at the 95th percentile of neighbouring pairs (the noise ceiling); weights
   w = max(q - tau, 0)^p keep only clearly similar pairs (neighbours, and revisits).
4. Order: the Fiedler vector of the weighted graph (second eigenvector of its normalised Laplacian), the
   classic spectral seriation (Atkins et al. 1998): frames that are alike get nearby values, so along a sweep
   that goes out and comes back the vector rises and falls with the probe's elevation. A faint chain between
   consecutive frames keeps the graph connected through blank or fast stretches.
5. Direction of pair i: the sign of f[i + 1] - f[i]; the sweep's overall sign (which the images cannot
   tell) is chosen so that most of the distance is travelled towards +z, as the forward convention.

tau and p: chosen on 24 training-simulator sweeps (freehand-v2 settings, 96 x 104 px, seeds 291000-291023;
none in a frozen set): the share of moving pairs (|true tz| > 0.05 mm) whose direction was right, up to one sign
per sweep, was 0.71 with one direction throughout and 0.80-0.84 for tau 0.1-0.3 and p 2-6 (a flat optimum; 0.2
and 4 kept: 0.95 / 0.81 / 0.84 / 0.77 on linear / curved / loop / sector sweeps); on 12 sweeps of 248 x 260 px
frames (seeds 292000-292011, the crop path) 0.88 against 0.71. Comparing only every second frame beyond 2 s
(about 45 % fewer pairs at 1000 frames) kept 0.84 and 0.88 (every fourth: 0.81 and 0.86). Sector sweeps (rotation about the probe face)
move the frame centre least, and loops cross their own path, which the order cannot tell from a revisit.
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["frame_similarity", "spectral_order", "travel_signs", "orient_pairs", "mirror_pairs", "MIRROR",
           "DEFAULT_TAU", "DEFAULT_POWER"]

DEFAULT_TAU = 0.2
DEFAULT_POWER = 4
DEFAULT_MAX_LAG_S = 20.0  # revisits further apart than this are not looked for (cost grows with the lag)
MIN_SPACING_MM = 0.12
CROP_PX = 128
FLOOR_LAG = 25
DENSE_LAG_S = 2.0  # pairs up to this far apart are all compared (40 frames when the frame times are unknown)
DENSE_LAG_FRAMES = 40
LONG_LAG_STEP = 2
MAX_FRAMES_AT_ONCE = 2000  # a longer sweep is ordered in overlapping windows (`travel_signs`)
_CHAIN = 1e-6
MIRROR = np.diag([1.0, 1.0, -1.0, 1.0])  # reflection through the image plane: tz, rx and ry change sign


def _speckle_stack(frames, spacing_xy, structure_mm: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Unit-norm, zero-mean speckle images [N, h, w] (float32) on a central crop, and their pixel spacing."""
    from scipy import ndimage

    sx, sy = (float(v) for v in spacing_xy)
    zoom = (min(1.0, sy / MIN_SPACING_MM), min(1.0, sx / MIN_SPACING_MM))
    h, w = np.asarray(frames).shape[1:]
    ch, cw = min(h, int(np.ceil(CROP_PX / zoom[0]))), min(w, int(np.ceil(CROP_PX / zoom[1])))
    r0, c0 = (h - ch) // 2, (w - cw) // 2
    f = np.asarray(frames)[:, r0:r0 + ch, c0:c0 + cw].astype(np.float32)  # crop first: big sweeps stay small
    if zoom != (1.0, 1.0):
        f = ndimage.zoom(f, (1.0,) + zoom, order=1, prefilter=False, grid_mode=True, mode="grid-constant")
        sy, sx = sy / zoom[0], sx / zoom[1]
    s = f - ndimage.gaussian_filter(f, (0.0, structure_mm / sy, structure_mm / sx), mode="nearest")
    s -= s.mean(axis=(1, 2), keepdims=True)
    norm = np.linalg.norm(s.reshape(len(s), -1), axis=1)
    s /= np.maximum(norm, 1e-9)[:, None, None]  # a blank frame stays all zero: it is like nothing
    return s, (sx, sy)


def frame_similarity(frames, pixel_spacing_xy, frame_interval_s: float | None = None, *,
                     max_lag_s: float = DEFAULT_MAX_LAG_S, max_shift_mm: float = 1.0,
                     structure_mm: float = 1.0) -> np.ndarray:
    """Similarity [N, N] of the frames' speckle (peak normalised cross-correlation within +-max_shift_mm in
    plane); NaN for pairs more than max_lag_s apart (frame_interval_s None: every pair is compared)."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or len(frames) < 2:
        raise InputError(f"frame ordering: expected frames [N >= 2, H, W], got shape {list(frames.shape)}")
    s, (sx, sy) = _speckle_stack(frames, pixel_spacing_xy, structure_mm)
    n, h, w = s.shape
    spectra = np.fft.rfft2(s).astype(np.complex64)
    rs, cs = int(np.ceil(max_shift_mm / sy)), int(np.ceil(max_shift_mm / sx))
    rows = np.unique(np.r_[0:min(rs, h - 1) + 1, max(1, h - rs):h])
    cols = np.unique(np.r_[0:min(cs, w - 1) + 1, max(1, w - cs):w])
    max_lag, dense_lag = n - 1, DENSE_LAG_FRAMES
    if frame_interval_s is not None and frame_interval_s > 0:
        max_lag = min(max_lag, max(1, int(round(max_lag_s / frame_interval_s))))
        dense_lag = max(FLOOR_LAG, int(round(DENSE_LAG_S / frame_interval_s)))
    out = np.full((n, n), np.nan)
    np.fill_diagonal(out, 1.0)
    chunk = max(1, int(2e7 // (h * w)))  # bounds the memory of one batch of correlation maps
    for g in range(1, max_lag + 1):
        # Beyond dense_lag only every LONG_LAG_STEP-th frame is compared: a revisit shows on many neighbouring
        # frames at once, and these pairs are most of the cost.
        first = np.arange(0, n - g, 1 if g <= dense_lag else LONG_LAG_STEP)
        for a in range(0, len(first), chunk):
            i = first[a:a + chunk]
            x = np.fft.irfft2(spectra[i] * np.conj(spectra[i + g]), s=(h, w))
            peak = x[:, rows][:, :, cols].reshape(len(i), -1).max(axis=1)
            out[i, i + g] = peak
            out[i + g, i] = peak
    return out


def spectral_order(similarity, tau: float = DEFAULT_TAU, power: int = DEFAULT_POWER) -> np.ndarray:
    """The frames' position along the sweep's out-of-plane axis up to a monotone map and a sign [N] (module
    docstring, steps 3-4)."""
    from scipy.linalg import eigh

    r = np.asarray(similarity, dtype=np.float64)
    n = r.shape[0]
    if r.ndim != 2 or r.shape != (n, n) or n < 2:
        raise InputError(f"frame ordering: expected a square similarity matrix, got shape {list(r.shape)}")
    far = r[np.triu_indices(n, min(FLOOR_LAG, n - 1))]
    far = far[np.isfinite(far)]
    floor = float(np.median(far)) if far.size else 0.0
    ceiling = float(np.percentile(np.nan_to_num(np.diag(r, 1), nan=floor), 95))
    q = (np.nan_to_num(r, nan=floor) - floor) / max(ceiling - floor, 1e-6)
    weights = np.clip(q - float(tau), 0.0, None) ** float(power)
    np.fill_diagonal(weights, 0.0)
    i = np.arange(n - 1)
    weights[i, i + 1] += _CHAIN
    weights[i + 1, i] += _CHAIN
    d = 1.0 / np.sqrt(weights.sum(axis=1))
    laplacian = np.eye(n) - d[:, None] * weights * d[None, :]
    _, vectors = eigh(laplacian, subset_by_index=[0, 1])
    return vectors[:, 1] * d


def travel_signs(frames, pixel_spacing_xy, distances=None, frame_interval_s: float | None = None, *,
                 tau: float = DEFAULT_TAU, power: int = DEFAULT_POWER,
                 max_frames: int = MAX_FRAMES_AT_ONCE) -> np.ndarray:
    """+1 / -1 per frame pair: the direction of out-of-plane travel up to one sign per sweep, that sign chosen so
    that most of `distances` [N-1] (each pair's unsigned out-of-plane distance; None: equal) goes towards +z.

    A sweep of more than `max_frames` frames is ordered in windows of that many frames overlapping by a quarter
    (the similarity matrix and its eigenproblem grow with the square and cube of the frame count); each window's
    sign is set by its agreement with the one before on the overlap."""
    frames = np.asarray(frames)
    n = len(frames)
    weight = np.ones(max(n - 1, 0)) if distances is None else np.abs(np.asarray(distances, dtype=np.float64))
    if weight.shape != (max(n - 1, 0),):
        raise InputError(f"frame ordering: expected {max(n - 1, 0)} pair distances, got shape {list(weight.shape)}")
    max_frames = int(max_frames)
    if max_frames < 8:
        raise InputError(f"frame ordering: max_frames must be at least 8, got {max_frames}")

    def window(a: int, b: int) -> np.ndarray:
        order = spectral_order(frame_similarity(frames[a:b], pixel_spacing_xy, frame_interval_s), tau, power)
        return np.where(np.diff(order) < 0, -1.0, 1.0)

    if n <= max_frames:
        signs = window(0, n)
    else:
        overlap = max_frames // 4
        signs = window(0, max_frames)
        start = max_frames - overlap
        while len(signs) < n - 1:
            stop = min(n, start + max_frames)
            new = window(start, stop)
            shared = len(signs) - start  # pairs start .. len(signs) - 1 are in both windows
            if float((new[:shared] * signs[start:] * weight[start:start + shared]).sum()) < 0:
                new = -new
            keep = shared // 2  # the pairs nearer each window's middle are the better placed
            signs = np.concatenate([signs[:start + keep], new[keep:]])
            start = stop - overlap
    return -signs if float((signs * weight).sum()) < 0 else signs


def mirror_pairs(rel: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Pair transforms [M, 4, 4] with those where `which` [M] is true replaced by their mirror images M T M."""
    return np.where(np.asarray(which)[:, None, None], MIRROR @ rel @ MIRROR, rel)


def orient_pairs(rel: np.ndarray, frames, pixel_spacing_xy, frame_interval_s: float | None = None) -> np.ndarray:
    """Pair transforms [N-1, 4, 4] (T_i<-i+1 in the sweep's image mm) with those the frames' order says went back
    mirrored through the image plane; the sweep's sign from the frame centre's out-of-plane distances."""
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    frames = np.asarray(frames)
    dz = (rel @ np.append(frame_centre_mm(frames.shape[1:], pixel_spacing_xy), 1.0))[:, 2]
    return mirror_pairs(rel, travel_signs(frames, pixel_spacing_xy, dz, frame_interval_s) < 0)
