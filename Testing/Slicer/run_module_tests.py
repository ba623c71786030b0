"""Run each module's self-test (its `<Module>Test` class) inside a real 3D Slicer, and report.

For every module folder present (UltrasoundAI, UltrasoundAIRegistration, UltrasoundAIULM, or the ones
given), this starts

    Slicer --testing --no-main-window --additional-module-paths <module folder>
           --python-code "import slicer.testing; slicer.testing.runUnitTest([<module>], '<Module>')"

(under `xvfb-run -a` on Linux without a display), as ctest runs a module's tests: the module is loaded
from this checkout, its Lib package puts the repository root (the engine) on sys.path, unittest runs
each test_* method on its own, and Slicer exits with the tests' status. See README.md beside this file.

    python Testing/Slicer/run_module_tests.py [--slicer PATH] [--report FILE.json] [MODULE_DIR ...]

Exit status: 0 all passed, 1 a test failed or timed out, 2 Slicer or a module folder was not found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULES = ("UltrasoundAI", "UltrasoundAIRegistration", "UltrasoundAIULM")


@dataclass
class ModuleResult:
    module: str
    status: str  # "passed", "failed", "timeout"
    exit_code: int | None
    seconds: float
    command: list[str]
    output_tail: str


def find_slicer(explicit: str | None = None) -> str | None:
    """The Slicer launcher: --slicer, then $SLICER_EXECUTABLE, then `Slicer` on PATH."""
    for candidate in (explicit, os.environ.get("SLICER_EXECUTABLE")):
        if candidate:
            path = Path(candidate).expanduser()
            return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which("Slicer")


def module_dirs(given: list[Path] | None = None) -> list[Path]:
    if given:
        return [Path(d).resolve() for d in given]
    return [REPO_ROOT / m for m in MODULES if (REPO_ROOT / m / f"{m}.py").is_file()]


def python_code(module_dir: Path) -> str:
    """What slicer_add_python_unittest runs: only the module's folder on sys.path (its Lib package finds
    the engine) and the module name, so unittest loads every test_* of its Test class on its own."""
    return f"import slicer.testing; slicer.testing.runUnitTest({[str(module_dir)]!r}, {module_dir.name!r})"


def needs_xvfb() -> bool:
    return platform.system() == "Linux" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")


def slicer_command(slicer: str, module_dir: Path, xvfb: bool) -> list[str]:
    cmd = [slicer, "--testing", "--no-main-window", "--no-splash",
           "--additional-module-paths", str(module_dir), "--python-code", python_code(module_dir)]
    if xvfb:
        xvfb_run = shutil.which("xvfb-run") or "xvfb-run"
        cmd = [xvfb_run, "-a", "--server-args=-screen 0 1280x1024x24"] + cmd
    return cmd


def run_module(slicer: str, module_dir: Path, xvfb: bool, timeout_s: float) -> ModuleResult:
    cmd = slicer_command(slicer, module_dir, xvfb)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", timeout=timeout_s, cwd=str(REPO_ROOT))
        code, output = proc.returncode, proc.stdout
        status = "passed" if code == 0 else "failed"
    except subprocess.TimeoutExpired as exc:
        code, status = None, "timeout"
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
    return ModuleResult(module_dir.name, status, code, round(time.monotonic() - start, 1), cmd,
                        "\n".join(output.splitlines()[-40:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the UltrasoundAI module self-tests inside 3D Slicer.")
    parser.add_argument("modules", nargs="*", type=Path, help="module folders (default: every one present)")
    parser.add_argument("--slicer", help="the Slicer launcher (default: $SLICER_EXECUTABLE, then Slicer on PATH)")
    parser.add_argument("--xvfb", choices=["auto", "yes", "no"], default="auto",
                        help="wrap in xvfb-run (auto: on Linux without a display)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per module (default 1800)")
    parser.add_argument("--report", type=Path, help="also write the results as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    dirs = module_dirs(args.modules)
    missing = [d for d in dirs if not (d / f"{d.name}.py").is_file()]
    if missing:
        print(f"not a module folder (no <name>/<name>.py): {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if not dirs:
        print("no module folders present: nothing to test", file=sys.stderr)
        return 0
    slicer = find_slicer(args.slicer)
    if slicer is None and not args.dry_run:
        print("Slicer not found: pass --slicer /path/to/Slicer or set SLICER_EXECUTABLE", file=sys.stderr)
        return 2
    xvfb = args.xvfb == "yes" or (args.xvfb == "auto" and needs_xvfb())
    if args.dry_run:
        for d in dirs:
            print(subprocess.list2cmdline(slicer_command(slicer or "Slicer", d, xvfb)))
        return 0

    results = []
    for d in dirs:
        print(f"== {d.name}: running {d.name}Test in {slicer}", flush=True)
        r = run_module(slicer, d, xvfb, args.timeout)
        results.append(r)
        print(f"   {r.status} ({r.seconds} s, exit {r.exit_code})", flush=True)
        if r.status != "passed":
            print("   " + r.output_tail.replace("\n", "\n   "), flush=True)

    width = max(len(r.module) for r in results)
    print("\nsummary")
    for r in results:
        print(f"  {r.module:<{width}}  {r.status:<7}  {r.seconds:>7.1f} s")
    if args.report:
        sys.path.insert(0, str(REPO_ROOT))
        from ultrasound_ai.core.atomic import atomic_output

        with atomic_output(args.report) as tmp:
            tmp.write_text(json.dumps({"slicer": slicer, "results": [asdict(r) for r in results]}, indent=2))
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
