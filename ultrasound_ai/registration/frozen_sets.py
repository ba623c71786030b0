"""Frozen registration evaluation sets: a name -> generator, version, case seeds and initial SREs.

The repository stores only these definitions; the cases are regenerated deterministically on demand
(``materialise``) under a git-ignored folder (``bench/data/`` by default). Each case folder gets the
initial transforms of the set (``initial_<L>mm.tfm``: fixed -> moving with SRE exactly L mm against the
truth), and the set folder a ``set.json`` manifest with the generator version and a fingerprint of the
truths, checked when the folder is reused.

- ``registration-indep-v1``: the independent validation family (``indep_phantom``): never used to train
  or select a model.
- ``registration-randomised-v1``: unseen seeds of the randomised training phantom (``phantom``,
  ``PhantomConfig.randomised()``): the training family's held-out test set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ultrasound_ai.core.errors import InputError

FROZEN_SETS = {
    "registration-indep-v1": {
        "generator": "ultrasound_ai.registration.indep_phantom",
        "version": "1.0",
        "seeds": list(range(7_100_000, 7_100_024)),
        "initial_sre_mm": [0.0, 8.0, 16.0],
        "perturbation_seed": 16_016,
        "truth_fingerprint": "417c750fb300a4a8",  # of the 24 ground-truth transforms, as first generated
        "use": "validation only (never trained or selected on)",
    },
    "registration-randomised-v1": {
        "generator": "ultrasound_ai.registration.phantom:randomised",
        "version": "2.0",
        "seeds": list(range(980_000, 980_024)),
        "initial_sre_mm": [0.0, 8.0, 16.0],
        "perturbation_seed": 16_017,
        "use": "test set of the training family (seeds outside training 0.. and validation 500000..)",
    },
}
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "bench" / "data"


def _spec(name: str) -> dict:
    if name not in FROZEN_SETS:
        raise InputError(f"frozen set {name!r}: expected one of {sorted(FROZEN_SETS)}")
    return FROZEN_SETS[name]


def simulate(name: str, seed: int):
    """The case of `seed` in frozen set `name` (a Case), from the set's generator."""
    spec = _spec(name)
    if spec["generator"] == "ultrasound_ai.registration.indep_phantom":
        from ultrasound_ai.registration.indep_phantom import INDEP_SIM_VERSION, simulate_indep_case

        if INDEP_SIM_VERSION != spec["version"]:
            raise InputError(f"frozen set {name}: needs indep_phantom version {spec['version']}, the code is "
                             f"{INDEP_SIM_VERSION}; a changed generator makes a new set name")
        return simulate_indep_case(seed)
    from ultrasound_ai.registration.phantom import REGISTRATION_SIM_VERSION, PhantomConfig, simulate_case

    if REGISTRATION_SIM_VERSION != spec["version"]:
        raise InputError(f"frozen set {name}: needs phantom version {spec['version']}, the code is "
                         f"{REGISTRATION_SIM_VERSION}")
    return simulate_case(seed, PhantomConfig.randomised())


def initial_with_sre(T_true, surface, level_mm: float, rng: np.random.Generator) -> np.ndarray:
    """T_true @ D with D a rigid motion about the surface centroid whose SRE is exactly level_mm: the
    translation direction uniform on the sphere, a rotation about a uniform axis with 0.2-1.2 degrees per
    mm of translation, both scaled together (bisection) to the level."""
    from ultrasound_ai.registration.metrics import sre

    T_true = np.asarray(T_true, dtype=np.float64)
    pts = np.asarray(surface, dtype=np.float64)
    c = pts.mean(axis=0)
    t_dir = rng.normal(size=3)
    t_dir /= np.linalg.norm(t_dir)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    deg_per_mm = rng.uniform(0.2, 1.2)
    if level_mm <= 0:
        return T_true.copy()

    def motion(s):
        a = np.radians(deg_per_mm * s)
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        R = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
        D = np.eye(4)
        D[:3, :3] = R
        D[:3, 3] = c - R @ c + s * t_dir
        return T_true @ D

    lo, hi = 0.0, level_mm
    while sre(motion(hi), T_true, pts) < level_mm:
        hi *= 2
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sre(motion(mid), T_true, pts) < level_mm else (lo, mid)
    return motion(0.5 * (lo + hi))


def _fingerprint(truths) -> str:
    h = hashlib.sha256()
    for T in truths:
        h.update(np.round(np.asarray(T, dtype=np.float64), 6).tobytes())
    return h.hexdigest()[:16]


def initial_name(level_mm: float) -> str:
    return f"initial_{int(round(level_mm)):02d}mm.tfm"


def materialise(name: str, root=None, progress=print) -> list[Path]:
    """The case folders of frozen set `name` under root/name (generated when missing, reused otherwise)."""
    from ultrasound_ai.registration.case import read_case, write_case, write_transform_tfm

    spec = _spec(name)
    base = Path(root or DEFAULT_ROOT) / name
    manifest = base / "set.json"
    dirs = [base / f"case_{s}" for s in spec["seeds"]]
    if manifest.exists() and all((d / initial_name(spec["initial_sre_mm"][-1])).exists() for d in dirs):
        doc = json.loads(manifest.read_text())
        if doc.get("version") != spec["version"] or doc.get("seeds") != spec["seeds"]:
            raise InputError(f"{base}: made by another version of {name}; delete it to regenerate")
        return dirs
    truths = []
    for n, (seed, d) in enumerate(zip(spec["seeds"], dirs)):
        if (d / initial_name(spec["initial_sre_mm"][-1])).exists():
            truths.append(read_case(d).truth_fixed_to_moving)
            continue
        case = simulate(name, seed)
        case.name = d.name
        write_case(case, d)
        rng = np.random.default_rng([spec["perturbation_seed"], seed])
        for level in spec["initial_sre_mm"]:
            write_transform_tfm(initial_with_sre(case.truth_fixed_to_moving, case.surface_fixed, level, rng),
                                d / initial_name(level))
        truths.append(case.truth_fixed_to_moving)
        if progress:
            progress(f"{name}: case {n + 1}/{len(dirs)} (seed {seed}) written")
    fingerprint = _fingerprint(truths)
    if spec.get("truth_fingerprint") and fingerprint != spec["truth_fingerprint"]:
        raise InputError(f"{base}: the regenerated truths (fingerprint {fingerprint}) differ from the frozen set's "
                         f"({spec['truth_fingerprint']}); this numpy/scipy does not reproduce {name}")
    base.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"name": name, **spec, "truth_fingerprint": fingerprint}, indent=1))
    return dirs


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Regenerate a frozen registration set under a folder.")
    ap.add_argument("name", choices=sorted(FROZEN_SETS))
    ap.add_argument("--root", default=None, help=f"parent folder (default {DEFAULT_ROOT})")
    args = ap.parse_args(argv)
    dirs = materialise(args.name, args.root)
    print(f"{args.name}: {len(dirs)} case folders under {Path(args.root or DEFAULT_ROOT) / args.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
