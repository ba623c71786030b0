"""TUS-REC challenge scans (MICCAI 2024/2025 trackerless freehand reconstruction) -> Sweep.

Facts about the data (from the challenge's data description and baseline code):

* one HDF5 per scan: ``frames`` [N, 480, 640] uint8 and ``tforms`` [N, 4, 4], the tracker TOOL -> optical
  CAMERA transform (mm) of each frame; frames at 20 fps, no timestamps;
* ``calib_matrix.csv``: a label line, 4 lines "pixel -> mm scaling" (4x4), a label line, 4 lines
  "image (mm) -> tracking tool" (4x4, rigid). Older copies hold the 8 numeric lines without labels; both
  are read (the numeric lines, in order);
* TUS-REC pixel coordinates are 1-BASED: the baseline maps pixel (x, y) = (column + 1, row + 1) through
  the scaling matrix, so TUS-REC's image-mm origin is one pixel up-left of pixel (0, 0)'s centre;
* landmarks ``landmark_XXX.h5``: one dataset per scan (named like the scan file, e.g. ``RH_rotation``),
  [K, 3] = (frame index, x, y) with the frame index 0-based and x (column), y (row) 1-based.

Conversion to the contract (image-mm origin at the centre of pixel (0, 0), 0-based)::

    pixel (c, r) -> camera mm:  tforms_i · calib_mm_to_tool · scale · [c + 1, r + 1, 0, 1]
    contract tforms_i = that matrix · diag(1/sx, 1/sy, 1, 1)    (made exactly rigid)

so ``tforms[i] @ [c·sx, r·sy, 0, 1]`` is the TUS-REC position of pixel (c, r). The world is the optical
camera's frame (it has no anatomical meaning; it is taken as the LPS world). Landmarks are stored in
``attrs['landmarks']`` as float64 [K, 3] = (frame, x_px, y_px), all 0-based.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.plus import frames_to_uint8, pixel_matrices_to_rigid
from ultrasound_ai.io.sweep import Sweep

__all__ = ["read_tusrec_calibration", "read_tusrec_landmarks", "read_tusrec_scan", "TUSREC_FRAME_RATE_HZ"]

TUSREC_FRAME_RATE_HZ = 20.0
_RIGID_TOL = 1e-3


def read_tusrec_calibration(calib_csv: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_to_mm, image_mm_to_tool)``, two float64 4x4 matrices from a TUS-REC ``calib_matrix.csv``."""
    p = Path(calib_csv)
    if not p.exists():
        raise InputError(f"{p}: TUS-REC calibration file (calib_matrix.csv) not found")
    if not p.is_file():
        raise InputError(f"{p}: expected the calibration CSV file, found a folder")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        cells = [c.strip() for c in line.split(",")]
        if not any(cells):
            continue
        try:
            vals = [float(c) for c in cells if c != ""]
        except ValueError:
            continue  # a label line ("scaling_from_pixel_to_mm", ...)
        if len(vals) != 4:
            raise InputError(f"{p}: line {n} holds {len(vals)} numbers; expected 4 (one row of a 4x4 matrix)")
        rows.append(vals)
    if len(rows) != 8:
        raise InputError(
            f"{p}: expected two 4x4 matrices (8 numeric rows: pixel -> mm scaling, then image-mm -> tool), "
            f"found {len(rows)} numeric rows"
        )
    a = np.asarray(rows, dtype=np.float64)
    scale, calib = a[:4], a[4:]
    if not np.all(np.isfinite(a)):
        raise InputError(f"{p}: the calibration contains NaN or infinite values")
    for what, m in (("pixel -> mm scaling", scale), ("image-mm -> tool calibration", calib)):
        if np.abs(m[3] - [0, 0, 0, 1]).max() > 1e-9:
            raise InputError(f"{p}: the {what} matrix must end with the row 0 0 0 1, got {m[3].tolist()}")
    r = calib[:3, :3]
    err = max(np.abs(r.T @ r - np.eye(3)).max(), abs(np.linalg.det(r) - 1))
    if err > _RIGID_TOL:
        raise InputError(
            f"{p}: the image-mm -> tool calibration (rows 6-9) must be rigid; max |RᵀR − I|, |det − 1| = {err:.3g}"
        )
    if scale[0, 0] <= 0 or scale[1, 1] <= 0:
        raise InputError(f"{p}: the pixel -> mm scaling (rows 1-4) must have positive diagonal sx, sy; got {np.diag(scale)[:2]}")
    return scale, calib


