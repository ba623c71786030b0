"""ULM accuracy on the frozen pymust-formed set (`bench/ulm_frozen_set.py`): every method as a user runs it.

Rows per condition (bubbles per frame x noise level), pooled over the condition's test acquisitions:
- `rs` and `wa` with no option (the CLI default: N per frame from the counting network);
- RS with a fixed N tuned on validation data (the classical baseline: the fast simulator's validation
  acquisitions of `bench_ulm_accuracy.tune_n`, never the test set);
- `3dml` with no option ("inner" windows: 8-frame windows slid by 6, each frame estimated once away from
  a window edge; one detection per Pos peak, counting network; sub-pixel offsets averaged with radial
  symmetry's where the two agree within 0.3 px);
- `3dml --precision fp32` (the ResNet in fp32; the default runs it in int8 on CPU);
- `3dml --rs-agreement 0` (the network's sub-pixel offsets alone: the default before that averaging);
- `3dml --window-stride 3` (inner windows slid by 3, two estimates per frame averaged);
- `3dml --window-mode sliding` (windows slid by 2, estimates averaged: the previous default);
- `3dml --window-mode tiled` (each frame predicted once);
- the old path: the paper's 8-frame windows slid by one with the plain layout and arithmetic of
  before, the same post-processing (for the speed and equal-accuracy comparison);
- today's 3DML before this work (`3dml-v0`: sliding windows, top-N pixels without the peak rule, the
  network's offsets alone), both with the CLI default of then (a fixed 40 per frame) and with the
  counting network.
Metrics (`ultrasound_ai.ulm.metrics`): raw and tracked Jaccard pooled over the acquisitions (TP, FP, FN
summed), vessel Dice and vessel SSIM (the rendering measures restricted to the vessels), SSIM; frames/s
of the whole pipeline (SVD, localization, tracking, rendering).

    python bench/bench_ulm_frozen.py [--rows ...] [--max-pieces K] [--threads 2] [--json F] [--no-write]

It runs on the pieces generated so far and says how many frames each condition had.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = ("rs", "wa", "rs-tuned", "3dml", "3dml-fp32", "3dml-net", "3dml-i3", "3dml-s2", "3dml-tiled", "3dml-sliding", "3dml-v0", "3dml-v0-count")
LABELS = {"rs": "RS (`--method rs`, counting network)", "wa": "WA (`--method wa`, counting network)",
          "rs-tuned": "RS, fixed N tuned on validation", "3dml": "3DML-ResNet (`--method 3dml`)",
          "3dml-fp32": "3DML-ResNet `--precision fp32` (the ResNet in fp32, not int8)",
          "3dml-net": "3DML-ResNet `--rs-agreement 0` (network offsets alone)",
          "3dml-i3": "3DML-ResNet `--window-stride 3` (inner windows, 2 estimates per frame)",
          "3dml-s2": "3DML-ResNet `--window-mode sliding` (stride 2, the previous default)",
          "3dml-tiled": "3DML-ResNet `--window-mode tiled`",
          "3dml-sliding": "3DML-ResNet old path (stride 1, plain arithmetic, peaks)",
          "3dml-v0": "3DML-ResNet before (`--method 3dml` of then: fixed 40)",
          "3dml-v0-count": "3DML-ResNet before, with its counting network"}


def timing_provenance(cached_rows, compared) -> str:
    """How far a frames/s ratio between `compared` rows can be trusted: only rows timed in this run compare."""
    if any(r in cached_rows for r in compared):
        return " (rows from different cached runs: indicative only)."
    return " (same run)."


def old_path_factory(peaks_only: bool = True):
    """3DML-ResNet's path before this work: the paper's windows slid by one, plain layout and arithmetic,
    the pipeline's post-processing (its `rs_agreement_px`); peaks_only=False: also its top-N pixels (no
    peak rule) and the network's offsets alone, as then."""
    def factory(ctx):
        from ultrasound_ai.ulm.dml_inference import DmlLocalizationRunner

        p = ctx.params
        return DmlLocalizationRunner(ctx.pixel_size_mm, ctx.origin_mm, ctx.wavelength_mm, model=p.model,
                                     device="cpu", bubbles_per_frame=p.bubbles_per_frame, window_mode="sliding",
                                     window_stride=1, channels_last=False, fused=False, pad_single=False,
                                     peaks_only=peaks_only,
                                     rs_agreement_px=p.rs_agreement_px if peaks_only else 0,
                                     fwhm_px=p.fwhm_px, window=p.window,
                                     record_counts=ctx.record_counts, workers=1, precision="fp32")
    return factory


