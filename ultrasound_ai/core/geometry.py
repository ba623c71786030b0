"""Every rigid-transform conversion of the engine (docs/DATA_FORMATS.md, conventions).

Rigid transforms are 4x4 float64 numpy arrays ``[..., 4, 4]`` mapping column vectors:
``p_out = R @ p_in + t``. All functions are batched over leading dimensions and broadcast them as
numpy does. Units are millimetres; angles are radians unless ``degrees=True``.

The Euler, 6-DOF parameter, quaternion, rigid-algebra, series and sequence functions also accept
``torch.Tensor`` inputs: they then return tensors on the input's device and dtype and are
differentiable, so networks can use them in losses. A tiny array-namespace shim (``_Ops``) lets one
implementation serve both; numpy inputs (and lists) are computed in float64.

Euler conventions (``convention=``), angles ``a = (a0, a1, a2)``; ``Rx, Ry, Rz`` are the right-handed
elementary rotations about the fixed x, y, z axes::

    "xyz"  static (extrinsic) rotations about x by a0, then y by a1, then z by a2:
           R = Rz(a2) @ Ry(a1) @ Rx(a0).  scipy Rotation 'xyz' (lowercase).  Used by Attention-Reg,
           MoNet/FiMA ``series`` parameters and the sweep contract's ``imu_euler_deg``.
    "ZYX"  intrinsic Z, then the new Y, then the new X (pytorch3d ``euler_angles_to_matrix(a, "ZYX")``,
           TUS-REC): R = Rz(a0) @ Ry(a1) @ Rx(a2).  scipy 'ZYX' (uppercase).  Equal to "xyz" with the
           angle order reversed.
    "YZX"  intrinsic Y, then Z, then X (MoGLo-Net, pytorch3d reading): R = Ry(a0) @ Rz(a1) @ Rx(a2).
           scipy 'YZX'.

``matrix_to_euler`` returns the middle angle in [-pi/2, pi/2] and the outer two in (-pi, pi]. At
gimbal lock (middle angle +-pi/2) only a sum or difference of the outer angles is defined: the angle of
the leftmost factor of R's product (a2 for "xyz", a0 for "ZYX" and "YZX") is set to 0 and the other
outer angle carries the rotation, so the matrix still round-trips.

Quaternions are (w, x, y, z), unit, with the sign chosen so that w >= 0.

LPS <-> RAS: only ``ultrasound_ai/mrml`` and writers of RAS outputs for Slicer should call those.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = [
    "EULER_CONVENTIONS",
    "LPS_TO_RAS",
    "make_rigid",
    "rotation",
    "translation",
    "invert_rigid",
    "is_rigid",
    "orthonormalize",
    "apply_transform",
    "compose",
    "identity",
    "euler_to_matrix",
    "matrix_to_euler",
    "params_to_matrix",
    "matrix_to_params",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "frame_reference_points",
    "pose_to_series",
    "series_to_pose",
    "relative_transform",
    "to_relative",
    "chain_relative",
    "normalize_to_first",
    "lps_to_ras_points",
    "ras_to_lps_points",
    "lps_to_ras_transform",
    "ras_to_lps_transform",
]

# ----------------------------------------------------------------------------------------------
# numpy / torch shim
# ----------------------------------------------------------------------------------------------


def _torch_module():
    # torch is only looked up if already imported: a tensor input implies it is.
    return sys.modules.get("torch")


def _is_tensor(x: Any) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


class _NumpyOps:
    is_torch = False

    def __init__(self):
        self.dtype = np.float64
        self.double = True

    def asarray(self, x, name):
        try:
            a = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: expected an array of real numbers ({exc})") from None
        return a

    sin = staticmethod(np.sin)
    cos = staticmethod(np.cos)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    atan2 = staticmethod(np.arctan2)
    where = staticmethod(np.where)

    @staticmethod
    def stack(xs, axis):
        return np.stack(xs, axis=axis)

    @staticmethod
    def concat(xs, axis):
        return np.concatenate(xs, axis=axis)

    @staticmethod
    def swap_last(x):
        return np.swapaxes(x, -1, -2)

    @staticmethod
    def cross(a, b):
        return np.cross(a, b, axis=-1)

    @staticmethod
    def all_finite(x):
        return bool(np.isfinite(x).all())

    def eye(self, n, batch_shape):
        return np.broadcast_to(np.eye(n), tuple(batch_shape) + (n, n)).copy()

    def full(self, shape, value):
        return np.full(tuple(shape), value, dtype=np.float64)

    @staticmethod
    def broadcast_to(x, shape):
        return np.broadcast_to(x, tuple(shape))

    @staticmethod
    def take_last(x, idx):
        # x [..., K, D], idx [...] -> x[..., idx, :]
        return np.take_along_axis(x, idx[..., None, None], axis=-2)[..., 0, :]

    @staticmethod
    def argmax(x, axis):
        return np.argmax(x, axis=axis)

    def finfo_eps(self):
        return float(np.finfo(np.float64).eps)

    @staticmethod
    def to_float(x):
        return np.asarray(x, dtype=np.float64)


class _TorchOps:
    is_torch = True

    def __init__(self, ref):
        self.torch = _torch_module()
        dtype = ref.dtype if ref.is_floating_point() else self.torch.get_default_dtype()
        self.dtype = dtype
        self.double = dtype == self.torch.float64
        self.device = ref.device

    def asarray(self, x, name):
        torch = self.torch
        if isinstance(x, torch.Tensor):
            if x.is_complex():
                raise InputError(f"{name}: expected real numbers, got a complex tensor")
            return x.to(dtype=self.dtype, device=self.device)
        try:
            return torch.as_tensor(np.array(x, dtype=np.float64), dtype=self.dtype, device=self.device)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: expected an array of real numbers ({exc})") from None

    def __getattr__(self, item):
        # sin, cos, sqrt, abs, atan2, where map one-to-one onto torch.
        return getattr(self.torch, item)

    def stack(self, xs, axis):
        return self.torch.stack(list(xs), dim=axis)

    def concat(self, xs, axis):
        return self.torch.cat(list(xs), dim=axis)

    @staticmethod
    def swap_last(x):
        return x.transpose(-1, -2)

    def cross(self, a, b):
        a, b = self.torch.broadcast_tensors(a, b)
        return self.torch.linalg.cross(a, b, dim=-1)

    def all_finite(self, x):
        return bool(self.torch.isfinite(x).all())

    def eye(self, n, batch_shape):
        e = self.torch.eye(n, dtype=self.dtype, device=self.device)
        return e.expand(tuple(batch_shape) + (n, n)).clone()

    def full(self, shape, value):
        return self.torch.full(tuple(shape), value, dtype=self.dtype, device=self.device)

    @staticmethod
    def broadcast_to(x, shape):
        return x.expand(tuple(shape))

    def take_last(self, x, idx):
        index = idx[..., None, None].expand(tuple(idx.shape) + (1, x.shape[-1]))
        return self.torch.gather(x, -2, index)[..., 0, :]

    def argmax(self, x, axis):
        return self.torch.argmax(x, dim=axis)

    def finfo_eps(self):
        return float(self.torch.finfo(self.dtype).eps)

    def to_float(self, x):
        return x


def _ops(*xs):
    """The backend for a call: torch if any argument is a tensor (the first tensor sets device/dtype)."""
    for x in xs:
        if _is_tensor(x):
            return _TorchOps(x)
    return _NumpyOps()


def _check(ops, x, name: str, trailing: Sequence[int], finite: bool = True):
    """Convert ``x`` to the backend's float array and check its trailing shape and finiteness."""
    a = ops.asarray(x, name)
    trailing = tuple(trailing)
    shape = tuple(a.shape)
    want = "[..., " + ", ".join(str(t) for t in trailing) + "]" if trailing else "[...]"
    if len(shape) < len(trailing) or shape[len(shape) - len(trailing):] != trailing:
        raise InputError(f"{name}: expected shape {want}, got {list(shape)}")
    if finite and not ops.all_finite(a):
        raise InputError(f"{name}: contains NaN or infinite values; expected finite numbers")
    return a


