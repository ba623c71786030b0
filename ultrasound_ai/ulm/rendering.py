"""ULM rendering on a fine grid (λ/10 by default): density, direction-coded density, mean speed; PNGs.

Grid: isotropic pixels of wavelength / factor covering the acquisition's field of view, i.e. the
pixel edges of the acquisition grid [z0 - dz/2, z0 + (Z - 1/2) dz] (same for x); the origin is the
centre of the first fine pixel (docs/DATA_FORMATS.md).

Accumulation is per (track, pixel) pair, so each track counts once per pixel however many of its
(interpolated) points fall there:
- density[p]   = number of tracks crossing p;
- direction[p] = sum over those tracks of sign(mean axial velocity of the track in p), with + for flow
  towards the probe (decreasing depth, vz < 0) and - away from it: the ±density map of PALA;
- velocity[p]  = mean over those tracks of the track's mean speed in p (mm/s); 0 where no track.
The per-pixel sums are accumulated in float64 and divided only when the images are requested, so a
streamed acquisition is rendered track batch by track batch with the same result as all at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import InputError

from .tracking import FineTracks

__all__ = ["RenderGrid", "Renderer", "render_tracks", "render_ground_truth", "gt_tracks",
           "save_png", "save_maps_png", "colorize"]


@dataclass(frozen=True)
class RenderGrid:
    origin_mm: tuple[float, float]
    pixel_size_mm: tuple[float, float]
    shape: tuple[int, int]

    @staticmethod
    def for_acquisition(pixel_size_mm, origin_mm, frame_shape, wavelength_mm: float, factor: float = 10.0) -> "RenderGrid":
        """λ/factor grid covering the field of view of frames [Z, X] with the given geometry."""
        if not np.isfinite(factor) or factor <= 0:
            raise InputError(f"resolution factor: expected a positive number (10 gives λ/10 pixels), got {factor!r}")
        if not np.isfinite(wavelength_mm) or wavelength_mm <= 0:
            raise InputError(f"wavelength_mm: expected a positive number, got {wavelength_mm!r}")
        p = float(wavelength_mm) / float(factor)
        dz, dx = (float(v) for v in pixel_size_mm)
        z0, x0 = (float(v) for v in origin_mm)
        nz, nx = (int(v) for v in frame_shape)
        ez, ex = nz * dz, nx * dx  # field of view extents between outer pixel edges
        shape = (max(1, math.ceil(ez / p - 1e-9)), max(1, math.ceil(ex / p - 1e-9)))
        return RenderGrid(origin_mm=(z0 - dz / 2 + p / 2, x0 - dx / 2 + p / 2), pixel_size_mm=(p, p), shape=shape)

    def index(self, z_mm: np.ndarray, x_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, col, inside) of the pixels holding the points (nearest pixel centre)."""
        iz = np.floor((np.asarray(z_mm) - self.origin_mm[0]) / self.pixel_size_mm[0] + 0.5).astype(np.int64)
        ix = np.floor((np.asarray(x_mm) - self.origin_mm[1]) / self.pixel_size_mm[1] + 0.5).astype(np.int64)
        inside = (iz >= 0) & (iz < self.shape[0]) & (ix >= 0) & (ix < self.shape[1])
        return iz, ix, inside


class Renderer:
    """Accumulates tracks (FineTracks batches) into density / direction / velocity images."""

    def __init__(self, grid: RenderGrid):
        self.grid = grid
        n = grid.shape[0] * grid.shape[1]
        self._count = np.zeros(n)
        self._dir = np.zeros(n)
        self._speed = np.zeros(n)

    def add(self, tracks: FineTracks) -> None:
        if len(tracks) == 0:
            return
        iz, ix, inside = self.grid.index(tracks.z, tracks.x)
        if not inside.any():
            return
        pix = (iz * self.grid.shape[1] + ix)[inside]
        tid = tracks.track_id[inside]
        npix = self.grid.shape[0] * self.grid.shape[1]
        # Unique (track, pixel) pairs; the point's values are averaged per pair.
        key = (tid - tid.min()) * npix + pix
        uniq, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        vz = np.bincount(inv, weights=tracks.vz[inside], minlength=uniq.size) / cnt
        sp = np.bincount(inv, weights=tracks.speed[inside], minlength=uniq.size) / cnt
        # Sums per touched pixel only (whole-grid bincounts cost more than the rest on a fine grid); the same
        # sums in the same order as before.
        touched, at = np.unique(uniq % npix, return_inverse=True)
        self._count[touched] += np.bincount(at, minlength=touched.size)
        self._dir[touched] += np.bincount(at, weights=-np.sign(vz), minlength=touched.size)
        self._speed[touched] += np.bincount(at, weights=sp, minlength=touched.size)

    def images(self) -> dict[str, np.ndarray]:
        shape = self.grid.shape
        with np.errstate(invalid="ignore", divide="ignore"):
            vel = np.where(self._count > 0, self._speed / self._count, 0.0)
        return {
            "density": self._count.reshape(shape).astype(np.float32),
            "direction": self._dir.reshape(shape).astype(np.float32),
            "velocity_mm_s": vel.reshape(shape).astype(np.float32),
        }


