"""MRI-TRUS registration accuracy on the frozen sets (``ultrasound_ai.registration.frozen_sets``).

Sets: ``registration-indep-v1`` (the independent validation family, ``indep_phantom``: never trained or
selected on) and ``registration-randomised-v1`` (unseen seeds of the randomised training phantom). Each
case starts from the set's initial transforms (exactly 0, 8 and 16 mm SRE). Rows:

- MI: SimpleITK Mattes-MI rigid registration (``mi_baseline.register_mi``) from the start;
- Feature-Reg: the Feature-Reg stage-1 checkpoint (``--feature-reg``), one pass;
- stage 1, two-stage: the Attention-Reg networks without any check (the paper's cascade);
- two-stage + guard: the cascade keeping a stage's proposal only when LC² does not drop
  (``inference.guarded_register``);
- + refinement: the guarded cascade, then the LC² refinement (``--method attention+refine``, the CLI
  default);
- LC² refinement alone: the same refinement from the start, no network (what the networks add).

Cells: SRE (mm) mean ± sd (median), then the fraction of cases whose SRE ends above their start ("worse";
from 0 mm: ends above 2 mm). Accuracy only: no timing claim (seconds per case are printed, not written).

    python bench/bench_registration.py --sets registration-indep-v1 [--stage1 PT --stage2 PT]
        [--feature-reg PT] [--tag shipped-2026-12-03] [--rows MI stage1 ...] [--json OUT] [--no-write]

Without --stage1/--stage2 the installed default models are used (Resources/Models). The sets are
regenerated under bench/data/ on first use (``python -m ultrasound_ai.registration.frozen_sets NAME``).
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

from ultrasound_ai.registration.frozen_sets import FROZEN_SETS, initial_name, materialise  # noqa: E402
from ultrasound_ai.registration.metrics import sre  # noqa: E402

ROWS = ("MI", "Feature-Reg", "stage 1", "two-stage", "two-stage + guard", "+ refinement", "LC² refinement alone")
ROW_KEYS = {"mi": "MI", "feature": "Feature-Reg", "nets": "stage 1", "guard": "two-stage + guard",
            "refine": "+ refinement", "lc2": "LC² refinement alone"}


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_set(name: str, args, cascade, feature) -> dict:
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.registration.case import read_case, read_transform_tfm
    from ultrasound_ai.registration.inference import guarded_register
    from ultrasound_ai.registration.mi_baseline import register_mi

    dirs = materialise(name, args.data)
    dirs = dirs[args.skip:]
    if args.cases:
        dirs = dirs[: args.cases]
    levels = FROZEN_SETS[name]["initial_sre_mm"]
    res: dict = {f"{lv:g}": {"initial": [], "cases": [], "seconds": {}, **{r: [] for r in ROWS}} for lv in levels}
    rows = set(args.rows)
    for d in dirs:
        case = read_case(d)
        truth, surf = case.truth_fixed_to_moving, case.surface_fixed
        for lv in levels:
            out = res[f"{lv:g}"]
            T0 = read_transform_tfm(d / initial_name(lv))
            out["initial"].append(sre(T0, truth, surf))
            out["cases"].append(d.name)

            def timed(row, fn):
                t = time.perf_counter()
                try:
                    T = fn()
                except InputError as exc:  # e.g. MI losing the overlap: the user is left with the start
                    print(f"  {row} failed on {d.name} at {lv:g} mm: {exc}", flush=True)
                    out.setdefault("failures", {}).setdefault(row, []).append(d.name)
                    T = T0
                out["seconds"].setdefault(row, []).append(time.perf_counter() - t)
                out[row].append(sre(T, truth, surf))
                return T

            if "mi" in rows:
                timed("MI", lambda: register_mi(case.fixed, case.moving, initial=T0, fixed_label=case.fixed_label))
            if feature is not None and "feature" in rows:
                timed("Feature-Reg", lambda: feature.register(case, initial=T0))
            if "nets" in rows:
                _, hist, _ = cascade.register(case, initial=T0, return_stages=True)
                out["stage 1"].append(sre(hist[0], truth, surf))
                if len(hist) > 1:
                    out["two-stage"].append(sre(hist[-1], truth, surf))
            if "guard" in rows:
                timed("two-stage + guard", lambda: guarded_register(case, cascade, initial=T0)[0])
            if "refine" in rows:
                def refined():
                    T, report = guarded_register(case, cascade, initial=T0, refine=True)
                    entry = report["stages"][-1]  # the refinement: kept, or why not, and where it went
                    start_sre = sre(np.array(entry["start"]), truth, surf)
                    out.setdefault("refinement", []).append({
                        "kept": bool(entry["kept"]), "beyond_reach": bool(entry.get("beyond_reach", False)),
                        "within_noise": bool(entry.get("within_noise", False)), "start_sre_mm": start_sre,
                        "moved_mm": entry["moved_mm"], "proposal_sre_mm": sre(np.array(entry["proposal"]), truth, surf),
                        "lc2_gain": entry["lc2_proposal"] / max(entry["lc2_start"], 1e-12) - 1.0,
                        "kept_before": next((e["stage"] for e in reversed(report["stages"][:-1]) if e["kept"]), "start"),
                        "start": entry["start"], "proposal": entry["proposal"]})  # to judge other acceptance rules
                    multi = entry.get("multistart")
                    if multi is not None:  # the estimate's refinement alone: the rule before the multi-start
                        own = multi["ends"][0]
                        out["refinement"][-1].update(
                            multistart_chosen=multi["chosen"], agreeing=multi["agreeing"],
                            single_start_sre_mm=sre(np.array(own["end"]), truth, surf) if multi["estimate_alone_kept"]
                            else start_sre)
                    if "guard" not in rows:  # the refinement starts from the guarded cascade's result
                        out["two-stage + guard"].append(start_sre)
                    return T

                timed("+ refinement", refined)
            if "lc2" in rows:
                timed("LC² refinement alone", lambda: guarded_register(case, None, initial=T0, refine=True)[0])
            print(f"[{name}] {d.name} {lv:g} mm: " + ", ".join(
                f"{r} {out[r][-1]:.2f}" for r in ROWS if len(out[r]) == len(out["initial"])), flush=True)
    return res


def _cell(values, initial, level) -> str:
    if not values:
        return "–"
    v, s0 = np.asarray(values, dtype=np.float64), np.asarray(initial, dtype=np.float64)
    worse = np.mean(v > 2.0) if level == 0 else np.mean(v > s0)
    return f"{v.mean():.2f} ± {v.std():.2f} ({np.median(v):.2f}); {100 * worse:.0f} %"


def _reach_lines(res: dict) -> list:
    """What the refinement's reach changed, per level: the refinements it refused, and the "+ refinement" cell
    without the reach (a refused refinement's proposal is what it would have kept: the run is deterministic)."""
    lines = []
    for lv, out in res.items():
        rows = out.get("refinement", [])
        if not rows or len(rows) != len(out["+ refinement"]):
            continue
        refused = [r for r in rows if r["beyond_reach"]]
        free = [r["proposal_sre_mm"] if r["beyond_reach"] else v for r, v in zip(rows, out["+ refinement"])]
        moves = ", ".join("%.1f" % r["moved_mm"] for r in refused)
        moves = f" (moves {moves} mm)" if refused else ""
        lines.append(f"- from {lv} mm: {len(refused)} of {len(rows)} refinements refused for moving the gland more "
                     f"than the reach{moves}; without the reach: {_cell(free, out['initial'], float(lv))}")
        if all("single_start_sre_mm" in r for r in rows):
            taken = [r for r in rows if r["multistart_chosen"] not in (None, "estimate")]
            lines.append(f"  multi-start: {len(taken)} end point(s) reached from two starts kept instead of the "
                         f"estimate's own; with the estimate's refinement alone (the previous rule): "
                         f"{_cell([r['single_start_sre_mm'] for r in rows], out['initial'], float(lv))}")
        near = [r for r in rows if r.get("within_noise")]
        if near:
            free = [r["proposal_sre_mm"] if r.get("within_noise") else v for r, v in zip(rows, out["+ refinement"])]
            moves = ", ".join("%.1f" % r["moved_mm"] for r in near)
            lines.append(f"  {len(near)} refused for moving it less than the dead zone (moves {moves} mm); without "
                         f"the dead zone: {_cell(free, out['initial'], float(lv))}")
    if lines:
        lines = ["", "The refinement's reach (`inference.REFINE_REACH_MM`), dead zone "
                 "(`inference.REFINE_MIN_MOVE_MM`) and multi-start (`inference.REFINE_MULTISTART`):"] + lines
    return lines


def format_section(name: str, res: dict, args, checkpoints: list) -> str:
    spec = FROZEN_SETS[name]
    n = len(next(iter(res.values()))["initial"])
    lines = [
        f"Frozen set `{name}`: generator `{spec['generator']}` version {spec['version']}, case seeds "
        f"{spec['seeds'][0]}..{spec['seeds'][-1]} ({n} cases here), initial SRE exactly "
        f"{', '.join(f'{v:g}' for v in spec['initial_sre_mm'])} mm (perturbation seed {spec['perturbation_seed']}); "
        f"{spec['use']}. Regenerate: `python -m ultrasound_ai.registration.frozen_sets {name}`.",
        "",
        f"Models ({args.tag}): " + ", ".join(f"`{Path(p).name}`" for p in checkpoints) + ". Cells: SRE in mm, mean ± "
        "sd (median); then the fraction of cases made worse than their start (from 0 mm: ending above 2 mm). "
        "Guard and refinement: LC² (`ultrasound_ai.registration.similarity`).",
        "",
        "| initial SRE | " + " | ".join(ROWS) + " |",
        "|" + "---|" * (len(ROWS) + 1),
    ]
    for lv, out in res.items():
        lines.append(f"| {lv} mm | " + " | ".join(_cell(out.get(r, []), out["initial"], float(lv)) for r in ROWS) + " |")
    lines += _reach_lines(res)
    failures = {f"{r} at {lv} mm": len(v) for lv, out in res.items() for r, v in out.get("failures", {}).items()}
    if failures:
        lines += ["", "Failures (the method raised an error; its start counted as its result): "
                  + ", ".join(f"{k}: {n} case(s)" for k, n in failures.items()) + "."]
    return "\n".join(lines)


def merge_results(docs: list) -> tuple[list, dict]:
    """(checkpoints, {set: {level: rows}}) of several --json outputs: per set and level, the lists of every
    run concatenated in the order given (the runs must have used the same checkpoints)."""
    checkpoints = docs[0]["checkpoints"]
    for doc in docs[1:]:
        if doc["checkpoints"] != checkpoints:
            raise SystemExit(f"--merge: runs with different checkpoints: {checkpoints} vs {doc['checkpoints']}")
    merged: dict = {}
    for doc in docs:
        for name, levels in doc["sets"].items():
            for lv, out in levels.items():
                into = merged.setdefault(name, {}).setdefault(lv, {})
                for key, value in out.items():
                    if isinstance(value, list):
                        into.setdefault(key, []).extend(value)
                    elif isinstance(value, dict):  # seconds / failures: row -> list
                        for row, vals in value.items():
                            into.setdefault(key, {}).setdefault(row, []).extend(vals)
    return checkpoints, merged


def _merge(args) -> int:
    docs = [json.loads(Path(p).read_text()) for p in args.merge]
    checkpoints, merged = merge_results(docs)
    args.tag = docs[0].get("tag", args.tag) if args.tag == "installed models" else args.tag
    for name, res in merged.items():
        body = format_section(name, res, args, checkpoints)
        print(body)
        if not args.no_write:
            _report_module().write_section(f"registration_{args.section or name}",
                                           f"MRI-TRUS registration on `{name}`, {args.tag}", body, device=args.device)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoints": checkpoints, "tag": args.tag, "sets": merged}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=sorted(FROZEN_SETS), choices=sorted(FROZEN_SETS))
    ap.add_argument("--stage1", help="stage-1 checkpoint (default: the installed default)")
    ap.add_argument("--stage2", help="stage-2 checkpoint (with --stage1)")
    ap.add_argument("--feature-reg", help="a Feature-Reg stage-1 checkpoint (default: the installed one)")
    ap.add_argument("--mode", default="label", choices=("label", "image"))
    ap.add_argument("--rows", nargs="+", default=list(ROW_KEYS), choices=list(ROW_KEYS))
    ap.add_argument("--cases", type=int, default=None, help="only the first N cases of each set (after --skip)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N cases (to split a run over processes)")
    ap.add_argument("--data", default=None, help="folder holding the sets (default bench/data)")
    ap.add_argument("--tag", default="installed models", help="names this evaluation in its section")
    ap.add_argument("--section", default=None, help="BENCHMARKS.md section key suffix (default: the set name)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="evaluate nothing: join the --json outputs of runs split with --skip/--cases (same models) "
                         "and write their section")
    args = _report_module().parse_bench_args(ap, argv, cores=1, timing=False)  # accuracy only: no quiet wait
    if args.merge:
        return _merge(args)
    if args.stage1 and not args.stage2:
        ap.error("--stage1 needs --stage2 (the two-stage cascade)")
    from ultrasound_ai.models.registry import list_models
    from ultrasound_ai.registration.inference import load_cascade

    cascade = load_cascade([args.stage1, args.stage2] if args.stage1 else None, mode=args.mode, device=args.device)
    feature_pt = args.feature_reg
    if feature_pt is None:
        found = [e.pt_path for e in list_models("attention_reg")
                 if (e.card.get("configuration") or {}).get("attention") is False and e.card.get("stage") == 1]
        feature_pt = found[0] if found else None
    feature = load_cascade([feature_pt], mode=args.mode, device=args.device) if feature_pt else None
    checkpoints = [str(s.path) for s in cascade.stages] + ([str(feature_pt)] if feature_pt else [])
    everything = {}
    for name in args.sets:
        res = evaluate_set(name, args, cascade, feature)
        everything[name] = res
        body = format_section(name, res, args, checkpoints)
        print(body)
        if not args.no_write:
            key = f"registration_{args.section or name}"
            _report_module().write_section(key, f"MRI-TRUS registration on `{name}`, {args.tag}", body,
                                           device=args.device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoints": checkpoints, "tag": args.tag, "sets": everything},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
