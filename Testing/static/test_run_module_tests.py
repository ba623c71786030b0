"""The in-Slicer test runner, driven with a stand-in Slicer executable that records its arguments."""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "Slicer" / "run_module_tests.py"


def _load_runner():
    spec = importlib.util.spec_from_file_location("ultrasound_ai_run_module_tests", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rmt = _load_runner()


@pytest.fixture
def fake_slicer(tmp_path):
    """A 'Slicer' that logs its argv and fails when the --python-code names a module called Broken."""
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "Slicer"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "code = sys.argv[sys.argv.index('--python-code') + 1]\n"
        "print('Ran 1 test' if 'Broken' not in code else 'FAILED (failures=1)')\n"
        "sys.exit(1 if 'Broken' in code else 0)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def _module(root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / f"{name}.py").write_text("")
    return root / name


def test_runs_each_module_in_slicer_and_reports(tmp_path, fake_slicer, capsys):
    slicer, log = fake_slicer
    good, broken = _module(tmp_path, "GoodModule"), _module(tmp_path, "BrokenModule")
    report = tmp_path / "report.json"
    code = rmt.main(["--slicer", str(slicer), "--xvfb", "no", "--report", str(report), str(good), str(broken)])
    assert code == 1
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2
    first = calls[0]
    assert first[:3] == ["--testing", "--no-main-window", "--no-splash"]
    assert first[first.index("--additional-module-paths") + 1] == str(good)
    python_code = first[first.index("--python-code") + 1]
    assert python_code == f"import slicer.testing; slicer.testing.runUnitTest({[str(good)]!r}, 'GoodModule')"
    results = {r["module"]: r for r in json.loads(report.read_text())["results"]}
    assert results["GoodModule"]["status"] == "passed" and results["BrokenModule"]["status"] == "failed"
    assert "FAILED (failures=1)" in results["BrokenModule"]["output_tail"]
    out = capsys.readouterr().out
    assert "summary" in out and "BrokenModule" in out


def test_all_passing_exits_zero(tmp_path, fake_slicer):
    slicer, _ = fake_slicer
    assert rmt.main(["--slicer", str(slicer), "--xvfb", "no", str(_module(tmp_path, "GoodModule"))]) == 0


def test_xvfb_wrapping_and_missing_inputs(tmp_path, fake_slicer):
    slicer, _ = fake_slicer
    cmd = rmt.slicer_command(str(slicer), tmp_path / "GoodModule", xvfb=True)
    assert Path(cmd[0]).name == "xvfb-run" and cmd[1] == "-a" and cmd[3] == str(slicer)
    assert rmt.main(["--slicer", str(tmp_path / "nope"), "--xvfb", "no", str(_module(tmp_path, "M"))]) == 2
    assert rmt.main(["--slicer", str(slicer), str(tmp_path / "NotAModule")]) == 2
