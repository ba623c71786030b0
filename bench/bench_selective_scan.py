"""Benchmark the selective scan on CPU: sequential reference loop vs the chunked parallel scan.

ms per call and tokens/s at a few sizes (float32, B = 1, delta through softplus with a bias, D and z
gating as a Mamba block uses them), plus the forward time of the FiMA "shipped" preset on a 64-frame
124x130 window. Inputs: torch.manual_seed(0) normals; A = -[1..N] (Mamba's S4D-real init). Writes the
"selective_scan" section of BENCHMARKS.md.

    python bench/bench_selective_scan.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from ultrasound_ai.nn.selective_scan import selective_scan_chunked, selective_scan_ref  # noqa: E402


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(d, n, L):
    torch.manual_seed(0)
    u, delta, z = torch.randn(1, d, L), torch.randn(1, d, L), torch.randn(1, d, L)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C = torch.randn(1, n, L), torch.randn(1, n, L)
    return u, delta - 4.0, A, B, C, torch.ones(d), z, torch.zeros(d)  # softplus(delta - 4) ~ 0.02


def _time(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [(64, 16, 1024), (128, 16, 4096), (64, 8, 16384)] if not args.quick else [(16, 8, 512), (32, 8, 2048)]
    rows = []
    with torch.no_grad():
        for d, n, L in sizes:
            x = _inputs(d, n, L)
            row = [f"{d}", f"{n}", f"{L}"]
            t_ref = _time(lambda: selective_scan_ref(*x, True), 1)
            row += [f"{1e3 * t_ref:.1f}", f"{L / t_ref:,.0f}"]
            for chunk in (32, 64, 128):
                t = _time(lambda: selective_scan_chunked(*x, True, chunk_size=chunk), 3)
                row += [f"{1e3 * t:.1f} ({t_ref / t:.1f}x)"]
            t64 = _time(lambda: selective_scan_chunked(*x, True, chunk_size=64), 1)
            row.insert(5, f"{L / t64:,.0f}")
            rows.append(row)
            print(row, flush=True)

        from ultrasound_ai.freehand.fima_model import FimaNet, count_parameters, make_config

        net = FimaNet(make_config("shipped", "fima")).eval()
        frames = torch.randint(0, 256, (1, 65, 124, 130), dtype=torch.uint8)
        acc, ang = torch.randn(1, 64, 4, 3), torch.randn(1, 64, 4, 3)
        t_ship = _time(lambda: net(frames, acc, ang), 1)
        print("shipped forward", t_ship, flush=True)

    report = _report_module()
    body = (
        "Selective scan (float32, batch 1, softplus(delta + bias), D, z gating; no autograd). Sequential = "
        "`selective_scan_ref` (a Python loop over time); chunked = `selective_scan_chunked` (cumulative "
        "log-decay sums inside each chunk, state carried between chunks). Best of 3 calls (the machine was shared with other jobs: figures are noisy).\n\n"
        + report.markdown_table(
            ["D", "N", "L", "sequential ms", "sequential tokens/s", "chunked tokens/s (chunk 64)",
             "chunk 32 ms", "chunk 64 ms", "chunk 128 ms"], rows)
        + f"\n\nFiMA `shipped` preset ({count_parameters(net):,} parameters, ReM+F with 4 IMUs): forward of one "
          f"64-pair window of 124x130 frames, no_grad: {t_ship:.2f} s ({1e3 * t_ship / 64:.0f} ms per frame pair).\n"
    )
    if not args.no_write:
        report.write_section("selective_scan", "Selective scan and FiMA forward", body)
    print(body)


if __name__ == "__main__":
    main()
