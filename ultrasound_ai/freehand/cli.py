"""`ultrasound-ai freehand VERB ...`: one function per verb, each registered in add_parser().

Keep imports inside the verb functions so `ultrasound-ai --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from ultrasound_ai.core.deprecation import add_argument


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
    if getattr(args, "rotation_from_imus", None) is not None:
        params["rotation_from_imus"] = bool(args.rotation_from_imus)
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
        raise InputError(f"--online-align/--rotation-from-imus/--align-steps/--align-lr/--imus are options of the "
                         f"fima method, "
                         f"not of {args.method!r}")
    if getattr(args, "direction", None) is not None:
        if args.method not in ("moglo", "fima"):
            raise InputError(f"--direction is an option of the moglo and fima methods, not of {args.method!r}")
        params["direction"] = args.direction
    if getattr(args, "rotation", None) is not None:
        if args.method != "moglo":
            raise InputError(f"--rotation is an option of the moglo method, not of {args.method!r}")
        params["rotation"] = args.rotation
    if getattr(args, "frame_stride", None) is not None:
        if args.method not in ("moglo", "fima", "decorrelation"):
            raise InputError(f"--frame-stride is an option of the moglo, fima and decorrelation methods, not of "
                             f"{args.method!r}")
        value = args.frame_stride
        if value != "auto":
            try:
                value = int(value)
            except ValueError:
                raise InputError(f"--frame-stride {value!r}: expected 'auto' or a whole number of frames >= 1") from None
        params["frame_stride"] = value
    return params


def _list_methods() -> int:
    from ultrasound_ai.freehand.methods import available_methods, method_info

    for name in available_methods():
        info = method_info(name)
        print(f"{name:10s} {info.label}: {info.tooltip}")
    return 0


def reconstruct(args: argparse.Namespace) -> int:
    """Estimate a sweep's poses with a registered method and compound a volume (reconstruct.py does the work)."""
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.freehand.reconstruct import run_reconstruction

    if args.list_methods:
        return _list_methods()
    if not args.sweep:
        raise InputError("freehand reconstruct: expected an input sweep file SWEEP.h5")
    method_params = _method_params(args)
    if not (args.out_sweep or args.out_volume or args.png):
        print("ultrasound-ai freehand reconstruct: no output asked for (--out-sweep, --out-volume, --png); "
              "computing the poses only", file=sys.stderr)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=1000, desc=f"reconstruct ({args.method})", unit="‰", leave=False,
                   bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = int(round(1000 * fraction))
            bar.set_postfix_str(message[:60], refresh=False)
            bar.refresh()

    try:
        run = run_reconstruction(args.sweep, args.method, out_sweep=args.out_sweep, out_volume=args.out_volume,
                                 out_png=args.png, spacing_mm=args.spacing, compounding=args.compounding,
                                 fill_holes=args.fill_holes, fill_kernel_mm=args.fill_kernel, device=args.device,
                                 checkpoint=args.checkpoint, method_params=method_params, evaluate=args.metrics,
                                 progress=progress)
    finally:
        if bar is not None:
            bar.close()
    for note in run.notes:
        print(f"note: {note}", file=sys.stderr)
    for kind, path in run.outputs.items():
        print(f"wrote {kind}: {path}")
    if run.metrics:
        print(json.dumps({k: round(v, 4) for k, v in run.metrics.items()}))
    return 0


TRAIN_METHODS = ("fima", "rem", "rem-prime", "rem-f", "rem-f-prime", "moglo")


