"""Benchmark the selective scan: the engine's chunked scan against mambapy's parallel scan (and mamba_ssm).

ms per call (best and median of --repeats after a warm-up) at a few sizes, float32, B = 1, delta through
softplus with a bias, D and z gating as a Mamba block uses them, no autograd, for:

- the engine's `selective_scan_chunked` (chunk 64: cumulative log-decay sums inside a chunk, state carried);
- mambapy's Blelloch parallel scan (`mambapy.pscan.pscan`, PyPI `mambapy`) composed as mambapy's
  `MambaBlock.selective_scan` does: it materialises [B, L, D, N] decays and increments;
- the sequential reference loop (`selective_scan_ref`), for L <= 4096;
- on CUDA, mamba_ssm's kernel where it imports (else the row reads "not measured"), with the largest
  relative difference from the engine's scan.

The ratio column is the engine's best time over mambapy's best time measured in the same run (goal: <= 0.5 at
D = 64, L = 4096). "Largest tensor" is the biggest intermediate each one allocates (counted with a torch
dispatch mode in one extra call): the engine's is one chunk, whatever L. Inputs: torch.manual_seed(0)
normals; A = -[1..N] (Mamba's S4D-real init). Writes the "selective_scan" section of BENCHMARKS.md.

    python bench/bench_selective_scan.py [--quick] [--threads 1] [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from ultrasound_ai.nn import selective_scan as ss  # noqa: E402

SIZES = [(64, 16, 1024), (64, 16, 4096), (128, 16, 4096), (64, 8, 16384)]
QUICK_SIZES = [(16, 8, 256)]
SEQUENTIAL_MAX_L = 4096


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(d, n, L, device="cpu"):
    torch.manual_seed(0)
    u, delta, z = torch.randn(1, d, L), torch.randn(1, d, L), torch.randn(1, d, L)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C = torch.randn(1, n, L), torch.randn(1, n, L)
    # softplus(delta - 4) ~ 0.02: Mamba's initial step sizes
    args = (u, delta - 4.0, A, B, C, torch.ones(d), z, torch.zeros(d))
    return tuple(t.to(device) for t in args)


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The selective scan as mambapy computes it (MambaBlock.selective_scan + the SiLU(z) gate), on the
    engine's [B, D, L] layout; None when mambapy is not installed."""
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None
    dl = F.softplus(delta + delta_bias[None, :, None]).transpose(1, 2)  # [B, L, D]
    x = u.transpose(1, 2)
    decay = torch.exp(dl.unsqueeze(-1) * A)  # [B, L, D, N]
    increment = dl.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(decay, increment)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def mambapy_available() -> bool:
    return importlib.util.find_spec("mambapy") is not None


class LargestTensor(TorchDispatchMode):
    """Records the size of the largest tensor any torch operation returns inside the block."""

    def __enter__(self):
        self.max_bytes = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


def largest_tensor_mb(fn) -> float:
    with LargestTensor() as probe:
        fn()
    return probe.max_bytes / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two sizes only (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    report = _report_module()
    # One host core drives a CUDA device; on CPU the scan uses --threads cores.
    args = report.parse_bench_args(ap, argv, cores=lambda a: 1 if a.device == "cuda" else a.threads)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.exit(2, f"{ap.prog}: --device cuda: no CUDA device here\n")
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    kernel_note = ("not measured: no CUDA device" if dev.type != "cuda"
                   else None if ss.mamba_ssm_available() else "not measured: mamba_ssm does not import here")
    rows = []
    with torch.no_grad():
        for d, n, L in (QUICK_SIZES if args.quick else SIZES):
            x = make_inputs(d, n, L, dev)

            def engine():
                return ss.selective_scan_chunked(*x, True, chunk_size=64)

            t_eng = report.repeat(engine, args.repeats, sync=sync)
            row = [str(d), str(n), str(L)] + report.timing_cells(t_eng)
            if mambapy_available():
                t_mp = report.repeat(lambda: mambapy_scan(*x), args.repeats, sync=sync)
                diff = float((mambapy_scan(*x) - engine()).abs().max() / engine().abs().max())
                row += report.timing_cells(t_mp) + [f"{t_eng.best / t_mp.best:.2f}", f"{diff:.1e}"]
            else:
                row += ["not measured: mambapy is not installed (`pip install mambapy`)"] + ["—"] * 3
            if L <= SEQUENTIAL_MAX_L:
                t_seq = report.repeat(lambda: ss.selective_scan_ref(*x, True), 1, sync=sync)
                row += [f"{1e3 * t_seq.best:,.1f}", f"{t_seq.best / t_eng.best:.1f}×"]
            else:
                row += ["—", "—"]
            if kernel_note is None:
                t_k = report.repeat(lambda: ss.selective_scan(*x, True, backend="mamba_ssm"), args.repeats,
                                    sync=sync)
                kdiff = float((ss.selective_scan(*x, True, backend="mamba_ssm") - engine()).abs().max()
                              / engine().abs().max())
                row += [f"{1e3 * t_k.best:,.2f} ({t_eng.best / t_k.best:.1f}× faster than the engine; "
                        f"max rel. diff {kdiff:.1e})"]
            else:
                row += [kernel_note]
            if dev.type == "cpu":
                row += [f"{largest_tensor_mb(engine):.1f}",
                        f"{largest_tensor_mb(lambda: mambapy_scan(*x)):.1f}" if mambapy_available() else "—"]
            else:
                row += ["—", "—"]
            rows.append(row)
            print(" | ".join(row), flush=True)

    header = ["D", "N", "L", "engine chunked ms (best)", "engine ms (median)", "mambapy pscan ms (best)",
              "mambapy ms (median)", "engine / mambapy time", "max rel. diff", "sequential loop ms",
              "engine × faster than loop", "mamba_ssm kernel ms", "engine largest tensor (MB)",
              "mambapy largest tensor (MB)"]
    body = (
        f"Selective scan, float32, batch 1, softplus(delta + bias), D and z gating, no autograd, on "
        f"{'CPU with ' + str(args.threads) + ' torch thread' + ('s' if args.threads > 1 else '') if dev.type == 'cpu' else 'CUDA'}"
        f"; {args.repeats} timed calls after a warm-up (the sequential loop: one call). Engine = "
        "`selective_scan_chunked` (chunk 64); mambapy = its Blelloch `pscan` composed as its "
        "`MambaBlock.selective_scan`, measured in the same run. Goal: engine / mambapy time ≤ 0.5 at D = 64, "
        "L = 4096, in bounded memory (the engine's largest tensor is one chunk's, whatever L; mambapy's grows "
        "with L).\n\n"
        + report.markdown_table(header, rows) + "\n"
    )
    print(body)
    if not args.no_write:
        report.write_section("selective_scan", "Selective scan: engine vs mambapy (and mamba_ssm)", body,
                             device=args.device)
    else:
        report.end_section()


if __name__ == "__main__":
    main()
