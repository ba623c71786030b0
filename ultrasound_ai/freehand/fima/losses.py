"""FiMA's losses: supervised L1 + Pearson (paper eq. 2), InfoNCE (eq. 3) and the Pearson prior (eq. 4).

Units follow the network's output (`fima.model`): translations in mm, angles in degrees.

Angle scaling: the authors' code multiplies angle errors by 100 with angles in radians. We keep angles
in degrees and weight their L1 by ANGLE_WEIGHT = 100 * pi / 180 (about 1.745), which is the same loss.
For typical freehand motion (~0.5 mm and ~0.3 degree per frame pair) both terms are then of one order.

Pearson terms are computed per parameter across the frame pairs of each sweep (dim -2 of [B, L, K]) and
guarded: a parameter whose true values do not vary (variance below `eps`) has no defined correlation
and is left out of the mean; a constant prediction against varying truth gives r = 0 (loss 1) with a
finite gradient, since the variances enter as sqrt((var + eps) ...). If nothing varies the term is 0.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ultrasound_ai.core.errors import InputError

__all__ = [
    "ANGLE_WEIGHT",
    "pearson",
    "pearson_loss",
    "supervised_loss",
    "info_nce",
    "pearson_prior",
    "alignment_loss",
]

ANGLE_WEIGHT = 100.0 * math.pi / 180.0


def _check(name: str, t, trailing: Optional[int] = None, min_dim: int = 2):
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim or (trailing is not None and t.shape[-1] != trailing):
        want = f"[..., L, {trailing}]" if trailing is not None else f"at least {min_dim} dimensions"
        raise InputError(f"{name}: expected shape {want}, got {list(t.shape)}")


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlation of a, b [..., L, K] along L (dim -2), per leading index and column.

    Returns (r [..., K], valid [..., K]) where valid says b (the reference) varies: var(b) > eps.
    """
    if a.shape != b.shape:
        raise InputError(f"pearson: shapes differ, {list(a.shape)} vs {list(b.shape)}")
    _check("pearson input", a)
    if a.shape[-2] < 2:
        raise InputError(f"pearson: need at least 2 samples along dim -2, got {a.shape[-2]}")
    ac = a - a.mean(dim=-2, keepdim=True)
    bc = b - b.mean(dim=-2, keepdim=True)
    cov = (ac * bc).mean(dim=-2)
    va = (ac * ac).mean(dim=-2)
    vb = (bc * bc).mean(dim=-2)
    r = cov / torch.sqrt((va + eps) * (vb + eps))
    return r, vb.detach() > eps


def pearson_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean of (1 - r) over the columns (and sweeps) whose target varies; 0 when none does."""
    r, valid = pearson(pred, target, eps)
    if not bool(valid.any()):
        return (pred * 0).sum()  # keeps the graph (a zero gradient) for callers that backprop
    return (1.0 - r)[valid].mean()


def supervised_loss(pred: torch.Tensor, target: torch.Tensor, *, angle_weight: float = ANGLE_WEIGHT,
                    pearson_weight: float = 1.0, eps: float = 1e-8) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Paper eq. 2 on pred, target [B, L, 6] = (tx, ty, tz mm, ax, ay, az degrees).

    loss = mean|dt| + angle_weight * mean|da| + pearson_weight * mean(1 - r). Returns (loss, parts as
    floats: l1_translation_mm, l1_angle_deg, pearson).
    """
    _check("pred", pred, 6)
    _check("target", target, 6)
    if pred.shape != target.shape:
        raise InputError(f"supervised_loss: pred {list(pred.shape)} and target {list(target.shape)} differ")
    target = target.to(pred.dtype)
    l1_t = (pred[..., :3] - target[..., :3]).abs().mean()
    l1_a = (pred[..., 3:] - target[..., 3:]).abs().mean()
    p = pearson_loss(pred, target, eps) if pred.shape[-2] >= 2 else pred.sum() * 0
    loss = l1_t + angle_weight * l1_a + pearson_weight * p
    return loss, {"l1_translation_mm": float(l1_t.detach()), "l1_angle_deg": float(l1_a.detach()),
                  "pearson": float(p.detach())}