def train(args: argparse.Namespace) -> int:
    """Train FiMA (or one of its ablations, chosen by --method) or MoGLo-Net through the training harness."""
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
    """Print the metrics of an estimate file against the true poses as JSON (and write them with --out)."""
    from pathlib import Path

    from ultrasound_ai.core.atomic import atomic_output
    from ultrasound_ai.freehand.reconstruct import evaluate_files

    metrics = evaluate_files(args.estimate, args.truth)
    text = json.dumps(metrics, indent=2)
    if args.out:
        with atomic_output(args.out) as tmp:
            Path(tmp).write_text(text + "\n")
    print(text)
    return 0


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

    from ultrasound_ai.core.device import add_device_argument
    from ultrasound_ai.freehand.compounding import COMPOUNDING_MODES, FILL_METHODS
    from ultrasound_ai.freehand.methods import available_methods, method_info
    from ultrasound_ai.freehand.reconstruct import DEFAULT_SPACING_MM

    p = verbs.add_parser(
        "reconstruct", help="estimate the poses of a sweep and compound a 3D volume",
        description="Estimate the frame poses of a sweep file with a registered pose method, then write the "
                    "estimate (a sweep file), the compounded volume and a picture.")
    p.add_argument("sweep", metavar="SWEEP.h5", nargs="?", help="input sweep file (HDF5 sweep contract)")
    methods = available_methods()  # the registry, read when the parser is built: plug-ins included
    p.add_argument("--method", default="tracked", choices=methods, metavar="METHOD",
                   help="pose method (default: tracked): " + "; ".join(
                       f"{name} = {method_info(name).label}" for name in methods) + " (--list-methods says more)")
    p.add_argument("--list-methods", action="store_true", help="print the registered pose methods and exit")
    p.add_argument("--out-sweep", metavar="EST.h5", help="write the estimate as a sweep file")
    p.add_argument("--out-volume", metavar="VOL.nrrd", help="write the compounded volume (.nrrd, .nii.gz, .mha)")
    p.add_argument("--png", metavar="PICTURE.png", help="write a 3D picture of the volume and trajectories")
    p.add_argument("--spacing", type=float, default=DEFAULT_SPACING_MM, metavar="MM",
                   help=f"voxel size in mm (default: {DEFAULT_SPACING_MM})")
    p.add_argument("--compounding", choices=COMPOUNDING_MODES, default="mean",
                   help="how overlapping pixels combine (default: mean)")
    p.add_argument("--fill-holes", choices=FILL_METHODS, default="none",
                   help="fill small gaps between frames (default: none)")
    p.add_argument("--fill-kernel", type=float, default=1.0, metavar="MM", help="hole-filling radius in mm (default: 1)")
    p.add_argument("--checkpoint", metavar="NAME_OR_PT", help="weights for a learned method (default: its shipped model)")
    p.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=None,
                   help="compare the estimate with the sweep's own tforms and print the metrics (default: when the "
                   "sweep has tforms and the method is not tracked; --no-metrics skips this phase)")
    add_argument(p, "--quiet", deprecated=("--no-progress",), action="store_true", help="no progress bar")
    add_device_argument(p)
    p.add_argument("--online-align", action=argparse.BooleanOptionalAction, default=None,
                   help="fima: run (or, with --no-online-align, skip) online alignment on the sweep "
                   "(default: the checkpoint's setting, on for the fima variant)")
    p.add_argument("--rotation-from-imus", action=argparse.BooleanOptionalAction, default=None,
                   help="fima: each frame pair's rotation from the IMUs instead of the network's angles "
                   "(default: the checkpoint's setting, on for the shipped fima_small)")
    p.add_argument("--align-steps", type=int, metavar="N", help="fima: online alignment Adam steps (default 60)")
    p.add_argument("--align-lr", type=float, metavar="LR", help="fima: online alignment learning rate (default 2e-6)")
    p.add_argument("--imus", metavar="I,J,...", help="fima: indices of the sweep's IMUs to use (default: all)")
    p.add_argument("--direction", choices=["network", "forward", "turns", "ordering", "imus"], default=None,
                   help="which way each frame pair moved out of plane (default: the checkpoint's setting). moglo: "
                   "'forward' takes the sweep as moving towards +z (the images cannot tell a motion from its mirror "
                   "image), 'ordering' does so and then takes each pair's direction from the frames put in order by how "
                   "alike they are (where the probe comes back, its frames resemble earlier ones), 'turns' (research) "
                   "reverses at each turning point found in the frames; "
                   "fima: 'imus' takes the sign from the accelerometers fitted to the images' distances; both: "
                   "'network' keeps the network's signs")
    p.add_argument("--rotation", choices=["in-plane", "network"], default=None,
                   help="moglo: 'in-plane' sets the network's tilts (rotation about the image's x and y axes) to zero, "
                   "'network' keeps them (default: the checkpoint's setting, in-plane for the shipped moglo_small)")
    p.add_argument("--frame-stride", metavar="auto|K", default=None,
                   help="moglo, fima, decorrelation: read the sweep on every K-th frame and interpolate the frames "
                   "between; 'auto' (the default) does so when the sweep is faster than the rate the checkpoint was "
                   "trained (or the decorrelation curve calibrated) at, 1 reads every consecutive pair")
    p.set_defaults(func=reconstruct)

    from ultrasound_ai.core.training_config import add_training_arguments

    p = verbs.add_parser("train", help="train FiMA (or an ablation: rem, rem-prime, rem-f, rem-f-prime) or MoGLo-Net")
    p.add_argument("--method", required=True, choices=TRAIN_METHODS,
                   help="fima and its ablations (fima/training.py) or moglo (moglo/training.py)")
    add_training_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train)

    p = verbs.add_parser(
        "evaluate", help="compare an estimate file with the true poses (prints JSON metrics)",
        description="Print the FiMA Table-1 and TUS-REC metrics of an estimate file against a sweep with true "
                    "tforms, as JSON whose keys carry their units (fdr_pct, adr_pct, md_mm, sd_mm, hd_mm, "
                    "mea_deg, gpe_mm, lpe_mm).")
    p.add_argument("estimate", metavar="EST.h5", help="estimate file written by `freehand reconstruct --out-sweep`")
    p.add_argument("--truth", required=True, metavar="SWEEP.h5", help="the sweep file with the true tforms")
    p.add_argument("--out", metavar="METRICS.json", help="also write the JSON to this file")
    p.set_defaults(func=evaluate)
