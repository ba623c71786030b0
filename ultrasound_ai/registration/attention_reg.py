"""Attention-Reg (Song et al., MICCAI 2021): cross-modal attention network for rigid MRI-TRUS fusion.

Layer by layer as the paper and its public code describe; the "original"
preset has exactly the paper's 1,248,777 parameters.

Input ``[B, 2, D, H, W]`` (array axes z, y, x): channel 0 the MRI or its prostate label, channel 1 the
TRUS resampled through the current estimate, both on the same region-of-interest grid and min-max
scaled to [0, 1] (``preprocessing.prepare_input``).

Output ``[B, 6]``: a rigid correction ``(tx, ty, tz)`` in mm and ``(rx, ry, rz)`` in degrees, Euler
convention static xyz (``geometry.params_to_matrix(p, "xyz", degrees=True)``). The parameters are
expressed in the correction frame F (``correction_frame``): x, y, z are the ROI grid's i, j, k axes
(the array's last, middle and first axis; LPS itself for an axis-aligned MRI) and the rotation is
about F's origin.

Correction semantics (docs/DATA_FORMATS.md: T maps a fixed-space LPS point to the moving-space LPS point)::

    F      = [[A, c], [0, 1]]           the correction frame: A = the ROI's orthonormal axis directions
                                        (columns, LPS), c = the centre of rotation (LPS mm): the fixed
                                        label's centroid (default) or the ROI corner ("corner", the
                                        centre of ROI voxel (0, 0, 0), as the original rotates about
                                        its volume corner)
    Δ      = params_to_matrix(p, "xyz", degrees=True)
    T_new  = T_cur · F · Δ · F⁻¹

The network sees the TRUS resampled onto the fixed grid through T_cur (moving(T_cur(x)) at fixed point
x); the correction acts in fixed space first (x -> F Δ F⁻¹ x), then T_cur maps to moving space. The
exact training target for a perturbed T_init of a case with ground truth T_true is therefore
``Δ = F⁻¹ · T_init⁻¹ · T_true · F`` (``correction_target``), and applying it gives T_true back exactly.
Because the reference's transforms map the other way (moving to fixed), its "left-multiplied"
correction is this right-multiplication in our convention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ultrasound_ai.core import geometry
from ultrasound_ai.core.errors import InputError

__all__ = [
    "AttentionRegConfig",
    "AttentionReg",
    "CrossModalAttention",
    "PRESETS",
    "CENTRES",
    "config_from_dict",
    "preset",
    "build_model",
    "count_parameters",
    "cross_attention",
    "correction_frame",
    "correction_matrix",
    "apply_correction",
    "correction_target",
]

CENTRES = ("centroid", "corner")
EULER = "xyz"  # static xyz, R = Rz @ Ry @ Rx, as the original


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AttentionRegConfig:
    """Sizes of an Attention-Reg network.

    width: channels of the feature extractors (32 in the original).
    attention: True = Attention-Reg; False = Feature-Reg, the paper's ablation (the extractors' outputs
        are concatenated directly).
    inner: channels of the attention embeddings theta, phi, g (16).
    input_size: (D, H, W) of the input volumes (32, 96, 96).
    fc_hidden: hidden sizes of the fully connected head (128, 32).
    reg_channels: channels of the registrator's two fusing convolutions (16, 4).
    output_scale: constant factor on the last layer's output, so a freshly initialised layer spans
        corrections of several mm / degrees (not a parameter; 1.0 gives the original's raw head).
    """

    width: int = 32
    attention: bool = True
    inner: int = 16
    input_size: tuple = (32, 96, 96)
    fc_hidden: tuple = (128, 32)
    reg_channels: tuple = (16, 4)
    output_scale: float = 5.0

    def __post_init__(self):
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "fc_hidden", tuple(int(v) for v in self.fc_hidden))
        object.__setattr__(self, "reg_channels", tuple(int(v) for v in self.reg_channels))
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise InputError(f"Attention-Reg input_size: expected three positive sizes (D, H, W), got {self.input_size}")
        for name in ("width", "inner"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"Attention-Reg {name}: expected a positive integer, got {getattr(self, name)}")
        if len(self.reg_channels) != 2 or min(self.reg_channels) < 1:
            raise InputError(f"Attention-Reg reg_channels: expected two positive sizes, got {self.reg_channels}")
        if not self.fc_hidden or min(self.fc_hidden) < 1:
            raise InputError(f"Attention-Reg fc_hidden: expected one or more positive sizes, got {self.fc_hidden}")
        if not (isinstance(self.output_scale, (int, float)) and math.isfinite(self.output_scale) and self.output_scale > 0):
            raise InputError(f"Attention-Reg output_scale: expected a positive number, got {self.output_scale!r}")

    @property
    def feature_size(self) -> tuple:
        """(D, H, W) of the feature maps: two max-pools, strides (2, 2, 2) then (1, 2, 2), kernel 3, pad 1."""
        d, h, w = self.input_size
        pool = lambda n: (n - 1) // 2 + 1  # noqa: E731 - kernel 3, stride 2, padding 1
        return (pool(d), pool(pool(h)), pool(pool(w)))

    @property
    def positions(self) -> int:
        d, h, w = self.feature_size
        return d * h * w

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("input_size", "fc_hidden", "reg_channels"):
            d[key] = list(d[key])
        return d


# "original": the paper's network. "half": half resolution (input 16x48x48, same widths) for CPU
# training, about 1/20 of the original's compute (1,152 attention positions instead of 9,216).
# "tiny": for tests.
PRESETS: dict[str, AttentionRegConfig] = {
    "original": AttentionRegConfig(),
    "half": AttentionRegConfig(input_size=(16, 48, 48)),
    "tiny": AttentionRegConfig(width=8, inner=4, input_size=(8, 24, 24), fc_hidden=(32, 16), reg_channels=(8, 4)),
}


def preset(name: str, **overrides) -> AttentionRegConfig:
    """A preset ("original", "half", "tiny") with fields replaced by `overrides` (attention=False for Feature-Reg)."""
    if name not in PRESETS:
        raise InputError(f"Attention-Reg preset {name!r}: unknown; expected one of {list(PRESETS)}")
    return config_from_dict({"preset": name, **overrides})


def config_from_dict(raw: Mapping[str, Any] | AttentionRegConfig | None) -> AttentionRegConfig:
    """Config from a mapping: optional "preset" (default "original") plus field overrides."""
    if isinstance(raw, AttentionRegConfig):
        return raw
    raw = dict(raw or {})
    name = raw.pop("preset", "original")
    if name not in PRESETS:
        raise InputError(f"Attention-Reg preset {name!r}: unknown; expected one of {list(PRESETS)}")
    known = {f.name for f in fields(AttentionRegConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"Attention-Reg model config: unknown key(s) {unknown}; expected 'preset' or some of {sorted(known)}")
    if "attention" in raw and not isinstance(raw["attention"], bool):
        raise InputError(f"Attention-Reg attention: expected true or false, got {raw['attention']!r}")
    try:
        return replace(PRESETS[name], **raw)
    except (TypeError, ValueError) as exc:
        raise InputError(f"Attention-Reg model config {raw}: {exc}") from exc


# ---------------------------------------------------------------------------------------- network


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, explicit: bool = False) -> torch.Tensor:
    """y_i = sum_j softmax_j(q_i . k_j) v_j for ``q, k, v [B, N, C]`` -- the paper's eq. (1), no 1/sqrt(C).

    The default goes through ``scaled_dot_product_attention`` (scale=1.0), which never holds the N x N
    matrix (9,216^2 per sample for the original); ``explicit=True`` forms it (tests, visualisation).
    """
    if explicit:
        weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return weights @ v
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


class CrossModalAttention(nn.Module):
    """Z = ReLU(BN(W_z(Y)) + P), Y = attention with queries from the cross-modal input C and keys and
    values from the primary input P (1x1x1 convolutions theta, phi, g to `inner` channels)."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.theta = nn.Conv3d(width, inner, 1)
        self.phi = nn.Conv3d(width, inner, 1)
        self.g = nn.Conv3d(width, inner, 1)
        self.w_z = nn.Conv3d(inner, width, 1)
        self.bn = nn.BatchNorm3d(width)
        self.explicit = False  # True: form the attention matrix (tests compare both forms)

    def forward(self, primary: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = primary.shape
        q = self.theta(cross).flatten(2).transpose(1, 2)  # [B, N, inner]
        k = self.phi(primary).flatten(2).transpose(1, 2)
        v = self.g(primary).flatten(2).transpose(1, 2)
        y = cross_attention(q, k, v, explicit=self.explicit)
        y = y.transpose(1, 2).reshape(b, -1, d, h, w)
        return F.relu(self.bn(self.w_z(y)) + primary)


def _feature_extractor(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool3d(3, stride=2, padding=1),
        nn.Conv3d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool3d(3, stride=(1, 2, 2), padding=1),
    )


class AttentionReg(nn.Module):
    """Attention-Reg (config.attention True) or Feature-Reg (False); see the module docstring."""

    def __init__(self, config: AttentionRegConfig | Mapping | None = None):
        super().__init__()
        config = config_from_dict(config)
        self.config = config
        c, r1, r2 = config.width, *config.reg_channels
        self.extract_fixed = _feature_extractor(c)
        self.extract_moving = _feature_extractor(c)
        if config.attention:
            # One block per direction (the paper's two blocks): each modality's features queried by the other's.
            self.attend_fixed = CrossModalAttention(c, config.inner)
            self.attend_moving = CrossModalAttention(c, config.inner)
        self.fuse = nn.Sequential(
            nn.BatchNorm3d(2 * c),
            nn.Conv3d(2 * c, r1, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(r1, r2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(r2, 1, 3, padding=1),
            nn.BatchNorm3d(1),
        )
        layers: list[nn.Module] = [nn.Flatten(), nn.ReLU()]
        n_in = config.positions
        for n_out in config.fc_hidden:
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
            n_in = n_out
        layers.append(nn.Linear(n_in, 6))
        self.head = nn.Sequential(*layers)

    def set_explicit_attention(self, explicit: bool) -> None:
        for m in self.modules():
            if isinstance(m, CrossModalAttention):
                m.explicit = bool(explicit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (2, *self.config.input_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise InputError(f"Attention-Reg input: expected a tensor [B, {', '.join(map(str, expected))}] "
                             f"(MRI or label, TRUS; z, y, x), got {tuple(x.shape)}")
        f = self.extract_fixed(x[:, 0:1])
        m = self.extract_moving(x[:, 1:2])
        if self.config.attention:
            # Primary P = this modality's features (keys, values), cross C = the other's (queries).
            f, m = self.attend_fixed(f, m), self.attend_moving(m, f)
        return self.head(self.fuse(torch.cat([f, m], 1))) * self.config.output_scale


def build_model(config: AttentionRegConfig | Mapping | str | None = None) -> AttentionReg:
    """An AttentionReg from a config, a mapping or a preset name."""
    if isinstance(config, str):
        config = preset(config)
    return AttentionReg(config)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- correction algebra


def _as_transform(T, name: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)) or not geometry.is_rigid(T, atol=1e-5):
        raise InputError(f"{name}: expected a finite rigid 4x4 transform (fixed -> moving, LPS mm), got "
                         f"{'shape ' + str(T.shape) if T.shape != (4, 4) else 'a non-rigid matrix'}")
    return T


def correction_frame(centre_lps, axes=None) -> np.ndarray:
    """The correction frame F (4x4): columns of `axes` (3x3, the ROI's axis directions in LPS; identity
    when None; orthonormalised, so the ROI's spacing does not matter) and origin `centre_lps` (mm)."""
    c = np.asarray(centre_lps, dtype=np.float64).reshape(-1)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise InputError(f"centre of rotation: expected 3 finite LPS coordinates (mm), got {centre_lps!r}")
    A = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
    if A.shape != (3, 3) or not np.all(np.isfinite(A)):
        raise InputError(f"correction axes: expected a finite 3x3 matrix of axis directions, got shape {A.shape}")
    norms = np.linalg.norm(A, axis=0)
    if np.any(norms <= 0):
        raise InputError("correction axes: an axis direction has zero length")
    A = A / norms
    U, _, Vt = np.linalg.svd(A)
    A = U @ Vt
    if np.linalg.det(A) < 0:
        raise InputError("correction axes: expected a right-handed frame (positive determinant)")
    out = np.eye(4)
    out[:3, :3] = A
    out[:3, 3] = c
    return out


def correction_matrix(params, frame) -> np.ndarray:
    """F · Δ(params) · F⁻¹ for params (tx, ty, tz mm, rx, ry, rz deg, static xyz) in frame F."""
    p = np.asarray(params, dtype=np.float64).reshape(-1)
    if p.shape != (6,) or not np.all(np.isfinite(p)):
        raise InputError(f"correction parameters: expected 6 finite numbers (tx, ty, tz mm, rx, ry, rz deg), got {params!r}")
    frame = _as_transform(frame, "correction frame")
    delta = geometry.params_to_matrix(p, EULER, degrees=True)
    return frame @ delta @ geometry.invert_rigid(frame)


def apply_correction(T_cur, params, frame) -> np.ndarray:
    """T_new = T_cur · F · Δ(params) · F⁻¹ (see the module docstring); float64 4x4."""
    T_cur = _as_transform(T_cur, "current transform")
    return T_cur @ correction_matrix(params, frame)


def correction_target(T_init, T_true, frame) -> np.ndarray:
    """The 6 parameters Δ with apply_correction(T_init, Δ, frame) == T_true: Δ = F⁻¹ T_init⁻¹ T_true F."""
    T_init = _as_transform(T_init, "initial transform")
    T_true = _as_transform(T_true, "true transform")
    frame = _as_transform(frame, "correction frame")
    delta = geometry.invert_rigid(frame) @ geometry.invert_rigid(T_init) @ T_true @ frame
    return np.asarray(geometry.matrix_to_params(delta, EULER, degrees=True), dtype=np.float64)
