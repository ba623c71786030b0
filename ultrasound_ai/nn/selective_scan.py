"""Mamba's selective scan: a sequential reference, a chunked parallel scan for CPU, and a backend switch.

The recurrence, per batch b, channel d and state n (Gu & Dao 2023)::

    delta  = softplus(delta + delta_bias)           (bias and softplus optional)
    h_t    = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t    = sum_n C_t[n] * h_t[n] + D[d] * u_t
    out_t  = y_t * silu(z_t)                          (gating optional)

Every function here has the signature and semantics of ``mamba_ssm``'s ``selective_scan_fn`` so that the
backends are interchangeable:

    u      [B, D, L]    input
    delta  [B, D, L]    step sizes (before bias / softplus)
    A      [D, N]       real; Mamba uses A = -exp(A_log) < 0, so every decay exp(delta*A) is <= 1
    B, C   [D, N] (constant), [B, N, L] (input-dependent) or [B, G, N, L] (G groups of D/G channels)
    D      [D] or None, z [B, D, L] or None, delta_bias [D] or None
    returns out [B, D, L] (dtype of u), and with return_last_state the state h_L [B, D, N] (float32, or
    float64 for float64 inputs), as mamba_ssm does.

One argument goes beyond mamba_ssm's: ``initial_state`` [B, D, N], the state h_0 before the first step
(zeros when None). Passing the last state of one piece of a sequence as the initial state of the next
scans a long sequence piece by piece with the result of one scan (streaming).

`selective_scan_chunked` never materialises a [B, D, L, N] tensor for the whole sequence: it walks the
sequence in chunks of `chunk_size` steps, carries the state between chunks, and inside a chunk runs a
parallel scan written with cumulative sums of the log-decays S = cumsum(delta*A): h_t = exp(S_t) *
(h0 + cumsum(exp(-S_s) * delta_s*B_s*u_s)) while |S| stays moderate within the chunk; a chunk that decays
more steeply is split into pieces that do, and where they would be too short a Hillis-Steele doubling scan
over products of decays <= 1 is used. Either way no exponential overflows and exp(S_t)*exp(-S_s) stays accurate. With gradients enabled each
chunk is recomputed in the backward pass (activation checkpointing), so training memory is O(B*D*L)
plus one chunk's O(B*D*chunk*N) as well.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ultrasound_ai.core.errors import InputError

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_chunked",
    "with_initial_state",
    "mamba_ssm_available",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "mamba_ssm", "ref")

Tensor = torch.Tensor
ScanResult = Union[Tensor, Tuple[Tensor, Tensor]]


# ------------------------------------------------------------------------------------------------
# input checks and common preparation
# ------------------------------------------------------------------------------------------------


def _check_initial_state(u, A, initial_state):
    if initial_state is None:
        return
    want = (u.shape[0], u.shape[1], A.shape[1])
    if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
        got = list(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
        raise InputError(f"selective scan: initial_state must have shape [B, D, N] = {list(want)}, got {got}")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"selective scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise InputError(f"selective scan: u must have shape [B, D, L], got {list(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise InputError(f"selective scan: delta must have the shape of u {list(u.shape)}, got {list(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise InputError(f"selective scan: A must have shape [D={d}, N], got {list(A.shape)}")
    if A.is_complex():
        raise InputError("selective scan: A must be real (complex A is not supported)")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2:
            ok = tuple(t.shape) == (d, n)
        elif t.dim() == 3:
            ok = tuple(t.shape) == (b, n, L)
        elif t.dim() == 4:
            ok = t.shape[0] == b and t.shape[2] == n and t.shape[3] == L and t.shape[1] >= 1 and d % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise InputError(
                f"selective scan: {name} must have shape [D={d}, N={n}], [B={b}, N={n}, L={L}] or "
                f"[B={b}, G, N={n}, L={L}] with G dividing D, got {list(t.shape)}")
    if D is not None and tuple(D.shape) != (d,):
        raise InputError(f"selective scan: D must have shape [{d}], got {list(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise InputError(f"selective scan: z must have the shape of u {list(u.shape)}, got {list(z.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (d,):
        raise InputError(f"selective scan: delta_bias must have shape [{d}], got {list(delta_bias.shape)}")


def _compute_dtype(u: Tensor) -> torch.dtype:
    # mamba_ssm computes in float32 for fp16/bf16/fp32 inputs; float64 stays float64 (tests use it).
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _as_btn(M: Tensor, b: int, d: int, dtype) -> Tensor:
    """B or C in any accepted layout -> [b, d or 1, L, n] (or [1, d, 1, n] when constant)."""
    M = M.to(dtype)
    if M.dim() == 2:  # [D, N] constant over time and batch
        return M[None, :, None, :]
    if M.dim() == 3:  # [B, N, L] shared by every channel
        return M.transpose(1, 2).unsqueeze(1)
    g = M.shape[1]  # [B, G, N, L]: channel c uses group c // (D / G)
    M = M.permute(0, 1, 3, 2)  # [b, g, L, n]
    if g == 1:
        return M
    return M.repeat_interleave(d // g, dim=1)


def _prepare_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool, dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(u: Tensor, y: Tensor, D: Optional[Tensor], z: Optional[Tensor], dtype) -> Tensor:
    out = y
    if D is not None:
        out = out + u.to(dtype) * D.to(dtype)[None, :, None]
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return out.to(u.dtype)


# ------------------------------------------------------------------------------------------------
# reference: a plain loop over time (the numerics oracle)
# ------------------------------------------------------------------------------------------------


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None) -> ScanResult:
    """The selective scan as a sequential loop over time; see the module docstring for shapes.

    Slow (one step of Python per time step) and O(B*D*N) in state: the oracle the fast paths are
    tested against.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    _check_initial_state(u, A, initial_state)
    dtype = _compute_dtype(u)
    b, d, L = u.shape
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uf = u.to(dtype)
    Af = A.to(dtype)
    Bt = _as_btn(B, b, d, dtype)  # [b|1, d|1, L|1, n]
    Ct = _as_btn(C, b, d, dtype)
    h = uf.new_zeros(b, d, Af.shape[1]) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(L):
        bt = Bt[:, :, t if Bt.shape[2] > 1 else 0]
        ct = Ct[:, :, t if Ct.shape[2] > 1 else 0]
        dt = delta[:, :, t, None]
        h = torch.exp(dt * Af) * h + dt * bt * uf[:, :, t, None]
        ys.append((h * ct).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(b, d, 0)
    out = _finish(u, y, D, z, dtype)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# chunked parallel scan
# ------------------------------------------------------------------------------------------------


def _doubling_scan(uf: Tensor, delta: Tensor, A: Tensor, Bt: Tensor, Ct: Tensor, h0: Tensor):
    """Hillis-Steele scan of one block; safe for any decay magnitude (used where the cumsum form is not).

    Shapes as `_scan_chunk`. O(T log T) work on [b, d, T, n].
    """
    T = uf.shape[-1]
    a = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # [b, d, T, n] per-step decays, <= 1 for A <= 0
    x = (delta * uf).unsqueeze(-1) * Bt  # [b, d, T, n] per-step increments
    # After the step with offset k, (a_t, x_t) compose the steps (t-2k, t]: x_t is the state at t from a
    # zero state 2k steps back, a_t the product of the decays over those steps.
    k = 1
    while k < T:
        x = torch.cat([x[:, :, :k], x[:, :, k:] + a[:, :, k:] * x[:, :, :-k]], dim=2)
        a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], dim=2)
        k *= 2
    h = x + a * h0.unsqueeze(2)  # a_t is now the decay from the block start to t
    return (h * Ct).sum(-1), h[:, :, -1]


