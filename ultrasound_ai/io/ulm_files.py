"""ULM file contracts (docs/DATA_FORMATS.md, "ULM acquisition" / "ULM result") and the PALA `.mat` importer.

Acquisition (HDF5):
  - `iq` complex64 [T, Z, X] (beamformed) or `bmode` float32 [T, Z, X] -- exactly one of the two;
  - root attributes `pixel_size_mm` = [dz, dx] (array-axis order), `origin_mm` = [z0, x0] (centre of
    pixel (0, 0)), `frame_rate_hz`, `wavelength_mm`;
  - optional `gt_positions` float64 [K, 4] = (frame, z_mm, x_mm, bubble_id), or [K, 3] without ids.
  Any other root attribute (simulator version, seed, parameters...) is a free extra kept in `attrs`.
  Frames are written in chunks along T so `iter_blocks` reads a block without touching the rest:
  a 20,000-frame acquisition never has to sit whole in memory.

Result (HDF5): `localizations` float64 [K, 5] = (frame, z_mm, x_mm, intensity, track_id; -1 when
untracked); optional `density`, `direction`, `velocity_mm_s` float32 images [H, W] sharing the root
attributes `pixel_size_mm` = [dz, dx] and `origin_mm` = [z0, x0] of the rendering grid; optional
`count_per_frame` int32 [T], the number of detections kept in each frame (from the counting network or
a fixed N; the root attribute `count_source` says which).

Policy on dtypes: complex128 IQ is converted to complex64 (MATLAB and numpy default to double; the
precision lost is far below any ultrasound noise floor); real or integer IQ is refused, because the
phase would be silently invented. B-mode of any real numeric dtype is converted to float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ultrasound_ai.core.atomic import atomic_output, ensure_free_space
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.hdf5_output import hdf5_output

ACQ_DATASETS = ("iq", "bmode", "gt_positions")
ACQ_ATTRS = ("pixel_size_mm", "origin_mm", "frame_rate_hz", "wavelength_mm")
RESULT_DATASETS = ("localizations", "density", "direction", "velocity_mm_s", "count_per_frame")
RESULT_IMAGES = ("density", "direction", "velocity_mm_s")
RESULT_ATTRS = ("pixel_size_mm", "origin_mm")
# Free attributes that HDF5 cannot store natively (dicts, mixed lists) travel as JSON text.
_JSON_PREFIX = "json:"
# Target size of one HDF5 chunk of frames: big enough for fast sequential reads, small enough that
# a block read touches little more than the block itself.
_CHUNK_BYTES = 2 ** 21


# ------------------------------------------------------------------------------------------------
# small validators shared by the dataclasses and the readers
# ------------------------------------------------------------------------------------------------

def _pair(value, name: str, field_name: str, positive: bool) -> tuple[float, float]:
    if value is None:
        raise InputError(f"{name}: missing '{field_name}' (expected two numbers in mm, array-axis order [z, x])")
    try:
        a = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name}: '{field_name}' must be two numbers in mm [z, x], got {value!r}") from None
    if a.shape != (2,) or not np.all(np.isfinite(a)) or (positive and np.any(a <= 0)):
        what = "two positive finite numbers" if positive else "two finite numbers"
        raise InputError(f"{name}: '{field_name}' must be {what} in mm [z, x], got {np.asarray(value).tolist()!r}")
    return float(a[0]), float(a[1])


def _positive(value, name: str, field_name: str, unit: str) -> float:
    if value is None:
        raise InputError(f"{name}: missing '{field_name}' (expected a positive number in {unit})")
    try:
        a = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name}: '{field_name}' must be a positive number in {unit}, got {value!r}") from None
    if a.size != 1 or not np.isfinite(a[0]) or a[0] <= 0:
        raise InputError(f"{name}: '{field_name}' must be a positive number in {unit}, got {np.asarray(value).tolist()!r}")
    return float(a[0])


def _check_frames_dtype(dtype: np.dtype, key: str, name: str) -> np.dtype:
    """The dtype `key` is stored in after conversion; InputError for dtypes we refuse."""
    dtype = np.dtype(dtype)
    if key == "iq":
        if dtype.kind != "c":
            raise InputError(
                f"{name}: 'iq' must be complex64 [T, Z, X] (beamformed IQ), got dtype {dtype}; "
                f"real data belongs in 'bmode', MATLAB-style (real, imag) records must be converted first"
            )
        return np.dtype(np.complex64)
    if dtype.kind == "c":
        raise InputError(f"{name}: 'bmode' must be real (float32), got complex dtype {dtype}; store complex data as 'iq'")
    if dtype.kind not in "iuf":
        raise InputError(f"{name}: 'bmode' must be float32 [T, Z, X], got dtype {dtype}")
    return np.dtype(np.float32)


def _check_frames_shape(shape: tuple, key: str, name: str) -> None:
    if len(shape) != 3:
        raise InputError(f"{name}: '{key}' must be 3-D [T, Z, X] (frames, depth, lateral), got shape {tuple(shape)}")
    if min(shape) < 1:
        raise InputError(f"{name}: '{key}' is empty, shape {tuple(shape)}")


def _check_gt(gt, n_frames: int, name: str) -> np.ndarray | None:
    if gt is None:
        return None
    g = np.asarray(gt)
    if g.dtype.kind not in "iuf":
        raise InputError(f"{name}: 'gt_positions' must be numeric float64, got dtype {g.dtype}")
    g = g.astype(np.float64, copy=False)
    if g.ndim == 1 and g.size == 0:
        g = g.reshape(0, 4)
    if g.ndim != 2 or g.shape[1] not in (3, 4):
        raise InputError(
            f"{name}: 'gt_positions' must be [K, 4] = (frame, z_mm, x_mm, bubble_id) or [K, 3] without ids, "
            f"got shape {g.shape}"
        )
    if not np.all(np.isfinite(g)):
        raise InputError(f"{name}: 'gt_positions' contains NaN or infinite values")
    frames = g[:, 0]
    if np.any(frames != np.round(frames)) or np.any(frames < 0) or np.any(frames >= n_frames):
        raise InputError(f"{name}: 'gt_positions' column 0 must hold integer frame indices in [0, {n_frames}), "
                         f"got values in [{frames.min():g}, {frames.max():g}]")
    if g.shape[1] == 4:
        ids = g[:, 3]
        if np.any(ids != np.round(ids)) or np.any(ids < 0):
            raise InputError(f"{name}: 'gt_positions' column 3 (bubble_id) must hold non-negative integers")
    return g


def _attr_to_hdf5(key: str, v, name: str):
    if isinstance(v, (str, bool, int, float, np.generic)):
        return v
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return v
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return np.asarray(v)
    try:
        return _JSON_PREFIX + json.dumps(v)
    except TypeError as exc:
        raise InputError(f"{name}: attribute '{key}' cannot be stored (expected numbers, strings or JSON data): {exc}")


def _attr_from_hdf5(v):
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if isinstance(v, str):
        return json.loads(v[len(_JSON_PREFIX):]) if v.startswith(_JSON_PREFIX) else v
    if isinstance(v, np.generic):
        return v.item()
    return v


def _open_h5(path, what: str):
    import h5py

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: {what} file not found")
    if not p.is_file():
        raise InputError(f"{p}: expected an {what} file (HDF5), found a folder")
    try:
        return p, h5py.File(p, "r")
    except OSError as exc:
        raise InputError(f"{p}: not an HDF5 file ({exc})") from exc


def _chunk_frames(shape: tuple, itemsize: int) -> int:
    per_frame = int(shape[1]) * int(shape[2]) * itemsize
    return int(max(1, min(int(shape[0]), _CHUNK_BYTES // max(per_frame, 1))))


# ------------------------------------------------------------------------------------------------
# Acquisition
# ------------------------------------------------------------------------------------------------

@dataclass
class Acquisition:
    """An ultrafast acquisition: `iq` complex64 or `bmode` float32 frames [T, Z, X] and geometry.

    `source` names where it came from (a file path, or "acquisition") and prefixes error messages.
    """

    iq: np.ndarray | None = None
    bmode: np.ndarray | None = None
    pixel_size_mm: tuple[float, float] | None = None
    origin_mm: tuple[float, float] | None = None
    frame_rate_hz: float | None = None
    wavelength_mm: float | None = None
    gt_positions: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="acquisition", repr=False, compare=False)

    def __post_init__(self):
        name = self.source
        if (self.iq is None) == (self.bmode is None):
            which = "both" if self.iq is not None else "neither"
            raise InputError(f"{name}: expected exactly one of 'iq' (complex64) and 'bmode' (float32), found {which}")
        key = "iq" if self.iq is not None else "bmode"
        arr = np.asarray(getattr(self, key))
        _check_frames_shape(arr.shape, key, name)
        target = _check_frames_dtype(arr.dtype, key, name)
        if arr.dtype != target:
            arr = arr.astype(target)
        setattr(self, key, arr)
        self.pixel_size_mm = _pair(self.pixel_size_mm, name, "pixel_size_mm", positive=True)
        self.origin_mm = _pair(self.origin_mm, name, "origin_mm", positive=False)
        self.frame_rate_hz = _positive(self.frame_rate_hz, name, "frame_rate_hz", "Hz")
        self.wavelength_mm = _positive(self.wavelength_mm, name, "wavelength_mm", "mm")
        self.gt_positions = _check_gt(self.gt_positions, arr.shape[0], name)
        self.attrs = dict(self.attrs or {})
        for k in self.attrs:
            if k in ACQ_ATTRS or k in ACQ_DATASETS:
                raise InputError(f"{name}: free attribute '{k}' clashes with a contract field of the same name")

    # -- views -----------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """'iq' or 'bmode'."""
        return "iq" if self.iq is not None else "bmode"

    @property
    def frames(self) -> np.ndarray:
        """The frame array, whichever of iq / bmode it is."""
        return self.iq if self.iq is not None else self.bmode

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.frames.shape)

    @property
    def n_frames(self) -> int:
        return self.shape[0]

    def z_mm(self) -> np.ndarray:
        """Depth of each pixel row's centre (mm)."""
        return self.origin_mm[0] + self.pixel_size_mm[0] * np.arange(self.shape[1])

    def x_mm(self) -> np.ndarray:
        """Lateral position of each pixel column's centre (mm)."""
        return self.origin_mm[1] + self.pixel_size_mm[1] * np.arange(self.shape[2])

    def envelope(self) -> np.ndarray:
        """|iq| (float32) or the bmode frames themselves."""
        return np.abs(self.iq) if self.iq is not None else self.bmode

    def without_truth(self) -> "Acquisition":
        """A copy without `gt_positions` (what every method except `evaluate` must see)."""
        return dataclasses.replace(self, gt_positions=None, attrs=dict(self.attrs))