def render_tracks(tracks: FineTracks, grid: RenderGrid) -> dict[str, np.ndarray]:
    r = Renderer(grid)
    r.add(tracks)
    return r.images()


def gt_tracks(gt_positions: np.ndarray, frame_rate_hz: float, max_step_mm: float) -> FineTracks:
    """Ground-truth bubble tracks (by bubble id; a new track where a bubble skips frames), interpolated,
    with velocities from the unsmoothed positions."""
    from .tracking import interpolate_tracks, track_velocities

    g = np.asarray(gt_positions, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != 4:
        raise InputError(f"ground truth: rendering needs gt_positions [K, 4] = (frame, z_mm, x_mm, bubble_id) "
                         f"(bubble ids define the tracks), got shape {g.shape}")
    if g.shape[0] == 0:
        return FineTracks.empty()
    g = g[np.lexsort((g[:, 0], g[:, 3]))]
    new = np.ones(g.shape[0], dtype=bool)
    new[1:] = (g[1:, 3] != g[:-1, 3]) | (g[1:, 0] != g[:-1, 0] + 1)
    tid = np.cumsum(new) - 1
    v = track_velocities(tid, g[:, 0], g[:, 1:3], frame_rate_hz)
    return interpolate_tracks(tid, g[:, 0], g[:, 1], g[:, 2], v[:, 0], v[:, 1], max_step_mm)


def render_ground_truth(gt_positions: np.ndarray, grid: RenderGrid, frame_rate_hz: float) -> dict[str, np.ndarray]:
    """Render the true bubble tracks on `grid` (interpolated to half a fine pixel)."""
    step = min(grid.pixel_size_mm) / 2
    return render_tracks(gt_tracks(gt_positions, frame_rate_hz, step), grid)


# ------------------------------------------------------------------------------------------------
# PNG export
# ------------------------------------------------------------------------------------------------

_CMAPS = {"density": "hot", "direction": "RdBu_r", "velocity_mm_s": "viridis"}


def _lut(name: str) -> np.ndarray:
    # matplotlib comes with vtk (a dependency); only its colour tables are used, never pyplot.
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(image: np.ndarray, kind: str, gamma: float = 1 / 3) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a rendered map.

    density: hot colour map on (d / max)^gamma (compresses the huge dynamic range of track counts);
    direction: diverging map, signed compression sign(d)|d / max|d||^gamma, white = no flow;
    velocity_mm_s: perceptual map (viridis) scaled to the 99th percentile of non-zero speeds.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise InputError(f"colorize: expected a 2-D image, got shape {img.shape}")
    if kind not in _CMAPS:
        raise InputError(f"colorize: kind must be one of {sorted(_CMAPS)}, got {kind!r}")
    img = np.where(np.isfinite(img), img, 0.0)
    if kind == "density":
        m = img.max()
        u = (np.clip(img, 0, None) / m) ** gamma if m > 0 else np.zeros_like(img)
    elif kind == "direction":
        m = np.abs(img).max()
        s = np.sign(img) * (np.abs(img) / m) ** gamma if m > 0 else np.zeros_like(img)
        u = (s + 1) / 2
    else:
        nz = img[img > 0]
        m = np.percentile(nz, 99) if nz.size else 0.0
        u = np.clip(img / m, 0, 1) if m > 0 else np.zeros_like(img)
    lut = _lut(_CMAPS[kind])
    return lut[np.clip(np.round(u * 255), 0, 255).astype(np.int64)]


def save_png(image: np.ndarray, path, kind: str = "density", gamma: float = 1 / 3) -> None:
    """Write one map as a PNG (atomic)."""
    from PIL import Image

    rgb = colorize(image, kind, gamma)
    with atomic_output(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def save_maps_png(images: dict[str, np.ndarray], path, gamma: float = 1 / 3, gap: int = 4) -> None:
    """Density | direction | velocity side by side in one PNG (atomic), with a black gap between."""
    from PIL import Image

    panels = [colorize(images[k], k, gamma) for k in ("density", "direction", "velocity_mm_s") if images.get(k) is not None]
    if not panels:
        raise InputError("PNG export: no density, direction or velocity image to draw")
    h = panels[0].shape[0]
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(np.zeros((h, gap, 3), np.uint8))
        parts.append(p)
    with atomic_output(path) as tmp:
        Image.fromarray(np.concatenate(parts, axis=1)).save(tmp, format="PNG")
