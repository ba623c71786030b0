"""The Mamba block (Gu & Dao 2023) on the engine's selective scan, with mamba_ssm's parameter names.

`Mamba(d_model)` maps hidden states [B, L, d_model] -> [B, L, d_model]:

    x, z = in_proj(h).chunk(2)                       d_inner = expand * d_model each
    x    = silu(causal depthwise conv1d(x))          kernel d_conv, left padding d_conv - 1
    dt, B, C = x_proj(x).split(dt_rank, N, N)
    delta = dt_proj.weight @ dt                       (its bias goes in as delta_bias, then softplus)
    y    = selective_scan(x, delta, A = -exp(A_log), B, C, D, z, delta_bias, delta_softplus=True)
    out  = out_proj(y)

Parameter names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) and shapes are those of
``mamba_ssm.modules.mamba_simple.Mamba``, so its state dicts load with `load_state_dict`. The scan
branch (conv1d, x_proj, dt_proj, A_log, D) is also available on its own (`ScanBranch`), which the
multi-directional ReMamba blocks use with separate parameters per scan order. A scan branch can also
run over a long sequence piece by piece: `ScanState` carries the causal convolution's last inputs and the
scan's state from one piece to the next, and the pieces' outputs equal one pass over the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.nn.selective_scan import selective_scan

__all__ = ["Mamba", "ScanBranch", "ScanState", "init_scan_parameters", "scan_branch_forward"]


def init_scan_parameters(module: nn.Module, d_inner: int, d_state: int = 16, d_conv: int = 4,
                         dt_rank: int = 8, dt_min: float = 0.001, dt_max: float = 0.1,
                         dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                         conv_bias: bool = True) -> None:
    """Register conv1d, x_proj, dt_proj, A_log and D on `module` with Mamba's initialisation.

    dt_proj: weight uniform (or constant) with std dt_rank^-0.5 * dt_scale; bias = softplus^-1(dt) with
    dt log-uniform in [dt_min, dt_max] (floored at dt_init_floor), so that softplus(bias) starts as dt.
    A_log: S4D-real, A = -[1, 2, ..., d_state] for every channel. D: ones.
    """
    if dt_init not in ("random", "constant"):
        raise InputError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
    if not 0 < dt_min <= dt_max:
        raise InputError(f"Mamba: expected 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    module.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=d_conv - 1,
                              bias=conv_bias)
    module.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
    module.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
    std = dt_rank ** -0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            module.dt_proj.weight.fill_(std)
        else:
            module.dt_proj.weight.uniform_(-std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        # softplus^-1(dt) = dt + log(1 - exp(-dt)), written with expm1 for small dt.
        module.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    module.dt_proj.bias._no_reinit = True  # mamba_ssm's marker: keep this init if the model re-inits
    A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    module.A_log = nn.Parameter(torch.log(A))
    module.A_log._no_weight_decay = True
    module.D = nn.Parameter(torch.ones(d_inner))
    module.D._no_weight_decay = True
    module.d_inner, module.d_state, module.dt_rank, module.d_conv = d_inner, d_state, dt_rank, d_conv


def _at_least_fp32(p: torch.Tensor) -> torch.Tensor:
    # As mamba_ssm: A, D and the dt bias enter the scan in float32 even in half-precision models
    # (float64 models keep float64).
    return p if p.dtype == torch.float64 else p.float()


@dataclass
class ScanState:
    """What a scan branch carries from one piece of a sequence to the next.

    conv: [B, d_inner, d_conv - 1], the last inputs of the causal convolution (its left context);
    ssm: [B, d_inner, N], the selective scan's state after the piece's last step.
    """

    conv: torch.Tensor
    ssm: torch.Tensor


def scan_branch_forward(module: nn.Module, x: torch.Tensor, z: Optional[torch.Tensor] = None, *,
                        backend: str = "auto", chunk_size: int = 64, state: Optional[ScanState] = None,
                        return_state: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, ScanState]]:
    """conv1d + SiLU + selective scan of x [B, d_inner, L] with `module`'s scan parameters.

    z [B, d_inner, L] (optional) gates the output by SiLU(z). Returns y [B, d_inner, L], and with
    return_state the `ScanState` after the last step. `state` (from the previous piece of the sequence;
    None = the sequence starts here) continues a sequence.
    """
    L = x.shape[-1]
    if state is None and not return_state:
        xc = module.conv1d(x)[..., :L]  # keep the first L outputs: causal (left-padded) convolution
        new_conv = None
    else:
        k = module.d_conv
        left = x.new_zeros(x.shape[0], x.shape[1], k - 1) if state is None else state.conv.to(x.dtype)
        xp = torch.cat([left, x], dim=-1)  # the left context replaces the zero padding
        xc = F.conv1d(xp, module.conv1d.weight, module.conv1d.bias, groups=module.conv1d.groups)
        new_conv = xp[..., xp.shape[-1] - (k - 1):]
    x = F.silu(xc)
    x_dbl = module.x_proj(x.transpose(1, 2))  # [B, L, dt_rank + 2N]
    dt, Bm, Cm = torch.split(x_dbl, [module.dt_rank, module.d_state, module.d_state], dim=-1)
    delta = (dt @ module.dt_proj.weight.t()).transpose(1, 2)  # [B, d_inner, L]; bias goes to the scan
    A = -torch.exp(_at_least_fp32(module.A_log))
    out = selective_scan(x, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), _at_least_fp32(module.D), z=z,
                         delta_bias=_at_least_fp32(module.dt_proj.bias), delta_softplus=True,
                         return_last_state=return_state, initial_state=None if state is None else state.ssm,
                         backend=backend, chunk_size=chunk_size)
    if not return_state:
        return out
    y, h = out
    return y, ScanState(new_conv, h)


class ScanBranch(nn.Module):
    """The scan half of a Mamba block (conv1d, x_proj, dt_proj, A_log, D) on x [B, d_inner, L]."""

    def __init__(self, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 8, **init_kwargs):
        super().__init__()
        init_scan_parameters(self, d_inner, d_state, d_conv, dt_rank, **init_kwargs)
        self.backend = "auto"
        self.chunk_size = 64

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None, state: Optional[ScanState] = None,
                return_state: bool = False):
        """y [B, d_inner, L] (and the `ScanState` after it with return_state); see `scan_branch_forward`."""
        return scan_branch_forward(self, x, z, backend=self.backend, chunk_size=self.chunk_size, state=state,
                                   return_state=return_state)


class Mamba(nn.Module):
    """Mamba block: [B, L, d_model] -> [B, L, d_model] (module docstring). Defaults are mamba_ssm's."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, backend: str = "auto", chunk_size: int = 64):
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise InputError(f"Mamba: d_model, d_state, d_conv and expand must be >= 1, got "
                             f"{d_model}, {d_state}, {d_conv}, {expand}")
        self.d_model = d_model
        d_inner = int(expand * d_model)
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        init_scan_parameters(self, d_inner, d_state, d_conv, dt_rank, dt_min=dt_min, dt_max=dt_max,
                             dt_init=dt_init, dt_scale=dt_scale, dt_init_floor=dt_init_floor,
                             conv_bias=conv_bias)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, L, d_model] -> [B, L, d_model]."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise InputError(f"Mamba: expected hidden states [B, L, {self.d_model}], "
                             f"got {list(hidden_states.shape)}")
        xz = self.in_proj(hidden_states).transpose(1, 2)  # [B, 2*d_inner, L]
        x, z = xz.chunk(2, dim=1)
        y = scan_branch_forward(self, x, z, backend=self.backend, chunk_size=self.chunk_size)
        return self.out_proj(y.transpose(1, 2))
