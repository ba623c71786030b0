"""Scenarios of the UltrasoundAI Analysis section, run by the slicer-core tests
(Testing/mrml/test_analysis_module.py) and by the module's Test class inside Slicer.

Real ultrasound DICOM files (the pydicom-data package: a SonoSite multi-frame echo cine, a Philips
palette-colour frame) are read as Slicer reads DICOM pixel data, through ITK's GDCM reader (RGB vector
volumes with 1 mm pixels), into volume nodes carrying the ``DICOM.instanceUIDs`` attribute as Slicer's
DICOM import sets it; the Logic finds the file through `find_dicom_file` (the test's stand-in for the
DICOM database) and reads the ultrasound regions with pydicom. Each scenario raises AssertionError
with a message on failure.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ultrasound_ai.mrml.scenario_support import check as _check
from UltrasoundAILib.analysis import UltrasoundAIAnalysisLogic


def pydicom_data_file(name: str) -> Path:
    """A file of the pydicom-data package (installed with the test extra; nothing is downloaded)."""
    import data_store

    path = Path(data_store.__file__).parent / "data" / name
    _check(path.is_file(), f"pydicom-data has no {name}")
    return path


@functools.lru_cache(maxsize=4)
def _decoded(path: str):
    """The file's pixels through ITK's GDCM reader, decoded once (the 120-frame JPEG cine takes seconds)."""
    import SimpleITK as sitk

    return sitk.ReadImage(path)


def dicom_to_volume_node(path, frames: tuple[int, int] | None = None, scene=None):
    """A DICOM file as a volume node, the way Slicer's DICOM import makes one: pixels through ITK's GDCM
    reader (colour -> a vtkMRMLVectorVolumeNode), ITK's geometry, and the instance UID in
    ``DICOM.instanceUIDs``. `frames` = (first, end) keeps a part of a cine (test time)."""
    import pydicom

    from ultrasound_ai.io.volume import Volume
    from ultrasound_ai.mrml import resolve_scene, volume_to_node
    from ultrasound_ai.mrml.foundation_nodes import DICOM_UIDS_ATTRIBUTE

    image = _decoded(str(path))
    if frames is not None:
        image = image[:, :, frames[0]:frames[1]]
    node = volume_to_node(Volume.from_sitk(image), name=Path(path).stem, scene=resolve_scene(scene))
    uid = str(pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID)
    node.SetAttribute(DICOM_UIDS_ATTRIBUTE, uid)
    return node, {uid: str(path)}


def _labels_on_input_grid(segmentation, reference):
    """The segmentation exported as a labelmap on the reference volume's grid (array [k, j, i])."""
    import slicer

    scene = reference.GetScene()
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
            segmentation, label, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        _check(ok, "the segmentation could not be exported on its reference geometry")
        from ultrasound_ai.mrml.volumes import ijk_to_ras

        _check(np.allclose(ijk_to_ras(label), ijk_to_ras(reference)),
               "the segmentation's geometry differs from the input volume's")
        return np.array(slicer.util.arrayFromVolume(label))
    finally:
        scene.RemoveNode(label)


