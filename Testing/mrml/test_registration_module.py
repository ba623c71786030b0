"""The UltrasoundAIRegistration module's Logic against a real MRML scene (slicer-core), with real background jobs.

The scenarios live in UltrasoundAIRegistration/UltrasoundAIRegistrationLib/scenarios.py so that the module's
Test class runs the very same checks inside Slicer. Also: the registration.register task's own checks,
a segmentation node as the label, an Attention-Reg job with a tiny (untrained) checkpoint, and the static
module checks on the module folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "UltrasoundAIRegistration"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from UltrasoundAIRegistrationLib import scenarios  # noqa: E402


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return scenarios.make_case(tmp_path_factory.mktemp("regcase"))


def test_known_transform_lps_ras_and_direction(scene, case_dir, tmp_path):
    scenarios.known_transform_scenario(case_dir, tmp_path)


def test_truth_as_initial_with_zero_iterations_gives_back_the_truth(scene, case_dir, tmp_path):
    scenarios.initial_truth_job_scenario(case_dir, tmp_path)


def test_mi_job_end_to_end(scene, case_dir, tmp_path, capsys):
    out = scenarios.mi_job_scenario(case_dir, tmp_path)
    assert "SRE 6.00 mm ->" in capsys.readouterr().out
    assert out["out"]["result"]["method"] == "mi"


def test_cancel_leaves_no_nodes_and_no_files(scene, case_dir, tmp_path):
    scenarios.cancel_scenario(case_dir, tmp_path)


def test_bad_inputs_give_clear_errors_without_a_job(scene, case_dir, tmp_path):
    scenarios.bad_input_scenario(case_dir, tmp_path)


def test_segmentation_node_as_label(scene, case_dir, tmp_path):
    """A segmentation made from the labelmap is exported back onto the MRI grid voxel for voxel."""
    import slicer
    from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic

    logic = UltrasoundAIRegistrationLogic(workdir=tmp_path)
    nodes = logic.load_case(case_dir)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Gland")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(nodes["fixed_label"], seg)
    checked = logic.check_inputs({"fixedVolume": nodes["fixed"], "fixedLabel": seg, "movingVolume": nodes["moving"]})
    assert np.array_equal(checked["label"].array, nodes["case"].fixed_label.array)
    assert checked["label"].same_grid(nodes["case"].fixed, atol=1e-6)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 1  # the temporary export is gone


def test_moving_under_a_transform_starts_from_it(scene, case_dir, tmp_path):
    """Without an initial transform node the start is what the views show: the TRUS's parent transform."""
    from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic, moving_to_fixed_ras

    from ultrasound_ai.mrml import apply_transform, matrix_to_transform_node_ras

    logic = UltrasoundAIRegistrationLogic(workdir=tmp_path)
    nodes = logic.load_case(case_dir)
    params = {"fixedVolume": nodes["fixed"], "fixedLabel": nodes["fixed_label"], "movingVolume": nodes["moving"]}
    assert np.allclose(logic.check_inputs(params)["initial"], np.eye(4))
    T = nodes["case"].truth_fixed_to_moving
    apply_transform(nodes["moving"], matrix_to_transform_node_ras(moving_to_fixed_ras(T), name="Shown", scene=scene))
    assert np.allclose(logic.check_inputs(params)["initial"], T, atol=1e-9)


def _tiny_checkpoint(folder: Path) -> Path:
    """An untrained tiny Attention-Reg stage-1 checkpoint with its card (exercises the path, not accuracy)."""
    torch = pytest.importorskip("torch")
    from ultrasound_ai.models.checkpoint import save_checkpoint
    from ultrasound_ai.registration.attention_reg import AttentionReg, preset

    torch.manual_seed(0)
    config = preset("tiny")
    model = AttentionReg(config)
    card = {"name": "tiny-test-stage1", "method": "attention_reg", "stage": 1,
            "configuration": {"preset": "tiny", **config.to_dict()},
            "input": {"mode": "label", "margin": 0.3, "centre": "centroid"},
            "training": {"note": "untrained, for tests"}, "metrics": {}}
    path = folder / "tiny-stage1.pt"
    save_checkpoint(model.state_dict(), path, card)
    return path


def test_attention_job_with_a_tiny_checkpoint(scene, case_dir, tmp_path):
    pytest.importorskip("ultrasound_ai.registration.inference")
    from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic

    from ultrasound_ai.core.geometry import is_rigid

    checkpoint = _tiny_checkpoint(tmp_path)
    logic = UltrasoundAIRegistrationLogic(workdir=tmp_path / "work")
    nodes = logic.load_case(case_dir)
    out = logic.run({"fixedVolume": nodes["fixed"], "fixedLabel": nodes["fixed_label"], "movingVolume": nodes["moving"],
                     "method": "attention", "mode": "label", "device": "cpu", "checkpoints": str(checkpoint),
                     "truthTransform": nodes["truth"]})
    payload = out["result"]
    assert payload["method"] == "attention" and payload["mode"] == "label"
    assert is_rigid(np.asarray(payload["fixed_to_moving_lps"]), atol=1e-6)
    assert np.isfinite(payload["metrics"]["sre_mm"])
    assert nodes["moving"].GetParentTransformNode() is out["transform"]


def test_attention_mode_mismatch_is_a_clear_job_error(scene, case_dir, tmp_path):
    pytest.importorskip("ultrasound_ai.registration.inference")
    from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic

    from ultrasound_ai.core.errors import InputError

    checkpoint = _tiny_checkpoint(tmp_path)
    logic = UltrasoundAIRegistrationLogic(workdir=tmp_path / "work")
    nodes = logic.load_case(case_dir)
    before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="image"):
        logic.run({"fixedVolume": nodes["fixed"], "fixedLabel": nodes["fixed_label"], "movingVolume": nodes["moving"],
                   "method": "attention", "mode": "image", "device": "cpu", "checkpoints": [str(checkpoint)]})
    assert scene.GetNumberOfNodes() == before
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# The task itself (in process, no scene)


