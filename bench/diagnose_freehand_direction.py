"""Which way the frame pairs moved: FiMA's own signs of tz against the IMU fit (freehand/imu_travel.py).

On sweeps of the *training* family with IMUs (the simulator, motion and appearance of freehand-v2; seeds of a
range no training, selection or frozen set uses: 280000.. and 281000.. were the decision sweeps of issue 15), the
shipped FiMA runs once with the network's direction; its per-pair motion about the frame centre is then signed
three ways: as the network gave it, by the IMU fit (`apply_imu_direction`, what `direction: imus` does), and by
the truth (the ceiling for FiMA's |tz|). `--distance-scale S` multiplies FiMA's |tz| by S first (a probe whose
speckle decorrelates faster or slower than the training band), so a fit that trusts the distances' scale shows it.
Reported per tactic: the |tz|-weighted share of the motion whose sign is right, and FDR.

    python bench/diagnose_freehand_direction.py --seed-base 281000 --sweeps-per-tactic 8 [--distance-scale 1.6]

Accuracy only (no timing); writes the section unless --no-write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from diagnose_freehand_drift import centre_params, chain_params, parse_diagnosis_args, score  # noqa: E402

TACTICS = ("linear", "curved", "loop", "sector")


def _signed(params, signs):
    out = params.copy()
    out[:, 2] = np.abs(params[:, 2]) * signs
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-base", type=int, default=281000)
    ap.add_argument("--distance-scale", type=float, default=1.0, metavar="S")
    bench, report, args = parse_diagnosis_args(ap, argv, per_tactic=8, section="freehand_direction_sources")
    from ultrasound_ai.core.geometry import params_to_matrix
    from ultrasound_ai.freehand.imu_travel import apply_imu_direction
    from ultrasound_ai.freehand.methods import get_method
    from ultrasound_ai.freehand.simulation.benchmark_set import DEFAULT_FRAME_SHAPE, DEFAULT_PIXEL_SPACING, SETS
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep

    _, motion, appearance = SETS["freehand-v2"]
    names = ("network's signs", "IMU fit (direction imus)", "true signs (ceiling)")
    agree = {k: [] for k in names}
    scores = {k: [] for k in names}
    n = args.sweeps_per_tactic * len(TACTICS)
    for i in range(n):
        tactic, seed = TACTICS[i // args.sweeps_per_tactic], args.seed_base + i
        sweep = simulate_sweep(seed, n_frames=args.frames, tactic=tactic, frame_shape=DEFAULT_FRAME_SHAPE,
                               pixel_spacing=DEFAULT_PIXEL_SPACING, n_imus=4, motion=motion, appearance=appearance)
        shape, spacing = sweep.frames.shape[1:], sweep.pixel_spacing_xy
        est = get_method("fima").estimate(sweep, device="cpu", direction="network").tforms
        p_net = centre_params(est, bench, shape, spacing)
        p_net[:, 2] *= args.distance_scale
        p_true = centre_params(sweep.tforms, bench, shape, spacing)
        true_signs = np.where(p_true[:, 2] < 0, -1.0, 1.0)
        rel = bench.about_frame_centre(params_to_matrix(p_net, "xyz", degrees=True), shape, spacing, inverse=True)
        fitted, _ = apply_imu_direction(rel, sweep)  # sweep-mm pair transforms, as FiMA's method passes them
        p_fit = bench.matrix_params(bench.about_frame_centre(fitted, shape, spacing))
        variants = {names[0]: p_net, names[1]: _signed(p_net, np.where(p_fit[:, 2] < 0, -1.0, 1.0)),
                    names[2]: _signed(p_net, true_signs)}
        w = np.abs(p_true[:, 2])
        for name, p in variants.items():
            agree[name].append((tactic, float((w * (np.sign(p[:, 2]) == true_signs)).sum() / w.sum())))
            scores[name].append((tactic, score(chain_params(p, bench, shape, spacing), sweep)["fdr"]))
        print(f"  {seed} {tactic}: " + ", ".join(f"{k} FDR {scores[k][-1][1]:.1f}%" for k in names), flush=True)

    def cell(got, t=None, stat=np.mean):
        return stat([v for tt, v in got if t in (None, tt)])

    rows = [[name, f"{100 * cell(agree[name]):.0f}"] + [f"{100 * cell(agree[name], t):.0f}" for t in TACTICS]
            + [f"{cell(scores[name]):.1f}", f"{cell(scores[name], stat=np.median):.1f}"]
            + [f"{cell(scores[name], t):.1f}" for t in TACTICS] for name in names]
    body = (
        f"{n} sweeps of the training family with 4 IMUs (simulator, motion `{motion}`, appearance `{appearance}`, as "
        f"freehand-v2: {args.frames} frames), {args.sweeps_per_tactic} per tactic, seeds {args.seed_base}–"
        f"{args.seed_base + n - 1}; the shipped `fima_small` with the network's direction, its |tz| multiplied by "
        f"{args.distance_scale:g}, then signed three ways. Right: the share of the true motion (|tz|-weighted, frame "
        "centre) whose sign is right.\n\n"
        + report.markdown_table(["signs of tz", "right (%)"] + [f"right {t}" for t in TACTICS]
                                + ["FDR mean (%)", "FDR median (%)"] + [f"FDR {t}" for t in TACTICS], rows) + "\n"
    )
    print(body)
    if not args.no_write:
        report.write_section(args.section if args.distance_scale == 1.0 else f"{args.section}_x{args.distance_scale:g}",
                             f"Which way FiMA's frame pairs moved: network vs IMU fit (issue 15; training-family "
                             f"sweeps; distances x{args.distance_scale:g})", body, device="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
