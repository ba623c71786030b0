"""The ULM localizer registry: a `Localizer` protocol that registration checks, labels and tooltips, and
the command line's --method choices and help built from it (docs/CONTRIBUTING.md, "Add a ULM localizer")."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from ultrasound_ai.cli import build_parser
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm import pipeline


def _process_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    for name in ("ulm", "process"):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _method_choices() -> list:
    return next(a for a in _process_parser()._actions if "--method" in a.option_strings).choices


def test_builtin_localizers_have_labels_and_tooltips():
    assert pipeline.localizer_names()[:3] == ["rs", "wa", "3dml"]
    assert pipeline.localizer_info("3dml").label == "3DML-ResNet"
    for name in pipeline.localizer_names():
        info = pipeline.localizer_info(name)
        assert info.label.strip() and info.tooltip.strip()
    with pytest.raises(InputError, match="unknown localization method 'nope'"):
        pipeline.localizer_info("nope")


class _Centre:
    """A localizer that reports one bubble per frame at the brightest pixel (a real, crude detector)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def push(self, frames, start):
        rows = []
        for k, frame in enumerate(np.abs(frames)):
            z, x = np.unravel_index(int(np.argmax(frame)), frame.shape)
            rows.append([start + k, self.ctx.origin_mm[0] + z * self.ctx.pixel_size_mm[0],
                         self.ctx.origin_mm[1] + x * self.ctx.pixel_size_mm[1], float(frame[z, x])])
        return np.asarray(rows, dtype=np.float64).reshape(-1, 4)

    def finish(self):
        return np.zeros((0, 4))


def test_a_registered_localizer_appears_in_the_ulm_cli_choices():
    pipeline.register_localizer("centre-test", _Centre, label="Brightest pixel", tooltip="one bubble per frame")
    try:
        p = _process_parser()
        assert "centre-test" in _method_choices()
        assert "Brightest pixel" in p.format_help()
        assert pipeline.localizer_info("centre-test").tooltip == "one bubble per frame"
    finally:
        pipeline.unregister_localizer("centre-test")
    assert "centre-test" not in _method_choices()


def test_register_localizer_checks_the_localizer_protocol():
    class NoFinish:
        def __init__(self, ctx):
            pass

        def push(self, frames, start):
            return np.zeros((0, 4))

    with pytest.raises(InputError, match="finish"):
        pipeline.register_localizer("no-finish-test", NoFinish, label="x", tooltip="x")
    with pytest.raises(InputError, match="callable"):
        pipeline.register_localizer("not-callable-test", 42, label="x", tooltip="x")
    assert "no-finish-test" not in pipeline.localizer_names()
    assert isinstance(_Centre(None), pipeline.Localizer) and not isinstance(NoFinish(None), pipeline.Localizer)


def test_the_pipeline_runs_a_registered_localizer_and_refuses_a_non_localizer(tiny_acq):
    pipeline.register_localizer("centre-test", _Centre, label="Brightest pixel", tooltip="one bubble per frame")
    pipeline.register_localizer("broken-test", lambda ctx: object(), label="Broken", tooltip="returns no localizer")
    try:
        res = pipeline.process_acquisition(tiny_acq, "centre-test", dict(svd_cutoff=None, bubbles_per_frame=1,
                                                                         min_track_length=2))
        # One row per frame, at the brightest pixel of the frame.
        assert res.localizations.shape[0] == tiny_acq.n_frames
        assert np.array_equal(res.localizations[:, 0], np.arange(tiny_acq.n_frames))
        with pytest.raises(RuntimeError, match="Localizer protocol"):
            pipeline.process_acquisition(tiny_acq, "broken-test", dict(svd_cutoff=None, bubbles_per_frame=1))
    finally:
        pipeline.unregister_localizer("centre-test")
        pipeline.unregister_localizer("broken-test")
