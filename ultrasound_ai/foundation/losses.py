"""Losses and metrics of the foundation model.

* Pre-training (paper eqs. 10-13): L = L1(reconstruction, image) over all pixels + lambda * focal
  frequency loss. The focal frequency loss compares the orthonormal 2D DFTs: with dF = F_rec - F,
  w = |dF|^alpha min-max normalised to [0, 1] per image and channel and detached (it only weights), and
  the loss is mean(w * |dF|^2) over frequencies, channels and images.
* Fine-tuning: cross-entropy + soft Dice for segmentation; Dice score (hard masks) for evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ultrasound_ai.core.errors import InputError

__all__ = ["focal_frequency_loss", "mim_loss", "soft_dice_loss", "segmentation_loss", "dice_score",
           "dice_per_class"]


def focal_frequency_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Focal frequency loss of [..., H, W] images (eqs. 12-13, orthonormal DFT)."""
    if pred.shape != target.shape:
        raise InputError(f"focal_frequency_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    diff = torch.fft.fft2(pred.float(), norm="ortho") - torch.fft.fft2(target.float(), norm="ortho")
    sq = diff.real ** 2 + diff.imag ** 2
    with torch.no_grad():
        w = sq.sqrt() ** alpha
        lo = w.amin(dim=(-2, -1), keepdim=True)
        hi = w.amax(dim=(-2, -1), keepdim=True)
        span = hi - lo
        # All frequencies equally wrong (or all exact): every one gets full weight.
        w = torch.where(span > 0, (w - lo) / span.clamp_min(1e-12), torch.ones_like(w))
    return (w * sq).mean()


def mim_loss(reconstruction: torch.Tensor, image: torch.Tensor, lam: float = 1.0, alpha: float = 1.0
             ) -> dict[str, torch.Tensor]:
    """{"loss", "l1", "freq"}: L1 over all pixels + lam * focal frequency loss (eq. 10)."""
    l1 = (reconstruction - image).abs().mean()
    freq = focal_frequency_loss(reconstruction, image, alpha)
    return {"loss": l1 + lam * freq, "l1": l1.detach(), "freq": freq.detach()}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes. logits [B, K, H, W], target [B, H, W] long."""
    k = logits.shape[1]
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(target.long(), k).permute(0, 3, 1, 2).to(prob.dtype)
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[1:].mean() if k > 1 else 1.0 - dice.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0
                      ) -> dict[str, torch.Tensor]:
    ce = F.cross_entropy(logits, target.long())
    dl = soft_dice_loss(logits, target)
    return {"loss": ce + dice_weight * dl, "ce": ce.detach(), "dice_loss": dl.detach()}


def dice_per_class(pred, target, num_classes: int) -> np.ndarray:
    """Hard Dice of each foreground class 1..K-1 over one image or a batch ([..., H, W] integer labels).
    A class absent from both prediction and truth scores 1 (nothing to find, nothing found)."""
    pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred)
    target = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target)
    if pred.shape != target.shape:
        raise InputError(f"dice: prediction {pred.shape} and truth {target.shape} differ in shape")
    out = []
    for c in range(1, max(2, num_classes)):
        p, t = pred == c, target == c
        denom = p.sum() + t.sum()
        out.append(1.0 if denom == 0 else 2.0 * np.logical_and(p, t).sum() / denom)
    return np.asarray(out, dtype=np.float64)


def dice_score(pred, target, num_classes: int = 2) -> float:
    """Mean foreground Dice of one image (labels [H, W]); for a binary mask, the lesion Dice."""
    return float(dice_per_class(pred, target, num_classes).mean())
