"""FiMA's network: ReMamba (ResNet-18 + multi-directional selective scans) with adaptive multi-IMU fusion.

Yan et al., MICCAI 2024 (facts from the paper and its public code). One code path serves the paper's
ablations (`VARIANTS`): ReM' (plain one-direction Mamba), ReM (ReMamba, images only), ReM+F' (IMUs mapped
by a linear layer and concatenated), ReM+F (adaptive fusion) and FiMA (ReM+F; its online alignment is a
test-time procedure run by the caller with `fima.losses`).

Data flow for a batch of B sweep windows of N frames (L = N - 1 frame pairs)::

    frames [B, N, H, W] (0..255) -> pairs (i, i+1) as 2 channels, scaled to [-1, 1]
    stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) -> stage k = 1..4 (BasicBlocks, widths w, 2w, 4w, 8w)
      after each stage a ReMamba block:
        SSM-F on tokens of (B, L, C, H, W): LayerNorm -> in_proj (x, z) -> conv1d+SiLU+scan in the
              L->H->W and L->W->H orders (separate parameters), gated by SiLU(z), summed -> out_proj,
              residual add; the result feeds the next stage
        SSM-C on the stage output pooled to (B, L, C) + the previous SSM-C output linearly resized
              along channels: forward Mamba + time-reversed Mamba (separate parameters), summed
    F_I = pool(stage-4 output after SSM-F) + sum_k resize(SSM-C_k)        image features [B, L, C4]
    fusion(F_I, IMU acc, IMU angle) -> bidirectional SSM-C with residual -> Linear -> [B, L, 6]

Output per frame pair i: (tx, ty, tz) in mm and (ax, ay, az) in degrees of T_{i<-i+1} = inv(T_i) @ T_{i+1}
(frame i+1's image-mm coordinates -> frame i's), with the angles in geometry's static "xyz" convention:
``geometry.params_to_matrix(params, "xyz", degrees=True)`` rebuilds the 4x4 matrices and
``geometry.chain_relative`` the poses.

IMU inputs per frame pair (`imu_pair_inputs`), for M >= 1 IMUs: the mean specific force of frames i and
i+1 in m/s^2 and each IMU's relative rotation R_i^T R_{i+1} as static-xyz
Euler angles in degrees. IMU axes are the image axes (docs/DATA_FORMATS.md), so the relative rotation is directly
comparable with the predicted angles; it is what the Pearson prior of online alignment uses. The
network divides them by the config's `imu_acc_unit_m_s2` and `imu_angle_unit_deg` before the fusion.

Split for online alignment: `encode(frames)` (CNN + SSM-F: the expensive part) returns `FimaFeatures`
(the pooled stage outputs and the pooled final map); `decode(features, imu_acc, imu_angle)` runs the
coarse SSM-C chain, fusion and head. `forward` = decode(encode(...)). An aligner caches `encode`'s result
and adapts the SSM-C, fusion and head parameters (`decoder_parameters()`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.nn.mamba import Mamba, ScanBranch, ScanState

__all__ = [
    "FimaConfig",
    "PRESETS",
    "VARIANTS",
    "make_config",
    "FimaNet",
    "FimaFeatures",
    "FimaOutput",
    "AdaptiveImuFusion",
    "LinearImuFusion",
    "SSMF",
    "SSMC",
    "ReMambaBlock",
    "imu_pair_inputs",
    "frame_pairs",
    "count_parameters",
]

GRAVITY_M_S2 = 9.81


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FimaConfig:
    """Everything that fixes the network's shape (stored in model cards via `to_dict`).

    frame_shape: (H, W) pixels the network was built and trained for; pixel_spacing_mm the isotropic
    spacing it expects (inference resamples to it). window_frames: (min, max) sweep-window lengths used
    in training. fusion: "none" (images only), "linear" (ReM+F': needs exactly n_imus IMUs) or
    "adaptive" (ReM+F / FiMA: any M >= 1). ssmf_orders: scan orders of SSM-F, ("row", "col") for ReMamba
    or ("row",) for ReM'. ssmc_bidirectional: forward + time-reversed SSM-C, or forward only (ReM').
    """

    variant: str = "fima"
    base_width: int = 64
    blocks: Tuple[int, int, int, int] = (2, 2, 2, 2)
    frame_shape: Tuple[int, int] = (248, 260)
    pixel_spacing_mm: float = 0.15
    window_frames: Tuple[int, int] = (60, 180)
    d_state_f: int = 16
    d_state_c: int = 16
    expand: int = 2
    d_conv: int = 4
    ssmf_orders: Tuple[str, ...] = ("row", "col")
    ssmc_bidirectional: bool = True
    ssmc_residual: bool = True
    fusion: str = "adaptive"
    n_imus: int = 4
    fusion_heads: int = 8
    fusion_ffn_mult: int = 2
    # Units the IMU inputs are divided by before the fusion (the pre-processing the paper takes from
    # MoNet): a relative rotation between frames is a fraction of a degree, and fed raw it is too small
    # against the image features for the fusion to learn to pass it on.
    imu_acc_unit_m_s2: float = GRAVITY_M_S2
    imu_angle_unit_deg: float = 0.25
    # IMU orientation prior (not in the paper): the pair's rotation is the IMUs' relative rotation (mean over
    # the IMUs) plus a learned residual, and that rotation is also fed to the translation head. The IMUs
    # measure rotation almost exactly; the paper's fusion had to relearn it and lost most of it.
    imu_rotation_prior: bool = False
    # Inference: the pair's rotation is the IMUs' relative rotation (mean over the IMUs), whatever the head
    # predicts (for a prior model: the learned residual dropped). The chained rotation then follows the IMUs
    # (their noise telescopes) instead of accumulating the head's small per-pair angle errors (issue 15:
    # MEA 7.2 deg on freehand-indep-v1 with the head's angles). Translation is still the network's.
    rotation_from_imus: bool = False
    online_alignment: bool = True
    chunk_size: int = 64
    scan_backend: str = "auto"

    def __post_init__(self):
        if self.fusion not in ("none", "linear", "adaptive"):
            raise InputError(f"FimaConfig.fusion must be 'none', 'linear' or 'adaptive', got {self.fusion!r}")
        if not self.ssmf_orders or any(o not in ("row", "col") for o in self.ssmf_orders):
            raise InputError(f"FimaConfig.ssmf_orders must be a non-empty subset of ('row', 'col'), "
                             f"got {self.ssmf_orders!r}")
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise InputError(f"FimaConfig.blocks must be 4 positive block counts, got {self.blocks!r}")
        if self.base_width < 1 or self.n_imus < 1:
            raise InputError("FimaConfig: base_width and n_imus must be >= 1")
        if not (self.imu_acc_unit_m_s2 > 0 and self.imu_angle_unit_deg > 0):
            raise InputError(f"FimaConfig: imu_acc_unit_m_s2 and imu_angle_unit_deg must be > 0, got "
                             f"{self.imu_acc_unit_m_s2} and {self.imu_angle_unit_deg}")
        if (8 * self.base_width) % self.fusion_heads:
            raise InputError(f"FimaConfig: fusion_heads={self.fusion_heads} must divide the stage-4 width "
                             f"{8 * self.base_width}")

    @property
    def widths(self) -> Tuple[int, int, int, int]:
        w = self.base_width
        return (w, 2 * w, 4 * w, 8 * w)

    @property
    def feature_dim(self) -> int:
        """Width of the image features F_I (and of the IMU features F_A)."""
        return 8 * self.base_width

    @property
    def uses_imus(self) -> bool:
        return self.fusion != "none"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FimaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"FimaConfig: unknown fields {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


PRESETS = {
    # The paper: full ResNet-18 widths, 248x260 frames at 0.15 mm, 60-180-frame sequences, 4 IMUs.
    "paper": dict(base_width=64, blocks=(2, 2, 2, 2), frame_shape=(248, 260), pixel_spacing_mm=0.15,
                  window_frames=(60, 180), d_state_f=16, d_state_c=16, fusion_heads=8),
    # What trains on CPU here: half width on 124x130 frames at 0.3 mm, 32-64-frame windows.
    "shipped": dict(base_width=32, blocks=(2, 2, 2, 2), frame_shape=(124, 130), pixel_spacing_mm=0.3,
                    window_frames=(32, 64), d_state_f=8, d_state_c=16, fusion_heads=4),
    # Tests: about 80k parameters, 32x36 frames.
    "tiny": dict(base_width=4, blocks=(1, 1, 1, 1), frame_shape=(32, 36), pixel_spacing_mm=0.6,
                 window_frames=(8, 16), d_state_f=4, d_state_c=4, fusion_heads=2, fusion_ffn_mult=1),
}

# The paper's ablations (Table 1) as configuration differences.
VARIANTS = {
    "rem-prime": dict(ssmf_orders=("row",), ssmc_bidirectional=False, fusion="none", online_alignment=False),
    "rem": dict(fusion="none", online_alignment=False),
    "rem-f-prime": dict(fusion="linear", online_alignment=False),
    "rem-f": dict(fusion="adaptive", online_alignment=False),
    "fima": dict(fusion="adaptive", online_alignment=True),
}
_VARIANT_ALIASES = {"rem'": "rem-prime", "rem_prime": "rem-prime", "remp": "rem-prime",
                    "rem+f'": "rem-f-prime", "rem_f_prime": "rem-f-prime", "remfp": "rem-f-prime",
                    "rem+f": "rem-f", "rem_f": "rem-f", "remf": "rem-f"}


def make_config(preset: str = "shipped", variant: str = "fima", **overrides) -> FimaConfig:
    """A FimaConfig from a size preset ("paper", "shipped", "tiny") and an ablation variant.

    Variants: "rem-prime" (ReM'), "rem", "rem-f-prime" (ReM+F'), "rem-f" (ReM+F), "fima"; the paper's
    spellings ("rem'", "rem+f'", "rem+f") are accepted too. Keyword overrides win over both.
    """
    if preset not in PRESETS:
        raise InputError(f"FiMA preset must be one of {sorted(PRESETS)}, got {preset!r}")
    key = _VARIANT_ALIASES.get(str(variant).lower(), str(variant).lower())
    if key not in VARIANTS:
        raise InputError(f"FiMA variant must be one of {sorted(VARIANTS)} (or rem', rem+f', rem+f), "
                         f"got {variant!r}")
    return FimaConfig(variant=key, **{**PRESETS[preset], **VARIANTS[key], **overrides})


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def frame_pairs(frames: torch.Tensor) -> torch.Tensor:
    """frames [B, N, H, W] in 0..255 (uint8 or float) -> pairs [B*(N-1), 2, H, W] scaled to [-1, 1]."""
    x = frames.float() * (2.0 / 255.0) - 1.0
    b, n, h, w = x.shape
    return torch.stack([x[:, :-1], x[:, 1:]], dim=2).reshape(b * (n - 1), 2, h, w)


def imu_pair_inputs(imu_acc, imu_euler_deg) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-frame-pair IMU inputs from the sweep contract's IMU arrays.

    imu_acc, imu_euler_deg: [M, N, 3] (one sweep) or [B, M, N, 3], numpy or torch: specific force in
    m/s^2 and static-xyz Euler angles in degrees, per IMU and frame.
    Returns float32 tensors acc [.., N-1, M, 3] (mean of frames i and i+1, m/s^2) and angle
    [.., N-1, M, 3] (relative rotation R_i^T R_{i+1} of each IMU, static-xyz Euler degrees: the same
    quantity and convention as the network's predicted angles).
    """
    from ultrasound_ai.core.geometry import euler_to_matrix, matrix_to_euler

    acc = torch.as_tensor(np.asarray(imu_acc) if not isinstance(imu_acc, torch.Tensor) else imu_acc)
    eul = torch.as_tensor(np.asarray(imu_euler_deg) if not isinstance(imu_euler_deg, torch.Tensor)
                          else imu_euler_deg)
    for name, t in (("imu_acc", acc), ("imu_euler_deg", eul)):
        if t.dim() not in (3, 4) or t.shape[-1] != 3 or t.shape[-2] < 2:
            raise InputError(f"{name}: expected [M, N, 3] or [B, M, N, 3] with N >= 2, got {list(t.shape)}")
        if not torch.isfinite(t).all():
            raise InputError(f"{name}: contains NaN or infinite values")
    if acc.shape != eul.shape:
        raise InputError(f"imu_acc {list(acc.shape)} and imu_euler_deg {list(eul.shape)} must have one shape")
    acc64, eul64 = acc.double(), eul.double()
    pair_acc = 0.5 * (acc64[..., :-1, :] + acc64[..., 1:, :])
    R = euler_to_matrix(eul64, "xyz", degrees=True)  # [.., M, N, 3, 3]
    rel = R[..., :-1, :, :].transpose(-1, -2) @ R[..., 1:, :, :]
    pair_ang = matrix_to_euler(rel, "xyz", degrees=True)
    # [.., M, N-1, 3] -> [.., N-1, M, 3]
    return pair_acc.transpose(-2, -3).float().contiguous(), pair_ang.transpose(-2, -3).float().contiguous()


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _resize_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """[B, L, C'] -> [B, L, c] by linear interpolation along the channel axis (the coarse path's resize)."""
    if x.shape[-1] == c:
        return x
    b, L, c0 = x.shape
    return F.interpolate(x.reshape(b * L, 1, c0), size=c, mode="linear", align_corners=False).reshape(b, L, c)


