"""The UltrasoundAI module's Logic against a real MRML scene (slicer-core), with real background jobs.

The scenarios live in UltrasoundAI/UltrasoundAILib/scenarios.py so that the module's Test class runs
the very same checks inside Slicer. Also: the task's own checks, the IMU table round trip, and the
static module checks on the module folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "UltrasoundAI"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from UltrasoundAILib import scenarios  # noqa: E402


@pytest.fixture(scope="module")
def sweep_path(tmp_path_factory):
    return scenarios.make_sweep(tmp_path_factory.mktemp("sweep") / "sweep.h5")


def test_tracked_and_imu_into_one_browser(scene, sweep_path, tmp_path):
    tracked = scenarios.reconstruct_scenario(sweep_path, "tracked", tmp_path / "tracked", repeat=True)
    browser = tracked["browser"]
    imu = scenarios.reconstruct_scenario(sweep_path, "imu", tmp_path / "imu", browser=browser)
    # Each method has its own nodes; both estimates sit in the one browser beside the tracked poses.
    for kind in ("estimate", "volume", "trajectory"):
        assert imu["nodes"][kind].GetID() != tracked["nodes"][kind].GetID()
    assert imu["nodes"]["volume"].GetName() == f"{browser.GetName()}-imu-Volume"
    assert tracked["nodes"]["trajectory"].GetName() == f"{browser.GetName()}-tracked-Trajectory"
    from ultrasound_ai.mrml.sequences import _browser_sequences

    names = sorted(s.GetName() for s in _browser_sequences(browser))
    assert names == sorted([f"{browser.GetName()}-Image", f"{browser.GetName()}-ImageToReference",
                            f"{browser.GetName()}-tracked-ImageToReference", f"{browser.GetName()}-imu-ImageToReference"])
    # Metrics only with a method other than `tracked` (whose estimate is the tracked poses); dead
    # reckoning drifts.
    assert tracked["nodes"]["metrics"] is None and imu["metrics"]["fdr_pct"] > 1e-3
    # The IMU weights the method gave (dead reckoning combines every IMU) come back as a table node
    # holding the estimate file's imu_weights; the tracker has none.
    from UltrasoundAILib.logic import table_to_imu_weights

    from ultrasound_ai.io.sweep import read_sweep

    estimate = read_sweep(imu["nodes"]["result"]["estimate"])
    assert tracked["nodes"]["imu_weights"] is None and estimate.imu_weights is not None
    assert imu["nodes"]["imu_weights"].GetName() == f"{browser.GetName()}-imu-ImuWeights"
    assert np.array_equal(table_to_imu_weights(imu["nodes"]["imu_weights"]), estimate.imu_weights)


def test_cancel_leaves_nothing(scene, sweep_path, tmp_path):
    scenarios.cancel_scenario(sweep_path, tmp_path / "cancel")


def test_bad_input_gives_clear_errors(scene, tmp_path):
    scenarios.bad_input_scenario(tmp_path)


def test_imu_table_round_trip_and_checks(scene):
    from UltrasoundAILib.logic import imu_to_table, table_to_imu

    from ultrasound_ai.core.errors import InputError

    rng = np.random.default_rng(3)
    acc = rng.normal(size=(3, 5, 3)).astype(np.float32)
    euler = rng.normal(size=(3, 5, 3)).astype(np.float32) * 30
    pos = rng.normal(size=(3, 3))
    node = imu_to_table(acc, euler, pos, 25.0, name="T")
    back = table_to_imu(node)
    assert np.array_equal(back["imu_acc"], acc) and np.array_equal(back["imu_euler_deg"], euler)
    assert np.array_equal(back["imu_position_mm"], pos) and back["frame_rate_hz"] == 25.0
    assert node.GetNumberOfRows() == 15
    with pytest.raises(InputError, match=r"\[M, N, 3\]"):
        imu_to_table(acc, euler[:, :4])
    node.GetTable().RemoveColumnByName("euler_y_deg")
    with pytest.raises(InputError, match="euler_y_deg"):
        table_to_imu(node)


def test_results_attach_to_a_browser_loaded_from_the_input_file(scene, sweep_path, tmp_path):
    """A sweep file as input (no browser): the job reads the file itself; the results come back into a
    browser loaded from that file, which later runs reuse."""
    from UltrasoundAILib.logic import SWEEP_FILE_ATTRIBUTE, UltrasoundAILogic

    from ultrasound_ai.mrml.sequences import _browser_sequences

    logic = UltrasoundAILogic(workdir=tmp_path)
    nodes = logic.run({"inputSweepFile": str(sweep_path), "method": "tracked", "outputSpacing": 0.8,
                       "fillHoles": "nearest", "compounding": "max", "device": "cpu"})
    browser = nodes["browser"]
    assert browser.GetAttribute(SWEEP_FILE_ATTRIBUTE) == str(Path(sweep_path).resolve())
    assert any(s is nodes["estimate"] for s in _browser_sequences(browser))
    assert nodes["result"]["spacing_mm"] == pytest.approx(0.8)
    assert logic._browser_for_file(str(sweep_path)) is browser
    assert scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode") == 1
    # The job read the file given, not a copy: only the outputs were written.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep-tracked-estimate.h5", "sweep-tracked-volume.nrrd"]


def test_task_rejects_bad_jobs(tmp_path, sweep_path):
    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.freehand.tasks import _check_job
    from ultrasound_ai.jobs.protocol import parse_job

    def job(**kw):
        data = {"task": "freehand.reconstruct", "inputs": {"sweep": str(sweep_path)},
                "outputs": {"volume": str(tmp_path / "v.nrrd")}, "parameters": {}}
        data.update(kw)
        return parse_job(data)

    assert _check_job(job())["method"] == "tracked"
    with pytest.raises(InputError, match="missing input 'sweep'"):
        _check_job(job(inputs={}))
    with pytest.raises(InputError, match="unknown output"):
        _check_job(job(outputs={"picture": str(tmp_path / "p.png")}))
    with pytest.raises(InputError, match="no outputs"):
        _check_job(job(outputs={}))
    with pytest.raises(InputError, match="unknown parameter"):
        _check_job(job(parameters={"spacing": 1.0}))
    with pytest.raises(InputError, match="method"):
        _check_job(job(parameters={"method": ""}))


def test_task_is_registered():
    from ultrasound_ai.freehand.tasks import reconstruct_task
    from ultrasound_ai.jobs.registry import resolve_task

    assert resolve_task("freehand.reconstruct") is reconstruct_task


def test_module_folder_passes_static_checks():
    sys.path.insert(0, str(REPO / "Testing"))
    try:
        import module_checks as mc
    finally:
        sys.path.remove(str(REPO / "Testing"))
    # The repository-wide static test (Testing/static) runs every check, the Qt-free Logic import
    # included, on every module folder it finds; make sure it finds this one.
    assert MODULE_DIR in [d.resolve() for d in mc.find_module_dirs()]
    problems = (mc.check_ui_names(MODULE_DIR) + mc.check_parameter_names(MODULE_DIR)
                + mc.check_cmake_listing(MODULE_DIR) + mc.check_compiles(MODULE_DIR))
    assert problems == [], "\n".join(map(str, problems))
    # Every .ui binding names a wrapper field, and every field is bound to a widget.
    fields = set(next(iter(mc.parameter_classes(MODULE_DIR)[0].values())))
    bound = {name for name, _, _ in mc.ui_parameter_names(MODULE_DIR / "Resources" / "UI" / "UltrasoundAI.ui")}
    assert bound == fields


def _tiny_moglo_model(folder: Path, default: bool = True) -> Path:
    """An untrained tiny MoGLo-Net saved as an installed model (its weights do not matter here: the test
    is about which method and model the Logic picks and passes on)."""
    import torch

    from ultrasound_ai.freehand.moglo.model import MogloNet, make_config
    from ultrasound_ai.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = make_config("tiny")
    model = MogloNet(cfg)
    model.set_normalisation([0, 0, 0.4, 0, 0, 0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    folder.mkdir(parents=True, exist_ok=True)
    card = {"name": "moglo_tiny", "method": "moglo", "default": default,
            "configuration": {"preset": "tiny", **cfg.to_dict()},
            "input": {"frame_shape_hw": list(cfg.frame_shape), "pixel_spacing_mm": [cfg.pixel_spacing_mm] * 2},
            "training": {"data": "none (untrained, for a module test)"}, "metrics": {}}
    save_checkpoint(model.state_dict(), folder / "moglo_tiny.pt", card)
    return folder / "moglo_tiny.pt"


def test_auto_method_picks_by_imu_data_and_installed_models(scene, tmp_path, monkeypatch):
    from UltrasoundAILib.logic import UltrasoundAILogic, resolve_method

    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.models import registry

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", empty)
    monkeypatch.setenv(registry.ENV_VAR, str(empty))
    # Nothing installed: the classical methods.
    assert resolve_method("auto", has_imu=True, has_tforms=True) == "imu"
    assert resolve_method("auto", has_imu=False, has_tforms=True) == "tracked"
    assert resolve_method("moglo", has_imu=True, has_tforms=False) == "moglo"
    with pytest.raises(InputError, match="MoGLo-Net"):
        resolve_method("auto", has_imu=False, has_tforms=False)
    # A MoGLo-Net model installed: the default for sweeps without IMU data (FiMA is not installed, so a
    # sweep with IMUs still gets dead reckoning).
    pt = _tiny_moglo_model(tmp_path / "models")
    monkeypatch.setenv(registry.ENV_VAR, str(pt.parent))
    assert resolve_method("auto", has_imu=False, has_tforms=True) == "moglo"
    assert resolve_method("auto", has_imu=True, has_tforms=True) == "imu"

    # Through the Logic and a real job (the worker inherits ULTRASOUND_AI_MODELS): a sweep without IMUs.
    sweep = scenarios.make_sweep(tmp_path / "noimu.h5", n_frames=8, imu=False)
    logic = UltrasoundAILogic(workdir=tmp_path / "work")
    nodes = logic.run({"inputSweepFile": str(sweep), "method": "auto", "outputSpacing": 0.8, "device": "cpu"})
    assert logic.last_method == "moglo" and nodes["result"]["method"] == "moglo"
    assert nodes["volume"].GetName() == "noimu-moglo-Volume" and nodes["imu_weights"] is None
    # An explicit checkpoint path reaches the method (the same untrained weights: the same poses).
    from ultrasound_ai.io.sweep import read_sweep

    first = read_sweep(nodes["result"]["estimate"]).tforms
    nodes = logic.run({"inputSweepFile": str(sweep), "method": "moglo", "checkpoint": str(pt), "device": "cpu",
                       "outputSpacing": 0.8})
    assert np.array_equal(read_sweep(nodes["result"]["estimate"]).tforms, first)
    with pytest.raises(InputError, match="missing.pt|not found"):
        logic.run({"inputSweepFile": str(sweep), "method": "moglo", "checkpoint": str(tmp_path / "missing.pt"),
                   "device": "cpu"})


def test_network_options_reach_the_job(scene, sweep_path, tmp_path):
    from UltrasoundAILib.logic import (
        ReconstructionParameters,
        UltrasoundAILogic,
        imu_weights_to_table,
        parse_imu_selection,
        table_to_imu_weights,
    )

    from ultrasound_ai.core.errors import InputError

    logic = UltrasoundAILogic(workdir=tmp_path)
    params = ReconstructionParameters.from_any({"inputSweepFile": str(sweep_path), "method": "fima",
                                                "onlineAlignment": True, "imuSelection": " 0, 2", "checkpoint": "m.pt"})
    job = logic._job(params, Path(sweep_path), "s")
    assert job["parameters"]["method_params"] == {"online_align": True, "imus": [0, 2]}
    assert job["parameters"]["checkpoint"] == "m.pt"
    params = ReconstructionParameters.from_any({"inputSweepFile": str(sweep_path), "method": "imu",
                                                "onlineAlignment": True, "imuSelection": "1", "checkpoint": "m.pt"})
    job = logic._job(params, Path(sweep_path), "s")
    assert job["parameters"]["method_params"] == {} and job["parameters"]["checkpoint"] is None
    assert parse_imu_selection("") is None and parse_imu_selection("3;1") == [3, 1]
    for bad in ("a,b", "1,1", "-1", ","):
        with pytest.raises(InputError, match="imuSelection"):
            ReconstructionParameters.from_any({"inputSweepFile": str(sweep_path), "imuSelection": bad})
    # MoGLo-Net's sweep direction: "model" leaves the card's setting, the others reach the method.
    for direction, expected in (("model", {}), ("ordering", {"direction": "ordering"}), ("forward", {"direction": "forward"}),
                                ("network", {"direction": "network"})):
        params = ReconstructionParameters.from_any({"inputSweepFile": str(sweep_path), "method": "moglo",
                                                    "sweepDirection": direction})
        assert logic._job(params, Path(sweep_path), "s")["parameters"]["method_params"] == expected
    # FiMA: the same choice; "model" leaves the card's setting (IMU direction for the shipped model)
    for direction, expected in (("model", {"online_align": False}),
                                ("network", {"online_align": False, "direction": "network"})):
        params = ReconstructionParameters.from_any({"inputSweepFile": str(sweep_path), "method": "fima",
                                                    "sweepDirection": direction})
        assert logic._job(params, Path(sweep_path), "s")["parameters"]["method_params"] == expected
    with pytest.raises(InputError, match="sweepDirection"):
        ReconstructionParameters.from_any({"inputSweepFile": str(sweep_path), "sweepDirection": "backward"})
    w = np.random.default_rng(0).dirichlet(np.ones(3), size=7).astype(np.float32)
    assert np.array_equal(table_to_imu_weights(imu_weights_to_table(w, scene=scene)), w)
    with pytest.raises(InputError, match=r"\[N-1, M\]"):
        imu_weights_to_table(w[0], scene=scene)
