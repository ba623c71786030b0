"""bench/gpu_check.sh: its CPU dry run goes through every step on a machine without the Slicer-side modules."""

import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def test_dry_run_runs_every_step_without_simpleitk_vtk_or_slicer(tmp_path):
    real = ROOT / "BENCHMARKS.md"
    before = _digest(real)
    scratch = tmp_path / "B.md"
    env = {**os.environ, "GPU_CHECK_LOGS": str(tmp_path / "logs"), "ULTRASOUND_AI_BENCHMARKS_FILE": str(scratch),
           # the lent CUDA machines have neither: rehearse that here
           "GPU_CHECK_HIDE_MODULES": "SimpleITK,vtk,slicer", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = (tmp_path / "logs" / "summary.txt").read_text().splitlines()
    steps = {line.split()[0]: line for line in summary}
    assert set(steps) == {"environment", "gpu_tests", "compounding", "selective_scan", "cuda_stages", "fima_sweep"}
    assert all(" ok " in line for line in summary), summary
    env_log = (tmp_path / "logs" / "environment.log").read_text()
    assert "SimpleITK absent" in env_log and "mamba_ssm: does not import" in env_log
    text = scratch.read_text()
    for key in ("compounding", "selective_scan", "cuda_stages", "fima_memory"):
        section = text.split(f"<!-- BEGIN {key}:cpu -->")[1].split(f"<!-- END {key}:cpu -->")[0]
        assert "Load: at the start load average" in section, key
    assert "not measured: no CUDA device" in text
    assert _digest(real) == before  # the dry run leaves the real BENCHMARKS.md alone


def test_bad_argument_exits_2():
    res = subprocess.run(["bash", str(SCRIPT), "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown argument '--fast'" in res.stderr
