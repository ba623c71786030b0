"""`ultrasound-ai registration VERB ...`: simulate, register, evaluate, train, import-muregpro.

Imports stay inside the verb functions so `ultrasound-ai --help` stays fast (no torch, no SimpleITK).
"""

from __future__ import annotations

import argparse
import json
import sys


def simulate(args: argparse.Namespace) -> int:
    """Write N simulated case folders OUTDIR/sim_<seed>."""
    from pathlib import Path

    from tqdm import tqdm

    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.registration.case import write_case
    from ultrasound_ai.registration.phantom import PhantomConfig, simulate_case

    if args.cases < 1:
        raise InputError(f"--cases: expected at least 1, got {args.cases}")
    overrides = {"family": args.family} if args.family else {}
    if args.held_out:
        cfg = PhantomConfig.held_out(**overrides)
    elif args.randomised:
        cfg = PhantomConfig.randomised(**overrides)
    elif args.small:
        cfg = PhantomConfig.small(**overrides)
    else:
        cfg = PhantomConfig(**overrides)
    out = Path(args.outdir)
    for n in tqdm(range(args.cases), desc="simulate", unit="case", disable=args.quiet):
        case = simulate_case(args.seed + n, cfg)
        write_case(case, out / case.name)
    if not args.quiet:
        print(f"wrote {args.cases} case(s) to {out} (family {cfg.family}, seeds {args.seed}..{args.seed + args.cases - 1})")
    return 0


def _load_inputs(args):
    """(Case or volumes tuple, initial 4x4 or None) from --case or --fixed/--moving/--fixed-label."""
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.io.volume import read_volume
    from ultrasound_ai.registration.case import read_case, read_transform_tfm
    from ultrasound_ai.registration.preprocessing import unpack_volumes

    if args.case:
        if args.fixed or args.moving or args.fixed_label:
            raise InputError("give either --case or --fixed/--moving/--fixed-label, not both")
        data = read_case(args.case)
    else:
        missing = [n for n, v in (("--fixed", args.fixed), ("--moving", args.moving), ("--fixed-label", args.fixed_label))
                   if not v]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or give --case CASE_DIR)")
        data = (read_volume(args.fixed), read_volume(args.fixed_label), read_volume(args.moving))
    unpack_volumes(data)  # 2D images, empty labels and grid mismatches fail here, clearly
    initial = read_transform_tfm(args.initial) if args.initial else None
    return data, initial


