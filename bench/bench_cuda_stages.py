"""Per-stage speed of the engine's networks and GPU-capable stages on a device against the same stage on CPU.

Each stage is timed on --device (best and median of --repeats after a warm-up) and on the CPU in the same
run (the baseline: same code, same inputs, every host thread), so every row gives the absolute figure and
the ratio. Weights are random (speed does not depend on their values); inputs are seeded.

- ULM SVD clutter filter (`ulm.clutter.svd_filter`, cut 4) on a block of simulated IQ frames, 84 x 143 px;
- 3DML-ResNet (`ulm.dml_resnet`, presets `shipped` and `paper`) on a batch of normalised 8- or 10-frame
  windows of 84 x 143 px (at window stride 1 one window pass per frame);
- Attention-Reg (`registration.attention_reg`, presets `original` (the paper's 32 x 96 x 96 input) and
  `half`): one stage's forward for one MRI/TRUS pair (goal on CUDA: <= 3 ms per stage).

Detection, radial-symmetry localization and tracking are numpy code (CPU only): `bench_ulm_speed.py`
times them. Writes the "cuda_stages" section for the device (GPU section on CUDA).

    python bench/bench_cuda_stages.py [--device cuda] [--quick] [--repeats 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

ULM_SHAPE = (84, 143)
ATTENTION_REG_GOAL_MS = 3.0


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(report, fn, device, repeats):
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.no_grad():
        return report.repeat(fn, repeats, sync=sync)


def stage_rows(device: torch.device, quick: bool, repeats: int, cpu_repeats: int, report) -> list:
    """[stage, unit, device best, device median, CPU best, device x CPU, note] for each stage."""
    from ultrasound_ai.registration.attention_reg import PRESETS as REG_PRESETS
    from ultrasound_ai.registration.attention_reg import build_model
    from ultrasound_ai.ulm.clutter import svd_filter
    from ultrasound_ai.ulm.dml_resnet import PRESETS as DML_PRESETS
    from ultrasound_ai.ulm.dml_resnet import DmlResNet, normalise_windows
    from ultrasound_ai.ulm.simulator import UlmSimConfig, simulate_acquisition

    cpu = torch.device("cpu")
    rows = []

    def row(name, unit, count, make_fn, note=""):
        """count: items per call (frames, windows) for a rate; None: report ms per call."""
        t_dev = _timed(report, make_fn(device), device, repeats)
        t_cpu = _timed(report, make_fn(cpu), cpu, cpu_repeats)
        if count is None:
            cells = [f"{1e3 * t_dev.best:,.2f}", f"{1e3 * t_dev.median:,.2f}", f"{1e3 * t_cpu.best:,.2f}"]
        else:
            cells = [f"{count / t_dev.best:,.0f}", f"{count / t_dev.median:,.0f}", f"{count / t_cpu.best:,.0f}"]
        rows.append([name, unit] + cells + [f"{t_cpu.best / t_dev.best:.1f}×", note])
        print(" | ".join(rows[-1]), flush=True)
        return t_dev

    # ULM: SVD clutter filter on a block of simulated frames.
    n_svd = 64 if quick else 800
    iq = simulate_acquisition(UlmSimConfig(n_frames=n_svd, bubbles_per_frame=40.0, seed=11)).iq
    row(f"ULM SVD clutter filter, block {n_svd}", "frames/s", n_svd,
        lambda dev: (lambda: svd_filter(torch.from_numpy(iq).to(dev), 4)))

    # 3DML-ResNet forward on a batch of windows.
    for preset in (("tiny",) if quick else ("shipped", "paper")):
        cfg = DML_PRESETS[preset]
        batch = 2 if quick else (4 if preset == "paper" else 16)  # the CPU baseline of `paper` is slow
        shape = (24, 40) if quick else ULM_SHAPE
        gen = torch.Generator().manual_seed(0)
        windows = normalise_windows(torch.rand(batch, cfg.window_frames, *shape, generator=gen))

        def make(dev, cfg=cfg, windows=windows):
            torch.manual_seed(0)
            net = DmlResNet(cfg).to(dev).eval()
            x = windows.to(dev)
            return lambda: net(x)

        row(f"3DML-ResNet `{preset}` ({cfg.width} ch, {cfg.blocks} blocks), {cfg.window_frames}-frame windows "
            f"of {shape[0]}x{shape[1]}, batch {batch}", "windows/s", batch, make)

    # Attention-Reg: one stage, one pair.
    for preset in (("tiny",) if quick else ("original", "half")):
        size = REG_PRESETS[preset].input_size

        def make(dev, preset=preset, size=size):
            torch.manual_seed(0)
            net = build_model(preset).to(dev).eval()
            x = torch.rand(1, 2, *size, generator=torch.Generator().manual_seed(1)).to(dev)
            return lambda: net(x)

        t = row(f"Attention-Reg `{preset}`, one stage, input {'x'.join(map(str, size))}", "ms per stage", None,
                make)
        if device.type == "cuda" and preset == "original":
            ok = 1e3 * t.best <= ATTENTION_REG_GOAL_MS
            rows[-1][-1] = f"goal ≤ {ATTENTION_REG_GOAL_MS:g} ms: {'met' if ok else 'not met'}"
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="device to time against the CPU (default cuda)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run of gpu_check.sh)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cpu-repeats", type=int, default=2)
    ap.add_argument("--benchmarks", default=None, help="write into this file instead of BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    report = _report_module()
    # The CPU baseline uses every host core.
    args = report.parse_bench_args(ap, argv, cores=os.cpu_count() or 1)
    from ultrasound_ai.core.device import resolve_device

    device = resolve_device(args.device)
    rows = stage_rows(device, args.quick, args.repeats, args.cpu_repeats, report)
    body = (
        f"Each stage on `{device}` ({args.repeats} timed calls after a warm-up, best and median) and on the CPU "
        f"in the same run ({torch.get_num_threads()} threads, {args.cpu_repeats} calls, best): the ratio is CPU "
        "best time over device best time. Random weights, seeded inputs, no autograd"
        + (" (`--quick`: tiny sizes, a dry run; the figures mean nothing)" if args.quick else "") + ".\n\n"
        + report.markdown_table(["stage", "unit", f"{device.type} (best)", f"{device.type} (median)", "CPU (best)",
                                 f"{device.type} × CPU", "note"], rows)
        + "\n\nULM detection, localization and tracking are numpy (CPU) code: see `ulm_speed`.\n"
    )
    print(body)
    if args.no_write:
        report.end_section()
    else:
        path = Path(args.benchmarks) if args.benchmarks else report.BENCHMARKS
        report.write_section("cuda_stages", "Network and filter stages on a device vs CPU", body,
                             device=str(device), path=path)
        print(f"wrote the cuda_stages section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