def one_worker_factory():
    """The default 3DML path in fp32 on one window worker (torch on all its threads): the default before
    the window workers and int8, for the speed comparison."""
    def factory(ctx):
        from dataclasses import replace

        from ultrasound_ai.ulm.pipeline import dml_localizer

        ctx = replace(ctx, params=replace(ctx.params, precision="fp32"))
        runner = dml_localizer(ctx)
        runner.runner.workers = 1
        runner.runner.batch_windows = 3
        return runner
    return factory


def _params(row: str, model, tuned_n: dict, bubbles: float):
    from ultrasound_ai.ulm.pipeline import UlmParams

    base = dict(device="cpu", model=model)
    method = {"rs-tuned": "rs", "3dml-tiled": "3dml", "3dml-net": "3dml", "3dml-fp32": "3dml", "3dml-s2": "3dml", "3dml-i3": "3dml", "3dml-sliding": "3dml-old", "3dml-v0-count": "3dml-v0"}.get(row, row)
    if row == "rs-tuned":
        base["bubbles_per_frame"] = tuned_n[bubbles]
    elif row == "3dml-net":
        base["rs_agreement_px"] = 0
    elif row == "3dml-fp32":
        base["precision"] = "fp32"
    elif row == "3dml-tiled":
        base["window_mode"] = "tiled"
    elif row == "3dml-i3":
        base["window_stride"] = 3
    elif row == "3dml-s2":
        base["window_mode"] = "sliding"
    elif row == "3dml-v0":
        base["bubbles_per_frame"] = 40  # the CLI default of then
    elif row == "3dml-v0-count":
        base["counting_network"] = True
    return method, UlmParams(**base)


def cache_key(piece: str, row: str, model_name: str, tuned, params) -> str:
    """Key of one row's result on one piece in the --cache file: the row's processing parameters are
    part of it, so a cache written before a default changed is not taken for the new default."""
    import hashlib

    digest = hashlib.sha1(json.dumps(params.to_attrs(), sort_keys=True).encode()).hexdigest()[:12]
    return f"{piece}/{row}/{model_name}/{tuned}/{digest}"


def evaluate_piece(acq, row: str, model, tuned_n: dict, bubbles: float) -> dict:
    from ultrasound_ai.ulm.metrics import evaluate_result
    from ultrasound_ai.ulm.pipeline import process_acquisition

    method, params = _params(row, model, tuned_n, bubbles)
    t = time.perf_counter()
    res = process_acquisition(acq, method, params)
    dt = time.perf_counter() - t
    ev = evaluate_result(res, acq.gt_positions, acq.wavelength_mm, acq.frame_rate_hz)
    out = {"seconds": dt, "frames": acq.n_frames, "n_tracks": res.attrs["n_tracks"]}
    for k in ("raw", "tracked"):
        out[k] = {c: ev[k][c] for c in ("tp", "fp", "fn")}
    for k in ("ssim", "vessel_dice", "ssim_vessel"):
        out[k] = ev[k]
    return out


