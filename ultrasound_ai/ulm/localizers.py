"""The registry of ULM localization methods ("localizers"): names, labels, tooltips and factories.

Kept light on purpose (nothing numeric is imported here): the command line builds its ``--method``
choices and help from this registry, and ``ultrasound-ai --help`` must stay fast. A factory is a callable
``factory(ctx: pipeline.LocalizerContext) -> Localizer`` or the string "package.module:callable", imported
only when the localizer is used. The labels and tooltips are the one source of what the CLI and the ULM
panel show. Adding a localizer is one ``register_localizer`` line (docs/CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union, runtime_checkable

from ultrasound_ai.core.errors import InputError

__all__ = ["Localizer", "LocalizerInfo", "register_localizer", "unregister_localizer", "localizer_names",
           "localizer_info", "create_localizer"]


@runtime_checkable
class Localizer(Protocol):
    """What a localizer factory returns: a streaming localization method.

    push(frames [n, Z, X], start) -> rows [K, 4] = (global frame, z_mm, x_mm, intensity) of the frames it
    has finished (start is the global index of frames[0]); finish() -> [K, 4], the rest, once at the end.
    Optionally push_into(frames, start, sink): the same rows handed to sink(rows) part by part, in frame
    order, as they are ready (the pipeline then tracks them while the localizer computes the next part).
    """

    def push(self, frames, start: int): ...

    def finish(self): ...


@dataclass(frozen=True)
class LocalizerInfo:
    """What users see of a localizer: name (files, CLI), short label (panels) and tooltip (panels, --help)."""

    name: str
    label: str
    tooltip: str


Factory = Union[Callable[[Any], Localizer], str]

_FACTORIES: dict[str, Factory] = {}
_INFO: dict[str, LocalizerInfo] = {}


def register_localizer(name: str, factory: Factory, *, label: str | None = None, tooltip: str | None = None) -> None:
    """Add (or replace) a localization method usable as `method=name` / `--method name`. `factory(ctx)`
    returns a `Localizer` (a class must have push and finish); `label` (default: the name) and `tooltip`
    are what the CLI and the panel show."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"localizer name {name!r}: expected a short name such as 'rs'")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise InputError(f"localizer {name!r}: the factory must be callable (ctx -> Localizer) or "
                         f"'package.module:callable', got {factory!r}")
    if isinstance(factory, type):  # a class: it must implement the protocol itself
        missing = [m for m in ("push", "finish") if not callable(getattr(factory, m, None))]
        if missing:
            raise InputError(f"localizer {name!r}: {factory.__name__} has no {' or '.join(missing)}(); a Localizer "
                             "needs push(frames, start) and finish()")
    label = name if label is None else label
    tooltip = label if tooltip is None else tooltip
    for what, text in (("label", label), ("tooltip", tooltip)):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"localizer {name!r}: {what} must be a non-empty string, got {text!r}")
    key = name.strip().lower()
    _FACTORIES[key] = factory
    _INFO[key] = LocalizerInfo(key, label.strip(), tooltip.strip())


def unregister_localizer(name: str) -> None:
    """Remove a localizer added with register_localizer (tests, plug-ins)."""
    _FACTORIES.pop(str(name).lower(), None)
    _INFO.pop(str(name).lower(), None)


def localizer_names() -> list[str]:
    """Registered localizers in registration order (built-in first: the order the CLI and the panel show)."""
    return list(_FACTORIES)


def localizer_info(name: str) -> LocalizerInfo:
    """Name, label and tooltip of the localizer `name` (InputError listing the known names otherwise)."""
    key = str(name).lower()
    if key not in _INFO:
        raise InputError(f"unknown localization method {name!r}; available: {', '.join(localizer_names())}")
    return _INFO[key]


def create_localizer(name: str, ctx) -> Localizer:
    """The localizer `name` for the acquisition described by `ctx` (a pipeline.LocalizerContext)."""
    key = str(name).lower()
    if key not in _FACTORIES:
        raise InputError(f"method: expected one of {localizer_names()}, got {name!r}")
    factory = _FACTORIES[key]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    localizer = factory(ctx)
    if not isinstance(localizer, Localizer):
        raise RuntimeError(f"localizer {key!r}: its factory returned {type(localizer).__name__}, which lacks "
                           "push(frames, start) / finish() (the Localizer protocol)")
    return localizer


# The built-in localizers, in the order the CLI and the panel list them.
register_localizer("rs", "ultrasound_ai.ulm.pipeline:radial_symmetry_localizer", label="RS (radial symmetry)",
                   tooltip="regional maxima refined to sub-pixel positions by radial symmetry")
register_localizer("wa", "ultrasound_ai.ulm.pipeline:weighted_average_localizer", label="WA (weighted average)",
                   tooltip="regional maxima refined to sub-pixel positions by the intensity-weighted centroid")
register_localizer("3dml", "ultrasound_ai.ulm.pipeline:dml_localizer", label="3DML-ResNet",
                   tooltip="3DML-ResNet super-resolved localization maps with its bubble-counting network")
