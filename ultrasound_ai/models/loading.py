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

__all__ = ["load_method_model"]


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
