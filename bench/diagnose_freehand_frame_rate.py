"""Freehand models on sweeps faster than their training rate: every pair vs pairs at the trained interval.

The shipped FiMA and MoGLo-Net were trained on 20 Hz sweeps (pair strides 1-2 frames). On sweeps of the
*training* family (the simulator, motion and appearance of freehand-v2, 4 IMUs; seeds of a range no training,
selection or frozen set uses) made at other frame rates with the same 10 s of motion, each model runs pair by
pair (`frame_stride=1`, as the papers) and with its default `frame_stride="auto"` (every k-th frame, the frames
between interpolated: `ultrasound_ai.freehand.pair_interval`). Reported per rate: FDR, FDR after one fitted
scale per sweep, the per-pair out-of-plane correlation r and MEA, and on how many sweeps "auto" had the lower FDR.

    python bench/diagnose_freehand_frame_rate.py [--rates 20 25 30 40 60] [--sweeps-per-tactic 4]
    python bench/diagnose_freehand_frame_rate.py --methods decorrelation --section freehand_frame_rate_decorrelation

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

from diagnose_freehand_drift import parse_diagnosis_args, score  # noqa: E402

TACTICS = ("linear", "curved", "loop", "sector")
METHODS = ("fima", "moglo")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[20.0, 25.0, 30.0, 40.0, 60.0], metavar="HZ")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--seed-base", type=int, default=284000)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=("fima", "moglo", "decorrelation"))
    _, report, args = parse_diagnosis_args(ap, argv, per_tactic=4, section="freehand_frame_rate")
    from ultrasound_ai.freehand.methods import get_method
    from ultrasound_ai.freehand.simulation.benchmark_set import DEFAULT_FRAME_SHAPE, DEFAULT_PIXEL_SPACING, SETS
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep

    _, motion, appearance = SETS["freehand-v2"]
    n = args.sweeps_per_tactic * len(TACTICS)
    rows = []
    for fps in args.rates:
        got = {(m, mode): [] for m in args.methods for mode in ("every pair", "auto")}
        strides = set()
        for i in range(n):
            tactic, seed = TACTICS[i // args.sweeps_per_tactic], args.seed_base + i
            sweep = simulate_sweep(seed, n_frames=int(round(args.seconds * fps)), tactic=tactic,
                                   frame_shape=DEFAULT_FRAME_SHAPE, pixel_spacing=DEFAULT_PIXEL_SPACING, n_imus=4,
                                   motion=motion, appearance=appearance, frame_rate_hz=fps)
            line = []
            for m in args.methods:
                for mode, kw in (("every pair", {"frame_stride": 1}), ("auto", {})):
                    est = get_method(m).estimate(sweep, device="cpu", **kw)
                    if mode == "auto":
                        strides.add(int(est.attrs["frame_stride"]))
                    got[(m, mode)].append(score(est.tforms, sweep))
                    line.append(f"{m} {mode} FDR {got[(m, mode)][-1]['fdr']:.1f}%")
            print(f"  {fps:g} Hz {seed} {tactic}: " + ", ".join(line), flush=True)
        for m in args.methods:
            native, auto = got[(m, "every pair")], got[(m, "auto")]
            better = sum(a["fdr"] < b["fdr"] - 1e-9 for a, b in zip(auto, native))
            same = sum(abs(a["fdr"] - b["fdr"]) <= 1e-9 for a, b in zip(auto, native))

            def cell(res, key, stat=np.nanmean):
                return stat([s[key] for s in res])

            rows.append([f"{fps:g}", "/".join(str(k) for k in sorted(strides)), m]
                        + [f"{cell(native, k, st):.{d}f} / {cell(auto, k, st):.{d}f}"
                           for k, st, d in (("fdr", np.mean, 1), ("fdr", np.median, 1), ("scaled", np.mean, 1),
                                            ("r", np.nanmean, 2), ("mea", np.mean, 2))]
                        + [f"{better} of {n - same}" if same < n else "same"])
    body = (
        f"{n} sweeps of the training family per rate (simulator, motion `{motion}`, appearance `{appearance}`, as "
        f"freehand-v2: 96 × 104 px at 0.15 mm, 4 IMUs), {args.sweeps_per_tactic} per tactic, seeds "
        f"{args.seed_base}–{args.seed_base + n - 1}, each made at every rate with the same {args.seconds:g} s of "
        f"motion. Methods {', '.join(f'`{m}`' for m in args.methods)} (the shipped `fima_small` and `moglo_small` "
        "were trained at 20 Hz, pair strides 1-2; decorrelation's default curve was calibrated on 20 Hz pairs) with "
        "`frame_stride=1` (every consecutive pair, as the papers) / their default `auto` (the stride whose "
        "interval is nearest 50 ms; frames between keyframes interpolated). Cells: every pair / auto; "
        "scaled FDR: one least-squares scale of the per-pair centre translations per sweep; r: per-pair "
        "out-of-plane correlation (as in the freehand tables).\n\n"
        + report.markdown_table(["rate (Hz)", "auto stride", "method", "FDR mean (%)", "FDR median (%)",
                                 "scaled FDR (%)", "r", "MEA (°)", "auto lower FDR on"], rows) + "\n"
    )
    print(body)
    if not args.no_write:
        report.write_section(args.section, "Freehand models on sweeps faster than their training rate (issue 15; "
                             "training-family sweeps)", body, device="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