def dicom_frame_scenario(workdir, name: str = "OBXXXX1A.dcm") -> dict:
    """One real DICOM frame: segment and classify through the Logic; the segmentation lies on the
    input's grid, nothing is labelled outside the DICOM image region, the probability table sums to 1,
    and the pixel size came from the ultrasound regions."""
    from ultrasound_ai.foundation.dicom_regions import image_region

    path = pydicom_data_file(name)
    node, files = dicom_to_volume_node(path)
    logic = UltrasoundAIAnalysisLogic(workdir=workdir, find_dicom_file=files.get)
    region = image_region(path)
    seg = logic.run({"analysisInput": node, "analysisTask": "segment", "device": "cpu"}, timeout=600)
    payload = seg["result"]
    _check(payload["pixel_spacing_mm"] == list(region.pixel_spacing_mm) and payload["region"] == list(region.bounds),
           f"the job did not get the DICOM region: {payload['pixel_spacing_mm']}, {payload['region']}")
    segmentation = seg["segmentation"]
    names = [segmentation.GetSegmentation().GetNthSegment(k).GetName()
             for k in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    _check(names == payload["label_names"][1:], f"segments {names}, expected the model's {payload['label_names'][1:]}")
    _check(seg["browser"] is None, "a single frame must not make a sequence")
    labels = _labels_on_input_grid(segmentation, node)
    x0, y0, x1, y1 = region.bounds
    _check(labels[:, :y0].sum() == 0 and labels[:, y1 + 1:].sum() == 0 and labels[:, :, :x0].sum() == 0,
           "labels outside the DICOM image region")
    _check(seg["table"].GetNumberOfRows() == 1, "expected one table row for one frame")

    cls = logic.run({"analysisInput": node, "analysisTask": "classify", "device": "cpu"}, timeout=600)
    probs = np.array(cls["result"]["probabilities"])
    _check(probs.shape == (1, 3) and abs(probs.sum() - 1) < 1e-4, f"probabilities {probs}")
    table = cls["table"]
    _check(table.GetNumberOfRows() == 1 and table.GetTable().GetColumnByName("predicted") is not None,
           "the probability table lacks its row or its predicted column")
    _check(cls["result"]["class_names"] == ["benign", "malignant", "normal"], "unexpected class names")
    line = logic.analysis_model_line("classify")
    _check("simulated" in line, f"the model line does not say what the model was trained on: {line!r}")
    return {"node": node, "segment": seg, "classify": cls, "logic": logic}


def dicom_cine_scenario(workdir, frames: tuple[int, int] = (30, 32)) -> dict:
    """The multi-frame echo cine: all frames -> one segmentation per frame in a sequence (no surface
    through time), and the current frame -> one segmentation on that frame (replacing the first result);
    classify on the current frame gives its table row."""
    import slicer

    node, files = dicom_to_volume_node(pydicom_data_file("color3d_jpeg_baseline.dcm"), frames=frames)
    n = frames[1] - frames[0]
    logic = UltrasoundAIAnalysisLogic(workdir=workdir, find_dicom_file=files.get)
    seg = logic.run({"analysisInput": node, "analysisTask": "segment", "analysisFrames": "all", "device": "cpu"},
                    timeout=900)
    browser = seg["browser"]
    _check(browser is not None, "a cine must give a sequence of segmentations")
    sequence = browser.GetMasterSequenceNode()
    _check(sequence.GetNumberOfDataNodes() == n, f"{sequence.GetNumberOfDataNodes()} segmentations for {n} frames")
    _check([sequence.GetNthIndexValue(k) for k in range(n)] == [str(k) for k in range(n)], "frame index values")
    for k in range(n):
        frame_seg = sequence.GetNthDataNode(k)
        _check(isinstance(frame_seg, slicer.vtkMRMLSegmentationNode), "a frame's result is not a segmentation")
        _check(not frame_seg.GetSegmentation().ContainsRepresentation("Closed surface"),
               "a cine frame must not get a surface through time")
    _check(seg["table"].GetNumberOfRows() == n, "one table row per frame expected")

    current = logic.run({"analysisInput": node, "analysisTask": "segment", "analysisFrames": "current",
                         "analysisFrame": 1, "device": "cpu"}, timeout=600)
    _check(current["browser"] is None and current["result"]["frame_indices"] == [1], "current frame: one frame")
    _check(browser.GetScene() is None, "the earlier result of the same task should have been replaced")

    cls = logic.run({"analysisInput": node, "analysisTask": "classify", "analysisFrames": "current",
                     "analysisFrame": 0, "device": "cpu"}, timeout=900)
    _check(cls["table"].GetNumberOfRows() == 1 and cls["result"]["frame_indices"] == [0],
           "classify on the current frame: one table row expected")
    return {"node": node, "segment": seg, "current": current, "classify": cls}


def volume_surface_scenario(workdir, seed: int = 3) -> dict:
    """A reconstructed 3D volume (scalar, no DICOM): its third axis is space, so the segmentation gets a
    closed surface for the 3D view."""
    from ultrasound_ai.foundation.bmode_sim import simulate_bmode
    from ultrasound_ai.io.volume import Volume
    from ultrasound_ai.mrml import resolve_scene, volume_to_node

    image = simulate_bmode(seed, 128, label=1).image
    array = np.stack([image, image, image]).astype(np.float32)
    node = volume_to_node(Volume(array=array, spacing_xyz=(0.3125, 0.3125, 0.5), origin_lps=(0, 0, 0),
                                 direction=np.eye(3)), name="Reconstruction", scene=resolve_scene(None))
    logic = UltrasoundAIAnalysisLogic(workdir=workdir)
    out = logic.run({"analysisInput": node, "analysisTask": "segment", "device": "cpu"}, timeout=600)
    _check(out["browser"] is None, "a spatial volume must give one segmentation")
    seg = out["segmentation"].GetSegmentation()
    _check(seg.ContainsRepresentation("Closed surface"), "a spatial volume's segmentation needs its 3D surface")
    _check(out["result"]["pixel_spacing_mm"] == [0.3125, 0.3125] and not out["result"]["warnings"],
           "a non-DICOM volume's spacing is physical")
    return out