def pooled(recs: list[dict]) -> dict:
    def jac(kind):
        tp = sum(r[kind]["tp"] for r in recs)
        den = tp + sum(r[kind]["fp"] + r[kind]["fn"] for r in recs)
        return tp / den if den else float("nan")

    return {"jaccard": jac("raw"), "jaccard_tracked": jac("tracked"),
            "vessel_dice": float(np.mean([r["vessel_dice"] for r in recs])),
            "ssim_vessel": float(np.mean([r["ssim_vessel"] for r in recs])),
            "ssim": float(np.mean([r["ssim"] for r in recs])),
            "frames_per_s": sum(r["frames"] for r in recs) / sum(r["seconds"] for r in recs),
            "frames": sum(r["frames"] for r in recs), "pieces": len(recs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--max-pieces", type=int, default=None, help="test acquisitions per condition (default: all made)")
    ap.add_argument("--pieces", nargs="+", default=None, help="only these test acquisitions (names, e.g. test_b100_n20_p0)")
    ap.add_argument("--model", default=None, help="3DML-ResNet checkpoint (default: the installed default)")
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="val: the validation pieces, on which choices are made (printed only, never written)")
    ap.add_argument("--val-frames", type=int, default=200, help="frames per fast-simulator validation acquisition")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--cache", default=None,
                    help="JSON file of per-acquisition results to reuse and extend (keyed by piece, row, model "
                         "and the row's parameters; delete it after any other change of the code)")
    ap.add_argument("--only-cached", action="store_true", help="report what --cache holds, compute nothing new")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    from report import parse_bench_args

    args = parse_bench_args(ap, argv, timing=False)  # accuracy first: the load is recorded, not awaited

    import torch

    torch.set_num_threads(args.threads)
    import ulm_frozen_set as fs
    from bench_ulm_accuracy import tune_n

    from ultrasound_ai.ulm.dml_inference import load_dml_model
    from ultrasound_ai.ulm.pipeline import UlmParams, register_localizer

    register_localizer("3dml-v0", old_path_factory(peaks_only=False))
    register_localizer("3dml-old", old_path_factory())
    _, card = load_dml_model(args.model, "cpu")
    model_name = card.get("name", str(args.model))
    t0 = time.perf_counter()
    loads = [os.getloadavg()[0]]
    tuned_n = {}
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}
    tune_key = f"tuned_n/{args.val_frames}"
    if tune_key in cache:
        tuned_n = {float(b): n for b, n in cache[tune_key].items()}
    elif "rs-tuned" in args.rows:
        tuned = tune_n(["rs"], list(fs.BUBBLES), list(fs.NOISE_DB), args.val_frames, UlmParams(device="cpu"))
        tuned_n = {b: v[0] for b, v in tuned["rs"].items()}
        cache[tune_key] = tuned_n
    print("tuned N (RS):", tuned_n, flush=True)

    results: dict = {}
    cached_rows: set = set()  # rows with at least one acquisition answered by the cache (another run)
    if args.split == "val":
        args.no_write = True
    for p in fs.pieces(args.split):
        if not p.path.exists() or (args.max_pieces is not None and p.index >= args.max_pieces):
            continue
        if args.pieces is not None and p.name not in args.pieces:
            continue
        acq = None
        for row in args.rows:
            key = cache_key(p.name, row, model_name, tuned_n.get(p.bubbles),
                            _params(row, args.model, tuned_n, p.bubbles)[1])
            if key in cache:
                results.setdefault((p.bubbles, p.noise_db), {}).setdefault(row, []).append(cache[key])
                cached_rows.add(row)
                continue
            if args.only_cached:
                continue
            acq = acq or fs.load(p)
            rec = evaluate_piece(acq, row, args.model, tuned_n, p.bubbles)
            if args.cache:
                cache[key] = rec
                Path(args.cache).write_text(json.dumps(cache))
            results.setdefault((p.bubbles, p.noise_db), {}).setdefault(row, []).append(rec)
            print(json.dumps({"piece": p.name, "row": row, "seconds": round(rec["seconds"], 1),
                              "vessel_dice": round(rec["vessel_dice"], 3)}), flush=True)
        loads.append(os.getloadavg()[0])
    wall = time.perf_counter() - t0
    if not results:
        print(f"no frozen set piece in {fs.DATA_DIR}: run `python bench/ulm_frozen_set.py generate` first")
        return 2

    table, summary = [], {}
    for (b, nd), rows in sorted(results.items()):
        for row in args.rows:
            if row not in rows:
                continue
            m = pooled(rows[row])
            summary[f"{b:g}/{nd:g}/{row}"] = m
            n_label = (str(tuned_n.get(b)) if row == "rs-tuned" else "40" if row == "3dml-v0" else "count net")
            table.append([f"{b:g}", f"{nd:g}", LABELS[row], n_label, f"{m['frames']}", f"{m['jaccard']:.3f}",
                          f"{m['jaccard_tracked']:.3f}", f"{m['vessel_dice']:.3f}", f"{m['ssim_vessel']:.3f}",
                          f"{m['ssim']:.4f}", f"{m['frames_per_s']:.1f}"])
    from report import markdown_table, write_section

    lines = []
    for (b, nd), rows in sorted(results.items()):
        s = {row: pooled(v) for row, v in rows.items()}
        if b >= 100 and "3dml" in s and "rs" in s:
            win_raw = s["3dml"]["jaccard"] > s["rs"]["jaccard"]
            win_tr = s["3dml"]["jaccard_tracked"] > s["rs"]["jaccard_tracked"]
            lines.append(f"- {b:g}/frame, {nd:g} dB: `3dml` vs `rs` (no options): raw Jaccard "
                         f"{s['3dml']['jaccard']:.3f} vs {s['rs']['jaccard']:.3f} ({'beats' if win_raw else 'DOES NOT beat'}), "
                         f"tracked {s['3dml']['jaccard_tracked']:.3f} vs {s['rs']['jaccard_tracked']:.3f} "
                         f"({'beats' if win_tr else 'DOES NOT beat'}).")
        for row, what in (("3dml", "default"), ("3dml-fp32", "`--precision fp32`"), ("3dml-i3", "`--window-stride 3`")):
            if row not in s or "3dml-sliding" not in s:
                continue
            d_raw = s[row]["jaccard"] - s["3dml-sliding"]["jaccard"]
            d_tr = s[row]["jaccard_tracked"] - s["3dml-sliding"]["jaccard_tracked"]
            ratio = s[row]["frames_per_s"] / s["3dml-sliding"]["frames_per_s"]
            lines.append(f"- {b:g}/frame, {nd:g} dB: {what} vs the old path (same checkpoint and post-processing): "
                         f"raw Jaccard {d_raw:+.3f}, tracked {d_tr:+.3f}, frames/s × {ratio:.1f}"
                         + timing_provenance(cached_rows, (row, "3dml-sliding")))
    st = fs.status()
    made = sum(1 for q in fs.pieces("test") if q.path.exists())
    missing = "" if made == fs.TEST_PIECES * len(fs.BUBBLES) * len(fs.NOISE_DB) else (
        f" **Incomplete set: {made} of {fs.TEST_PIECES * len(fs.BUBBLES) * len(fs.NOISE_DB)} test acquisitions were "
        f"generated when this was written** (the frames column says what each row saw; missing: "
        f"{', '.join(m for m in st['missing'] if m.startswith('test'))}).")
    body = (
        fs.description() + missing + f" Model `{model_name}`. "
        f"RS fixed N per concentration tuned on {args.val_frames}-frame fast-simulator validation acquisitions "
        f"(`bench_ulm_accuracy.tune_n`): {json.dumps({f'{k:g}': v for k, v in tuned_n.items()})}. torch threads "
        f"{args.threads}; load average {min(loads):.1f}–{max(loads):.1f} (shared machine: frames/s are "
        f"comparable within this table only); wall time {wall / 60:.1f} min.\n\n"
        + markdown_table(["bubbles/frame", "noise dB", "method", "N per frame", "frames", "Jaccard raw",
                          "Jaccard tracked", "vessel Dice", "vessel SSIM", "SSIM", "frames/s"], table)
        + "\n\n" + "\n".join(lines) + "\n"
    )
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "tuned_n": {f"{k:g}": v for k, v in tuned_n.items()},
                                               "per_piece": {f"{b:g}/{nd:g}": v for (b, nd), v in results.items()}},
                                              indent=1))
    if not args.no_write:
        write_section("ulm_accuracy_frozen", "ULM accuracy on the frozen pymust-formed set", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
