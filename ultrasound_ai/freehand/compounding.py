"""Compounding: reconstruct a 3D volume from posed 2D frames (pixel nearest-neighbour splatting).

Modelled on the behaviour of PLUS/IGSIO ``vtkIGSIOPasteSliceIntoVolume`` (SlicerIGT Volume
Reconstruction): every pixel centre of every frame is mapped to world (LPS mm) by the frame's pose and
pasted into the nearest voxel of an output grid; the voxels are then compounded

- ``mean``: the average of all pixel values that hit the voxel,
- ``max``: the largest of them,
- ``latest``: the value of the last pixel that hit it, in (frame, row, column) order, i.e. later frames
  overwrite earlier ones and inside one frame the raster order decides,

with a coverage mask of the voxels hit, then optional hole filling of uncovered voxels that are
surrounded by enough covered ones (``gaussian`` or ``nearest``).

Arithmetic, shared by the fast path and the reference so that they agree exactly, pixel for pixel.
The continuous voxel index (i, j, k) of pixel (row r, column c) is affine, o + r·a + c·b. Each frame's
row terms R[r] = o + 0.5 + r·a and column terms C[c] = c·b are computed in float64 and rounded to
fixed point with F fractional bits (F = 18..20 for usual grids); the voxel index on each axis is then
the exact integer floor((Rq[r] + Cq[c]) / 2^F), i.e. round-half-up of the index. The only difference
from rounding the float64 index itself is a shift of at most 2^-F voxel (≈1e-6), which matters only for
pixels within that distance of a voxel boundary; no .5-tie ambiguity between implementations remains.

The fast path works on chunks of frames with torch (CPU or CUDA): per axis one broadcast add of the
[B, H, 1] row terms and [B, 1, W] column terms in int32 plus a shift, a linear index, and one scatter
(``index_add_`` of packed (count, sum) int64 words for ``mean``; ``scatter_reduce_`` amax for ``max``,
and for ``latest`` on (pixel order << 8 | value) keys). Accumulators are the only volume-sized arrays,
so a 1000-frame 480×640 sweep streams through in constant memory. Frames that leave the grid are
clamped into a one-voxel padding shell that is cropped at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.volume import Volume

__all__ = [
    "COMPOUNDING_MODES",
    "FILL_METHODS",
    "ORIENTATIONS",
    "Grid",
    "ReconstructionResult",
    "output_grid_for",
    "reconstruct_volume",
    "reconstruct_volume_reference",
    "fill_volume_holes",
]

COMPOUNDING_MODES = ("mean", "max", "latest")
FILL_METHODS = ("none", "gaussian", "nearest")
ORIENTATIONS = ("first", "axis")

# Largest fixed-point precision used (2^-20 voxel); fewer bits only for very large grids.
_MAX_FRACTION_BITS = 20
_MIN_FRACTION_BITS = 8
# mean packs (count << 40 | sum) into one int64 per voxel: sum < 2^40 and count < 2^23.
_SUM_BITS = 40
PACKED_MAX_COUNT = (1 << 23) - 1
# The linear voxel index of the padded grid must fit int32 arithmetic.
_MAX_VOXELS = (1 << 31) - 1
# Default number of frames per chunk is chosen so one chunk holds about this many pixels.
_CHUNK_PIXELS = 1 << 21

ProgressFn = Callable[[float, str], None]


# ----------------------------------------------------------------------------------------------
# Output grid
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Geometry of an output volume (Volume's conventions): p = origin + direction @ (spacing * ijk)."""

    shape_kji: tuple
    spacing_xyz: np.ndarray
    origin_lps: np.ndarray
    direction: np.ndarray

    @property
    def shape_ijk(self) -> tuple:
        return tuple(reversed(self.shape_kji))

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape_kji, dtype=np.int64))

    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing_xyz)
        m[:3, 3] = self.origin_lps
        return m

    def lps_to_ijk(self) -> np.ndarray:
        # direction is orthonormal: its inverse is its transpose (exact, no generic inverse).
        m = np.eye(4)
        m[:3, :3] = self.direction.T / self.spacing_xyz[:, None]
        m[:3, 3] = -(self.direction.T @ self.origin_lps) / self.spacing_xyz
        return m

    def volume(self, array: np.ndarray) -> Volume:
        array = np.asarray(array)
        if array.shape[:3] != tuple(self.shape_kji):
            raise InputError(f"array: expected shape {tuple(self.shape_kji)} for this grid, got {array.shape}")
        return Volume(array, self.spacing_xyz.copy(), self.origin_lps.copy(), self.direction.copy())

    @classmethod
    def from_volume(cls, volume: Volume) -> "Grid":
        return cls(tuple(int(s) for s in volume.array.shape[:3]), np.array(volume.spacing_xyz, float),
                   np.array(volume.origin_lps, float), np.array(volume.direction, float))


