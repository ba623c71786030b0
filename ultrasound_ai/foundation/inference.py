"""Segmentation and classification with a trained foundation model.

Inputs are a 2D image [H, W] or a stack of frames [N, H, W] (numpy, any numeric type: 8-bit is divided
by 255, anything else min-max scaled over the whole array as the data loaders do), or an image file
(PNG, NRRD, NIfTI, MetaImage; RGB/RGBA pixels become BT.601 grey).

Pixel size. A model card records the physical pixel size it was trained at (input.pixel_spacing_mm, x
then y). Given the input's pixel size (`pixel_spacing_mm`, x then y), each frame is resampled to the
training pixel size and read in model-size windows: segmentation averages the class probabilities of
overlapping windows (stride 3/4 of a window); classification reports the window that looks most like a
lesion (lowest "normal" probability: one lesion anywhere makes the image abnormal), or the mean over
windows for models without a "normal" class. Without a physical pixel size (or for a model whose card
has none) the whole frame is resized to the model's input, with a warning when the model has one.
Probabilities are resampled back (bilinear) to the frame's own pixels before the arg-max, so masks come
back on the input's pixel grid; file outputs keep the input file's spacing, origin and direction.

`region` = [x0, y0, x1, y1] (inclusive pixel indices, e.g. a DICOM ultrasound region) limits the work to
that rectangle; pixels outside it get label 0 (burned-in text and overlays around the sector are never
read).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation import datasets as ds
from ultrasound_ai.foundation.heads import build_model
from ultrasound_ai.foundation.losses import dice_per_class

__all__ = ["load_model", "LoadedModel", "prepare_frames", "segment", "classify", "segment_file", "classify_file",
           "evaluate_segmentation", "otsu_largest_component", "training_spacing", "read_input", "window_starts",
           "default_model_for", "label_names", "resampling_plan", "ResamplingPlan"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    card: dict
    device: torch.device

    @property
    def task(self) -> str:
        return self.card["configuration"]["task"]

    @property
    def size(self) -> int:
        return int(self.card["configuration"]["vit"]["img_size"])


def load_model(path, device="auto", expected_task: str | None = None) -> LoadedModel:
    """A usfm checkpoint (path or installed model name) ready for inference (eval mode)."""
    from ultrasound_ai.core.device import resolve_device
    from ultrasound_ai.models.checkpoint import load_into, read_card
    from ultrasound_ai.models.registry import find_model

    pt = find_model(path)
    card = read_card(pt)
    if card.get("method") != "usfm":
        raise InputError(f"model {pt}: method {card.get('method')!r}, expected a foundation model ('usfm')")
    task = card.get("configuration", {}).get("task")
    if expected_task and task != expected_task:
        raise InputError(f"model {pt}: a {task!r} model, but this needs a {expected_task!r} model")
    dev = resolve_device(device)
    model = build_model(card["configuration"]).to(dev)
    card = load_into(model, pt)
    model.eval()
    return LoadedModel(model, card, dev)


def label_names(card: dict) -> list[str]:
    """Names of a segmentation model's labels: the card's configuration.label_names, else background +
    "lesion" for a two-class model (the simulator's and BUSI's masks), else background + "label N"."""
    conf = card.get("configuration") or {}
    k = int(conf.get("num_classes", 2))
    names = conf.get("label_names")
    if isinstance(names, list) and len(names) == k:
        return [str(n) for n in names]
    return ["background", "lesion"] if k == 2 else ["background"] + [f"label {c}" for c in range(1, k)]


def default_model_for(task: str) -> str:
    """The installed usfm model used for `task` (segment | classify) when none is named: the first whose
    card says "default": true, else the first found. InputError when none is installed."""
    from ultrasound_ai.models.registry import list_models

    entries = [e for e in list_models("usfm") if (e.card.get("configuration") or {}).get("task") == task]
    if not entries:
        raise InputError(f"no installed foundation model does {task!r}; train one (ultrasound-ai foundation train "
                         f"--task {task}) or name a checkpoint")
    return next((e for e in entries if e.is_default), entries[0]).name


def prepare_frames(image) -> np.ndarray:
    """[N, H, W] float32 in [0, 1] from [H, W] or [N, H, W] numbers (see the module docstring)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape) < 1 or min(arr.shape[1:]) < 2:
        raise InputError(f"image: expected [H, W] or [N, H, W] with at least 2x2 pixels, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"image: expected numbers, got dtype {arr.dtype}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    a = arr.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise InputError("image: contains NaN or infinite values")
    lo, hi = a.min(), a.max()
    return ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)).astype(np.float32)