class SSMF(nn.Module):
    """Fine-grained multi-directional SSM on feature maps [B, L, C, H, W] -> same shape (residual)."""

    def __init__(self, channels: int, cfg: FimaConfig):
        super().__init__()
        d_inner = cfg.expand * channels
        self.norm = nn.LayerNorm(channels)
        self.in_proj = nn.Linear(channels, 2 * d_inner, bias=False)
        dt_rank = math.ceil(channels / 16)
        self.scans = nn.ModuleDict({o: ScanBranch(d_inner, cfg.d_state_f, cfg.d_conv, dt_rank)
                                    for o in cfg.ssmf_orders})
        for branch in self.scans.values():
            branch.backend, branch.chunk_size = cfg.scan_backend, cfg.chunk_size
        self.out_proj = nn.Linear(d_inner, channels, bias=False)

    def forward(self, feat: torch.Tensor, state: Optional[Dict[str, ScanState]] = None,
                return_state: bool = False):
        """feat [B, L, C, H, W] -> same shape (residual).

        Both scan orders run pair-major (L outermost), so the pairs of a window can come in pieces: with
        return_state the scans' `ScanState` per order comes back too, and passing it as `state` with the
        next pairs continues the scans, giving the output of one call on all the pairs.
        """
        b, L, c, h, w = feat.shape
        tokens = feat.permute(0, 1, 3, 4, 2).reshape(b, L * h * w, c)  # row-major L -> H -> W
        x, z = self.in_proj(self.norm(tokens)).transpose(1, 2).chunk(2, dim=1)  # [B, d, T] each
        d = x.shape[1]
        y, new_state = None, {}
        for order, branch in self.scans.items():
            previous = None if state is None else state[order]
            if order == "row":  # SiLU(z) gating inside the scan
                out = branch(x.contiguous(), z.contiguous(), state=previous, return_state=return_state)
            else:  # column-major L -> W -> H: permute, scan, permute back (gating is elementwise)
                def col(t):
                    return t.reshape(b, d, L, h, w).transpose(-1, -2).reshape(b, d, L * w * h)

                out = branch(col(x), col(z), state=previous, return_state=return_state)
            if return_state:
                out, new_state[order] = out
            if order != "row":
                out = out.reshape(b, d, L, w, h).transpose(-1, -2).reshape(b, d, L * h * w)
            y = out if y is None else y + out
        y = self.out_proj(y.transpose(1, 2))  # [B, T, C]
        out = feat + y.reshape(b, L, h, w, c).permute(0, 1, 4, 2, 3)
        return (out, new_state) if return_state else out


