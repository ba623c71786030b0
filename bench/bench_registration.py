"""MRI-TRUS registration on held-out simulated cases, like the Attention-Reg paper's Tables 1 and 2.

For each generator setting ("default": the training family, unseen seeds; "held_out": superquadric
glands and coarser voxels, never seen in training) and each initial-SRE setting (exactly 8 mm, exactly
16 mm, uniform in [0, 20] mm; the perturbation drawn as in training, `metrics.perturbation_with_sre`,
seeded per case), every method starts from the same T_init:

- MI: SimpleITK Mattes-MI rigid registration (`mi_baseline.register_mi`, multi-resolution 4/2/1,
  rotation about the gland centroid, metric masked to the dilated gland) from T_init;
- Feature-Reg stage 1 (when a checkpoint is given with --feature-reg);
- Attention-Reg stage 1 and the two-stage cascade (stage 2 on stage 1's output).

SRE (mm, DESIGN.md) mean +- sd, median, and the seconds per case (one registration, data prepared
from the volumes, on this machine's CPU). Writes the "registration" section of BENCHMARKS.md.

    python bench/bench_registration.py [--stage1 PT --stage2 PT] [--feature-reg PT] [--cases 8]
        [--mode label] [--device cpu] [--no-write] [--json OUT.json]

Without --stage1/--stage2 the installed default models of the mode are used (Resources/Models).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ultrasound_ai.registration.metrics import perturbation_with_sre, sre  # noqa: E402
from ultrasound_ai.registration.phantom import REGISTRATION_SIM_VERSION, PhantomConfig, simulate_case  # noqa: E402

SETTINGS = (("8 mm", 8.0), ("16 mm", 16.0), ("U[0, 20] mm", None))
GENERATORS = {"default": (PhantomConfig, 900_000), "held_out": (PhantomConfig.held_out, 950_000)}


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initial_transform(case, setting: float | None, seed: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng([seed, 0x5E])
    target = float(rng.uniform(0.0, 20.0)) if setting is None else float(setting)
    T0 = perturbation_with_sre(case.truth_fixed_to_moving, target, case.surface_fixed, rng)
    return T0, target


def run(args) -> dict:
    from ultrasound_ai.registration.inference import load_cascade
    from ultrasound_ai.registration.mi_baseline import register_mi

    cascade = load_cascade([args.stage1, args.stage2] if args.stage1 else None, mode=args.mode, device=args.device)
    feature = load_cascade([args.feature_reg], mode=args.mode, device=args.device) if args.feature_reg else None
    rows: dict = {}
    for gname, (make_cfg, seed0) in GENERATORS.items():
        if args.generators and gname not in args.generators:
            continue
        cfg = make_cfg()
        for i in range(args.cases):
            t0 = time.perf_counter()
            case = simulate_case(seed0 + i, cfg)
            print(f"[{gname}] case {seed0 + i} simulated in {time.perf_counter() - t0:.1f} s", flush=True)
            truth = case.truth_fixed_to_moving
            for sname, setting in SETTINGS:
                T0, target = initial_transform(case, setting, seed0 + i)
                out = rows.setdefault(f"{gname}|{sname}", {"initial": [], "MI": [], "Feature-Reg": [],
                                                           "Attention-Reg stage 1": [], "Attention-Reg stage 2": [],
                                                           "seconds": {}})
                out["initial"].append(sre(T0, truth, case.surface_fixed))
                if not args.skip_mi:
                    t = time.perf_counter()
                    T = register_mi(case.fixed, case.moving, initial=T0, fixed_label=case.fixed_label)
                    out["seconds"].setdefault("MI", []).append(time.perf_counter() - t)
                    out["MI"].append(sre(T, truth, case.surface_fixed))
                if feature is not None:
                    t = time.perf_counter()
                    T = feature.register(case, initial=T0)
                    out["seconds"].setdefault("Feature-Reg", []).append(time.perf_counter() - t)
                    out["Feature-Reg"].append(sre(T, truth, case.surface_fixed))
                _, hist, secs = cascade.register(case, initial=T0, return_stages=True)
                out["Attention-Reg stage 1"].append(sre(hist[0], truth, case.surface_fixed))
                out["seconds"].setdefault("Attention-Reg stage 1", []).append(secs[0])
                if len(hist) > 1:
                    out["Attention-Reg stage 2"].append(sre(hist[1], truth, case.surface_fixed))
                    out["seconds"].setdefault("Attention-Reg stage 2", []).append(float(sum(secs[:2])))
                print(f"  {sname}: initial {out['initial'][-1]:.2f}"
                      + "".join(f", {k} {v[-1]:.2f}" for k, v in out.items()
                                if k not in ("initial", "seconds") and v), flush=True)
    return {"rows": rows, "cascade": [str(s.path) for s in cascade.stages],
            "feature_reg": args.feature_reg, "cards": [s.card for s in cascade.stages]}


def _cell(values) -> str:
    if not values:
        return "–"
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.2f} ± {v.std():.2f} ({np.median(v):.2f})"


def format_section(res: dict, args) -> str:
    methods = ["initial", "MI", "Feature-Reg", "Attention-Reg stage 1", "Attention-Reg stage 2"]
    lines = [
        f"Held-out simulated cases ({args.cases} per generator), phantom `ultrasound_ai.registration.phantom` "
        f"version {REGISTRATION_SIM_VERSION}: generator 'default' (the training family; case seeds "
        f"{GENERATORS['default'][1]}..{GENERATORS['default'][1] + args.cases - 1}, training used 0..95 and "
        f"validation 500000..) and 'held_out' (superquadric glands, MRI 0.85-1.0 x 3.0-3.6 mm and TRUS 0.8-0.9 mm "
        f"voxels; seeds {GENERATORS['held_out'][1]}..; never seen in training). One perturbation per case and "
        f"setting, drawn as in training and rescaled to the initial SRE. Mode: {args.mode}. Cells: SRE in mm, "
        "mean ± sd (median).",
        "",
        "Checkpoints: " + ", ".join(f"`{Path(p).name}`" for p in res["cascade"])
        + (f", Feature-Reg `{Path(res['feature_reg']).name}`" if res["feature_reg"] else
           " (no Feature-Reg checkpoint given: its column is empty)") + ".",
        "",
        "| generator | initial SRE | " + " | ".join(methods) + " |",
        "|" + "---|" * (len(methods) + 2),
    ]
    for key, out in res["rows"].items():
        g, s = key.split("|")
        lines.append(f"| {g} | {s} | " + " | ".join(_cell(out[m]) for m in methods) + " |")
    secs: dict = {}
    for out in res["rows"].values():
        for m, v in out["seconds"].items():
            secs.setdefault(m, []).extend(v)
    lines += ["", "Seconds per case (CPU, everything from the volumes in memory to the transform): "
              + "; ".join(f"{m} {np.mean(v):.2f} s" for m, v in secs.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage1", help="stage-1 checkpoint (default: the installed default of --mode)")
    ap.add_argument("--stage2", help="stage-2 checkpoint (with --stage1)")
    ap.add_argument("--feature-reg", help="a Feature-Reg stage-1 checkpoint (the paper's ablation)")
    ap.add_argument("--mode", default="label", choices=("label", "image"))
    ap.add_argument("--cases", type=int, default=8, help="cases per generator setting")
    ap.add_argument("--generators", nargs="+", choices=tuple(GENERATORS), default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-mi", action="store_true")
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    if args.stage1 and not args.stage2:
        ap.error("--stage1 needs --stage2 (the two-stage cascade)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = run(args)
    body = format_section(res, args)
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in res.items() if k != "cards"}, indent=1))
    if not args.no_write:
        _report_module().write_section("registration", "MRI-TRUS registration on held-out simulated cases", body,
                                       device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
