"""3D volumes with their physical geometry (LPS millimetres), read and written through SimpleITK.

A `Volume` holds the voxel array in SimpleITK's numpy order ([k, j, i], i.e. z, y, x, with an optional
trailing component axis for vector images) and the geometry in ITK's order (spacing and direction
columns indexed by i, j, k). The physical position of a continuous index ijk is

    p = origin_lps + direction @ (spacing_xyz * ijk)

with the origin at the centre of voxel (0, 0, 0), as in ITK and docs/DATA_FORMATS.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ultrasound_ai.core.atomic import atomic_output, final_path_of, scratch_folder
from ultrasound_ai.core.errors import InputError, OutputWriteError

# Extensions SimpleITK reads for us, longest first so ".nii.gz" wins over ".gz".
READ_EXTENSIONS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
# A detached NRRD header (.nhdr) would need its data file renamed with it; write .nrrd instead.
WRITE_EXTENSIONS = (".nii.gz", ".nrrd", ".nii", ".mha", ".mhd")

# NIfTI stores the geometry in float32, so a direction read back from it is orthonormal only to ~1e-7;
# ITK itself accepts far less exact matrices. This tolerance still rejects any shear or scaling.
ORTHONORMAL_ATOL = 1e-4

INTERPOLATORS = ("nearest", "linear", "bspline", "lanczos")


def _extension(path: Path, allowed: tuple[str, ...]) -> str | None:
    name = path.name.lower()
    for ext in allowed:
        if name.endswith(ext):
            return ext
    return None


@dataclass
class Volume:
    """A 3D (scalar or vector) image on a physical grid. See the module docstring for the geometry."""

    array: np.ndarray
    spacing_xyz: np.ndarray
    origin_lps: np.ndarray
    direction: np.ndarray

    def __post_init__(self):
        array = np.asarray(self.array)
        if array.ndim not in (3, 4):
            raise InputError(
                f"volume array: expected 3 dimensions [k, j, i] or 4 [k, j, i, C], got shape {array.shape}"
            )
        if array.size == 0:
            raise InputError(f"volume array: expected at least one voxel, got shape {array.shape}")
        if array.dtype.kind not in "biufc":
            raise InputError(f"volume array: expected a numeric dtype, got {array.dtype}")
        self.array = array
        self.spacing_xyz = _vector3(self.spacing_xyz, "spacing_xyz")
        if not np.all(self.spacing_xyz > 0):
            raise InputError(f"volume spacing_xyz: expected positive spacing in mm, got {self.spacing_xyz.tolist()}")
        self.origin_lps = _vector3(self.origin_lps, "origin_lps")
        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.shape == (9,):
            direction = direction.reshape(3, 3)
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise InputError(f"volume direction: expected a finite 3x3 matrix, got {np.asarray(self.direction).tolist()}")
        # ITK allows left-handed direction matrices (det -1) but never shear or scaling.
        if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHONORMAL_ATOL):
            raise InputError(
                f"volume direction: expected an orthonormal 3x3 matrix (columns = unit LPS directions of i, j, k), "
                f"got {direction.tolist()}"
            )
        self.direction = direction

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def is_vector(self) -> bool:
        """True when the array has a trailing component axis [k, j, i, C]."""
        return self.array.ndim == 4

    @property
    def n_components(self) -> int:
        return int(self.array.shape[3]) if self.is_vector else 1

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Grid size in ITK order (i, j, k), i.e. SimpleITK's GetSize()."""
        k, j, i = self.array.shape[:3]
        return (int(i), int(j), int(k))

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    # -- geometry ------------------------------------------------------------------------------------
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 float64 matrix mapping homogeneous [i, j, k, 1] to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing_xyz)
        m[:3, 3] = self.origin_lps
        return m

    def lps_to_ijk(self) -> np.ndarray:
        """4x4 float64 matrix mapping homogeneous LPS mm to continuous [i, j, k, 1]."""
        return np.linalg.inv(self.ijk_to_lps())

    def index_to_physical(self, ijk) -> np.ndarray:
        """Continuous indices [..., 3] in (i, j, k) order -> LPS mm [..., 3]."""
        ijk = _points(ijk, "index (i, j, k)")
        m = self.ijk_to_lps()
        return ijk @ m[:3, :3].T + m[:3, 3]

    def physical_to_index(self, lps) -> np.ndarray:
        """LPS mm [..., 3] -> continuous indices [..., 3] in (i, j, k) order (round for the nearest voxel)."""
        lps = _points(lps, "physical point (LPS mm)")
        # The exact inverse (not the transpose): a direction read from NIfTI is orthonormal only to ~1e-7,
        # and ITK also inverts the full matrix, so both agree.
        m = self.lps_to_ijk()
        return lps @ m[:3, :3].T + m[:3, 3]

    def physical_extent(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) LPS corners of the box through the centres of the corner voxels."""
        n = np.array(self.shape_ijk) - 1
        corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=float)
        p = self.index_to_physical(corners)
        return p.min(axis=0), p.max(axis=0)

    def same_grid(self, other: "Volume", atol: float = 1e-6) -> bool:
        """True when `other` has the same size, spacing, origin and direction (within atol mm)."""
        return (
            self.shape_ijk == other.shape_ijk
            and np.allclose(self.spacing_xyz, other.spacing_xyz, atol=atol)
            and np.allclose(self.origin_lps, other.origin_lps, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid holding `array` (same [k, j, i] shape)."""
        array = np.asarray(array)
        if array.shape[:3] != self.array.shape[:3]:
            raise InputError(f"volume array: expected shape {self.array.shape[:3]} (+ components), got {array.shape}")
        return Volume(array, self.spacing_xyz.copy(), self.origin_lps.copy(), self.direction.copy())

    # -- SimpleITK -----------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image) -> "Volume":
        """Copy a SimpleITK image. A 2D image becomes a one-slice volume (k spacing 1 mm, k axis = i x j)."""
        import SimpleITK as sitk

        dim = image.GetDimension()
        if dim not in (2, 3):
            raise InputError(f"image: expected a 2D or 3D image, got {dim} dimensions (size {image.GetSize()})")
        array = sitk.GetArrayFromImage(image)
        spacing = np.array(image.GetSpacing(), dtype=np.float64)
        origin = np.array(image.GetOrigin(), dtype=np.float64)
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
        if dim == 2:
            array = array[np.newaxis]
            spacing = np.append(spacing, 1.0)
            origin = np.append(origin, 0.0)
            d3 = np.eye(3)
            d3[:2, :2] = direction
            d3[:, 2] = np.cross(d3[:, 0], d3[:, 1])
            direction = d3
        return cls(array, spacing, origin, direction)

    def to_sitk(self):
        """A SimpleITK image with the same voxels and geometry (bool arrays become uint8)."""
        import SimpleITK as sitk

        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        try:
            image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=self.is_vector)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"volume array: SimpleITK cannot hold dtype {array.dtype}: {exc}") from exc
        image.SetSpacing(self.spacing_xyz.tolist())
        image.SetOrigin(self.origin_lps.tolist())
        image.SetDirection(self.direction.reshape(-1).tolist())  # row-major, as ITK expects
        return image