def _check_grid(grid) -> Grid:
    if isinstance(grid, Volume):
        grid = Grid.from_volume(grid)
    if not isinstance(grid, Grid):
        raise InputError(f"grid: expected a Grid or a Volume giving the output geometry, got {type(grid).__name__}")
    shape = tuple(int(s) for s in grid.shape_kji)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"grid: expected a 3D shape [k, j, i] of positive sizes, got {grid.shape_kji}")
    spacing = np.asarray(grid.spacing_xyz, dtype=np.float64)
    origin = np.asarray(grid.origin_lps, dtype=np.float64)
    direction = np.asarray(grid.direction, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or not np.all(spacing > 0):
        raise InputError(f"grid spacing_xyz: expected three positive spacings in mm, got {grid.spacing_xyz!r}")
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise InputError(f"grid origin_lps: expected three finite coordinates in mm, got {grid.origin_lps!r}")
    if direction.shape != (3, 3) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise InputError("grid direction: expected an orthonormal 3x3 matrix (columns = LPS directions of i, j, k)")
    padded = (shape[0] + 2) * (shape[1] + 2) * (shape[2] + 2)
    if padded > _MAX_VOXELS:
        raise InputError(
            f"grid: {shape[2]}x{shape[1]}x{shape[0]} voxels is too large (at most about 2^31 voxels); "
            f"use a coarser spacing_mm or a smaller region"
        )
    return Grid(shape, spacing, origin, direction)


def _check_spacing_mm(spacing_mm) -> np.ndarray:
    try:
        s = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    except (TypeError, ValueError):
        raise InputError(f"spacing_mm: expected a positive number or three (x, y, z) in mm, got {spacing_mm!r}") from None
    if not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise InputError(f"spacing_mm: expected positive finite spacing in mm, got {spacing_mm!r}")
    return s


def _check_frame_geometry(frame_shape_hw, pixel_spacing_xy) -> tuple[int, int, float, float]:
    try:
        h, w = (int(v) for v in frame_shape_hw)
        if (h, w) != tuple(frame_shape_hw):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"frame_shape_hw: expected two integers (H, W), got {frame_shape_hw!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"frame_shape_hw: expected positive (H, W), got {frame_shape_hw!r}")
    sp = np.asarray(pixel_spacing_xy, dtype=np.float64) if pixel_spacing_xy is not None else np.zeros(0)
    if sp.shape != (2,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise InputError(
            f"pixel_spacing_xy: expected two positive finite spacings (sx, sy) in mm, got {pixel_spacing_xy!r}"
        )
    return h, w, float(sp[0]), float(sp[1])


def _check_tforms(tforms, n_frames: Optional[int] = None) -> np.ndarray:
    try:
        T = np.asarray(tforms, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("tforms: expected a float array [N, 4, 4] of frame poses (image-mm -> LPS mm)") from None
    if T.ndim != 3 or T.shape[1:] != (4, 4) or T.shape[0] < 1:
        raise InputError(f"tforms: expected shape [N, 4, 4] with N >= 1 (image-mm -> LPS mm), got {list(T.shape)}")
    if n_frames is not None and T.shape[0] != n_frames:
        raise InputError(f"tforms: expected one pose per frame ({n_frames}), got {T.shape[0]}")
    if not np.all(np.isfinite(T)):
        raise InputError("tforms: contains NaN or infinite values; expected finite poses")
    return T


def output_grid_for(tforms, frame_shape_hw, pixel_spacing_xy, spacing_mm=0.5, orientation: str = "first",
                    margin_mm: float = 0.0) -> Grid:
    """The smallest grid that holds every pixel centre of every frame.

    The box is the bounding box of all frames' corner pixel centres (the frames are planar, so it holds
    every pixel), taken in axes aligned with the first frame (``orientation="first"``; tighter for a
    sweep) or with the LPS axes (``"axis"``), grown by ``margin_mm`` on every side. ``spacing_mm`` is
    one voxel size or three (x, y, z) in mm. Voxel (0, 0, 0) is centred on the box's minimum corner.
    """
    T = _check_tforms(tforms)
    h, w, sx, sy = _check_frame_geometry(frame_shape_hw, pixel_spacing_xy)
    spacing = _check_spacing_mm(spacing_mm)
    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation: expected one of {ORIENTATIONS}, got {orientation!r}")
    try:
        margin = float(margin_mm)
    except (TypeError, ValueError):
        margin = float("nan")
    if not math.isfinite(margin) or margin < 0:
        raise InputError(f"margin_mm: expected a non-negative number of mm, got {margin_mm!r}")
    if orientation == "first":
        # Nearest rotation to the first frame's axes (tracker poses may be rigid only to float32).
        u, _, vt = np.linalg.svd(T[0, :3, :3])
        direction = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    else:
        direction = np.eye(3)
    corners = np.array([[0, 0, 0], [(w - 1) * sx, 0, 0], [0, (h - 1) * sy, 0], [(w - 1) * sx, (h - 1) * sy, 0]],
                       dtype=np.float64)
    world = (T[:, None, :3, :3] @ corners[None, :, :, None])[..., 0] + T[:, None, :3, 3]
    local = world.reshape(-1, 3) @ direction  # coordinates along the grid axes
    lo = local.min(axis=0) - margin
    hi = local.max(axis=0) + margin
    # The farthest pixel centre, at index (hi - lo) / spacing, rounds (half up) into the last voxel; the
    # 1e-6 voxel allowance covers float and fixed-point rounding at an exact tie.
    counts = np.floor((hi - lo) / spacing + 0.5 + 1e-6).astype(np.int64) + 1
    counts = np.maximum(counts, 1)
    grid = Grid((int(counts[2]), int(counts[1]), int(counts[0])), spacing, direction @ lo, direction)
    return _check_grid(grid)


# ----------------------------------------------------------------------------------------------
# Shared arithmetic (fast path and reference)
# ----------------------------------------------------------------------------------------------


def _pixel_to_index_affines(T: np.ndarray, sx: float, sy: float, grid: Grid) -> np.ndarray:
    """[N, 3, 3] columns (o, a, b): continuous index (i, j, k) of pixel (r, c) = o + r·a + c·b."""
    scale = np.diag([sx, sy, 1.0, 1.0])
    M = grid.lps_to_ijk()[None] @ T @ scale[None]
    return np.stack([M[:, :3, 3], M[:, :3, 1], M[:, :3, 0]], axis=-1)


def _fraction_bits(affines: np.ndarray, w: int, grid: Grid) -> tuple[int, float]:
    """Fixed-point fraction bits F and the row-term clip bound L (voxels) for this reconstruction.

    Column terms are bounded by the frame's extent in voxels; row terms are clipped to ±L, which
    cannot move an outside pixel inside (|C| <= col_extent < L − n), so |Rq + Cq| < 2·L·2^F < 2^31.
    """
    col_extent = float(np.max(np.abs(affines[:, :, 2]))) * max(w - 1, 0)
    bound = col_extent + max(grid.shape_kji) + 4.0
    bits = int(math.floor(math.log2(((1 << 31) - 1) / (2.0 * bound + 2.0))))
    bits = min(_MAX_FRACTION_BITS, bits)
    if bits < _MIN_FRACTION_BITS:
        raise InputError(
            "grid: the frames span too many voxels for exact index arithmetic; use a coarser spacing_mm"
        )
    return bits, bound


def _fixed_point_terms(affines: np.ndarray, h: int, w: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Row terms [B, H, 3] and column terms [B, W, 3] as int64 fixed point with `bits` fraction bits.

    The voxel index of pixel (r, c) on axis d is (Rq[r, d] + Cq[c, d]) >> bits. The +0.5 in the row
    term turns the floor into round-half-up. Batching does not change any element (pure elementwise
    float64 arithmetic), so the reference's per-frame calls give the same integers.
    """
    scale = float(1 << bits)
    o, a, b = affines[..., 0], affines[..., 1], affines[..., 2]
    r = np.arange(h, dtype=np.float64)[None, :, None]
    c = np.arange(w, dtype=np.float64)[None, :, None]
    rows = np.rint(((o + 0.5)[:, None, :] + r * a[:, None, :]) * scale).astype(np.int64)
    cols = np.rint((c * b[:, None, :]) * scale).astype(np.int64)
    return rows, cols


def _check_frames(frames) -> tuple[object, int, int, int]:
    """Frames [N, H, W] uint8 (numpy, h5py dataset or anything sliceable with .shape and .dtype)."""
    shape = getattr(frames, "shape", None)
    dtype = getattr(frames, "dtype", None)
    if shape is None or dtype is None:
        frames = np.asarray(frames)
        shape, dtype = frames.shape, frames.dtype
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"frames: expected shape [N, H, W] with N, H, W >= 1, got {list(shape)}")
    if np.dtype(dtype) != np.uint8:
        raise InputError(f"frames: expected uint8 pixel values (the sweep contract), got {np.dtype(dtype)}")
    return frames, int(shape[0]), int(shape[1]), int(shape[2])


def _check_mode(compounding: str) -> str:
    if compounding not in COMPOUNDING_MODES:
        raise InputError(f"compounding: expected one of {COMPOUNDING_MODES}, got {compounding!r}")
    return compounding


def _prepare(frames, tforms, pixel_spacing_xy, grid, spacing_mm, orientation):
    frames, n, h, w = _check_frames(frames)
    T = _check_tforms(tforms, n)
    _, _, sx, sy = _check_frame_geometry((h, w), pixel_spacing_xy)
    if grid is None:
        grid = output_grid_for(T, (h, w), (sx, sy), spacing_mm, orientation)
    grid = _check_grid(grid)
    affines = _pixel_to_index_affines(T, sx, sy, grid)
    bits, bound = _fraction_bits(affines, w, grid)
    return frames, T, grid, affines, bits, bound, (n, h, w, sx, sy)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class ReconstructionResult:
    """volume: float32 compounded values (0 where nothing was pasted or filled).
    coverage: uint8 mask, 1 where at least one pixel was pasted.
    filled: bool [k, j, i], voxels given a value by hole filling (never covered ones).
    hit_count: int32 [k, j, i] pixels per voxel (``mean`` only; None otherwise).
    """

    volume: Volume
    coverage: Volume
    filled: np.ndarray
    hit_count: Optional[np.ndarray]
    compounding: str


def _finish(grid: Grid, mode: str, values: np.ndarray, covered: np.ndarray, hits: Optional[np.ndarray],
            fill_holes: str, fill_kernel_mm: float, fill_min_ratio: float) -> ReconstructionResult:
    values = values.astype(np.float32, copy=False)
    filled = np.zeros(covered.shape, dtype=bool)
    if fill_holes != "none":
        values, filled = fill_volume_holes(values, covered, grid.spacing_xyz, fill_holes, fill_kernel_mm,
                                           fill_min_ratio)
    return ReconstructionResult(grid.volume(values), grid.volume(covered.astype(np.uint8)), filled, hits, mode)


def _check_fill(fill_holes, fill_kernel_mm, fill_min_ratio):
    if fill_holes not in FILL_METHODS:
        raise InputError(f"fill_holes: expected one of {FILL_METHODS}, got {fill_holes!r}")
    try:
        k, m = float(fill_kernel_mm), float(fill_min_ratio)
    except (TypeError, ValueError):
        k = m = float("nan")
    if not (math.isfinite(k) and k > 0):
        raise InputError(f"fill_kernel_mm: expected a positive kernel radius in mm, got {fill_kernel_mm!r}")
    if not (math.isfinite(m) and 0 < m <= 1):
        raise InputError(f"fill_min_ratio: expected a fraction in (0, 1], got {fill_min_ratio!r}")


# ----------------------------------------------------------------------------------------------
# Fast path
# ----------------------------------------------------------------------------------------------


def _max_hits_per_voxel(grid: Grid, n: int, h: int, w: int, sx: float, sy: float) -> int:
    """Upper bound on the pixels one voxel can receive: per frame, the pixel centres that fit in the
    voxel's section by the frame's plane (diameter <= the voxel's diagonal)."""
    d = float(np.linalg.norm(grid.spacing_xyz)) * (1 + 1e-6) + 1e-9
    per_frame = min(h * w, (int(d / sx) + 2) * (int(d / sy) + 2))
    return n * per_frame


def _check_grid_memory(shape_ijk, n_padded: int, chunk_pixels: int, dev) -> None:
    """Exit-2 error naming the voxel size when the grid cannot fit (core/memory.py), before allocating.

    Per voxel: the int64 sum and int32 count, the float32 volume, the uint8 coverage and a float64
    copy while finishing; per chunk pixel: three int64 index/value buffers.
    """
    from ultrasound_ai.core.memory import check_memory

    ni, nj, nk = shape_ijk
    check_memory(25 * n_padded + 24 * chunk_pixels, what=f"a compounding grid of {ni}x{nj}x{nk} voxels",
                 option="--spacing (spacing_mm)", device=str(dev))


def reconstruct_volume(frames, tforms, pixel_spacing_xy, grid=None, spacing_mm=0.5, orientation: str = "first",
                       compounding: str = "mean", fill_holes: str = "none", fill_kernel_mm: float = 1.0,
                       fill_min_ratio: float = 0.25, device="auto", chunk_frames: Optional[int] = None,
                       progress: Optional[ProgressFn] = None) -> ReconstructionResult:
    """Paste every pixel of ``frames`` [N, H, W] uint8 posed by ``tforms`` [N, 4, 4] into a volume.

    grid: a Grid or Volume (its geometry) for the output; by default ``output_grid_for(tforms, ...,
    spacing_mm, orientation)``. compounding: "mean" | "max" | "latest" (see the module docstring).
    fill_holes: "none" | "gaussian" | "nearest" (see ``fill_volume_holes``), with ``fill_kernel_mm``
    and ``fill_min_ratio``. device: "auto", "cpu", "cuda[:N]" (``core.device.resolve_device``).
    chunk_frames: frames per chunk (default: about 2 M pixels per chunk). progress(fraction, message)
    is called after every chunk. Frames may be an h5py dataset: chunks are read as needed.
    """
    import torch

    from ultrasound_ai.core.device import resolve_device

    mode = _check_mode(compounding)
    _check_fill(fill_holes, fill_kernel_mm, fill_min_ratio)
    frames, T, grid, affines, bits, bound, (n, h, w, sx, sy) = _prepare(frames, tforms, pixel_spacing_xy, grid,
                                                                          spacing_mm, orientation)
    dev = resolve_device(device)
    if chunk_frames is None:
        chunk_frames = max(1, _CHUNK_PIXELS // (h * w))
    if not isinstance(chunk_frames, (int, np.integer)) or isinstance(chunk_frames, bool) or chunk_frames < 1:
        raise InputError(f"chunk_frames: expected a positive number of frames, got {chunk_frames!r}")
    chunk_frames = int(chunk_frames)

    nk, nj, ni = grid.shape_kji
    padded_kji = (nk + 2, nj + 2, ni + 2)
    n_padded = padded_kji[0] * padded_kji[1] * padded_kji[2]
    stride_k, stride_j = padded_kji[1] * padded_kji[2], padded_kji[2]
    n_ijk = np.array([ni, nj, nk], dtype=np.int64)
    one = 1 << bits
    clip = int(math.ceil(bound)) << bits
    _check_grid_memory((ni, nj, nk), n_padded, chunk_frames * h * w, dev)

    packed = mode == "mean" and _max_hits_per_voxel(grid, n, h, w, sx, sy) <= PACKED_MAX_COUNT
    acc = _ACCUMULATORS["packed-mean" if packed else mode](n_padded, h, w, dev)

    buf_shape = (chunk_frames, h, w)
    axes_buf = torch.empty((2,) + buf_shape, dtype=torch.int32, device=dev)
    lin_buf = torch.empty(buf_shape if acc.int64_index else (0, h, w), dtype=torch.int64, device=dev)
    val_buf = torch.empty(buf_shape, dtype=acc.value_dtype, device=dev)

    done = 0
    for f0 in range(0, n, chunk_frames):
        f1 = min(n, f0 + chunk_frames)
        rows, cols = _fixed_point_terms(affines[f0:f1], h, w, bits)
        rows += one  # padding shell: grid index 0 is padded index 1
        # Exact per-frame index range: floor is monotone, so the min over pixels is floor(min R + min C).
        lo = (rows.min(axis=1) + cols.min(axis=1)) >> bits  # [B, 3]
        hi = (rows.max(axis=1) + cols.max(axis=1)) >> bits
        inside = np.all((hi >= 1) & (lo <= n_ijk), axis=1)  # frames touching the grid at all
        keep = np.nonzero(inside)[0]
        if keep.size:
            need_clamp = bool(np.any(lo[keep] < 1) or np.any(hi[keep] > n_ijk))
            b = int(keep.size)
            contiguous = keep.size == f1 - f0
            chunk = np.asarray(frames[f0:f1])
            if not contiguous:
                chunk = chunk[keep]
            rows_t = torch.from_numpy(np.clip(rows[keep], -clip, clip).astype(np.int32).transpose(2, 0, 1)
                                      .copy()).to(dev).unsqueeze(3)  # [3, B, H, 1]
            cols_t = torch.from_numpy(cols[keep].astype(np.int32).transpose(2, 0, 1).copy()).to(dev).unsqueeze(2)
            # Linear index in int32 (the padded grid has < 2^31 voxels): i + stride_j*j + stride_k*k.
            lin, tmp = axes_buf[0, :b], axes_buf[1, :b]
            for d, stride in ((0, 1), (1, stride_j), (2, stride_k)):
                out = lin if d == 0 else tmp
                torch.add(rows_t[d], cols_t[d], out=out)
                out.bitwise_right_shift_(bits)
                if need_clamp:
                    out.clamp_(0, int(n_ijk[d]) + 1)
                if d:
                    lin.add_(tmp, alpha=stride)
            if acc.int64_index:
                lin_buf[:b].copy_(lin)
                lin = lin_buf[:b]
            vals = val_buf[:b]
            vals.copy_(torch.from_numpy(np.ascontiguousarray(chunk)).to(dev, non_blocking=True))
            acc.add(lin.view(-1), vals, f0 + keep)
        done = f1
        if progress is not None:
            progress(done / n, f"compounded {done}/{n} frames")

    values, hits = acc.read(padded_kji)
    return _result_from_accumulators(grid, mode, values, hits, fill_holes, fill_kernel_mm, fill_min_ratio)


# One class per compounding mode: the voxel accumulator of the fast path on the padded grid (flat).
# `add(lin, vals, frames)` takes one chunk: linear voxel indices, the pixel values [B, H, W] (in a buffer of
# `value_dtype`, free to modify) and the chunk's frame numbers; `read` returns (values, hits) cropped to
# the grid for `_result_from_accumulators`.


def _crop(t, padded_kji) -> np.ndarray:
    return t.view(padded_kji)[1:-1, 1:-1, 1:-1].cpu().numpy()


class _MeanAccumulator:
    """mean: int64 sums and int32 counts."""

    int64_index = False  # index_add_ takes the int32 index as it is

    def __init__(self, n_padded: int, h: int, w: int, dev):
        import torch

        self.value_dtype = torch.int64
        self.sums = torch.zeros(n_padded, dtype=torch.int64, device=dev)
        self.counts = torch.zeros(n_padded, dtype=torch.int32, device=dev)
        self._one = torch.ones(1, dtype=torch.int32, device=dev)

    def add(self, lin, vals, frames) -> None:
        self.sums.index_add_(0, lin, vals.view(-1))
        self.counts.index_add_(0, lin, self._one.expand(lin.numel()))

    def read(self, padded_kji):
        return _crop(self.sums, padded_kji), _crop(self.counts, padded_kji)


class _PackedMeanAccumulator:
    """mean with at most PACKED_MAX_COUNT hits per voxel: count << _SUM_BITS | sum in one int64 (one
    scatter instead of two)."""

    int64_index = False

    def __init__(self, n_padded: int, h: int, w: int, dev):
        import torch

        self.value_dtype = torch.int64
        self.acc = torch.zeros(n_padded, dtype=torch.int64, device=dev)

    def add(self, lin, vals, frames) -> None:
        vals.add_(1 << _SUM_BITS)
        self.acc.index_add_(0, lin, vals.view(-1))

    def read(self, padded_kji):
        a = _crop(self.acc, padded_kji)
        hits = np.empty(a.shape, dtype=np.int32)
        np.right_shift(a, _SUM_BITS, out=hits, casting="unsafe")  # count < 2^23 fits int32
        return np.bitwise_and(a, (1 << _SUM_BITS) - 1, out=a), hits  # in place: the accumulator is done


class _MaxAccumulator:
    """max: the largest value, -1 where nothing hit."""

    int64_index = True  # scatter_reduce_ wants an int64 index

    def __init__(self, n_padded: int, h: int, w: int, dev):
        import torch

        # int16 halves the traffic on CPU; CUDA atomics want 32-bit words.
        self.value_dtype = torch.int16 if dev.type == "cpu" else torch.int32
        self.acc = torch.full((n_padded,), -1, dtype=self.value_dtype, device=dev)

    def add(self, lin, vals, frames) -> None:
        self.acc.scatter_reduce_(0, lin, vals.view(-1), "amax")

    def read(self, padded_kji):
        return _crop(self.acc, padded_kji), None


class _LatestAccumulator:
    """latest: the largest key (pixel order << 8 | value), order = frame * H*W + row * W + column, -1 where
    nothing hit; the value is the key's low byte."""

    int64_index = True

    def __init__(self, n_padded: int, h: int, w: int, dev):
        import torch

        self.value_dtype = torch.int64
        self.acc = torch.full((n_padded,), -1, dtype=torch.int64, device=dev)
        self._hw8 = (h * w) << 8
        self._order8 = (torch.arange(h * w, dtype=torch.int64, device=dev) << 8).view(1, h, w)
        self._dev = dev

    def add(self, lin, vals, frames) -> None:
        import torch

        vals.add_(self._order8)
        base = torch.from_numpy(np.asarray(frames, dtype=np.int64) * self._hw8).to(self._dev)
        vals.add_(base.view(-1, 1, 1))
        self.acc.scatter_reduce_(0, lin, vals.view(-1), "amax")

    def read(self, padded_kji):
        return _crop(self.acc, padded_kji), None


_ACCUMULATORS = {"mean": _MeanAccumulator, "packed-mean": _PackedMeanAccumulator, "max": _MaxAccumulator,
                 "latest": _LatestAccumulator}


def _result_from_accumulators(grid, mode, acc, hits, fill_holes, fill_kernel_mm, fill_min_ratio):
    """Shared final step. mean: acc = int sums, hits = counts; max: acc = max or -1; latest: keys or -1."""
    # Written into float32 outputs directly (no volume-sized int64/float64 temporaries); the mean is
    # the float64 quotient of the exact integer sum and count, rounded once to float32.
    values = np.zeros(acc.shape, dtype=np.float32)
    if mode == "mean":
        covered = hits > 0
        np.divide(acc, hits, out=values, where=covered, casting="same_kind")
        return _finish(grid, mode, values, covered, hits.astype(np.int32, copy=False), fill_holes, fill_kernel_mm,
                       fill_min_ratio)
    covered = acc >= 0
    if mode == "max":
        np.copyto(values, acc, where=covered, casting="unsafe")
    else:
        np.bitwise_and(acc, 0xFF, out=values, where=covered, casting="unsafe")
    return _finish(grid, mode, values, covered, None, fill_holes, fill_kernel_mm, fill_min_ratio)


# ----------------------------------------------------------------------------------------------
# Reference implementation (numpy, one frame at a time, no tricks): the oracle for the fast path
# ----------------------------------------------------------------------------------------------


def reconstruct_volume_reference(frames, tforms, pixel_spacing_xy, grid=None, spacing_mm=0.5,
                                 orientation: str = "first", compounding: str = "mean",
                                 fill_holes: str = "none", fill_kernel_mm: float = 1.0,
                                 fill_min_ratio: float = 0.25) -> ReconstructionResult:
    """Straightforward version of ``reconstruct_volume`` (same arithmetic, see the module docstring).

    For each frame: every pixel's voxel index, the pixels inside the grid, then np.add.at (mean),
    np.maximum.at (max) or "last occurrence wins" assignment (latest). Slow; for tests.
    """
    mode = _check_mode(compounding)
    _check_fill(fill_holes, fill_kernel_mm, fill_min_ratio)
    frames, T, grid, affines, bits, _, (n, h, w, _, _) = _prepare(frames, tforms, pixel_spacing_xy, grid, spacing_mm,
                                                            orientation)
    nk, nj, ni = grid.shape_kji
    n_ijk = np.array([ni, nj, nk])
    sums = np.zeros(grid.n_voxels, dtype=np.int64)
    hits = np.zeros(grid.n_voxels, dtype=np.int64)
    maxima = np.full(grid.n_voxels, -1, dtype=np.int64)
    latest = np.full(grid.n_voxels, -1, dtype=np.int64)
    for f in range(n):
        rows, cols = _fixed_point_terms(affines[f:f + 1], h, w, bits)
        index = (rows[0][:, None, :] + cols[0][None, :, :]) >> bits  # [H, W, 3] = (i, j, k)
        inside = np.all((index >= 0) & (index < n_ijk), axis=-1)
        lin = (index[..., 2] * nj + index[..., 1]) * ni + index[..., 0]
        lin = lin[inside]  # boolean indexing keeps raster order
        vals = np.asarray(frames[f])[inside].astype(np.int64)
        np.add.at(sums, lin, vals)
        np.add.at(hits, lin, 1)
        np.maximum.at(maxima, lin, vals)
        # The last pixel (raster order) hitting a voxel wins; later frames overwrite earlier ones.
        voxels, first_in_reversed = np.unique(lin[::-1], return_index=True)
        latest[voxels] = vals[::-1][first_in_reversed]
    shape = grid.shape_kji
    if mode == "mean":
        return _result_from_accumulators(grid, mode, sums.reshape(shape), hits.reshape(shape), fill_holes,
                                         fill_kernel_mm, fill_min_ratio)
    acc = maxima if mode == "max" else latest
    return _result_from_accumulators(grid, mode, acc.reshape(shape), None, fill_holes, fill_kernel_mm,
                                     fill_min_ratio)


# ----------------------------------------------------------------------------------------------
# Hole filling
# ----------------------------------------------------------------------------------------------


def fill_volume_holes(values: np.ndarray, covered: np.ndarray, spacing_xyz, method: str = "gaussian",
                      kernel_mm: float = 1.0, min_ratio: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Fill uncovered voxels that are surrounded by enough covered ones; returns (values, filled mask).

    The neighbourhood of a voxel is the box of ±floor(kernel_mm / spacing) voxels per axis (at least
    one). An uncovered voxel is filled when at least ``min_ratio`` of its neighbourhood is covered:

    - ``gaussian``: the gaussian-weighted mean (σ = kernel_mm / 2, per-axis in mm) of the covered
      neighbours (normalised convolution: conv(values·mask) / conv(mask)).
    - ``nearest``: the value of the nearest covered voxel (Euclidean, in mm), if within kernel_mm.

    Covered voxels are never changed. Arrays are [k, j, i]; spacing_xyz is (x, y, z) mm.
    """
    from scipy import ndimage

    if method not in ("gaussian", "nearest"):
        raise InputError(f"fill_holes: expected 'gaussian' or 'nearest', got {method!r}")
    _check_fill(method, kernel_mm, min_ratio)
    values = np.asarray(values, dtype=np.float32)
    covered = np.asarray(covered, dtype=bool)
    if values.shape != covered.shape or values.ndim != 3:
        raise InputError(f"covered: expected a 3D mask shaped like values {values.shape}, got {covered.shape}")
    spacing_kji = np.asarray(spacing_xyz, dtype=np.float64)[::-1]
    radius = np.maximum(1, np.floor(kernel_mm / spacing_kji + 1e-9).astype(int))
    out = values.copy()
    if not covered.any() or covered.all():
        return out, np.zeros(covered.shape, dtype=bool)
    mask = covered.astype(np.float32)
    ratio = mask
    for axis in range(3):
        ratio = ndimage.uniform_filter1d(ratio, size=2 * radius[axis] + 1, axis=axis, mode="constant")
    # uniform_filter1d works in float32; allow for its rounding at the threshold.
    candidates = ~covered & (ratio >= min_ratio - 1e-6)
    if method == "gaussian":
        sigma_mm = kernel_mm / 2.0
        num = np.where(covered, values, 0).astype(np.float32)
        den = mask
        for axis in range(3):
            x = np.arange(-radius[axis], radius[axis] + 1) * spacing_kji[axis]
            weights = np.exp(-0.5 * (x / sigma_mm) ** 2)
            num = ndimage.correlate1d(num, weights, axis=axis, mode="constant")
            den = ndimage.correlate1d(den, weights, axis=axis, mode="constant")
        filled = candidates & (den > 0)
        out[filled] = num[filled] / den[filled]
    else:
        dist, nearest = ndimage.distance_transform_edt(~covered, sampling=spacing_kji, return_indices=True)
        filled = candidates & (dist <= kernel_mm + 1e-9)
        out[filled] = values[tuple(ix[filled] for ix in nearest)]
    return out, filled
