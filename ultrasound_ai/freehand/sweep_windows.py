"""Sweep -> network input: frames resampled to a model's pixel grid, relative-pose targets, clip windows.

Helpers shared by the learned freehand methods (FiMA and MoGLo-Net).

The network grid. A model is trained for frames of ``frame_shape`` = (h, w) pixels at ``spacing_xy`` = (sx',
sy') mm (the card's input facts). A sweep's frames (H, W) at (sx, sy) are resampled onto that grid centred
laterally and anchored at the top row (the transducer face) in depth: a frame of another width loses (or
gains zero-padded) margins evenly at the sides, a deeper frame loses its far field. Depth anchoring matches
how the models are trained (simulated frames start at the face) and keeps the depth-dependent speckle the
network learnt: a grid centred in depth on a 37-mm-deep frame made the shipped FiMA and ReM read the
out-of-plane direction backwards (demo sweep FDR 150 % centred, 14 % anchored). The network's image-mm
coordinates therefore differ from the sweep's by a fixed translation: pixel (0, 0) of the network grid sits
at ``offset_mm`` = (((W-1)sx - (w-1)sx')/2, 0, 0) in the sweep's image-mm coordinates (docs/DATA_FORMATS.md: origin at
the centre of pixel (0, 0), x along columns, y along rows). Relative transforms convert exactly between the
two: ``T_sweep = Tr(o) @ T_net @ Tr(-o)`` (`to_network_relative` / `from_network_relative`), so the spacing
and the geometry are carried through: estimates come back in the sweep's own image-mm coordinates.

Resampling is separable linear interpolation, after a symmetric Gaussian anti-aliasing filter when
shrinking (speckle aliases badly otherwise); outside the frame the value is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import invert_rigid, matrix_to_params, to_relative

__all__ = [
    "GridGeometry",
    "grid_geometry",
    "resample_weights",
    "resample_frames",
    "to_network_relative",
    "from_network_relative",
    "relative_params",
    "clip_starts",
    "average_overlapping",
]


@dataclass(frozen=True)
class GridGeometry:
    """How a sweep's frames map onto a network grid (see the module docstring)."""

    source_shape_hw: tuple[int, int]
    source_spacing_xy: tuple[float, float]
    frame_shape_hw: tuple[int, int]
    spacing_xy: tuple[float, float]
    offset_mm: tuple[float, float, float]

    def shift(self) -> np.ndarray:
        """Tr(offset): network image-mm -> sweep image-mm (4x4 float64)."""
        t = np.eye(4)
        t[:3, 3] = self.offset_mm
        return t


def _pair(value, name: str) -> tuple[float, float]:
    a = np.broadcast_to(np.asarray(value, dtype=np.float64), (2,)) if np.ndim(value) <= 1 else None
    if a is None or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise InputError(f"{name}: expected one or two positive finite numbers (mm), got {value!r}")
    return float(a[0]), float(a[1])