def _vector3(value, what: str) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise InputError(f"volume {what}: expected 3 finite numbers in mm, got {np.asarray(value).tolist()}")
    return v


def _points(value, what: str) -> np.ndarray:
    p = np.asarray(value, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] != 3:
        raise InputError(f"{what}: expected an array of shape [..., 3], got shape {p.shape}")
    return p


# -- files -------------------------------------------------------------------------------------------
def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NRRD (.nrrd/.nhdr), NIfTI (.nii/.nii.gz) or MetaImage (.mha/.mhd) file."""
    import SimpleITK as sitk

    path = Path(path)
    if _extension(path, READ_EXTENSIONS) is None:
        raise InputError(f"volume file {path}: unsupported extension; expected one of {', '.join(READ_EXTENSIONS)}")
    if not path.is_file():
        raise InputError(f"volume file {path}: not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        # ITK's message is long and names the C++ source; keep its last line, which says what failed.
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"volume file {path}: unreadable (truncated or corrupt?): {detail}") from exc
    try:
        return Volume.from_sitk(image)
    except InputError as exc:
        raise InputError(f"volume file {path}: {exc}") from exc


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = False) -> Path:
    """Write `volume` atomically; the format follows the extension (see WRITE_EXTENSIONS).

    A .mhd header is written with its .raw (or .zraw when compressed) data file beside it. Returns the path.
    """
    import SimpleITK as sitk

    if not isinstance(volume, Volume):
        raise InputError(f"volume: expected a Volume, got {type(volume).__name__}")
    path = Path(path)
    ext = _extension(path, WRITE_EXTENSIONS)
    if ext is None:
        raise InputError(f"volume output {path}: unsupported extension; expected one of {', '.join(WRITE_EXTENSIONS)}")
    image = volume.to_sitk()
    if ext == ".mhd":
        _write_mhd(image, path, compress)
        return path
    with atomic_output(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=bool(compress))
        except RuntimeError as exc:
            raise OutputWriteError(f"volume output {path}: SimpleITK could not write it: {_itk_detail(exc)}") from exc
    return path


def _itk_detail(exc: BaseException) -> str:
    # ITK's message is long and names the C++ source; its last line says what failed.
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _write_mhd(image, path: Path, compress: bool) -> None:
    """A MetaImage header names its data file, so write both, then fix the name in the header."""
    import SimpleITK as sitk

    if final_path_of(path) is not None:
        raise InputError(f"volume output {final_path_of(path)}: a .mhd volume is two files (header and data) and "
                         "cannot be one temporary output; use .mha (the same format in one file)")
    data_name = path.name[: -len(".mhd")] + (".zraw" if compress else ".raw")
    with scratch_folder(path) as scratch:
        scratch_header = Path(scratch) / "volume.mhd"
        try:
            sitk.WriteImage(image, str(scratch_header), useCompression=bool(compress))
        except RuntimeError as exc:
            raise OutputWriteError(f"volume output {path}: SimpleITK could not write it: {_itk_detail(exc)}") from exc
        lines = scratch_header.read_text(encoding="latin-1").splitlines()
        scratch_data = None
        for n, line in enumerate(lines):
            if line.startswith("ElementDataFile"):
                scratch_data = Path(scratch) / line.split("=", 1)[1].strip()
                lines[n] = f"ElementDataFile = {data_name}"
        if scratch_data is None or not scratch_data.is_file():  # pragma: no cover - SimpleITK always writes one
            raise RuntimeError(f"volume output {path}: SimpleITK wrote no MetaImage data file")
        # Data first, header last: a reader never sees a header whose data is missing.
        with atomic_output(path.with_name(data_name)) as tmp:
            os.replace(scratch_data, tmp)
        with atomic_output(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="latin-1")


# -- resampling --------------------------------------------------------------------------------------
def resample_volume(
    volume: Volume,
    reference: Volume,
    transform_lps=None,
    interpolator: str = "linear",
    default: float = 0.0,
    output_dtype=None,
) -> Volume:
    """Resample `volume` onto `reference`'s grid.

    transform_lps maps a reference-space LPS point to the `volume`-space LPS point sampled there (ITK's
    convention: the transform that resamples the moving image onto the fixed grid). It is a 4x4 affine
    array, a SimpleITK transform, or None (identity: the volumes' physical positions are used as they
    are). Points outside `volume` get `default`. The output keeps `volume`'s dtype unless output_dtype
    is given (use a float dtype with "linear" on integer images to avoid truncation).
    """
    import SimpleITK as sitk

    if not isinstance(volume, Volume) or not isinstance(reference, Volume):
        raise InputError("resample_volume: expected Volume objects for `volume` and `reference`")
    methods = {
        "nearest": sitk.sitkNearestNeighbor,
        "linear": sitk.sitkLinear,
        "bspline": sitk.sitkBSpline,
        "lanczos": sitk.sitkLanczosWindowedSinc,
    }
    if interpolator not in methods:
        raise InputError(f"resample interpolator: expected one of {', '.join(INTERPOLATORS)}, got {interpolator!r}")
    transform = _as_sitk_transform(transform_lps)
    moving = volume.to_sitk()
    if output_dtype is not None:
        moving = Volume(
            volume.array.astype(output_dtype), volume.spacing_xyz, volume.origin_lps, volume.direction
        ).to_sitk()
    ref = sitk.Image(list(reference.shape_ijk), sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing_xyz.tolist())
    ref.SetOrigin(reference.origin_lps.tolist())
    ref.SetDirection(reference.direction.reshape(-1).tolist())
    out = sitk.Resample(moving, ref, transform, methods[interpolator], float(default))
    return Volume.from_sitk(out)


def _as_sitk_transform(transform_lps):
    import SimpleITK as sitk

    if transform_lps is None:
        return sitk.Transform(3, sitk.sitkIdentity)
    if isinstance(transform_lps, sitk.Transform):
        if transform_lps.GetDimension() != 3:
            raise InputError(f"transform_lps: expected a 3D transform, got {transform_lps.GetDimension()}D")
        return transform_lps
    m = np.asarray(transform_lps, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputError(f"transform_lps: expected a finite 4x4 matrix (reference LPS -> volume LPS), got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise InputError(f"transform_lps: expected an affine matrix with last row [0, 0, 0, 1], got {m[3].tolist()}")
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(m[:3, :3].reshape(-1).tolist())
    affine.SetTranslation(m[:3, 3].tolist())
    return affine