def _model(model, task, device) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, device, task)


def training_spacing(lm: LoadedModel) -> tuple[float, float] | None:
    """The card's training pixel size (x, y) in mm, or None when the card records none."""
    v = (lm.card.get("input") or {}).get("pixel_spacing_mm")
    if not v or len(v) != 2 or not all(isinstance(t, (int, float)) and t > 0 for t in v):
        return None
    return float(v[0]), float(v[1])


def check_spacing(pixel_spacing_mm, what: str = "pixel_spacing_mm") -> tuple[float, float] | None:
    """(sx, sy) in mm from a pair of positive finite numbers, or None; InputError otherwise."""
    if pixel_spacing_mm is None:
        return None
    try:
        sx, sy = (float(v) for v in pixel_spacing_mm)
    except (TypeError, ValueError):
        raise InputError(f"{what}: expected [x, y] pixel size in mm, got {pixel_spacing_mm!r}") from None
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        raise InputError(f"{what}: expected two positive pixel sizes in mm, got {pixel_spacing_mm!r}")
    return sx, sy


def check_region(region, shape: tuple[int, int], what: str = "region") -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] inclusive pixel indices inside an [H, W] frame (None = the whole frame)."""
    h, w = shape
    if region is None:
        return 0, 0, w - 1, h - 1
    try:
        x0, y0, x1, y1 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise InputError(f"{what}: expected [x0, y0, x1, y1] pixel indices, got {region!r}") from None
    if not (0 <= x0 < x1 < w and 0 <= y0 < y1 < h):
        raise InputError(f"{what}: [x0, y0, x1, y1] = {[x0, y0, x1, y1]} must lie inside the {w}x{h} frame "
                         "with x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def window_starts(length: int, window: int) -> list[int]:
    """Start offsets of windows covering [0, length) with stride 3/4 of a window (neighbours overlap by a
    quarter, so no structure is only ever seen cut at a window edge; the last window is flush with the
    end); [0] when the length fits one window."""
    if length <= window:
        return [0]
    stride = max(1, window - window // 4)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@dataclass
class ResamplingPlan:
    """How frames of one shape reach the model: the resampled size and the windows on it."""

    resampled: tuple[int, int]  # (h, w) at the training pixel size, or the model size (whole-image resize)
    windows: list[tuple[int, int]]  # (row, col) starts of size x size windows on the (padded) resampled frame
    padded: tuple[int, int]


def resampling_plan(shape: tuple[int, int], size: int, spacing, train_spacing) -> ResamplingPlan:
    h, w = shape
    if spacing is None or train_spacing is None:
        return ResamplingPlan((size, size), [(0, 0)], (size, size))
    rh = max(2, int(round(h * spacing[1] / train_spacing[1])))
    rw = max(2, int(round(w * spacing[0] / train_spacing[0])))
    ph, pw = max(rh, size), max(rw, size)
    return ResamplingPlan((rh, rw), [(r, c) for r in window_starts(ph, size) for c in window_starts(pw, size)], (ph, pw))


def _windows_input(frame: np.ndarray, plan: ResamplingPlan, size: int) -> np.ndarray:
    """Normalised model inputs [n_windows, size, size] of one frame (padding is black, as outside a sector)."""
    r = ds.resize_image(frame, plan.resampled)
    canvas = np.zeros(plan.padded, dtype=np.float32)
    canvas[: r.shape[0], : r.shape[1]] = r
    return ds.normalise(np.stack([canvas[a:a + size, b:b + size] for a, b in plan.windows]))


def _resolve_spacing(lm: LoadedModel, pixel_spacing_mm, warn: Callable[[str], None] | None):
    spacing = check_spacing(pixel_spacing_mm)
    train = training_spacing(lm)
    if train is not None and spacing is None:
        msg = (f"the input has no physical pixel size: the whole image is resized to the model's "
               f"{lm.size}x{lm.size} input instead of being resampled to its training pixel size "
               f"{train[0]:.4g} x {train[1]:.4g} mm")
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
    return spacing, train


def _frames_in_region(image, region):
    frames = prepare_frames(image)
    x0, y0, x1, y1 = check_region(region, frames.shape[1:])
    return frames, (x0, y0, x1, y1)


def _check_cancel(cancel_check):
    if cancel_check is not None and cancel_check():
        from ultrasound_ai.core.errors import Cancelled

        raise Cancelled("foundation inference cancelled")


@torch.no_grad()
def segment(image, model, *, device="auto", batch_size: int = 8, pixel_spacing_mm=None, region=None,
            progress: Callable[[float], None] | None = None, cancel_check: Callable[[], bool] | None = None,
            warn: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 [.., H, W], probabilities float32 [.., K, H, W]) on the input's pixel grid; a 2D input
    gives [H, W] / [K, H, W]. `model` is a LoadedModel, a checkpoint path or an installed model's name.
    progress(fraction) after every frame; cancel_check() -> True stops with Cancelled between frames."""
    lm = _model(model, "segment", device)
    frames, (x0, y0, x1, y1) = _frames_in_region(image, region)
    spacing, train = _resolve_spacing(lm, pixel_spacing_mm, warn)
    n, h, w = frames.shape
    k = int(lm.card["configuration"].get("num_classes", 2))
    labels = np.zeros((n, h, w), dtype=np.uint8)
    probs = np.zeros((n, k, h, w), dtype=np.float32)
    probs[:, 0] = 1.0  # outside the region: background for sure
    ch, cw = y1 - y0 + 1, x1 - x0 + 1
    plan = resampling_plan((ch, cw), lm.size, spacing, train)
    count = np.zeros(plan.padded, dtype=np.float32)
    for a, b in plan.windows:
        count[a:a + lm.size, b:b + lm.size] += 1
    for i in range(n):
        _check_cancel(cancel_check)
        x = _windows_input(frames[i, y0:y1 + 1, x0:x1 + 1], plan, lm.size)
        acc = np.zeros((k, *plan.padded), dtype=np.float32)
        for j in range(0, len(x), batch_size):
            t = torch.from_numpy(x[j:j + batch_size]).unsqueeze(1).to(lm.device)
            p = lm.model(t).float().softmax(1).cpu().numpy()
            for (a, b), pj in zip(plan.windows[j:j + batch_size], p):
                acc[:, a:a + lm.size, b:b + lm.size] += pj
        acc = acc[:, : plan.resampled[0], : plan.resampled[1]] / count[None, : plan.resampled[0], : plan.resampled[1]]
        t = torch.from_numpy(acc).unsqueeze(0)
        p = F.interpolate(t, size=(ch, cw), mode="bilinear", align_corners=False)[0].numpy()
        p /= p.sum(0, keepdims=True)
        probs[i, :, y0:y1 + 1, x0:x1 + 1] = p
        labels[i, y0:y1 + 1, x0:x1 + 1] = p.argmax(0)
        if progress is not None:
            progress((i + 1) / n)
    if np.asarray(image).ndim == 2:
        return labels[0], probs[0]
    return labels, probs


