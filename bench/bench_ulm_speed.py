"""ULM speed per stage beside `ulmtools` (Rust, PyPI) on the same simulated data, with errors.

Stages: SVD clutter filter (Gram matrix + torch, blocks of 800 and 1000 frames) vs numpy's full SVD;
detection + radial-symmetry localization vs `ulmtools.detect_and_localize_peaks`; tracking vs
`ulmtools.link_points`. Frames are 84 x 143 (the PALA grid), 40 bubbles per frame. Writes the
`ulm_speed` section of BENCHMARKS.md.

3DML-ResNet rows: the whole pipeline (`process_acquisition`: SVD, network, tracking, rendering) on
`--dml-frames` frames at `--dml-bubbles` per frame: the default ("inner" windows: the 8-frame windows
slid by 6, each frame estimated once away from a window edge, the ResNet in int8, one window worker per
torch thread), the same in fp32, the same in fp32 on one worker (torch on all threads: the default before the
workers and int8), inner windows slid by 3 (two estimates
averaged), the previous default (windows slid by 2, estimates averaged), tiled windows, and the old path (the paper's 8-frame windows slid by one
frame, plain layout and arithmetic), the same checkpoint and post-processing, in the same run; raw
and tracked Jaccard of each say whether the accuracy is equal (`--dml-frames 0` skips them).

    python bench/bench_ulm_speed.py [--frames 1000] [--threads 2] [--dml-frames 400] [--no-write]

`pip install ulmtools` (the optional extra `bench`) for the comparison columns.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _best(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _numpy_svd_filter(block: np.ndarray, k: int) -> np.ndarray:
    t = block.shape[0]
    u, s, vh = np.linalg.svd(block.reshape(t, -1).T, full_matrices=False)
    kept = (u[:, k:] * s[k:]) @ vh[k:]
    return kept.T.reshape(block.shape)


def _dml_rows(args, notes: list) -> list:
    """Whole-pipeline 3DML-ResNet frames/s, the window layouts against the old path (same run)."""
    from ultrasound_ai.ulm.metrics import evaluate_result
    from ultrasound_ai.ulm.pipeline import UlmParams, process_acquisition
    from ultrasound_ai.ulm.simulator import UlmSimConfig, simulate_acquisition

    acq = simulate_acquisition(UlmSimConfig(n_frames=args.dml_frames, bubbles_per_frame=args.dml_bubbles,
                                            clutter_db=20.0, noise_db=args.noise_db, seed=args.seed + 1))
    from bench_ulm_frozen import old_path_factory, one_worker_factory

    from ultrasound_ai.ulm.pipeline import register_localizer

    register_localizer("3dml-old", old_path_factory())
    register_localizer("3dml-1worker", one_worker_factory())
    out, speed = [], {}
    labels = {"old": "3DML-ResNet whole pipeline, old path (stride 1, plain arithmetic)",
              "inner": "3DML-ResNet whole pipeline, default (`inner` windows, int8, one window worker per torch "
                       "thread)",
              "fp32": "3DML-ResNet whole pipeline, `--precision fp32` (`inner` windows, one window worker per torch "
                      "thread)",
              "inner1": "3DML-ResNet whole pipeline, `inner` windows in fp32 on one worker (torch on all threads: the "
                        "default before the workers and int8)",
              "inner3": "3DML-ResNet whole pipeline, `--window-stride 3` (inner windows, 2 estimates per frame)",
              "sliding": "3DML-ResNet whole pipeline, `--window-mode sliding` (stride 2, the previous default)",
              "tiled": "3DML-ResNet whole pipeline, `--window-mode tiled`",
              "gil5ms": "3DML-ResNet whole pipeline, default with Python's GIL switch interval left at 5 ms (the "
                        "default shortens it to 0.5 ms while window workers run)"}
    import ultrasound_ai.ulm.dml_inference as dml_inference

    gil = dml_inference.GIL_SWITCH_INTERVAL_S
    for mode in ("old", "inner", "gil5ms", "fp32", "inner1", "inner3", "sliding", "tiled"):
        dml_inference.GIL_SWITCH_INTERVAL_S = None if mode == "gil5ms" else gil
        method, params = ("3dml-old", UlmParams(device="cpu")) if mode == "old" else \
            ("3dml-1worker", UlmParams(device="cpu")) if mode == "inner1" else \
            ("3dml", UlmParams(device="cpu", precision="fp32")) if mode == "fp32" else \
            ("3dml", UlmParams(device="cpu", window_stride=3)) if mode == "inner3" else \
            ("3dml", UlmParams(device="cpu")) if mode == "gil5ms" else \
            ("3dml", UlmParams(device="cpu", window_mode=mode))
        t, res = _best(lambda: process_acquisition(acq, method, params), 1 if mode == "old" else args.repeats)
        ev = evaluate_result(res, acq.gt_positions, acq.wavelength_mm, acq.frame_rate_hz)
        speed[mode] = acq.n_frames / t
        label = labels[mode]
        out.append([label, f"{speed[mode]:,.1f}", "–", "", f"raw Jaccard {ev['raw']['jaccard']:.3f}, tracked "
                    f"{ev['tracked']['jaccard']:.3f}; {args.dml_frames} frames, {args.dml_bubbles:g} bubbles/frame"])
    dml_inference.GIL_SWITCH_INTERVAL_S = gil
    out.append(_network_alone_row(acq, speed, notes))
    notes.append(f"3DML-ResNet: the default (`inner`, int8) runs at {speed['inner'] / speed['old']:.1f}× (with the GIL "
                 f"switch interval left at 5 ms {speed['gil5ms'] / speed['old']:.1f}×; in fp32 "
                 f"{speed['fp32'] / speed['old']:.1f}×, in fp32 on one window worker {speed['inner1'] / speed['old']:.1f}×), "
                 f"inner windows "
                 f"slid by 3 at {speed['inner3'] / speed['old']:.1f}×, sliding windows "
                 f"at stride 2 at {speed['sliding'] / speed['old']:.1f}× and tiled windows at "
                 f"{speed['tiled'] / speed['old']:.1f}× the old path (same checkpoint, same post-processing, same run; "
                 f"old: 1 run, others: best of {args.repeats}).")
    return out


def _network_alone_row(acq, speed: dict, notes: list) -> list:
    """The default's windows through the network alone (no localization, tracking or rendering): the most
    the whole pipeline could reach with everything else free, against the old path."""
    from ultrasound_ai.ulm.clutter import svd_filter
    from ultrasound_ai.ulm.dml_inference import DmlLocalizationRunner, torch_threads_for_workers

    env = np.abs(svd_filter(acq.iq, 4)).astype(np.float32)

    def network_only():
        r = DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, device="cpu").runner
        with torch_threads_for_workers(r.workers):
            return r.push(env) + r.finish()

    t, est = _best(network_only, 2)
    c = DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, device="cpu").net.config
    z, x = env.shape[1:]
    w, n = c.width, c.window_frames
    # Multiply-adds per pixel: the 3D ResNet's 3x3x3 convolutions up to the last (1 -> w, 2 * blocks + 1 of
    # w -> w) run on every frame of a window, and "inner" windows pass each frame n / (n - 2) times; the last
    # one (w -> 3) and the counting network's 2D ones (full, 1/4 and 1/16 of the pixels) only on the frames
    # a window keeps: once per frame.
    k = c.counter_width
    every = 27 * (w + (2 * c.blocks + 1) * w * w)
    kept = 27 * 3 * w + 9 * (k + 2 * k * k / 4 + 8 * k * k / 16 + 16 * k * k / 16)
    gflop = 2 * z * x * (every * n / (n - 2) + kept) / 1e9
    fps = env.shape[0] / t
    speed["network"] = fps
    notes.append(f"3DML-ResNet network alone on the default's windows: {fps:.1f} frames/s = "
                 f"{fps / speed['old']:.1f}× the old path's whole pipeline (the ceiling with localization, "
                 f"tracking and rendering free); {gflop:.2f} GFLOP per frame, {fps * gflop:.0f} GFLOP/s on the "
                 f"cores used.")
    return ["3DML-ResNet network alone (default windows, no localization / tracking)", f"{fps:,.1f}", "–", "",
            f"{gflop:.2f} GFLOP per frame, {fps * gflop:.0f} GFLOP/s; {env.shape[0]} frames"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--bubbles", type=float, default=40.0)
    ap.add_argument("--clutter-db", type=float, default=-20.0)
    ap.add_argument("--noise-db", type=float, default=-30.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--cutoff", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dml-frames", type=int, default=400, help="frames for the 3DML-ResNet rows (0 = skip)")
    ap.add_argument("--dml-bubbles", type=float, default=100.0)
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    from report import parse_bench_args

    args = parse_bench_args(ap, argv)

    import torch

    torch.set_num_threads(args.threads)
    from ultrasound_ai.ulm.clutter import svd_filter
    from ultrasound_ai.ulm.localization import localize, to_mm
    from ultrasound_ai.ulm.metrics import localization_metrics
    from ultrasound_ai.ulm.simulator import UlmSimConfig, simulate_acquisition
    from ultrasound_ai.ulm.tracking import link

    cfg = UlmSimConfig(n_frames=args.frames, bubbles_per_frame=args.bubbles, clutter_db=args.clutter_db,
                       noise_db=args.noise_db, seed=args.seed)
    acq = simulate_acquisition(cfg)
    iq, lam, pix, org = acq.iq, acq.wavelength_mm, acq.pixel_size_mm, acq.origin_mm
    T, Z, X = iq.shape
    rows, notes = [], []

    # ---- SVD clutter filter -------------------------------------------------------------------
    svd_rows = []
    for n in (800, 1000):
        if n > T:
            continue
        block = iq[:n]
        t_ours, ours = _best(lambda: svd_filter(block, args.cutoff), args.repeats)
        t_np, ref = _best(lambda: _numpy_svd_filter(block.astype(np.complex64), args.cutoff), 1)
        err = float(np.abs(ours - ref).max() / np.abs(ref).max())
        svd_rows.append([f"SVD filter, block {n} (cut {args.cutoff})", f"{n / t_ours:,.0f}", f"{n / t_np:,.0f}",
                         "numpy full SVD", f"max rel. difference {err:.1e}"])
    filtered = svd_filter(iq[: min(T, 1000)], args.cutoff) if T >= 1000 else svd_filter(iq, args.cutoff)
    env = np.abs(filtered).astype(np.float32)
    gt = acq.gt_positions
    gt = gt[gt[:, 0] < env.shape[0]]
    n_loc = env.shape[0]

    # ---- detection + localization -------------------------------------------------------------
    N = int(round(args.bubbles))
    t_rs, loc_px = _best(lambda: localize(env, N, "rs"), args.repeats)
    loc = to_mm(loc_px, pix, org)
    m_rs = localization_metrics(loc, gt, lam)
    t_wa, loc_wa = _best(lambda: localize(env, N, "wa"), args.repeats)
    m_wa = localization_metrics(to_mm(loc_wa, pix, org), gt, lam)

    def fmt(m):
        return f"Jaccard {m['jaccard']:.3f}, error {m['loc_error_lambda']:.3f} λ"

    try:
        import ulmtools
    except ImportError:
        ulmtools = None
        notes.append("ulmtools is not installed (`pip install ulmtools`): comparison columns left empty.")

    ut_rs = ut_m = None
    if ulmtools is not None:
        def ut_localize():
            out = []
            for f in range(n_loc):
                # (detect_and_localize_peaks is broken in ulmtools 0.2.0: NameError inside; detect_peaks
                # with a localization method is the same computation.)
                idx, inten = ulmtools.detect_peaks(env[f], localization_method="radial_symmetry",
                                                   localization_window_size=5, max_n_peaks_per_frame=N)
                idx = np.asarray(idx, dtype=np.float64).reshape(-1, 2)
                out.append(np.column_stack([np.full(len(idx), f), idx, np.asarray(inten, dtype=np.float64)]))
            return np.concatenate(out)

        ut_rs, ut_loc = _best(ut_localize, args.repeats)
        ut_loc = ut_loc[np.all(np.isfinite(ut_loc), axis=1)]
        ut_m = localization_metrics(to_mm(ut_loc, pix, org), gt, lam)
    rows.append(["detection + RS localization", f"{n_loc / t_rs:,.0f}",
                 f"{n_loc / ut_rs:,.0f}" if ut_rs else "–", "ulmtools RS",
                 f"ours: {fmt(m_rs)}" + (f"; ulmtools: {fmt(ut_m)}" if ut_m else "")])
    rows.append(["detection + WA localization", f"{n_loc / t_wa:,.0f}", "–", "", f"ours: {fmt(m_wa)}"])

    # ---- tracking -------------------------------------------------------------------------------
    tr_locs = np.column_stack([loc_px[:, 0], loc_px[:, 1], loc_px[:, 2]])
    t_tr, ids = _best(lambda: link(tr_locs, max_link_distance=2.0, max_gap=0, min_length=15), args.repeats)
    ut_tr = None
    if ulmtools is not None:
        per_frame = [loc_px[loc_px[:, 0] == f][:, [1, 2, 3]].astype(np.float32) for f in range(n_loc)]
        ut_tr, (pts, ends) = _best(lambda: ulmtools.link_points(per_frame, max_distance=2.0, max_skip=0), args.repeats)
        lengths = np.diff(np.concatenate([[0], np.asarray(ends, dtype=np.int64)]))
        notes.append(f"ulmtools linking (min-cost max-flow) made {len(lengths)} tracks, {int((lengths >= 15).sum())} "
                     f"of ≥ 15 points; ours (Hungarian per frame) kept {len(set(ids.tolist()) - {-1})} tracks of ≥ 15 "
                     f"points.")
    rows.append(["tracking (Hungarian, 2 px, min 15)", f"{n_loc / t_tr:,.0f}",
                 f"{n_loc / ut_tr:,.0f}" if ut_tr else "–", "ulmtools link_points",
                 f"{len(tr_locs) / n_loc:.0f} localizations per frame"])

    if args.dml_frames > 0:
        rows += _dml_rows(args, notes)

    from report import markdown_table, write_section

    table = markdown_table(["stage", "ours (frames/s)", "peer (frames/s)", "peer", "accuracy / notes"],
                           svd_rows + rows)
    body = (
        f"Data: `ultrasound_ai.ulm.simulator` version {acq.attrs.get('ulm_sim_version')}, seed {args.seed}, "
        f"{T} frames of {Z}×{X} IQ (λ = {lam * 1000:.2f} µm pixels, 1 kHz), {args.bubbles:g} bubbles per frame, "
        f"clutter {args.clutter_db:g} dB, noise {args.noise_db:g} dB. Localization and tracking run on the "
        f"SVD-filtered envelope of the first {n_loc} frames, top {N} maxima per frame, 5×5 windows; errors "
        f"against the ground truth with PALA's metrics (λ/4 true-positive radius). torch threads: "
        f"{args.threads}. Best of {args.repeats} runs (numpy SVD: 1 run).\n\n{table}\n\n"
        + "".join(f"- {n}\n" for n in notes)
    )  # the load before, during and after is the harness's Load line
    print(body)
    if not args.no_write:
        write_section("ulm_speed", "ULM speed per stage", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