@dataclass
class AcquisitionInfo:
    """What `acquisition_info` tells without loading any frame."""

    path: Path
    kind: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    pixel_size_mm: tuple[float, float]
    origin_mm: tuple[float, float]
    frame_rate_hz: float
    wavelength_mm: float
    n_gt_positions: int | None
    attrs: dict[str, Any]

    @property
    def n_frames(self) -> int:
        return self.shape[0]


def _read_geometry(fh, p: Path) -> dict:
    a = fh.attrs
    return dict(
        pixel_size_mm=_pair(a.get("pixel_size_mm"), str(p), "pixel_size_mm", positive=True),
        origin_mm=_pair(a.get("origin_mm"), str(p), "origin_mm", positive=False),
        frame_rate_hz=_positive(a.get("frame_rate_hz"), str(p), "frame_rate_hz", "Hz"),
        wavelength_mm=_positive(a.get("wavelength_mm"), str(p), "wavelength_mm", "mm"),
    )


def _frames_dataset(fh, p: Path):
    """The one frame dataset of an acquisition file, validated: (key, dataset)."""
    import h5py

    present = [k for k in ("iq", "bmode") if k in fh]
    if len(present) != 1:
        which = "both" if present else "neither"
        raise InputError(f"{p}: expected exactly one of the datasets 'iq' (complex64 [T, Z, X]) and 'bmode' "
                         f"(float32 [T, Z, X]), found {which}; datasets present: {sorted(fh.keys())}")
    key = present[0]
    ds = fh[key]
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{p}: '{key}' must be a dataset, found a group")
    _check_frames_shape(ds.shape, key, str(p))
    _check_frames_dtype(ds.dtype, key, str(p))
    return key, ds


