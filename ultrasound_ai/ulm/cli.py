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


def process(args: argparse.Namespace) -> int:
    """Localize, track and render an acquisition into a ULM result file (and optionally a PNG)."""
    from ultrasound_ai.core.atomic import check_output_path
    from ultrasound_ai.ulm.pipeline import UlmParams, process_acquisition

    check_output_path(args.out, what="--out", extensions=(".h5", ".hdf5"))  # before any work
    if args.png:
        check_output_path(args.png, what="--png", extensions=(".png",))
    params = UlmParams(
        bubbles_per_frame=None if args.counting_network else args.bubbles_per_frame,
        counting_network=True if args.counting_network else None,  # None: the counting network unless N is given
        svd_cutoff=None if args.svd_cutoff == 0 else args.svd_cutoff,  # negative: refused by UlmParams
        band_hz=tuple(args.band) if args.band else None,
        block_frames=args.block_frames,
        link_distance_px=args.link_distance,
        max_gap=args.max_gap,
        min_track_length=args.min_track_length,
        resolution_factor=args.resolution_factor,
        device=args.device,
        model=args.model,
        window_mode=args.window_mode,
        window_stride=args.window_stride,
        rs_agreement_px=args.rs_agreement,
        precision=args.precision,
    )
    result = process_acquisition(args.acquisition, args.method, params, args.out, png=args.png,
                                 show_progress=not args.quiet)
    if not args.quiet:
        n_tracked = int((result.localizations[:, 4] >= 0).sum())
        print(f"wrote {args.out}: {result.localizations.shape[0]} localizations ({n_tracked} tracked, "
              f"{result.attrs['n_tracks']} tracks), maps {result.image_shape[0]}x{result.image_shape[1]} "
              f"at {result.pixel_size_mm[0] * 1000:.2f} um" + (f"; picture {args.png}" if args.png else ""))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Print the localization and rendering metrics of a ULM result against an acquisition's ground truth."""
    import json
    import math

    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.io.ulm_files import acquisition_info, read_gt_positions, read_result
    from ultrasound_ai.ulm.metrics import evaluate_result

    result = read_result(args.result)
    info = acquisition_info(args.truth)
    gt = read_gt_positions(args.truth)
    if gt is None:
        raise InputError(f"{args.truth}: no 'gt_positions' (ground truth) to evaluate against")
    metrics = evaluate_result(result, gt, info.wavelength_mm, info.frame_rate_hz)

    def clean(v):  # JSON has no NaN: undefined metrics (no true positive...) become null
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    print(json.dumps(clean(metrics), indent=2))
    return 0


