"""The registry of freehand pose-estimation methods ("pose sources").

A method turns a sweep (frames, optional IMU data) into estimated poses ``tforms [N, 4, 4]`` (image mm
-> mm in the first frame's coordinates, ``tforms[0]`` = identity, the sweep contract's estimate), plus
optional extras such as per-pair IMU fusion weights.

Built in: ``tracked`` (the file's own poses, normalised to the first frame: the only method allowed to
read ``tforms``), ``imu`` (IMU dead reckoning, ``imu_dead_reckoning.py``), ``fima`` and ``moglo``. The
learned methods are registered by "package.module:Class" and imported only when used, so the CLI stays
fast. Each registration carries the method's label and tooltip: the one source of the names the
command line (choices, help) and the Slicer panel show. A new method is one ``register_method`` line
(docs/CONTRIBUTING.md).

The no-peeking rule (docs/DATA_FORMATS.md: estimates must be identical when the input's ``tforms`` are deleted)
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
    "MethodInfo",
    "PANEL_CHOICES",
    "register_method",
    "unregister_method",
    "get_method",
    "method_info",
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
    ``accepted_params``: names of the method-specific parameters ``estimate`` accepts. What users see
    (label, tooltip) is given to ``register_method``.
    """

    name: str = ""
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

# Choices a Slicer panel offers besides the registered methods: "auto" picks FiMA or MoGLo-Net from the
# sweep (IMU data or not) and the installed models (the UltrasoundAI module's logic resolves it).
PANEL_CHOICES = ("auto",)


@dataclass(frozen=True)
class MethodInfo:
    """What users see of a method: its name (files, CLI), a short label (panels, tables) and a tooltip
    (one sentence: panels' tooltips, --help)."""

    name: str
    label: str
    tooltip: str


_REGISTRY: dict[str, Factory] = {}
_INFO: dict[str, MethodInfo] = {}


def register_method(name: str, factory: Factory, *, label: Optional[str] = None, tooltip: Optional[str] = None,
                    replace: bool = False) -> None:
    """Register a pose method: `factory()` returns a PoseMethod, or is "package.module:callable" (imported
    only when the method is used). `label` (default: the name) and `tooltip` are what the CLI and the
    panels show."""
    label = name if label is None else label
    tooltip = label if tooltip is None else tooltip
    if not isinstance(name, str) or not name or not name.replace("-", "_").replace(".", "_").isidentifier():
        raise InputError(f"method name {name!r}: expected a short identifier such as 'fima'")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise InputError(f"method {name!r}: factory must be callable or 'package.module:callable', got {factory!r}")
    for what, text in (("label", label), ("tooltip", tooltip)):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"method {name!r}: {what} must be a non-empty string, got {text!r}")
    if not replace and name in _REGISTRY:
        raise InputError(f"method {name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[name] = factory
    _INFO[name] = MethodInfo(name, label.strip(), tooltip.strip())


def unregister_method(name: str) -> None:
    """Remove a method added with register_method (tests, plug-ins)."""
    _REGISTRY.pop(name, None)
    _INFO.pop(name, None)


def available_methods() -> list[str]:
    """Names of every registered method, in registration order (built-in first)."""
    return list(_REGISTRY)


def method_info(name: str) -> MethodInfo:
    """Name, label and tooltip of the method `name` (InputError listing the known names otherwise)."""
    if name not in _INFO:
        raise InputError(f"unknown pose method {name!r}; available: {', '.join(available_methods())}")
    return _INFO[name]


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
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InputError(f"unknown pose method {name!r}; available: {', '.join(available_methods())}")
    method = _resolve_factory(name, _REGISTRY[name])()
    if not isinstance(method, PoseMethod):
        raise RuntimeError(f"method {name!r}: factory returned {type(method).__name__}, expected a PoseMethod")
    if method.name != name:
        # One instance, one name: the registry key is what files and reports record.
        method.name = name
    return method


# The built-in methods, in the order the CLI and the panel list them.
register_method("tracked", TrackedMethod, label="Tracked",
                tooltip="poses from the sweep's tracker (tforms), normalised to the first frame")
register_method("imu", ImuDeadReckoningMethod, label="IMU dead reckoning",
                tooltip="orientation from the IMU angles, position from double-integrated acceleration")
register_method("fima", "ultrasound_ai.freehand.fima.method:FimaMethod", label="FiMA",
                tooltip="ReMamba (ResNet-18 + multi-directional selective scans) with adaptive multi-IMU fusion "
                        "and online alignment; variant from the checkpoint (rem-prime, rem, rem-f-prime, rem-f, "
                        "fima)")
register_method("moglo", "ultrasound_ai.freehand.moglo.method:MogloMethod", label="MoGLo-Net",
                tooltip="correlation encoder + global-local attention + LSTMs on 5-frame clips; images only "
                        "(no IMU)")
register_method("decorrelation", "ultrasound_ai.freehand.decorrelation:DecorrelationMethod", label="Speckle decorrelation",
                tooltip="classical baseline: out-of-plane distance from a calibrated speckle decorrelation curve, "
                        "in-plane motion by phase correlation; rotation and direction of travel from the IMUs when "
                        "present (images only: forward motion assumed)")
