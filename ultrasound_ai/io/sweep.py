"""The freehand sweep file contract (docs/DATA_FORMATS.md, "Freehand sweep"): one HDF5 file per sweep.

Datasets: `frames` uint8 [N, H, W]; optional `tforms` float64 [N, 4, 4] (image-mm -> world LPS mm),
`timestamps_s` float64 [N], `imu_acc` / `imu_euler_deg` float32 [M, N, 3], `imu_weights` float32
[N-1, M]. Root attributes: `pixel_spacing_mm` = [sx, sy] (column spacing first), optional
`frame_rate_hz`, optional `imu_position_mm` [M, 3]; any other root attribute is a free extra
(simulator version, seed, tactic, ...) kept in `Sweep.attrs`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.hdf5_output import hdf5_output

# Names with a meaning in the contract; everything else at the root is a free attribute.
_DATASETS = ("frames", "tforms", "timestamps_s", "imu_acc", "imu_euler_deg", "imu_weights")
# A freehand sweep's plausible frame rates: outside them the times are almost surely in another unit (ms, us,
# a period for a rate), which would silently rescale every IMU integration and smoothing step.
MIN_FRAME_RATE_HZ = 0.2
MAX_FRAME_RATE_HZ = 5000.0
GRAVITY_NORM_M_S2 = 9.81
# B-mode pixels are tens of micrometres to a few millimetres: outside, the spacing is in another unit (m, um) and
# every method would resample a frame a thousand times too small or too large onto its grid without complaint.
MIN_PIXEL_SPACING_MM = 0.005
MAX_PIXEL_SPACING_MM = 5.0

_RESERVED_ATTRS = ("pixel_spacing_mm", "frame_rate_hz", "imu_position_mm")
# Free attributes that are not HDF5-storable scalars/arrays travel as JSON under this prefix.
_JSON_PREFIX = "json:"
_RIGID_TOL = 1e-4


def specific_force_problem(imu_acc):
    """What is wrong with `imu_acc` [M, N, 3] as specific force in m/s^2 (a sentence), or None. A hand-held
    probe's accelerometers read about 1 g (gravity included): a median magnitude far from it is another unit (g),
    gravity removed, or a dead sensor, and every consumer would integrate confident nonsense."""
    g = float(np.median(np.linalg.norm(np.asarray(imu_acc, dtype=np.float64).mean(axis=0), axis=-1)))
    if 0.5 * GRAVITY_NORM_M_S2 < g < 1.5 * GRAVITY_NORM_M_S2:
        return None
    return (f"has a median magnitude of {g:.3g} m/s^2 (the IMUs' mean); a hand-held probe's accelerometers read "
            f"about {GRAVITY_NORM_M_S2} m/s^2: expected the specific force in m/s^2 with gravity included")


@dataclass
class Sweep:
    frames: np.ndarray
    pixel_spacing_xy: tuple[float, float]
    tforms: np.ndarray | None = None
    timestamps_s: np.ndarray | None = None
    frame_rate_hz: float | None = None
    imu_acc: np.ndarray | None = None
    imu_euler_deg: np.ndarray | None = None
    imu_position_mm: np.ndarray | None = None
    imu_weights: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # Normalise floating arrays to the contract's dtypes; frames are NOT converted (uint8 only,
        # converting other inputs is the importers' job) so that validate() can refuse them.
        self.frames = np.asarray(self.frames)
        self.tforms = _as_float(self.tforms, np.float64)
        self.timestamps_s = _as_float(self.timestamps_s, np.float64)
        self.imu_acc = _as_float(self.imu_acc, np.float32)
        self.imu_euler_deg = _as_float(self.imu_euler_deg, np.float32)
        self.imu_position_mm = _as_float(self.imu_position_mm, np.float64)
        self.imu_weights = _as_float(self.imu_weights, np.float32)
        if self.frame_rate_hz is not None:
            self.frame_rate_hz = float(self.frame_rate_hz)
        self.attrs = dict(self.attrs or {})

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0]) if self.frames.ndim >= 1 else 0

    @property
    def n_imus(self) -> int:
        for a in (self.imu_acc, self.imu_euler_deg):
            if a is not None and a.ndim == 3:
                return int(a.shape[0])
        return 0

    def without_truth(self) -> "Sweep":
        """A copy with the ground-truth tforms removed (what every non-tracked method must see)."""
        return dataclasses.replace(self, tforms=None, attrs=dict(self.attrs))

    def times_s(self) -> np.ndarray:
        """Frame times: the timestamps, else i / frame_rate_hz; InputError when neither is known."""
        if self.timestamps_s is not None:
            return self.timestamps_s
        if self.frame_rate_hz is not None:
            return np.arange(self.n_frames, dtype=np.float64) / self.frame_rate_hz
        raise InputError("sweep: neither 'timestamps_s' nor 'frame_rate_hz' is given")

    def validate(self, name: str = "sweep") -> "Sweep":
        """Check the contract; raise InputError naming `name` and the field. Returns self."""
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8:
            raise InputError(f"{name}: 'frames' must be uint8, got {getattr(f, 'dtype', type(f))}")
        if f.ndim != 3:
            raise InputError(f"{name}: 'frames' must be [N, H, W] (3-D), got shape {f.shape}")
        n = f.shape[0]
        if n < 2:
            raise InputError(f"{name}: 'frames' holds {n} frame(s); a sweep needs at least 2")
        if f.shape[1] < 1 or f.shape[2] < 1:
            raise InputError(f"{name}: 'frames' has empty frames, shape {f.shape}")
        sp = np.asarray(self.pixel_spacing_xy, dtype=np.float64) if self.pixel_spacing_xy is not None else None
        if sp is None or sp.shape != (2,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise InputError(
                f"{name}: 'pixel_spacing_mm' must be two positive finite numbers [sx, sy], got {self.pixel_spacing_xy!r}"
            )
        if np.any(sp < MIN_PIXEL_SPACING_MM) or np.any(sp > MAX_PIXEL_SPACING_MM):
            raise InputError(f"{name}: 'pixel_spacing_mm' must be millimetres per pixel, {MIN_PIXEL_SPACING_MM:g}-"
                             f"{MAX_PIXEL_SPACING_MM:g} for an ultrasound image, got {sp.tolist()} (metres or micrometres?)")
        if self.tforms is not None:
            t = self.tforms
            if t.ndim != 3 or t.shape[1:] != (4, 4):
                raise InputError(f"{name}: 'tforms' must be [N, 4, 4], got shape {t.shape}")
            if t.shape[0] != n:
                raise InputError(f"{name}: 'tforms' holds {t.shape[0]} matrices for {n} frames")
            if not np.all(np.isfinite(t)):
                raise InputError(f"{name}: 'tforms' contains NaN or infinite values")
            _check_rigid(t, name)
        if self.timestamps_s is not None:
            ts = self.timestamps_s
            if ts.shape != (n,):
                raise InputError(f"{name}: 'timestamps_s' must be [N] = [{n}], got shape {ts.shape}")
            if not np.all(np.isfinite(ts)):
                raise InputError(f"{name}: 'timestamps_s' contains NaN or infinite values")
            if np.any(np.diff(ts) <= 0):
                i = int(np.argmax(np.diff(ts) <= 0))
                raise InputError(f"{name}: 'timestamps_s' must increase strictly (frame {i + 1} is not after frame {i})")
            dt = float(np.median(np.diff(ts)))
            if not 1.0 / MAX_FRAME_RATE_HZ <= dt <= 1.0 / MIN_FRAME_RATE_HZ:
                raise InputError(f"{name}: 'timestamps_s' must be in seconds: its median frame interval is {dt:g}, "
                                 f"expected {1.0 / MAX_FRAME_RATE_HZ:g}-{1.0 / MIN_FRAME_RATE_HZ:g} s "
                                 f"({MIN_FRAME_RATE_HZ:g}-{MAX_FRAME_RATE_HZ:g} frames per second)")
        if self.frame_rate_hz is not None and not (np.isfinite(self.frame_rate_hz)
                                                   and MIN_FRAME_RATE_HZ <= self.frame_rate_hz <= MAX_FRAME_RATE_HZ):
            raise InputError(f"{name}: 'frame_rate_hz' must be frames per second in {MIN_FRAME_RATE_HZ:g}-"
                             f"{MAX_FRAME_RATE_HZ:g} Hz, got {self.frame_rate_hz}")
        m = None
        for key in ("imu_acc", "imu_euler_deg"):
            a = getattr(self, key)
            if a is None:
                continue
            if a.ndim != 3 or a.shape[1] != n or a.shape[2] != 3 or a.shape[0] < 1:
                raise InputError(f"{name}: '{key}' must be [M, N, 3] with N = {n} frames, got shape {a.shape}")
            if m is not None and a.shape[0] != m:
                raise InputError(f"{name}: '{key}' has {a.shape[0]} IMUs but another IMU array has {m}")
            m = a.shape[0]
            if not np.all(np.isfinite(a)):
                raise InputError(f"{name}: '{key}' contains NaN or infinite values")
        if m is not None and self.timestamps_s is None and self.frame_rate_hz is None:
            raise InputError(f"{name}: IMU data need 'timestamps_s' or the attribute 'frame_rate_hz'")
        if self.imu_acc is not None:
            problem = specific_force_problem(self.imu_acc)
            if problem:
                raise InputError(f"{name}: 'imu_acc' {problem}")
        if self.imu_position_mm is not None:
            p = self.imu_position_mm
            if p.ndim != 2 or p.shape[1] != 3 or (m is not None and p.shape[0] != m):
                want = f"[{m}, 3]" if m is not None else "[M, 3]"
                raise InputError(f"{name}: 'imu_position_mm' must be {want}, got shape {p.shape}")
            if not np.all(np.isfinite(p)):
                raise InputError(f"{name}: 'imu_position_mm' contains NaN or infinite values")
        if self.imu_weights is not None:
            w = self.imu_weights
            if w.ndim != 2 or w.shape[0] != n - 1 or (m is not None and w.shape[1] != m):
                want = f"[{n - 1}, {m if m is not None else 'M'}]"
                raise InputError(f"{name}: 'imu_weights' must be [N-1, M] = {want}, got shape {w.shape}")
            if not np.all(np.isfinite(w)):
                raise InputError(f"{name}: 'imu_weights' contains NaN or infinite values")
        return self


def _as_float(a, dtype):
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.kind in "fiu" and a.dtype != dtype:
        a = a.astype(dtype)
    return a


def _check_rigid(t: np.ndarray, name: str) -> None:
    bottom = t[:, 3, :]
    bad_bottom = np.any(np.abs(bottom - np.array([0.0, 0.0, 0.0, 1.0])) > 1e-6, axis=1)
    r = t[:, :3, :3]
    orth = np.abs(np.einsum("nji,njk->nik", r, r) - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(r)
    bad = bad_bottom | (orth > _RIGID_TOL) | (det <= 0)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise InputError(
            f"{name}: 'tforms' must be rigid (orthonormal rotation, det +1, last row 0 0 0 1); "
            f"frame {i} is not (max |RᵀR − I| = {orth[i]:.3g}, det = {det[i]:.3g})"
        )


def _attr_to_python(v):
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if isinstance(v, str):
        return json.loads(v[len(_JSON_PREFIX):]) if v.startswith(_JSON_PREFIX) else v
    if isinstance(v, np.generic):
        return v.item()
    return v


def _attr_to_hdf5(key: str, v):
    if isinstance(v, (str, bool, int, float, np.generic)):
        return v
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return v
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return np.asarray(v)
    try:
        return _JSON_PREFIX + json.dumps(v)
    except TypeError as exc:
        raise InputError(f"sweep attribute '{key}' cannot be stored (expected numbers, strings or JSON data): {exc}")


def read_sweep(path: str | os.PathLike) -> Sweep:
    """Read and validate a sweep file; InputError names the file and the field on bad input."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: sweep file not found")
    if not p.is_file():
        raise InputError(f"{p}: expected a sweep file (HDF5), found a folder")
    try:
        fh = h5py.File(p, "r")
    except OSError as exc:
        raise InputError(f"{p}: not an HDF5 file ({exc})") from exc
    with fh:
        if "frames" not in fh or not isinstance(fh["frames"], h5py.Dataset):
            raise InputError(f"{p}: no 'frames' dataset (expected uint8 [N, H, W]); found {sorted(fh.keys())}")
        data = {}
        for key in _DATASETS:
            if key in fh:
                if not isinstance(fh[key], h5py.Dataset):
                    raise InputError(f"{p}: '{key}' must be a dataset, found a group")
                data[key] = fh[key][()]
        a = fh.attrs
        if "pixel_spacing_mm" not in a:
            raise InputError(f"{p}: missing attribute 'pixel_spacing_mm' = [sx, sy] (mm)")
        spacing = np.asarray(a["pixel_spacing_mm"])
        if spacing.dtype.kind not in "iuf" or spacing.shape != (2,):
            raise InputError(f"{p}: attribute 'pixel_spacing_mm' must be [sx, sy] in mm, got {spacing!r}")
        frame_rate = a.get("frame_rate_hz")
        imu_pos = a.get("imu_position_mm")
        attrs = {k: _attr_to_python(v) for k, v in a.items() if k not in _RESERVED_ATTRS}
    for key in ("frames",) + _DATASETS[1:]:
        if key in data and data[key].dtype.kind not in "iuf":
            raise InputError(f"{p}: '{key}' must be numeric, got dtype {data[key].dtype}")
    sweep = Sweep(
        frames=data["frames"],
        pixel_spacing_xy=(float(spacing[0]), float(spacing[1])),
        tforms=data.get("tforms"),
        timestamps_s=data.get("timestamps_s"),
        frame_rate_hz=None if frame_rate is None else float(np.asarray(frame_rate).reshape(-1)[0]),
        imu_acc=data.get("imu_acc"),
        imu_euler_deg=data.get("imu_euler_deg"),
        imu_position_mm=None if imu_pos is None else np.asarray(imu_pos),
        imu_weights=data.get("imu_weights"),
        attrs=attrs,
    )
    return sweep.validate(name=str(p))


