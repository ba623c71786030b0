"""What MoGLo-Net's default direction costs: the frames' spectral order against reading every pair forward.

On training-simulator sweeps (freehand-v2 settings: motion "varied", appearance "randomised", no IMUs) of 248 x 260
px at 0.15 mm and 20 Hz with --frames frames each, the shipped MoGLo-Net runs with `direction=forward` (the
baseline) and with `direction=ordering` (its card's default: the same, plus `frame_ordering.travel_signs`), and
`travel_signs` alone; seconds per sweep (best and median of --repeats after a warm-up), the ordering's share of
the whole method and the ratio to the baseline measured in the same run. One torch thread by default.

    python bench/bench_frame_ordering.py [--frames 200 1000] [--repeats 3] [--threads 1]

Writes the "frame_ordering_speed" section of BENCHMARKS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SEED = 296_000  # a range no training, selection or frozen set uses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    import report  # bench/report.py: BENCHMARKS.md sections, load records, repeats
    args = report.parse_bench_args(ap, argv)
    import torch

    from ultrasound_ai.freehand.frame_ordering import travel_signs
    from ultrasound_ai.freehand.methods import get_method
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep

    torch.set_num_threads(args.threads)
    rows = []
    for n in args.frames:
        sweep = simulate_sweep(SEED + n, n_frames=n, frame_shape=(248, 260), pixel_spacing=0.15, n_imus=0,
                               motion="varied", appearance="randomised")
        moglo = get_method("moglo")
        base = report.repeat(lambda: moglo.estimate(sweep, device="cpu", direction="forward"), args.repeats)
        full = report.repeat(lambda: moglo.estimate(sweep, device="cpu", direction="ordering"), args.repeats)
        alone = report.repeat(lambda: travel_signs(sweep.frames, sweep.pixel_spacing_xy, None, 0.05), args.repeats)
        rows.append([str(n)] + report.timing_cells(base, unit="s", fmt=".2f")
                    + report.timing_cells(full, unit="s", fmt=".2f")
                    + report.timing_cells(alone, unit="s", fmt=".2f")
                    + [f"{100 * alone.best / full.best:.0f} %", f"{full.best / base.best:.2f}×"])
        print(rows[-1], flush=True)
    body = (
        f"Training-simulator sweeps of 248 × 260 px at 0.15 mm, 20 Hz (seeds {SEED} + frames), the shipped "
        f"`moglo_small` on CPU with {args.threads} torch thread(s); seconds per sweep, best and median of "
        f"{args.repeats} after a warm-up. `forward` is the baseline (every pair towards +z), `ordering` the card's "
        "default (forward plus the frames' spectral order, `ultrasound_ai/freehand/frame_ordering.py`); the "
        "order alone is `travel_signs` (speckle similarity of all pairs up to 20 s apart on a 128-px central "
        "crop, then the Fiedler vector).\n\n"
        + report.markdown_table(["frames", "forward best (s)", "forward median (s)", "ordering best (s)",
                                 "ordering median (s)", "order alone best (s)", "order alone median (s)",
                                 "order's share of ordering", "ordering / forward (time)"], rows) + "\n")
    if not args.no_write:
        report.write_section("frame_ordering_speed", "What MoGLo-Net's direction from the frames' order costs", body)
    report.end_section()
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
