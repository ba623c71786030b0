"""Piecewise generation of slow simulated acquisitions: claims, skipping, failures and the deadline."""

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ultrasound_ai.ulm.pieces import claim, claim_path, generate_pieces


@dataclasses.dataclass
class Piece:
    name: str
    seed: int
    path: Path


def test_claims_are_exclusive_and_taken_over_from_dead_processes(tmp_path):
    target = tmp_path / "a.h5"
    assert claim(target) and claim_path(target).read_text() == str(os.getpid())
    assert not claim(target)  # this (live) process holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim_path(target).write_text(dead.stdout.strip())
    assert claim(target)  # the claimer is gone: taken over


def test_generation_skips_done_and_claimed_pieces_cleans_up_on_failure_and_stops_at_the_deadline(tmp_path):
    ps = [Piece(f"p{i}", i, tmp_path / f"p{i}.h5") for i in range(4)]
    ps[0].path.write_text("done")
    claim_path(ps[1].path).write_text(str(os.getpid()))  # held by a live process
    written = []

    def write(p):
        if p.name == "p3":
            raise RuntimeError("simulation failed")
        p.path.write_text("x")
        written.append(p.name)

    with pytest.raises(RuntimeError):
        generate_pieces(ps, write)
    assert written == ["p2"] and not claim_path(ps[3].path).exists() and not ps[3].path.exists()
    assert claim_path(ps[1].path).exists()  # another process's claim is left alone
    assert generate_pieces(ps, write, deadline=time.time() - 1) == []