def acquisition_info(path: str | os.PathLike) -> AcquisitionInfo:
    """Shape, dtype, geometry and attributes of an acquisition file, without reading its frames."""
    p, fh = _open_h5(path, "acquisition")
    with fh:
        key, ds = _frames_dataset(fh, p)
        geo = _read_geometry(fh, p)
        n_gt = int(fh["gt_positions"].shape[0]) if "gt_positions" in fh else None
        attrs = {k: _attr_from_hdf5(v) for k, v in fh.attrs.items() if k not in ACQ_ATTRS}
        return AcquisitionInfo(path=p, kind=key, shape=tuple(int(s) for s in ds.shape), dtype=ds.dtype,
                               n_gt_positions=n_gt, attrs=attrs, **geo)


def read_acquisition(path: str | os.PathLike, frames: slice | None = None, truth: bool = True) -> Acquisition:
    """Read and validate an acquisition file (all frames, or the `frames` slice).

    With a slice, `gt_positions` are restricted to those frames and renumbered from 0, so the
    returned acquisition is self-consistent. `truth=False` skips `gt_positions` entirely.
    """
    p, fh = _open_h5(path, "acquisition")
    with fh:
        key, ds = _frames_dataset(fh, p)
        geo = _read_geometry(fh, p)
        n = ds.shape[0]
        start, stop, step = (frames or slice(None)).indices(n)
        if step != 1 or stop <= start:
            raise InputError(f"{p}: frame range must be a non-empty contiguous slice of [0, {n}), got {frames}")
        data = ds[start:stop]
        gt = None
        if truth and "gt_positions" in fh:
            gt = _check_gt(fh["gt_positions"][()], n, str(p))
            if (start, stop) != (0, n):
                gt = gt[(gt[:, 0] >= start) & (gt[:, 0] < stop)].copy()
                gt[:, 0] -= start
        attrs = {k: _attr_from_hdf5(v) for k, v in fh.attrs.items() if k not in ACQ_ATTRS}
    return Acquisition(**{key: data}, gt_positions=gt, attrs=attrs, source=str(p), **geo)