def write_sweep(sweep: Sweep, path: str | os.PathLike) -> Path:
    """Validate and write `sweep` to `path` (HDF5) atomically; returns the path."""
    p = Path(path)
    sweep.validate(name=f"sweep for {p}")
    for key in sweep.attrs:
        if key in _RESERVED_ATTRS or key in _DATASETS:
            raise InputError(f"sweep attribute '{key}' clashes with a contract field of the same name")
    # track_times off and fixed chunking: the same sweep always gives the same bytes.
    with hdf5_output(p, track_order=True) as fh:
        n, h, w = sweep.frames.shape
        fh.create_dataset(
            "frames", data=sweep.frames, chunks=(1, h, w), compression="gzip", compression_opts=1,
            shuffle=False, track_times=False,
        )
        for key in _DATASETS[1:]:
            value = getattr(sweep, key)
            if value is not None:
                fh.create_dataset(key, data=value, track_times=False)
        fh.attrs["pixel_spacing_mm"] = np.asarray(sweep.pixel_spacing_xy, dtype=np.float64)
        if sweep.frame_rate_hz is not None:
            fh.attrs["frame_rate_hz"] = float(sweep.frame_rate_hz)
        if sweep.imu_position_mm is not None:
            fh.attrs["imu_position_mm"] = np.asarray(sweep.imu_position_mm, dtype=np.float64)
        for key, value in sweep.attrs.items():
            fh.attrs[key] = _attr_to_hdf5(key, value)
    return p
