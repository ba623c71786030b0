"""The repository is self-contained: a mention of a design document, a per-method reference note or a
shared folder must name a file that a clone of the repository has (docs/ holds the documents)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The three kinds of out-of-repository mention, spelled in pieces so that this file does not match itself.
_KINDS = ["shar" + "ed/", "DESIGN" + r"\.md", "refer" + r"ence/[a-z_]+\.md"]
MENTION = re.compile("|".join(_KINDS))
# The path-like token around a mention (what a reader would try to open).
TOKEN = re.compile(r"[\w./-]*(?:" + "|".join(_KINDS) + r")[\w./-]*")


def unresolved_mentions(root: Path, files) -> list[str]:
    """`path:line: token` for every mention in `files` (paths relative to `root`) that names no file of
    the repository, relative to the mentioning file's folder or to the repository root."""
    bad = []
    for rel in files:
        path = root / rel
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue  # binary files, submodules, files deleted but not yet committed
        if not MENTION.search(text):
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for match in TOKEN.finditer(line):
                token = match.group(0).rstrip(".")
                if not _resolves(root, path.parent, token):
                    bad.append(f"{rel}:{lineno}: {token}")
    return bad


def _resolves(root: Path, folder: Path, token: str) -> bool:
    for base in (folder, root):
        candidate = (base / token).resolve()
        if candidate.is_relative_to(root.resolve()) and candidate.exists():
            return True
    return False


def tracked_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    return [name for name in out.stdout.decode("utf-8").split("\0") if name]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_every_document_mention_resolves_inside_the_repository():
    bad = unresolved_mentions(REPO, tracked_files(REPO))
    assert not bad, ("mentions of files outside the repository (point to docs/ instead):\n" + "\n".join(bad))


def test_the_check_flags_outside_mentions_and_accepts_files_that_exist(tmp_path):
    doc, shared, note = "DESIGN" + ".md", "../" + "shar" + "ed/", "refer" + "ence/ulm.md"  # not matching this file
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / doc).write_text("# kept inside\n")
    (tmp_path / "a.py").write_text(f'"""See {shared}{doc} and {note}."""\n')
    (tmp_path / "b.py").write_text(f"# contracts: docs/{doc}\n")
    (tmp_path / "c.md").write_text("Nothing here.\n")
    assert unresolved_mentions(tmp_path, ["a.py", "b.py", "c.md"]) == [f"a.py:1: {shared}{doc}", f"a.py:1: {note}"]
