"""Data for the foundation model: image folders, BUSI, CAMUS, the simulator; resizing; seeded splits.

Images are float32 [H, W] in [0, 1] (8-bit files divided by 255; other types min-max scaled). Colour
images (RGB/RGBA PNGs, as some BUSI files are) are converted to grey with the ITU-R BT.601 luma weights,
because B-mode is grey and the engine's models take 1 channel. Masks are integer label maps.

Layouts:
* image folder (pre-training): every .png / .nrrd / .nii(.gz) / .mha / .mhd under the folder, files whose
  name ends in ``_mask`` (or ``_mask_N``) or ``_gt`` excluded.
* BUSI: class folders (benign, malignant, normal, or any names, sorted) of ``name (n).png`` with
  ``name (n)_mask.png``; extra masks ``name (n)_mask_1.png``, ... are merged (union) into one lesion mask.
* CAMUS: ``patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}.{nii.gz,mhd}`` beside ``..._gt.{nii.gz,mhd}`` (labels 0
  background, 1 left-ventricle endocardium, 2 myocardium, 3 left atrium), found anywhere under the root.

Model input: ``to_model_input`` resizes to the model's square size (bilinear, antialiased) and normalises
intensities with INTENSITY_MEAN / INTENSITY_STD (recorded in the model card).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["INTENSITY_MEAN", "INTENSITY_STD", "IMAGE_EXTENSIONS", "LabelledImage", "read_image", "read_mask",
           "list_image_folder", "load_busi", "load_camus", "simulated_set", "resize_image", "resize_mask",
           "to_model_input", "fixed_split", "label_subset", "normalise"]

INTENSITY_MEAN = 0.5
INTENSITY_STD = 0.25
IMAGE_EXTENSIONS = (".png", ".nrrd", ".nii.gz", ".nii", ".mha", ".mhd")
_MASK_RE = re.compile(r"_mask(_\d+)?$", re.I)


@dataclass
class LabelledImage:
    image: np.ndarray  # float32 [H, W] in [0, 1]
    mask: np.ndarray | None  # uint8 [H, W] label map, or None
    label: int  # class index (-1 when unknown)
    name: str  # file path or simulator id


def _ext(path: Path) -> str | None:
    name = path.name.lower()
    for e in IMAGE_EXTENSIONS:
        if name.endswith(e):
            return e
    return None


def _stem(path: Path) -> str:
    e = _ext(path) or path.suffix
    return path.name[: len(path.name) - len(e)]


def _read_array(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    if not path.is_file():
        raise InputError(f"image file {path}: not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"image file {path}: unreadable (expected PNG, NRRD, NIfTI or MetaImage): {detail}") from exc
    arr = sitk.GetArrayFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        if ncomp not in (3, 4):
            raise InputError(f"image file {path}: {ncomp} components per pixel; expected grey, RGB or RGBA")
        rgb = arr[..., :3].astype(np.float64)
        # BT.601 luma: the grey a display shows for a colour B-mode screenshot.
        grey = rgb @ np.array([0.299, 0.587, 0.114])
        arr = np.round(grey).astype(np.uint8) if arr.dtype == np.uint8 else grey
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]  # a 2D image stored as one slice
    return arr


def read_image(path: str | os.PathLike, *, allow_stack: bool = False) -> np.ndarray:
    """float32 [H, W] in [0, 1] (or [N, H, W] for a multi-frame file when allow_stack)."""
    path = Path(path)
    arr = _read_array(path)
    if arr.ndim == 3 and not allow_stack:
        raise InputError(f"image file {path}: holds {arr.shape[0]} frames of {arr.shape[1]}x{arr.shape[2]}; "
                         "expected one 2D image")
    if arr.ndim not in (2, 3) or min(arr.shape[-2:]) < 2:
        raise InputError(f"image file {path}: expected a 2D image, got an array of shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    else:
        a = arr.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise InputError(f"image file {path}: contains NaN or infinite values")
        lo, hi = a.min(), a.max()
        out = ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)).astype(np.float32)
    return out


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """uint8 label map [H, W]. Binary masks saved as 0/255 become 0/1."""
    path = Path(path)
    arr = _read_array(path)
    if arr.ndim != 2:
        raise InputError(f"mask file {path}: expected a 2D label image, got shape {arr.shape}")
    vals = np.unique(arr)
    if vals.size <= 2 and vals.max(initial=0) > 1:
        return (arr > 0).astype(np.uint8)
    if arr.min() < 0 or arr.max() > 255 or not np.all(np.equal(np.mod(arr, 1), 0)):
        raise InputError(f"mask file {path}: expected integer labels 0..255, got values {vals[:8].tolist()}")
    return arr.astype(np.uint8)


def _is_label_file(path: Path) -> bool:
    stem = _stem(path)
    return bool(_MASK_RE.search(stem)) or stem.lower().endswith("_gt")


def list_image_folder(folder: str | os.PathLike) -> list[Path]:
    """Images (not masks) under `folder`, sorted; InputError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder}: not found (expected a folder of .png / .nrrd images)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _ext(p) and not _is_label_file(p)
                   and not p.name.startswith("."))
    if not files:
        raise InputError(f"image folder {folder}: empty; expected images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return files


def load_busi(root: str | os.PathLike, *, require_masks: bool = True) -> tuple[list[LabelledImage], list[str]]:
    """All images of a BUSI-layout folder with their merged masks and class index; returns (items,
    class_names). Errors (InputError naming the file): an empty folder, a mask without its image, an image
    without a mask (when require_masks), a mask whose size differs from its image's."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"BUSI folder {root}: not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"BUSI folder {root}: no class folders inside (expected e.g. benign/, malignant/, normal/)")
    items: list[LabelledImage] = []
    for ci, cname in enumerate(classes):
        files = sorted(p for p in (root / cname).iterdir() if p.is_file() and p.suffix.lower() == ".png"
                       and not p.name.startswith("."))
        images = {_stem(p): p for p in files if not _MASK_RE.search(_stem(p))}
        masks: dict[str, list[Path]] = {}
        for p in files:
            m = _MASK_RE.search(_stem(p))
            if m:
                base = _stem(p)[: m.start()]
                if base not in images:
                    raise InputError(f"BUSI mask {p}: no image {base}.png beside it")
                masks.setdefault(base, []).append(p)
        for base, path in images.items():
            image = read_image(path)
            merged = None
            if base in masks:
                for mp in sorted(masks[base]):
                    m = read_mask(mp)
                    if m.shape != image.shape:
                        raise InputError(f"BUSI mask {mp}: {m.shape[1]}x{m.shape[0]} pixels but its image {path.name} "
                                         f"is {image.shape[1]}x{image.shape[0]}")
                    merged = (m > 0) if merged is None else (merged | (m > 0))
                merged = merged.astype(np.uint8)
            elif require_masks:
                raise InputError(f"BUSI image {path}: no mask {base}_mask.png beside it (needed for segmentation)")
            items.append(LabelledImage(image=image, mask=merged, label=ci, name=str(path)))
    if not items:
        raise InputError(f"BUSI folder {root}: empty; expected CLASS/name (n).png with name (n)_mask.png")
    return items, classes


def load_camus(root: str | os.PathLike) -> list[LabelledImage]:
    """CAMUS images with ground truth (``*_gt`` files), anywhere under `root`, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"CAMUS folder {root}: not found")
    gts = sorted(p for p in root.rglob("*") if p.is_file() and _ext(p) in (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd")
                 and _stem(p).endswith("_gt"))
    if not gts:
        raise InputError(f"CAMUS folder {root}: no ground-truth files (patientXXXX_2CH_ED_gt.nii.gz or .mhd) found")
    items = []
    for gt in gts:
        ext = _ext(gt)
        img_path = gt.with_name(_stem(gt)[: -len("_gt")] + ext)
        if not img_path.is_file():
            raise InputError(f"CAMUS label {gt}: no image {img_path.name} beside it")
        image = read_image(img_path)
        mask = read_mask(gt)
        if mask.shape != image.shape:
            raise InputError(f"CAMUS label {gt}: shape {mask.shape} differs from its image's {image.shape}")
        items.append(LabelledImage(image=image, mask=mask, label=-1, name=str(img_path)))
    return items


def simulated_set(seed: int, count: int, size: int = 128, labels: Sequence[int] | None = None,
                  appearance: dict | None = None) -> list[LabelledImage]:
    """`count` simulator images of the data set `seed` (image i depends only on (seed, i)); `appearance`
    draws each image's scanner settings from given ranges (bmode_sim.APPEARANCE_KEYS)."""
    from ultrasound_ai.foundation.bmode_sim import simulate_batch

    return [LabelledImage(image=s.image, mask=s.mask, label=s.label, name=f"sim:{seed}:{i}")
            for i, s in enumerate(simulate_batch(seed, range(count), size, labels=labels, appearance=appearance))]


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of [H, W] or [N, H, W] to (h, w)."""
    import torch
    import torch.nn.functional as F

    hw = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    arr = np.asarray(image, dtype=np.float32)
    if arr.shape[-2:] == hw:
        return arr.copy()
    t = torch.from_numpy(np.ascontiguousarray(arr)).reshape(-1, 1, *arr.shape[-2:])
    out = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*arr.shape[:-2], *hw).numpy()


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (labels stay labels), pixel centres aligned."""
    hw = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    m = np.asarray(mask)
    rows = np.minimum(((np.arange(hw[0]) + 0.5) * m.shape[-2] / hw[0]).astype(int), m.shape[-2] - 1)
    cols = np.minimum(((np.arange(hw[1]) + 0.5) * m.shape[-1] / hw[1]).astype(int), m.shape[-1] - 1)
    return m[..., rows[:, None], cols[None, :]]


def normalise(image: np.ndarray) -> np.ndarray:
    return ((np.asarray(image, dtype=np.float32) - INTENSITY_MEAN) / INTENSITY_STD).astype(np.float32)


def to_model_input(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W] (or [N, H, W]) in [0, 1] -> normalised float32 at size x size."""
    return normalise(resize_image(image, size))


def fixed_split(count: int, seed: int, fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> list[np.ndarray]:
    """Disjoint index sets (e.g. train/val/test) from one seeded permutation; every index in one set."""
    if count < len(fractions):
        raise InputError(f"split: {count} items cannot fill {len(fractions)} sets")
    f = np.asarray(fractions, dtype=np.float64)
    if np.any(f < 0) or f.sum() <= 0:
        raise InputError(f"split fractions: expected non-negative numbers, got {list(fractions)}")
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 11])).permutation(count)
    bounds = np.round(np.cumsum(f / f.sum()) * count).astype(int)
    parts, start = [], 0
    for b in bounds:
        parts.append(np.sort(perm[start:b]))
        start = b
    return parts


def label_subset(indices: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """The first ceil(fraction * n) of a seeded permutation of `indices`: smaller fractions are subsets of
    larger ones for the same seed (so label-efficiency curves compare nested label sets)."""
    if not 0 < fraction <= 1:
        raise InputError(f"label fraction: expected a number in (0, 1], got {fraction!r}")
    idx = np.asarray(indices)
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 13])).permutation(len(idx))
    k = max(1, int(np.ceil(fraction * len(idx) - 1e-9)))
    return np.sort(idx[perm[:k]])