def register(args: argparse.Namespace) -> int:
    """Register the TRUS (moving) onto the MRI (fixed); write the ITK .tfm (and the JSON result).

    runtime_s in the JSON is the registration alone; load_s is the time to import the method's libraries
    and load its models (paid once per process)."""
    import time

    t_enter = time.perf_counter()
    import numpy as np
    from tqdm import tqdm

    from ultrasound_ai.core.atomic import check_output_path
    from ultrasound_ai.registration.case import write_result_json, write_transform_tfm
    from ultrasound_ai.registration.preprocessing import check_overlap, unpack_volumes

    # Before any work: a wrong extension or an unwritable folder must not cost a registration first.
    check_output_path(args.out, what="--out", extensions=(".tfm", ".txt", ".h5"))
    if args.json:
        check_output_path(args.json, what="--out-json", extensions=(".json",))
    data, initial = _load_inputs(args)
    fixed, label, moving = unpack_volumes(data)
    check_overlap(label, moving, np.eye(4) if initial is None else initial)
    t_read = time.perf_counter()
    extra: dict = {}
    with tqdm(total=100, desc=f"register ({args.method})", unit="%", disable=args.quiet) as bar:
        def progress(fraction, message=""):
            bar.update(int(round(100 * min(max(fraction, 0.0), 1.0))) - bar.n)

        if args.method == "mi":
            from ultrasound_ai.registration.mi_baseline import register_mi

            t0 = time.perf_counter()
            T = register_mi(fixed, moving, initial=initial, fixed_label=label, progress=progress)
            runtime, load = time.perf_counter() - t0, t0 - t_read
        else:
            from ultrasound_ai.registration.inference import register_attention_report

            checkpoints = tuple(args.checkpoints) if args.checkpoints else None
            t_imported = time.perf_counter()
            T, report = register_attention_report(
                data, initial=initial, checkpoints=checkpoints, mode=args.mode, device=args.device,
                guard=not args.no_guard, refine=args.method == "attention+refine", progress=progress)
            runtime, load = report.pop("runtime_s"), report.pop("load_s") + (t_imported - t_read)
            extra["cascade"] = report
    write_transform_tfm(T, args.out)
    if args.json:
        write_result_json(T, args.json, args.method, runtime_s=runtime, load_s=load,
                          read_s=t_read - t_enter, **extra)
    if not args.quiet:
        print(f"wrote {args.out} ({args.method}, {runtime:.2f} s)", file=sys.stderr)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Print SRE/TRE (and the measures that need no truth) of a registration result (.tfm) on a case as JSON."""
    import numpy as np

    from ultrasound_ai.core.atomic import atomic_output
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.registration.case import read_case, read_transform_tfm
    from ultrasound_ai.registration.tasks import evaluate as case_metrics

    case = read_case(args.case)
    T = read_transform_tfm(args.transform)
    initial = read_transform_tfm(args.initial) if args.initial else np.eye(4)
    result = case_metrics(T, initial, case)  # the job task's metrics: SRE/TRE when possible, consistency
    if "sre_mm" not in result and "tre_mm" not in result:
        raise InputError(f"case {args.case}: no truth.json and no paired landmarks; nothing to evaluate against")
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(text)
    return 0


def train(args: argparse.Namespace) -> int:
    """Train one Attention-Reg stage through the shared training harness."""
    from ultrasound_ai.core.training_config import config_from_args
    from ultrasound_ai.registration.training import DEFAULT_CONFIG, train_attention_reg

    cfg = config_from_args(args, defaults=DEFAULT_CONFIG)
    result = train_attention_reg(cfg, resume=args.resume, progress_bar=not args.quiet)
    if not args.quiet:
        print(f"trained {result.steps} steps; weights in {result.output_dir}", file=sys.stderr)
    return 0


def import_muregpro_cmd(args: argparse.Namespace) -> int:
    from ultrasound_ai.registration.case import import_muregpro

    written = import_muregpro(args.folder, args.outdir)
    if not args.quiet:
        print(f"imported {len(written)} case(s) into {args.outdir}")
    return 0


def add_parser(subparsers) -> None:
    from ultrasound_ai.core.deprecation import add_argument
    from ultrasound_ai.core.device import DEVICE_CHOICES_HELP
    from ultrasound_ai.core.training_config import add_training_arguments

    group = subparsers.add_parser("registration", help="MRI-TRUS rigid fusion: simulate, register, evaluate, train")
    verbs = group.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("simulate", help="simulate MRI-TRUS case folders (phantom with known transform)")
    p.add_argument("outdir", help="output folder; one case folder per case")
    p.add_argument("--cases", type=int, default=1, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (case n uses seed + n)")
    p.add_argument("--family", choices=["ellipsoid_deformed", "superquadric"], default=None,
                   help="gland shape family (default ellipsoid_deformed; superquadric with --held-out)")
    p.add_argument("--held-out", action="store_true",
                   help="the held-out generator setting (superquadric gland, coarser voxels)")
    p.add_argument("--small", action="store_true", help="coarse voxels (~1.25 mm): fast, for tests and demos")
    p.add_argument("--randomised", action="store_true",
                   help="the randomised training family (appearance, probe placement, deformation drawn per case)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=simulate)

    p = verbs.add_parser("register", help="register a TRUS volume (moving) onto an MRI (fixed)")
    p.add_argument("--case", help="a case folder (instead of --fixed/--moving/--fixed-label)")
    p.add_argument("--fixed", help="the MRI volume (.nrrd, .nii.gz, .mha)")
    p.add_argument("--moving", help="the TRUS volume")
    p.add_argument("--fixed-label", help="the prostate label on the MRI grid")
    p.add_argument("--initial", help="initial fixed->moving transform (ITK .tfm); default: physical positions")
    p.add_argument("--method", choices=["attention+refine", "attention", "mi"], default="attention+refine",
                   help="attention+refine (default): the guarded Attention-Reg cascade, then an LC2 intensity "
                        "refinement, also run from the start and the networks' own proposals (kept only when it raises LC2 by the guard's "
                        "margin and moves the gland 3-12 mm, or up to 16 mm when two refinements reach the same optimum; "
                        "the JSON says); "
                        "attention: the guarded cascade alone; mi: Mattes mutual information")
    p.add_argument("--no-guard", action="store_true",
                   help="attention: keep every stage's proposal (no LC2 check against the stage's start)")
    p.add_argument("--mode", choices=["label", "image"], default="label",
                   help="attention: feed the MRI gland label (default) or the MRI itself")
    add_argument(p, "--checkpoint", deprecated=("--checkpoints",), dest="checkpoints", nargs="+", metavar="NAME_OR_PT",
                 help="attention: stage checkpoints in order (default: the shipped ones)")
    p.add_argument("--device", default="auto", help=DEVICE_CHOICES_HELP)
    p.add_argument("--out", required=True, help="output ITK transform file (.tfm), fixed->moving LPS")
    add_argument(p, "--out-json", deprecated=("--json",), dest="json", metavar="T.json",
                 help="also write {moving_to_fixed_ras, fixed_to_moving_lps, method, runtime_s}")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=register)

    p = verbs.add_parser("evaluate", help="SRE / TRE of a registration result on a case, as JSON")
    p.add_argument("transform", help="the registration result (ITK .tfm, fixed->moving)")
    p.add_argument("--case", required=True, help="case folder with truth.json and/or paired landmarks")
    p.add_argument("--initial", help="initial transform for initial_sre_mm (default: physical positions)")
    add_argument(p, "--out", deprecated=("--json",), dest="json", metavar="METRICS.json",
                 help="also write the JSON to this file")
    p.set_defaults(func=evaluate)

    p = verbs.add_parser("train", help="train an Attention-Reg stage (see ultrasound_ai.registration.training)")
    add_training_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train)

    p = verbs.add_parser("import-muregpro", help="convert a µ-RegPro 2023 folder into case folders")
    p.add_argument("folder", help="folder with mr_images/, us_images/, mr_labels/, us_labels/")
    p.add_argument("outdir", help="output folder; one case folder per case")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=import_muregpro_cmd)
