"""Vision Transformer encoder of the ultrasound foundation model (USFM).

A BEiT-style ViT: patch embedding, an optional [cls] token, a relative position bias table per block
(no absolute position embedding), LayerScale (init 0.1), stochastic depth increasing linearly with
depth, pre-norm blocks, and mean pooling of the patch tokens for image-level features.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` with the relative bias
passed as an additive ``attn_mask`` (``Attention(..., explicit=True)`` computes the same thing by hand;
the tests check both agree).

Input channels: ultrasound B-mode is grey, so the engine's configs use 1 channel. The "base" preset keeps
USFM's 3 channels (ViT-B/16); 3-channel PNGs are converted to grey by the data loaders (datasets.py),
and a 1-channel image given to a 3-channel model is repeated over the channels (``expand_channels``).

Presets (``vit_config(preset, **overrides)``)::

    base   768 dim, 12 blocks, 12 heads, patch 16, 224 px, 3 ch   (~86 M parameters, USFM)
    small  384 dim, 12 blocks,  6 heads, patch 16, 224 px, 1 ch
    tiny   192 dim, 12 blocks,  3 heads, patch 16, 128 px, 1 ch   (the shipped CPU model)
    micro   32 dim,  4 blocks,  2 heads, patch  8,  32 px, 1 ch   (tests)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ultrasound_ai.core.errors import InputError

__all__ = ["VIT_PRESETS", "ViTConfig", "vit_config", "VisionTransformer", "Attention", "RelativePositionBias",
           "DropPath", "count_parameters"]

VIT_PRESETS: dict[str, dict] = {
    "base": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, img_size=224, in_chans=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, img_size=224, in_chans=1),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16, img_size=128, in_chans=1),
    "micro": dict(embed_dim=32, depth=4, num_heads=2, patch_size=8, img_size=32, in_chans=1),
}


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_cls_token: bool = False
    layerscale_init: float = 0.1
    drop_path: float = 0.1
    preset: str | None = None

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"ViT config {name}: expected a positive integer, got {v!r}")
        if self.img_size % self.patch_size:
            raise InputError(f"ViT config: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise InputError(f"ViT config: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= float(self.drop_path) < 1.0:
            raise InputError(f"ViT config drop_path: expected a number in [0, 1), got {self.drop_path!r}")

    @property
    def grid(self) -> tuple[int, int]:
        n = self.img_size // self.patch_size
        return (n, n)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """The fields that decide the weights' shapes and meaning (drop_path is a training setting)."""
        d = self.to_dict()
        d.pop("drop_path")
        d.pop("preset")
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"ViT config: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(d))