def _job(**kw):
    from ultrasound_ai.jobs.protocol import parse_job

    data = {"task": "registration.register", "inputs": {}, "outputs": {}, "parameters": {}}
    data.update(kw)
    return parse_job(data)


def test_task_rejects_bad_jobs(case_dir, tmp_path):
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.registration.tasks import _check_job

    out = {"transform": str(tmp_path / "T.tfm")}
    case_inputs = {"case": str(case_dir)}
    assert _check_job(_job(inputs=case_inputs, outputs=out))["method"] == "attention"
    with pytest.raises(InputError, match="missing input"):
        _check_job(_job(inputs={"fixed": str(case_dir / "fixed.nrrd")}, outputs=out))
    with pytest.raises(InputError, match="not both"):
        _check_job(_job(inputs={**case_inputs, "fixed": str(case_dir / "fixed.nrrd")}, outputs=out))
    with pytest.raises(InputError, match="unknown output"):
        _check_job(_job(inputs=case_inputs, outputs={"picture": str(tmp_path / "p.png")}))
    with pytest.raises(InputError, match="no outputs"):
        _check_job(_job(inputs=case_inputs))
    with pytest.raises(InputError, match="unknown parameter"):
        _check_job(_job(inputs=case_inputs, outputs=out, parameters={"iters": 3}))
    with pytest.raises(InputError, match="method"):
        _check_job(_job(inputs=case_inputs, outputs=out, parameters={"method": "demons"}))
    with pytest.raises(InputError, match="iterations"):
        _check_job(_job(inputs=case_inputs, outputs=out, parameters={"iterations": -1}))
    with pytest.raises(InputError, match="checkpoints"):
        _check_job(_job(inputs=case_inputs, outputs=out, parameters={"checkpoints": [3]}))


def test_task_in_process_metrics_without_truth(case_dir, tmp_path):
    """Without a truth the task still reports what it can: the surface shift, the part of the surface inside
    the TRUS data, and the Dice with the TRUS label; with the truth, SRE and TRE too."""
    import io

    from ultrasound_ai.jobs.worker import EventWriter, execute
    from ultrasound_ai.registration.case import read_case, write_transform_tfm

    case = read_case(case_dir)
    write_transform_tfm(case.truth_fixed_to_moving, tmp_path / "T0.tfm")
    inputs = {"fixed": str(case_dir / "fixed.nrrd"), "fixed_label": str(case_dir / "fixed_label.nrrd"),
              "moving": str(case_dir / "moving.nrrd"), "moving_label": str(case_dir / "moving_label.nrrd"),
              "initial": str(tmp_path / "T0.tfm")}
    stream = io.StringIO()
    job = {"task": "registration.register", "inputs": inputs, "outputs": {"json": str(tmp_path / "r.json")},
           "parameters": {"method": "mi", "iterations": 0}, "device": "cpu"}
    assert execute(job, EventWriter(stream)) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    m = doc["metrics"]
    assert "sre_mm" not in m and "tre_mm" not in m
    assert m["surface_shift_mm"] == pytest.approx(0.0, abs=1e-9)
    assert m["surface_in_fov_pct"] > 50.0 and m["dice"] > 0.8  # the truth aligns the two gland labels
    assert np.allclose(doc["fixed_to_moving_lps"], case.truth_fixed_to_moving, atol=1e-6)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert events[-1]["event"] == "result"
    # The case folder as input: the truth and the landmarks come with it.
    job["inputs"] = {"case": str(case_dir), "initial": str(tmp_path / "T0.tfm")}
    job["outputs"] = {"json": str(tmp_path / "c.json")}
    assert execute(job, EventWriter(io.StringIO())) == 0
    m = json.loads((tmp_path / "c.json").read_text())["metrics"]
    assert m["sre_mm"] == pytest.approx(0.0, abs=1e-6) and m["tre_mm"] == pytest.approx(0.0, abs=1e-6)


def test_task_is_registered():
    from ultrasound_ai.jobs.registry import resolve_task
    from ultrasound_ai.registration.tasks import register_task

    assert resolve_task("registration.register") is register_task


def test_module_folder_passes_static_checks():
    sys.path.insert(0, str(REPO / "Testing"))
    try:
        import module_checks as mc
    finally:
        sys.path.remove(str(REPO / "Testing"))
    assert MODULE_DIR in [d.resolve() for d in mc.find_module_dirs()]
    problems = (mc.check_ui_names(MODULE_DIR) + mc.check_parameter_names(MODULE_DIR)
                + mc.check_cmake_listing(MODULE_DIR) + mc.check_compiles(MODULE_DIR))
    assert problems == [], "\n".join(map(str, problems))
    fields = set(next(iter(mc.parameter_classes(MODULE_DIR)[0].values())))
    bound = {name for name, _, _ in mc.ui_parameter_names(MODULE_DIR / "Resources" / "UI" / "UltrasoundAIRegistration.ui")}
    assert bound == fields


def test_panel_default_is_the_guarded_cascade_with_refinement():
    # The command line's default (the guard keeps the start when a stage makes LC2 worse; refinement
    # then starts from the network's result) is what a clinician gets from Apply as well.
    from UltrasoundAIRegistrationLib.logic import METHODS, RegistrationParameters, UltrasoundAIRegistrationLogic

    assert RegistrationParameters().method == "attention+refine" == METHODS[0]
    assert UltrasoundAIRegistrationLogic.MODEL_METHODS["attention+refine"] == "attention_reg"
