"""Where a freehand model's drift comes from: its per-pair motion with one group of parameters swapped.

On sweeps of the *training* family (the simulator, motion and appearance of freehand-v2, but seeds of a
diagnosis range 230000.. that no training, selection or frozen set uses), a model's per-pair motion about the
frame centre (tx, ty, tz mm, static-xyz degrees) is taken apart and recombined with the constant-velocity
guess (the training family's mean motion, as in `bench_freehand_methods`) or with the truth, one group of
parameters at a time, and each combination is chained and scored with FDR, FDR after one fitted scale per
sweep (`pose_agreement.rescale_translations`) and MEA. If the model's out-of-plane component with every other
parameter taken from constant velocity has a lower scaled FDR than constant velocity, the model reads the
out-of-plane speed usefully and the drift comes from the other parameters; and so on for each swap.

    python bench/diagnose_freehand_drift.py --row v7 runs/moglo_small_v7/best.pt --row shipped - \
        --row "v7 forward" runs/moglo_small_v7/best.pt direction=forward \
        [--sweeps-per-tactic 3] [--section freehand_drift_sources]

A row is LABEL CHECKPOINT [KEY=VALUE ...]: a moglo checkpoint ('-' for the shipped model) and method parameters.

Accuracy only (no timing); writes the section unless --no-write.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ultrasound_ai.core.geometry import chain_relative, params_to_matrix, to_relative  # noqa: E402
from ultrasound_ai.freehand.metrics import fdr, mea  # noqa: E402
from ultrasound_ai.validation.pose_agreement import out_of_plane_correlation, rescale_translations  # noqa: E402

SEED_BASE = 230_000
TRANSLATION, ROTATION, OUT_OF_PLANE, IN_PLANE = (0, 1, 2), (3, 4, 5), (2,), (0, 1)

# label -> (parameters from the model, parameters from the truth, direction of tz); the rest from constant
# velocity. Direction "truth": the model's |tz| with the true sign per pair (is the magnitude or the direction
# wrong?); "forward": |tz| with the sign of the training family's mean motion (+z), as a reader of the speed
# that cannot tell the direction (speckle decorrelation) has to assume; "true mean": tz is the true tz's mean over
# the sweep (a constant speed that ends where the truth does).
COMBINATIONS = (
    ("model (all six)", (0, 1, 2, 3, 4, 5), (), None),
    ("constant velocity (all six)", (), (), None),
    ("model tz, the rest constant velocity", OUT_OF_PLANE, (), None),
    ("model tx ty tz, rotations constant velocity", TRANSLATION, (), None),
    ("model rotations, translations constant velocity", ROTATION, (), None),
    ("model tz and rotations, tx ty constant velocity", OUT_OF_PLANE + ROTATION, (), None),
    # Does exact in-plane motion help? The one fitted scale is shared by tx, ty and tz, so with tz off it also
    # rescales a correct in-plane motion.
    ("model tz and rotations, true tx ty", OUT_OF_PLANE + ROTATION, IN_PLANE, None),
    ("model translations, true rotations", TRANSLATION, ROTATION, None),
    ("model tz, true rotations, tx ty constant velocity", OUT_OF_PLANE, ROTATION, None),
    ("model abs(tz) with the true direction, the rest constant velocity", OUT_OF_PLANE, (), "truth"),
    ("true tz, the rest constant velocity", (), OUT_OF_PLANE, None),
    ("model with abs(tz) forward", (0, 1, 2, 3, 4, 5), (), "forward"),
    ("model abs(tz) forward, the rest constant velocity", OUT_OF_PLANE, (), "forward"),
    ("true abs(tz) forward, the rest constant velocity", (), OUT_OF_PLANE, "forward"),
    ("true tz and rotations, tx ty constant velocity", (), OUT_OF_PLANE + ROTATION, None),
    # Ceilings given the model's rotations: what its tz would need (the true speed with or without the sign).
    ("model rotations, true tz, tx ty constant velocity", ROTATION, OUT_OF_PLANE, None),
    ("model rotations, true abs(tz) forward, tx ty constant velocity", ROTATION, OUT_OF_PLANE, "forward"),
    ("model rotations and abs(tz) with the true direction, tx ty constant velocity", OUT_OF_PLANE + ROTATION, (),
     "truth"),
    # How good must tz be: the model's other five parameters with the true tz (signed, or its sweep mean).
    ("model tx ty and rotations, true tz", IN_PLANE + ROTATION, OUT_OF_PLANE, None),
    ("model tx ty and rotations, true tz's sweep mean", IN_PLANE + ROTATION, (), "true mean"),
)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_freehand_methods", HERE / "bench_freehand_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def diagnosis_sweeps(per_tactic: int, n_frames: int):
    """Training-family sweeps (freehand-v2's settings), seeds SEED_BASE + i, tactics in blocks."""
    from ultrasound_ai.freehand.simulation.benchmark_set import DEFAULT_FRAME_SHAPE, DEFAULT_PIXEL_SPACING, SETS
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
    from ultrasound_ai.freehand.simulation.trajectories import TACTICS

    _, motion, appearance = SETS["freehand-v2"]
    out = []
    for i in range(per_tactic * len(TACTICS)):
        tactic = TACTICS[i // per_tactic]
        sweep = simulate_sweep(SEED_BASE + i, n_frames=n_frames, tactic=tactic, frame_shape=DEFAULT_FRAME_SHAPE,
                               pixel_spacing=DEFAULT_PIXEL_SPACING, n_imus=0, motion=motion, appearance=appearance)
        out.append((tactic, SEED_BASE + i, sweep))
        print(f"  simulated {tactic} {SEED_BASE + i}", flush=True)
    return out


def centre_params(tforms, bench, shape, spacing) -> np.ndarray:
    """Per-pair motion [N-1, 6] about the frame centre (mm, static-xyz degrees)."""
    return bench.matrix_params(bench.about_frame_centre(to_relative(np.asarray(tforms)), shape, spacing))


def chain_params(params, bench, shape, spacing) -> np.ndarray:
    rel = bench.about_frame_centre(params_to_matrix(params, "xyz", degrees=True), shape, spacing, inverse=True)
    return chain_relative(rel)


def score(est, sweep) -> dict:
    shape, spacing = sweep.frames.shape[1:], sweep.pixel_spacing_xy
    _, scaled = rescale_translations(est, sweep.tforms, shape, spacing)
    r = out_of_plane_correlation(est, sweep.tforms, shape, spacing)
    return {"fdr": fdr(est, sweep.tforms, shape, spacing), "scaled": fdr(scaled, sweep.tforms, shape, spacing),
            "mea": mea(est, sweep.tforms), "r": np.nan if r is None else r}


def parse_diagnosis_args(ap, argv, per_tactic: int, section: str):
    """(bench module, report module, args) with the options every training-family diagnosis takes."""
    ap.add_argument("--sweeps-per-tactic", type=int, default=per_tactic)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--section", default=section)
    ap.add_argument("--no-write", action="store_true")
    bench = _bench()
    report = bench._report_module()
    return bench, report, report.parse_bench_args(ap, argv, timing=False)  # accuracy only: the load is recorded


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", nargs="+", action="append", required=True, metavar="LABEL CHECKPOINT [K=V]",
                    help="a moglo checkpoint ('-' for the shipped model) and method parameters")
    ap.add_argument("--constant-velocity", type=int, default=12, metavar="N")
    bench, report, args = parse_diagnosis_args(ap, argv, per_tactic=3, section="freehand_drift_sources")
    from ultrasound_ai.freehand.methods import get_method

    const = bench.matrix_params(bench.constant_velocity_motion(args.constant_velocity, args.frames, "varied"))
    sweeps = diagnosis_sweeps(args.sweeps_per_tactic, args.frames)
    rows, per_dof = [], []
    specs = bench._parse_rows([[spec[0], "moglo", *spec[1:]] for spec in args.row])
    for label, _, kw in specs:
        results = {name: [] for name, *_ in COMBINATIONS}
        err_model, err_const, back_model, back_true, agree, agree_up_to, majority = [], [], [], [], [], [], []
        for tactic, seed, sweep in sweeps:
            shape, spacing = sweep.frames.shape[1:], sweep.pixel_spacing_xy
            est = get_method("moglo").estimate(sweep, device="cpu", **kw).tforms
            p_model = centre_params(est, bench, shape, spacing)
            p_true = centre_params(sweep.tforms, bench, shape, spacing)
            err_model.append(np.abs(p_model - p_true))
            err_const.append(np.abs(const[None] - p_true))
            back_model.append(p_model[:, 2] < 0)
            back_true.append(p_true[:, 2] < 0)
            moving = np.abs(p_true[:, 2]) > 0.05
            agree.append(np.sign(p_model[moving, 2]) == np.sign(p_true[moving, 2]))
            # Up to one sign per sweep (what linked clip signs can reach), and the share of the sweep's majority
            # direction (what one sign for every pair, e.g. all forward, gets up to that sign).
            right = agree[-1].mean() if moving.any() else np.nan
            agree_up_to.append(max(right, 1.0 - right))
            share = (p_true[moving, 2] > 0).mean() if moving.any() else np.nan
            majority.append(max(share, 1.0 - share))
            for name, from_model, from_truth, direction in COMBINATIONS:
                p = np.repeat(const[None], len(p_true), 0)
                p[:, list(from_model)] = p_model[:, list(from_model)]
                p[:, list(from_truth)] = p_true[:, list(from_truth)]
                if direction == "truth":
                    p[:, 2] = np.abs(p[:, 2]) * np.where(p_true[:, 2] < 0, -1.0, 1.0)
                elif direction == "true mean":
                    p[:, 2] = p_true[:, 2].mean()
                elif direction == "forward":
                    p[:, 2] = np.abs(p[:, 2]) * np.sign(const[2])
                results[name].append((tactic, score(chain_params(p, bench, shape, spacing), sweep)))
        for name, *_ in COMBINATIONS:
            got = results[name]
            cell = lambda key, t=None: np.nanmean([s[key] for tt, s in got if t in (None, tt)])  # noqa: E731
            rows.append([label, name, f"{cell('fdr'):.1f}", f"{cell('scaled'):.1f}", f"{cell('mea'):.2f}",
                         f"{cell('r'):.2f}"] + [f"{cell('scaled', t):.1f}" for t in ("linear", "curved", "sector", "loop")])
        em, ec = np.concatenate(err_model).mean(0), np.concatenate(err_const).mean(0)
        per_dof.append([label] + [f"{a:.3f} / {b:.3f}" for a, b in zip(em, ec)]
                       + [f"{100 * np.concatenate(back_model).mean():.1f} / {100 * np.concatenate(back_true).mean():.1f}",
                          f"{100 * np.concatenate(agree).mean():.1f}",
                          f"{100 * np.nanmean(agree_up_to):.1f} / {100 * np.nanmean(majority):.1f}"])
    n = len(sweeps)
    body = (
        f"{n} sweeps of the training family (simulator, motion `varied`, appearance `randomised`, as freehand-v2: "
        f"{args.frames} frames of 96 × 104 px at 0.15 mm), {args.sweeps_per_tactic} per tactic, seeds "
        f"{SEED_BASE}–{SEED_BASE + n - 1} (a diagnosis range no training, selection or frozen set uses). Each "
        "model's per-pair motion about the frame centre (tx, ty, tz mm; static-xyz °) is recombined with the "
        "constant-velocity guess (mean motion of "
        f"{args.constant_velocity} training-family sweeps: {np.round(const, 4).tolist()}) or the truth, one group of "
        "parameters at a time, chained and scored. Scaled FDR: one least-squares scale of the per-pair centre "
        "translations per sweep (as in the freehand tables). Means over the sweeps.\n\n"
        + report.markdown_table(["model", "combination", "FDR (%)", "scaled FDR (%)", "MEA (°)", "r",
                                 "scaled linear", "scaled curved", "scaled sector", "scaled loop"], rows)
        + "\n\nMean absolute per-pair error, model / constant velocity (mm, °, about the frame centre):\n\n"
        + report.markdown_table(["model", "tx", "ty", "tz", "rx", "ry", "rz",
                                 "pairs moving backwards (tz < 0), model / truth (%)",
                                 "sign of tz right where abs(true tz) > 0.05 mm (%)",
                                 "same, up to one sign per sweep / majority direction's share (%)"], per_dof)
        + "\n\nRows: " + "; ".join(f"`{label}`: " + ", ".join(([] if "checkpoint" in kw else ["the shipped `moglo_small`"])
                                                             + [f"{k} `{v}`" for k, v in kw.items()])
                                     for label, _, kw in specs) + ".\n"
    )
    print(body)
    if not args.no_write:
        report.write_section(args.section, "Where MoGLo-Net's drift comes from (issue 15; training-family sweeps)",
                             body, device="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