def read_gt_positions(path: str | os.PathLike) -> np.ndarray | None:
    """Only the ground truth of an acquisition file (for `evaluate`), or None when it has none."""
    p, fh = _open_h5(path, "acquisition")
    with fh:
        key, ds = _frames_dataset(fh, p)
        if "gt_positions" not in fh:
            return None
        return _check_gt(fh["gt_positions"][()], ds.shape[0], str(p))


def iter_blocks(path: str | os.PathLike, block_frames: int = 800, overlap: int = 0,
                dataset: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start_frame, frames[start:start + block_frames]) through an acquisition file.

    Consecutive blocks start `block_frames - overlap` frames apart, so each block repeats the last
    `overlap` frames of the previous one (context for temporal filters); the last block ends at T and
    may be shorter. Only one block is in memory at a time. Frames come in the contract dtype
    (complex64 iq, float32 bmode).
    """
    block_frames = int(block_frames)
    overlap = int(overlap)
    if block_frames < 1:
        raise InputError(f"block_frames must be a positive number of frames, got {block_frames}")
    if not 0 <= overlap < block_frames:
        raise InputError(f"overlap must be in [0, block_frames) = [0, {block_frames}), got {overlap}")
    p, fh = _open_h5(path, "acquisition")
    with fh:
        key, ds = _frames_dataset(fh, p)
        if dataset is not None and dataset != key:
            raise InputError(f"{p}: asked for dataset '{dataset}' but the file holds '{key}'")
        target = _check_frames_dtype(ds.dtype, key, str(p))
        n = ds.shape[0]
        stride = block_frames - overlap
        start = 0
        while True:
            stop = min(start + block_frames, n)
            block = ds[start:stop]
            yield start, block if block.dtype == target else block.astype(target)
            if stop >= n:
                break
            start += stride


class AcquisitionWriter:
    """Write an acquisition block by block (atomic: the file appears only when `close()` succeeds).

        with AcquisitionWriter(path, shape=(T, Z, X), kind="iq", pixel_size_mm=..., ...) as w:
            w.write(start, block)            # any order, any block sizes
            w.add_gt_positions(rows)         # optional, appended
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int], kind: str = "iq", *,
                 pixel_size_mm, origin_mm, frame_rate_hz, wavelength_mm, attrs: dict | None = None):
        import h5py

        self.path = Path(path)
        name = f"acquisition for {self.path}"
        if kind not in ("iq", "bmode"):
            raise InputError(f"{name}: kind must be 'iq' or 'bmode', got {kind!r}")
        _check_frames_shape(tuple(shape), kind, name)
        self.kind = kind
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(np.complex64 if kind == "iq" else np.float32)
        geo = dict(
            pixel_size_mm=_pair(pixel_size_mm, name, "pixel_size_mm", positive=True),
            origin_mm=_pair(origin_mm, name, "origin_mm", positive=False),
            frame_rate_hz=_positive(frame_rate_hz, name, "frame_rate_hz", "Hz"),
            wavelength_mm=_positive(wavelength_mm, name, "wavelength_mm", "mm"),
        )
        attrs = dict(attrs or {})
        for k in attrs:
            if k in ACQ_ATTRS or k in ACQ_DATASETS:
                raise InputError(f"{name}: free attribute '{k}' clashes with a contract field of the same name")
        self._name = name
        self._gt: list[np.ndarray] = []
        self._written = np.zeros(self.shape[0], dtype=bool)
        # Streamed, so not built in memory like the other HDF5 outputs (io/hdf5_output.py): refuse a
        # disk that cannot hold the uncompressed frames now rather than let HDF5 meet ENOSPC (it
        # crashes the process at exit then).
        ensure_free_space(self.path, int(np.prod(self.shape)) * self.dtype.itemsize + (1 << 20))
        self._ctx = atomic_output(self.path)
        self._tmp = self._ctx.__enter__()
        try:
            # track_times off: the same content always gives the same bytes.
            self._fh = h5py.File(self._tmp, "w", track_order=True)
            self._ds = self._fh.create_dataset(
                kind, shape=self.shape, dtype=self.dtype, track_times=False,
                chunks=(_chunk_frames(self.shape, self.dtype.itemsize), self.shape[1], self.shape[2]),
            )
            self._fh.attrs["pixel_size_mm"] = np.asarray(geo["pixel_size_mm"], dtype=np.float64)
            self._fh.attrs["origin_mm"] = np.asarray(geo["origin_mm"], dtype=np.float64)
            self._fh.attrs["frame_rate_hz"] = geo["frame_rate_hz"]
            self._fh.attrs["wavelength_mm"] = geo["wavelength_mm"]
            for k, v in attrs.items():
                self._fh.attrs[k] = _attr_to_hdf5(k, v, name)
        except BaseException as exc:
            self._abort(exc)
            raise
        self._closed = False

    def write(self, start: int, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.ndim != 3 or block.shape[1:] != self.shape[1:]:
            raise InputError(f"{self._name}: block must be [n, {self.shape[1]}, {self.shape[2]}], got {block.shape}")
        _check_frames_dtype(block.dtype, self.kind, self._name)
        start = int(start)
        if start < 0 or start + block.shape[0] > self.shape[0]:
            raise InputError(f"{self._name}: block frames [{start}, {start + block.shape[0]}) outside [0, {self.shape[0]})")
        self._ds[start:start + block.shape[0]] = block.astype(self.dtype, copy=False)
        self._written[start:start + block.shape[0]] = True

    def add_gt_positions(self, rows: np.ndarray) -> None:
        rows = _check_gt(rows, self.shape[0], self._name)
        if self._gt and rows.shape[1] != self._gt[0].shape[1]:
            raise InputError(f"{self._name}: gt_positions blocks mix 3 and 4 columns")
        self._gt.append(rows)

    def close(self) -> Path:
        if self._closed:
            return self.path
        try:
            if not self._written.all():
                missing = int(np.argmin(self._written))
                raise InputError(f"{self._name}: frame {missing} was never written")
            if self._gt:
                gt = np.concatenate(self._gt, axis=0)
                self._fh.create_dataset("gt_positions", data=gt, track_times=False)
            self._fh.close()
        except BaseException as exc:
            self._abort(exc)
            raise
        self._closed = True
        self._ctx.__exit__(None, None, None)
        return self.path

    def _abort(self, exc: BaseException) -> None:
        self._closed = True
        try:
            fh = getattr(self, "_fh", None)
            if fh is not None and fh.id.valid:
                fh.close()
        finally:
            try:
                self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:  # noqa: BLE001 - the context re-raises exc; the caller raises it already
                pass

    def __enter__(self) -> "AcquisitionWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        elif not self._closed:
            self._abort(exc)


def write_acquisition(acq: Acquisition, path: str | os.PathLike) -> Path:
    """Write `acq` to `path` (HDF5) atomically, frames chunked along T; returns the path."""
    if not isinstance(acq, Acquisition):
        raise InputError(f"write_acquisition: expected an Acquisition, got {type(acq).__name__}")
    with AcquisitionWriter(path, acq.shape, acq.kind, pixel_size_mm=acq.pixel_size_mm, origin_mm=acq.origin_mm,
                           frame_rate_hz=acq.frame_rate_hz, wavelength_mm=acq.wavelength_mm,
                           attrs=acq.attrs) as w:
        w.write(0, acq.frames)
        if acq.gt_positions is not None:
            w.add_gt_positions(acq.gt_positions)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------

@dataclass
class UlmResult:
    """ULM output: localizations [K, 5] and optional rendered images on one grid."""

    localizations: np.ndarray
    density: np.ndarray | None = None
    direction: np.ndarray | None = None
    velocity_mm_s: np.ndarray | None = None
    pixel_size_mm: tuple[float, float] | None = None
    origin_mm: tuple[float, float] | None = None
    # Optional: detections kept in each frame [T] (counting network or fixed N), int32.
    count_per_frame: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="ULM result", repr=False, compare=False)

    def __post_init__(self):
        name = self.source
        loc = np.asarray(self.localizations)
        if loc.dtype.kind not in "iuf":
            raise InputError(f"{name}: 'localizations' must be float64, got dtype {loc.dtype}")
        loc = loc.astype(np.float64, copy=False)
        if loc.ndim == 1 and loc.size == 0:
            loc = loc.reshape(0, 5)
        if loc.ndim != 2 or loc.shape[1] != 5:
            raise InputError(f"{name}: 'localizations' must be [K, 5] = (frame, z_mm, x_mm, intensity, track_id), "
                             f"got shape {loc.shape}")
        if not np.all(np.isfinite(loc)):
            raise InputError(f"{name}: 'localizations' contains NaN or infinite values")
        if np.any(loc[:, 0] < 0) or np.any(loc[:, 0] != np.round(loc[:, 0])):
            raise InputError(f"{name}: 'localizations' column 0 must hold non-negative integer frame indices")
        tid = loc[:, 4]
        if np.any(tid != np.round(tid)) or np.any(tid < -1):
            raise InputError(f"{name}: 'localizations' column 4 must hold integer track ids (>= 0) or -1 (untracked)")
        self.localizations = loc
        shape = None
        for key in RESULT_IMAGES:
            img = getattr(self, key)
            if img is None:
                continue
            img = np.asarray(img)
            if img.dtype.kind not in "iuf":
                raise InputError(f"{name}: '{key}' must be a float32 image, got dtype {img.dtype}")
            if img.ndim != 2 or min(img.shape) < 1:
                raise InputError(f"{name}: '{key}' must be a 2-D image [H, W], got shape {img.shape}")
            if shape is not None and img.shape != shape:
                raise InputError(f"{name}: '{key}' has shape {img.shape} but another image has {shape}")
            shape = img.shape
            setattr(self, key, img.astype(np.float32, copy=False))
        if shape is not None or self.pixel_size_mm is not None or self.origin_mm is not None:
            self.pixel_size_mm = _pair(self.pixel_size_mm, name, "pixel_size_mm", positive=True)
            self.origin_mm = _pair(self.origin_mm, name, "origin_mm", positive=False)
        if self.count_per_frame is not None:
            c = np.asarray(self.count_per_frame)
            if c.ndim != 1 or c.dtype.kind not in "iu" or (c.size and c.min() < 0):
                raise InputError(f"{name}: 'count_per_frame' must be non-negative integers [T] (one per frame), got "
                                 f"dtype {c.dtype}, shape {c.shape}")
            if loc.shape[0] and loc[:, 0].max() >= c.size:
                raise InputError(f"{name}: 'count_per_frame' has {c.size} frames but a localization lies in frame "
                                 f"{int(loc[:, 0].max())}")
            self.count_per_frame = c.astype(np.int32)
        self.attrs = dict(self.attrs or {})
        for k in self.attrs:
            if k in RESULT_ATTRS or k in RESULT_DATASETS:
                raise InputError(f"{name}: free attribute '{k}' clashes with a contract field of the same name")

    @property
    def image_shape(self) -> tuple[int, int] | None:
        for key in RESULT_IMAGES:
            img = getattr(self, key)
            if img is not None:
                return tuple(int(s) for s in img.shape)
        return None