def train(args: argparse.Namespace) -> int:
    """Train 3DML-ResNet + the counting network on simulated data through the shared training harness."""
    import sys

    from ultrasound_ai.core.training_config import config_from_args
    from ultrasound_ai.ulm.dml_training import DEFAULT_CONFIG, train_dml

    cfg = config_from_args(args, defaults=DEFAULT_CONFIG)
    result = train_dml(cfg, resume=args.resume, progress_bar=not args.quiet)
    if not args.quiet:
        print(f"trained {result.steps} steps; weights in {result.output_dir} (best.pt: validation "
              f"jaccard {result.best_metrics.get('jaccard', float('nan')):.3f} at step {result.best_step})",
              file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    from ultrasound_ai.core.deprecation import add_argument

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

    from ultrasound_ai.ulm.dml_inference import (  # numpy only
        DEFAULT_PRECISION,
        DEFAULT_STRIDE,
        DEFAULT_WINDOW_MODE,
        PRECISIONS,
        RS_AGREEMENT_PX,
        WINDOW_MODES,
    )

    p = verbs.add_parser("process", help="localize, track and render an acquisition (density, direction, velocity)")
    p.add_argument("acquisition", help="acquisition file (.h5: iq complex64 [T, Z, X] or bmode float32)")
    from ultrasound_ai.ulm.localizers import localizer_info, localizer_names

    methods = localizer_names()  # the registry, read when the parser is built: plug-ins included
    p.add_argument("--method", default="rs", choices=methods, metavar="METHOD",
                   help="localization method (default rs): " + "; ".join(
                       f"{name} = {localizer_info(name).label}" for name in methods))
    p.add_argument("--out", required=True, help="output ULM result file (.h5)")
    p.add_argument("--png", default=None, help="also write density | direction | velocity as one PNG")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--bubbles-per-frame", type=int, default=None,
                       help="fixed number of detections kept per frame (default: the counting network's per-frame "
                            "count; rs and wa fall back to 40 when no 3DML-ResNet model is installed)")
    count.add_argument("--counting-network", action="store_true",
                       help="per-frame counts from the counting network (the default; an error if none is installed)")
    p.add_argument("--svd-cutoff", type=int, default=4,
                   help="singular components removed per block (default 4; 0 = no SVD filter; negative is refused)")
    p.add_argument("--band", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="temporal Butterworth band-pass in Hz, e.g. 50 249 (default off)")
    p.add_argument("--block-frames", type=int, default=800, help="frames per processing block (default 800)")
    p.add_argument("--link-distance", type=float, default=2.0, help="maximum linking distance in pixels (default 2)")
    p.add_argument("--max-gap", type=int, default=0, help="frames a track may skip (gap closing, default 0)")
    p.add_argument("--min-track-length", type=int, default=15, help="minimum points per track (default 15)")
    p.add_argument("--resolution-factor", type=float, default=10.0, help="rendering pixel = wavelength / factor (default 10)")
    add_argument(p, "--checkpoint", deprecated=("--model",), dest="model", default=None, metavar="NAME_OR_PT",
                 help="3DML-ResNet checkpoint (.pt or installed model name) for --method 3dml and for "
                      "--counting-network (default: the installed one)")
    p.add_argument("--window-mode", choices=list(WINDOW_MODES), default=DEFAULT_WINDOW_MODE,
                   help="3DML-ResNet windows: inner (default: windows slid by their length - 2, each frame predicted "
                        "once away from a window's edge; within about 0.01 Jaccard of the paper's sliding windows at 1/6 "
                        "of their passes), sliding (the paper's, slid by --window-stride, estimates averaged) or tiled (side "
                        "by side, each frame predicted once, a quarter of them at an edge: less accurate)")
    p.add_argument("--window-stride", type=int, default=None,
                   help=f"3DML-ResNet windows' stride in frames: sliding windows (default {DEFAULT_STRIDE}; 1 = the "
                        "paper's) or inner ones (default: the window length - 2, each frame predicted once; 3 = twice, "
                        "averaged: a little more accurate, half the speed)")
    p.add_argument("--rs-agreement", type=float, default=RS_AGREEMENT_PX, metavar="PX",
                   help=f"3DML-ResNet sub-pixel positions: the network's offsets averaged with radial symmetry on the "
                        f"envelope where the two agree within PX pixels along both axes (default {RS_AGREEMENT_PX:g}; "
                        f"0 = the network's offsets alone)")
    p.add_argument("--precision", choices=list(PRECISIONS), default=DEFAULT_PRECISION,
                   help="3DML-ResNet arithmetic: auto (default: 8-bit integers on CPU where PyTorch has oneDNN's "
                        "quantized engine: the network about 1.7x faster, Jaccard as fp32's within 0.006 on "
                        "validation data; else fp32), int8, or fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=process)

    p = verbs.add_parser("evaluate", help="metrics of a ULM result against the acquisition's ground truth (JSON)")
    p.add_argument("result", help="ULM result file (.h5) from `ulm process`")
    p.add_argument("--truth", required=True, help="the acquisition file holding gt_positions")
    p.set_defaults(func=evaluate)

    from ultrasound_ai.core.training_config import add_training_arguments

    p = verbs.add_parser("train", help="train 3DML-ResNet + counting network on simulated data "
                                       "(see ultrasound_ai.ulm.dml_training)")
    add_training_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train)
