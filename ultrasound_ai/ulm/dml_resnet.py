"""3DML-ResNet and the bubble-counting network (Pustovalov et al., EUSIPCO 2024).

3DML-ResNet. Input: a window of N B-mode frames (the envelope |IQ|) [B, N, Z, X], divided by the
window's maximum (the paper normalises each batch by its maximum; here each window of a batch by its
own, so a window's output does not depend on what else shares the batch). The window is one 3D
volume (time, z, x) with one channel; every convolution is 3x3x3 with zero padding, so each output
frame sees "groups of 3 frames" (its neighbours in time) and the output has N frames:

    conv_first: 1 -> width                               ("layered input")
    R residual blocks: y = x + res_scale * conv(PReLU(conv(x)))   (weighted sum with the input)
    conv_mid: width -> width, plus the layered input     (global skip)
    conv_last: width -> 3, then a sigmoid                (Pos, X_E, Y_E per frame and pixel)

Channel 0 (Pos) is the probability that a bubble lies in that low-resolution pixel, channels 1 and
2 (X_E: axial/z, Y_E: lateral/x, the paper's "vertical" and "horizontal") are the bubble's offset
from the pixel centre in pixels, mapped from [-0.5, 0.5) to [0, 1) ("normalised to [0, 1] ... all
CNN outputs remain positive"): offset = X_E - 0.5.

The weighted sum uses a fixed weight (`res_scale`, 0.1 as in EDSR-style super-resolution ResNets;
the paper says "weighted" without a value); `learnable_res_scale=True` makes it a parameter per block.
PReLU has one slope per layer (PyTorch's default).

Parameter count of the "paper" configuration (width 96, 10 blocks), exactly:
  conv_first 1*96*27 + 96 = 2,688; 20 block convs 20 * (96*96*27 + 96) = 4,978,560;
  10 PReLU slopes = 10; conv_mid 248,928; conv_last 96*3*27 + 3 = 7,779  -> 5,237,965
(the reference's "5.2 M parameters, 21 MB fp32"). The counting network is separate and not included.

Counting network (the paper: "convolutional layers followed by fully connected layers, predicts the
number of bubbles present in each ultrasound frame independently"): every frame of the normalised
window alone, [B*N, 1, Z, X] -> four 3x3 convs (two with stride 2) with PReLU -> global average
pooling -> FC -> PReLU -> FC -> softplus = bubbles per 1000 pixels; times the frame's area / 1000 =
the count. Pooling before the FC layers makes it work on any frame size (trained on crops, applied
to whole frames) with counts that scale with the area.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ultrasound_ai.core.errors import InputError

__all__ = [
    "METHOD",
    "PRESETS",
    "DmlConfig",
    "DmlResNet",
    "BubbleCounter",
    "DmlLocalizer",
    "dml_config",
    "build_model",
    "check_keep",
    "conv_frames",
    "count_parameters",
    "normalise_windows",
]

METHOD = "ulm_3dml_resnet"
# Counts are predicted as a density per this many pixels (keeps the raw output near 1).
_COUNT_AREA_UNIT = 1000.0


@dataclass(frozen=True)
class DmlConfig:
    width: int = 32  # channels of the 3D ResNet
    blocks: int = 5  # residual blocks
    res_scale: float = 0.1  # weight of the residual branch in each block's sum
    learnable_res_scale: bool = False
    counter_width: int = 16  # channels of the counting network's first conv
    counter_hidden: int = 64  # width of its hidden fully connected layer
    window_frames: int = 8  # N: frames per window (training crops and inference)

    def validate(self) -> "DmlConfig":
        for name in ("width", "blocks", "counter_width", "counter_hidden", "window_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"3DML-ResNet configuration: {name} must be a positive integer, got {v!r}")
        if not (isinstance(self.res_scale, (int, float)) and 0 < float(self.res_scale) <= 1):
            raise InputError(f"3DML-ResNet configuration: res_scale must be in (0, 1], got {self.res_scale!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, DmlConfig] = {
    # The paper: 96 channels, 10 residual blocks, batches of 10 frames.
    "paper": DmlConfig(width=96, blocks=10, counter_width=32, counter_hidden=128, window_frames=10),
    # What we ship: about 7 GFLOP per frame and window pass at 84 x 143 (CPU-usable), trained on crops.
    "shipped": DmlConfig(width=32, blocks=5, counter_width=16, counter_hidden=64, window_frames=8),
    # Tests.
    "tiny": DmlConfig(width=8, blocks=2, counter_width=4, counter_hidden=16, window_frames=4),
}


def dml_config(spec: str | Mapping | DmlConfig | None = None) -> DmlConfig:
    """A preset name, a DmlConfig, or a mapping {"preset": name, field: value, ...} -> DmlConfig."""
    if spec is None:
        spec = "shipped"
    if isinstance(spec, DmlConfig):
        return spec.validate()
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise InputError(f"3DML-ResNet preset {spec!r}: unknown; expected one of {sorted(PRESETS)}")
        return PRESETS[spec]
    if not isinstance(spec, Mapping):
        raise InputError(f"3DML-ResNet configuration: expected a preset name or a mapping, got {type(spec).__name__}")
    spec = dict(spec)
    base = dml_config(spec.pop("preset", "shipped"))
    fields = {f.name for f in dataclasses.fields(DmlConfig)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise InputError(f"3DML-ResNet configuration: unknown key(s) {unknown}; expected 'preset' and some of "
                         f"{sorted(fields)}")
    return dataclasses.replace(base, **spec).validate()


def normalise_windows(frames: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """[B, N, Z, X] -> each window divided by its own maximum (all-zero windows stay zero).

    group: for windows longer than the training windows (N > group frames), divide by the median of
    the maxima of its consecutive `group`-frame pieces instead: the scale one training window had (the
    maximum of a long window is an outlier of many frames, and would dim every frame)."""
    b, n = frames.shape[:2]
    if group is not None and n > group:
        k = n // group
        peaks = frames[:, :k * group].reshape(b, k, -1).amax(dim=2)
        peak = peaks.median(dim=1).values
    else:
        peak = frames.flatten(1).amax(dim=1)
    peak = peak.clamp_min(torch.finfo(frames.dtype).tiny)
    return frames / peak.view(-1, *([1] * (frames.dim() - 1)))


def _conv3(cin: int, cout: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, padding=1)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, res_scale: float, learnable: bool):
        super().__init__()
        self.conv1 = _conv3(width, width)
        self.act = nn.PReLU()
        self.conv2 = _conv3(width, width)
        if learnable:
            self.res_scale = nn.Parameter(torch.tensor(float(res_scale)))
        else:
            self.register_buffer("res_scale", torch.tensor(float(res_scale)), persistent=False)
        self.fused = True  # in-place inference arithmetic (see forward); DmlResNet.set_inference switches it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not self.fused:
            return x + self.res_scale * self.conv2(self.act(self.conv1(x)))
        # Inference: the same arithmetic in place (PReLU with its one slope is a leaky ReLU): passes that
        # allocate temporaries over channels-last activations cost a third of the convolutions' time.
        h = F.leaky_relu_(self.conv1(x), float(self.act.weight)) if self.act.weight.numel() == 1 else self.act(self.conv1(x))
        return self.conv2(h).mul_(self.res_scale).add_(x)


class DmlResNet(nn.Module):
    """The 3D ResNet: normalised windows [B, N, Z, X] -> maps [B, N, 3, Z, X] in [0, 1]."""

    def __init__(self, config: DmlConfig):
        super().__init__()
        c = config.width
        self.conv_first = _conv3(1, c)
        self.blocks = nn.Sequential(*[_ResidualBlock(c, config.res_scale, config.learnable_res_scale)
                                      for _ in range(config.blocks)])
        self.conv_mid = _conv3(c, c)
        self.conv_last = _conv3(c, 3)
        self.channels_last = False  # inference may switch to the channels-last 3D layout (set_inference)
        self.fused = True
        with torch.no_grad():
            # Bubbles occupy ~1 % of the pixels: start Pos near that prior instead of 0.5 everywhere,
            # so the first steps do not spend themselves on pushing the whole map down.
            self.conv_last.bias[0].fill_(-4.0)

    def set_inference(self, channels_last: bool, fused: bool) -> None:
        """How inference computes (the same numbers either way): the channels-last 3D memory layout, and
        in-place sums / PReLU (`fused`) when no gradient is recorded."""
        self.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        self.channels_last = bool(channels_last)
        self.fused = bool(fused)
        for blk in self.blocks:
            blk.fused = self.fused

    def forward(self, x: torch.Tensor, keep: tuple[int, int] | None = None) -> torch.Tensor:
        """keep=(lo, hi): the maps of frames lo..hi-1 only ([B, hi - lo, 3, Z, X]; see conv_frames)."""
        v = x.unsqueeze(1)
        if self.channels_last:
            v = v.contiguous(memory_format=torch.channels_last_3d)
        layered = self.conv_first(v)
        y = self.conv_mid(self.blocks(layered))
        y = y + layered if torch.is_grad_enabled() or not self.fused else y.add_(layered)
        out = torch.sigmoid(conv_frames(self.conv_last, y, keep))  # [B, 3, hi - lo, Z, X]
        return out.transpose(1, 2)


def check_keep(keep, n: int) -> tuple[int, int]:
    """(lo, hi) of a window's frames to predict: all n when keep is None."""
    lo, hi = (0, n) if keep is None else (int(keep[0]), int(keep[1]))
    if not 0 <= lo < hi <= n:
        raise InputError(f"3DML-ResNet: frames to predict {keep} must be a range within the window's {n} frames")
    return lo, hi


