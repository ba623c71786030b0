"""Finding model weights: `Resources/Models/` plus the folders named in ULTRASOUND_AI_MODELS.

A model is a `NAME.pt` with its `NAME.card.json` beside it (see checkpoint.py). The shipped models sit
in `Resources/Models/` next to the `ultrasound_ai/` package folder: at the repository root in a
checkout, and in the extension's scripted-modules folder once Slicer installs it (the CMake install
rule copies both), so one rule finds them in both cases and no network is needed. Folders listed in
the environment variable ULTRASOUND_AI_MODELS (os.pathsep-separated) are searched first, so a user's
own model shadows a shipped one of the same name.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import ultrasound_ai
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.models.checkpoint import CARD_SUFFIX, card_path_for

ENV_VAR = "ULTRASOUND_AI_MODELS"
SHIPPED_MODELS_DIR = Path(ultrasound_ai.__file__).resolve().parent.parent / "Resources" / "Models"


@dataclass(frozen=True)
class ModelEntry:
    """One installed model. `os.fspath(entry)` is its .pt path, so an entry can be passed where a path goes."""

    name: str
    method: str
    pt_path: Path
    card: dict = field(compare=False, repr=False)

    @property
    def card_path(self) -> Path:
        return card_path_for(self.pt_path)

    @property
    def is_default(self) -> bool:
        return bool(self.card.get("default", False))

    def __fspath__(self) -> str:
        return str(self.pt_path)


def model_dirs(existing_only: bool = True) -> list[Path]:
    """Folders searched for models, in order: ULTRASOUND_AI_MODELS entries, then the shipped folder."""
    dirs: list[Path] = []
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry.strip()).expanduser())
    dirs.append(SHIPPED_MODELS_DIR)
    seen, out = set(), []
    for d in dirs:
        key = os.path.normcase(str(d.resolve()))
        if key in seen or (existing_only and not d.is_dir()):
            continue
        seen.add(key)
        out.append(d)
    return out


def _read_entry(card_path: Path) -> ModelEntry | None:
    pt_path = card_path.with_name(card_path.name[: -len(CARD_SUFFIX)] + ".pt")
    if not pt_path.is_file():
        return None  # a card alone is documentation, not a usable model
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"model card {card_path}: skipped, not valid JSON ({exc})", stacklevel=3)
        return None
    if not isinstance(card, dict) or not isinstance(card.get("method"), str):
        warnings.warn(f"model card {card_path}: skipped, it names no method", stacklevel=3)
        return None
    name = card.get("name") if isinstance(card.get("name"), str) and card.get("name") else pt_path.stem
    return ModelEntry(name=name, method=card["method"], pt_path=pt_path, card=card)


def list_models(method: str | None = None) -> list[ModelEntry]:
    """Installed models (optionally only those of `method`, case-insensitive), in search order.

    Within a folder entries are sorted by name; a name already found in an earlier folder is skipped.
    """
    entries: list[ModelEntry] = []
    names: set[str] = set()
    for folder in model_dirs():
        found = [e for e in (_read_entry(p) for p in sorted(folder.glob("*" + CARD_SUFFIX))) if e is not None]
        for entry in sorted(found, key=lambda e: e.name):
            if entry.name in names:
                continue
            names.add(entry.name)
            entries.append(entry)
    if method is not None:
        entries = [e for e in entries if e.method.lower() == method.lower()]
    return entries


def find_model(name_or_path: str | os.PathLike) -> Path:
    """The .pt path for a model name (card name or file stem), or an existing .pt path as given."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = text.endswith(".pt") or os.sep in text or (os.altsep is not None and os.altsep in text)
    if looks_like_path:
        if path.is_file():
            return path
        raise InputError(f"model file {path}: not found")
    entries = list_models()
    for entry in entries:
        if entry.name == text:
            return entry.pt_path
    for entry in entries:
        if entry.pt_path.stem == text:
            return entry.pt_path
    known = ", ".join(e.name for e in entries) or "none"
    searched = ", ".join(str(d) for d in model_dirs(existing_only=False))
    raise InputError(f"model {text!r}: unknown; known models: {known} (searched {searched}; "
                     f"add folders with {ENV_VAR})")


def default_model(method: str) -> ModelEntry:
    """The model a method uses when none is named: the first (in search order) whose card says
    "default": true, else the first one found. InputError when no model of that method is installed."""
    entries = list_models(method)
    if not entries:
        known = sorted({e.method for e in list_models()})
        raise InputError(
            f"method {method!r}: no model installed (methods with models: {', '.join(known) or 'none'}); "
            f"train one or add a folder holding NAME.pt + NAME{CARD_SUFFIX} to {ENV_VAR}")
    for entry in entries:
        if entry.is_default:
            return entry
    return entries[0]
