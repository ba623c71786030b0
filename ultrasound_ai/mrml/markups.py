"""LPS point lists <-> markups nodes: a probe trajectory as a curve, biopsy targets as fiducials.

Engine points are LPS mm; markups control points are RAS (x and y negated).
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import lps_to_ras_points, ras_to_lps_points
from ultrasound_ai.mrml.scene import import_slicer, resolve_scene


def _check_points(points_lps, what: str, allow_empty: bool) -> np.ndarray:
    p = np.asarray(points_lps, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise InputError(f"{what}: expected an array of shape [N, 3] (LPS mm), got shape {p.shape}")
    if not allow_empty and p.shape[0] == 0:
        raise InputError(f"{what}: expected at least one point, got none")
    if not np.all(np.isfinite(p)):
        raise InputError(f"{what}: expected finite coordinates, got NaN or infinity")
    return p


def _set_control_points(node, points_ras: np.ndarray, labels) -> None:
    was = node.StartModify()
    try:
        node.RemoveAllControlPoints()
        for n, p in enumerate(points_ras):
            label = labels[n] if labels is not None else ""
            node.AddControlPoint([float(p[0]), float(p[1]), float(p[2])], label)
    finally:
        node.EndModify(was)


def _control_points_ras(node, world: bool) -> np.ndarray:
    n = node.GetNumberOfControlPoints()
    out = np.zeros((n, 3), dtype=np.float64)
    p = [0.0, 0.0, 0.0]
    for k in range(n):
        if world:
            node.GetNthControlPointPositionWorld(k, p)
        else:
            node.GetNthControlPointPosition(k, p)
        out[k] = p
    return out


def _new_or_check(node, class_name: str, name: str, scene):
    slicer = import_slicer()
    if node is None:
        scene = resolve_scene(scene)
        node = scene.AddNewNodeByClass(class_name, name)
        if node is None:  # pragma: no cover - markups logic missing from this build
            raise RuntimeError(f"could not create a {class_name}: is the markups logic registered?")
        return node
    if not isinstance(node, getattr(slicer, class_name)):
        raise InputError(f"node: expected a {class_name}, got {type(node).__name__}")
    return node


def trajectory_to_curve(points_lps, name: str = "Trajectory", node=None, scene=None):
    """A vtkMRMLMarkupsCurveNode through `points_lps` [N, 3] (N >= 1), in order, drawn as straight
    segments (a sampled trajectory, not a spline). With `node` given it is updated."""
    p = _check_points(points_lps, "points_lps", allow_empty=False)
    node = _new_or_check(node, "vtkMRMLMarkupsCurveNode", name, scene)
    node.SetCurveTypeToLinear()
    _set_control_points(node, lps_to_ras_points(p), None)
    return node


def curve_to_trajectory(node, world: bool = False) -> np.ndarray:
    """The control points of a markups curve (or any markups node) as LPS [N, 3].

    world=True includes the node's parent transforms."""
    slicer = import_slicer()
    if not isinstance(node, slicer.vtkMRMLMarkupsNode):
        raise InputError(f"node: expected a markups node, got {type(node).__name__}")
    return ras_to_lps_points(_control_points_ras(node, world))


def points_to_fiducials(points_lps, labels=None, name: str = "Targets", node=None, scene=None):
    """A vtkMRMLMarkupsFiducialNode with one control point per row of `points_lps` [N, 3] (N may be 0)
    and the given labels (default "<name>-1", "<name>-2", ...)."""
    p = _check_points(points_lps, "points_lps", allow_empty=True)
    if labels is None:
        labels = [f"{name}-{k + 1}" for k in range(len(p))]
    else:
        labels = [str(label) for label in labels]
        if len(labels) != len(p):
            raise InputError(f"labels: expected {len(p)} labels (one per point), got {len(labels)}")
    node = _new_or_check(node, "vtkMRMLMarkupsFiducialNode", name, scene)
    _set_control_points(node, lps_to_ras_points(p), labels)
    return node


def fiducials_to_points(node, world: bool = False) -> tuple[np.ndarray, list[str]]:
    """(points LPS [N, 3], labels) of a markups node's control points."""
    slicer = import_slicer()
    if not isinstance(node, slicer.vtkMRMLMarkupsNode):
        raise InputError(f"node: expected a markups node, got {type(node).__name__}")
    labels = [node.GetNthControlPointLabel(k) for k in range(node.GetNumberOfControlPoints())]
    return ras_to_lps_points(_control_points_ras(node, world)), labels