def _batch_shape(**arrays_and_trailing):
    """Broadcast leading (batch) shapes of named arrays; InputError naming them if incompatible.

    Keyword values are ``(array, number_of_trailing_dims)``.
    """
    shapes = {k: tuple(a.shape[: a.ndim - n]) for k, (a, n) in arrays_and_trailing.items()}
    try:
        return np.broadcast_shapes(*shapes.values())
    except ValueError:
        desc = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
        raise InputError(f"{', '.join(shapes)}: leading (batch) dimensions do not broadcast: {desc}") from None


def _check_convention(convention: str):
    if not isinstance(convention, str) or convention not in _CONVENTIONS:
        raise InputError(
            f"convention: unknown Euler convention {convention!r}; expected one of {sorted(_CONVENTIONS)}"
        )
    return _CONVENTIONS[convention]


def _rigid_tolerance(ops, atol):
    if atol is not None:
        return atol
    # Stored poses (tracker files, float32 networks) are rigid only to a few 1e-5.
    return 1e-5 if ops.double else 1e-4


def _max_abs(x) -> float:
    """Largest absolute value of an array or tensor as a float (0 for an empty one)."""
    if int(np.prod(tuple(x.shape))) == 0:
        return 0.0
    return float(abs(x).max())


# ----------------------------------------------------------------------------------------------
# Rigid algebra
# ----------------------------------------------------------------------------------------------


