"""`ultrasound-ai freehand VERB ...`: one function per verb, each registered in add_parser().

Keep imports inside the verb functions so `ultrasound-ai --help` stays fast.
"""

from __future__ import annotations

import argparse


def simulate(args: argparse.Namespace) -> int:
    """Simulate one freehand sweep and write it as a sweep HDF5 file."""
    from tqdm import tqdm

    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
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


def _method_params(args: argparse.Namespace) -> dict:
    """Method parameters given on the command line (only those given; the method checks them)."""
    from ultrasound_ai.core.errors import InputError

    params = {}
    if args.online_align is not None:
        params["online_align"] = bool(args.online_align)
    if args.align_steps is not None:
        params["align_steps"] = args.align_steps
    if args.align_lr is not None:
        params["align_lr"] = args.align_lr
    if args.imus is not None:
        try:
            params["imus"] = [int(v) for v in str(args.imus).split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--imus {args.imus!r}: expected comma-separated IMU indices such as 0,2") from None
    if params and args.method != "fima":
        raise InputError(f"--online-align/--align-steps/--align-lr/--imus are options of the fima method, "
                         f"not of {args.method!r}")
    return params


def reconstruct(args: argparse.Namespace) -> int:
    """Estimate a sweep's poses with a registered method and compound a volume (freehand/reconstruct.py)."""
    from ultrasound_ai.freehand.reconstruct import reconstruct_command

    args.method_params = _method_params(args)
    return reconstruct_command(args)


TRAIN_METHODS = ("fima", "rem", "rem-prime", "rem-f", "rem-f-prime", "moglo")


def train(args: argparse.Namespace) -> int:
    """Train FiMA (or one of its ablations, chosen by --method) or MoGLo-Net through the training harness."""
    import json
    import sys

    from ultrasound_ai.core.training_config import config_from_args

    if args.method == "moglo":
        from ultrasound_ai.freehand.moglo.training import DEFAULT_CONFIG, train_moglo

        cfg = config_from_args(args, defaults=DEFAULT_CONFIG)
        result = train_moglo(cfg, resume=args.resume, progress_bar=not args.quiet)
    else:
        from ultrasound_ai.freehand.fima.training import DEFAULT_CONFIG, train_fima

        cfg = config_from_args(args, defaults=DEFAULT_CONFIG)
        result = train_fima(cfg, variant=args.method, resume=args.resume, progress_bar=not args.quiet)
    if not args.quiet:
        print(f"trained {result.steps} steps; weights in {result.output_dir} (final.pt, best.pt)", file=sys.stderr)
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps, "metrics": result.metrics}))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Print the metrics of an estimate file against the true poses as JSON (freehand/reconstruct.py)."""
    from ultrasound_ai.freehand.reconstruct import evaluate_command

    return evaluate_command(args)


PLUS_SUFFIXES = (".igs.mha", ".igs.nrrd", ".mha", ".nrrd", ".seq.mha", ".seq.nrrd")


def import_scan(args: argparse.Namespace) -> int:
    """Convert a PLUS/Slicer tracked sequence or a TUS-REC scan into a sweep contract file."""
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.io.sweep import write_sweep

    name = str(args.source).lower()
    if args.calib:
        from ultrasound_ai.io.tusrec import read_tusrec_scan

        sweep = read_tusrec_scan(args.source, args.calib, landmarks=args.landmarks)
    elif name.endswith(PLUS_SUFFIXES):
        from ultrasound_ai.io.plus import read_plus_sequence

        sweep = read_plus_sequence(args.source, image_to_probe=args.image_to_probe)
    else:
        raise InputError(f"{args.source}: unknown scan format; expected a PLUS sequence ({', '.join(PLUS_SUFFIXES)}) "
                         "or a TUS-REC .h5 scan given with --calib calib_matrix.csv")
    write_sweep(sweep, args.out)
    print(f"wrote {args.out}: {sweep.n_frames} frames {sweep.frames.shape[1]}x{sweep.frames.shape[2]}, "
          f"spacing {sweep.pixel_spacing_xy[0]:.4g} x {sweep.pixel_spacing_xy[1]:.4g} mm, "
          f"{'with' if sweep.tforms is not None else 'without'} poses")
    return 0


def export_scan(args: argparse.Namespace) -> int:
    """Write a sweep (e.g. an estimate) as a PLUS sequence that SlicerIGT's Volume Reconstruction opens."""
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.io.plus import write_plus_sequence
    from ultrasound_ai.io.sweep import read_sweep

    sweep = read_sweep(args.sweep)
    if sweep.tforms is None:
        raise InputError(f"{args.sweep}: no 'tforms'; a PLUS sequence needs a pose per frame (export an estimate file)")
    if not str(args.out).lower().endswith((".mha", ".nrrd")):
        raise InputError(f"{args.out}: expected a .igs.mha or .igs.nrrd output name")
    write_plus_sequence(sweep, args.out, compress=args.compress)
    print(f"wrote {args.out}: {sweep.n_frames} frames with ImageToReference transforms")
    return 0


