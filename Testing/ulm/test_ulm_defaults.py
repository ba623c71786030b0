"""Defaults that need no guessing: with no count given, the per-frame number of detections comes from the
counting network (3dml always; rs / wa when a 3DML-ResNet model is installed, else a fixed 40), and the
result records the count used in each frame."""

import json
import shutil

import numpy as np
import pytest

from ultrasound_ai.cli import main
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.ulm_files import read_result, write_acquisition
from ultrasound_ai.models import registry
from ultrasound_ai.ulm.pipeline import FALLBACK_BUBBLES_PER_FRAME, process_acquisition


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty model search path (no shipped models, nothing in ULTRASOUND_AI_MODELS)."""
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", tmp_path / "no_shipped_models")
    monkeypatch.setenv(registry.ENV_VAR, str(d))
    return d


def _install_default(tiny_dml_checkpoint, models_dir):
    from ultrasound_ai.models.checkpoint import card_path_for

    pt = models_dir / "dml_tiny_default.pt"
    shutil.copyfile(tiny_dml_checkpoint, pt)
    card = json.loads(card_path_for(tiny_dml_checkpoint).read_text())
    card.update(name="dml_tiny_default", file=pt.name, default=True)
    card_path_for(pt).write_text(json.dumps(card))
    return pt


FAST = dict(device="cpu", max_maxima=None, min_track_length=2)


def test_classical_default_uses_the_installed_counting_network(tiny_dml_checkpoint, tiny_acq, models_dir, tmp_path,
                                                               one_torch_thread):
    from ultrasound_ai.ulm.clutter import svd_filter
    from ultrasound_ai.ulm.dml_inference import DmlFrameCounter

    pt = _install_default(tiny_dml_checkpoint, models_dir)
    res = process_acquisition(tiny_acq, "rs", dict(FAST))
    counts = DmlFrameCounter(pt, "cpu")(svd_filter(tiny_acq.iq, 4), 0)
    assert res.attrs["count_source"] == "counting network"
    np.testing.assert_array_equal(res.count_per_frame, counts)
    # A fixed N stays available and is recorded as such.
    fixed = process_acquisition(tiny_acq, "wa", dict(FAST, bubbles_per_frame=3))
    assert fixed.attrs["count_source"] == "fixed" and (fixed.count_per_frame == 3).all()
    per_frame = np.bincount(fixed.localizations[:, 0].astype(int), minlength=tiny_acq.n_frames)
    assert (per_frame <= 3).all() and per_frame.sum() > 0
    # Through the CLI with no count option: the same counts, written to the result file.
    acq_path, out = tmp_path / "a.h5", tmp_path / "r.h5"
    write_acquisition(tiny_acq, acq_path)
    assert main(["ulm", "process", str(acq_path), "--device", "cpu", "--min-track-length", "2", "--out", str(out),
                 "--quiet"]) == 0
    back = read_result(out)
    np.testing.assert_array_equal(back.count_per_frame, counts)
    assert back.attrs["count_source"] == "counting network"


def test_3dml_default_uses_its_counting_network(tiny_dml_checkpoint, tiny_acq, models_dir, one_torch_thread):
    _install_default(tiny_dml_checkpoint, models_dir)
    kw = dict(FAST, svd_cutoff=None, block_frames=10)
    res = process_acquisition(tiny_acq, "3dml", dict(kw))
    ref = process_acquisition(tiny_acq, "3dml", dict(kw, counting_network=True))
    np.testing.assert_array_equal(res.localizations, ref.localizations)
    per_frame = np.bincount(res.localizations[:, 0].astype(int), minlength=tiny_acq.n_frames)
    # 3DML-ResNet keeps exactly the counted number of pixels per frame.
    np.testing.assert_array_equal(per_frame, res.count_per_frame)
    assert res.attrs["count_source"] == "counting network"


def test_without_an_installed_model(tiny_acq, models_dir):
    res = process_acquisition(tiny_acq, "rs", dict(FAST))
    assert res.attrs["count_source"].startswith("fixed (no counting network")
    assert (res.count_per_frame == FALLBACK_BUBBLES_PER_FRAME).all()
    with pytest.raises(InputError, match="no model installed"):
        process_acquisition(tiny_acq, "3dml", dict(FAST))
    with pytest.raises(InputError, match="counting network"):  # asked for explicitly: an error, not a fallback
        process_acquisition(tiny_acq, "rs", dict(FAST, counting_network=True))
