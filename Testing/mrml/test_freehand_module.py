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
    for kind in ("estimate", "volume", "trajectory", "metrics"):
        assert imu["nodes"][kind].GetID() != tracked["nodes"][kind].GetID()
    assert imu["nodes"]["volume"].GetName() == f"{browser.GetName()}-imu-Volume"
    assert tracked["nodes"]["trajectory"].GetName() == f"{browser.GetName()}-tracked-Trajectory"
    from ultrasound_ai.mrml.sequences import _browser_sequences

    names = sorted(s.GetName() for s in _browser_sequences(browser))
    assert names == sorted([f"{browser.GetName()}-Image", f"{browser.GetName()}-ImageToReference",
                            f"{browser.GetName()}-tracked-ImageToReference", f"{browser.GetName()}-imu-ImageToReference"])
    # Dead reckoning drifts; the tracked row is exact.
    assert imu["metrics"]["fdr_pct"] > tracked["metrics"]["fdr_pct"]


def test_cancel_leaves_nothing(scene, sweep_path, tmp_path):
    scenarios.cancel_scenario(sweep_path, tmp_path / "cancel")


def test_bad_input_gives_clear_errors(scene, tmp_path):
    scenarios.bad_input_scenario(tmp_path)


def test_imu_table_round_trip_and_checks(scene):
    from ultrasound_ai.core.errors import InputError
    from UltrasoundAILib.logic import imu_to_table, table_to_imu

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
    from ultrasound_ai.mrml.sequences import _browser_sequences
    from UltrasoundAILib.logic import SWEEP_FILE_ATTRIBUTE, UltrasoundAILogic

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
    from ultrasound_ai.jobs.registry import resolve_task
    from ultrasound_ai.freehand.tasks import reconstruct_task

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
