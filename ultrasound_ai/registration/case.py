"""Registration cases (docs/DATA_FORMATS.md, "Registration case"), transform files and the µ-RegPro importer.

A case folder holds fixed.nrrd (MRI), fixed_label.nrrd (prostate label on the MRI grid), moving.nrrd
(TRUS), optional moving_label.nrrd, surface_fixed.csv, landmarks_fixed.csv / landmarks_moving.csv
(header x,y,z; LPS mm; paired rows) and, for simulated cases, truth.json = {"fixed_to_moving_lps": 4x4}
(the simulator also records its version and settings there). Transforms map fixed LPS -> moving LPS.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import invert_rigid, is_rigid, lps_to_ras_transform, orthonormalize
from ultrasound_ai.io.volume import Volume, read_volume, write_volume

FILES = {
    "fixed": "fixed.nrrd",
    "fixed_label": "fixed_label.nrrd",
    "moving": "moving.nrrd",
    "moving_label": "moving_label.nrrd",
    "surface_fixed": "surface_fixed.csv",
    "landmarks_fixed": "landmarks_fixed.csv",
    "landmarks_moving": "landmarks_moving.csv",
    "truth": "truth.json",
    "attrs": "case.json",  # attributes of cases without truth.json (e.g. imported ones)
}
DEFAULT_SURFACE_POINTS = 2000


def check_3d(volume: Volume, what: str) -> Volume:
    """InputError unless `volume` is a scalar 3D image with at least 2 voxels along each axis."""
    if not isinstance(volume, Volume):
        raise InputError(f"{what}: expected a Volume, got {type(volume).__name__}")
    if volume.is_vector:
        raise InputError(f"{what}: expected a scalar 3D image, got {volume.n_components} components per voxel")
    if min(volume.shape_ijk) < 2:
        raise InputError(f"{what}: expected a 3D volume (at least 2 voxels along i, j and k), got size {volume.shape_ijk} "
                         f"(a 2D image?)")
    if volume.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise InputError(f"{what}: contains NaN or infinite values")
    return volume


def binary_label(label: Volume, what: str, reference: Volume | None = None) -> Volume:
    """The label as uint8 0/1 (any non-zero voxel is inside); InputError if empty or off `reference`'s grid."""
    check_3d(label, what)
    if reference is not None and not label.same_grid(reference, atol=1e-4):
        raise InputError(
            f"{what}: expected the same grid as the image it labels (size {reference.shape_ijk}, spacing "
            f"{reference.spacing_xyz.tolist()}, origin {reference.origin_lps.tolist()}), got size {label.shape_ijk}, "
            f"spacing {label.spacing_xyz.tolist()}, origin {label.origin_lps.tolist()}"
        )
    arr = (label.array != 0).astype(np.uint8)
    if not arr.any():
        raise InputError(f"{what}: the label is empty (no non-zero voxel); a prostate segmentation is required")
    return label.with_array(arr)


def surface_points_from_label(label: Volume, max_points: int = DEFAULT_SURFACE_POINTS, seed: int = 0) -> np.ndarray:
    """LPS mm centres [K, 3] of the label's boundary voxels (inside voxels with an outside 6-neighbour),
    at most `max_points`, subsampled with a fixed seed so the same label always gives the same points."""
    from scipy import ndimage

    arr = np.asarray(label.array) != 0
    if not arr.any():
        raise InputError("label: empty; cannot derive surface points")
    # Pad so that a label touching the volume border still has its border faces counted as surface.
    padded = np.pad(arr, 1)
    inner = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(3, 1))[1:-1, 1:-1, 1:-1]
    kji = np.argwhere(arr & ~inner)
    if len(kji) > max_points:
        idx = np.random.default_rng(seed).choice(len(kji), size=max_points, replace=False)
        kji = kji[np.sort(idx)]
    return label.index_to_physical(kji[:, ::-1].astype(np.float64))


def _points_or_none(p, what: str) -> np.ndarray | None:
    if p is None:
        return None
    pts = np.asarray(p, dtype=np.float64).reshape(-1, 3) if np.size(p) else np.zeros((0, 3))
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{what}: expected finite LPS mm points")
    return pts