def vit_config(preset: str | Mapping | ViTConfig = "tiny", **overrides) -> ViTConfig:
    """A ViTConfig from a preset name (or a mapping with an optional "preset" key) plus overrides."""
    if isinstance(preset, ViTConfig):
        return dataclasses.replace(preset, **overrides) if overrides else preset
    if isinstance(preset, Mapping):
        fields = dict(preset)
        name = fields.pop("preset", None) or "tiny"
        return vit_config(name, **{**fields, **overrides})
    if preset not in VIT_PRESETS:
        raise InputError(f"ViT preset {preset!r}: unknown; expected one of {list(VIT_PRESETS)}")
    fields = {**VIT_PRESETS[preset], **overrides}
    fields.setdefault("preset", preset)
    return ViTConfig.from_dict(fields)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample, rescaling the kept ones."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class RelativePositionBias(nn.Module):
    """BEiT relative position bias for a Wh x Ww patch grid (+ [cls]).

    The table has (2Wh-1)(2Ww-1) entries for patch pairs, plus 3 with a [cls] token (cls->patch,
    patch->cls, cls->cls). forward() returns the [heads, N, N] bias added to the attention logits.
    """

    def __init__(self, grid: tuple[int, int], num_heads: int, use_cls_token: bool):
        super().__init__()
        wh, ww = grid
        n_rel = (2 * wh - 1) * (2 * ww - 1)
        self.num_extra = 3 if use_cls_token else 0
        self.table = nn.Parameter(torch.zeros(n_rel + self.num_extra, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # [2, N]
        rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
        # Shift to start at 0 and flatten (dy, dx) to one index.
        index = (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)
        if use_cls_token:
            n = wh * ww + 1
            full = torch.empty(n, n, dtype=torch.long)
            full[1:, 1:] = index
            full[0, 1:] = n_rel  # cls -> patch
            full[1:, 0] = n_rel + 1  # patch -> cls
            full[0, 0] = n_rel + 2
            index = full
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, explicit: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, hd]
        mask = None if bias is None else bias.unsqueeze(0).to(q.dtype)
        if explicit:
            logits = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            if mask is not None:
                logits = logits + mask
            out = logits.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.rel_pos_bias = RelativePositionBias(cfg.grid, cfg.num_heads, cfg.use_cls_token)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # LayerScale: each residual branch starts small, which keeps deep ViTs stable early in training.
        self.gamma1 = nn.Parameter(torch.full((dim,), float(cfg.layerscale_init)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(cfg.layerscale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, explicit: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x), self.rel_pos_bias(), explicit=explicit))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """forward(x [B, C, H, W]) -> mean-pooled features [B, D]; forward_features returns tokens and
    the outputs of chosen blocks as [B, D, Wh, Ww] maps (for the segmentation head)."""

    def __init__(self, cfg: ViTConfig | Mapping | str = "tiny"):
        super().__init__()
        cfg = cfg if isinstance(cfg, ViTConfig) else vit_config(cfg)
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.use_cls_token else None
        # Stochastic depth grows linearly from 0 (first block) to drop_path (last block).
        rates = [cfg.drop_path * i / (cfg.depth - 1) for i in range(cfg.depth)] if cfg.depth > 1 else [cfg.drop_path]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=1e-6)  # on the token sequence (MIM decoder input)
        self.fc_norm = nn.LayerNorm(d, eps=1e-6)  # on the mean-pooled feature
        self.apply(self._init)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_prefix(self) -> int:
        return 1 if self.cls_token is not None else 0

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4:
            raise InputError(f"ViT input: expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, cfg.in_chans, -1, -1)  # grey image into a 3-channel model
            else:
                raise InputError(f"ViT input: expected {cfg.in_chans} channel(s), got {x.shape[1]}")
        if tuple(x.shape[-2:]) != (cfg.img_size, cfg.img_size):
            raise InputError(f"ViT input: expected {cfg.img_size}x{cfg.img_size} pixels, got "
                             f"{x.shape[-2]}x{x.shape[-1]} (resize to the model's input size first)")
        return x

    def forward_features(self, x: torch.Tensor, return_blocks: Sequence[int] = (), explicit: bool = False
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens after the final norm [B, prefix + N, D] and the patch-token maps [B, D, Wh, Ww] of the
        blocks listed in `return_blocks` (0-based block indices)."""
        x = self._check_input(x)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        wanted = set(int(i) for i in return_blocks)
        maps = []
        wh, ww = self.cfg.grid
        for i, block in enumerate(self.blocks):
            x = block(x, explicit=explicit)
            if i in wanted:
                p = x[:, self.num_prefix:]
                maps.append(p.transpose(1, 2).reshape(x.shape[0], -1, wh, ww))
        return self.norm(x), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.forward_features(x)
        return self.fc_norm(tokens[:, self.num_prefix:].mean(dim=1))

    def no_weight_decay_names(self) -> set[str]:
        """Parameters kept out of weight decay: biases, norms, LayerScale, bias tables, [cls]."""
        names = set()
        for name, p in self.named_parameters():
            if p.ndim <= 1 or name.endswith(".table") or name == "cls_token":
                names.add(name)
        return names

    def layer_id(self, name: str) -> int:
        """0 for the embedding, i + 1 for block i, depth + 1 for the final norms (layer-wise lr decay)."""
        if name.startswith(("patch_embed", "cls_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1