def identity(batch_shape: Sequence[int] = ()) -> np.ndarray:
    """Identity transforms, shape ``[*batch_shape, 4, 4]``, float64."""
    return np.broadcast_to(np.eye(4), tuple(batch_shape) + (4, 4)).copy()


def make_rigid(R, t, check: bool = True, atol: float | None = None):
    """Rigid ``[..., 4, 4]`` from rotations ``R [..., 3, 3]`` and translations ``t [..., 3]`` (mm).

    Leading dimensions broadcast. With ``check`` (default), ``R`` must be a proper rotation
    (RᵀR = I and det = +1 within ``atol``), else InputError.
    """
    ops = _ops(R, t)
    R = _check(ops, R, "R", (3, 3))
    t = _check(ops, t, "t", (3,))
    if check:
        _check_rotation(ops, R, "R", _rigid_tolerance(ops, atol))
    batch = _batch_shape(R=(R, 2), t=(t, 1))
    R = ops.broadcast_to(R, batch + (3, 3))
    t = ops.broadcast_to(t, batch + (3,))
    top = ops.concat([R, t[..., :, None]], -1)
    bottom = ops.broadcast_to(ops.asarray([[0.0, 0.0, 0.0, 1.0]], "bottom"), batch + (1, 4))
    return ops.concat([top, bottom], -2)


def rotation(T):
    """The rotation block ``[..., 3, 3]`` of ``T [..., 4, 4]``."""
    ops = _ops(T)
    T = _check(ops, T, "T", (4, 4), finite=False)
    return T[..., :3, :3]


def translation(T):
    """The translation ``[..., 3]`` (mm) of ``T [..., 4, 4]``."""
    ops = _ops(T)
    T = _check(ops, T, "T", (4, 4), finite=False)
    return T[..., :3, 3]


def _rotation_error(ops, R):
    """Largest deviation of RᵀR from I and of det R from +1, per batch element (as a Python float)."""
    RtR = ops.swap_last(R) @ R
    eye = ops.eye(3, tuple(R.shape[:-2]))
    det = (R[..., 0, :] * ops.cross(R[..., 1, :], R[..., 2, :])).sum(-1)
    return max(_max_abs(RtR - eye), _max_abs(det - 1))


def _check_rotation(ops, R, name, atol, what="a proper rotation"):
    err = _rotation_error(ops, R)
    if not err <= atol:
        raise InputError(f"{name}: expected {what} (RᵀR = I, det = +1 within {atol:g}); deviation {err:.3g}")