# exp(+-S) must stay finite with room for the increments it multiplies (float32 overflows near 88.7).
_SAFE_LOG_DECAY = {torch.float32: 40.0, torch.float64: 300.0}
# A chunk that decays too steeply is split into at most _MAX_PIECES pieces of at least _MIN_SPLIT steps, else
# scanned by doubling.
_MAX_PIECES = 2
_MIN_SPLIT = 8


def _steps(M: Tensor, s: int, e: int) -> Tensor:
    """Time steps s:e of B or C in the [b|1, d|1, T|1, n] layout (a constant one is shared by all steps)."""
    return M[:, :, s:e] if M.shape[2] > 1 else M


def _scan_chunk(uf: Tensor, delta: Tensor, A: Tensor, Bt: Tensor, Ct: Tensor, h0: Tensor):
    """One chunk. uf, delta [b, d, T]; A [d, n]; Bt, Ct [b|1, d|1, T|1, n]; h0 [b, d, n].

    Returns y [b, d, T] (C.h only) and the last state [b, d, n].

    With S_t = cumsum(delta*A) inside the chunk (the log of the decay from the chunk start),
    h_t = exp(S_t) * (h0 + cumsum_s(exp(-S_s) * delta_s*B_s*u_s)): a handful of O(T) passes. The
    factorised exp(S_t)*exp(-S_s) = exp(S_t - S_s) <= 1 is exact up to rounding while |S| stays moderate;
    a chunk that decays more steeply than that is split into pieces that do not, and where they would be
    shorter than `_MIN_SPLIT` steps uses the doubling scan, which only multiplies decays <= 1 (stable for
    any decay).
    """
    S = torch.cumsum(delta.unsqueeze(-1) * A[:, None, :], dim=2)  # [b, d, T, n]
    R = None
    if S.numel():
        # With delta >= 0 and A <= 0 (Mamba's case) S only decreases along time: its last step is the
        # extreme (no pass over the chunk to find it), and measuring S from half that, R = S_T / 2, halves
        # the largest exponent: h_t = exp(S_t - R) * (exp(R) h0 + cumsum(exp(R - S_s) x_s)).
        if bool((A <= 0).all()) and bool((delta >= 0).all()):
            R = 0.5 * S[:, :, -1:]
            extreme = float(R.detach().abs().amax())
        else:
            extreme = float(S.detach().abs().amax())
        if extreme > _SAFE_LOG_DECAY[S.dtype]:
            # Just over the bound, k pieces decay about k times less steeply each and stay on the fast path
            # (a piece that still does not is split again). Far over it, so many pieces would cost more calls
            # than the doubling scan's log2(T) passes.
            T = uf.shape[-1]
            k = math.ceil(extreme / _SAFE_LOG_DECAY[S.dtype])
            if k > _MAX_PIECES or T // k < _MIN_SPLIT:
                return _doubling_scan(uf, delta, A, Bt, Ct, h0)
            ys, h = [], h0
            for s in range(0, T, -(-T // k)):
                e = min(s - (-T // k), T)
                y, h = _scan_chunk(uf[..., s:e], delta[..., s:e], A, _steps(Bt, s, e), _steps(Ct, s, e), h)
                ys.append(y)
            return torch.cat(ys, dim=-1), h
    x = (delta * uf).unsqueeze(-1) * Bt  # [b, d, T, n] per-step increments
    h0 = h0.unsqueeze(2) if R is None else h0.unsqueeze(2) * torch.exp(R)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (uf, delta, A, Bt, Ct, h0)):
        E = torch.exp(-S if R is None else R - S)
        h = (torch.cumsum(x * E, dim=2) + h0) / E
    else:  # the same formula in place (no autograd record to keep): fewer passes over [b, d, T, n]
        E = (S if R is None else S.sub_(R)).neg_().exp_()
        h = torch.cumsum(x.mul_(E), dim=2).add_(h0).div_(E)
    return (h * Ct).sum(-1), h[:, :, -1]


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, chunk_size: int = 64,
                           checkpoint: Optional[bool] = None) -> ScanResult:
    """The selective scan in chunks of `chunk_size` time steps with a parallel scan inside each chunk.

    Same arguments and results as `selective_scan_ref` (module docstring). Peak memory is
    O(B*D*L) for inputs/outputs plus O(B*D*chunk_size*N) for one chunk, whatever L.
    `checkpoint`: recompute each chunk in the backward pass instead of keeping its [B, D, chunk, N]
    intermediates; None = on when gradients are being recorded and there is more than one chunk.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    _check_initial_state(u, A, initial_state)
    if int(chunk_size) < 1:
        raise InputError(f"selective scan: chunk_size must be >= 1, got {chunk_size}")
    chunk_size = int(chunk_size)
    dtype = _compute_dtype(u)
    b, d, L = u.shape
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uf = u.to(dtype)
    Af = A.to(dtype)
    Bt = _as_btn(B, b, d, dtype)
    Ct = _as_btn(C, b, d, dtype)
    n = Af.shape[1]
    h = uf.new_zeros(b, d, n) if initial_state is None else initial_state.to(dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state))
    if checkpoint is None:
        checkpoint = needs_grad and L > chunk_size
    checkpoint = bool(checkpoint) and needs_grad
    ys = []
    for s in range(0, L, chunk_size):
        e = min(s + chunk_size, L)
        args = (uf[:, :, s:e], delta[:, :, s:e], Af, _steps(Bt, s, e), _steps(Ct, s, e), h)
        if checkpoint:
            from torch.utils.checkpoint import checkpoint as _ckpt

            y, h = _ckpt(_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1) if ys else uf.new_zeros(b, d, 0)
    out = _finish(u, y, D, z, dtype)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# backend switch
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mamba_ssm_fn():
    """mamba_ssm's CUDA selective_scan_fn, or None. Any failure (no package, no CUDA build, no triton,
    an ABI mismatch raising anything at all) means None: the engine must import and run without it."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore

        return selective_scan_fn
    except BaseException:  # noqa: BLE001 - an optional accelerator; every failure means "absent"
        return None


def mamba_ssm_available() -> bool:
    """True when mamba_ssm's CUDA selective scan imports (it can then be used for CUDA tensors)."""
    return _mamba_ssm_fn() is not None


def with_initial_state(scan_fn, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None) -> ScanResult:
    """A scan that starts from zero (`scan_fn`, e.g. mamba_ssm's kernel, which takes no initial state) plus
    the contribution of `initial_state`.

    The recurrence is linear in h: started from h0 instead of 0, every state gains exp(S_t) * h0 with
    S_t = sum_{s<=t} delta_s * A, so out_t gains (C_t . exp(S_t) h0) * SiLU(z_t) and the last state
    exp(S_L) * h0. This materialises one [B, D, L, N] decay tensor: meant for pieces of a stream.
    """
    if initial_state is None:
        return scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    _check_initial_state(u, A, initial_state)
    out, last = scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    dtype = _compute_dtype(u)
    b, d, L = u.shape
    h0 = initial_state.to(dtype)
    dl = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    decay = torch.exp(torch.cumsum(dl.unsqueeze(-1) * A.to(dtype)[:, None, :], dim=2))  # [b, d, L, n]
    extra = (decay * h0.unsqueeze(2) * _as_btn(C, b, d, dtype)).sum(-1)
    if z is not None:
        extra = extra * F.silu(z.to(dtype))
    out = (out.to(dtype) + extra).to(u.dtype)
    if not return_last_state:
        return out
    return out, last.to(dtype) + (decay[:, :, -1] * h0 if L else h0)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, *, backend: str = "auto",
                   chunk_size: int = 64) -> ScanResult:
    """The selective scan through the chosen backend (module docstring for shapes and semantics).

    backend: "auto" = mamba_ssm's CUDA kernel for CUDA tensors in fp32/fp16/bf16 when it imports,
    else the chunked torch scan; "torch" = the chunked torch scan; "mamba_ssm" = the CUDA kernel
    (InputError if it does not import or the tensors are not on CUDA); "ref" = the sequential loop.
    With the kernel, an `initial_state` is added by `with_initial_state`.
    """
    if backend not in BACKENDS:
        raise InputError(f"selective scan: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state)
    if backend in ("auto", "mamba_ssm"):
        fn = _mamba_ssm_fn()
        usable = (fn is not None and isinstance(u, torch.Tensor) and u.is_cuda
                  and u.dtype in (torch.float32, torch.float16, torch.bfloat16))
        if usable:
            _check_inputs(u, delta, A, B, C, D, z, delta_bias)

            def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
                # The kernel wants contiguous inputs and float32 A, D and delta_bias.
                return fn(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(),
                          C.contiguous(), None if D is None else D.float().contiguous(),
                          None if z is None else z.contiguous(),
                          None if delta_bias is None else delta_bias.float().contiguous(),
                          delta_softplus, return_last_state)

            return with_initial_state(kernel, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state, initial_state)
        if backend == "mamba_ssm":
            why = ("mamba_ssm does not import here" if fn is None
                   else "the inputs must be fp32/fp16/bf16 tensors on a CUDA device")
            raise InputError(f"selective scan: backend='mamba_ssm' was asked for but {why}; "
                             "use backend='auto' or 'torch'")
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, chunk_size=chunk_size)