@dataclass
class Case:
    """One MRI (fixed) - TRUS (moving) pair. Transforms map fixed LPS -> moving LPS."""

    fixed: Volume
    fixed_label: Volume
    moving: Volume
    moving_label: Volume | None = None
    surface_fixed: np.ndarray | None = None
    landmarks_fixed: np.ndarray | None = None
    landmarks_moving: np.ndarray | None = None
    truth_fixed_to_moving: np.ndarray | None = None
    name: str = "case"
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        check_3d(self.fixed, "fixed (MRI)")
        check_3d(self.moving, "moving (TRUS)")
        self.fixed_label = binary_label(self.fixed_label, "fixed_label", reference=self.fixed)
        if self.moving_label is not None:
            self.moving_label = binary_label(self.moving_label, "moving_label", reference=self.moving)
        self.surface_fixed = _points_or_none(self.surface_fixed, "surface_fixed")
        if self.surface_fixed is None or len(self.surface_fixed) == 0:
            self.surface_fixed = surface_points_from_label(self.fixed_label)
        self.landmarks_fixed = _points_or_none(self.landmarks_fixed, "landmarks_fixed")
        self.landmarks_moving = _points_or_none(self.landmarks_moving, "landmarks_moving")
        if (self.landmarks_fixed is not None and self.landmarks_moving is not None
                and self.landmarks_fixed.shape != self.landmarks_moving.shape):
            raise InputError(
                f"landmarks: expected paired rows, got {len(self.landmarks_fixed)} fixed and "
                f"{len(self.landmarks_moving)} moving landmarks"
            )
        if self.truth_fixed_to_moving is not None:
            self.truth_fixed_to_moving = check_rigid_matrix(self.truth_fixed_to_moving, "truth fixed_to_moving_lps")


def check_rigid_matrix(T, what: str) -> np.ndarray:
    m = np.asarray(T, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputError(f"{what}: expected a finite 4x4 matrix, got shape {m.shape}")
    if not is_rigid(m, atol=1e-4):
        raise InputError(f"{what}: expected a rigid transform (rotation + translation, last row [0, 0, 0, 1])")
    return orthonormalize(m) if not is_rigid(m, atol=1e-9) else m


# -- CSV points --------------------------------------------------------------------------------------
def write_points_csv(points, path) -> Path:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["x", "y", "z"])
            for p in pts:
                w.writerow([repr(float(v)) for v in p])
    return Path(path)


def read_points_csv(path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"points file {path}: not found")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0]] != ["x", "y", "z"]:
        raise InputError(f"points file {path}: expected a header line 'x,y,z'")
    try:
        pts = np.array([[float(v) for v in r] for r in rows[1:] if r], dtype=np.float64).reshape(-1, 3)
    except ValueError as exc:
        raise InputError(f"points file {path}: expected 3 numbers (LPS mm) per row: {exc}") from exc
    if not np.all(np.isfinite(pts)):
        raise InputError(f"points file {path}: contains NaN or infinite coordinates")
    return pts