def read_tusrec_landmarks(landmarks, scan_name: str | None, n_frames: int, frame_shape_hw, key: str | None = None) -> np.ndarray:
    """Landmarks as float64 [K, 3] = (frame, x_px, y_px), 0-based, from a ``landmark_XXX.h5`` path (dataset
    ``key``, else ``scan_name``, else its only dataset) or an array [K, 3] in TUS-REC convention (frame
    0-based, x and y 1-based). Checks frames and pixels lie inside the scan."""
    if isinstance(landmarks, (str, os.PathLike)):
        import h5py

        lp = Path(landmarks)
        if not lp.is_file():
            raise InputError(f"{lp}: landmark file not found")
        try:
            fh = h5py.File(lp, "r")
        except OSError as exc:
            raise InputError(f"{lp}: not an HDF5 file ({exc})") from exc
        with fh:
            names = [k for k in fh.keys() if isinstance(fh[k], h5py.Dataset)]
            want = key or (scan_name if scan_name in names else None) or (names[0] if len(names) == 1 else None)
            if want is None or want not in names:
                raise InputError(
                    f"{lp}: no landmark dataset {key or scan_name!r}; found {sorted(names)} (pass landmarks_key=)"
                )
            arr = fh[want][()]
        where = f"{lp}:{want}"
    else:
        arr, where = landmarks, "landmarks"
    a = np.asarray(arr)
    if a.dtype.kind not in "iuf" or a.ndim != 2 or a.shape[1] != 3:
        raise InputError(f"{where}: expected [K, 3] numbers (frame, x, y), got shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{where}: contains NaN or infinite values")
    out = a.copy()
    out[:, 1:] -= 1.0  # TUS-REC pixels are 1-based
    h, w = frame_shape_hw
    bad = (out[:, 0] < 0) | (out[:, 0] > n_frames - 1) | (out[:, 0] != np.round(out[:, 0]))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise InputError(f"{where}: landmark {i} has frame index {a[i, 0]:g}; expected an integer 0..{n_frames - 1}")
    bad = (out[:, 1] < 0) | (out[:, 1] > w - 1) | (out[:, 2] < 0) | (out[:, 2] > h - 1)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise InputError(
            f"{where}: landmark {i} at (x, y) = ({a[i, 1]:g}, {a[i, 2]:g}) is outside the {w}x{h} frame "
            "(expected 1-based pixel coordinates)"
        )
    return out


def read_tusrec_scan(
    h5_path: str | os.PathLike,
    calib_csv: str | os.PathLike,
    landmarks=None,
    landmarks_key: str | None = None,
    frame_rate_hz: float = TUSREC_FRAME_RATE_HZ,
) -> Sweep:
    """Read a TUS-REC scan (HDF5 ``frames`` + ``tforms``) and its ``calib_matrix.csv`` into a validated Sweep.

    ``landmarks``: optional ``landmark_XXX.h5`` path (dataset named like the scan file's stem, or
    ``landmarks_key``) or a [K, 3] array in TUS-REC convention; stored 0-based in ``attrs['landmarks']``.
    """
    import h5py

    p = Path(h5_path)
    if not p.exists():
        raise InputError(f"{p}: TUS-REC scan file not found")
    if not p.is_file():
        raise InputError(f"{p}: expected a TUS-REC scan (.h5), found a folder")
    scale, calib = read_tusrec_calibration(calib_csv)
    try:
        fh = h5py.File(p, "r")
    except OSError as exc:
        raise InputError(f"{p}: not an HDF5 file ({exc})") from exc
    with fh:
        for key in ("frames", "tforms"):
            if key not in fh or not isinstance(fh[key], h5py.Dataset):
                raise InputError(f"{p}: no '{key}' dataset (TUS-REC scans hold 'frames' [N, H, W] and 'tforms' [N, 4, 4]); found {sorted(fh.keys())}")
        frames = fh["frames"][()]
        tforms = fh["tforms"][()]
    if frames.ndim != 3:
        raise InputError(f"{p}: 'frames' must be [N, H, W], got shape {frames.shape}")
    frames = frames_to_uint8(frames, f"{p}: 'frames'")
    if tforms.dtype.kind not in "iuf" or tforms.ndim != 3 or tforms.shape[1:] != (4, 4):
        raise InputError(f"{p}: 'tforms' must be [N, 4, 4] numbers, got shape {tforms.shape} dtype {tforms.dtype}")
    n = frames.shape[0]
    if tforms.shape[0] != n:
        raise InputError(f"{p}: 'tforms' holds {tforms.shape[0]} transforms for {n} frames")
    tforms = tforms.astype(np.float64)
    if not np.all(np.isfinite(tforms)):
        i = int(np.argmax(~np.all(np.isfinite(tforms), axis=(1, 2))))
        raise InputError(f"{p}: 'tforms' frame {i} contains NaN or infinite values")
    # 0-based pixel (c, r, 0) -> TUS-REC 1-based pixel (c + 1, r + 1, 0).
    shift = np.eye(4)
    shift[:2, 3] = 1.0
    pixel_to_camera = tforms @ (calib @ scale @ shift)
    T, _, _ = pixel_matrices_to_rigid(pixel_to_camera, f"{p}: tforms · calibration")
    # The spacing from the scaling matrix itself: float32 tracker rotations are rigid only to ~1e-7.
    spacing = (float(np.linalg.norm(scale[:3, 0])), float(np.linalg.norm(scale[:3, 1])))
    attrs = {"source": "TUS-REC", "tusrec_scan": p.stem}
    if landmarks is not None:
        attrs["landmarks"] = read_tusrec_landmarks(landmarks, p.stem, n, frames.shape[1:], key=landmarks_key)
    sweep = Sweep(frames=frames, pixel_spacing_xy=spacing, tforms=T, frame_rate_hz=frame_rate_hz, attrs=attrs)
    return sweep.validate(name=str(p))
