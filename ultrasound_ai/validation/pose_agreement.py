"""Scale-free agreement between estimated and true freehand poses (validation measures beside FDR).

- `centre_out_of_plane_mm`: per frame pair i -> i+1, the out-of-plane (image z) component of the frame
  centre's displacement, in frame i's image-mm axes.
- `out_of_plane_correlation`: the Pearson correlation over frame pairs between the predicted and the true
  magnitude of that translation (does a method see *when* the probe moves fast or slow, whatever its
  scale); None when the true magnitude has no variance; 0.0 for a prediction without variance (it
  carries no information about the speed profile).
- `rescale_translations`: the estimate with every frame pair's centre displacement multiplied by one
  factor k per sweep, k fitted by least squares to the true per-pair centre displacements. FDR after
  this fit separates "wrong scale" (an unseen probe's beam width) from "wrong motion".
Poses are [N, 4, 4] image mm -> world (the sweep contract); estimates may use another world frame.
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["frame_centre_mm", "centre_out_of_plane_mm", "out_of_plane_correlation", "rescale_translations"]


def frame_centre_mm(frame_shape_hw, pixel_spacing_xy) -> np.ndarray:
    """Image-mm position of the frame centre (pixel centres run from 0 to (n - 1) spacing)."""
    h, w = (int(v) for v in frame_shape_hw)
    sx, sy = (float(v) for v in np.broadcast_to(np.asarray(pixel_spacing_xy, dtype=np.float64), (2,)))
    return np.array([(w - 1) * sx / 2.0, (h - 1) * sy / 2.0, 0.0])


def _relative_about_centre(tforms, centre) -> np.ndarray:
    """Pair motions inv(T_i) T_{i+1} expressed with the origin at the frame centre [N-1, 4, 4]."""
    t = np.asarray(tforms, dtype=np.float64)
    if t.ndim != 3 or t.shape[1:] != (4, 4) or t.shape[0] < 2:
        raise InputError(f"poses: expected [N >= 2, 4, 4], got {list(t.shape)}")
    rel = np.linalg.solve(t[:-1], t[1:])
    shift = np.eye(4)
    shift[:3, 3] = centre
    return np.linalg.inv(shift) @ rel @ shift


def centre_out_of_plane_mm(tforms, frame_shape_hw, pixel_spacing_xy) -> np.ndarray:
    """Signed out-of-plane displacement [N-1] (mm) of the frame centre per pair, in frame i's axes."""
    return _relative_about_centre(tforms, frame_centre_mm(frame_shape_hw, pixel_spacing_xy))[:, 2, 3]


def out_of_plane_correlation(est_tforms, true_tforms, frame_shape_hw, pixel_spacing_xy):
    """Pearson r between |predicted| and |true| per-pair centre out-of-plane translation (None: undefined truth)."""
    p = np.abs(centre_out_of_plane_mm(est_tforms, frame_shape_hw, pixel_spacing_xy))
    t = np.abs(centre_out_of_plane_mm(true_tforms, frame_shape_hw, pixel_spacing_xy))
    if p.shape != t.shape:
        raise InputError(f"poses: estimate has {p.size + 1} frames, truth {t.size + 1}")
    if t.std() < 1e-9:
        return None
    if p.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(p, t)[0, 1])


def rescale_translations(est_tforms, true_tforms, frame_shape_hw, pixel_spacing_xy):
    """(k, rescaled estimate [N, 4, 4] with tforms[0] = identity): one least-squares scale of the centre
    displacements per sweep; rotations are kept."""
    centre = frame_centre_mm(frame_shape_hw, pixel_spacing_xy)
    rel_e = _relative_about_centre(est_tforms, centre)
    rel_t = _relative_about_centre(true_tforms, centre)
    de, dt = rel_e[:, :3, 3], rel_t[:, :3, 3]
    denom = float((de * de).sum())
    k = float((de * dt).sum() / denom) if denom > 0 else 1.0
    rel_e = rel_e.copy()
    rel_e[:, :3, 3] *= k
    shift = np.eye(4)
    shift[:3, 3] = centre
    rel = shift @ rel_e @ np.linalg.inv(shift)
    out = np.empty((rel.shape[0] + 1, 4, 4))
    out[0] = np.eye(4)
    for i, r in enumerate(rel):
        out[i + 1] = out[i] @ r
    return k, out
