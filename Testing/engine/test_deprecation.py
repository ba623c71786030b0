"""Old names kept for one release: a moved module's old path is the same module (with a warning), and a
renamed flag's old spelling sets the same option (with a warning on stderr, never on stdout)."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

from ultrasound_ai.core.deprecation import add_argument

MOVED = {
    "ultrasound_ai.freehand.fima_model": "ultrasound_ai.freehand.fima.model",
    "ultrasound_ai.freehand.fima_align": "ultrasound_ai.freehand.fima.align",
    "ultrasound_ai.freehand.moglo_method": "ultrasound_ai.freehand.moglo.method",
    "ultrasound_ai.freehand.simulator": "ultrasound_ai.freehand.simulation.simulator",
    "ultrasound_ai.freehand.benchmark_set": "ultrasound_ai.freehand.simulation.benchmark_set",
}


def test_old_module_paths_are_the_new_modules():
    # A fresh interpreter: the warning is raised once, at the first import of an old path.
    code = ("import importlib, json, sys, warnings\n"
            "out = []\n"
            "for old, new in json.loads(sys.argv[1]).items():\n"
            "    module = importlib.import_module(new)\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        warnings.simplefilter('always')\n"
            "        alias = importlib.import_module(old)\n"
            "    out.append([alias is module, [str(w.message) for w in caught if w.category is DeprecationWarning]])\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(MOVED)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [[True, [f"{old} moved to {new}; the old path goes in the next release"]]
                                      for old, new in MOVED.items()]


def test_private_names_follow_the_alias():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = importlib.import_module("ultrasound_ai.freehand.moglo_training")
    assert old is importlib.import_module("ultrasound_ai.freehand.moglo.training")
    assert callable(old._pool_from_sweeps)  # what `import *` would have missed


def test_deprecated_flag_spelling_sets_the_same_option_and_warns(capsys):
    p = argparse.ArgumentParser(prog="tool")
    add_argument(p, "--quiet", deprecated=("--no-progress",), action="store_true", help="no progress bar")
    add_argument(p, "--checkpoint", deprecated=("--checkpoints", "--model"), nargs="+", help="weights")
    assert p.parse_args(["--no-progress", "--model", "a.pt"]) == argparse.Namespace(quiet=True, checkpoint=["a.pt"])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "tool: warning: --no-progress is deprecated" in captured.err and "use --quiet" in captured.err
    assert "--model is deprecated" in captured.err and "use --checkpoint" in captured.err
    assert p.parse_args(["--quiet", "--checkpoint", "b.pt"]).checkpoint == ["b.pt"]
    assert capsys.readouterr().err == ""
    assert "(--no-progress: deprecated spelling)" in " ".join(p.format_help().split())