# -- case folders ------------------------------------------------------------------------------------
def write_case(case: Case, directory) -> Path:
    """Write `case` as a case folder. The folder is written under a temporary name and renamed, so a
    reader never sees a half-written case; an existing folder of that name is replaced."""
    if not isinstance(case, Case):
        raise InputError(f"case: expected a Case, got {type(case).__name__}")
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        write_volume(case.fixed, tmp / FILES["fixed"], compress=True)
        write_volume(case.fixed_label, tmp / FILES["fixed_label"], compress=True)
        write_volume(case.moving, tmp / FILES["moving"], compress=True)
        if case.moving_label is not None:
            write_volume(case.moving_label, tmp / FILES["moving_label"], compress=True)
        write_points_csv(case.surface_fixed, tmp / FILES["surface_fixed"])
        if case.landmarks_fixed is not None and case.landmarks_moving is not None:
            write_points_csv(case.landmarks_fixed, tmp / FILES["landmarks_fixed"])
            write_points_csv(case.landmarks_moving, tmp / FILES["landmarks_moving"])
        attrs = dict(case.attrs)
        attrs.setdefault("name", case.name)
        if case.truth_fixed_to_moving is not None:
            doc = {"fixed_to_moving_lps": np.asarray(case.truth_fixed_to_moving).tolist(), **attrs}
            (tmp / FILES["truth"]).write_text(json.dumps(doc, indent=1))
        else:
            (tmp / FILES["attrs"]).write_text(json.dumps(attrs, indent=1))
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_case(directory) -> Case:
    """Read a case folder (docs/DATA_FORMATS.md layout). Missing required files or mismatched grids -> InputError."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"case folder {d}: not found")
    for key in ("fixed", "fixed_label", "moving"):
        if not (d / FILES[key]).is_file():
            raise InputError(f"case folder {d}: missing {FILES[key]}")
    fixed = read_volume(d / FILES["fixed"])
    label = read_volume(d / FILES["fixed_label"])
    moving = read_volume(d / FILES["moving"])
    moving_label = read_volume(d / FILES["moving_label"]) if (d / FILES["moving_label"]).is_file() else None
    surface = read_points_csv(d / FILES["surface_fixed"]) if (d / FILES["surface_fixed"]).is_file() else None
    lf = read_points_csv(d / FILES["landmarks_fixed"]) if (d / FILES["landmarks_fixed"]).is_file() else None
    lm = read_points_csv(d / FILES["landmarks_moving"]) if (d / FILES["landmarks_moving"]).is_file() else None
    truth, attrs = None, {}
    if (d / FILES["truth"]).is_file():
        try:
            doc = json.loads((d / FILES["truth"]).read_text())
            truth = np.asarray(doc.pop("fixed_to_moving_lps"), dtype=np.float64)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"case folder {d}: {FILES['truth']} must hold {{\"fixed_to_moving_lps\": 4x4}}: {exc}") from exc
        attrs = doc
    elif (d / FILES["attrs"]).is_file():
        try:
            attrs = json.loads((d / FILES["attrs"]).read_text())
        except ValueError as exc:
            raise InputError(f"case folder {d}: {FILES['attrs']} is not valid JSON: {exc}") from exc
    name = str(attrs.pop("name", d.name))
    try:
        return Case(fixed, label, moving, moving_label, surface, lf, lm, truth, name=name, attrs=attrs)
    except InputError as exc:
        raise InputError(f"case folder {d}: {exc}") from exc


# -- transforms --------------------------------------------------------------------------------------
def sitk_transform_to_matrix(transform) -> np.ndarray:
    """The 4x4 matrix of any affine SimpleITK transform (composite ones included), found by mapping the
    origin and the unit vectors, so centres and parameterisations need no special cases."""
    basis = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in basis])
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T
    return m


def write_transform_tfm(T_fixed_to_moving, path) -> Path:
    """Write a rigid fixed->moving LPS transform as an ITK transform file (Euler3DTransform), atomically."""
    import SimpleITK as sitk

    m = check_rigid_matrix(T_fixed_to_moving, "transform")
    tx = sitk.Euler3DTransform()
    tx.SetMatrix(m[:3, :3].reshape(-1).tolist(), 1e-6)
    tx.SetTranslation(m[:3, 3].tolist())
    path = Path(path)
    with atomic_output(path) as tmp:
        sitk.WriteTransform(tx, str(tmp))
    return path


def read_transform_tfm(path) -> np.ndarray:
    """Read an ITK transform file (.tfm/.txt/.h5) holding a rigid 3D transform; returns the 4x4 LPS matrix."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"transform file {path}: not found")
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(f"transform file {path}: unreadable ITK transform: {str(exc).strip().splitlines()[-1]}") from exc
    if tx.GetDimension() != 3:
        raise InputError(f"transform file {path}: expected a 3D transform, got {tx.GetDimension()}D")
    m = sitk_transform_to_matrix(tx)
    try:
        return check_rigid_matrix(m, f"transform file {path}")
    except InputError as exc:
        raise InputError(f"{exc} (deformable or scaling transforms are not rigid registrations)") from exc


def result_json(T_fixed_to_moving, method: str, **extra) -> dict:
    """The JSON result: moving_to_fixed_ras is what a Slicer transform node on the TRUS volume uses as its
    to-parent matrix (moving -> fixed, RAS); fixed_to_moving_lps is the ITK registration transform."""
    m = check_rigid_matrix(T_fixed_to_moving, "transform")
    return {
        "moving_to_fixed_ras": lps_to_ras_transform(invert_rigid(m)).tolist(),
        "fixed_to_moving_lps": m.tolist(),
        "method": method,
        **extra,
    }