class SSMC(nn.Module):
    """Coarse temporal SSM on [B, L, C]: LayerNorm, forward Mamba (+ time-reversed Mamba), summed."""

    def __init__(self, channels: int, cfg: FimaConfig, residual: bool, bidirectional: Optional[bool] = None):
        super().__init__()
        bidirectional = cfg.ssmc_bidirectional if bidirectional is None else bidirectional
        self.norm = nn.LayerNorm(channels)

        def mamba():
            return Mamba(channels, d_state=cfg.d_state_c, d_conv=cfg.d_conv, expand=cfg.expand,
                         backend=cfg.scan_backend, chunk_size=cfg.chunk_size)

        self.forward_scan = mamba()
        self.backward_scan = mamba() if bidirectional else None
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        y = self.forward_scan(h)
        if self.backward_scan is not None:
            y = y + self.backward_scan(h.flip(1)).flip(1)
        return x + y if self.residual else y


class ReMambaBlock(nn.Module):
    """SSM-F on a stage's feature maps and SSM-C on their pooled sequence plus the previous coarse output."""

    def __init__(self, channels: int, cfg: FimaConfig):
        super().__init__()
        self.ssm_f = SSMF(channels, cfg)
        self.ssm_c = SSMC(channels, cfg, residual=cfg.ssmc_residual)

    def coarse(self, pooled: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        """pooled [B, L, C] (+ previous SSM-C output [B, L, C'] resized to C) -> SSM-C output [B, L, C]."""
        if previous is not None:
            pooled = pooled + _resize_channels(previous, pooled.shape[-1])
        return self.ssm_c(pooled)


class AdaptiveImuFusion(nn.Module):
    """Adaptive multi-IMU fusion (paper Fig. 4) for any number M >= 1 of IMUs.

    For each modality (acceleration, angle): every IMU's 3-vector is projected by two linear layers,
    shared by the IMUs (so M may change, e.g. when the user leaves an IMU out), to a "motion
    characteristic" key and a "detail" value in the image-feature space. The affinity of the image
    features (projected to a query) with each IMU's key, softmax over the M IMUs, weights the values:
    F_mod [B, L, d]. A multi-head attention over time with the image features as queries fuses each
    F_mod; the two results are added to the image features, then a feed-forward network follows.
    The weighted values F_mod themselves are added too: attention without positions pools over the
    window, and the skip keeps each frame pair's own IMU reading (its relative rotation) in reach.
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int = 2):
        super().__init__()
        self.dim = dim
        self.query = nn.ModuleDict({m: nn.Linear(dim, dim) for m in ("acc", "ang")})
        self.key = nn.ModuleDict({m: nn.Linear(3, dim) for m in ("acc", "ang")})
        self.value = nn.ModuleDict({m: nn.Linear(3, dim) for m in ("acc", "ang")})
        self.attn = nn.ModuleDict({m: nn.MultiheadAttention(dim, heads, batch_first=True)
                                   for m in ("acc", "ang")})
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def weighted(self, mod: str, image: torch.Tensor, imu: torch.Tensor):
        """image [B, L, d], imu [B, L, M, 3] -> (weighted values [B, L, d], weights [B, L, M])."""
        q = self.query[mod](image)  # [B, L, d]
        k = self.key[mod](imu)  # [B, L, M, d]
        v = self.value[mod](imu)
        w = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.dim), dim=-1)  # [B, L, M]
        return (w.unsqueeze(-1) * v).sum(-2), w

    def forward(self, image: torch.Tensor, acc: torch.Tensor, ang: torch.Tensor):
        """image [B, L, d]; acc [B, L, M, 3] and ang [B, L, M, 3] in the config's IMU units.

        Returns (fused [B, L, d], F_A [B, L, d], acc weights [B, L, M], angle weights [B, L, M]).
        """
        fa, wa = self.weighted("acc", image, acc)
        fr, wr = self.weighted("ang", image, ang)
        att_a = self.attn["acc"](image, fa, fa, need_weights=False)[0]
        att_r = self.attn["ang"](image, fr, fr, need_weights=False)[0]
        x = self.norm1(image + fa + fr + att_a + att_r)
        return self.norm2(x + self.ffn(x)), fa, wa, wr


class LinearImuFusion(nn.Module):
    """ReM+F': all IMUs' (acc, angle) of a pair mapped by one linear layer and concatenated with F_I."""

    def __init__(self, dim: int, n_imus: int):
        super().__init__()
        self.n_imus = n_imus
        self.imu_proj = nn.Linear(6 * n_imus, dim)
        self.merge = nn.Linear(2 * dim, dim)

    def forward(self, image, acc, ang):
        m = acc.shape[-2]
        if m != self.n_imus:
            raise InputError(f"ReM+F' was built for {self.n_imus} IMUs; got {m} (its linear map fixes M)")
        f = self.imu_proj(torch.cat([acc, ang], dim=-1).flatten(-2))
        fused = self.merge(torch.cat([image, f], dim=-1))
        uniform = acc.new_full(acc.shape[:-1], 1.0 / m)  # no adaptive weights: every IMU counts the same
        return fused, f, uniform, uniform


# ------------------------------------------------------------------------------------------------
# the network
# ------------------------------------------------------------------------------------------------


@dataclass
class FimaFeatures:
    """What `FimaNet.encode` computes (cacheable for online alignment).

    pooled: per stage k, the stage output before SSM-F, average-pooled: [B, L, C_k] (the SSM-C inputs).
    final: the stage-4 output after SSM-F, average-pooled: [B, L, C4].
    """

    pooled: List[torch.Tensor]
    final: torch.Tensor

    def detach(self) -> "FimaFeatures":
        return FimaFeatures([p.detach() for p in self.pooled], self.final.detach())


@dataclass
class FimaOutput:
    """params [B, L, 6]: (tx, ty, tz) mm, (ax, ay, az) degrees of T_{i<-i+1} (static xyz).
    image_features F_I [B, L, d]; acc_features F_A [B, L, d] (None without IMUs): the InfoNCE pair.
    imu_weights [B, L, M]: the angle fusion weights (the estimate's `imu_weights`, the prior's weights);
    acc_weights [B, L, M]: the acceleration fusion weights. Both None without IMUs.
    """

    params: torch.Tensor
    image_features: torch.Tensor
    acc_features: Optional[torch.Tensor] = None
    imu_weights: Optional[torch.Tensor] = None
    acc_weights: Optional[torch.Tensor] = None


class FimaNet(nn.Module):
    """ReMamba + IMU fusion + head (module docstring). Build with `FimaNet(make_config(...))`."""

    def __init__(self, cfg: FimaConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        self.stem = nn.Sequential(nn.Conv2d(2, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, c_in = [], w[0]
        for k, (c, n) in enumerate(zip(w, cfg.blocks)):
            blocks = [BasicBlock(c_in, c, 1 if k == 0 else 2)] + [BasicBlock(c, c) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.remamba = nn.ModuleList([ReMambaBlock(c, cfg) for c in w])
        d = cfg.feature_dim
        if cfg.fusion == "adaptive":
            self.fusion = AdaptiveImuFusion(d, cfg.fusion_heads, cfg.fusion_ffn_mult)
        elif cfg.fusion == "linear":
            self.fusion = LinearImuFusion(d, cfg.n_imus)
        else:
            self.fusion = None
        self.head_ssm = SSMC(d, cfg, residual=True, bidirectional=True)
        self.head = nn.Linear(d, 6)
        self.prior_to_translation = None
        if cfg.imu_rotation_prior and self.fusion is not None:
            self.prior_to_translation = nn.Linear(3, 3)
            with torch.no_grad():  # the angle outputs start as a zero residual on the IMU rotation
                self.head.weight[3:].zero_()
                self.head.bias[3:].zero_()

    # -- the expensive part ------------------------------------------------------------------------

    def encode(self, frames: torch.Tensor, pair_chunk: Optional[int] = None) -> FimaFeatures:
        """frames [B, N, H, W] (0..255) -> FimaFeatures for the L = N - 1 pairs.

        pair_chunk: stream the window through the encoder this many frame pairs at a time (bounds the
        memory of no_grad inference on long windows): the stem, the stages and SSM-F see one chunk of
        pairs, SSM-F's scan and convolution states carried from chunk to chunk, which gives the features
        of one pass over the whole window (in eval mode; batch norm in training mode sees chunk statistics).
        """
        self._check_frames(frames)
        b, n = frames.shape[:2]
        L = n - 1
        if not pair_chunk or pair_chunk >= L:
            return self._encode_pairs(frames)
        states = [None] * len(self.remamba)
        pieces = []
        for i in range(0, L, pair_chunk):  # frames i .. i+k hold the pairs i .. i+k-1
            piece, states = self._encode_pairs(frames[:, i:min(i + pair_chunk, L) + 1], states)
            pieces.append(piece)
        return FimaFeatures([torch.cat([p.pooled[k] for p in pieces], dim=1) for k in range(len(self.remamba))],
                            torch.cat([p.final for p in pieces], dim=1))

    def _encode_pairs(self, frames: torch.Tensor, states: Optional[list] = None):
        """The encoder on the pairs of frames [B, n, H, W]. With `states` (one SSM-F state per stage, None
        at a window's start) it continues a window and returns (features, the states after these pairs)."""
        b, L = frames.shape[0], frames.shape[1] - 1
        x = self.stem(frame_pairs(frames))  # [B*L, C, h, w]
        pooled, after = [], []
        for k, (stage, block) in enumerate(zip(self.stages, self.remamba)):
            x = stage(x)
            c, h, w = x.shape[1:]
            pooled.append(x.mean(dim=(-1, -2)).reshape(b, L, c))
            if states is None:
                x = block.ssm_f(x.reshape(b, L, c, h, w))
            else:
                x, state = block.ssm_f(x.reshape(b, L, c, h, w), state=states[k], return_state=True)
                after.append(state)
            x = x.reshape(b * L, c, h, w)
        features = FimaFeatures(pooled, x.mean(dim=(-1, -2)).reshape(b, L, -1))
        return features if states is None else (features, after)

    # -- the cheap part (what online alignment adapts) ---------------------------------------------

    def decode(self, features: FimaFeatures, imu_acc: Optional[torch.Tensor] = None,
               imu_angle: Optional[torch.Tensor] = None, rotation_from_imus: Optional[bool] = None) -> FimaOutput:
        """SSM-C chain, fusion and head. imu_acc / imu_angle: [B, L, M, 3] from `imu_pair_inputs`
        (m/s^2 and degrees); required by the IMU variants, ignored (may be None) by ReM and ReM'.
        rotation_from_imus (default: the configuration's): the output angles are the IMUs' mean relative
        rotation instead of the head's (IMU variants only)."""
        coarse, total = None, 0
        d = self.cfg.feature_dim
        for pooled, block in zip(features.pooled, self.remamba):
            coarse = block.coarse(pooled, coarse)
            total = total + _resize_channels(coarse, d)
        image = features.final + total  # F_I
        out = FimaOutput(params=None, image_features=image)
        x = image
        if self.fusion is not None:
            acc, ang = self._check_imu(imu_acc, imu_angle, image.shape[:2])
            x, fa, wa, wr = self.fusion(image, acc / self.cfg.imu_acc_unit_m_s2, ang / self.cfg.imu_angle_unit_deg)
            out.acc_features, out.acc_weights, out.imu_weights = fa, wa, wr
        out.params = self.head(self.head_ssm(x))
        if self.prior_to_translation is not None:
            # Unweighted mean over the IMUs: with constant weights the chained relative rotations telescope
            # (sensor noise does not accumulate along the sweep); per-pair fusion weights would break that.
            prior = ang.mean(dim=-2)  # [B, L, 3] degrees, static xyz
            out.params = torch.cat([out.params[..., :3] + self.prior_to_translation(prior / self.cfg.imu_angle_unit_deg),
                                    out.params[..., 3:] + prior], dim=-1)
        if self.fusion is not None and (self.cfg.rotation_from_imus if rotation_from_imus is None else rotation_from_imus):
            # the same unweighted mean as the prior: constant weights keep the chained rotations telescoping
            out.params = torch.cat([out.params[..., :3], ang.mean(dim=-2)], dim=-1)
        return out

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters `decode` uses: stage SSM-Cs, fusion, head SSM-C and head."""
        for block in self.remamba:
            yield from block.ssm_c.parameters()
        if self.fusion is not None:
            yield from self.fusion.parameters()
        yield from self.head_ssm.parameters()
        yield from self.head.parameters()
        if self.prior_to_translation is not None:
            yield from self.prior_to_translation.parameters()

    def forward(self, frames: torch.Tensor, imu_acc: Optional[torch.Tensor] = None,
                imu_angle: Optional[torch.Tensor] = None, pair_chunk: Optional[int] = None,
                rotation_from_imus: Optional[bool] = None) -> FimaOutput:
        """frames [B, N, H, W] (0..255), imu_acc / imu_angle [B, N-1, M, 3] -> FimaOutput (L = N - 1)."""
        return self.decode(self.encode(frames, pair_chunk), imu_acc, imu_angle, rotation_from_imus)

    # -- checks ------------------------------------------------------------------------------------

    def _check_frames(self, frames):
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4:
            raise InputError(f"FiMA frames: expected a tensor [B, N, H, W], got "
                             f"{list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}")
        if frames.shape[1] < 2:
            raise InputError(f"FiMA frames: need at least 2 frames per sweep, got {frames.shape[1]}")
        if min(frames.shape[-2:]) < 32:
            raise InputError(f"FiMA frames: frames of at least 32x32 pixels are needed (the network "
                             f"downsamples 32 times), got {tuple(frames.shape[-2:])}")
        if frames.is_floating_point() and not torch.isfinite(frames).all():
            raise InputError("FiMA frames: contain NaN or infinite values")

    def _check_imu(self, acc, ang, bl):
        if acc is None or ang is None:
            raise InputError(f"FiMA variant {self.cfg.variant!r} fuses IMUs: imu_acc and imu_angle "
                             "[B, L, M, 3] are required")
        for name, t in (("imu_acc", acc), ("imu_angle", ang)):
            if t.dim() != 4 or tuple(t.shape[:2]) != tuple(bl) or t.shape[-1] != 3 or t.shape[2] < 1:
                raise InputError(f"FiMA {name}: expected [B, L, M, 3] = [{bl[0]}, {bl[1]}, M>=1, 3], "
                                 f"got {list(t.shape)}")
            if not torch.isfinite(t).all():
                raise InputError(f"FiMA {name}: contains NaN or infinite values")
        if acc.shape != ang.shape:
            raise InputError(f"FiMA imu_acc {list(acc.shape)} and imu_angle {list(ang.shape)} differ in shape")
        return acc.float(), ang.float()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
