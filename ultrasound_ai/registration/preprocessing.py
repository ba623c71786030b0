"""Attention-Reg input preparation (registration.md, "Data preparation in the original").

The region of interest is the MR gland label's bounding box (in the MRI's index axes) enlarged by 30 %
of its extent on each side. Both modalities are resampled onto a (z, y, x) = 32x96x96 grid spanning it
(linear interpolation) and min-max scaled to [0, 1]. The TRUS is sampled at T(p) for each ROI point p,
T mapping fixed (MRI) LPS to moving (TRUS) LPS as in ITK. The ROI geometry is kept so a correction
predicted in the ROI maps back to physical space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import apply_transform
from ultrasound_ai.io.volume import Volume, resample_volume
from ultrasound_ai.registration.case import Case, binary_label, check_3d, check_rigid_matrix

DEFAULT_SIZE = (32, 96, 96)  # (z, y, x)
DEFAULT_MARGIN = 0.30


@dataclass
class PreparedPair:
    """array float32 [2, z, y, x]: channel 0 the MRI (or its label), channel 1 the TRUS through T.
    roi: the ROI grid (a Volume of zeros; use roi.ijk_to_lps()). centroid_lps: the fixed label's centroid."""

    array: np.ndarray
    roi: Volume
    centroid_lps: np.ndarray


def unpack_volumes(case_or_volumes):
    """(fixed, fixed_label, moving) from a Case, a (fixed, fixed_label, moving) tuple or a dict with
    those keys; checks that they are 3D, the label non-empty and on the MRI's grid."""
    if isinstance(case_or_volumes, Case):
        return case_or_volumes.fixed, case_or_volumes.fixed_label, case_or_volumes.moving
    if isinstance(case_or_volumes, dict):
        try:
            fixed, label, moving = (case_or_volumes[k] for k in ("fixed", "fixed_label", "moving"))
        except KeyError as exc:
            raise InputError(f"volumes: expected keys fixed, fixed_label, moving; missing {exc}") from exc
    else:
        try:
            fixed, label, moving = case_or_volumes
        except (TypeError, ValueError):
            raise InputError("volumes: expected a Case, a (fixed, fixed_label, moving) tuple or a dict") from None
    check_3d(fixed, "fixed (MRI)")
    check_3d(moving, "moving (TRUS)")
    label = binary_label(label, "fixed_label", reference=fixed)
    return fixed, label, moving


def label_centroid(label: Volume) -> np.ndarray:
    kji = np.argwhere(label.array != 0)
    if len(kji) == 0:
        raise InputError("fixed_label: the label is empty")
    return label.index_to_physical(kji[:, ::-1].astype(np.float64)).mean(axis=0)


def label_bbox_ijk(label: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) voxel indices (i, j, k) of the non-zero voxels."""
    kji = np.argwhere(label.array != 0)
    if len(kji) == 0:
        raise InputError("fixed_label: the label is empty")
    ijk = kji[:, ::-1]
    return ijk.min(axis=0).astype(np.float64), ijk.max(axis=0).astype(np.float64)


def check_overlap(fixed_label: Volume, moving: Volume, T_fixed_to_moving) -> None:
    """InputError when the fixed label's bounding box, mapped through T, misses the moving volume."""
    lo, hi = label_bbox_ijk(fixed_label)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    pts = apply_transform(np.asarray(T_fixed_to_moving, dtype=np.float64), fixed_label.index_to_physical(corners))
    idx = moving.physical_to_index(pts)
    n = np.array(moving.shape_ijk, dtype=np.float64)
    box_lo, box_hi = idx.min(axis=0), idx.max(axis=0)
    if np.any(box_hi < -0.5) or np.any(box_lo > n - 0.5):
        mlo, mhi = moving.physical_extent()
        raise InputError(
            "volumes do not overlap: the fixed label's bounding box, mapped into the moving (TRUS) volume by the "
            f"initial transform, spans LPS {pts.min(axis=0).round(1).tolist()} to {pts.max(axis=0).round(1).tolist()} "
            f"mm, outside the TRUS extent {mlo.round(1).tolist()} to {mhi.round(1).tolist()} mm; give an initial "
            "transform (--initial) that brings them together"
        )


def roi_grid(label: Volume, size=DEFAULT_SIZE, margin: float = DEFAULT_MARGIN) -> Volume:
    """The ROI: the label's voxel bounding box (fixed image axes) enlarged by `margin` of its extent per
    side, sampled at size = (z, y, x) points from edge to edge; a Volume of zeros (uint8)."""
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 2:
        raise InputError(f"size: expected (z, y, x) with each >= 2, got {size}")
    if not (np.isfinite(margin) and margin >= 0):
        raise InputError(f"margin: expected a fraction >= 0, got {margin}")
    lo, hi = label_bbox_ijk(label)
    ext = np.maximum(hi - lo, 1.0)  # a one-voxel-thick label still gets a non-degenerate box
    lo_e, hi_e = lo - margin * ext, hi + margin * ext
    n_ijk = np.array(size[::-1], dtype=np.float64)
    spacing_idx = (hi_e - lo_e) / (n_ijk - 1)
    spacing = spacing_idx * label.spacing_xyz
    origin = label.index_to_physical(lo_e)
    return Volume(np.zeros(size, dtype=np.uint8), spacing, origin, label.direction.copy())


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(a, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def prepare_input(case_or_volumes, T_fixed_to_moving=None, mode: str = "label", size=DEFAULT_SIZE,
                  margin: float = DEFAULT_MARGIN, check: bool = True) -> PreparedPair:
    """Network input for one MRI-TRUS pair under the current transform T (fixed LPS -> moving LPS; None =
    identity, the volumes' physical positions). mode "label": channel 0 is the MR gland label, "image":
    the MRI. Empty label, 2D images, a label off the MRI grid, or volumes that do not overlap under T
    -> InputError."""
    if mode not in ("label", "image"):
        raise InputError(f"mode: expected 'label' or 'image', got {mode!r}")
    fixed, label, moving = unpack_volumes(case_or_volumes)
    T = np.eye(4) if T_fixed_to_moving is None else check_rigid_matrix(T_fixed_to_moving, "transform T_fixed_to_moving")
    if check:
        check_overlap(label, moving, T)
    roi = roi_grid(label, size, margin)
    source = label.with_array(label.array.astype(np.float32)) if mode == "label" else fixed
    ch0 = resample_volume(source, roi, None, "linear", 0.0, output_dtype=np.float32).array
    ch1 = resample_volume(moving, roi, T, "linear", 0.0, output_dtype=np.float32).array
    arr = np.stack([_minmax(ch0), _minmax(ch1)], axis=0)
    return PreparedPair(arr, roi, label_centroid(label))