def info_nce(image_features: torch.Tensor, imu_features: torch.Tensor, tau: float = 0.1,
             normalize: bool = True) -> torch.Tensor:
    """Paper eq. 3: InfoNCE between per-pair image features F_I and IMU-acceleration features F_A.

    image_features, imu_features: [L, d] or [B, L, d]. Pair i's positive is F_A[i], its negatives the
    other pairs of the same sweep: loss = -mean_i log softmax_j(F_I[i] . F_A[j] / tau)[i], averaged over
    sweeps. normalize: L2-normalise both first (cosine similarity), so tau = 0.1 sets the sharpness
    whatever the feature scale (with raw dot products tau would have no fixed meaning).
    """
    if image_features.shape != imu_features.shape:
        raise InputError(f"info_nce: F_I {list(image_features.shape)} and F_A {list(imu_features.shape)} differ")
    _check("F_I", image_features)
    if tau <= 0:
        raise InputError(f"info_nce: tau must be > 0, got {tau}")
    fi, fa = image_features, imu_features
    if fi.dim() == 2:
        fi, fa = fi[None], fa[None]
    if normalize:
        fi, fa = F.normalize(fi, dim=-1), F.normalize(fa, dim=-1)
    logits = fi @ fa.transpose(-1, -2) / tau  # [B, L, L]
    b, L, _ = logits.shape
    labels = torch.arange(L, device=logits.device).expand(b, L)
    return F.cross_entropy(logits.reshape(b * L, L), labels.reshape(-1))


def pearson_prior(pred_angles: torch.Tensor, imu_angles: torch.Tensor, weights: torch.Tensor, *,
                  detach_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Paper eq. 4: 1 - Pearson(predicted Euler angles, fusion-weighted mean IMU angle), per axis.

    pred_angles [B, L, 3] (degrees), imu_angles [B, L, M, 3] (each IMU's relative angles, degrees, from
    `imu_pair_inputs`), weights [B, L, M] (the angle fusion weights, `FimaOutput.imu_weights`).
    detach_weights: treat the weighted IMU angle as a pseudo-label (no gradient through the weights),
    so alignment cannot lower the loss by re-weighting the IMUs instead of fixing the angles.
    """
    _check("pred_angles", pred_angles, 3)
    _check("imu_angles", imu_angles, 3, min_dim=3)
    if imu_angles.shape[:-2] != pred_angles.shape[:-1] or weights.shape != imu_angles.shape[:-1]:
        raise InputError(f"pearson_prior: expected pred_angles [B, L, 3], imu_angles [B, L, M, 3] and weights "
                         f"[B, L, M]; got {list(pred_angles.shape)}, {list(imu_angles.shape)}, "
                         f"{list(weights.shape)}")
    w = weights.detach() if detach_weights else weights
    target = (w.unsqueeze(-1) * imu_angles.to(pred_angles.dtype)).sum(-2) / w.sum(-1, keepdim=True)
    return pearson_loss(pred_angles, target, eps)


def alignment_loss(output, imu_angle: torch.Tensor, tau: float = 0.1, *,
                   detach_weights: bool = True) -> Tuple[torch.Tensor, Dict[str, float]]:
    """L_align + L_prior (paper §2.3) of a `FimaOutput` from an IMU variant; imu_angle [B, L, M, 3]."""
    if output.acc_features is None or output.imu_weights is None:
        raise InputError("alignment_loss: the output has no IMU features (an images-only variant)")
    la = info_nce(output.image_features, output.acc_features, tau)
    lp = pearson_prior(output.params[..., 3:], imu_angle, output.imu_weights, detach_weights=detach_weights)
    return la + lp, {"info_nce": float(la.detach()), "prior": float(lp.detach())}
