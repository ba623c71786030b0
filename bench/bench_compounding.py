"""Benchmark compounding: 480x640 uint8 frames of a 1000-frame sweep into a 0.5 mm grid.

Measures frames/s (best and median of --repeats runs) and peak memory of `reconstruct_volume` (mean, max,
latest) on CPU with 2 torch threads and 1 thread (and on CUDA when available), each against a plain torch
`index_add_` pixel-nearest-neighbour insert (float32 pixel -> voxel mapping, boolean mask, two index_add_
calls per chunk) timed in the same run with the same setting, and writes the "compounding" sections of
BENCHMARKS.md. Waits for free cores first (bench/report.py: --allow-busy, --quiet-timeout).

    python bench/bench_compounding.py [--devices cpu|cuda] [--threads 2,1] [--repeats 5]

Data (frozen): frames = numpy default_rng(0) uniform uint8 [N, 480, 640], 0.15 mm pixels; poses = a
linear sweep of 0.1 mm per frame out of plane (100 mm over 1000 frames) with 0.2 mm lateral drift
over the sweep, tilting 0.02 degrees per frame (20 degrees in all) and rolling 0.005 degrees per frame.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ultrasound_ai.core import geometry  # noqa: E402
from ultrasound_ai.freehand import compounding  # noqa: E402

H, W = 480, 640
PIXEL_SPACING = (0.15, 0.15)
VOXEL_MM = 0.5


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep_poses(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    params = np.stack([0.2 * i / max(n - 1, 1), np.zeros(n), 0.1 * i,  # tx, ty, tz (mm)
                       0.02 * i, 0.0 * i, 0.005 * i], axis=1)  # rotations about x, y, z (degrees)
    return geometry.params_to_matrix(params, "xyz", True)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms on a thread."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def plain_index_add(frames, tforms, grid, device, chunk_frames=8):
    """The straightforward torch insert the fast path is compared with (pixel nearest neighbour, mean)."""
    import torch

    nk, nj, ni = grid.shape_kji
    acc = torch.zeros(nk * nj * ni, dtype=torch.float32, device=device)
    cnt = torch.zeros(nk * nj * ni, dtype=torch.float32, device=device)
    r, c = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    pix = torch.stack([c * PIXEL_SPACING[0], r * PIXEL_SPACING[1], torch.zeros_like(r), torch.ones_like(r)], -1)
    pix = pix.reshape(-1, 4).float()
    M = torch.from_numpy(grid.lps_to_ijk()[None] @ tforms).float().to(device)
    shape = torch.tensor([ni, nj, nk], device=device)
    for f0 in range(0, len(frames), chunk_frames):
        f1 = min(len(frames), f0 + chunk_frames)
        idx = torch.round(torch.einsum("bij,pj->bpi", M[f0:f1, :3], pix)).long()  # [B, P, 3] (i, j, k)
        ok = ((idx >= 0) & (idx < shape)).all(-1)
        lin = (idx[..., 2] * nj + idx[..., 1]) * ni + idx[..., 0]
        vals = torch.from_numpy(np.ascontiguousarray(frames[f0:f1])).to(device).reshape(f1 - f0, -1).float()
        acc.index_add_(0, lin[ok], vals[ok])
        cnt.index_add_(0, lin[ok], torch.ones_like(vals[ok]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return acc, cnt


def run(device_name: str, frames, tforms, grid, repeats: int, baseline_frames: int, report, label: str = "",
        memory: bool = True):
    """Rows for one device / thread setting: each compounding mode, then the plain insert it is compared with."""
    import torch

    from ultrasound_ai.core.device import resolve_device

    device = resolve_device(device_name)
    n = len(frames)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        """Wall and CPU Timing of `repeats` runs (after one warm-up) and the peak memory of the first."""
        wall, cpu, mem = report.Timing(), report.Timing(), 0.0
        fn()
        for i in range(repeats):
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as rss:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync()
                wall.seconds.append(time.perf_counter() - t0)
                cpu.seconds.append(time.process_time() - c0)
            if i == 0:  # later passes reuse memory the allocator kept: their RSS growth means nothing
                mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss.extra_mb
        return wall, cpu, mem

    nb = min(n, baseline_frames)
    base_wall, base_cpu, base_mem = timed(lambda: plain_index_add(frames[:nb], tforms[:nb], grid, device))
    rows = []
    for mode in compounding.COMPOUNDING_MODES:
        wall, cpu, mem = timed(lambda: compounding.reconstruct_volume(frames, tforms, PIXEL_SPACING, grid=grid,
                                                                        compounding=mode, device=device))
        best, median = wall.rate(n)
        speedup = best / base_wall.rate(nb)[0]
        rows.append([f"reconstruct_volume {mode}{label}", f"{best:,.0f}", f"{median:,.0f}", f"{speedup:.1f}×",
                     f"{n / cpu.best:,.0f}", f"{mem:.0f}" if memory else "—"])
        print(f"{device}{label}: {mode}: {best:.0f} frames/s (median {median:.0f}, {speedup:.1f}x the plain "
              f"insert), {n / cpu.best:.0f} frames/CPU-s, peak +{mem:.0f} MB", flush=True)
    best, median = base_wall.rate(nb)
    rows.append([f"plain index_add_ (float32 mapping, mean){label}", f"{best:,.0f}", f"{median:,.0f}", "1.0×",
                 f"{nb / base_cpu.best:,.0f}", f"{base_mem:.0f}" if memory else "—"])
    print(f"{device}{label}: plain index_add_: {best:.0f} frames/s (median {median:.0f}), "
          f"{nb / base_cpu.best:.0f} frames/CPU-s, peak +{base_mem:.0f} MB", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="frames in the sweep (default 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (best and median reported)")
    parser.add_argument("--baseline-frames", type=int, default=200,
                        help="frames timed for the slow plain index_add_ baseline (default 200)")
    parser.add_argument("--threads", default="2,1",
                        help="torch CPU thread counts to measure, comma-separated (default 2,1)")
    parser.add_argument("--devices", default="auto",
                        help="cpu, cuda or both comma-separated (default auto: cpu, and cuda when available)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    report = _report_module()
    args = report.parse_bench_args(parser, argv)

    import torch

    threads = [int(t) for t in str(args.threads).split(",")]
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto"
               else [d.strip() for d in args.devices.split(",") if d.strip()])
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.frames, H, W), dtype=np.uint8)
    tforms = sweep_poses(args.frames)
    grid = compounding.output_grid_for(tforms, (H, W), PIXEL_SPACING, spacing_mm=VOXEL_MM)
    nk, nj, ni = grid.shape_kji
    print(f"grid {ni}x{nj}x{nk} voxels of {VOXEL_MM} mm, {args.frames} frames {W}x{H}", flush=True)

    for k, dev in enumerate(devices):
        if k:  # a second device is a second section: its own load record
            report.begin_section(1, allow_busy=args.allow_busy, timeout_s=args.quiet_timeout)
        if dev == "cpu":
            rows = []
            for i, t in enumerate(threads):
                torch.set_num_threads(t)
                rows += run(dev, frames, tforms, grid, args.repeats, args.baseline_frames, report,
                            label=f", {t} thread{'s' if t > 1 else ''}", memory=i == 0)
            torch.set_num_threads(threads[0])  # the section's machine line reports the thread count
        else:
            rows = run(dev, frames, tforms, grid, args.repeats, args.baseline_frames, report)
        mem_note = ("peak CUDA memory allocated" if dev == "cuda"
                    else "peak resident memory above the level before the call (frames already in memory; "
                         "measured on the first thread setting only, later ones reuse the allocator's memory)")
        goal = "≥ 10,000 frames/s on a CUDA device" if dev == "cuda" else "≥ 300 frames/s on 2 CPU cores"
        body = (
            f"{args.frames} frames of {W}x{H} uint8 (0.15 mm pixels) into a {ni}x{nj}x{nk} grid of {VOXEL_MM} mm "
            f"({ni * nj * nk / 1e6:.1f} M voxels), pixel nearest neighbour; {args.repeats} timed runs after a "
            f"warm-up, best and median"
            + (f"; CPU with {' and '.join(map(str, threads))} torch threads" if dev == "cpu" else "")
            + f". The baseline, a plain torch `index_add_` insert (float32 pixel -> voxel mapping, boolean mask), "
            f"is measured in the same run with the same setting on the first {min(args.frames, args.baseline_frames)} "
            "frames; \"× plain\" is best frames/s over the baseline's best.\n\n"
            + report.markdown_table(["method", "frames/s (best)", "frames/s (median)", "× plain insert",
                                     "frames per CPU-second", "peak memory (MB)"], rows)
            + f"\n\nMemory: {mem_note}. Frames: numpy default_rng(0) uniform uint8; poses: 0.1 mm/frame "
            "linear sweep (100 mm per 1000 frames) tilting 0.02°/frame and rolling 0.005°/frame "
            f"(`bench/bench_compounding.py`, `sweep_poses`). Speed goal: {goal}. Frames per CPU-second is "
            "process CPU time over all threads (best run)."
        )
        if not args.no_write:
            report.write_section("compounding", "Compounding (volume reconstruction)", body, device=dev)
        else:
            report.end_section()
    return 0


if __name__ == "__main__":
    sys.exit(main())
