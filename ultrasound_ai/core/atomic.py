"""Write outputs under a temporary name and rename on success, so no half-written file is left."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


def _temporary_sibling(path: Path) -> Path:
    # Same folder (rename stays atomic on one file system); keep the suffixes so writers that pick the
    # format from the extension (SimpleITK, h5py, PIL) still see it.
    suffixes = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    return path.with_name(f".{stem}.partial-{uuid.uuid4().hex[:8]}{suffixes}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    final = Path(path)
    if final.parent and not final.parent.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if not tmp.exists():
        raise RuntimeError(f"writer did not create {final}")
    os.replace(tmp, final)


def is_partial(path: str | os.PathLike) -> bool:
    """True for a temporary file made by `atomic_output` (tests look for leftovers with this)."""
    return ".partial-" in Path(path).name