def write_result(result: UlmResult, path: str | os.PathLike) -> Path:
    """Write a ULM result (HDF5) atomically; returns the path."""
    if not isinstance(result, UlmResult):
        raise InputError(f"write_result: expected a UlmResult, got {type(result).__name__}")
    p = Path(path)
    with hdf5_output(p, track_order=True) as fh:
        fh.create_dataset("localizations", data=result.localizations, track_times=False)
        for key in RESULT_IMAGES:
            img = getattr(result, key)
            if img is not None:
                fh.create_dataset(key, data=img, track_times=False, compression="gzip", compression_opts=1)
        if result.count_per_frame is not None:
            fh.create_dataset("count_per_frame", data=result.count_per_frame, track_times=False)
        if result.pixel_size_mm is not None:
            fh.attrs["pixel_size_mm"] = np.asarray(result.pixel_size_mm, dtype=np.float64)
            fh.attrs["origin_mm"] = np.asarray(result.origin_mm, dtype=np.float64)
        for k, v in result.attrs.items():
            fh.attrs[k] = _attr_to_hdf5(k, v, f"result for {p}")
    return p


def read_result(path: str | os.PathLike) -> UlmResult:
    """Read and validate a ULM result file."""
    import h5py

    p, fh = _open_h5(path, "ULM result")
    with fh:
        if "localizations" not in fh or not isinstance(fh["localizations"], h5py.Dataset):
            raise InputError(f"{p}: no 'localizations' dataset (expected float64 [K, 5]); found {sorted(fh.keys())}")
        data = {k: fh[k][()] for k in RESULT_DATASETS if k in fh}
        a = fh.attrs
        geo = {k: a.get(k) for k in RESULT_ATTRS}
        attrs = {k: _attr_from_hdf5(v) for k, v in a.items() if k not in RESULT_ATTRS}
    return UlmResult(**data, **geo, attrs=attrs, source=str(p))


