"""The registry of freehand pose-estimation methods ("pose sources").

A method turns a sweep (frames, optional IMU data) into estimated poses ``tforms [N, 4, 4]`` (image mm
-> mm in the first frame's coordinates, ``tforms[0]`` = identity, the sweep contract's estimate), plus
optional extras such as per-pair IMU fusion weights.

Built in: ``tracked`` (the file's own poses, normalised to the first frame: the only method allowed to
read ``tforms``) and ``imu`` (IMU dead reckoning, ``imu_dead_reckoning.py``). Learned methods (FiMA,
MoGLo-Net) join with one line in ``_LAZY_METHODS`` (imported only when used, so the CLI stays fast) or
with ``register_method`` at run time.

The no-peeking rule (DESIGN.md: estimates must be identical when the input's ``tforms`` are deleted)
is enforced here, not left to each method: ``PoseMethod.estimate`` is the only entry point, and it
hands ``sweep.without_truth()`` to every method not flagged ``uses_tracking=True``. A method implements
``_estimate`` and never sees the truth.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from ultrasound_ai.core.errors import Cancelled, InputError

__all__ = [
    "PoseEstimate",
    "MethodContext",
    "PoseMethod",
    "TrackedMethod",
    "ImuDeadReckoningMethod",
    "register_method",
    "unregister_method",
    "get_method",
    "available_methods",
]

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

# Tolerance for "tforms[0] is the identity" in a method's output (rounding of a chain of products).
_IDENTITY_ATOL = 1e-6


@dataclass
class PoseEstimate:
    """What a method returns.

    tforms: float64 [N, 4, 4], frame i's image mm -> first frame's image mm; tforms[0] = identity.
    imu_weights: float32 [N-1, M] fusion weight of each IMU per frame pair, or None.
    attrs: small JSON-able facts about the run (options used, checkpoint name, ...), recorded in the
    estimate file's attributes.
    """

    tforms: np.ndarray
    imu_weights: Optional[np.ndarray] = None
    attrs: dict = field(default_factory=dict)


@dataclass
class MethodContext:
    """Options every method receives: device, checkpoint, progress and cancellation, free parameters."""

    device: Any = "auto"
    checkpoint: Optional[str] = None
    progress: Optional[ProgressFn] = None
    cancel: Optional[CancelFn] = None
    params: dict = field(default_factory=dict)

    def report(self, fraction: float, message: str = "") -> None:
        """Progress in [0, 1] of the pose estimation; also the place where cancellation is noticed."""
        self.check_cancelled()
        if self.progress is not None:
            self.progress(float(min(1.0, max(0.0, fraction))), message)

    def check_cancelled(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("pose estimation cancelled")


class PoseMethod:
    """Base class of a pose source. Subclasses set ``name`` and implement ``_estimate``.

    ``uses_tracking``: only a method that is *defined* by the tracker's poses (``tracked``) sets it;
    every other method gets the sweep without its ``tforms``. ``requires_imu``: the method needs
    ``imu_acc`` / ``imu_euler_deg``; a sweep without them is refused with a clear message.
    ``accepted_params``: names of the method-specific parameters ``estimate`` accepts.
    """

    name: str = ""
    description: str = ""
    uses_tracking: bool = False
    requires_imu: bool = False
    accepted_params: tuple = ()

    def estimate(self, sweep, *, device="auto", checkpoint: Optional[str] = None,
                 progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                 **params) -> PoseEstimate:
        """Estimate the poses of `sweep` (an ``io.sweep.Sweep``). The one entry point of every method."""
        from ultrasound_ai.io.sweep import Sweep

        if not isinstance(sweep, Sweep):
            raise InputError(f"method {self.name!r}: expected a Sweep, got {type(sweep).__name__}")
        unknown = sorted(set(params) - set(self.accepted_params))
        if unknown:
            raise InputError(
                f"method {self.name!r}: unknown parameter(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(self.accepted_params) or 'none'}"
            )
        sweep.validate(name=f"input sweep of method {self.name!r}")
        if self.requires_imu and (sweep.imu_acc is None or sweep.imu_euler_deg is None):
            raise InputError(
                f"method {self.name!r}: the sweep has no IMU data; expected 'imu_acc' and 'imu_euler_deg' [M, N, 3]"
            )
        visible = sweep if self.uses_tracking else sweep.without_truth()
        ctx = MethodContext(device=device, checkpoint=checkpoint, progress=progress, cancel=cancel, params=params)
        ctx.check_cancelled()
        result = self._estimate(visible, ctx)
        return _checked_estimate(result, sweep.n_frames, sweep.n_imus, self.name)

    def _estimate(self, sweep, ctx: MethodContext) -> PoseEstimate:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<PoseMethod {self.name!r}>"


def _checked_estimate(result: PoseEstimate, n: int, m: int, name: str) -> PoseEstimate:
    """The method's output must fit the contract; a violation is a bug in the method (RuntimeError)."""
    if not isinstance(result, PoseEstimate):
        raise RuntimeError(f"method {name!r} returned {type(result).__name__}, expected PoseEstimate")
    t = np.asarray(result.tforms, dtype=np.float64)
    if t.shape != (n, 4, 4) or not np.all(np.isfinite(t)):
        raise RuntimeError(f"method {name!r} returned tforms of shape {t.shape} (finite [{n}, 4, 4] expected)")
    if np.abs(t[0] - np.eye(4)).max() > _IDENTITY_ATOL:
        raise RuntimeError(f"method {name!r}: tforms[0] must be the identity (estimates are relative to frame 0)")
    t = t.copy()
    t[0] = np.eye(4)
    w = result.imu_weights
    if w is not None:
        w = np.asarray(w, dtype=np.float32)
        if w.shape != (n - 1, m):
            raise RuntimeError(f"method {name!r} returned imu_weights of shape {w.shape}, expected [{n - 1}, {m}]")
    return PoseEstimate(tforms=t, imu_weights=w, attrs=dict(result.attrs))