@torch.no_grad()
def classify(image, model, *, device="auto", batch_size: int = 16, pixel_spacing_mm=None, region=None,
             progress: Callable[[float], None] | None = None, cancel_check: Callable[[], bool] | None = None,
             warn: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """(probabilities float32 [.., K], class names); a 2D input gives [K] (see the module docstring for
    how windows are combined)."""
    lm = _model(model, "classify", device)
    frames, (x0, y0, x1, y1) = _frames_in_region(image, region)
    spacing, train = _resolve_spacing(lm, pixel_spacing_mm, warn)
    names = list(lm.card["configuration"].get("class_names") or [])
    plan = resampling_plan((y1 - y0 + 1, x1 - x0 + 1), lm.size, spacing, train)
    out = []
    for i in range(len(frames)):
        _check_cancel(cancel_check)
        x = _windows_input(frames[i, y0:y1 + 1, x0:x1 + 1], plan, lm.size)
        p = np.concatenate([lm.model(torch.from_numpy(x[j:j + batch_size]).unsqueeze(1).to(lm.device))
                            .float().softmax(1).cpu().numpy() for j in range(0, len(x), batch_size)])
        out.append(p[int(np.argmin(p[:, names.index("normal")]))] if "normal" in names else p.mean(0))
        if progress is not None:
            progress((i + 1) / len(frames))
    probs = np.stack(out).astype(np.float32)
    names = names or [str(c) for c in range(probs.shape[1])]
    return (probs[0] if np.asarray(image).ndim == 2 else probs), names


LABEL_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd", ".png")


@dataclass
class InputImage:
    """An image file read for inference: frames [N, H, W] in [0, 1] and the SimpleITK image they came from."""

    frames: np.ndarray
    reference: object  # SimpleITK.Image (kept for its geometry)
    path: Path

    @property
    def file_spacing_mm(self) -> tuple[float, float]:
        sp = self.reference.GetSpacing()
        return float(sp[0]), float(sp[1])


def read_input(path, what: str = "image") -> InputImage:
    """A 2D image or a stack of frames (the third axis of a 3D file), scalar or RGB/RGBA."""
    import SimpleITK as sitk

    path = Path(path)
    frames = ds.read_image(path, allow_stack=True)  # InputError naming the file when unreadable
    ref = sitk.ReadImage(str(path))
    if ref.GetDimension() not in (2, 3):
        raise InputError(f"{what} {path}: a {ref.GetDimension()}D image; expected a 2D image or frames stacked "
                         "along the third axis")
    return InputImage(frames if frames.ndim == 3 else frames[None], ref, path)


def input_spacing(img: InputImage, pixel_spacing_mm) -> tuple[float, float] | None:
    """The physical pixel size to use: [x, y] mm as given, "file" = the file's own spacing, None = unknown."""
    if isinstance(pixel_spacing_mm, str):
        if pixel_spacing_mm != "file":
            raise InputError(f"pixel_spacing_mm: expected [x, y] in mm, 'file' or null, got {pixel_spacing_mm!r}")
        return img.file_spacing_mm
    return check_spacing(pixel_spacing_mm)


def select_frames(img: InputImage, frame) -> list[int]:
    n = len(img.frames)
    if frame is None:
        return list(range(n))
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= int(frame) < n:
        raise InputError(f"frame: expected a frame index in 0..{n - 1} of {img.path}, got {frame!r}")
    return [int(frame)]


def _on_input_geometry(array: np.ndarray, img: InputImage, indices: list[int]):
    """A SimpleITK image of `array` [n, H, W] on the input's geometry: the whole input, or the one frame
    `indices[0]` placed where it lies in the input (same spacing and direction, origin moved along the
    third axis)."""
    import SimpleITK as sitk

    ref = img.reference
    if ref.GetDimension() == 2:
        out = sitk.GetImageFromArray(np.ascontiguousarray(array[0]))
        out.CopyInformation(ref)
        return out
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(ref.GetSpacing())
    out.SetDirection(ref.GetDirection())
    out.SetOrigin(ref.TransformIndexToPhysicalPoint((0, 0, int(indices[0]))) if len(indices) == 1 else ref.GetOrigin())
    return out


def _write(image, path: Path) -> None:
    import SimpleITK as sitk

    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def segment_file(input_path, output_path, model, *, device="auto", probabilities_path=None, pixel_spacing_mm=None,
                 region=None, frame=None, progress=None, cancel_check=None, warn=None) -> dict:
    """Segment an image file (one image or a stack of frames; `frame` = only that one) and write the label
    map on the input's geometry (PNG masks are written 0/255 for binary models, else the labels).
    `probabilities_path` gets the probability of any structure (float32, same geometry). Returns a summary."""
    from ultrasound_ai.core.atomic import check_output_path

    output_path = check_output_path(output_path, what="labels output", extensions=LABEL_EXTENSIONS)
    if probabilities_path:
        probabilities_path = check_output_path(probabilities_path, what="probabilities output",
                                               extensions=LABEL_EXTENSIONS[:-1])
    img = read_input(input_path)
    indices = select_frames(img, frame)
    lm = _model(model, "segment", device)
    spacing = input_spacing(img, pixel_spacing_mm)
    notes: list[str] = []
    labels, probs = segment(img.frames[indices], lm, device=device, pixel_spacing_mm=spacing, region=region,
                            progress=progress, cancel_check=cancel_check,
                            warn=lambda m: (notes.append(m), warn(m) if warn else warnings.warn(m, stacklevel=2)))
    k = probs.shape[1]
    out = labels.astype(np.uint8)
    if output_path.suffix.lower() == ".png":
        if len(out) != 1:
            raise InputError(f"output {output_path}: PNG holds one frame, the input has {len(out)}; use .nrrd")
        if k == 2:
            out = out * 255
        _write(_png_image(out[0]), output_path)
    else:
        _write(_on_input_geometry(out, img, indices), output_path)
    if probabilities_path:
        fg = probs[:, 1:].sum(axis=1).astype(np.float32)  # probability of any structure
        _write(_on_input_geometry(fg, img, indices), probabilities_path)
    return {"input": str(img.path), "output": str(output_path), "frames": len(indices), "frame_indices": indices,
            "model": lm.card.get("name"), "num_classes": int(k), "label_names": label_names(lm.card),
            "pixel_spacing_mm": list(spacing) if spacing else None,
            "training_pixel_spacing_mm": list(training_spacing(lm) or []) or None,
            "region": list(check_region(region, img.frames.shape[1:])), "warnings": notes,
            "pixels_per_label": {int(c): int((labels == c).sum()) for c in range(k)},
            "label_fraction_per_frame": [[float((lab == c).mean()) for c in range(k)] for lab in labels]}


def _png_image(mask: np.ndarray):
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(mask))


