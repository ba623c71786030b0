"""CPU time of `ultrasound-ai demo` (what `make demo` runs), by stage, with and without FiMA's online alignment.

Each variant runs the demo command in a fresh child process with --threads torch threads (OMP_NUM_THREADS)
and its output not a terminal (so it prints one line per stage); the CPU time is the child's user + system
time (resource usage of children), which another job on the machine hardly changes, unlike the wall time.
Stage seconds (wall) come from the demo's metrics.json. The baseline is the demo with `--online-align`
measured in the same run. Goal: the default demo within 3 minutes of CPU time on 2 cores (the first `.venv`
set-up not counted). Writes the "demo" section of BENCHMARKS.md.

    python bench/bench_demo.py [--threads 2] [--variants default online-align]
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
VARIANTS = {"default": [], "online-align": ["--online-align"]}
GOAL_CPU_S = 180.0


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_variant(name: str, threads: int, extra: list) -> dict:
    """One demo run in a child process: CPU seconds, wall seconds and the demo's own stage seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        out = Path(tmp) / "demo-output"
        cmd = [sys.executable, "-m", "ultrasound_ai.cli", "demo", "--out", str(out)] + VARIANTS[name] + extra
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"demo ({name}) failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "metrics.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stage_lines = [line for line in proc.stdout.splitlines() if ": started" in line or ": finished in" in line]
    return {"variant": name, "cpu_s": cpu, "wall_s": wall, "stages": summary["seconds"],
            "fdr": {m: v.get("fdr_pct") for m, v in summary["metrics"].items()},
            "stage_lines": len(stage_lines), "n_frames": summary["n_frames"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the demo (default 2)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--demo-args", nargs=argparse.REMAINDER, default=[],
                    help="further arguments for the demo command (e.g. --frames 40 for a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    report = _report_module()
    # CPU time is the figure, and other jobs hardly change it: the load is recorded, not awaited.
    args = report.parse_bench_args(ap, argv, timing=False)
    results = []
    for name in args.variants:
        r = run_variant(name, args.threads, args.demo_args)
        results.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in results if r["variant"] == "online-align"), None)
    methods = sorted({m for r in results for m in r["stages"]} - {"simulate"})
    header = ["demo", "CPU time (s)", "× CPU time of --online-align", "wall (s)", "simulate (s)"] + \
        [f"{m} (s)" for m in methods] + [f"{m} FDR (%)" for m in methods]
    rows = []
    for r in results:
        rows.append([f"`{r['variant']}`", f"{r['cpu_s']:.1f}",
                     f"{r['cpu_s'] / base['cpu_s']:.2f}" if base else "—", f"{r['wall_s']:.1f}",
                     f"{r['stages'].get('simulate', float('nan')):.1f}"]
                    + [f"{r['stages'][m]:.1f}" if m in r["stages"] else "—" for m in methods]
                    + [f"{r['fdr'][m]:.1f}" if r["fdr"].get(m) is not None else "—" for m in methods])
    default = next((r for r in results if r["variant"] == "default"), None)
    verdict = ""
    if default:
        verdict = (f"The default demo used {default['cpu_s']:.0f} s of CPU time (goal ≤ {GOAL_CPU_S:.0f} s: "
                   f"{'met' if default['cpu_s'] <= GOAL_CPU_S else 'not met'}) and printed {default['stage_lines']} "
                   "stage lines (started / finished, one pair per stage).")
    what = (f"arguments `{' '.join(args.demo_args)}`" if args.demo_args
            else "the default methods: tracked, imu and each learned method with an installed model")
    body = (f"`ultrasound-ai demo` ({results[0]['n_frames']} simulated frames, {what}), each variant a fresh child "
            "process with "
            f"{args.threads} torch thread{'s' if args.threads > 1 else ''} and its output piped (not a terminal). CPU "
            "time = the child's user + system time; stage columns are wall seconds from the demo's metrics.json "
            "(they stretch on a loaded machine, the CPU time hardly does). `online-align` = the demo with "
            "`--online-align` (FiMA's 60 alignment steps per sweep), the baseline measured in the same run.\n\n"
            + report.markdown_table(header, rows) + f"\n\n{verdict}\n")
    print(body)
    if not args.no_write:
        report.write_section("demo", "Demo run time (make demo)", body)
    else:
        report.end_section()
    return 0


if __name__ == "__main__":
    sys.exit(main())
