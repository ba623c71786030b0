"""The UltrasoundAIULM module's Logic against a real MRML scene (slicer-core), with real background jobs.

The scenarios live in UltrasoundAIULM/UltrasoundAIULMLib/scenarios.py so that the module's Test class
runs the very same checks inside Slicer. Also: the ground-truth table and map placement helpers, the
parameter checks, and the static module checks on the module folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "UltrasoundAIULM"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from UltrasoundAIULMLib import scenarios  # noqa: E402


@pytest.fixture(scope="module")
def acquisition_path(tmp_path_factory):
    return scenarios.make_acquisition(tmp_path_factory.mktemp("ulm") / "acq.h5")


def test_rs_in_a_background_job(scene, acquisition_path, tmp_path):
    out = scenarios.process_scenario(acquisition_path, tmp_path / "rs", "rs", repeat=True)
    nodes = out["nodes"]
    name = out["browser"].GetName()
    assert nodes["density"].GetName() == f"{name}-rs-Density"
    assert nodes["velocity"].GetName() == f"{name}-rs-Velocity"
    # The result file stays in the work folder; nothing else does.
    assert sorted(p.name for p in (tmp_path / "rs").iterdir()) == [f"{name}-rs-result.h5"]


def test_cancel_leaves_nothing(scene, acquisition_path, tmp_path):
    scenarios.cancel_scenario(acquisition_path, tmp_path / "cancel")


def test_bad_input_gives_clear_errors_without_a_job(scene, tmp_path):
    scenarios.bad_input_scenario(tmp_path)


def test_ground_truth_table_round_trip(scene):
    from UltrasoundAIULMLib.logic import gt_to_table, table_to_gt

    from ultrasound_ai.core.errors import InputError

    rng = np.random.default_rng(1)
    gt = np.column_stack([rng.integers(0, 50, 30), rng.normal(5, 1, 30), rng.normal(0, 2, 30),
                          rng.integers(0, 9, 30)]).astype(np.float64)
    node = gt_to_table(gt, name="GT")
    assert node.GetNumberOfRows() == 30
    assert np.array_equal(table_to_gt(node), gt)
    three = gt_to_table(gt[:, :3], name="GT3")
    assert np.array_equal(table_to_gt(three), gt[:, :3])
    with pytest.raises(InputError, match=r"\[K, 4\]"):
        gt_to_table(gt[:, :2])
    node.GetTable().RemoveColumnByName("z_mm")
    with pytest.raises(InputError, match="z_mm"):
        table_to_gt(node)


def test_map_placement_follows_ulm_geometry(scene):
    """A map pixel lands where the IQ pixel at the same (z, x) mm does; non-square pixels so an axis
    swap cannot pass."""
    from UltrasoundAIULMLib.logic import map_ras_position, map_to_node

    from ultrasound_ai.mrml import complex_sequence, ijk_to_ras

    image = np.arange(6 * 9, dtype=np.float32).reshape(6, 9)
    node = map_to_node(image, (0.02, 0.03), (2.5, -1.0), name="M")
    m = ijk_to_ras(node)
    assert np.allclose(m @ [4, 3, 0, 1], np.r_[map_ras_position(3, 4, (0.02, 0.03), (2.5, -1.0)), 1])
    assert np.allclose(map_ras_position(3, 4, (0.02, 0.03), (2.5, -1.0)), [-(-1.0 + 4 * 0.03), 0, -(2.5 + 3 * 0.02)])
    import slicer

    assert np.array_equal(slicer.util.arrayFromVolume(node)[0], image)
    iq = np.ones((2, 5, 7), np.complex64)
    browser = complex_sequence(iq, (0.2, 0.3), (2.5, -1.0), name="IQ")
    proxy = browser.GetProxyNode(browser.GetMasterSequenceNode())
    # IQ pixel (z=1, x=2) at z = 2.7, x = -0.4: map pixel row 10, col 20 on the (0.02, 0.03) grid.
    assert np.allclose(ijk_to_ras(proxy) @ [2, 1, 0, 1], m @ [20, 10, 0, 1])


def test_parameters_are_checked():
    from UltrasoundAIULMLib.logic import UlmRunParameters

    from ultrasound_ai.core.errors import InputError

    p = UlmRunParameters.from_any({"inputAcquisitionFile": "a.h5", "method": "3DML", "useCountingNetwork": True,
                                   "bubblesPerFrame": None})
    assert p.method == "3dml" and p.useCountingNetwork
    with pytest.raises(InputError, match="unknown name"):
        UlmRunParameters.from_any({"inputAcquisitionFile": "a.h5", "bubbles": 3})
    with pytest.raises(InputError, match="minTrackLength"):
        UlmRunParameters.from_any({"inputAcquisitionFile": "a.h5", "minTrackLength": 2.5})
    with pytest.raises(InputError, match="resolutionFactor"):
        UlmRunParameters.from_any({"inputAcquisitionFile": "a.h5", "resolutionFactor": 0})


def test_job_carries_the_panel(tmp_path):
    from UltrasoundAIULMLib.logic import UlmRunParameters, UltrasoundAIULMLogic

    logic = UltrasoundAIULMLogic(workdir=tmp_path)
    params = UlmRunParameters.from_any({"inputAcquisitionFile": "a.h5", "method": "wa", "resolutionFactor": 5,
                                        "linkDistance": 1.5, "minTrackLength": 7, "svdCutoff": 0, "device": "CPU",
                                        "useCountingNetwork": False})
    job = logic._job(params, tmp_path / "a.h5", "a")
    assert job["task"] == "ulm.process" and job["device"] == "cpu"
    assert job["outputs"] == {"result": str(tmp_path / "a-wa-result.h5")}
    assert job["parameters"]["method"] == "wa" and job["parameters"]["bubbles_per_frame"] == 40
    assert job["parameters"]["svd_cutoff"] is None and job["parameters"]["min_track_length"] == 7
    counting = logic._job(UlmRunParameters.from_any({"inputAcquisitionFile": "a.h5"}), tmp_path / "a.h5", "a")
    assert counting["parameters"]["counting_network"] is True and "bubbles_per_frame" not in counting["parameters"]


def test_display_ranges():
    from UltrasoundAIULMLib.logic import display_range

    from ultrasound_ai.mrml.tables import flatten_metrics

    direction = np.array([[0, -3, 5], [2, 0, -1]], np.float32)
    lo, hi = display_range(direction, "direction")
    assert lo == -hi and hi > 4
    assert display_range(np.zeros((3, 3)), "density") == (0.0, 1.0)
    assert flatten_metrics({"jaccard": 0.5, "raw": {"jaccard": 0.25, "n": 3}, "note": "x", "rmse": None}) == {
        "jaccard": 0.5, "raw.jaccard": 0.25, "raw.n": 3.0, "rmse": pytest.approx(float("nan"), nan_ok=True)}


def test_module_folder_passes_static_checks():
    sys.path.insert(0, str(REPO / "Testing"))
    try:
        import module_checks as mc
    finally:
        sys.path.remove(str(REPO / "Testing"))
    assert MODULE_DIR in [d.resolve() for d in mc.find_module_dirs()]
    problems = mc.check_module(MODULE_DIR)
    assert problems == [], "\n".join(map(str, problems))
    fields = set(next(iter(mc.parameter_classes(MODULE_DIR)[0].values())))
    bound = {name for name, _, _ in mc.ui_parameter_names(MODULE_DIR / "Resources" / "UI" / "UltrasoundAIULM.ui")}
    assert bound == fields
