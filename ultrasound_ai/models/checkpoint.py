"""Checkpoints: `NAME.pt` (a plain state dict) beside `NAME.card.json` (its model card).

The `.pt` holds only tensors, so it loads with `torch.load(..., weights_only=True)` and can never run
code. The card says what the weights are for (method, configuration), what input they expect, how they
were trained and measured, and the sha256 and size of the `.pt`, which loading verifies.
See Resources/Models/README.md for the card's fields.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import ChecksumError, InputError

CARD_VERSION = 1
REQUIRED_CARD_KEYS = ("name", "method", "configuration", "input", "training", "metrics")
CARD_SUFFIX = ".card.json"
# Keys save_checkpoint fills in; a caller's values for them are replaced.
COMPUTED_CARD_KEYS = ("card_version", "file", "storage_dtype", "sha256", "size_bytes", "created", "engine_version",
                      "torch_version", "n_parameters")


def card_path_for(pt_path: str | os.PathLike) -> Path:
    """NAME.pt -> NAME.card.json (same folder)."""
    pt_path = Path(pt_path)
    if pt_path.suffix != ".pt":
        raise InputError(f"checkpoint {pt_path}: expected a file name ending in .pt")
    return pt_path.with_name(pt_path.name[: -len(".pt")] + CARD_SUFFIX)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate_card(card: Any, what: str = "model card") -> dict:
    """Check the caller-supplied part of a card; returns it. InputError naming the missing keys."""
    if not isinstance(card, Mapping):
        raise InputError(f"{what}: expected a JSON object (dict), got {type(card).__name__}")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise InputError(f"{what}: missing required key(s) {', '.join(missing)}; "
                         f"a card needs {', '.join(REQUIRED_CARD_KEYS)}")
    for key in ("name", "method"):
        if not isinstance(card[key], str) or not card[key].strip():
            raise InputError(f"{what}: {key!r} must be a non-empty string, got {card[key]!r}")
    for key in ("configuration", "input", "training", "metrics"):
        if not isinstance(card[key], Mapping):
            raise InputError(f"{what}: {key!r} must be a JSON object (dict), got {type(card[key]).__name__}")
    return dict(card)


def _tensor_state(state_dict, fp16: bool) -> dict:
    import torch

    if not isinstance(state_dict, Mapping):
        raise InputError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise InputError(f"state_dict: keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise InputError(f"state_dict[{key!r}]: expected a tensor, got {type(value).__name__}")
        value = value.detach().to("cpu")
        if fp16 and value.is_floating_point():
            value = value.to(torch.float16)
        # clone() so the saved storage holds only this tensor, not a larger view's base.
        out[key] = value.contiguous().clone()
    if not out:
        raise InputError("state_dict: expected at least one tensor, got an empty mapping")
    return out


def save_checkpoint(state_dict, pt_path: str | os.PathLike, card: dict, *, fp16: bool = False) -> dict:
    """Write NAME.pt and NAME.card.json atomically; returns the completed card.

    Floating tensors are stored as float16 when fp16=True (halves the file; load_checkpoint casts back).
    The card gets card_version, file, storage_dtype, sha256, size_bytes, created (UTC ISO 8601),
    engine_version, torch_version and n_parameters.
    """
    import torch

    import ultrasound_ai

    pt_path = Path(pt_path)
    card_path = card_path_for(pt_path)
    card = validate_card(card)
    try:
        json.dumps(card, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"model card for {pt_path}: not JSON-serialisable: {exc}") from exc
    tensors = _tensor_state(state_dict, fp16)
    float_dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
    storage = "float16" if fp16 else ("float32" if float_dtypes <= {torch.float32} else
                                      ",".join(sorted(str(d).replace("torch.", "") for d in float_dtypes)))
    with atomic_output(pt_path) as tmp_pt:
        torch.save(tensors, tmp_pt)
        completed = {k: v for k, v in card.items() if k not in COMPUTED_CARD_KEYS}
        completed.update(
            card_version=CARD_VERSION,
            file=pt_path.name,
            storage_dtype=storage,
            sha256=sha256_file(tmp_pt),
            size_bytes=tmp_pt.stat().st_size,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            engine_version=ultrasound_ai.__version__,
            torch_version=torch.__version__.split("+")[0],
            n_parameters=int(sum(v.numel() for v in tensors.values() if v.is_floating_point())),
        )
        # The card is renamed into place first, then the .pt: a failure in either leaves neither new file.
        with atomic_output(card_path) as tmp_card:
            tmp_card.write_text(json.dumps(_json_safe(completed), indent=2) + "\n", encoding="utf-8")
    return completed


def _json_safe(value):
    """NaN/inf metrics become null so the card stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def read_card(pt_path: str | os.PathLike) -> dict:
    """Read and check the card beside NAME.pt (no checksum; see load_checkpoint)."""
    pt_path = Path(pt_path)
    card_path = card_path_for(pt_path)
    if not card_path.is_file():
        raise InputError(f"checkpoint {pt_path}: model card {card_path.name} not found beside it "
                         f"(every NAME.pt needs NAME{CARD_SUFFIX})")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"model card {card_path}: not valid JSON: {exc}") from exc
    card = validate_card(card, f"model card {card_path}")
    version = card.get("card_version")
    if not isinstance(version, int) or version < 1:
        raise InputError(f"model card {card_path}: missing or invalid card_version (was it written by save_checkpoint?)")
    if version > CARD_VERSION:
        raise InputError(f"model card {card_path}: card_version {version} is newer than this engine supports "
                         f"({CARD_VERSION}); update ultrasound-ai")
    if not isinstance(card.get("sha256"), str) or len(card["sha256"]) != 64:
        raise InputError(f"model card {card_path}: missing or invalid sha256 of {pt_path.name}")
    return card


