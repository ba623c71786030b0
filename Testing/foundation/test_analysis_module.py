"""The UltrasoundAI Analysis section's Logic against a real MRML scene (slicer-core) and real background jobs,
on real ultrasound DICOM files (pydicom-data) read as Slicer reads them. The scenarios live in
UltrasoundAI/UltrasoundAILib/analysis_scenarios.py, which the module's Test class runs inside Slicer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="the MRML tests need the slicer-core wheel")

MODULE_DIR = Path(__file__).resolve().parents[2] / "UltrasoundAI"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from UltrasoundAILib import analysis_scenarios  # noqa: E402
from UltrasoundAILib.analysis import UltrasoundAIAnalysisLogic  # noqa: E402

from ultrasound_ai.core.errors import InputError  # noqa: E402


@pytest.fixture
def scene():
    from ultrasound_ai.mrml import close_scene, new_scene

    s = new_scene()
    yield s
    close_scene(s)


def test_real_dicom_frame_segment_and_classify(scene, tmp_path):
    analysis_scenarios.dicom_frame_scenario(tmp_path)


def test_real_dicom_cine_is_segmented_frame_by_frame(scene, tmp_path):
    analysis_scenarios.dicom_cine_scenario(tmp_path)


def test_reconstructed_volume_gets_a_surface(scene, tmp_path):
    analysis_scenarios.volume_surface_scenario(tmp_path)


def test_bad_panel_input_is_refused_before_a_job(scene, tmp_path):
    node, files = analysis_scenarios.dicom_to_volume_node(analysis_scenarios.pydicom_data_file("US1_UNCR.dcm"))
    logic = UltrasoundAIAnalysisLogic(workdir=tmp_path, find_dicom_file=files.get)
    with pytest.raises(InputError, match="analysisInput"):
        logic.start({"analysisInput": None})
    with pytest.raises(InputError, match="analysisTask"):
        logic.start({"analysisInput": node, "analysisTask": "detect"})
    with pytest.raises(InputError, match="analysisInputKind"):
        logic.start({"analysisInput": node, "analysisInputKind": "time"})
    cine, _ = analysis_scenarios.dicom_to_volume_node(analysis_scenarios.pydicom_data_file("color3d_jpeg_baseline.dcm"),
                                                      frames=(0, 2))
    with pytest.raises(InputError, match="analysisFrame: 5 is not a frame"):
        logic.start({"analysisInput": cine, "analysisFrames": "current", "analysisFrame": 5})
    assert logic.launcher is None and not list(tmp_path.glob("inputs-*"))
    # A GE file without ultrasound regions: no physical pixel size, the job runs and says so.
    assert logic.pixel_facts(node) == {"pixel_spacing_mm": None, "region": None}
