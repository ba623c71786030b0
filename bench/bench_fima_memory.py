"""FiMA inference memory and speed on full-size sweeps (248 x 260 px at 0.15 mm, 4 IMUs), streamed vs whole window.

For each size preset (tiny, shipped, paper; ReM+F with adaptive fusion) the whole `fima` pose method runs
on one sweep in a fresh process (so peak memory is that configuration's alone): frames resampled onto the
network's grid, each window streamed through the encoder `auto_pair_chunk` pairs at a time (SSM-F's scan
and convolution states carried from chunk to chunk), the poses chained. The baseline, measured in the same
run on --baseline-frames frames, encodes each window in one pass (`pair_chunk` past the window: SSM-F scans
all of a window's tokens at once, as before streaming); the streamed run on the same frames gives the speed
ratio. A --long-frames sweep of the paper preset shows the bound does not grow with the sweep. Online
alignment (gradients through the fusion, SSM-C and head on the cached features, `fima.align`) is measured
separately. Peak resident memory is the child's ``ru_maxrss``; "before" is its resident memory once torch
is imported, the model loaded and the sweep made. On CUDA the peak is the device's allocated memory.
Weights are random (a checkpoint written with its card): speed and memory do not depend on their values.

    python bench/bench_fima_memory.py [--configs tiny shipped paper] [--frames 180] [--baseline-frames 60]
        [--long-frames 600] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

FULL_SHAPE = (248, 260)
FULL_SPACING_MM = 0.15
GIB = 1024 ** 3


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


WHOLE_WINDOW = 10**6  # a pair_chunk past any window: one pass over the window (the baseline)


def child(preset: str, frames: int, align: bool, threads: int, mode: str = "streamed", device: str = "cpu") -> dict:
    """Run in a fresh process: one sweep through the fima method; returns timings and memory.

    mode: "streamed" (the method's default `auto_pair_chunk`) or "whole" (each window in one pass).
    """
    import numpy as np
    import torch

    from ultrasound_ai.freehand.fima.method import FimaMethod, auto_pair_chunk
    from ultrasound_ai.freehand.fima.model import FimaNet, count_parameters, make_config
    from ultrasound_ai.io.sweep import Sweep
    from ultrasound_ai.models.checkpoint import save_checkpoint

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = make_config(preset, "fima")
    net = FimaNet(cfg).eval()
    n_parameters = count_parameters(net)
    card = {"name": f"fima_{preset}_random", "method": "fima", "variant": "fima",
            "description": "random weights for the memory benchmark",
            "configuration": {"preset": preset, **cfg.to_dict()},
            "input": {"frame_shape_hw": list(cfg.frame_shape), "pixel_spacing_mm": [cfg.pixel_spacing_mm] * 2,
                      "window_frames": [int(v) for v in cfg.window_frames], "n_imus": cfg.n_imus,
                      "online_alignment": True},
            "training": {"data": "none (random weights)"}, "metrics": {}, "default": False}
    rng = np.random.default_rng(0)
    # Rayleigh-like speckle: content does not change the cost, only the shape does. Drawn frame by frame:
    # float64 draws of a whole long sweep would set the process's high-water mark before inference starts.
    speckle = np.empty((frames, *FULL_SHAPE), dtype=np.uint8)
    for i in range(frames):
        speckle[i] = np.clip(rng.rayleigh(40.0, FULL_SHAPE), 0, 255)
    sweep = Sweep(frames=speckle,
                  pixel_spacing_xy=(FULL_SPACING_MM, FULL_SPACING_MM), frame_rate_hz=20.0,
                  imu_acc=(rng.normal(0, 0.05, (4, frames, 3)) + [0.0, 0.0, 9.81]).astype(np.float32),  # ~1 g
                  imu_euler_deg=np.cumsum(rng.normal(0, 0.05, (4, frames, 3)), axis=1).astype(np.float32))
    chunk = auto_pair_chunk(cfg.frame_shape) if mode == "streamed" else WHOLE_WINDOW
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / "fima_bench.pt"
        save_checkpoint(net.state_dict(), pt, card)
        del net
        method = FimaMethod()
        # Warm-up on a short sweep (lazy imports, allocator, kernels) before the measured run.
        short = Sweep(frames=sweep.frames[:4], pixel_spacing_xy=sweep.pixel_spacing_xy, frame_rate_hz=20.0,
                      imu_acc=sweep.imu_acc[:, :4], imu_euler_deg=sweep.imu_euler_deg[:, :4])
        method.estimate(short, device=device, checkpoint=str(pt), online_align=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = _rss_bytes()
        t = time.perf_counter()
        est = method.estimate(sweep, device=device, checkpoint=str(pt), online_align=align, pair_chunk=chunk)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert est.tforms.shape == (frames, 4, 4)
    return {"preset": preset, "align": align, "mode": mode, "pair_chunk": chunk if mode == "streamed" else None,
            "parameters": n_parameters, "grid": list(cfg.frame_shape), "grid_mm": cfg.pixel_spacing_mm,
            "window": min(cfg.window_frames[1], frames), "frames": frames, "seconds": seconds,
            "ms_per_frame": 1e3 * seconds / frames, "before_gib": before / GIB, "peak_gib": peak / GIB,
            "device_peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None, "threads": threads,
            "device": device}


def run_child(preset, frames, align, mode, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads), "--device", args.device,
           "--child", preset, str(frames), "1" if align else "0", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{preset} ({mode}, {frames} frames, align {align}) failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(r), flush=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "shipped", "paper"], choices=["tiny", "shipped", "paper"])
    ap.add_argument("--frames", type=int, default=180)
    ap.add_argument("--baseline-frames", type=int, default=60,
                    help="frames of the same-run comparison of streamed and whole-window encoding (0: none)")
    ap.add_argument("--long-frames", type=int, default=600,
                    help="frames of a long sweep, streamed (0: none)")
    ap.add_argument("--long-config", default=None, choices=["tiny", "shipped", "paper"],
                    help="preset of the long sweep (default: the last of --configs)")
    ap.add_argument("--baseline-configs", nargs="*", default=None,
                    help="presets of the streamed vs whole-window comparison (default: the same as --configs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--align-configs", nargs="*", default=None,
                    help="presets also measured with online alignment (default: the same as --configs)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    ap.add_argument("--child", nargs=4, metavar=("PRESET", "FRAMES", "ALIGN", "MODE"), help=argparse.SUPPRESS)
    if "--child" in (sys.argv[1:] if argv is None else argv):
        args = ap.parse_args(argv)
        preset, frames, align, mode = args.child
        print(json.dumps(child(preset, int(frames), align == "1", args.threads, mode, args.device)))
        return 0
    report = _report_module()
    # Memory is the claim here, the seconds a side figure; still measured with the cores free.
    args = report.parse_bench_args(ap, argv, cores=lambda a: 1 if a.device == "cuda" else a.threads)

    results = [run_child(p, args.frames, False, "streamed", args) for p in args.configs]
    largest = args.long_config or args.configs[-1]
    if args.long_frames:
        results.append(run_child(largest, args.long_frames, False, "streamed", args))
    align_configs = args.configs if args.align_configs is None else args.align_configs
    results += [run_child(p, args.frames, True, "streamed", args) for p in align_configs]
    pairs = []
    if args.baseline_frames:
        for p in (args.configs if args.baseline_configs is None else args.baseline_configs):
            pairs.append((run_child(p, args.baseline_frames, False, "streamed", args),
                          run_child(p, args.baseline_frames, False, "whole", args)))

    report_rows, cuda = [], args.device == "cuda"
    header = ["preset", "parameters", "network grid", "window (frames)", "frames", "encoding", "online alignment",
              "s per sweep", "ms per frame", "RSS before (GiB)", "peak RSS (GiB)", "added by inference (GiB)"]
    if cuda:
        header.append("peak CUDA allocated (GiB)")

    def row(r, speedup=""):
        enc = f"streamed, {r['pair_chunk']} pairs" if r["mode"] == "streamed" else "whole window"
        cells = [f"`{r['preset']}`", f"{r['parameters']:,}", f"{r['grid'][0]}x{r['grid'][1]} @ {r['grid_mm']} mm",
                 str(r["window"]), str(r["frames"]), enc + speedup, "on" if r["align"] else "off",
                 f"{r['seconds']:.1f}", f"{r['ms_per_frame']:.1f}", f"{r['before_gib']:.2f}", f"{r['peak_gib']:.2f}",
                 f"{r['peak_gib'] - r['before_gib']:.2f}"]
        return cells + ([f"{r['device_peak_gib']:.2f}"] if cuda else [])

    report_rows = [row(r) for r in results]
    for streamed, whole in pairs:
        ratio = whole["seconds"] / streamed["seconds"]
        report_rows.append(row(streamed, f" ({ratio:.2f}× the whole-window speed)"))
        report_rows.append(row(whole, " (baseline)"))

    def peak_of(r):
        return r["device_peak_gib"] if cuda else r["peak_gib"]

    streamed_rows = [r for r in results if not r["align"]]
    worst = max((peak_of(r) for r in streamed_rows), default=float("nan"))
    over = [f"`{r['preset']}` at {r['frames']} frames ({peak_of(r):.2f} GiB)" for r in streamed_rows
            if peak_of(r) * GIB > 8e9]
    what = "peak CUDA memory allocated" if cuda else "peak RSS"
    verdict = (f"Streamed, without online alignment, the largest {what} is {worst:.2f} GiB (bound: 8 GB = 7.45 GiB): "
               + ("within it" if not over else "above it: " + ", ".join(over)) + ".")
    long_rows = [r for r in streamed_rows if r["frames"] == args.long_frames and r["preset"] == largest]
    short_rows = [r for r in streamed_rows if r["frames"] == args.frames and r["preset"] == largest][:1]
    if long_rows and short_rows:
        s, lg = short_rows[0], long_rows[0]
        verdict += (f" The `{largest}` preset adds {s['peak_gib'] - s['before_gib']:.2f} GiB over its start on "
                    f"{args.frames} frames and {lg['peak_gib'] - lg['before_gib']:.2f} GiB on {args.long_frames} "
                    f"(peaks {peak_of(s):.2f} and {peak_of(lg):.2f} GiB; windows of {lg['window']} frames); "
                    f"{lg['seconds']:.1f} s per {args.long_frames} frames.")
    body = (f"Sweeps at {FULL_SHAPE[0]}x{FULL_SHAPE[1]} px, {FULL_SPACING_MM} mm (the paper's frames), 4 IMUs, through "
            "the whole `fima` method on "
            + ("CUDA" if cuda else f"CPU ({args.threads} torch thread{'s' if args.threads > 1 else ''})")
            + " (resampling onto the network grid, windows encoded, poses chained), each row in a fresh process; "
            "ReM+F configuration, random weights. Peak RSS is the process's high-water mark (torch, the sweep and the "
            "model included). Streamed: each window goes through the encoder `auto_pair_chunk` pairs at a time, "
            "SSM-F's scan and convolution states carried across chunks (the same features as one pass: "
            "`Testing/freehand/test_fima_model.py`); whole window: one pass per window, SSM-F scanning all of its "
            f"tokens at once, the baseline (measured in the same run on {args.baseline_frames} frames).\n\n"
            + report.markdown_table(header, report_rows)
            + f"\n\n{verdict} Online alignment keeps the encoder frozen and back-propagates only through the "
            "fusion, SSM-C and head on the cached per-pair features, so it adds little memory; its cost is the "
            "extra Adam steps (time), bounded by align_steps x one decode of the sweep's features.\n")
    print(body)
    if not args.no_write:
        import torch

        torch.set_num_threads(args.threads)  # the children's setting, which the section's header reports
        report.write_section("fima_memory", "FiMA inference memory and speed on full-size sweeps", body,
                             device=args.device)
        print(f"wrote the fima_memory section of {report.BENCHMARKS}")
    else:
        report.end_section()
    return 0


if __name__ == "__main__":
    sys.exit(main())
