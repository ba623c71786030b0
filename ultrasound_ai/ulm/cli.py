"""`ultrasound-ai ulm VERB ...`: one function per verb, each registered in add_parser().

Keep imports inside the verb functions so `ultrasound-ai --help` stays fast.
"""

from __future__ import annotations

import argparse


def _db(text: str):
    """A dB level, or 'off'."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a level in dB (e.g. -30) or 'off', got {text!r}") from None


def simulate(args: argparse.Namespace) -> int:
    """Simulate a microbubble acquisition (IQ + ground truth) into an acquisition HDF5 file."""
    from tqdm import tqdm

    from ultrasound_ai.ulm.simulator import UlmSimConfig

    cfg = UlmSimConfig(n_frames=args.frames, bubbles_per_frame=args.bubbles_per_frame,
                       clutter_db=args.clutter_db, noise_db=args.noise_db, seed=args.seed)
    with tqdm(total=args.frames, desc="simulate", unit="frame", disable=args.quiet) as bar:
        def progress(done, total):
            bar.update(done - bar.n)

        if args.pymust:
            try:
                from ultrasound_ai.ulm.pymust_sim import simulate_pymust_to_file
            except ModuleNotFoundError as exc:
                if exc.name not in ("ultrasound_ai.ulm.pymust_sim", "pymust"):
                    raise
                from ultrasound_ai.core.errors import InputError

                raise InputError(f"--pymust: the pymust frame formation is not available ({exc.name} missing); "
                                 f"run without --pymust for the analytic-PSF simulator") from None
            simulate_pymust_to_file(args.out, cfg, progress=progress)
        else:
            from ultrasound_ai.ulm.simulator import simulate_to_file

            simulate_to_file(args.out, cfg, progress=progress)
    if not args.quiet:
        from ultrasound_ai.io.ulm_files import acquisition_info

        info = acquisition_info(args.out)
        print(f"wrote {args.out}: {info.shape[0]} frames {info.shape[1]}x{info.shape[2]} IQ, "
              f"{info.n_gt_positions} ground-truth positions")
    return 0


def add_parser(subparsers) -> None:
    group = subparsers.add_parser("ulm", help="ultrasound localization microscopy: simulate, process, evaluate, train")
    verbs = group.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("simulate", help="simulate microbubbles flowing in a vessel tree (IQ + ground truth)")
    p.add_argument("out", help="output acquisition file (.h5)")
    p.add_argument("--frames", type=int, default=1000, help="number of frames (1 kHz)")
    p.add_argument("--bubbles-per-frame", type=float, default=40.0, help="mean bubbles in the field of view")
    p.add_argument("--clutter-db", type=_db, default=20.0,
                   help="tissue clutter rms relative to the mean bubble peak amplitude, dB, or 'off' (default 20)")
    p.add_argument("--noise-db", type=_db, default=-30.0,
                   help="white noise rms relative to the mean bubble peak amplitude, dB, or 'off' (default -30)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")
    p.add_argument("--pymust", action="store_true",
                   help="form frames with pymust (SIMUS + delay-and-sum; slow, for small validation sets)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=simulate)
