"""The physical pixel size and image rectangle of an ultrasound DICOM file, from its ultrasound regions.

ITK's GDCM reader (SimpleITK, and Slicer's DICOM import through it) gives ultrasound files 1 mm pixels:
the real size is only in the Sequence of Ultrasound Regions (0018,6011), whose items carry the region's
rectangle (RegionLocationMinX0 / MinY0 / MaxX1 / MaxY1, inclusive pixel indices), its spatial format
(1 = 2D tissue image), data type (1 = tissue) and PhysicalDeltaX / PhysicalDeltaY with their units
(3 = cm). pydicom reads them (Slicer bundles it; the engine imports it only here).

The image region is the bounding box of the 2D tissue regions whose pixel size equals the largest one's
(a dual view, as the ALOKA file has, is two regions side by side at one pixel size). Everything outside
it (burned-in text, rulers, the ECG trace, a colour bar) is not read by the models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ultrasound_ai.core.errors import InputError

__all__ = ["UltrasoundRegion", "ImageRegion", "read_regions", "image_region"]

_CM = 3  # PhysicalUnitsX/YDirection code for centimetres
_SPATIAL_2D = 1
_TISSUE = 1


@dataclass(frozen=True)
class UltrasoundRegion:
    x0: int
    y0: int
    x1: int
    y1: int
    spatial_format: int
    data_type: int
    units_x: int
    units_y: int
    delta_x: float
    delta_y: float

    @property
    def area(self) -> int:
        return (self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1)

    @property
    def is_tissue_image_in_cm(self) -> bool:
        return (self.spatial_format == _SPATIAL_2D and self.data_type == _TISSUE and self.units_x == _CM
                and self.units_y == _CM and self.delta_x > 0 and self.delta_y > 0)


@dataclass(frozen=True)
class ImageRegion:
    """The rectangle [x0, y0, x1, y1] (inclusive pixel indices) and its pixel size (x, y) in mm."""

    bounds: tuple[int, int, int, int]
    pixel_spacing_mm: tuple[float, float]
    regions: int  # how many tissue regions it covers


def _dicom(path: Path):
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - Slicer bundles pydicom; the test extra installs it
        raise InputError(f"DICOM file {path}: reading ultrasound regions needs pydicom (pip install pydicom)") from exc
    if not path.is_file():
        raise InputError(f"DICOM file {path}: not found")
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types for a file that is not DICOM
        raise InputError(f"DICOM file {path}: unreadable ({type(exc).__name__}: {exc})") from exc


def read_regions(path: str | os.PathLike) -> list[UltrasoundRegion]:
    """Every item of the file's Sequence of Ultrasound Regions (empty when it has none), its rectangle
    clipped to the image (some scanners write MaxX1 = Columns, one past the last pixel)."""
    ds = _dicom(Path(path))
    last_x, last_y = int(ds.get("Columns", 1 << 16)) - 1, int(ds.get("Rows", 1 << 16)) - 1
    out = []
    for item in ds.get("SequenceOfUltrasoundRegions") or []:
        try:
            out.append(UltrasoundRegion(
                int(item.RegionLocationMinX0), int(item.RegionLocationMinY0),
                min(int(item.RegionLocationMaxX1), last_x), min(int(item.RegionLocationMaxY1), last_y), int(item.get("RegionSpatialFormat", 0)),
                int(item.get("RegionDataType", 0)), int(item.get("PhysicalUnitsXDirection", 0)),
                int(item.get("PhysicalUnitsYDirection", 0)), float(item.get("PhysicalDeltaX", 0) or 0),
                float(item.get("PhysicalDeltaY", 0) or 0)))
        except (AttributeError, TypeError, ValueError):
            continue  # an item without a rectangle describes no pixels
    return out


def image_region(path: str | os.PathLike) -> ImageRegion | None:
    """The tissue image rectangle and its pixel size in mm, or None when the file records none."""
    tissue = [r for r in read_regions(path) if r.is_tissue_image_in_cm]
    if not tissue:
        return None
    main = max(tissue, key=lambda r: r.area)
    same = [r for r in tissue if abs(r.delta_x - main.delta_x) <= 1e-6 * main.delta_x
            and abs(r.delta_y - main.delta_y) <= 1e-6 * main.delta_y]
    bounds = (min(r.x0 for r in same), min(r.y0 for r in same), max(r.x1 for r in same), max(r.y1 for r in same))
    return ImageRegion(bounds, (main.delta_x * 10.0, main.delta_y * 10.0), len(same))
