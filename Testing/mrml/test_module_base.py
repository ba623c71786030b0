"""The shared base of the module Logics (ultrasound_ai.mrml.module_logic, .tables): the table header
on Slicer versions with either API name, the model-card line every panel shows, result lookup."""

from __future__ import annotations

import json
import math

import pytest

from ultrasound_ai.core.errors import Cancelled, InputError
from ultrasound_ai.jobs.protocol import JobResult
from ultrasound_ai.mrml.module_logic import ModuleLogic, model_card_line, path_or_none, training_data_text
from ultrasound_ai.mrml.tables import column_titles_as_header, metrics_to_table, table_to_metrics


class HiddenApi:
    """A node with some methods hidden, as an older (or newer) Slicer would have it."""

    def __init__(self, node, hidden):
        self._node, self._hidden = node, set(hidden)

    def __getattr__(self, name):
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(self._node, name)


@pytest.mark.parametrize("hidden, flag", [((), "GetUseColumnTitleAsColumnHeader"),
                                          (("SetUseColumnTitleAsColumnHeader",), "GetUseColumnNameAsColumnHeader")])
def test_table_header_works_with_either_slicer_api(scene, hidden, flag):
    """Slicer 5.10 renamed SetUseColumnNameAsColumnHeader; with the new name hidden the old one is used
    (the UltrasoundAI copy of this helper recursed forever there)."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", "T")
    column_titles_as_header(HiddenApi(node, hidden))
    getter = getattr(node, flag, None) or node.GetUseColumnTitleAsColumnHeader
    assert getter() is True or getter() == 1
    column_titles_as_header(HiddenApi(node, ("SetUseColumnTitleAsColumnHeader", "SetUseColumnNameAsColumnHeader")))


def test_metrics_table_round_trip_flattens_and_keeps_nan(scene):
    node = metrics_to_table({"fdr_pct": 12.5, "raw": {"jaccard": 0.4}, "note": "text", "ssim": None}, scene=scene)
    back = table_to_metrics(node)
    assert back["fdr_pct"] == 12.5 and back["raw.jaccard"] == pytest.approx(0.4) and math.isnan(back["ssim"])
    assert "note" not in back
    with pytest.raises(InputError, match="metrics"):
        metrics_to_table({}, scene=scene)


def test_training_data_line_from_card_fields():
    assert training_data_text({"training_data": "simulated sweeps only"}) == "simulated sweeps only"
    assert training_data_text({"training": {"data": "BUSI-like simulated images"}}) == "BUSI-like simulated images"
    assert training_data_text({"training": {"simulator": "freehand-v2"}}) == "simulated data only (freehand-v2)"
    assert training_data_text({}) == "not stated in its model card"


def test_model_card_line_for_shipped_custom_and_missing_models(tmp_path, monkeypatch):
    # Every shipped card says what its model was trained on.
    from ultrasound_ai.models.registry import list_models

    for entry in list_models():
        line = model_card_line(entry.method, entry.pt_path)
        assert line.startswith(f"{entry.name}: trained on ") and "not stated" not in line, line
    pt = tmp_path / "mine.pt"
    pt.write_bytes(b"")
    (tmp_path / "mine.card.json").write_text(json.dumps({"method": "fima", "training_data": "my phantom sweeps"}))
    assert model_card_line("fima", str(pt)) == "mine: trained on my phantom sweeps"
    assert model_card_line(None) == ""
    monkeypatch.setenv("ULTRASOUND_AI_MODELS", str(tmp_path))
    assert "No model card found" in model_card_line("no_such_method")


def test_logic_model_line_and_path_fields():
    class DemoLogic(ModuleLogic):
        MODEL_METHODS = {"fima": "fima"}

    logic = DemoLogic()
    assert logic.model_line("tracked") == "tracked: a classical method, no trained model."
    assert "trained on" in logic.model_line("fima")
    assert logic.module_name == "Demo"
    # An empty ctkPathLineEdit bound to a pathlib.Path field reads back as Path(".").
    from pathlib import Path

    assert path_or_none(Path("")) is None and path_or_none(" ") is None and path_or_none(Path("a.h5")) == "a.h5"


def test_finished_payload_and_output_lookup(scene, tmp_path):
    logic = ModuleLogic(workdir=tmp_path)
    folder = logic.new_inputs_folder()
    assert folder.is_dir() and folder.parent == tmp_path
    with pytest.raises(Cancelled):
        logic.finished_payload(JobResult(status="cancelled", exit_code=3))
    assert not folder.exists()  # removed whatever the outcome
    with pytest.raises(InputError, match="job failed: bad sweep"):
        logic.finished_payload(JobResult(status="failed", exit_code=2, error="bad sweep"))
    with pytest.raises(RuntimeError, match="job failed: crash"):
        logic.finished_payload(JobResult(status="failed", exit_code=1, error="crash"))
    assert logic.finished_payload(JobResult(status="succeeded", exit_code=0, result={"a": 1})) == {"a": 1}
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", "R")
    logic.tag(node, "metrics", "imu")
    assert logic.find_output(scene, "vtkMRMLTableNode", "R", "metrics") is node
    assert logic.find_output(scene, "vtkMRMLTableNode", "R", "volume") is None
    fresh = logic.find_output(scene, "vtkMRMLTableNode", "R", "metrics", new=True)
    assert fresh is not node and fresh.GetName() != "R"
