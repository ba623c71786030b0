"""`ultrasound-ai freehand VERB ...`: one function per verb, each registered in add_parser().

Keep imports inside the verb functions so `ultrasound-ai --help` stays fast.
"""

from __future__ import annotations

import argparse


def simulate(args: argparse.Namespace) -> int:
    """Simulate one freehand sweep and write it as a sweep HDF5 file."""
    from tqdm import tqdm

    from ultrasound_ai.freehand.simulator import simulate_sweep
    from ultrasound_ai.io.sweep import write_sweep

    with tqdm(total=args.frames, desc="simulate", unit="frame", disable=args.quiet) as bar:
        def progress(done, total):
            bar.update(done - bar.n)

        sweep = simulate_sweep(
            args.seed, n_frames=args.frames, tactic=args.tactic, n_imus=args.imus, preset=args.preset,
            reverse=True if args.reverse else None, progress=progress,
        )
    write_sweep(sweep, args.out)
    if not args.quiet:
        print(f"wrote {args.out}: {sweep.n_frames} frames {sweep.frames.shape[1]}x{sweep.frames.shape[2]}, "
              f"tactic {sweep.attrs['tactic']}, {sweep.n_imus} IMUs")
    return 0


def reconstruct(args: argparse.Namespace) -> int:
    """Estimate a sweep's poses with a registered method and compound a volume (freehand/reconstruct.py)."""
    from ultrasound_ai.freehand.reconstruct import reconstruct_command

    return reconstruct_command(args)


def evaluate(args: argparse.Namespace) -> int:
    """Print the metrics of an estimate file against the true poses as JSON (freehand/reconstruct.py)."""
    from ultrasound_ai.freehand.reconstruct import evaluate_command

    return evaluate_command(args)


def add_parser(subparsers) -> None:
    group = subparsers.add_parser("freehand", help="freehand 3D ultrasound: simulate, reconstruct, evaluate, train")
    verbs = group.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("simulate", help="simulate a freehand sweep (frames, ground-truth poses, IMUs)")
    p.add_argument("out", help="output sweep file (.h5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")
    p.add_argument("--frames", type=int, default=200, help="number of frames (20 fps)")
    p.add_argument("--tactic", choices=["linear", "curved", "loop", "sector"], default=None,
                   help="scanning tactic (default: random)")
    p.add_argument("--imus", type=int, default=4, help="number of IMUs on the probe (0 for none)")
    p.add_argument("--preset", choices=["tusrec"], default=None, help="tusrec: 480x640 frames")
    p.add_argument("--reverse", action="store_true", help="make the sweep reverse its direction")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=simulate)

    from ultrasound_ai.freehand.reconstruct import (EVALUATE_HELP, RECONSTRUCT_HELP, add_evaluate_arguments,
                                                    add_reconstruct_arguments)

    p = verbs.add_parser("reconstruct", help=RECONSTRUCT_HELP)
    add_reconstruct_arguments(p)
    p.set_defaults(func=reconstruct)

    p = verbs.add_parser("evaluate", help=EVALUATE_HELP)
    add_evaluate_arguments(p)
    p.set_defaults(func=evaluate)
