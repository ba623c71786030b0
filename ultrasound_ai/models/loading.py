"""One loader for a method's shipped or user checkpoint: find it, check its card, build the network, load.

    model, card = load_method_model("moglo", checkpoint, device, build=build_moglo)

`checkpoint` is None (the method's installed default model), a model name or a .pt path. The card must
name the same method. `build(configuration, pt_path)` gets the card's configuration without its
``preset`` label (a preset only says where the numbers came from) and the file's path (for messages),
and returns the untrained network; it then gets the weights (sha256-checked), moves to `device` and is
put in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ultrasound_ai.core.errors import InputError

__all__ = ["load_method_model", "load_initial_weights"]


def load_method_model(method: str, checkpoint, device, build: Callable[[dict, Path], Any]):
    """(network in eval mode on `device`, card) of `method` from `checkpoint`; see the module docstring.
    `build` raises InputError for a configuration it cannot build."""
    from ultrasound_ai.core.device import resolve_device
    from ultrasound_ai.models.checkpoint import load_into, read_card
    from ultrasound_ai.models.registry import default_model, find_model

    pt = default_model(method).pt_path if checkpoint is None else find_model(checkpoint)
    card = read_card(pt)
    if str(card.get("method", "")).lower() != method:
        raise InputError(f"checkpoint {pt}: a {card.get('method')!r} model, expected a {method!r} one")
    conf = {k: v for k, v in dict(card.get("configuration") or {}).items() if k != "preset"}
    model = build(conf, pt)
    model.to(resolve_device(device))
    load_into(model, pt)
    model.eval()
    return model, card


def load_initial_weights(model, checkpoint, method: str, same_keys=()) -> dict:
    """Fine-tuning start (training configs' ``model.init_from``): every weight and buffer of `model` from a
    `method` checkpoint (.pt path or model name) of the same architecture; `same_keys`: configuration keys
    that must also agree (those that change no weight's shape, e.g. the frame grid). Returns its card;
    InputError naming init_from otherwise."""
    from ultrasound_ai.models.checkpoint import load_checkpoint
    from ultrasound_ai.models.registry import find_model

    try:
        state, card = load_checkpoint(find_model(checkpoint))  # a .pt path as given, or a model name
    except InputError as exc:
        raise InputError(f"model.init_from {checkpoint}: {exc}") from None
    if str(card.get("method", "")).lower() != method:
        raise InputError(f"model.init_from {checkpoint}: a {card.get('method')!r} checkpoint, expected a {method!r} one")
    arch = getattr(model, "cfg", None) or getattr(model, "config", None)
    conf, mine = card.get("configuration") or {}, (arch.to_dict() if hasattr(arch, "to_dict") else {})
    plain = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)  # noqa: E731
    for key in same_keys:
        if key in conf and key in mine and plain(conf[key]) != plain(mine[key]):
            raise InputError(f"model.init_from {checkpoint}: its {key} {conf[key]} differs from this "
                             f"configuration's {mine[key]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model.init_from {checkpoint}: not a checkpoint of this configuration ({first})") from None
    return card
