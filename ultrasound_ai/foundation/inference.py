"""Segmentation and classification with a trained foundation model.

Inputs are a 2D image [H, W] or a stack of frames [N, H, W] (numpy, any numeric type: 8-bit is divided
by 255, anything else min-max scaled over the whole array as the data loaders do), or an image file
(PNG, NRRD, NIfTI, MetaImage). Each frame is resized to the model's input size, and segmentation
probabilities are resized back (bilinear) to the frame's own pixels before the arg-max, so masks come
back on the input's pixel grid; file outputs keep the input file's spacing, origin and direction.
"""

from __future__ import annotations

import os
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
           "evaluate_segmentation", "otsu_largest_component"]


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


@torch.no_grad()
def segment(image, model, *, device="auto", batch_size: int = 8,
            progress: Callable[[float], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 [.., H, W], probabilities float32 [.., K, H, W]) on the input's pixel grid; a 2D input
    gives [H, W] / [K, H, W]. `model` is a LoadedModel, a checkpoint path or an installed model's name."""
    lm = _model(model, "segment", device)
    frames = prepare_frames(image)
    n, h, w = frames.shape
    labels = np.zeros((n, h, w), dtype=np.uint8)
    probs = None
    for i in range(0, n, batch_size):
        x = torch.from_numpy(ds.to_model_input(frames[i:i + batch_size], lm.size)).unsqueeze(1).to(lm.device)
        logits = lm.model(x).float()
        p = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1).cpu().numpy()
        if probs is None:
            probs = np.zeros((n, p.shape[1], h, w), dtype=np.float32)
        probs[i:i + len(p)] = p
        labels[i:i + len(p)] = p.argmax(1)
        if progress is not None:
            progress(min(n, i + batch_size) / n)
    if np.asarray(image).ndim == 2:
        return labels[0], probs[0]
    return labels, probs


@torch.no_grad()
def classify(image, model, *, device="auto", batch_size: int = 16) -> tuple[np.ndarray, list[str]]:
    """(probabilities float32 [.., K], class names); a 2D input gives [K]."""
    lm = _model(model, "classify", device)
    frames = prepare_frames(image)
    out = []
    for i in range(0, len(frames), batch_size):
        x = torch.from_numpy(ds.to_model_input(frames[i:i + batch_size], lm.size)).unsqueeze(1).to(lm.device)
        out.append(lm.model(x).float().softmax(1).cpu().numpy())
    probs = np.concatenate(out).astype(np.float32)
    names = list(lm.card["configuration"].get("class_names") or [str(k) for k in range(probs.shape[1])])
    return (probs[0] if np.asarray(image).ndim == 2 else probs), names


def _read_with_geometry(path: Path):
    import SimpleITK as sitk

    arr = ds.read_image(path, allow_stack=True)
    ref = sitk.ReadImage(str(path))
    return arr, ref


def segment_file(input_path, output_path, model, *, device="auto", probabilities_path=None) -> dict:
    """Segment an image file (one image or a stack of frames) and write the label map with the input's
    geometry (PNG masks are written 0/255 for binary models, else the labels). Returns a summary."""
    import SimpleITK as sitk

    input_path, output_path = Path(input_path), Path(output_path)
    arr, ref = _read_with_geometry(input_path)
    lm = _model(model, "segment", device)
    labels, probs = segment(arr, lm, device=device)
    k = probs.shape[-3]
    out = labels.astype(np.uint8)
    if output_path.suffix.lower() == ".png":
        if out.ndim != 2:
            raise InputError(f"output {output_path}: PNG holds one frame, the input has {out.shape[0]}; use .nrrd")
        if k == 2:
            out = out * 255
    if ref.GetDimension() == 3 and out.ndim == 2:
        out = out[None]  # a one-slice volume stays a one-slice volume
    img = sitk.GetImageFromArray(out)
    if ref.GetDimension() == img.GetDimension():
        img.CopyInformation(ref)
    with atomic_output(output_path) as tmp:
        sitk.WriteImage(img, str(tmp), True)
    if probabilities_path:
        fg = probs[..., 1:, :, :].sum(axis=-3).astype(np.float32)  # probability of any structure
        if ref.GetDimension() == 3 and fg.ndim == 2:
            fg = fg[None]
        pimg = sitk.GetImageFromArray(fg)
        if ref.GetDimension() == pimg.GetDimension():
            pimg.CopyInformation(ref)
        with atomic_output(probabilities_path) as tmp:
            sitk.WriteImage(pimg, str(tmp), True)
    counts = {int(c): int((labels == c).sum()) for c in range(k)}
    return {"input": str(input_path), "output": str(output_path), "frames": int(1 if labels.ndim == 2 else labels.shape[0]),
            "pixels_per_label": counts, "model": lm.card.get("name")}


def classify_file(input_path, model, *, device="auto") -> dict:
    arr, _ = _read_with_geometry(Path(input_path))
    probs, names = classify(arr, model, device=device)
    p2 = np.atleast_2d(probs)
    return {"input": str(input_path), "class_names": names,
            "probabilities": p2.round(6).tolist(),
            "predicted": [names[int(i)] for i in p2.argmax(1)]}


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


def write_mask_png(mask: np.ndarray, path: os.PathLike) -> None:
    import SimpleITK as sitk

    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8)), str(tmp))