def classify_file(input_path, model, *, device="auto", pixel_spacing_mm=None, region=None, frame=None,
                  progress=None, cancel_check=None, warn=None) -> dict:
    """Class probabilities per frame of an image file (JSON-ready)."""
    img = read_input(input_path)
    indices = select_frames(img, frame)
    spacing = input_spacing(img, pixel_spacing_mm)
    notes: list[str] = []
    lm = _model(model, "classify", device)
    probs, names = classify(img.frames[indices], lm, device=device, pixel_spacing_mm=spacing, region=region,
                            progress=progress, cancel_check=cancel_check,
                            warn=lambda m: (notes.append(m), warn(m) if warn else warnings.warn(m, stacklevel=2)))
    return {"input": str(img.path), "model": lm.card.get("name"), "class_names": names, "frame_indices": indices,
            "probabilities": probs.round(6).tolist(), "predicted": [names[int(i)] for i in probs.argmax(1)],
            "pixel_spacing_mm": list(spacing) if spacing else None,
            "training_pixel_spacing_mm": list(training_spacing(lm) or []) or None,
            "region": list(check_region(region, img.frames.shape[1:])), "warnings": notes}


def otsu_largest_component(image: np.ndarray, dark: bool = True) -> np.ndarray:
    """Classical baseline: Otsu threshold (after a light Gaussian smoothing of the speckle), keep the
    darker (hypoechoic lesion) or brighter side, fill holes, keep the largest connected component."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    img = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), 1.5)
    if img.max() <= img.min():
        return np.zeros(img.shape, dtype=np.uint8)
    t = threshold_otsu(img)
    fg = img < t if dark else img > t
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, iterations=1))
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(img.shape, dtype=np.uint8)
    sizes = ndimage.sum(fg, lab, index=np.arange(1, n + 1))
    return (lab == (1 + int(np.argmax(sizes)))).astype(np.uint8)


def evaluate_segmentation(predict: Callable[[np.ndarray], np.ndarray], images, masks, num_classes: int = 2) -> dict:
    """Mean / std / per-image foreground Dice of `predict(image) -> labels` over paired images and masks."""
    scores = []
    for img, m in zip(images, masks):
        pred = predict(img)
        scores.append(float(dice_per_class(pred, m, num_classes).mean()))
    if not scores:
        raise InputError("evaluate_segmentation: no images")
    return {"dice": float(np.mean(scores)), "dice_std": float(np.std(scores)), "n": len(scores), "per_image": scores}