def conv_frames(conv: nn.Module, y: torch.Tensor, keep: tuple[int, int] | None,
                prepare=None) -> torch.Tensor:
    """The last 3x3x3 convolution (zero padding 1) of y [B, C, N, Z, X] at output frames keep = (lo, hi) only.

    Why: the pipeline keeps only a window's inner frames, and every layer before the last is needed on all N
    frames (each output frame sees its neighbours), but the last one is not: its other output frames would be
    computed and dropped. conv(y)[:, :, lo:hi] within float rounding: the frames lo - 1 .. hi (zeros outside
    the window) with no padding in time, on CPU as 2D convolutions (_conv3d_as_2d). prepare(tensor) is applied
    to the frames taken first (the int8 network's dequantization). conv: 3x3x3 with padding 1 (_conv3)."""
    prepare = prepare or (lambda t: t)
    n = y.shape[2]
    lo, hi = check_keep(keep, n)
    if (lo, hi) == (0, n):
        return conv(prepare(y))
    v = prepare(y[:, :, max(lo - 1, 0):min(hi + 1, n)])
    if lo == 0 or hi == n:  # the window's own edge: the zero frame the padding gave
        v = F.pad(v, (0, 0, 0, 0, int(lo == 0), int(hi == n)))
    if torch.is_grad_enabled() or v.device.type != "cpu":
        return F.conv3d(v, conv.weight, conv.bias, padding=(0, 1, 1))
    return _conv3d_as_2d(v, conv.weight, conv.bias)