def _check_rigid(ops, T, name, atol):
    bottom = T[..., 3, :] - ops.asarray([0.0, 0.0, 0.0, 1.0], "bottom")
    if not _max_abs(bottom) <= atol:
        raise InputError(f"{name}: expected rigid 4x4 transforms with last row [0, 0, 0, 1]")
    _check_rotation(ops, T[..., :3, :3], name, atol, what="rigid transforms, whose rotation block is proper")


def is_rigid(T, atol: float = 1e-6) -> bool:
    """True if every ``T [..., 4, 4]`` is finite with last row [0,0,0,1], RᵀR = I and det R = +1."""
    ops = _ops(T)
    T = _check(ops, T, "T", (4, 4), finite=False)
    if not ops.all_finite(T):
        return False
    try:
        _check_rigid(ops, T, "T", atol)
    except InputError:
        return False
    return True


def invert_rigid(T, check: bool = True, atol: float | None = None):
    """Inverse of rigid ``T [..., 4, 4]`` via Rᵀ and -Rᵀt (exact for rigid inputs, no generic inverse).

    With ``check`` (default) a non-rigid input raises InputError instead of giving a wrong answer.
    """
    ops = _ops(T)
    T = _check(ops, T, "T", (4, 4))
    if check:
        _check_rigid(ops, T, "T", _rigid_tolerance(ops, atol))
    Rt = ops.swap_last(T[..., :3, :3])
    t = -(Rt @ T[..., :3, 3:4])
    top = ops.concat([Rt, t], -1)
    return ops.concat([top, T[..., 3:4, :] * 0 + ops.asarray([[0.0, 0.0, 0.0, 1.0]], "bottom")], -2)


def orthonormalize(T):
    """Nearest rigid transform (rotation by SVD, det +1) of ``T [..., 4, 4]``; numpy only.

    For importers of tracker files whose matrices are rigid only to float32 precision.
    """
    T = _check(_NumpyOps(), T, "T", (4, 4))
    U, _, Vt = np.linalg.svd(T[..., :3, :3])
    d = np.sign(np.linalg.det(U @ Vt))
    U = U.copy()
    U[..., :, 2] *= d[..., None]
    out = T.copy()
    out[..., :3, :3] = U @ Vt
    out[..., 3, :] = (0.0, 0.0, 0.0, 1.0)
    return out


def compose(*Ts):
    """Matrix product ``Ts[0] @ Ts[1] @ ...`` of ``[..., 4, 4]`` transforms (apply the last first)."""
    if not Ts:
        raise InputError("compose: expected at least one transform")
    ops = _ops(*Ts)
    out = _check(ops, Ts[0], "Ts[0]", (4, 4))
    for i, T in enumerate(Ts[1:], start=1):
        T = _check(ops, T, f"Ts[{i}]", (4, 4))
        _batch_shape(**{"product so far": (out, 2), f"Ts[{i}]": (T, 2)})
        out = out @ T
    return out


def apply_transform(T, points):
    """Apply ``T [..., 4, 4]`` to ``points [..., 3]`` (mm); leading dimensions broadcast.

    ``T [4, 4]`` with ``points [N, 3]`` gives ``[N, 3]``; per-frame point sets ``[B, K, 3]`` need
    ``T[:, None]`` (``[B, 1, 4, 4]``).
    """
    ops = _ops(T, points)
    T = _check(ops, T, "T", (4, 4))
    points = _check(ops, points, "points", (3,))
    _batch_shape(T=(T, 2), points=(points, 1))
    return (T[..., :3, :3] @ points[..., :, None])[..., 0] + T[..., :3, 3]


# ----------------------------------------------------------------------------------------------
# Euler angles
# ----------------------------------------------------------------------------------------------

# Each convention as the product R = R_i(a[p]) @ R_j(a[q]) @ R_k(a[r]): axes (i, j, k), angle order.
_CONVENTIONS = {
    "xyz": ((2, 1, 0), (2, 1, 0)),
    "ZYX": ((2, 1, 0), (0, 1, 2)),
    "YZX": ((1, 2, 0), (0, 1, 2)),
}
EULER_CONVENTIONS = tuple(_CONVENTIONS)