def write_result_json(T_fixed_to_moving, path, method: str, **extra) -> Path:
    doc = result_json(T_fixed_to_moving, method, **extra)
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    return path


# -- µ-RegPro ----------------------------------------------------------------------------------------
MUREGPRO_DIRS = ("mr_images", "us_images", "mr_labels", "us_labels")


def _read_label_channels(path: Path) -> list[Volume]:
    """Channels of a µ-RegPro label file (a 4D NIfTI, or a 3D vector image), each a 3D Volume."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"label file {path}: unreadable: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        out = []
        for c in range(size[3]):
            out.append(Volume.from_sitk(sitk.Extract(image, size[:3] + [0], [0, 0, 0, c])))
        return out
    if image.GetNumberOfComponentsPerPixel() > 1:
        return [Volume.from_sitk(sitk.VectorIndexSelectionCast(image, c))
                for c in range(image.GetNumberOfComponentsPerPixel())]
    return [Volume.from_sitk(image)]


def _label_centroid(v: Volume) -> np.ndarray | None:
    kji = np.argwhere(v.array > 0.5)
    return None if len(kji) == 0 else v.index_to_physical(kji[:, ::-1].astype(np.float64)).mean(axis=0)


def import_muregpro(folder, out_dir, names=None) -> list[Path]:
    """Convert a µ-RegPro 2023 folder (mr_images/, us_images/, mr_labels/, us_labels/ holding one NIfTI
    per case with the same file name in each) into case folders out_dir/<case>.

    The MRI is the fixed image and the TRUS the moving one. Label files hold several channels, the gland
    first: channel 0 becomes fixed_label / moving_label; the centroids of the other channels present in
    both modalities become paired landmarks (TRE). There is no ground-truth transform (the challenge's
    correspondence is deformable), so no truth.json is written.
    """
    folder = Path(folder)
    for sub in MUREGPRO_DIRS:
        if not (folder / sub).is_dir():
            raise InputError(f"µ-RegPro folder {folder}: missing the sub-folder {sub}/ (expected {', '.join(MUREGPRO_DIRS)})")
    files = sorted(p.name for p in (folder / "mr_images").iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if names is not None:
        files = [f for f in files if f.split(".")[0] in set(names) or f in set(names)]
    if not files:
        raise InputError(f"µ-RegPro folder {folder}: no .nii/.nii.gz files in mr_images/")
    out_dir = Path(out_dir)
    written = []
    for fname in files:
        paths = {sub: folder / sub / fname for sub in MUREGPRO_DIRS}
        for sub, p in paths.items():
            if not p.is_file():
                raise InputError(f"µ-RegPro case {fname}: missing {sub}/{fname}")
        mr = read_volume(paths["mr_images"])
        us = read_volume(paths["us_images"])
        mr_ch = _read_label_channels(paths["mr_labels"])
        us_ch = _read_label_channels(paths["us_labels"])
        if not mr_ch[0].same_grid(mr, atol=1e-3):
            raise InputError(f"µ-RegPro case {fname}: mr_labels grid does not match mr_images")
        if not us_ch[0].same_grid(us, atol=1e-3):
            raise InputError(f"µ-RegPro case {fname}: us_labels grid does not match us_images")
        # NIfTI geometry is float32: snap the labels onto their image's exact grid.
        fixed_label = mr.with_array((mr_ch[0].array > 0.5).astype(np.uint8))
        moving_label = us.with_array((us_ch[0].array > 0.5).astype(np.uint8))
        lf, lm = [], []
        for a, b in zip(mr_ch[1:], us_ch[1:]):
            ca, cb = _label_centroid(a), _label_centroid(b)
            if ca is not None and cb is not None:
                lf.append(ca)
                lm.append(cb)
        name = fname.split(".")[0]
        case = Case(
            mr.with_array(mr.array.astype(np.float32)), fixed_label, us, moving_label,
            landmarks_fixed=np.array(lf) if lf else None, landmarks_moving=np.array(lm) if lm else None,
            name=name, attrs={"source": "muregpro", "source_file": fname},
        )
        written.append(write_case(case, out_dir / name))
    return written