def add_parser(subparsers) -> None:
    group = subparsers.add_parser("freehand", help="freehand 3D ultrasound: simulate, import, export, reconstruct, evaluate, train")
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

    p = verbs.add_parser("import", help="convert a PLUS tracked sequence or a TUS-REC scan into a sweep file")
    p.add_argument("source", help="PLUS .igs.mha/.igs.nrrd sequence, or TUS-REC scan .h5 (with --calib)")
    p.add_argument("out", help="output sweep file (.h5)")
    p.add_argument("--calib", help="TUS-REC calib_matrix.csv (selects the TUS-REC reader)")
    p.add_argument("--landmarks", help="TUS-REC landmark file for the scan (optional)")
    p.add_argument("--image-to-probe", help="PLUS: ImageToProbe calibration (16 numbers) when the file has "
                   "Probe/Tracker transforms but no ImageToReference")
    p.set_defaults(func=import_scan)

    p = verbs.add_parser("export", help="write a sweep or estimate as a PLUS sequence (SlicerIGT Volume Reconstruction)")
    p.add_argument("sweep", help="sweep or estimate file (.h5) with tforms")
    p.add_argument("out", help="output .igs.nrrd or .igs.mha")
    p.add_argument("--compress", action="store_true", help="compress the image data")
    p.set_defaults(func=export_scan)

    from ultrasound_ai.freehand.reconstruct import (
        EVALUATE_HELP,
        RECONSTRUCT_HELP,
        add_evaluate_arguments,
        add_reconstruct_arguments,
    )

    p = verbs.add_parser("reconstruct", help=RECONSTRUCT_HELP)
    add_reconstruct_arguments(p)
    p.add_argument("--online-align", action=argparse.BooleanOptionalAction, default=None,
                   help="fima: run (or, with --no-online-align, skip) online alignment on the sweep "
                   "(default: the checkpoint's setting, on for the fima variant)")
    p.add_argument("--align-steps", type=int, metavar="N", help="fima: online alignment Adam steps (default 60)")
    p.add_argument("--align-lr", type=float, metavar="LR", help="fima: online alignment learning rate (default 2e-6)")
    p.add_argument("--imus", metavar="I,J,...", help="fima: indices of the sweep's IMUs to use (default: all)")
    p.set_defaults(func=reconstruct)

    from ultrasound_ai.core.training_config import add_training_arguments

    p = verbs.add_parser("train", help="train FiMA (or an ablation: rem, rem-prime, rem-f, rem-f-prime) or MoGLo-Net")
    p.add_argument("--method", required=True, choices=TRAIN_METHODS,
                   help="fima and its ablations (fima/training.py) or moglo (moglo/training.py)")
    add_training_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train)

    p = verbs.add_parser("evaluate", help=EVALUATE_HELP)
    add_evaluate_arguments(p)
    p.set_defaults(func=evaluate)
