"""Run every benchmark script in bench/ (each writes its own section of BENCHMARKS.md).

    python bench/run_all.py [--only compounding selective_scan ...] [--allow-busy] [--quiet-timeout SECONDS]

Each timing benchmark first waits for the free cores it uses and refuses (exit 3) a machine that stays
busy (bench/report.py); --allow-busy and --quiet-timeout are passed on to every script.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
scripts = sorted(here.glob("bench_*.py"))
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--only", nargs="+", metavar="NAME", choices=[s.stem[len("bench_"):] for s in scripts],
                help="run these benchmarks only (names without bench_ and .py)")
ap.add_argument("--allow-busy", action="store_true", help="measure even on a busy machine (sections say so)")
ap.add_argument("--quiet-timeout", type=float, help="seconds each benchmark waits for free cores")
args = ap.parse_args()
env = dict(os.environ)
if args.allow_busy:
    env["ULTRASOUND_AI_BENCH_ALLOW_BUSY"] = "1"
if args.quiet_timeout is not None:
    env["ULTRASOUND_AI_BENCH_QUIET_TIMEOUT"] = str(args.quiet_timeout)
failed = []
for script in scripts:
    if args.only and script.stem[len("bench_"):] not in args.only:
        continue
    print(f"== {script.name}", flush=True)
    if subprocess.run([sys.executable, str(script)], env=env).returncode != 0:
        failed.append(script.name)
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")