def _elementary(ops, axis, c, s):
    """Rotation matrices about a fixed axis from cos/sin arrays: ``[..., 3, 3]``."""
    one = c * 0 + 1
    zero = c * 0
    if axis == 0:
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == 1:
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return ops.stack([ops.stack(r, -1) for r in rows], -2)


def _parity(axes):
    # +1 if (i, j, k) is a cyclic permutation of (0, 1, 2), else -1.
    return 1.0 if axes in ((0, 1, 2), (1, 2, 0), (2, 0, 1)) else -1.0


def euler_to_matrix(angles, convention: str, degrees: bool = False):
    """Rotation matrices ``[..., 3, 3]`` from Euler angles ``[..., 3]`` (see module docstring)."""
    axes, order = _check_convention(convention)
    ops = _ops(angles)
    a = _check(ops, angles, "angles", (3,))
    if degrees:
        a = a * (math.pi / 180.0)
    R = None
    for axis, idx in zip(axes, order):
        Ri = _elementary(ops, axis, ops.cos(a[..., idx]), ops.sin(a[..., idx]))
        R = Ri if R is None else R @ Ri
    return R


def matrix_to_euler(R, convention: str, degrees: bool = False):
    """Euler angles ``[..., 3]`` of rotations ``R [..., 3, 3]`` (see module docstring for ranges).

    ``R`` is assumed to be a rotation (it is not re-orthonormalised); the result satisfies
    ``euler_to_matrix(matrix_to_euler(R, c), c) == R`` for every rotation, gimbal lock included.
    """
    axes, order = _check_convention(convention)
    ops = _ops(R)
    R = _check(ops, R, "R", (3, 3))
    i, j, k = axes
    s = _parity(axes)
    # For R = R_i(al) R_j(be) R_k(ga): R[i,k] = s sin(be); R[i,i], R[i,j] = cos(be)(cos ga, -s sin ga).
    cb = ops.sqrt(R[..., i, i] ** 2 + R[..., i, j] ** 2)
    beta = ops.atan2(s * R[..., i, k], cb)
    # Gimbal lock: only al +- ga is defined; set al = 0 there. Near (not at) the lock al is poorly
    # conditioned, but ga comes from the residual below and absorbs al's error, so the matrix stays exact.
    gimbal = cb <= 4 * ops.finfo_eps()
    y = -s * R[..., j, k]
    x = R[..., k, k]
    # Safe inputs in the unused branch keep torch gradients finite (no atan2(0, 0) backward).
    alpha = ops.where(gimbal, x * 0, ops.atan2(ops.where(gimbal, x * 0, y), ops.where(gimbal, x * 0 + 1, x)))
    # gamma from the residual R_k(ga) = (R_i(al) R_j(be))ᵀ R: exact at gimbal lock as well.
    Q = _elementary(ops, i, ops.cos(alpha), ops.sin(alpha)) @ _elementary(ops, j, ops.cos(beta), ops.sin(beta))
    m_ji = (Q[..., :, j] * R[..., :, i]).sum(-1)
    m_ii = (Q[..., :, i] * R[..., :, i]).sum(-1)
    gamma = ops.atan2(s * m_ji, m_ii)
    ordered = [None, None, None]
    for value, idx in zip((alpha, beta, gamma), order):
        ordered[idx] = value
    out = ops.stack(ordered, -1)
    if degrees:
        out = out * (180.0 / math.pi)
    return out


# ----------------------------------------------------------------------------------------------
# 6-DOF parameters
# ----------------------------------------------------------------------------------------------


