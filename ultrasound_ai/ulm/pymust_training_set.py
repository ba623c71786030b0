"""Training pieces formed physically with pymust (SIMUS + delay-and-sum), randomised per piece.

Each piece is one acquisition file (`piece_<index>.h5`, with its ground truth) made by
`ultrasound_ai.ulm.pymust_sim` with what the real world varies drawn per piece from the piece's own
generator: concentration (log-uniform per 84 x 143-lambda frame), noise and tissue-clutter levels,
vessel trees (their number and, through the seed, their layout), flow speed and bubble brightness
spread, tissue motion, and the probe in a band around pymust_sim's nominal L22-14v-like probe
(bandwidth, plane-wave tilts, kerf, f-number, tissue scatterer density). `dml_training` mixes
these pieces with the fast simulator's pool (`data.pymust_dir`, `data.pymust_fraction`).

Seeds: PIECE_SEED0 + index (75,500,000 + index). Disjoint from the frozen pymust set (72,000,000 and
73,000,000 + at most 200,409), the fast-simulator benchmark (70,000,000 and 71,000,000 + ...), the
training validation seeds (900,000 + j) and the fast simulator's training pools (train_seed *
1,000,000 + i with i < pool_size: a clash would need train_seed 75 and a pool of 500,000 entries).
The vessel trees come from the seed, so none is a frozen-set tree.

    python -m ultrasound_ai.ulm.pymust_training_set generate --out runs/ulm_pymust_train_v1 --count 200
    python -m ultrasound_ai.ulm.pymust_training_set status --out runs/ulm_pymust_train_v1

Generation is piecewise, atomic and resumable (`ultrasound_ai.ulm.pieces`): rerunning the same
command skips the pieces written; several processes can share a directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ultrasound_ai.core.errors import InputError

PIECE_SEED0 = 75_500_000
DEFAULT_FRAMES = 64
PIECE_GLOB = "piece_*.h5"

# Bands of the per-piece randomisation (uniform unless said otherwise).
BANDS = {
    "bubbles_per_frame": (30.0, 250.0),  # log-uniform, per 84 x 143-lambda frame
    "noise_db": (-45.0, -15.0),
    "clutter_db": (10.0, 30.0),
    "n_trees": (3, 6),  # integers, both ends included
    "peak_speed_mm_s": (20.0, 60.0),
    "amplitude_log_sd": (0.3, 0.5),
    "tissue_motion_lambda": (0.02, 0.1),
    "bandwidth_percent": (55.0, 85.0),
    "max_tilt_deg": (3.0, 8.0),  # three plane waves: -t, 0, +t
    "kerf_mm": (0.015, 0.03),
    "f_number": (0.8, 1.5),
    "tissue_scatterers_per_mm2": (3.0, 6.0),
}
# Tissue simulated every this many frames (interpolated between): as the frozen set, to keep the
# tissue's SIMUS cost below the bubbles'.
TISSUE_KEYFRAME_EVERY = 50


@dataclasses.dataclass(frozen=True)
class TrainingPiece:
    index: int
    out_dir: Path
    n_frames: int = DEFAULT_FRAMES
    shape_zx: tuple[int, int] = (84, 143)

    @property
    def seed(self) -> int:
        return PIECE_SEED0 + int(self.index)

    @property
    def name(self) -> str:
        return f"piece_{int(self.index):05d}"

    @property
    def path(self) -> Path:
        return Path(self.out_dir) / f"{self.name}.h5"

    def draw(self) -> dict:
        """This piece's randomised settings (from its own generator: independent of the order of generation)."""
        rng = np.random.default_rng([PIECE_SEED0, int(self.index)])

        def u(key):
            return float(rng.uniform(*BANDS[key]))

        lo, hi = BANDS["bubbles_per_frame"]
        out = {"bubbles_per_frame": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
               "noise_db": u("noise_db"), "clutter_db": u("clutter_db"),
               "n_trees": int(rng.integers(BANDS["n_trees"][0], BANDS["n_trees"][1] + 1))}
        for key in ("peak_speed_mm_s", "amplitude_log_sd", "tissue_motion_lambda", "bandwidth_percent",
                    "max_tilt_deg", "kerf_mm", "f_number", "tissue_scatterers_per_mm2"):
            out[key] = u(key)
        return out

    def config(self):
        from ultrasound_ai.ulm.simulator import PALA_FRAME_PIXELS, UlmSimConfig

        s = self.draw()
        z, x = (int(v) for v in self.shape_zx)
        return UlmSimConfig(n_frames=int(self.n_frames), bubbles_per_frame=s["bubbles_per_frame"] * z * x / PALA_FRAME_PIXELS,
                            noise_db=s["noise_db"], clutter_db=s["clutter_db"], seed=self.seed, shape_zx=(z, x),
                            n_trees=s["n_trees"], peak_speed_mm_s=s["peak_speed_mm_s"],
                            amplitude_log_sd=s["amplitude_log_sd"], tissue_motion_lambda=s["tissue_motion_lambda"])

    def probe(self):
        from ultrasound_ai.ulm.pymust_sim import PymustProbe

        s = self.draw()
        t = s["max_tilt_deg"]
        return PymustProbe(bandwidth_percent=s["bandwidth_percent"], tilts_deg=(-t, 0.0, t), kerf_mm=s["kerf_mm"],
                           f_number=s["f_number"], tissue_scatterers_per_mm2=s["tissue_scatterers_per_mm2"],
                           tissue_keyframe_every=TISSUE_KEYFRAME_EVERY, workers=1)

    def write(self):
        from ultrasound_ai.ulm.pymust_sim import simulate_pymust_to_file

        return simulate_pymust_to_file(self.path, self.config(), probe=self.probe())