# ------------------------------------------------------------------------------------------------
# PALA .mat importer
# ------------------------------------------------------------------------------------------------
#
# Facts about PALA files (Heiles et al. 2022, data on Zenodo): an IQ file `<name>_IQ001.mat` holds
# `IQ` [Z, X, T] complex (MATLAB order), in silico also `ListPos` [N, 3, T] = (x, y, z) bubble
# positions in wavelengths (NaN when absent) and `Media`; the acquisition parameters sit either in
# the same file (in vivo) or in `<name>_sequence.mat` next to the IQ folder: `PData.PDelta` = pixel
# size [dx, dy, dz] and `PData.Origin` = [x, y, z] of pixel (1, 1), both in wavelengths, so pixel
# (iz, ix) (0-based) lies at z = Origin(3) + iz * PDelta(3), x = Origin(1) + ix * PDelta(1);
# `UF.Lambda` (mm), `UF.FrameRateUF` (Hz) in vivo, `P.FrameRate` (Hz) in silico, and the wavelength
# also follows from `Resource.Parameters.speedOfSound` (m/s) / `Trans.frequency` (MHz).
# MATLAB v7.3 files are HDF5: arrays appear transposed (reversed axes), complex numbers as compound
# (real, imag) records, structs as groups.

_PALA_PARAM_VARS = ("PData", "UF", "P", "Trans", "Resource")