def load_checkpoint(pt_path: str | os.PathLike, *, map_location="cpu", verify: bool = True,
                    dtype="float32") -> tuple[dict, dict]:
    """Read NAME.card.json, verify NAME.pt's sha256, load the state dict safely; returns (state_dict, card).

    Floating tensors are cast to `dtype` (a torch dtype or its name; None keeps the stored dtype).
    Raises InputError for a missing card or .pt, a card describing another file, or a corrupt .pt, and
    ChecksumError (an InputError) when the sha256 differs.
    """
    import torch

    pt_path = Path(os.fspath(pt_path))
    if not pt_path.is_file():
        raise InputError(f"checkpoint {pt_path}: not found")
    card = read_card(pt_path)
    size = pt_path.stat().st_size
    expected_size = card.get("size_bytes")
    if verify:
        if isinstance(expected_size, int) and expected_size != size:
            raise ChecksumError(
                f"checkpoint {pt_path}: {size} bytes but its card says {expected_size}; the file is truncated or "
                f"modified, or the card belongs to another file ({card.get('file', '?')})")
        actual = sha256_file(pt_path)
        if actual != card["sha256"]:
            raise ChecksumError(
                f"checkpoint {pt_path}: sha256 {actual} does not match its card ({card['sha256']}); the file is "
                f"corrupt or modified, or the card belongs to another file ({card.get('file', '?')})")
    try:
        state = torch.load(pt_path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors all mean "not a usable checkpoint"
        raise InputError(f"checkpoint {pt_path}: cannot be loaded as a weights-only state dict "
                         f"(truncated or corrupt?): {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"checkpoint {pt_path}: expected a state dict of named tensors, got {type(state).__name__}")
    target = _torch_dtype(dtype)
    if target is not None:
        state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in state.items()}
    return dict(state), card


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InputError(f"dtype: expected a floating torch dtype such as 'float32', got {dtype!r}")
    return value


def load_into(model, pt_path: str | os.PathLike, **kw) -> dict:
    """Load NAME.pt into `model` (strict: every key and shape must match); returns the card.

    By default the tensors go to the model's device and floating dtype. Keyword arguments are passed to
    load_checkpoint. A mismatch raises InputError listing the missing and unexpected keys and the shape
    differences, naming the file and the card's configuration.
    """
    params = list(model.parameters()) + list(model.buffers())
    floats = [p for p in params if p.is_floating_point()]
    kw.setdefault("map_location", params[0].device if params else "cpu")
    kw.setdefault("dtype", floats[0].dtype if floats else "float32")
    state, card = load_checkpoint(pt_path, **kw)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_short_list(shapes)}")
        raise InputError(
            f"checkpoint {pt_path} does not fit {type(model).__name__} (method {card.get('method')!r}, "
            f"configuration {json.dumps(card.get('configuration'), sort_keys=True)}): " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return card


def _short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def check_input_spacing(card: Mapping, spacing, what: str, rtol: float = 0.01,
                        key: str = "pixel_spacing_mm") -> list[float]:
    """Refuse an input whose spacing differs from the card's `input[key]` by more than rtol (relative).

    `spacing` and the card value are sequences in the same axis order (the key's name says which).
    Returns the card's spacing, so a method can resample to it instead of calling this.
    """
    import numpy as np

    inputs = card.get("input") if isinstance(card, Mapping) else None
    if not isinstance(inputs, Mapping) or key not in inputs:
        raise InputError(f"model card {card.get('name', '?') if isinstance(card, Mapping) else '?'}: "
                         f"input.{key} is not recorded, cannot check the spacing of {what}")
    expected = np.atleast_1d(np.asarray(inputs[key], dtype=np.float64))
    given = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if given.shape != expected.shape:
        raise InputError(f"{what}: spacing {given.tolist()} has {given.size} value(s); model "
                         f"{card.get('name')!r} expects {expected.size} ({key} = {expected.tolist()})")
    if not np.all(np.isfinite(given)) or not np.allclose(given, expected, rtol=rtol, atol=0.0):
        raise InputError(f"{what}: spacing {given.tolist()} mm does not match the {expected.tolist()} mm that model "
                         f"{card.get('name')!r} was trained on ({key}, tolerance {rtol:.0%}); resample the input")
    return expected.tolist()
