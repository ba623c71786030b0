"""The GoodModule fixture (a small correct Slicer scripted module) copied per test, and planted edits."""

from __future__ import annotations

import shutil
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "GoodModule"


def copy_good_module(tmp_path: Path) -> Path:
    dst = tmp_path / "GoodModule"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def edit(path: Path, old: str, new: str) -> None:
    """Plant a defect: replace the first ``old`` by ``new`` (the fixture must still contain ``old``)."""
    text = path.read_text(encoding="utf-8")
    assert old in text, f"fixture changed: {old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
