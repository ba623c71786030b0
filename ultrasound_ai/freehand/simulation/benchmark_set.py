"""The frozen freehand benchmark set "freehand-v1": 20 held-out simulated sweeps.

Five sweeps per scanning tactic (linear, curved, loop, sector), seeds 900000 + i (i = 0..19, tactic
TACTICS[i // 5]) - far from any training seed range. Sweeps are generated on demand into a cache folder
(default ``bench/data/freehand-v1/``, git-ignored) with a ``manifest.json`` recording the set name, the
simulator version, the generation settings and, per sweep, file name, seed, tactic and sha256. On reuse
the manifest must match what is asked for (same simulator version, settings and seeds): a mismatch is
refused with a clear message rather than silently mixing sweeps from different simulators; missing or
altered sweep files are regenerated (generation is deterministic).

Settings: 200 frames at 20 fps (10 s, the full length of the paper-like sweeps, which is what drift is
about) of 96 x 104 pixels at 0.15 mm - smaller frames than the simulator default, to keep generation
within minutes on two CPU cores; pose metrics depend on the frame's physical size only through the
three reference points.

"freehand-v2" is the same for the training family as it is since issue 15 (motion "varied": speed
changes, pauses and reversals within a sweep; appearance "randomised" per sweep), seeds 920000 + i: the
held-out set on which retrained models are compared and selected (never on freehand-indep-v1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ultrasound_ai.core.errors import InputError

__all__ = ["SET_NAME", "SEED_BASE", "SweepSpec", "benchmark_specs", "default_cache_dir", "ensure_benchmark_set"]

SET_NAME = "freehand-v1"
SEED_BASE = 900_000
# name -> (first seed, simulate_sweep motion, appearance)
SETS = {SET_NAME: (SEED_BASE, "smooth", "nominal"), "freehand-v2": (920_000, "varied", "randomised")}
PER_TACTIC = 5
DEFAULT_FRAMES = 200
DEFAULT_FRAME_SHAPE = (96, 104)
DEFAULT_PIXEL_SPACING = 0.15


@dataclass(frozen=True)
class SweepSpec:
    index: int
    seed: int
    tactic: str

    @property
    def file_name(self) -> str:
        return f"sweep_{self.index:02d}_{self.tactic}_{self.seed}.h5"


def _set(name: str):
    if name not in SETS:
        raise InputError(f"freehand benchmark set: expected one of {sorted(SETS)}, got {name!r}")
    return SETS[name]


def benchmark_specs(name: str = SET_NAME) -> list[SweepSpec]:
    """The 20 sweeps of the set, in a fixed order."""
    from ultrasound_ai.freehand.simulation.trajectories import TACTICS

    base = _set(name)[0]
    return [SweepSpec(i, base + i, TACTICS[i // PER_TACTIC]) for i in range(PER_TACTIC * len(TACTICS))]


def default_cache_dir(name: str = SET_NAME) -> Path:
    """``bench/data/<set name>`` of the source checkout."""
    _set(name)
    return Path(__file__).resolve().parents[3] / "bench" / "data" / name  # ultrasound_ai/freehand/simulation/


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _settings(n_frames: int, frame_shape, pixel_spacing: float, name: str = SET_NAME) -> dict:
    from ultrasound_ai.freehand.simulation.simulator import SIMULATOR_VERSION

    out = {"name": name, "simulator_version": SIMULATOR_VERSION, "n_frames": int(n_frames),
           "frame_shape_hw": [int(v) for v in frame_shape], "pixel_spacing_mm": float(pixel_spacing),
           "n_imus": 4, "frame_rate_hz": 20.0}
    if name != SET_NAME:  # freehand-v1's manifest stays as it was
        out["motion"], out["appearance"] = _set(name)[1:]
    return out


def ensure_benchmark_set(cache_dir=None, n_frames: int = DEFAULT_FRAMES, frame_shape=DEFAULT_FRAME_SHAPE,
                         pixel_spacing: float = DEFAULT_PIXEL_SPACING,
                         progress: Optional[Callable[[int, int, str], None]] = None,
                         name: str = SET_NAME) -> tuple[list[Path], dict]:
    """Generate (or reuse) the set `name` (SETS); returns (sweep paths in spec order, manifest dict).

    progress(done, total, message) is called per sweep.
    """
    from ultrasound_ai.core.atomic import atomic_output
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
    from ultrasound_ai.io.sweep import write_sweep

    _, motion, appearance = _set(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(name)
    cache.mkdir(parents=True, exist_ok=True)
    settings = _settings(n_frames, frame_shape, pixel_spacing, name)
    specs = benchmark_specs(name)
    manifest_path = cache / "manifest.json"
    known = {}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{manifest_path}: unreadable benchmark manifest ({exc}); delete the folder to rebuild")
        differs = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if differs:
            raise InputError(
                f"{manifest_path}: the cached benchmark set was made with different settings "
                f"{ {k: a for k, (a, _) in differs.items()} } than asked for { {k: b for k, (_, b) in differs.items()} }; "
                f"delete {cache} to rebuild it"
            )
        for entry in old.get("sweeps", []):
            known[entry.get("file")] = entry
    entries, paths = [], []
    for done, spec in enumerate(specs):
        path = cache / spec.file_name
        entry = known.get(spec.file_name)
        fresh = (entry is not None and entry.get("seed") == spec.seed and entry.get("tactic") == spec.tactic
                 and path.is_file() and _sha256(path) == entry.get("sha256"))
        if not fresh:
            if progress is not None:
                progress(done, len(specs), f"simulating {spec.file_name}")
            sweep = simulate_sweep(spec.seed, n_frames=n_frames, tactic=spec.tactic, frame_shape=tuple(frame_shape),
                                   pixel_spacing=pixel_spacing, n_imus=4, motion=motion, appearance=appearance)
            sweep.attrs["benchmark_set"] = name
            sweep.attrs["benchmark_index"] = spec.index
            write_sweep(sweep, path)
            entry = {"file": spec.file_name, "seed": spec.seed, "tactic": spec.tactic, "sha256": _sha256(path),
                     "reversed": bool(sweep.attrs.get("reversed", False))}
        entries.append(entry)
        paths.append(path)
        if progress is not None:
            progress(done + 1, len(specs), spec.file_name)
    manifest = dict(settings, sweeps=entries)
    with atomic_output(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return paths, manifest