# ----------------------------------------------------------------------------------------------
# Built-in methods
# ----------------------------------------------------------------------------------------------


class TrackedMethod(PoseMethod):
    """The tracker's poses from the file, normalised to the first frame (the reference and sanity row)."""

    name = "tracked"
    description = "poses from the sweep's tracker (tforms), normalised to the first frame"
    uses_tracking = True

    def _estimate(self, sweep, ctx: MethodContext) -> PoseEstimate:
        from ultrasound_ai.core.geometry import normalize_to_first

        if sweep.tforms is None:
            raise InputError("method 'tracked': the sweep has no 'tforms' (tracker poses); "
                             "use a sensorless or IMU method instead")
        ctx.report(0.0, "reading tracked poses")
        tforms = normalize_to_first(sweep.tforms)
        ctx.report(1.0, "tracked poses ready")
        return PoseEstimate(tforms=tforms)


class ImuDeadReckoningMethod(PoseMethod):
    """IMU-only dead reckoning (``imu_dead_reckoning.dead_reckon``)."""

    name = "imu"
    description = "IMU dead reckoning: orientation from the IMU angles, position from double-integrated acceleration"
    requires_imu = True
    accepted_params = ("initial_velocity_mm_s", "remove_bias")

    def _estimate(self, sweep, ctx: MethodContext) -> PoseEstimate:
        from ultrasound_ai.freehand.imu_dead_reckoning import dead_reckon

        ctx.report(0.0, "integrating IMU data")
        result = dead_reckon(sweep, **ctx.params)
        ctx.report(1.0, "IMU dead reckoning done")
        return PoseEstimate(tforms=result.tforms, imu_weights=result.imu_weights, attrs=result.attrs)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

Factory = Union[Callable[[], PoseMethod], str]

_REGISTRY: dict[str, Factory] = {
    "tracked": TrackedMethod,
    "imu": ImuDeadReckoningMethod,
}

# Methods whose module is imported only when they are asked for: name -> "package.module:factory".
# Later issues add FiMA and MoGLo-Net here (one line each).
_LAZY_METHODS: dict[str, str] = {"moglo": "ultrasound_ai.freehand.moglo.method:MogloMethod"}
_LAZY_METHODS["fima"] = "ultrasound_ai.freehand.fima.method:FimaMethod"  # every variant; the card says which


def register_method(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Register a pose method: `factory()` returns a PoseMethod, or is "package.module:callable"."""
    if not isinstance(name, str) or not name or not name.replace("-", "_").replace(".", "_").isidentifier():
        raise InputError(f"method name {name!r}: expected a short identifier such as 'fima'")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise InputError(f"method {name!r}: factory must be callable or 'package.module:callable', got {factory!r}")
    if not replace and (name in _REGISTRY or name in _LAZY_METHODS):
        raise InputError(f"method {name!r} is already registered (pass replace=True to override it)")
    _LAZY_METHODS.pop(name, None)
    _REGISTRY[name] = factory


def unregister_method(name: str) -> None:
    """Remove a method added with register_method (tests, plug-ins)."""
    _REGISTRY.pop(name, None)
    _LAZY_METHODS.pop(name, None)


def available_methods() -> list[str]:
    """Names of every registered method, built-in first, in registration order."""
    return list(_REGISTRY) + [n for n in _LAZY_METHODS if n not in _REGISTRY]


def _resolve_factory(name: str, factory: Factory) -> Callable[[], PoseMethod]:
    if callable(factory):
        return factory
    module_name, _, attr = factory.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RuntimeError(f"method {name!r}: {module_name} has no {attr}") from None


def get_method(name: str) -> PoseMethod:
    """A fresh instance of the method `name`; InputError listing the known names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY and name not in _LAZY_METHODS:
        raise InputError(f"unknown pose method {name!r}; available: {', '.join(available_methods())}")
    factory = _REGISTRY.get(name, _LAZY_METHODS.get(name))
    method = _resolve_factory(name, factory)()
    if not isinstance(method, PoseMethod):
        raise RuntimeError(f"method {name!r}: factory returned {type(method).__name__}, expected a PoseMethod")
    if method.name != name:
        # One instance, one name: the registry key is what files and reports record.
        method.name = name
    return method