def params_to_matrix(p, convention: str = "xyz", degrees: bool = True):
    """Rigid ``[..., 4, 4]`` from ``p [..., 6] = (tx, ty, tz, a0, a1, a2)``: translation (mm) first,
    then Euler angles in ``convention`` (degrees by default), as FiMA and Attention-Reg order them."""
    _check_convention(convention)
    ops = _ops(p)
    p = _check(ops, p, "p", (6,))
    R = euler_to_matrix(p[..., 3:], convention, degrees=degrees)
    return make_rigid(R, p[..., :3], check=False)


def matrix_to_params(T, convention: str = "xyz", degrees: bool = True):
    """``(tx, ty, tz, a0, a1, a2) [..., 6]`` of rigid ``T [..., 4, 4]``; inverse of params_to_matrix."""
    _check_convention(convention)
    ops = _ops(T)
    T = _check(ops, T, "T", (4, 4))
    angles = matrix_to_euler(T[..., :3, :3], convention, degrees=degrees)
    return ops.concat([T[..., :3, 3], angles], -1)


# ----------------------------------------------------------------------------------------------
# Quaternions
# ----------------------------------------------------------------------------------------------


def quaternion_to_matrix(q):
    """Rotation matrices ``[..., 3, 3]`` from quaternions ``(w, x, y, z) [..., 4]``.

    The quaternion is normalised first; a (near) zero quaternion raises InputError.
    """
    ops = _ops(q)
    q = _check(ops, q, "q", (4,))
    n2 = (q * q).sum(-1)
    if int(np.prod(tuple(n2.shape))) and not float(n2.min()) > 1e-12:
        raise InputError("q: expected non-zero quaternions (w, x, y, z); got a zero-norm quaternion")
    q = q / ops.sqrt(n2)[..., None]
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return ops.stack([ops.stack(r, -1) for r in rows], -2)


def matrix_to_quaternion(R):
    """Unit quaternions ``(w, x, y, z) [..., 4]`` with w >= 0 from rotations ``R [..., 3, 3]``.

    Shepperd's method: of the four ways to extract the quaternion, use the one dividing by the largest
    of (trace, R00, R11, R22) so that no rotation loses precision (180-degree turns included).
    """
    ops = _ops(R)
    R = _check(ops, R, "R", (3, 3))
    r00, r11, r22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    r01, r02, r10, r12, r20, r21 = R[..., 0, 1], R[..., 0, 2], R[..., 1, 0], R[..., 1, 2], R[..., 2, 0], R[..., 2, 1]
    tr = r00 + r11 + r22
    # Each candidate is 4q_m * q for m = w, x, y, z; its m-th entry is 4 q_m^2 = 1 + (diag form).
    cands = ops.stack(
        [
            ops.stack([1 + tr, r21 - r12, r02 - r20, r10 - r01], -1),
            ops.stack([r21 - r12, 1 + r00 - r11 - r22, r01 + r10, r02 + r20], -1),
            ops.stack([r02 - r20, r01 + r10, 1 - r00 + r11 - r22, r12 + r21], -1),
            ops.stack([r10 - r01, r02 + r20, r12 + r21, 1 - r00 - r11 + r22], -1),
        ],
        -2,
    )
    choice = ops.argmax(ops.stack([tr, r00, r11, r22], -1), -1)
    q = ops.take_last(cands, choice)
    q = q / ops.sqrt((q * q).sum(-1))[..., None]
    sign = ops.where(q[..., 0] < 0, q[..., 0] * 0 - 1, q[..., 0] * 0 + 1)
    return q * sign[..., None]


# ----------------------------------------------------------------------------------------------
# Frame "series" (FiMA / MoNet HDF5): centre and the two top corners of a frame, in world mm
# ----------------------------------------------------------------------------------------------


