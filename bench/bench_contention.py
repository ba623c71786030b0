"""Threads under contention: FiMA and compounding with two competing busy processes (BENCHMARKS.md).

A Slicer user's machine always runs something beside a job. This measures how much two busy processes
(started here, each a pure-Python spin loop that keeps one core busy) slow down two CLI workloads:

  fima         ultrasound-ai freehand reconstruct SWEEP --method fima --out-sweep EST.h5
  compounding  ultrasound-ai freehand reconstruct SWEEP --method tracked --out-volume VOL.nrrd

each under three thread settings:

  policy       the CLI's default (ultrasound_ai.core.threads): threads = the cores the process may use,
               OpenMP threads wait passively
  slicer-job   the setting of a job started from Slicer: --threads (usable cores - 1), passive wait
  before       what the engine did before the thread policy: torch's default threads (the core count)
               and libgomp's default 3 ms spin-wait (GOMP_SPINCOUNT=300000, which is what an unset
               OMP_WAIT_POLICY means to libgomp)

Every run is a fresh process (the thread settings are read when OpenMP starts); its wall time covers
the command from `main()` on (torch import, reading, the work, writing), its CPU time is the child's.
A contended run that takes longer than --cap-factor x its quiet time is stopped and reported as
"> N s". The machine must be quiet at the start (report.parse_bench_args waits for it); the busy
processes are this benchmark's own and are stopped before the section is written.

    python bench/bench_contention.py [--frames 60] [--cap-factor 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load_report():
    spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()

# The child: the CLI's main() in a fresh process, timed from there; prints one JSON line.
CHILD = """
import json, resource, sys, time
from ultrasound_ai.cli import main
start = time.perf_counter()
code = main(json.loads(sys.argv[1]))
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
import torch
print(json.dumps({"code": code, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "torch_threads": torch.get_num_threads()}))
"""

# A busy loop that ends by itself once this benchmark is gone (even if it was killed).
SPIN = (
    "import os\n"
    "parent, n = os.getppid(), 0\n"
    "while n % 1000000 or os.getppid() == parent:\n"
    "    n += 1\n"
)


def usable_cores() -> int:
    sys.path.insert(0, str(ROOT))
    from ultrasound_ai.core.threads import usable_cores as cores

    return cores()


def torch_default_threads() -> int:
    """torch's own default: the physical cores of the machine, whatever the process may use."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def settings() -> dict[str, tuple[list[str], dict[str, str | None]]]:
    """name -> (global CLI options, environment changes) of each thread setting."""
    clean = {"OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None, "OPENBLAS_NUM_THREADS": None,
             "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    return {
        "policy": ([], dict(clean)),
        "slicer-job": (["--threads", str(max(1, usable_cores() - 1))], dict(clean)),
        "before": (["--threads", str(torch_default_threads())], dict(clean, GOMP_SPINCOUNT="300000")),
    }


def workloads(sweep: Path, out: Path) -> dict[str, list[str]]:
    return {
        "fima": ["freehand", "reconstruct", str(sweep), "--method", "fima", "--out-sweep", str(out / "est.h5"),
                 "--quiet", "--device", "cpu"],
        "compounding": ["freehand", "reconstruct", str(sweep), "--method", "tracked", "--out-volume",
                        str(out / "vol.nrrd"), "--spacing", "0.2", "--quiet", "--device", "cpu"],
    }


def run_child(argv: list[str], env_changes: dict, timeout_s: float | None) -> dict:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"stopped_after_s": time.perf_counter() - start}
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class BusyProcesses:
    """`n` spin loops, each keeping one core busy, for the duration of a `with` block."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "BusyProcesses":
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.n)]
        time.sleep(1.0)  # let the scheduler spread them
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()


def cell(run: dict) -> str:
    if "stopped_after_s" in run:
        return f"> {run['stopped_after_s']:.0f} (stopped)"
    return f"{run['wall_s']:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60, help="frames of the simulated sweep (default 60)")
    ap.add_argument("--busy", type=int, default=2, help="competing busy processes (default 2)")
    ap.add_argument("--cap-factor", type=float, default=6.0,
                    help="stop a contended run after this many times its quiet time (default 6)")
    ap.add_argument("--only", choices=["fima", "compounding"], help="run one workload only")
    args = report.parse_bench_args(ap, argv, cores=os.cpu_count() or 1)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as scratch:
        scratch = Path(scratch)
        sweep = scratch / "sweep.h5"
        run_child(["freehand", "simulate", str(sweep), "--frames", str(args.frames), "--seed", "11", "--quiet"],
                  {}, None)
        jobs = workloads(sweep, scratch)
        for name, command in jobs.items():
            if args.only and name != args.only:
                continue
            for setting, (options, env) in settings().items():
                quiet = run_child(options + command, env, None)
                cap = max(60.0, args.cap_factor * quiet["wall_s"])
                with BusyProcesses(args.busy):
                    busy = run_child(options + command, env, cap)
                slowdown = (f"{busy['wall_s'] / quiet['wall_s']:.2f}×" if "wall_s" in busy
                            else f"> {busy['stopped_after_s'] / quiet['wall_s']:.1f}×")
                rows.append([name, setting, quiet["torch_threads"], f"{quiet['wall_s']:.1f}", f"{quiet['cpu_s']:.1f}",
                             cell(busy), f"{busy['cpu_s']:.1f}" if "cpu_s" in busy else "-", slowdown])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)

    body = (
        f"Two workloads of the CLI on a simulated sweep ({args.frames} frames, seed 11), each in a fresh "
        f"process, quiet and then beside {args.busy} busy processes this benchmark starts itself (pure-Python "
        "spin loops, one core each). Settings: `policy` = the CLI default (threads = usable cores, OpenMP "
        "passive wait); `slicer-job` = a job started from Slicer (usable cores - 1); `before` = the engine "
        "before the thread policy (torch's default thread count and libgomp's default 3 ms spin-wait, "
        "GOMP_SPINCOUNT=300000). Times are wall seconds from `main()` on (torch import, I/O and the work); "
        "slowdown = contended / quiet in the same run; the target is about 2× or less. A contended run "
        f"longer than {args.cap_factor:g}× its quiet time is stopped.\n\n"
        + report.markdown_table(["workload", "setting", "threads", "quiet s", "quiet CPU s", "contended s",
                                 "contended CPU s", "slowdown"], rows)
    )
    report.write_section("contention", "Threads under contention (FiMA, compounding)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