# Output channels of the 2D convolution in _conv3d_as_2d are padded to a multiple of this: oneDNN's CPU
# kernels for few output channels are slow (a 16 -> 3 3x3x3 convolution ran at ~30 GFLOP/s per core; as a
# 2D one with 16 outputs, 9 of them used, it took a third less time).
_CONV2D_CHANNEL_BLOCK = 16


def _conv3d_as_2d(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3d(v, weight, bias, padding=(0, 1, 1)) for a 3-frame temporal kernel, on CPU: one 2D convolution
    of every frame with the three temporal taps as output channels, then the taps of neighbouring frames
    summed (the same sums in another order: equal within float rounding)."""
    b, c, t, z, x = v.shape
    cout = weight.shape[0]
    if weight.shape[2] != 3 or t < 3:
        return F.conv3d(v, weight, bias, padding=(0, 1, 1))
    taps = 3 * cout
    w2 = weight.permute(2, 0, 1, 3, 4).reshape(taps, c, *weight.shape[3:])
    pad = -taps % _CONV2D_CHANNEL_BLOCK
    if pad:
        w2 = torch.cat([w2, w2.new_zeros(pad, *w2.shape[1:])])
    frames = v.transpose(1, 2).reshape(b * t, c, z, x).contiguous(memory_format=torch.channels_last)
    o = F.conv2d(frames, w2.contiguous(memory_format=torch.channels_last), None, padding=1).view(b, t, -1, z, x)
    out = o[:, 0:t - 2, 0:cout] + o[:, 1:t - 1, cout:2 * cout]
    out += o[:, 2:t, 2 * cout:taps]
    if bias is not None:
        out += bias.view(1, 1, cout, 1, 1)
    return out.transpose(1, 2)


class BubbleCounter(nn.Module):
    """Frames [M, Z, X] (normalised) -> bubbles per frame [M] (non-negative)."""

    def __init__(self, config: DmlConfig):
        super().__init__()
        c, h = config.counter_width, config.counter_hidden
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.PReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.PReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.PReLU(),
            nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.PReLU(),
        )
        self.head = nn.Sequential(nn.Linear(4 * c, h), nn.PReLU(), nn.Linear(h, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        m, z, x = frames.shape
        h = frames.unsqueeze(1)
        for layer in self.features:
            if isinstance(layer, nn.PReLU) and layer.weight.numel() == 1 and not torch.is_grad_enabled():
                h = F.leaky_relu_(h, float(layer.weight))  # its one slope, in place: the same numbers, no copy
            else:
                h = layer(h)
        f = h.mean(dim=(2, 3))
        density = F.softplus(self.head(f)).squeeze(1)
        return density * (z * x / _COUNT_AREA_UNIT)


class DmlLocalizer(nn.Module):
    """Both networks behind one state dict (one checkpoint).

    forward(frames [B, N, Z, X], raw envelope) -> {"maps": [B, N, 3, Z, X], "count": [B, N]}; the
    windows are normalised here, so training and inference cannot disagree about it.
    """

    def __init__(self, config: DmlConfig | str | Mapping | None = None):
        super().__init__()
        self.config = dml_config(config)
        self.resnet = DmlResNet(self.config)
        self.counter = BubbleCounter(self.config)

    def forward(self, frames: torch.Tensor, norm_group: int | None = None,
                resnet: nn.Module | None = None, keep: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """resnet: another module computing the ResNet's maps (the int8 version, `dml_int8`); keep=(lo, hi):
        maps and counts of the frames lo..hi-1 only ([B, hi - lo, ...]: the ones the caller keeps)."""
        if frames.dim() != 4:
            raise InputError(f"3DML-ResNet input: expected windows [B, N, Z, X], got shape {tuple(frames.shape)}")
        b, n, z, x = frames.shape
        if min(z, x) < 3:
            raise InputError(f"3DML-ResNet input: frames must be at least 3 x 3 pixels, got {z} x {x}")
        lo, hi = check_keep(keep, n)
        x_n = normalise_windows(frames, norm_group)
        maps = (self.resnet if resnet is None else resnet)(x_n, None if (lo, hi) == (0, n) else (lo, hi))
        # The counting network sees each frame alone (scaled by its window): the kept frames only.
        count = self.counter(x_n[:, lo:hi].reshape(b * (hi - lo), z, x)).view(b, hi - lo)
        return {"maps": maps, "count": count}


def build_model(config: DmlConfig | str | Mapping | None = None) -> DmlLocalizer:
    return DmlLocalizer(config)


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
