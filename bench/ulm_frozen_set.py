"""The frozen pymust-formed ULM benchmark set: its definition, deterministic generation and loading.

The set is regenerated bit for bit from what is written here (pymust SIMUS + delay-and-sum through
`ultrasound_ai.ulm.pymust_sim`), into the git-ignored `bench/data/` folder; only this definition is in
the repository. It was frozen (version FROZEN_SET_VERSION) before any ULM model was retrained on pymust
frames, and it must never be used to train or select a model.

Conditions: 40, 100 and 200 bubbles per 84 x 143-lambda frame, each at two noise levels (-20 and
-40 dB, rms relative to the mean bubble peak), tissue clutter +20 dB. Per condition: TEST_PIECES
independent acquisitions of PIECE_FRAMES consecutive frames (3 x 100 = 300 frames, three different
vessel trees), and VAL_PIECES validation acquisition(s) used only to tune the classical methods' fixed N.

What is held out from every training set of the project:
- seeds: 72,000,000 (test) and 73,000,000 (validation) + 1000 * bubbles + 10 * |noise dB| + piece,
  disjoint from the training pools (train_seed * 1,000,000 + i), the training validation seeds
  (900,000 + j), the fast-simulator benchmark seeds (70/71,000,000 + ...) and the pymust training
  pieces (`ultrasound_ai.ulm.pymust_training_set`: 75,500,000 + index);
- vessel trees: those seeds, and N_TREES trees per field of view (the training simulator uses 4);
- probe: FROZEN_PROBE (bandwidth, plane-wave tilts, kerf and f-number differ from pymust_sim's
  default probe, which is the centre of any pymust-based training).

    python bench/ulm_frozen_set.py generate [--split test|val|all]   # resumable; pieces are claimed
    python bench/ulm_frozen_set.py status

Generation runs piece by piece (each piece written atomically), so an interrupted run loses at most one
piece, and several processes can share the work (a piece is claimed by an exclusive .claim file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FROZEN_SET_VERSION = "ulm-pymust-frozen-1"
DATA_DIR = Path(__file__).resolve().parent / "data" / FROZEN_SET_VERSION
BUBBLES = (40.0, 100.0, 200.0)
NOISE_DB = (-20.0, -40.0)
CLUTTER_DB = 20.0
PIECE_FRAMES = 100
TEST_PIECES = 3
VAL_PIECES = 1
N_TREES = 5
TEST_SEED0 = 72_000_000
VAL_SEED0 = 73_000_000
# Probe of the frozen set (fields of ultrasound_ai.ulm.pymust_sim.PymustProbe).
# Tissue: 4 scatterers per mm^2 imaged every 50 frames (interpolated between; it moves by ~5 um): the
# SIMUS cost of the tissue stays below that of the bubbles on this 2-core machine.
FROZEN_PROBE = dict(bandwidth_percent=75.0, tilts_deg=(-6.0, 0.0, 6.0), kerf_mm=0.025, f_number=1.2,
                    tissue_scatterers_per_mm2=4.0, tissue_keyframe_every=50, workers=1)


@dataclasses.dataclass(frozen=True)
class Piece:
    split: str  # "test" or "val"
    bubbles: float
    noise_db: float
    index: int

    @property
    def seed(self) -> int:
        base = TEST_SEED0 if self.split == "test" else VAL_SEED0
        return int(base + 1000 * round(self.bubbles) + 10 * round(abs(self.noise_db)) + self.index)

    @property
    def name(self) -> str:
        return f"{self.split}_b{round(self.bubbles)}_n{round(abs(self.noise_db))}_p{self.index}"

    @property
    def path(self) -> Path:
        return DATA_DIR / f"{self.name}.h5"

    def config(self):
        from ultrasound_ai.ulm.simulator import UlmSimConfig

        return UlmSimConfig(n_frames=PIECE_FRAMES, bubbles_per_frame=self.bubbles, noise_db=self.noise_db,
                            clutter_db=CLUTTER_DB, seed=self.seed, n_trees=N_TREES)


def pieces(split: str = "all") -> list[Piece]:
    """Pieces in generation order: first piece of every condition first, so a partial set covers all."""
    out = []
    for sp, n in (("test", TEST_PIECES), ("val", VAL_PIECES)):
        if split not in ("all", sp):
            continue
        for k in range(n):
            for b in BUBBLES:
                for nd in NOISE_DB:
                    out.append(Piece(sp, b, nd, k))
    return out


def probe():
    from ultrasound_ai.ulm.pymust_sim import PymustProbe

    return PymustProbe(**FROZEN_PROBE)


def generate(split: str = "all") -> None:
    from ultrasound_ai.ulm.pieces import generate_pieces
    from ultrasound_ai.ulm.pymust_sim import simulate_pymust_to_file

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    generate_pieces(pieces(split), lambda p: simulate_pymust_to_file(p.path, p.config(), probe=probe()),
                    log=lambda line: print(line, flush=True))


def status() -> dict:
    done = [p.name for p in pieces() if p.path.exists()]
    return {"version": FROZEN_SET_VERSION, "dir": str(DATA_DIR), "done": len(done), "total": len(pieces()),
            "missing": [p.name for p in pieces() if not p.path.exists()]}


def load(piece: Piece):
    """The piece as an `Acquisition` (with its ground truth); InputError if it was not generated."""
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.io.ulm_files import read_acquisition

    if not piece.path.exists():
        raise InputError(f"frozen ULM set piece {piece.name} is missing: run `python bench/ulm_frozen_set.py generate`")
    acq = read_acquisition(piece.path)
    if acq.attrs.get("sim_seed") != piece.seed:
        raise InputError(f"{piece.path}: seed {acq.attrs.get('sim_seed')} is not the frozen {piece.seed}")
    return acq


def description() -> str:
    """One paragraph for BENCHMARKS.md."""
    from ultrasound_ai.ulm.pymust_sim import _pymust_version

    return (f"Frozen set `{FROZEN_SET_VERSION}` (`bench/ulm_frozen_set.py`, regenerated deterministically into "
            f"`bench/data/`, pymust {_pymust_version()}): SIMUS + delay-and-sum frames (three compounded plane "
            f"waves) on the PALA grid 84×143 λ at 1 kHz, tissue clutter +{CLUTTER_DB:g} dB; per condition "
            f"{TEST_PIECES} test acquisitions × {PIECE_FRAMES} frames (seeds {TEST_SEED0:,} + 1000 × bubbles + "
            f"10 × |noise dB| + piece, {N_TREES} vessel trees each) and {VAL_PIECES} validation acquisition(s) "
            f"(seeds {VAL_SEED0:,} + ...) used only to tune the classical methods' fixed N; probe "
            f"{json.dumps({k: v for k, v in FROZEN_PROBE.items() if k != 'workers'})} (held out from all training).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["generate", "status"])
    ap.add_argument("--split", choices=["test", "val", "all"], default="all")
    args = ap.parse_args(argv)
    if args.action == "generate":
        generate(args.split)
    print(json.dumps(status(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
