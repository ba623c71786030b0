"""MoGLo-Net (Kim et al., IEEE TMI 2025): correlation encoder, global-local attention, LSTM motion estimator.

Facts from the paper and the authors' public code. Data flow for a batch of B clips of T frames
(S = T - 1 consecutive pairs; the paper uses T = 5 at 256 x 256 px)::

    frames [B, T, H, W] (0..255) -> x / 127.5 - 1 (input_normalisation "frame": (x - mean) / 3 sd per frame)
      -> every frame through the shared encoder_1
      (7x7/2 conv, BN, ReLU, residual blocks, one stride-2 block)      f_i [C1 = w, H/4, W/4]
    correlation(f_i, f_{i+1}): 3x3 kernels at patch centres (stride 4 on H/4) against a +-8 px search
      window -> 15 x 15 = 225 cosine costs per centre                   cv  [225, H/16, W/16]
    concat(f_i, f_{i+1}) -> encoder_2 (H/4, 2w channels: the *local* map L) -> encoder_3 (H/16, 4w)
    concat(encoder_3, cv) -> encoder_4 (H/32, 8w) -> 2x2 average pool -> the *global* map G [8w, H/64, W/64]
    global-local attention: CBAM (channel then spatial) on G; L cut into (H/4 / (H/64))^2 = 256 patches of
      G's spatial size; channel attention on the patches; each patch weighted by (1 + cos(proj(patch),
      proj(G))) / 2; a 1x1x1 conv over the patch axis folds the 256 patches into 4 maps of 2w channels
      -> local map [8w, H/64, W/64]
    pooled local / global vectors [B, S, 8w] -> LSTM_local / LSTM_global -> Linear -> 6 numbers per pair

Output convention (`MogloOutput.params`): per pair i of a clip, (tx, ty, tz) in mm and (a0, a1, a2) in
degrees of T_{i<-i+1} = inv(T_i) @ T_{i+1} (frame i+1's image-mm coordinates -> frame i's, on the network
grid), angles in geometry's intrinsic "YZX" convention (R = Ry(a0) Rz(a1) Rx(a2), as MoGLo-Net):
``geometry.params_to_matrix(params, "YZX", degrees=True)``. The two heads predict *normalised*
parameters (``(p - param_mean) / param_std``, buffers saved with the weights); at inference the two
heads are averaged (the paper) and de-normalised.

Correlation layout: the centres of the 3x3 kernels are every `corr_stride`-th pixel of the H/4 map
(offset stride // 2), i.e. exactly one centre per H/16 cell of encoder_3's output, so the 225 costs are
stacked as channels at the centre's own position ("displacement" layout, geometrically aligned; if the
grids differ the volume is resized bilinearly). The authors' code instead puts the 256 centres on the
channel axis and the 15x15 displacement map, upsampled to 16x16, on the spatial axes; ``corr_layout=
"centres"`` reproduces that. The costs are computed without gradient (as the authors do), in float32 on
CPU and float16 on CUDA (float64 inputs stay float64: the tests' oracle).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ultrasound_ai.core.errors import InputError

__all__ = [
    "MogloConfig",
    "PRESETS",
    "PARAM_CONVENTION",
    "make_config",
    "patch_correlation",
    "ChannelAttention",
    "SpatialAttention",
    "GlobalLocalAttention",
    "MogloNet",
    "MogloOutput",
    "count_parameters",
]

PARAM_CONVENTION = "YZX"
_EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------


INPUT_NORMALISATIONS = ("fixed", "frame")


@dataclass(frozen=True)
class MogloConfig:
    """Everything that fixes the network's shape (stored in model cards via `to_dict`).

    frame_shape (H, W) pixels at pixel_spacing_mm (isotropic) is the input the network is built for; H and
    W must be multiples of 64 (five halvings plus the 4-px correlation stride). clip_frames: frames per
    clip (pairs = clip_frames - 1). base_width: w (the paper's 64). blocks: residual blocks of encoder
    1..4 (the paper: 3, 4, 5, 3 incl. the stride-2 ones).
    """

    base_width: int = 64
    blocks: Tuple[int, int, int, int] = (3, 4, 5, 3)
    frame_shape: Tuple[int, int] = (256, 256)
    pixel_spacing_mm: float = 0.15
    clip_frames: int = 5
    corr_kernel: int = 3
    corr_stride: int = 4
    corr_radius: int = 8
    corr_layout: str = "displacement"
    corr_grad: bool = False
    attention_reduction: int = 16
    lstm_hidden: Optional[int] = None  # default 8w
    # "fixed": x / 127.5 - 1 (the paper). "frame": each frame standardised on its own, (x - mean) / (3 sd),
    # so gain, TGC and dynamic range that differ between scanners cannot swamp the speckle decorrelation.
    input_normalisation: str = "fixed"

    def __post_init__(self):
        h, w = self.frame_shape
        if h % 64 or w % 64 or h < 64 or w < 64:
            raise InputError(f"MogloConfig.frame_shape must be multiples of 64 pixels, got {self.frame_shape}")
        if self.clip_frames < 2:
            raise InputError(f"MogloConfig.clip_frames must be >= 2, got {self.clip_frames}")
        if self.corr_kernel % 2 == 0 or self.corr_kernel < 1 or self.corr_radius <= self.corr_kernel // 2:
            raise InputError("MogloConfig: corr_kernel must be odd and smaller than the search radius")
        if self.corr_layout not in ("displacement", "centres"):
            raise InputError(f"MogloConfig.corr_layout must be 'displacement' or 'centres', got {self.corr_layout!r}")
        if self.base_width < 1 or len(self.blocks) != 4 or min(self.blocks) < 2:
            raise InputError("MogloConfig: base_width >= 1 and four block counts >= 2 expected")
        if self.pixel_spacing_mm <= 0:
            raise InputError("MogloConfig.pixel_spacing_mm must be positive")
        if self.input_normalisation not in INPUT_NORMALISATIONS:
            raise InputError(f"MogloConfig.input_normalisation must be one of {INPUT_NORMALISATIONS}, "
                             f"got {self.input_normalisation!r}")

    @property
    def n_displacements(self) -> int:
        d = 2 * (self.corr_radius - self.corr_kernel // 2) + 1
        return d * d

    @property
    def centre_grid(self) -> Tuple[int, int]:
        h, w = self.frame_shape[0] // 4, self.frame_shape[1] // 4
        s = self.corr_stride
        return (h - 1 - s // 2) // s + 1, (w - 1 - s // 2) // s + 1

    @property
    def corr_channels(self) -> int:
        if self.corr_layout == "displacement":
            return self.n_displacements
        gh, gw = self.centre_grid
        return gh * gw

    @property
    def feature_dim(self) -> int:
        return 8 * self.base_width

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MogloConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"MogloConfig: unknown fields {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


PRESETS = {
    # The paper: 256 x 256 clips of 5 frames, dim_base 64.
    "paper": dict(base_width=64, blocks=(3, 4, 5, 3), frame_shape=(256, 256), pixel_spacing_mm=0.15),
    # Trains on CPU here: half width, 128 x 128 px at 0.3 mm (38 mm, the simulator's field of view).
    "shipped": dict(base_width=32, blocks=(3, 3, 3, 3), frame_shape=(128, 128), pixel_spacing_mm=0.3),
    # Tests: 64 x 64 px at 0.6 mm, width 4; +-3 px search (5 x 5 costs): 2.4-mm feature pixels.
    "tiny": dict(base_width=4, blocks=(2, 2, 2, 2), frame_shape=(64, 64), pixel_spacing_mm=0.6, attention_reduction=4,
                 corr_radius=3),
}


def make_config(preset: str = "shipped", **overrides) -> MogloConfig:
    """A MogloConfig from a size preset ("paper", "shipped", "tiny"); keyword overrides win."""
    if preset not in PRESETS:
        raise InputError(f"MoGLo-Net preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return MogloConfig(**{**PRESETS[preset], **overrides})


# ------------------------------------------------------------------------------------------------
# correlation operation
# ------------------------------------------------------------------------------------------------


def _box_at_centres(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Sum over kernel x kernel windows centred at pixels stride*i + stride//2 of the unpadded map.

    x [B, Hp, Wp] is the map zero-padded by kernel//2 on each side -> [B, gh, gw]."""
    s0 = stride // 2
    return F.avg_pool2d(x[:, None, s0:, s0:], kernel, stride=stride)[:, 0] * float(kernel * kernel)


def patch_correlation(f1: torch.Tensor, f2: torch.Tensor, kernel: int = 3, stride: int = 4, radius: int = 8,
                      compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Patch-wise correlation volume between feature maps f1, f2 [B, C, H, W].

    Centres c = (stride*i + stride//2, stride*j + stride//2) inside the map. For each centre and each
    displacement d = (dy, dx) with |dy|, |dx| <= radius - kernel//2 (so that the displaced kernel stays in
    the +-radius search window), the cost is the cosine similarity between the kernel x kernel x C patch
    of f1 at c and the patch of f2 at c + d (zero outside the map; norms guarded by 1e-6):
    ``<p1, p2> / ((|p1| + 1e-6)(|p2| + 1e-6))``.

    Returns [B, D*D, gh, gw] with D = 2*(radius - kernel//2) + 1 (15 for 3 / 8) and channel index
    (dy + r') * D + (dx + r'), r' = radius - kernel//2 (row displacement major). compute_dtype: None =
    float16 on CUDA, the input's dtype otherwise; the result has the input's dtype.
    """
    if f1.shape != f2.shape or f1.dim() != 4:
        raise InputError(f"patch_correlation: f1 and f2 must be [B, C, H, W] of one shape, got "
                         f"{list(f1.shape)} and {list(f2.shape)}")
    out_dtype = f1.dtype
    if compute_dtype is None:
        compute_dtype = torch.float16 if f1.is_cuda else f1.dtype
    a, b = f1.to(compute_dtype), f2.to(compute_dtype)
    k, r = kernel // 2, radius - kernel // 2
    _, _, H, W = a.shape
    a_p = F.pad(a, (k, k, k, k))
    b_p = F.pad(b, (radius, radius, radius, radius))
    # Norms in float32 at least: squared sums over 9*C values overflow float16's range easily.
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    n1 = _box_at_centres(a_p.to(acc_dtype).square().sum(1), kernel, stride).sqrt()
    sq2 = b_p.to(acc_dtype).square().sum(1)
    Hp, Wp = H + 2 * k, W + 2 * k
    n_b, d = a.shape[0], 2 * r + 1
    costs = []
    # One row displacement at a time, all column displacements at once (an unfold view over the columns):
    # memory B*C*Hp*D*Wp per step, not per displacement.
    for dy in range(-r, r + 1):
        y0 = radius - k + dy
        win = b_p[:, :, y0:y0 + Hp, :Wp + 2 * r].unfold(3, Wp, 1)  # [B, C, Hp, D, Wp], dx = index - r
        dot = (a_p[:, :, :, None, :] * win).sum(1).to(acc_dtype)  # [B, Hp, D, Wp]
        sq = sq2[:, y0:y0 + Hp, :Wp + 2 * r].unfold(2, Wp, 1)  # [B, Hp, D, Wp]
        dot = _box_at_centres(dot.permute(0, 2, 1, 3).reshape(n_b * d, Hp, Wp), kernel, stride)
        n2 = _box_at_centres(sq.permute(0, 2, 1, 3).reshape(n_b * d, Hp, Wp), kernel, stride).sqrt()
        gh, gw = dot.shape[-2:]
        costs.append((dot / ((n1.repeat_interleave(d, 0) + _EPS) * (n2 + _EPS))).reshape(n_b, d, gh, gw))
    return torch.cat(costs, 1).to(out_dtype)


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Two 3x3 conv + BN, SiLU; a 1x1 conv on the skip when the width changes; stride 2 via a strided
    first conv with a 2x2 max-pooled skip (the authors' block)."""

    def __init__(self, c_in: int, c_out: int, down: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2 if down else 1, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.down = down
        self.act = nn.SiLU()

    def forward(self, x):
        s = self.skip(x)
        if self.down:
            s = F.max_pool2d(s, 2)
        return self.act(self.body(x) + s)


def _stage(c_in: int, c_out: int, n: int, down_first: bool, down_last: bool) -> nn.Sequential:
    layers = []
    for i in range(n):
        down = (i == 0 and down_first) or (i == n - 1 and down_last)
        layers.append(ResBlock(c_in if i == 0 else c_out, c_out, down=down))
    return nn.Sequential(*layers)


class ChannelAttention(nn.Module):
    """CBAM channel attention: shared MLP on average- and max-pooled channels, sigmoid, summed.

    forward(x [N, C, H, W]) -> weights [N, C, 1, 1] (the caller multiplies)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x):
        avg = self.mlp(x.mean(dim=(2, 3)))
        mx = self.mlp(x.amax(dim=(2, 3)))
        return (avg + mx)[:, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial attention: 3x3 conv over (channel mean, channel max), BN, sigmoid -> [N, 1, H, W]."""

    def __init__(self, kernel: int = 3):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(1),
                                  nn.Sigmoid())

    def forward(self, x):
        return self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1))


class GlobalLocalAttention(nn.Module):
    """The global-local attention module.

    forward(local [N, CL, HL, WL], global_map [N, CG, h, w]) with HL = 16 h, WL = 16 w returns
    (local_map [N, CG, h, w], global_map [N, CG, h, w], scores [N, 256]): CBAM on the global map; the
    local map cut into 16 x 16 patches of the global map's size; channel attention on the patch mean;
    each patch weighted by (1 + cos(proj_l(patch), proj_g(global))) / 2 (both projections 1x1 conv + BN
    + SiLU to CL channels, cosine over all CL*h*w values); a 1x1x1 conv over the patch axis folds the
    256 patches into CG / CL maps of CL channels = CG channels.
    """

    def __init__(self, local_channels: int, global_channels: int, reduction: int = 16, grid: int = 16):
        super().__init__()
        if global_channels % local_channels:
            raise InputError("GlobalLocalAttention: global channels must be a multiple of local channels")
        self.grid = grid
        n = grid * grid
        self.ca_g = ChannelAttention(global_channels, reduction)
        self.sa_g = SpatialAttention(3)
        self.ca_l = ChannelAttention(local_channels, reduction)
        self.proj_g = nn.Sequential(nn.Conv2d(global_channels, local_channels, 1, bias=False),
                                    nn.BatchNorm2d(local_channels), nn.SiLU())
        self.proj_l = nn.Sequential(nn.Conv2d(local_channels, local_channels, 1, bias=False),
                                    nn.BatchNorm2d(local_channels), nn.SiLU())
        self.fold = nn.Sequential(nn.Conv3d(n, global_channels // local_channels, 1, bias=False),
                                  nn.BatchNorm3d(global_channels // local_channels), nn.SiLU())

    def patches(self, local: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
        """[N, C, HL, WL] -> [N, grid*grid, C, h, w], row-major patch order."""
        n, c, HL, WL = local.shape
        h, w = size_hw
        g = self.grid
        if HL != g * h or WL != g * w:
            raise InputError(f"GlobalLocalAttention: local map {HL}x{WL} must be {g}x the global map {h}x{w}")
        p = local.reshape(n, c, g, h, g, w).permute(0, 2, 4, 1, 3, 5)
        return p.reshape(n, g * g, c, h, w)

    def forward(self, local, global_map):
        g = global_map * self.ca_g(global_map)
        g = g * self.sa_g(g)
        n, _, h, w = g.shape
        p = self.patches(local, (h, w))  # [N, P, CL, h, w]
        P, CL = p.shape[1], p.shape[2]
        p = p * self.ca_l(p.mean(1))[:, None]
        pl = self.proj_l(p.reshape(n * P, CL, h, w)).reshape(n, P, -1)
        pg = self.proj_g(g).reshape(n, 1, -1)
        scores = (F.cosine_similarity(pl, pg, dim=-1, eps=1e-8) + 1.0) / 2.0  # [N, P]
        p = p * scores[:, :, None, None, None]
        folded = self.fold(p)  # [N, CG/CL, CL, h, w]
        return folded.reshape(n, -1, h, w), g, scores


@dataclass
class MogloOutput:
    """local_raw, global_raw: normalised per-pair predictions [B, S, 6] of the two heads (the losses use
    them); params: the heads' mean, de-normalised, [B, S, 6] in mm and degrees (module docstring);
    embedding: [B, S, 2 * 8w * h * w] the attended (local, global) maps flattened (triplet loss);
    scores: [B, S, 256] local-patch attention weights."""

    local_raw: torch.Tensor
    global_raw: torch.Tensor
    params: torch.Tensor
    embedding: torch.Tensor
    scores: torch.Tensor


class MogloNet(nn.Module):
    """MoGLo-Net. forward(frames [B, T, H, W] in 0..255, uint8 or float) -> MogloOutput."""

    def __init__(self, config: MogloConfig):
        super().__init__()
        self.config = config
        w = config.base_width
        b1, b2, b3, b4 = config.blocks
        self.stem = nn.Sequential(nn.Conv2d(1, w, 7, stride=2, padding=3), nn.BatchNorm2d(w), nn.ReLU())
        self.encoder_1 = _stage(w, w, b1, down_first=False, down_last=True)  # H/4
        self.encoder_2 = _stage(2 * w, 2 * w, b2, down_first=False, down_last=False)  # H/4, local map
        self.encoder_3 = _stage(2 * w, 4 * w, b3, down_first=True, down_last=True)  # H/16
        self.encoder_4 = _stage(4 * w + config.corr_channels, 8 * w, b4, down_first=False, down_last=True)  # H/32
        self.attention = GlobalLocalAttention(2 * w, 8 * w, reduction=config.attention_reduction)
        hidden = config.lstm_hidden or 8 * w
        self.lstm_local = nn.LSTM(8 * w, hidden, batch_first=True)
        self.lstm_global = nn.LSTM(8 * w, hidden, batch_first=True)
        self.head_local = nn.Linear(hidden, 6)
        self.head_global = nn.Linear(hidden, 6)
        # Target normalisation (set from the training data; saved with the weights).
        self.register_buffer("param_mean", torch.zeros(6))
        self.register_buffer("param_std", torch.ones(6))

    def set_normalisation(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(6)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(6)
        if not torch.all(torch.isfinite(mean)) or not torch.all(std > 0):
            raise InputError("MogloNet.set_normalisation: expected finite means and positive standard deviations")
        self.param_mean.copy_(mean)
        self.param_std.copy_(std)

    def normalise(self, params: torch.Tensor) -> torch.Tensor:
        return (params - self.param_mean) / self.param_std

    def denormalise(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.param_std + self.param_mean

    def correlation(self, f1: torch.Tensor, f2: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
        c = self.config
        ctx = torch.enable_grad() if (c.corr_grad and torch.is_grad_enabled()) else torch.no_grad()
        with ctx:
            cv = patch_correlation(f1, f2, c.corr_kernel, c.corr_stride, c.corr_radius)
        if c.corr_layout == "centres":
            n, _, gh, gw = cv.shape
            d = int(round(c.n_displacements ** 0.5))
            cv = cv.reshape(n, d, d, gh * gw).permute(0, 3, 1, 2)  # centres as channels, displacement map
            return F.interpolate(cv, size=size_hw, mode="bilinear", align_corners=True)
        if tuple(cv.shape[-2:]) != tuple(size_hw):
            cv = F.interpolate(cv, size=size_hw, mode="bilinear", align_corners=True)
        return cv

    def forward(self, frames: torch.Tensor) -> MogloOutput:
        c = self.config
        if frames.dim() != 4 or frames.shape[1] < 2:
            raise InputError(f"MogloNet: frames must be [B, T, H, W] with T >= 2, got {list(frames.shape)}")
        if tuple(frames.shape[-2:]) != tuple(c.frame_shape):
            raise InputError(f"MogloNet: frames are {tuple(frames.shape[-2:])} px; this model needs "
                             f"{tuple(c.frame_shape)} (resample with freehand.sweep_windows)")
        B, T, H, W = frames.shape
        S = T - 1
        x = frames.to(self.param_mean.dtype)
        if c.input_normalisation == "frame":
            mean = x.mean(dim=(-2, -1), keepdim=True)
            x = (x - mean) / (3.0 * x.std(dim=(-2, -1), keepdim=True).clamp_min(1.0))
        else:
            x = x / 127.5 - 1.0
        f = self.encoder_1(self.stem(x.reshape(B * T, 1, H, W)))  # each frame once, shared encoder
        f = f.reshape(B, T, *f.shape[1:])
        f1 = f[:, :-1].reshape(B * S, *f.shape[2:])
        f2 = f[:, 1:].reshape(B * S, *f.shape[2:])
        local = self.encoder_2(torch.cat([f1, f2], 1))
        x3 = self.encoder_3(local)
        cv = self.correlation(f1, f2, tuple(x3.shape[-2:])).to(x3.dtype)
        g = F.avg_pool2d(self.encoder_4(torch.cat([x3, cv], 1)), 2)
        loc, glob, scores = self.attention(local, g)
        embedding = torch.cat([loc, glob], 1).reshape(B, S, -1)
        vl = loc.mean(dim=(2, 3)).reshape(B, S, -1)
        vg = glob.mean(dim=(2, 3)).reshape(B, S, -1)
        raw_l = self.head_local(self.lstm_local(vl)[0])
        raw_g = self.head_global(self.lstm_global(vg)[0])
        params = self.denormalise(0.5 * (raw_l + raw_g))
        return MogloOutput(raw_l, raw_g, params, embedding, scores.reshape(B, S, -1))


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
