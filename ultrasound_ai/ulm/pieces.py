"""Piecewise, resumable generation of slow simulated acquisitions (pymust frames cost minutes each).

A data set is a list of pieces, each one acquisition file written atomically (the acquisition
writer renames a finished temporary file), so an interrupted run loses at most the piece it was
writing. Several processes can share the work: a piece is claimed by an exclusive `<piece>.claim`
file holding the claimer's pid; a claim left by a dead process is taken over. Used by the frozen
benchmark set (`bench/ulm_frozen_set.py`) and the pymust training pieces
(`ultrasound_ai.ulm.pymust_training_set`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol


class GeneratedPiece(Protocol):
    name: str
    seed: int
    path: Path


def claim_path(path: Path) -> Path:
    return Path(path).with_suffix(".claim")


def claim(path: Path) -> bool:
    """Exclusive claim of the piece written to `path` by this process (False: another live process has it)."""
    c = claim_path(path)
    for _ in range(2):
        try:
            fd = os.open(c, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(c.read_text().strip() or 0)
                os.kill(pid, 0)
                return False  # alive: someone else works on it
            except (ValueError, ProcessLookupError, FileNotFoundError):
                c.unlink(missing_ok=True)
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def generate_pieces(pieces: Iterable[GeneratedPiece], write: Callable[[GeneratedPiece], object],
                    log: Callable[[str], None] | None = None, deadline: float | None = None) -> list[str]:
    """Write every piece not yet on disk nor claimed by another process; returns the names written.

    `write(piece)` must create `piece.path` atomically. `deadline` (time.time() seconds): no piece is
    started after it, so a bounded run ends between pieces instead of being killed inside one.
    """
    done = []
    for p in pieces:
        if deadline is not None and time.time() >= deadline:
            break
        if p.path.exists() or not claim(p.path):
            continue
        try:
            t = time.time()
            write(p)
            done.append(p.name)
            if log is not None:
                log(f"{time.strftime('%H:%M:%S')} {p.name} seed {p.seed}: {time.time() - t:.0f} s")
        finally:
            claim_path(p.path).unlink(missing_ok=True)
    return done
