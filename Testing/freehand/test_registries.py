"""Method names, labels and tooltips have one source: the registries. Adding a pose method or a ULM
localizer is one registration; the command line (choices and help) follows without other edits
(docs/CONTRIBUTING.md lists the files to touch)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from ultrasound_ai.cli import build_parser
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand import methods as registry
from ultrasound_ai.freehand.methods import PoseEstimate, PoseMethod, method_info, register_method


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


class _Still(PoseMethod):
    """A pose method that says the probe never moved (a real, if poor, estimate)."""

    def _estimate(self, sweep, ctx):
        return PoseEstimate(np.repeat(np.eye(4)[None], sweep.n_frames, 0))


def test_every_builtin_method_has_a_label_and_a_tooltip():
    for name in registry.available_methods():
        info = method_info(name)
        assert info.name == name and info.label.strip() and info.tooltip.strip()
    assert method_info("fima").label == "FiMA" and method_info("moglo").label == "MoGLo-Net"
    with pytest.raises(InputError, match="unknown pose method 'nope'"):
        method_info("nope")


def test_a_registered_method_appears_in_the_cli_choices_and_help(small_sweep, tmp_path, capsys):
    sweep, _ = small_sweep
    before = _option(_subparser(build_parser(), "freehand", "reconstruct"), "--method")
    assert before.choices == registry.available_methods() and "still" not in before.choices
    register_method("still", _Still, label="Still probe", tooltip="assumes the probe never moved")
    try:
        p = _subparser(build_parser(), "freehand", "reconstruct")
        action = _option(p, "--method")
        assert "still" in action.choices
        assert "still = Still probe" in " ".join(p.format_help().split())
        with pytest.raises(InputError, match="already registered"):
            register_method("still", _Still, label="again", tooltip="again")
        # The new name runs end to end through the command line.
        from ultrasound_ai.cli import main
        from ultrasound_ai.io.sweep import write_sweep

        src, out = tmp_path / "sweep.h5", tmp_path / "est.h5"
        write_sweep(sweep, src)
        capsys.readouterr()
        assert main(["freehand", "reconstruct", str(src), "--method", "still", "--out-sweep", str(out),
                     "--no-progress"]) == 0
        assert out.exists()
        # The old spelling of --quiet still works for one release, and says so.
        assert "--no-progress is deprecated" in capsys.readouterr().err
    finally:
        registry.unregister_method("still")
    assert "still" not in _option(_subparser(build_parser(), "freehand", "reconstruct"), "--method").choices


def test_register_method_refuses_bad_labels():
    with pytest.raises(InputError, match="label"):
        register_method("unlabelled", _Still, label="", tooltip="x")
    assert "unlabelled" not in registry.available_methods()
