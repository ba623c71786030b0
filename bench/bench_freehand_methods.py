"""Benchmark every registered freehand pose method on the frozen set "freehand-v1".

For each method in `available_methods()` (tracked is the sanity row: all zeros; imu the sensor-only
baseline; FiMA / MoGLo-Net rows appear once they are registered) and each of the 20 held-out sweeps
(`ultrasound_ai.freehand.simulation.benchmark_set`), estimate the poses from the sweep (without its truth, by
the registry's rule) and compute the FiMA Table-1 metrics and TUS-REC GPE/LPE against the truth.
Writes the "freehand_methods" section of BENCHMARKS.md: mean (sd) over the sweeps per method and
the per-sweep table. Methods that need a checkpoint they do not find are reported as skipped.

    python bench/bench_freehand_methods.py [--methods imu tracked] [--device auto] [--frames 200]
    python bench/bench_freehand_methods.py --methods imu tracked \
        --row ReM fima runs/rem/best.pt --row ReM+F fima runs/fima/best.pt online_align=false \
        --row FiMA fima runs/fima/best.pt

``--constant-velocity N`` adds the constant-velocity guess: every frame moves by the mean frame-to-frame
motion (6 parameters, static-xyz degrees, averaged) of N training-like sweeps simulated with the set's
settings and seeds 300000.. (those of the training configs, disjoint from the set's), chained from the
identity. It needs no image: what a learned method must beat to show it reads the motion from the frames.

``--set freehand-v2`` runs the training family as it is since issue 15 (varied motion, randomised appearance;
held-out seeds 920000..), on which retrained models are compared and selected.
``--set freehand-indep-v1`` runs the independent validation family instead (section
"freehand_methods_indep"); every section has a per-tactic table with FDR mean and median, MD, GPE, MEA,
FDR after one fitted scale per sweep and the out-of-plane correlation (`ultrasound_ai.validation.pose_agreement`).

A ``--row LABEL METHOD CHECKPOINT [KEY=VALUE ...]`` (CHECKPOINT ``-`` for none) adds a row for a method with given weights and
method parameters (values parsed as JSON when they parse: ``online_align=false``, ``imus=[0,2]``), so that
ablations trained side by side land in one table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ultrasound_ai.core.geometry import chain_relative  # noqa: E402
from ultrasound_ai.freehand.methods import available_methods, get_method  # noqa: E402
from ultrasound_ai.freehand.metrics import evaluate_sweep  # noqa: E402
from ultrasound_ai.freehand.simulation import benchmark_set  # noqa: E402
from ultrasound_ai.io.sweep import read_sweep  # noqa: E402

COLUMNS = (("fdr_pct", "FDR (%)", 2), ("adr_pct", "ADR (%)", 2), ("md_mm", "MD (mm)", 2), ("sd_mm", "SD (mm)", 1),
           ("hd_mm", "HD (mm)", 2), ("mea_deg", "MEA (°)", 3), ("gpe_mm", "GPE (mm)", 2), ("lpe_mm", "LPE (mm)", 3))


# The constant-velocity row's label and the seed of its first simulated sweep (the training configs' range).
CONST_ROW = "constant velocity"
INDEP_SET = "freehand-indep-v1"
TACTIC_ORDER = ("linear", "curved", "sector", "loop")
CONST_SEED = 300_000


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=None, help="methods to run (default: every registered one)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frames", type=int, default=benchmark_set.DEFAULT_FRAMES)
    ap.add_argument("--set", default="freehand-v1", choices=(*benchmark_set.SETS, INDEP_SET),
                    help="the frozen set: the training simulator's held-out sweeps (v1: smooth motion, nominal "
                         "appearance; v2: varied, randomised), or the independent family")
    ap.add_argument("--cache", default=None, help="benchmark set folder (default: bench/data/<set>)")
    ap.add_argument("--row", nargs="+", action="append", default=[], metavar="LABEL METHOD CHECKPOINT [K=V]",
                    help="a learned method with these weights (and method parameters) as its own row")
    ap.add_argument("--constant-velocity", type=int, default=0, metavar="N",
                    help="add the constant-velocity guess from N simulated training-like sweeps (0: none)")
    ap.add_argument("--cv-motion", default="varied", choices=("smooth", "varied", "constant"),
                    help="data.motion of the training family the constant velocity is taken from")
    ap.add_argument("--paired", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="report row A against row B sweep by sweep (FDR difference, wins, sign test)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    ap.add_argument("--sweeps", type=int, nargs="+", default=None, metavar="I",
                    help="only these sweeps of the set (indices), e.g. one per tactic for a costly row")
    ap.add_argument("--section", default=None, help="BENCHMARKS.md section key (default: by set)")
    ap.add_argument("--title", default=None, help="section title (default: by set)")
    ap.add_argument("--accuracy-only", action="store_true",
                    help="no timing columns: the load is recorded, not awaited (accuracy runs on a busy machine)")
    accuracy_only = "--accuracy-only" in (sys.argv[1:] if argv is None else argv)
    args = _report_module().parse_bench_args(ap, argv, timing=not accuracy_only)
    rows = _parse_rows(args.row)

    t0 = time.perf_counter()
    show = lambda done, total, msg: print(f"  [{done}/{total}] {msg}", flush=True)  # noqa: E731
    if args.set == INDEP_SET:
        from ultrasound_ai.validation.freehand_indep_set import ensure_indep_set

        paths, manifest = ensure_indep_set(args.cache, progress=show)
    else:
        paths, manifest = benchmark_set.ensure_benchmark_set(args.cache, n_frames=args.frames, progress=show,
                                                             name=args.set)
    print(f"benchmark set ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.sweeps:
        if not all(0 <= i < len(paths) for i in args.sweeps):
            raise SystemExit(f"--sweeps: indices must be in 0..{len(paths) - 1}, got {args.sweeps}")
        paths = [paths[i] for i in args.sweeps]
        manifest = dict(manifest, sweeps=[manifest["sweeps"][i] for i in args.sweeps])
    methods = args.methods or available_methods()
    # Sanity row last, the methods of interest first.
    methods = [m for m in methods if m != "tracked"] + (["tracked"] if "tracked" in methods else [])
    # Every row: label -> (method, keyword arguments of estimate); the --row rows first.
    runs = {m: (m, {}) for m in methods}
    runs.update({label: (method, kw) for label, method, kw in rows})
    labels = [label for label, _, _ in rows]
    methods = labels + [m for m in methods if m not in labels]

    const_rel = None
    if args.constant_velocity > 0:
        const_rel = constant_velocity_motion(args.constant_velocity, args.frames, args.cv_motion)
        methods = methods + [CONST_ROW]
    per_sweep = {m: [] for m in methods}
    timing = {m: 0.0 for m in methods}
    skipped = {}
    for path, entry in zip(paths, manifest["sweeps"]):
        sweep = read_sweep(path)
        for m in methods:
            if m in skipped:
                continue
            try:
                t = time.perf_counter()
                if m == CONST_ROW:
                    est_tforms = chain_relative(np.broadcast_to(
                        about_frame_centre(const_rel, sweep.frames.shape[1:], sweep.pixel_spacing_xy, inverse=True),
                        (sweep.n_frames - 1, 4, 4)))
                else:
                    est_tforms = get_method(runs[m][0]).estimate(sweep, device=args.device, **runs[m][1]).tforms
                timing[m] += time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001 - e.g. a learned method without its checkpoint
                skipped[m] = f"{type(exc).__name__}: {exc}"
                continue
            metrics = evaluate_sweep(est_tforms, sweep.tforms, sweep.frames.shape[1:], sweep.pixel_spacing_xy)
            metrics.update(agreement(est_tforms, sweep))
            metrics["n_frames"] = sweep.n_frames
            per_sweep[m].append((entry, metrics))
        print(f"  {path.name}: " + ", ".join(
            f"{m} FDR {per_sweep[m][-1][1]['fdr_pct']:.1f}%" for m in methods if m not in skipped), flush=True)

    report = _report_module()
    header = ["method"] + [h for _, h, _ in COLUMNS] + ([] if args.accuracy_only else ["s/sweep", "ms/frame"])
    summary_rows = []
    for m in methods:
        if m in skipped or not per_sweep[m]:
            continue
        vals = {k: np.array([r[1][k] for r in per_sweep[m]]) for k, _, _ in COLUMNS}
        summary_rows.append([f"`{m}`"] + [f"{vals[k].mean():.{d}f} ({vals[k].std(ddof=1):.{d}f})" for k, _, d in COLUMNS]
                            + ([] if args.accuracy_only else [
                                f"{timing[m] / len(per_sweep[m]):.3f}",
                                f"{1e3 * timing[m] / sum(r[1]['n_frames'] for r in per_sweep[m]):.2f}"]))
    sweep_header = ["sweep", "tactic", "seed", "reversed"] + [f"{m} {h}" for m in methods if m not in skipped
                                                               for _, h, _ in COLUMNS[:1] + COLUMNS[2:3] + COLUMNS[5:6]]
    sweep_rows = []
    for i, entry in enumerate(manifest["sweeps"]):
        row = [str(i), entry["tactic"], str(entry["seed"]), "yes" if entry.get("reversed") else "no"]
        for m in methods:
            if m in skipped:
                continue
            met = per_sweep[m][i][1]
            row += [f"{met['fdr_pct']:.1f}", f"{met['md_mm']:.2f}", f"{met['mea_deg']:.3f}"]
        sweep_rows.append(row)
    if args.set == INDEP_SET:
        described = (
            f"Frozen set `{manifest['name']}`: 20 sweeps of the independent validation generator "
            f"`{manifest['generator_version']}` (`ultrasound_ai/validation/freehand_indep.py`: its own speckle "
            "formation, anatomy, motion with speed changes, pauses and reversals, IMU model; it imports nothing from "
            "the training simulator; never used for training or model selection), 5 per tactic, seeds "
            f"{manifest['sweeps'][0]['seed']}–{manifest['sweeps'][-1]['seed']}; 160–240 frames at 20 Hz, 4 IMUs, "
            "frames 20–28 × 20–26 mm at 0.13–0.18 mm, drawn per sweep.")
    else:
        settings = {k: manifest[k] for k in ("simulator_version", "n_frames", "frame_shape_hw", "pixel_spacing_mm",
                                             "n_imus", "frame_rate_hz", "motion", "appearance") if k in manifest}
        described = (f"Frozen set `{manifest['name']}`: 20 simulated sweeps, 5 per tactic (linear, curved, loop, "
                     f"sector), seeds {manifest['sweeps'][0]['seed']}–{manifest['sweeps'][-1]['seed']}; settings "
                     f"{json.dumps(settings)}.")
    body = (
        described + " Every method sees the sweep without its tforms (registry rule); metrics against the truth, FiMA Table-1 "
        "columns (centre and two top corners, averaged) and TUS-REC GPE/LPE. " f"Mean (sd) over the {len(manifest['sweeps'])} sweeps"
        + (f" {args.sweeps} of the set" if args.sweeps else "") + ".\n\n"
        + report.markdown_table(header, summary_rows)
        + "\n\nPer tactic (FDR mean and median; scaled FDR: FDR after one least-squares scale of the per-pair "
        "frame-centre translations per sweep, fitted to the truth - an oracle that forgives a wrong scale, e.g. an "
        "unseen probe's beam width; r: per-sweep Pearson correlation between predicted and true |out-of-plane "
        "translation| of the frame centre per frame pair, averaged over sweeps; a constant prediction counts 0):\n\n"
        + report.markdown_table(*tactic_table(methods, skipped, per_sweep))
        + "\n\n`tracked` is the sanity row (the true poses: all zero). `imu` is dead reckoning under the stated "
        "assumption that the probe is at rest at the first and last frame (v0 = 0, bias from ∫a dt = 0); the "
        "simulated sweeps are already moving at their first frame, so its translation drifts by the unknown initial "
        "velocity × duration while its rotation (MEA) stays within a fraction of a degree.\n"
        + "".join(f"\n`{label}`: method `{method}`, " + ", ".join(f"{k} `{v}`" for k, v in kw.items()) + "\n"
                  for label, method, kw in rows)
        + (f"\n`{CONST_ROW}`: every frame moves by the mean frame-to-frame motion (about the frame centre) of "
           f"{args.constant_velocity} sweeps of the *training* simulator (motion `{args.cv_motion}`, {args.frames} "
           f"frames, seeds {CONST_SEED}–"
           f"{CONST_SEED + args.constant_velocity - 1}, tactics in turn), chained from the identity: "
           f"{np.round(matrix_params(const_rel), 4).tolist()} (mm, static-xyz °).\n" if const_rel is not None else "")
        + ("".join(f"\nSkipped `{m}`: {why}\n" for m, why in skipped.items()))
        + "".join("\n" + paired_line(a, b, per_sweep) + "\n" for a, b in args.paired)
        + "\nPer sweep (FDR %, MD mm, MEA °):\n\n" + report.markdown_table(sweep_header, sweep_rows)
    )
    print(body)
    if not args.no_write:
        device = str(args.device)
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        key = args.section or {INDEP_SET: "freehand_methods_indep", "freehand-v2": "freehand_methods_v2"}.get(
            args.set, "freehand_methods")
        report.write_section(key, args.title or f"Freehand pose methods on the frozen set {args.set}", body,
                             device=device)
        print(f"wrote the {key} section of {report.BENCHMARKS}")
    return 0


def paired_line(a: str, b: str, per_sweep: dict) -> str:
    """Row a against row b on the same sweeps: mean (sd) FDR difference, wins and a two-sided sign test."""
    from math import comb

    for m in (a, b):
        if not per_sweep.get(m):
            return f"Paired `{a}` vs `{b}`: no results for `{m}`."
    d = np.array([x[1]["fdr_pct"] - y[1]["fdr_pct"] for x, y in zip(per_sweep[a], per_sweep[b])])
    wins, n = int((d < 0).sum()), int((d != 0).sum())
    k = min(wins, n - wins)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return (f"Paired `{a}` vs `{b}` over {len(d)} sweeps: FDR difference {d.mean():+.2f} ({d.std(ddof=1):.2f}) "
            f"percentage points (negative: `{a}` better); `{a}` lower on {wins} of {n} sweeps (sign test p = {p:.3f}).")


def about_frame_centre(rel, frame_shape_hw, pixel_spacing_xy, inverse: bool = False) -> np.ndarray:
    """A frame-pair motion [.., 4, 4] re-expressed with its origin at the frame centre (inverse: back)."""
    from ultrasound_ai.validation.pose_agreement import frame_centre_mm

    shift = np.eye(4)
    shift[:3, 3] = frame_centre_mm(frame_shape_hw, pixel_spacing_xy)
    return shift @ rel @ np.linalg.inv(shift) if inverse else np.linalg.inv(shift) @ rel @ shift


def matrix_params(rel) -> np.ndarray:
    from ultrasound_ai.core.geometry import matrix_to_params

    return matrix_to_params(rel, "xyz", degrees=True)


def constant_velocity_motion(n_sweeps: int, n_frames: int, motion: str = "varied") -> np.ndarray:
    """The mean frame-to-frame motion [4, 4] about the frame centre of n training-simulator trajectories.

    Only the motion matters, so only the trajectories are generated (the simulator draws them from their
    own seed stream, so they are those of `simulate_sweep(seed, ...)`), for the simulator's default
    248 x 260 frames at 0.15 mm; `motion` is the training family's data.motion.
    """
    from ultrasound_ai.core.geometry import params_to_matrix, to_relative
    from ultrasound_ai.freehand.simulation.simulator import DEFAULT_FRAME_SHAPE, DEFAULT_PIXEL_SPACING
    from ultrasound_ai.freehand.simulation.trajectories import TACTICS, generate_trajectory

    shape, spacing = DEFAULT_FRAME_SHAPE, (DEFAULT_PIXEL_SPACING, DEFAULT_PIXEL_SPACING)
    face = ((shape[1] - 1) * spacing[0] / 2.0, 0.0, 0.0)
    params = []
    for k in range(n_sweeps):
        traj = generate_trajectory(np.random.default_rng(np.random.SeedSequence([CONST_SEED + k, 0x7247])),
                                   n_frames=int(n_frames), tactic=TACTICS[k % len(TACTICS)],
                                   face_center_image_mm=face, motion=motion)
        params.append(matrix_params(about_frame_centre(to_relative(traj.poses), shape, spacing)))
    mean = np.concatenate(params).mean(0)
    print(f"  constant velocity per frame (about the frame centre): {np.round(mean, 4).tolist()}", flush=True)
    return params_to_matrix(mean, "xyz", degrees=True)


def agreement(est_tforms, sweep) -> dict:
    """Scaled FDR (one fitted scale per sweep), the scale, and the out-of-plane correlation."""
    from ultrasound_ai.freehand.metrics import fdr
    from ultrasound_ai.validation.pose_agreement import out_of_plane_correlation, rescale_translations

    shape, spacing = sweep.frames.shape[1:], sweep.pixel_spacing_xy
    k, scaled = rescale_translations(est_tforms, sweep.tforms, shape, spacing)
    r = out_of_plane_correlation(est_tforms, sweep.tforms, shape, spacing)
    return {"fdr_scaled_pct": fdr(scaled, sweep.tforms, shape, spacing), "scale": k,
            "oop_r": float("nan") if r is None else r}


def tactic_table(methods, skipped, per_sweep):
    """(header, rows): per method and tactic (and all), FDR mean/median, MD, GPE, MEA, scaled FDR, scale, r."""
    header = ["method", "tactic", "FDR mean (%)", "FDR median (%)", "MD (mm)", "GPE (mm)", "MEA (°)",
              "scaled FDR (%)", "scale k (median)", "r"]
    rows = []
    for m in methods:
        if m in skipped or not per_sweep[m]:
            continue
        seen = {e["tactic"] for e, _ in per_sweep[m]}
        for tactic in [t for t in TACTIC_ORDER if t in seen] + sorted(seen - set(TACTIC_ORDER)) + ["all"]:
            got = [x for e, x in per_sweep[m] if tactic in ("all", e["tactic"])]
            v = {k: np.array([x[k] for x in got], dtype=np.float64) for k in got[0] if k != "n_frames"}
            r = v["oop_r"][np.isfinite(v["oop_r"])]
            rows.append([f"`{m}`", tactic, f"{v['fdr_pct'].mean():.1f}", f"{np.median(v['fdr_pct']):.1f}",
                         f"{v['md_mm'].mean():.2f}", f"{v['gpe_mm'].mean():.2f}", f"{v['mea_deg'].mean():.2f}",
                         f"{v['fdr_scaled_pct'].mean():.1f}", f"{np.median(v['scale']):.2f}",
                         f"{r.mean():.2f}" if r.size else "n/a"])
    return header, rows


def _parse_rows(specs) -> list:
    """``--row`` arguments -> [(label, method, {checkpoint, params...})]; a clear error for a bad one."""
    rows = []
    for spec in specs:
        if len(spec) < 3:
            raise SystemExit(f"--row {' '.join(spec)}: expected LABEL METHOD CHECKPOINT [KEY=VALUE ...]")
        label, method, checkpoint, *pairs = spec
        if checkpoint != "-" and not Path(checkpoint).is_file():
            raise SystemExit(f"--row {label}: checkpoint {checkpoint} does not exist")
        kw = {"checkpoint": checkpoint} if checkpoint != "-" else {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise SystemExit(f"--row {label}: expected KEY=VALUE, got {pair!r}")
            try:
                kw[key] = json.loads(value)
            except json.JSONDecodeError:
                kw[key] = value
        rows.append((label, method, kw))
    return rows


if __name__ == "__main__":
    sys.exit(main())
