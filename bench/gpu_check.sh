#!/usr/bin/env bash
# One-command GPU check: the gpu-marked tests and the CUDA rows of the benchmarks, writing the GPU sections
# of BENCHMARKS.md. About 8 minutes on one CUDA device. From the repository root:
#
#   bash bench/gpu_check.sh             # on a CUDA machine
#   bash bench/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU at tiny sizes, into a
#                                       # scratch BENCHMARKS file (what the test runs)
#
# It needs python3 with torch, numpy, scipy, h5py, scikit-image, psutil, pyyaml, tqdm and pytest; the
# repository need not be installed (PYTHONPATH is set). A step that needs a module this machine lacks
# (SimpleITK, vtk, slicer) is reported as skipped with the reason; a failed step does not stop the others.
# Summary: one line per step (ok / FAILED / skipped / TIMED OUT, seconds) and the log folder; the exit
# status is 1 when a step failed or timed out.
#
# Environment: PYTHON (interpreter; default .venv/bin/python if present, else python3), GPU_CHECK_LOGS
# (log folder), GPU_CHECK_HIDE_MODULES (comma-separated modules to treat as missing, to rehearse a bare
# machine), ULTRASOUND_AI_BENCH_ALLOW_BUSY=0 (refuse to measure while other processes hold host cores).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ULTRASOUND_AI_BENCH_QUIET_TIMEOUT=${ULTRASOUND_AI_BENCH_QUIET_TIMEOUT:-60}
# A lent machine is ours alone, and /proc may read oddly in its sandbox: measure, and let a section say
# when other processes did hold host cores, rather than refuse.
export ULTRASOUND_AI_BENCH_ALLOW_BUSY=${ULTRASOUND_AI_BENCH_ALLOW_BUSY:-1}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.txt"
: > "$SUMMARY"

# Runs a script or "-m module" with the modules in GPU_CHECK_HIDE_MODULES made unimportable.
PRELUDE='import runpy, sys
for m in filter(None, __import__("os").environ.get("GPU_CHECK_HIDE_MODULES", "").split(",")):
    sys.modules[m.strip()] = None
args = sys.argv[1:]
if args[0] == "-m":
    sys.argv = args[1:]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")'

FAILED=0
step() {  # step NAME SECONDS ARGS... : run one step with a time limit, record its line in the summary
  local name=$1 limit=$2; shift 2
  local log="$LOGS/$name.log" start rc status missing
  echo "== $name (limit ${limit} s)"
  start=$(date +%s)
  timeout "$limit" "$PY" -c "$PRELUDE" "$@" > "$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  missing=$(grep -oE "No module named '(SimpleITK|vtk|slicer)[^']*'" "$log" | head -n 1)
  if [ $rc -eq 0 ]; then status="ok"
  elif [ $rc -eq 124 ]; then status="TIMED OUT after ${limit} s"; FAILED=1
  elif grep -qE "^(FAILED|=+ .*[0-9]+ failed)" "$log"; then status="FAILED (exit $rc): tests failed"; FAILED=1
  elif [ -n "$missing" ]; then status="skipped (all or part): needs a module this machine lacks ($missing)"
  else status="FAILED (exit $rc)"; FAILED=1; fi
  printf '%-22s %-60s %4d s\n' "$name" "$status" "$(( $(date +%s) - start ))" >> "$SUMMARY"
}

ENV_CHECK='import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
from ultrasound_ai.nn.selective_scan import mamba_ssm_available
print("mamba_ssm:", "imports" if mamba_ssm_available() else "does not import (its rows read not measured)")
for m in ("SimpleITK", "vtk", "slicer", "mambapy", "pytest"):
    print(m, "present" if importlib.util.find_spec(m) else "absent")'
printf '%s\n' "$ENV_CHECK" > "$LOGS/env_check.py"

GPU_TESTS=$(grep -rlE "mark\.gpu" Testing --include='test_*.py' | sort)

if [ $DRY_RUN -eq 1 ]; then
  export ULTRASOUND_AI_BENCHMARKS_FILE=${ULTRASOUND_AI_BENCHMARKS_FILE:-$LOGS/BENCHMARKS.dry-run.md}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export ULTRASOUND_AI_BENCH_PROBE_S=0.5
  step environment 60 "$LOGS/env_check.py"
  # --collect-only: on a CPU the gpu tests are skipped anyway; this checks that they import and select.
  step gpu_tests 120 -m pytest -q -m gpu --collect-only -p no:cacheprovider $GPU_TESTS
  step compounding 120 bench/bench_compounding.py --devices cpu --frames 12 --baseline-frames 6 --repeats 1 \
    --threads 1
  step selective_scan 120 bench/bench_selective_scan.py --quick --repeats 1
  step cuda_stages 120 bench/bench_cuda_stages.py --device cpu --quick --repeats 1 --cpu-repeats 1
  step fima_sweep 240 bench/bench_fima_memory.py --device cpu --configs tiny --frames 24 --baseline-frames 12 \
    --long-frames 0 --align-configs --threads 1
else
  step environment 30 "$LOGS/env_check.py"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False); use --dry-run on a CPU" >&2
    exit 2
  fi
  step gpu_tests 120 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors $GPU_TESTS
  step compounding 60 bench/bench_compounding.py --devices cuda --repeats 5
  step selective_scan 60 bench/bench_selective_scan.py --device cuda --repeats 10
  step cuda_stages 100 bench/bench_cuda_stages.py --device cuda
  # The paper preset on a 600-frame sweep (goal: <= 0.5 s), against one pass per window on 180 frames.
  step fima_sweep 120 bench/bench_fima_memory.py --device cuda --configs paper --frames 600 --baseline-frames 180 \
    --long-frames 0 --align-configs
fi

echo
echo "gpu_check summary (logs in $LOGS):"
cat "$SUMMARY"
[ $DRY_RUN -eq 1 ] && echo "dry run: sections written to $ULTRASOUND_AI_BENCHMARKS_FILE"
exit $FAILED
