"""Clutter filters for ULM blocks: SVD through the Gram matrix (torch) and a temporal Butterworth band-pass.

SVD filter. A block of T frames [T, Z, X] is the Casorati matrix A [T, P] (one row per frame). Its
right singular vectors are the eigenvectors of the T x T Gram matrix G = conj(A) A^T, so forming G
(one matrix product, T^2 P) and decomposing a T x T matrix replaces a full SVD of a P x T matrix.
Singular components are numbered 0, 1, ... by decreasing singular value; tissue lives in the first
few. `svd_filter(block, cutoff=k)` removes components 0..k-1 (PALA's "keep 5..T" is k = 4);
`cutoff=(k1, k2)` keeps the band k1..k2-1 only.

When only a few leading components have to be removed (the usual case) a full eigendecomposition is
not needed: a block subspace iteration on G (T^2 per vector and step) converges in a few dozen steps
because tissue components are far above the blood/noise floor. Its convergence is checked with a
residual bound on the subspace angle; when it is not reached (flat spectrum) we fall back to eigh,
so the result always equals the SVD filter's up to floating-point error.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["svd_filter", "svd_basis", "bandpass_filter", "parse_cutoff"]

# Subspace iteration: oversampling and stopping rule (sin of the subspace angle bound).
_OVERSAMPLE = 16
_MAX_ITERS = 60
_ANGLE_TOL = 1e-6


@contextlib.contextmanager
def _few_threads(small: bool):
    """Run small T x T linear algebra on one thread: for matrices this size, thread start-up and
    synchronisation cost more than they save (and are ruinous on a loaded machine)."""
    import torch

    if not small:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def parse_cutoff(cutoff, n_frames: int) -> tuple[int, int]:
    """`k` -> (k, T); `(k1, k2)` -> (k1, k2) (k2 None or <= 0 means T). Validated against T."""
    if cutoff is None:
        return 0, n_frames
    if np.isscalar(cutoff):
        k1, k2 = int(cutoff), n_frames
    else:
        c = list(cutoff)
        if len(c) != 2:
            raise InputError(f"svd cutoff: expected k or (k1, k2), got {cutoff!r}")
        k1 = int(c[0])
        k2 = n_frames if c[1] is None or int(c[1]) <= 0 else int(c[1])
    if k1 < 0 or k2 > n_frames or k1 >= k2:
        raise InputError(f"svd cutoff: the kept band [{k1}, {k2}) must satisfy 0 <= k1 < k2 <= T = {n_frames} "
                         f"(components are 0-based, by decreasing singular value)")
    return k1, k2


def _as_tensor(block, device):
    import torch

    if isinstance(block, np.ndarray):
        arr = block
    elif isinstance(block, torch.Tensor):
        arr = None
    else:
        arr = np.asarray(block)
    if arr is not None:
        if arr.dtype.kind not in "fc":
            raise InputError(f"clutter filter input: expected complex64 IQ (or float32) [T, Z, X], got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.complex64 if arr.dtype.kind == "c" else np.float32,
                                                             copy=False)))
    else:
        t = block
        if not (t.is_complex() or t.is_floating_point()):
            raise InputError(f"clutter filter input: expected a complex or float tensor, got {t.dtype}")
        t = t.to(torch.complex64 if t.is_complex() else torch.float32)
    if t.ndim != 3:
        raise InputError(f"clutter filter input: expected frames [T, Z, X], got shape {tuple(t.shape)}")
    if min(t.shape) < 1:
        raise InputError(f"clutter filter input: empty block, shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return t


def _gram(a):
    """G = conj(A) A^T for A [T, P] (complex64 or float32), in float64/complex128 for the eigen-solve."""
    import torch

    if not a.is_complex():
        return (a @ a.T).double()
    if a.device.type == "cpu":
        # Real arithmetic is ~1.7x faster than cgemm on CPU: Re G = Ar Ar^T + Ai Ai^T (one product of
        # the stacked [Ar | Ai]), Im G = M - M^T with M = Ar Ai^T.
        ar, ai = a.real, a.imag
        b = torch.cat([ar, ai], dim=1)
        re = b @ b.T
        m = ar @ ai.T
        return torch.complex(re.double(), (m - m.T).double())
    return (a.conj() @ a.T).to(torch.complex128)


def _top_eigvecs(g, r: int):
    """Eigenvectors of the r largest eigenvalues of Hermitian g (columns), by subspace iteration with
    a convergence check; None when it does not converge (the caller then uses eigh)."""
    import torch

    n = g.shape[0]
    m = min(n, r + _OVERSAMPLE)
    if m >= n // 2:
        return None
    gen = torch.Generator(device="cpu").manual_seed(1234)  # fixed start: identical results run to run
    q = torch.randn(n, m, generator=gen, dtype=torch.float64).to(device=g.device, dtype=g.dtype)
    q, _ = torch.linalg.qr(q)
    for it in range(_MAX_ITERS):
        z = g @ q
        h = q.conj().T @ z
        h = (h + h.conj().T) / 2
        w, s = torch.linalg.eigh(h)
        w, s = w.flip(0), s.flip(1)
        v, gv = q @ s, z @ s  # Ritz vectors and G times them (no extra product)
        if float(w[r - 1].real) <= 0:
            return None
        if it == 0:
            # Convergence factor per step ~ lambda_(m+1) / lambda_r; the last Ritz value stands in for
            # lambda_(m+1). Without a clear gap (noise-like spectrum) go straight to eigh.
            ratio = float(w[m - 1].real / w[r - 1].real)
            if ratio ** _MAX_ITERS > 1e-8:
                return None
        resid = torch.linalg.vector_norm(gv[:, :r] - v[:, :r] * w[:r], dim=0)
        gap = float(w[r - 1].real - w[r].real)
        # sin(angle) between the computed and the true top-r subspace <= residual / gap (Davis-Kahan).
        if gap > 0 and float(resid.max()) / gap < _ANGLE_TOL:
            return v[:, :r]
        q, _ = torch.linalg.qr(gv)
    return None


def svd_basis(block, cutoff, device=None):
    """(V_kept or V_removed, mode) for the block: mode 'remove' (columns to project out) or 'keep'.

    V columns are right singular vectors (length T) of the Casorati matrix, as complex128/float64.
    """
    import torch

    x = _as_tensor(block, device)
    t = x.shape[0]
    k1, k2 = parse_cutoff(cutoff, t)
    a = x.reshape(t, -1)
    g = _gram(a)
    with _few_threads(g.device.type == "cpu"):
        if k2 == t and k1 > 0:
            v = _top_eigvecs(g, k1)
            if v is not None:
                return v, "remove"
    with _few_threads(g.device.type == "cpu" and t <= 256):
        w, vecs = torch.linalg.eigh(g)
    vecs = vecs.flip(1)  # decreasing eigenvalue = decreasing singular value
    if (k2 - k1) <= t - (k2 - k1):
        return vecs[:, k1:k2], "keep"
    return torch.cat([vecs[:, :k1], vecs[:, k2:]], dim=1), "remove"


def svd_filter(block, cutoff=4, device=None):
    """SVD clutter filter of one block [T, Z, X] (complex64 IQ, or float32), as numpy or torch.

    cutoff: k (remove the k largest singular components) or (k1, k2) (keep components k1..k2-1).
    device: torch device for the computation (None: where the tensor is; numpy input: CPU).
    Returns the same kind as the input (numpy complex64/float32, or a tensor on `device`).
    """
    import torch

    was_numpy = not isinstance(block, torch.Tensor)
    x = _as_tensor(block, device)
    t = x.shape[0]
    k1, k2 = parse_cutoff(cutoff, t)
    if (k1, k2) == (0, t):
        out = x.clone()
    else:
        basis, mode = svd_basis(x, (k1, k2))
        a = x.reshape(t, -1)
        # Casorati X = A^T [P, T]; filtered X V V^H  <=>  A_f = conj(V) V^T A (projection on the rows' side).
        v = basis.to(a.dtype)
        coeff = v.T @ a                      # [r, P] components' time courses projected on the pixels
        proj = v.conj() @ coeff              # [T, P]
        out = (proj if mode == "keep" else a - proj).reshape(x.shape)
    if was_numpy:
        return out.cpu().numpy()
    return out


def bandpass_filter(block, frame_rate_hz: float, band=(50.0, 249.0), order: int = 2, axis: int = 0):
    """Zero-phase Butterworth band-pass along time (scipy butter + sosfiltfilt), complex or real input.

    band = (lo, hi) in Hz; lo <= 0 gives a low-pass at hi. hi must stay below Nyquist (frame_rate / 2).
    """
    from scipy import signal

    x = np.asarray(block)
    if x.dtype.kind not in "fc":
        raise InputError(f"band-pass input: expected complex64 IQ or float frames, got dtype {x.dtype}")
    try:
        fr = float(frame_rate_hz)
    except (TypeError, ValueError):
        raise InputError(f"band-pass: frame_rate_hz must be a positive number, got {frame_rate_hz!r}") from None
    if not np.isfinite(fr) or fr <= 0:
        raise InputError(f"band-pass: frame_rate_hz must be a positive number, got {frame_rate_hz!r}")
    try:
        lo, hi = (float(b) for b in band)
    except (TypeError, ValueError):
        raise InputError(f"band-pass: band must be two frequencies (lo, hi) in Hz, got {band!r}") from None
    nyq = fr / 2.0
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= max(lo, 0.0):
        raise InputError(f"band-pass: band must satisfy 0 <= lo < hi, got ({lo:g}, {hi:g}) Hz")
    if hi >= nyq:
        raise InputError(f"band-pass: upper frequency {hi:g} Hz must be below Nyquist ({nyq:g} Hz = frame rate "
                         f"{fr:g} Hz / 2)")
    if int(order) < 1:
        raise InputError(f"band-pass: order must be >= 1, got {order}")
    if lo > 0:
        sos = signal.butter(int(order), [lo, hi], btype="bandpass", fs=fr, output="sos")
    else:
        sos = signal.butter(int(order), hi, btype="lowpass", fs=fr, output="sos")
    n = x.shape[axis]
    padlen = 3 * (2 * len(sos) + 1)
    if n <= padlen:
        raise InputError(f"band-pass: the block has {n} frames; the filter needs more than {padlen}")
    if x.dtype.kind == "c":
        out = signal.sosfiltfilt(sos, x.real, axis=axis) + 1j * signal.sosfiltfilt(sos, x.imag, axis=axis)
        return out.astype(np.complex64 if x.dtype == np.complex64 else x.dtype)
    return signal.sosfiltfilt(sos, x, axis=axis).astype(x.dtype)