def training_pieces(out_dir, count: int, start: int = 0, n_frames: int = DEFAULT_FRAMES,
                    shape_zx=(84, 143)) -> list[TrainingPiece]:
    if int(count) < 1 or int(start) < 0 or int(n_frames) < 1:
        raise InputError(f"pymust training pieces: need count >= 1, start >= 0, frames >= 1; got {count}, {start}, {n_frames}")
    return [TrainingPiece(i, Path(out_dir), int(n_frames), tuple(int(v) for v in shape_zx))
            for i in range(int(start), int(start) + int(count))]


def generate(out_dir, count: int, start: int = 0, n_frames: int = DEFAULT_FRAMES, shape_zx=(84, 143),
             deadline: float | None = None, log=None) -> list[str]:
    """Write the pieces start .. start + count - 1 not yet in `out_dir`; returns the names written."""
    from ultrasound_ai.ulm.pieces import generate_pieces

    todo = training_pieces(out_dir, count, start, n_frames, shape_zx)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return generate_pieces(todo, lambda p: p.write(), log=log, deadline=deadline)


def piece_files(directory) -> list[Path]:
    """The finished pieces of a directory, sorted (InputError if it is missing or holds none)."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"pymust training pieces: {d} is not a directory")
    files = sorted(d.glob(PIECE_GLOB))
    if not files:
        raise InputError(f"pymust training pieces: {d} holds no {PIECE_GLOB} file")
    return files


def main(argv=None) -> int:
    from ultrasound_ai.io.ulm_files import acquisition_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["generate", "status"])
    ap.add_argument("--out", required=True, help="directory of the pieces (under runs/: git-ignored)")
    ap.add_argument("--count", type=int, default=200, help="pieces start .. start + count - 1")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames per piece")
    ap.add_argument("--stop-at", default=None,
                    help="HH:MM local time after which no new piece is started (a bounded run ends between pieces)")
    args = ap.parse_args(argv)
    try:
        if args.action == "generate":
            deadline = None
            if args.stop_at:
                hh, mm = (int(v) for v in args.stop_at.split(":"))
                now = time.localtime()
                deadline = time.mktime(now[:3] + (hh, mm, 0) + now[6:])
            generate(args.out, args.count, args.start, args.frames, deadline=deadline,
                     log=lambda line: print(line, flush=True))
        files = piece_files(args.out) if Path(args.out).is_dir() and any(Path(args.out).glob(PIECE_GLOB)) else []
        print(json.dumps({"dir": str(args.out), "pieces": len(files),
                          "frames": sum(acquisition_info(f).shape[0] for f in files)}, indent=1))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
