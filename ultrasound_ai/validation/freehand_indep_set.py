"""The frozen validation set "freehand-indep-v1": 20 sweeps of the independent generator.

Five sweeps per tactic (linear, curved, sector, loop): sweep i has seed SEED_BASE + i and tactic
TACTICS[i // 5]. Frame count (160-240), frame size (20-28 mm deep, 20-26 mm wide, wider than the shipped networks' 15-mm
grids), pixel spacing
(0.13-0.18 mm) and everything else are drawn from the seed by `freehand_indep.generate_sweep`, 4 IMUs,
20 Hz. The set is defined by (generator version, seeds); the files are regenerated deterministically
into a git-ignored folder (default ``bench/data/freehand-indep-v1/``) whose ``manifest.json`` records
the definition and each file's sha256. A cache made by another generator version is refused; a missing
or altered file is regenerated. Never train or select a model on this set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.validation.freehand_indep import GENERATOR_VERSION, TACTICS

__all__ = ["SET_NAME", "SEED_BASE", "set_definition", "default_cache_dir", "ensure_indep_set"]

SET_NAME = "freehand-indep-v1"
SEED_BASE = 610_000
PER_TACTIC = 5


def set_definition() -> dict:
    """What identifies the set: name, generator version and the (file, seed, tactic) of each sweep."""
    sweeps = []
    for i in range(PER_TACTIC * len(TACTICS)):
        seed, tactic = SEED_BASE + i, TACTICS[i // PER_TACTIC]
        sweeps.append({"file": f"indep_{i:02d}_{tactic}_{seed}.h5", "seed": seed, "tactic": tactic})
    return {"name": SET_NAME, "generator_version": GENERATOR_VERSION, "n_imus": 4, "frame_rate_hz": 20.0,
            "sweeps": sweeps}


def default_cache_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bench" / "data" / SET_NAME


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_indep_set(cache_dir=None, progress: Optional[Callable[[int, int, str], None]] = None,
                     limit: Optional[int] = None) -> tuple[list[Path], dict]:
    """Generate what is missing and return (sweep paths in set order, manifest). `limit`: only the first sweeps."""
    from ultrasound_ai.core.atomic import atomic_output
    from ultrasound_ai.io.sweep import write_sweep
    from ultrasound_ai.validation.freehand_indep import generate_sweep

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    definition = set_definition()
    manifest_file = folder / "manifest.json"
    recorded = {}
    if manifest_file.exists():
        try:
            previous = json.loads(manifest_file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{manifest_file}: unreadable manifest ({exc}); delete {folder} to rebuild the set")
        if previous.get("generator_version") != GENERATOR_VERSION or previous.get("name") != SET_NAME:
            raise InputError(f"{manifest_file}: made by {previous.get('generator_version')!r} for "
                             f"{previous.get('name')!r}, expected {GENERATOR_VERSION!r} for {SET_NAME!r}; "
                             f"delete {folder} to rebuild it")
        recorded = {s["file"]: s for s in previous.get("sweeps", []) if "sha256" in s}
    wanted = definition["sweeps"][:limit] if limit else definition["sweeps"]
    paths, entries = [], []
    for k, spec in enumerate(wanted):
        path = folder / spec["file"]
        old = recorded.get(spec["file"])
        if not (old and old.get("seed") == spec["seed"] and path.is_file() and _file_digest(path) == old["sha256"]):
            if progress is not None:
                progress(k, len(wanted), f"generating {spec['file']}")
            sweep = generate_sweep(spec["seed"], spec["tactic"])
            sweep.attrs["benchmark_set"] = SET_NAME
            write_sweep(sweep, path)
            old = dict(spec, sha256=_file_digest(path), n_frames=sweep.n_frames,
                       frame_shape_hw=list(sweep.frames.shape[1:]), pixel_spacing_mm=sweep.pixel_spacing_xy[0])
        entries.append(old)
        paths.append(path)
    # keep entries of sweeps beyond `limit` that were generated before
    entries += [recorded[s["file"]] for s in definition["sweeps"][len(wanted):] if s["file"] in recorded]
    with atomic_output(manifest_file) as tmp:
        tmp.write_text(json.dumps(dict(definition, sweeps=entries), indent=2) + "\n")
    return paths, dict(definition, sweeps=entries[:len(wanted)])


if __name__ == "__main__":  # python -m ultrasound_ai.validation.freehand_indep_set [folder]
    import sys

    files, _ = ensure_indep_set(sys.argv[1] if len(sys.argv) > 1 else None,
                                progress=lambda k, n, msg: print(f"[{k}/{n}] {msg}", flush=True))
    print(f"{len(files)} sweeps ready in {files[0].parent}")
