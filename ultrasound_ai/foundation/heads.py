"""Heads on the ViT encoder: SimMIM-style pixel decoder (pre-training), UPerNet-style segmentation head,
classification head, and the three complete models.

Every model keeps its encoder under the attribute ``encoder``, so encoder weights move between them by
the ``encoder.`` key prefix (pre-trained encoder -> fine-tuning).

Normalisation in the heads is GroupNorm rather than UPerNet's BatchNorm: fine-tuning batches are small
(a few images per process) and GroupNorm does not depend on them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation.vit import VisionTransformer, ViTConfig, vit_config

__all__ = ["SimMIMDecoder", "MaskedImageModel", "UPerNetHead", "SegmentationModel", "ClassificationHead",
           "ClassificationModel", "AttentionPool", "POOLINGS", "feature_blocks", "build_model", "TASKS"]

TASKS = ("pretrain", "segment", "classify")


def feature_blocks(depth: int) -> tuple[int, ...]:
    """0-based blocks feeding the segmentation head: 4/6/8/12 of 12 (BEiT/USFM), the same fractions of
    the depth otherwise (distinct and increasing)."""
    out: list[int] = []
    for frac in (4 / 12, 6 / 12, 8 / 12, 1.0):
        i = max(0, int(round(depth * frac)) - 1)
        if out and i <= out[-1]:
            i = min(depth - 1, out[-1] + 1)
        out.append(i)
    return tuple(out)


class SimMIMDecoder(nn.Module):
    """A linear layer per token predicting its patch's pixels (a 1x1 conv + pixel shuffle)."""

    def __init__(self, embed_dim: int, patch_size: int, out_chans: int):
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, patch_size * patch_size * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(patch_size)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(fmap))


def _freeze_unused(*modules: nn.Module) -> None:
    # Encoder parts a task never calls keep their weights (so encoders move between tasks by key) but
    # take no gradient; DistributedDataParallel would otherwise wait for their gradients forever.
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def _tokens_to_map(enc: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    wh, ww = enc.cfg.grid
    p = tokens[:, enc.num_prefix:]
    return p.transpose(1, 2).reshape(p.shape[0], -1, wh, ww)


class MaskedImageModel(nn.Module):
    """Encoder + SimMIM decoder: reconstructs the full image from the dual-masked input."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.encoder = VisionTransformer(cfg)
        self.decoder = SimMIMDecoder(cfg.embed_dim, cfg.patch_size, cfg.in_chans)
        _freeze_unused(self.encoder.fc_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder.forward_features(x)
        return self.decoder(_tokens_to_map(self.encoder, tokens))


def _conv_gn(cin: int, cout: int, k: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 and cout >= 32 else 1  # >= 2 values per group even on 1x1 maps
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(groups, cout),
                         nn.ReLU(inplace=True))


class UPerNetHead(nn.Module):
    """UPerNet on four ViT block outputs (all at 1/patch resolution).

    The four maps are brought to 4 scales (x4 and x2 up by transposed convolutions, x1, x0.5 by max
    pooling: strides patch/4 .. patch*2 as BEiT does), then a pyramid pooling module on the coarsest, a
    top-down FPN, and a fusion of all levels at the finest scale.
    """

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 64, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        d = embed_dim
        self.rescale = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.GroupNorm(1, d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, 2)),
            nn.ConvTranspose2d(d, d, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, 2),
        ])
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(_conv_gn(d, channels, 1) for _ in self.pool_scales)
        self.ppm_bottleneck = _conv_gn(d + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv_gn(d, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(_conv_gn(channels, channels, 3) for _ in range(3))
        self.fuse = _conv_gn(4 * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: Sequence[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        if len(maps) != 4:
            raise InputError(f"UPerNet head: expected 4 feature maps, got {len(maps)}")
        feats = [op(m) for op, m in zip(self.rescale, maps)]
        last = feats[3]
        pooled = [last]
        for scale, conv in zip(self.pool_scales, self.ppm):
            p = conv(F.adaptive_avg_pool2d(last, scale))
            pooled.append(F.interpolate(p, size=last.shape[-2:], mode="bilinear", align_corners=False))
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:3])] + [self.ppm_bottleneck(torch.cat(pooled, 1))]
        for i in range(3, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        outs = [self.fpn[i](lat[i]) for i in range(3)] + [lat[3]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        logits = self.classifier(self.fuse(torch.cat(outs, 1)))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    def __init__(self, cfg: ViTConfig, num_classes: int = 2, channels: int = 64):
        super().__init__()
        if num_classes < 2:
            raise InputError(f"segmentation num_classes: expected >= 2 (background + structures), got {num_classes}")
        self.encoder = VisionTransformer(cfg)
        self.blocks = feature_blocks(cfg.depth)
        self.head = UPerNetHead(cfg.embed_dim, num_classes, channels)
        _freeze_unused(self.encoder.norm, self.encoder.fc_norm)  # the head reads raw block outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, H, W] at the input's size."""
        _, maps = self.encoder.forward_features(x, return_blocks=self.blocks)
        return self.head(maps, tuple(x.shape[-2:]))


class ClassificationHead(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(pooled))


class AttentionPool(nn.Module):
    """Multi-head attention pooling (a learned query attends over the patch tokens, then an MLP), as in
    the MAP head of big_vision's ViT: a small lesion's tokens can carry the image-level feature instead of
    being averaged with ~60 background tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
        x = x[:, 0]
        return x + self.mlp(self.norm(x))


POOLINGS = ("mean", "attention")


class ClassificationModel(nn.Module):
    """Encoder + linear classifier on pooled patch tokens. pooling "mean": the encoder's mean-pooled,
    fc_norm-ed feature (USFM / BEiT fine-tuning); "attention": an AttentionPool over the final tokens."""

    def __init__(self, cfg: ViTConfig, num_classes: int, dropout: float = 0.0, pooling: str = "mean"):
        super().__init__()
        if num_classes < 2:
            raise InputError(f"classification num_classes: expected >= 2, got {num_classes}")
        if pooling not in POOLINGS:
            raise InputError(f"classification pooling: expected one of {list(POOLINGS)}, got {pooling!r}")
        self.encoder = VisionTransformer(cfg)
        self.pooling = pooling
        self.pool = AttentionPool(cfg.embed_dim, cfg.num_heads) if pooling == "attention" else None
        self.head = ClassificationHead(cfg.embed_dim, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] from the pooled patch tokens."""
        if self.pool is None:
            return self.head(self.encoder(x))
        tokens, _ = self.encoder.forward_features(x)
        return self.head(self.pool(tokens[:, self.encoder.num_prefix:]))


def build_model(configuration: Mapping) -> nn.Module:
    """A model from a card's configuration: {"task", "vit": {...}, "num_classes", "head_channels", ...}."""
    task = configuration.get("task")
    if task not in TASKS:
        raise InputError(f"model configuration task: expected one of {list(TASKS)}, got {task!r}")
    cfg = vit_config(dict(configuration.get("vit") or {}))
    if task == "pretrain":
        return MaskedImageModel(cfg)
    if task == "segment":
        return SegmentationModel(cfg, int(configuration.get("num_classes", 2)), int(configuration.get("head_channels", 64)))
    return ClassificationModel(cfg, int(configuration.get("num_classes", 3)), float(configuration.get("dropout", 0.0)),
                               str(configuration.get("pooling", "mean")))
