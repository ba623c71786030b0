"""MoGLo-Net's training losses (facts: the paper and the authors' public code).

All three work on *normalised* parameters ``(p - mean) / std`` (the network's raw outputs and the targets
normalised with the same buffers), as the authors train on scaled targets:

- ``weighted_l1``: mean |pred - y|, each term optionally weighted by (|y| + smooth) ** beta (the authors'
  "MMAE": larger motions weigh more, smooth = 2, beta = 1 in their training script).
- ``cosine_loss``: 1 - cosine similarity between the whole flattened prediction and target (one number
  per batch: it rewards getting the direction of the 6-DOF motion vectors right, whatever their scale).
- ``triplet_loss`` (margin 0.1, weight 0.005 in the total): for every triple (a, j, k) of distinct clips of
  the batch (their *last* pair's embedding and target, as the authors do), the anchor is a, the
  positive is whichever of j, k has the target motion closer to a's in cosine distance (1 - cos), the
  negative the other; loss = relu(d(a, pos) - d(a, neg) + margin) with d the Euclidean distance between
  embeddings, averaged over the triples. Triples whose two cosine distances tie contribute relu(margin)
  with no gradient direction (sign 0), as in the authors' code. Needs a batch of >= 3 clips (0 otherwise).
- ``moglo_loss``: the total for the two heads: mean over heads of (L1 + cosine) + 0.005 * triplet.
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ultrasound_ai.core.errors import InputError

__all__ = ["weighted_l1", "cosine_loss", "triplet_loss", "moglo_loss", "TRIPLET_MARGIN", "TRIPLET_WEIGHT"]

TRIPLET_MARGIN = 0.1
TRIPLET_WEIGHT = 0.005


def _check_pair(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if pred.shape != target.shape or pred.shape[-1] != 6:
        raise InputError(f"{what}: prediction {list(pred.shape)} and target {list(target.shape)} must have "
                         f"one shape [..., 6]")


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, *, weighted: bool = True, smooth: float = 2.0,
                beta: float = 1.0) -> torch.Tensor:
    """Mean absolute error, each element weighted by (|target| + smooth) ** beta when `weighted`."""
    _check_pair(pred, target, "weighted_l1")
    err = (pred - target).abs()
    if weighted:
        err = err * (target.abs() + smooth) ** beta
    return err.mean()


def cosine_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - cos(pred.flatten(), target.flatten())."""
    _check_pair(pred, target, "cosine_loss")
    return 1.0 - F.cosine_similarity(pred.reshape(1, -1), target.reshape(1, -1), dim=1, eps=eps)[0]


def triplet_loss(embedding: torch.Tensor, target: torch.Tensor, margin: float = TRIPLET_MARGIN,
                 max_triples: Optional[int] = 256, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Triplet loss on per-clip embeddings [B, D] and targets [B, 6] (see the module docstring).

    With more than `max_triples` triples, a random subset is used (drawn from `generator`).
    """
    if embedding.dim() != 2 or target.dim() != 2 or embedding.shape[0] != target.shape[0] or target.shape[1] != 6:
        raise InputError(f"triplet_loss: expected embedding [B, D] and target [B, 6], got "
                         f"{list(embedding.shape)} and {list(target.shape)}")
    b = embedding.shape[0]
    if b < 3:
        return embedding.sum() * 0.0
    triples = torch.tensor(list(combinations(range(b), 3)), device=embedding.device)
    if max_triples is not None and len(triples) > max_triples:
        pick = torch.randperm(len(triples), generator=generator)[:max_triples].to(embedding.device)
        triples = triples[pick]
    a, j, k = triples[:, 0], triples[:, 1], triples[:, 2]
    tdist = lambda u, v: 1.0 - F.cosine_similarity(target[u], target[v], dim=-1, eps=1e-8)  # noqa: E731
    sign = torch.sign(tdist(a, k) - tdist(a, j))  # +1: j is the positive, -1: k is
    edist = lambda u, v: (embedding[u] - embedding[v]).norm(dim=-1)  # noqa: E731
    return F.relu(sign * (edist(a, j) - edist(a, k)) + margin).mean()


def moglo_loss(local_raw: torch.Tensor, global_raw: torch.Tensor, target: torch.Tensor,
               embedding: torch.Tensor, *, weighted: bool = True, triplet_weight: float = TRIPLET_WEIGHT,
               margin: float = TRIPLET_MARGIN, generator: Optional[torch.Generator] = None) -> Mapping[str, torch.Tensor]:
    """The total loss for one batch.

    local_raw, global_raw, target: normalised [B, S, 6]; embedding: [B, S, D]. Returns a dict of scalar
    tensors: "loss" (back-propagated), "l1", "cosine", "triplet".
    """
    _check_pair(local_raw, target, "moglo_loss (local head)")
    _check_pair(global_raw, target, "moglo_loss (global head)")
    if embedding.dim() != 3 or embedding.shape[:2] != target.shape[:2]:
        raise InputError(f"moglo_loss: embedding must be [B, S, D] matching target {list(target.shape)}, got "
                         f"{list(embedding.shape)}")
    l1 = 0.5 * (weighted_l1(local_raw, target, weighted=weighted) + weighted_l1(global_raw, target, weighted=weighted))
    cos = 0.5 * (cosine_loss(local_raw, target) + cosine_loss(global_raw, target))
    tri = triplet_loss(embedding[:, -1], target[:, -1], margin=margin, generator=generator)
    return {"loss": l1 + cos + triplet_weight * tri, "l1": l1.detach(), "cosine": cos.detach(), "triplet": tri.detach()}