def _shape(value, name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected (height, width) in pixels, got {value!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"{name}: expected positive (height, width), got {value!r}")
    return h, w


def grid_geometry(source_shape_hw: Sequence[int], source_spacing_xy, frame_shape_hw: Sequence[int],
                  spacing_xy) -> GridGeometry:
    """The network grid for frames of `source_shape_hw` at `source_spacing_xy` (x first): centred laterally,
    from the top row (the transducer face) in depth."""
    H, W = _shape(source_shape_hw, "source frame shape")
    h, w = _shape(frame_shape_hw, "network frame shape")
    sx, sy = _pair(source_spacing_xy, "source pixel_spacing_mm")
    tx, ty = _pair(spacing_xy, "network pixel spacing")
    off = ((W - 1) * sx - (w - 1) * tx) / 2.0, 0.0, 0.0
    return GridGeometry((H, W), (sx, sy), (h, w), (tx, ty), off)


def resample_weights(n_in: int, spacing_in: float, n_out: int, spacing_out: float, offset_mm: float) -> np.ndarray:
    """[n_out, n_in] resampling weights along one axis.

    Output sample j sits at ``offset_mm + j * spacing_out`` mm, i.e. at input pixel position
    u = that / spacing_in, and gets the linear interpolation of the input there. When shrinking
    (f = spacing_out / spacing_in > 1) the input is first smoothed by a symmetric Gaussian of
    sigma = sqrt(f^2 - 1) / 2 input pixels (anti-aliasing; a symmetric kernel keeps linear ramps, hence
    positions, exact away from the edges). Output samples outside the input's extent [-0.5, n_in - 0.5]
    pixels get all-zero weights (zero padding); inside, positions are clamped to the edge pixels.
    """
    u = (offset_mm + np.arange(n_out) * spacing_out) / spacing_in
    j = np.arange(n_in)
    uc = np.clip(u, 0.0, n_in - 1.0)
    lin = np.clip(1.0 - np.abs(j[None, :] - uc[:, None]), 0.0, None)  # [n_out, n_in]
    f = spacing_out / spacing_in
    if f > 1.0 + 1e-9:
        sigma = 0.5 * np.sqrt(f * f - 1.0)
        g = np.exp(-0.5 * ((j[:, None] - j[None, :]) / sigma) ** 2)
        g[np.abs(j[:, None] - j[None, :]) > 4 * sigma + 1] = 0.0
        lin = lin @ (g / g.sum(axis=1, keepdims=True))
    inside = (u >= -0.5) & (u <= n_in - 0.5)
    return np.where(inside[:, None], lin, 0.0)


def resample_frames(frames: np.ndarray, geometry: GridGeometry, chunk: int = 64) -> np.ndarray:
    """uint8/float frames [N, H, W] -> float32 [N, h, w] on the network grid (values kept in 0..255)."""
    f = np.asarray(frames)
    if f.ndim != 3 or tuple(f.shape[1:]) != tuple(geometry.source_shape_hw):
        raise InputError(f"frames: expected [N, {geometry.source_shape_hw[0]}, {geometry.source_shape_hw[1]}], "
                         f"got shape {list(f.shape)}")
    same = (geometry.source_shape_hw == geometry.frame_shape_hw
            and np.allclose(geometry.source_spacing_xy, geometry.spacing_xy, rtol=1e-9, atol=0)
            and np.allclose(geometry.offset_mm, 0.0, atol=1e-9))
    if same:
        return f.astype(np.float32)
    (H, W), (h, w) = geometry.source_shape_hw, geometry.frame_shape_hw
    ry = resample_weights(H, geometry.source_spacing_xy[1], h, geometry.spacing_xy[1], geometry.offset_mm[1])
    rx = resample_weights(W, geometry.source_spacing_xy[0], w, geometry.spacing_xy[0], geometry.offset_mm[0])
    ry, rx = ry.astype(np.float32), rx.astype(np.float32)
    out = np.empty((f.shape[0], h, w), dtype=np.float32)
    for s in range(0, f.shape[0], chunk):  # bounded float32 temporaries for long sweeps
        block = f[s:s + chunk].astype(np.float32)
        out[s:s + chunk] = np.einsum("yY,nYX,xX->nyx", ry, block, rx, optimize=True)
    return out


def to_network_relative(rel_sweep: np.ndarray, geometry: GridGeometry) -> np.ndarray:
    """Relative transforms [..., 4, 4] in the sweep's image-mm -> the network grid's image-mm."""
    s = geometry.shift()
    return invert_rigid(s) @ np.asarray(rel_sweep, dtype=np.float64) @ s


def from_network_relative(rel_net: np.ndarray, geometry: GridGeometry) -> np.ndarray:
    """Relative transforms [..., 4, 4] in the network grid's image-mm -> the sweep's image-mm."""
    s = geometry.shift()
    return s @ np.asarray(rel_net, dtype=np.float64) @ invert_rigid(s)


def relative_params(tforms: np.ndarray, geometry: GridGeometry | None = None, convention: str = "YZX") -> np.ndarray:
    """Per-pair targets [N-1, 6] = (tx, ty, tz mm, three Euler degrees in `convention`) of
    T_{i<-i+1} = inv(T_i) @ T_{i+1}, expressed on the network grid when `geometry` is given."""
    rel = to_relative(np.asarray(tforms, dtype=np.float64))
    if geometry is not None:
        rel = to_network_relative(rel, geometry)
    return matrix_to_params(rel, convention, degrees=True)


def clip_starts(n_frames: int, clip_frames: int, stride: int | None = None) -> list[int]:
    """Start indices of clips of `clip_frames` frames covering frames 0..n_frames-1 (the last clip ends at
    the last frame). stride defaults to clip_frames - 1 (consecutive clips share one frame, so every pair
    is in exactly one clip)."""
    n, c = int(n_frames), int(clip_frames)
    if c < 2:
        raise InputError(f"clip_frames: expected at least 2, got {clip_frames}")
    if n < c:
        raise InputError(f"sweep: {n} frames, fewer than the {c} frames of one clip the model needs")
    step = c - 1 if stride is None else int(stride)
    if step < 1:
        raise InputError(f"clip stride: expected >= 1, got {stride}")
    starts = list(range(0, n - c + 1, step))
    if starts[-1] != n - c:
        starts.append(n - c)
    return starts


def average_overlapping(per_clip: Sequence[np.ndarray], starts: Sequence[int], n_pairs: int) -> np.ndarray:
    """Per-pair estimates [n_pairs, D] from per-clip estimates [clip_frames - 1, D] at `starts`: pairs
    covered by several clips get the mean of their estimates."""
    if not per_clip:
        raise InputError("average_overlapping: no clip estimates")
    d = np.asarray(per_clip[0]).shape[-1]
    acc = np.zeros((n_pairs, d))
    cnt = np.zeros(n_pairs)
    for est, s in zip(per_clip, starts):
        est = np.asarray(est, dtype=np.float64)
        acc[s:s + len(est)] += est
        cnt[s:s + len(est)] += 1
    if np.any(cnt == 0):
        raise InputError(f"average_overlapping: pairs {np.flatnonzero(cnt == 0).tolist()[:5]} are in no clip")
    return acc / cnt[:, None]