def _frame_geometry(frame_shape_hw, pixel_spacing_xy):
    try:
        shape = tuple(int(v) for v in frame_shape_hw)
        if any(int(v) != float(v) for v in frame_shape_hw):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"frame_shape_hw: expected two integers (H, W), got {frame_shape_hw!r}") from None
    if len(shape) != 2 or min(shape) < 2:
        raise InputError(f"frame_shape_hw: expected (H, W) with H >= 2 and W >= 2, got {frame_shape_hw!r}")
    sp = np.asarray(pixel_spacing_xy, dtype=np.float64)
    if sp.shape != (2,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise InputError(
            f"pixel_spacing_xy: expected two positive finite spacings (sx, sy) in mm, got {pixel_spacing_xy!r}"
        )
    return shape, sp


def frame_reference_points(frame_shape_hw, pixel_spacing_xy) -> np.ndarray:
    """Image-mm coordinates ``[3, 3]`` of the frame's centre, top-left and top-right pixel centres.

    Rows: centre ((W-1)/2*sx, (H-1)/2*sy, 0), top-left corner (0, 0, 0), top-right corner
    ((W-1)*sx, 0, 0). Image-mm: x along columns, y along rows, origin at the centre of pixel (0, 0).
    """
    (h, w), (sx, sy) = _frame_geometry(frame_shape_hw, pixel_spacing_xy)
    return np.array(
        [[(w - 1) / 2 * sx, (h - 1) / 2 * sy, 0.0], [0.0, 0.0, 0.0], [(w - 1) * sx, 0.0, 0.0]],
        dtype=np.float64,
    )


def pose_to_series(T, frame_shape_hw, pixel_spacing_xy):
    """``series [..., 9]``: the reference points (centre, top-left, top-right) of frames with poses
    ``T [..., 4, 4]`` (image-mm -> world mm), flattened point by point (x, y, z each)."""
    ref = frame_reference_points(frame_shape_hw, pixel_spacing_xy)
    ops = _ops(T)
    T = _check(ops, T, "T", (4, 4))
    pts = apply_transform(T[..., None, :, :], ops.asarray(ref, "reference points"))
    return pts.reshape(tuple(pts.shape[:-2]) + (9,))


def series_to_pose(series, frame_shape_hw, pixel_spacing_xy, tol_mm: float = 1e-3):
    """Rigid poses ``[..., 4, 4]`` recovered from ``series [..., 9]`` (see pose_to_series).

    The three points must match the frame: top corners (W-1)*sx apart, centre (H-1)/2*sy from their
    midpoint and perpendicular to them, within ``tol_mm`` (plus 1e-6 of the coordinates' magnitude, for
    float32 storage); otherwise InputError. The recovered pose maps the points exactly for exact input.
    """
    (h, w), (sx, sy) = _frame_geometry(frame_shape_hw, pixel_spacing_xy)
    ops = _ops(series)
    s = _check(ops, series, "series", (9,))
    pts = s.reshape(tuple(s.shape[:-1]) + (3, 3))
    centre, left, right = pts[..., 0, :], pts[..., 1, :], pts[..., 2, :]
    ex = right - left
    ey = centre - (left + right) / 2
    len_x = ops.sqrt((ex * ex).sum(-1))
    len_y = ops.sqrt((ey * ey).sum(-1))
    want_x, want_y = (w - 1) * sx, (h - 1) / 2 * sy
    along = (ex * ey).sum(-1) / ops.where(len_x > 0, len_x, len_x * 0 + 1)
    tol = tol_mm + 1e-6 * _max_abs(s)
    errors = {
        "top-corner distance": (_max_abs(len_x - want_x), want_x),
        "centre-to-top-edge distance": (_max_abs(len_y - want_y), want_y),
        "centre offset along the top edge": (_max_abs(along), 0.0),
    }
    for what, (err, expected) in errors.items():
        if not err <= tol:
            raise InputError(
                f"series: points do not fit a {h}x{w} frame at spacing ({sx:g}, {sy:g}) mm: {what} off by "
                f"{err:.4g} mm (expected {expected:.6g} mm, tolerance {tol:.3g} mm)"
            )
    x = ex / len_x[..., None]
    ey_perp = ey - (ey * x).sum(-1)[..., None] * x
    y = ey_perp / ops.sqrt((ey_perp * ey_perp).sum(-1))[..., None]
    z = ops.cross(x, y)
    R = ops.stack([x, y, z], -1)
    # Least-squares translation: world centroid minus rotated image centroid.
    ref = ops.asarray(frame_reference_points((h, w), (sx, sy)), "reference points")
    t = pts.mean(-2) - (R @ ref.mean(-2)[..., None])[..., 0]
    return make_rigid(R, t, check=False)


# ----------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------


def relative_transform(T_a, T_b):
    """``inv(T_a) @ T_b``: the pose of b expressed in a's frame (b's coordinates -> a's coordinates)."""
    ops = _ops(T_a, T_b)
    T_a = _check(ops, T_a, "T_a", (4, 4))
    T_b = _check(ops, T_b, "T_b", (4, 4))
    _batch_shape(T_a=(T_a, 2), T_b=(T_b, 2))
    return invert_rigid(T_a) @ T_b


def _check_sequence(ops, poses, name, min_len):
    poses = _check(ops, poses, name, (4, 4))
    if poses.ndim != 3 or poses.shape[0] < min_len:
        raise InputError(f"{name}: expected shape [N, 4, 4] with N >= {min_len}, got {list(poses.shape)}")
    return poses


def to_relative(poses):
    """``[N-1, 4, 4]`` relative transforms ``T_{i<-i+1} = inv(T_i) @ T_{i+1}`` of ``poses [N, 4, 4]``."""
    ops = _ops(poses)
    poses = _check_sequence(ops, poses, "poses", 1)
    return invert_rigid(poses[:-1]) @ poses[1:]


def chain_relative(rel, first=None):
    """Poses ``[N, 4, 4]`` from relative transforms ``rel [N-1, 4, 4]``; exact inverse of to_relative.

    ``T_0 = first`` (identity by default), ``T_{i+1} = T_i @ rel_i``.
    """
    ops = _ops(rel, first) if first is not None else _ops(rel)
    rel = _check(ops, rel, "rel", (4, 4))
    if rel.ndim != 3:
        raise InputError(f"rel: expected shape [N-1, 4, 4], got {list(rel.shape)}")
    if first is None:
        cur = ops.eye(4, ())
    else:
        cur = _check(ops, first, "first", (4, 4))
        if cur.ndim != 2:
            raise InputError(f"first: expected shape [4, 4], got {list(cur.shape)}")
    out = [cur]
    for i in range(rel.shape[0]):
        cur = cur @ rel[i]
        out.append(cur)
    return ops.stack(out, 0)


def normalize_to_first(poses):
    """``inv(T_0) @ T_i`` for ``poses [N, 4, 4]``, so that the first pose is the identity."""
    ops = _ops(poses)
    poses = _check_sequence(ops, poses, "poses", 1)
    out = invert_rigid(poses[0]) @ poses
    # Exact identity for the first pose (R^T R differs from I by rounding otherwise).
    if ops.is_torch:
        return ops.concat([ops.eye(4, (1,)), out[1:]], 0)
    out[0] = np.eye(4)
    return out


# ----------------------------------------------------------------------------------------------
# LPS <-> RAS
# ----------------------------------------------------------------------------------------------

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)


def lps_to_ras_points(p):
    """Points ``[..., 3]`` from LPS to RAS (negate x and y). Its own inverse."""
    ops = _ops(p)
    p = _check(ops, p, "p", (3,))
    return p * ops.asarray([-1.0, -1.0, 1.0], "flip")


def ras_to_lps_points(p):
    """Points ``[..., 3]`` from RAS to LPS (negate x and y)."""
    return lps_to_ras_points(p)


def lps_to_ras_transform(T):
    """``F @ T @ F`` with F = LPS_TO_RAS: a transform whose input and output are LPS, re-expressed
    with RAS input and output (e.g. for a Slicer transform node)."""
    ops = _ops(T)
    T = _check(ops, T, "T", (4, 4))
    F = ops.asarray(LPS_TO_RAS, "LPS_TO_RAS")
    return F @ T @ F


def ras_to_lps_transform(T):
    """``F @ T @ F``: a RAS-to-RAS transform re-expressed LPS-to-LPS (F is its own inverse)."""
    return lps_to_ras_transform(T)