def _mat_is_v73(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        return True
    import h5py

    return h5py.is_hdf5(str(p))


def _v5_to_python(v):
    """scipy.io.loadmat (squeeze_me, struct_as_record=False) values -> dicts / arrays / floats."""
    from scipy.io.matlab import mat_struct

    if isinstance(v, mat_struct):
        return {k: _v5_to_python(getattr(v, k)) for k in v._fieldnames}
    if isinstance(v, np.ndarray) and v.dtype == object:
        if v.size == 1:
            return _v5_to_python(v.reshape(-1)[0])
        return [_v5_to_python(x) for x in v.reshape(-1)]
    return v


def _h5_to_python(obj):
    """A v7.3 (HDF5) variable -> numpy array in MATLAB axis order, or a dict for a struct."""
    import h5py

    if isinstance(obj, h5py.Group):
        return {k: _h5_to_python(obj[k]) for k in obj.keys() if not k.startswith("#")}
    data = obj[()]
    if isinstance(data, np.ndarray) and data.dtype.names and {"real", "imag"} <= set(data.dtype.names):
        data = data["real"] + 1j * data["imag"]
    if isinstance(data, np.ndarray) and data.dtype.kind == "O":
        # cell arrays / struct arrays hold object references: follow the first element only.
        ref = data.reshape(-1)[0]
        return _h5_to_python(obj.file[ref]) if ref else None
    return np.asarray(data).T if isinstance(data, np.ndarray) else data


def _load_mat(p: Path, names: tuple[str, ...] | None) -> dict:
    """Variables of a MATLAB file (v5 or v7.3) with MATLAB's axis order; `names=None` loads all."""
    try:
        v73 = _mat_is_v73(p)
    except OSError as exc:
        raise InputError(f"{p}: cannot read the file ({exc})") from exc
    if v73:
        import h5py

        try:
            fh = h5py.File(p, "r")
        except OSError as exc:
            raise InputError(f"{p}: not a readable MATLAB v7.3 file ({exc})") from exc
        with fh:
            keys = [k for k in fh.keys() if not k.startswith("#") and (names is None or k in names)]
            return {k: _h5_to_python(fh[k]) for k in keys}
    import scipy.io

    try:
        raw = scipy.io.loadmat(str(p), squeeze_me=False, struct_as_record=False,
                               variable_names=list(names) if names is not None else None)
    except (ValueError, TypeError, NotImplementedError, OSError) as exc:
        raise InputError(f"{p}: not a readable MATLAB .mat file ({exc})") from exc
    out = {}
    for k, v in raw.items():
        if k.startswith("__"):
            continue
        # Keep numeric arrays at full rank (IQ must stay [Z, X, T]); unwrap structs and cells.
        out[k] = v if (isinstance(v, np.ndarray) and v.dtype != object) else _v5_to_python(v)
    return out


def _field(d: dict | None, *path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _vec(v, n: int | None = None) -> np.ndarray | None:
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    if a.size == 0 or (n is not None and a.size < n):
        return None
    return a


def _sequence_candidates(p: Path) -> list[Path]:
    prefix = re.sub(r"_IQ\d*$", "", p.stem, flags=re.IGNORECASE)
    out = []
    for folder in (p.parent, p.parent.parent):
        out.append(folder / f"{prefix}_sequence.mat")
    return out


def read_pala_mat(path: str | os.PathLike, sequence_path: str | os.PathLike | None = None, *,
                  wavelength_mm: float | None = None, frame_rate_hz: float | None = None,
                  with_truth: bool = True) -> Acquisition:
    """Read a PALA IQ `.mat` file (MATLAB v5 or v7.3) into an Acquisition (iq [T, Z, X], mm geometry).

    Acquisition parameters (PData, UF, P, Trans, Resource) are taken from the IQ file itself, else
    from `sequence_path`, else from `<prefix>_sequence.mat` beside the file or one folder up (PALA's
    layout). `wavelength_mm` / `frame_rate_hz` override what the files say. `ListPos` (in silico
    ground truth, wavelengths) becomes `gt_positions` with the bubble's row as its id.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: PALA .mat file not found")
    variables = _load_mat(p, None)
    if "IQ" not in variables:
        raise InputError(f"{p}: no variable 'IQ' (expected complex IQ [Z, X, T]); found {sorted(variables)}")
    iq = np.asarray(variables["IQ"])
    if iq.ndim == 2:
        iq = iq[:, :, None]
    if iq.ndim != 3:
        raise InputError(f"{p}: 'IQ' must be [Z, X, T], got shape {iq.shape}")
    if iq.dtype.kind not in "iufc":
        raise InputError(f"{p}: 'IQ' must be numeric complex data, got dtype {iq.dtype}")
    if iq.dtype.kind != "c":
        raise InputError(f"{p}: 'IQ' must be complex (beamformed IQ), got real dtype {iq.dtype}")

    params = {k: variables[k] for k in _PALA_PARAM_VARS if k in variables}
    seq_files = [Path(sequence_path)] if sequence_path is not None else _sequence_candidates(p)
    if sequence_path is not None and not seq_files[0].is_file():
        raise InputError(f"{seq_files[0]}: PALA sequence file not found")
    if "PData" not in params or (wavelength_mm is None and "UF" not in params and "Trans" not in params):
        for s in seq_files:
            if s.is_file():
                for k, v in _load_mat(s, _PALA_PARAM_VARS).items():
                    params.setdefault(k, v)
                break

    pdata = params.get("PData")
    if isinstance(pdata, list):
        pdata = pdata[0]
    delta = _vec(_field(pdata, "PDelta"), 3)
    origin = _vec(_field(pdata, "Origin"), 3)
    if delta is None or origin is None:
        raise InputError(f"{p}: no PData.PDelta / PData.Origin (pixel grid in wavelengths) in the IQ file or in a "
                         f"sequence file (looked for {[str(s) for s in seq_files]}); pass sequence_path=")

    lam = wavelength_mm
    if lam is None:
        lam_v = _vec(_field(params.get("UF"), "Lambda"))
        if lam_v is not None:
            lam = float(lam_v[0])
    if lam is None:
        c = _vec(_field(params.get("Resource"), "Parameters", "speedOfSound"))
        f = _vec(_field(params.get("Trans"), "frequency"))
        if c is not None and f is not None and f[0] > 0:
            lam = float(c[0]) / float(f[0]) / 1000.0  # m/s over MHz gives µm; /1000 -> mm
    if lam is None:
        raise InputError(f"{p}: wavelength unknown (no UF.Lambda, nor Resource.Parameters.speedOfSound and "
                         f"Trans.frequency); pass wavelength_mm=")
    fr = frame_rate_hz
    if fr is None:
        for src in (_field(params.get("UF"), "FrameRateUF"), _field(params.get("P"), "FrameRate")):
            v = _vec(src)
            if v is not None:
                fr = float(v[0])
                break
    if fr is None:
        raise InputError(f"{p}: frame rate unknown (no UF.FrameRateUF nor P.FrameRate); pass frame_rate_hz=")

    frames = np.ascontiguousarray(np.moveaxis(iq, 2, 0)).astype(np.complex64)
    pixel = (float(delta[2]) * lam, float(delta[0]) * lam)
    orig = (float(origin[2]) * lam, float(origin[0]) * lam)

    gt = None
    lp = variables.get("ListPos")
    if with_truth and lp is not None:
        lp = np.asarray(lp, dtype=np.float64)
        if lp.ndim == 2:
            lp = lp[:, :, None]
        if lp.ndim != 3 or lp.shape[1] < 3 or lp.shape[2] != frames.shape[0]:
            raise InputError(f"{p}: 'ListPos' must be [N, 3, T] with T = {frames.shape[0]}, got shape {lp.shape}")
        n_b, _, n_t = lp.shape
        fr_idx, b_idx = np.meshgrid(np.arange(n_t), np.arange(n_b))
        z = lp[:, 2, :] * lam
        x = lp[:, 0, :] * lam
        ok = np.isfinite(z) & np.isfinite(x)
        rows = np.stack([fr_idx[ok], z[ok], x[ok], b_idx[ok]], axis=1).astype(np.float64)
        gt = rows[np.lexsort((rows[:, 3], rows[:, 0]))]

    attrs = {"source_format": "PALA .mat", "source_file": p.name}
    return Acquisition(iq=frames, pixel_size_mm=pixel, origin_mm=orig, frame_rate_hz=fr, wavelength_mm=lam,
                       gt_positions=gt, attrs=attrs, source=str(p))
