"""MRML side of the foundation-model analysis: the DICOM facts of a volume node, and results as nodes.

* ``dicom_image_region(node)`` -- the physical pixel size and image rectangle of a volume loaded from
  ultrasound DICOM. Slicer's DICOM import stores the instance UIDs in the node attribute
  ``DICOM.instanceUIDs``; the file is found through the DICOM database (``slicer.dicomDatabase``, or a
  `find_file(uid)` given by the caller) and its ultrasound regions are read with pydicom
  (ultrasound_ai.foundation.dicom_regions). The geometry ITK gave the node (1 mm pixels) stays as it is.
* ``labels_to_segmentation`` -- a label volume (the job's output, on the input's geometry) as a
  vtkMRMLSegmentationNode, one segment per label named after the model's label; a 3D closed surface
  too when the input is a spatial volume.
* ``labels_to_segmentation_sequence`` -- a cine's labels: the third axis is time, so each frame becomes
  a segmentation of its own (one-slice labelmap) in a sequence, browsed with the frames; no surface
  is ever built through time.
* ``rows_to_table`` -- the per-frame probability / fraction table as a vtkMRMLTableNode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.mrml.scene import ensure_logics, import_slicer, resolve_scene

DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
FRAME_INDEX_NAME = "frame"


def dicom_file_of(volume_node, find_file: Callable[[str], str] | None = None) -> Path | None:
    """The DICOM file a volume node was loaded from (its first instance), or None when the node has no
    DICOM instance UIDs or the database does not know the file."""
    uids = (volume_node.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        return None
    if find_file is None:
        slicer = import_slicer()
        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            return None
        find_file = database.fileForInstance
    path = find_file(uids[0])
    return Path(path) if path and Path(path).is_file() else None


def dicom_image_region(volume_node, find_file: Callable[[str], str] | None = None):
    """ultrasound_ai.foundation.dicom_regions.ImageRegion of the node's DICOM file, or None."""
    from ultrasound_ai.foundation.dicom_regions import image_region

    path = dicom_file_of(volume_node, find_file)
    return image_region(path) if path is not None else None


def _label_node(label_path: str | os.PathLike, scene, name: str):
    from ultrasound_ai.io.volume import read_volume
    from ultrasound_ai.mrml.volumes import volume_to_node

    volume = read_volume(label_path)
    if volume.array.ndim != 3 or volume.array.dtype.kind not in "biu":
        raise InputError(f"label volume {label_path}: expected a scalar integer label image, got shape "
                         f"{volume.array.shape} dtype {volume.array.dtype}")
    return volume_to_node(volume, name=name, scene=scene, labelmap=True), volume


def _fill_segmentation(seg_node, label_node, label_names: Sequence[str], reference=None) -> None:
    slicer = import_slicer()
    seg_node.GetSegmentation().RemoveAllSegments()
    if reference is not None:
        seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, seg_node):
        raise RuntimeError(f"segmentation {seg_node.GetName()!r}: the label volume could not be imported")
    seg = seg_node.GetSegmentation()
    # Imported segments are named after the label values ("1", "2", ...); name them as the model does.
    for k in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(k)
        try:
            value = int(segment.GetLabelValue()) if hasattr(segment, "GetLabelValue") else int(segment.GetName())
        except ValueError:
            continue
        if 0 < value < len(label_names):
            segment.SetName(str(label_names[value]))
    # Every label of the model gets its segment, empty when nothing was found, so the result always
    # says what was looked for.
    present = {seg.GetNthSegment(k).GetName() for k in range(seg.GetNumberOfSegments())}
    for name in label_names[1:]:
        if str(name) not in present:
            seg.AddEmptySegment("", str(name))


def labels_to_segmentation(label_path, label_names: Sequence[str], name: str = "Segmentation", reference=None,
                           node=None, scene=None, surface: bool = False):
    """A vtkMRMLSegmentationNode from a label volume file; segments named label_names[value] (value 0 =
    background, not a segment). `reference`: the input volume node (its geometry becomes the
    segmentation's reference). surface=True also builds the closed-surface (3D) representation."""
    scene = resolve_scene(scene)
    ensure_logics(scene)
    label_node, _ = _label_node(label_path, scene, name + " labels")
    try:
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        _fill_segmentation(node, label_node, label_names, reference)
        node.CreateDefaultDisplayNodes()
        if surface:
            node.CreateClosedSurfaceRepresentation()
    finally:
        scene.RemoveNode(label_node)
    return node


def labels_to_segmentation_sequence(label_path, label_names: Sequence[str], frame_indices: Sequence[int],
                                    name: str = "Segmentation", scene=None):
    """A cine's labels ([N, H, W] on the cine's geometry) as a vtkMRMLSequenceNode of segmentations,
    frame index n -> the segmentation of frame frame_indices[n] (a one-slice labelmap placed where that
    frame lies), and a browser; returns (browser, sequence). The proxy segmentation shows the browsed
    frame's result in the slice views."""
    from ultrasound_ai.io.volume import Volume
    from ultrasound_ai.mrml.volumes import volume_to_node

    scene = resolve_scene(scene)
    logics = ensure_logics(scene)
    label_node, volume = _label_node(label_path, scene, name + " labels")
    scene.RemoveNode(label_node)
    if volume.array.shape[0] != len(frame_indices):
        raise InputError(f"label volume {label_path}: {volume.array.shape[0]} frames, expected {len(frame_indices)}")
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name + " frames")
    seq.SetIndexName(FRAME_INDEX_NAME)
    seq.SetIndexUnit("")
    seq.SetIndexType(seq.NumericIndex)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = volume.direction * volume.spacing_xyz
    ijk_to_lps[:3, 3] = volume.origin_lps
    for n, frame in enumerate(frame_indices):
        origin = (ijk_to_lps @ np.array([0.0, 0.0, float(n), 1.0]))[:3]
        one = Volume(array=volume.array[n:n + 1], spacing_xyz=volume.spacing_xyz, origin_lps=origin,
                     direction=volume.direction)
        frame_label = volume_to_node(one, name=f"{name} frame {frame} labels", scene=scene, labelmap=True)
        frame_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} frame {frame}")
        try:
            _fill_segmentation(frame_seg, frame_label, label_names)
            seq.SetDataNodeAtValue(frame_seg, str(int(frame)))
        finally:
            scene.RemoveNode(frame_label)
            scene.RemoveNode(frame_seg)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", name + " browser")
    browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    browser.SetSelectedItemNumber(0)
    logics["sequences"].UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(seq)
    if proxy is not None:
        proxy.SetName(name)
        proxy.CreateDefaultDisplayNodes()
    return browser, seq


def rows_to_table(header: Sequence[str], rows: Sequence[Sequence], name: str = "Probabilities", node=None,
                  scene=None):
    """A vtkMRMLTableNode with the columns of `header`: numbers as float columns, "frame" as integers,
    anything else (the predicted class) as text."""
    import vtk

    from ultrasound_ai.mrml.tables import float_column, int_column, new_table_node, set_table

    node = new_table_node(name, node=node, scene=scene)
    columns = []
    for c, title in enumerate(header):
        values = [row[c] for row in rows]
        if title == FRAME_INDEX_NAME:
            columns.append(int_column(title, values))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            columns.append(float_column(title, values))
        else:
            text = vtk.vtkStringArray()
            text.SetName(str(title))
            for v in values:
                text.InsertNextValue(str(v))
            columns.append(text)
    set_table(node, columns)
    return node
