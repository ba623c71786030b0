"""4x4 matrices <-> vtkMRMLLinearTransformNode.

The engine's matrices are LPS -> LPS; a Slicer transform node's to-parent matrix is RAS -> RAS, so
``to_parent = lps_to_ras_transform(matrix_lps)`` (F @ T @ F with F = diag(-1, -1, 1, 1)). The
``_ras`` variants take and give RAS matrices unchanged, for callers that already hold them (the
registration's ``moving_to_fixed_ras``).
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import lps_to_ras_transform, ras_to_lps_transform
from ultrasound_ai.mrml.scene import import_slicer, resolve_scene


def check_affine(matrix, what: str = "matrix") -> np.ndarray:
    """A finite 4x4 float64 affine matrix (last row 0, 0, 0, 1), or InputError."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise InputError(f"{what}: expected a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise InputError(f"{what}: expected finite values, got {m.tolist()}")
    if not np.array_equal(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"{what}: expected an affine matrix with last row [0, 0, 0, 1], got {m[3].tolist()}")
    return m


def vtk_matrix(array):
    """4x4 numpy -> vtkMatrix4x4."""
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def numpy_matrix(vtk_matrix4x4) -> np.ndarray:
    """vtkMatrix4x4 -> 4x4 float64 numpy."""
    return np.array([[vtk_matrix4x4.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _linear_transform_node(node, what: str = "node"):
    slicer = import_slicer()
    if not isinstance(node, slicer.vtkMRMLTransformNode):
        raise InputError(f"{what}: expected a transform node, got {type(node).__name__}")
    if not node.IsLinear():
        raise InputError(f"{what} {node.GetName()!r}: expected a linear transform, got a non-linear one")
    return node


def matrix_to_transform_node_ras(matrix_ras, name: str = "Transform", node=None, scene=None):
    """A vtkMRMLLinearTransformNode whose to-parent matrix is `matrix_ras` (RAS -> RAS).

    With `node` given it is updated (its name kept); otherwise a new node named `name` is added to
    `scene` (slicer.mrmlScene when None).
    """
    slicer = import_slicer()
    m = check_affine(matrix_ras, "matrix_ras")
    if node is None:
        scene = resolve_scene(scene)
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    elif not isinstance(node, slicer.vtkMRMLLinearTransformNode):
        raise InputError(f"node: expected a vtkMRMLLinearTransformNode, got {type(node).__name__}")
    node.SetMatrixTransformToParent(vtk_matrix(m))
    return node


def matrix_to_transform_node(matrix_lps, name: str = "Transform", node=None, scene=None):
    """A vtkMRMLLinearTransformNode for an LPS -> LPS matrix (to-parent = lps_to_ras_transform(matrix_lps))."""
    m = check_affine(matrix_lps, "matrix_lps")
    return matrix_to_transform_node_ras(lps_to_ras_transform(m), name=name, node=node, scene=scene)


def transform_node_to_matrix_ras(node) -> np.ndarray:
    """The node's to-parent matrix (RAS -> RAS), 4x4 float64."""
    import vtk

    node = _linear_transform_node(node)
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(m)
    return numpy_matrix(m)


def transform_node_to_matrix(node) -> np.ndarray:
    """The node's to-parent matrix as an LPS -> LPS 4x4 float64 matrix."""
    return ras_to_lps_transform(transform_node_to_matrix_ras(node))


def world_matrix_ras(node) -> np.ndarray:
    """The matrix taking `node`'s local RAS coordinates to world RAS (all its parent transforms), or
    the identity when it has none. Raises InputError when a parent transform is not linear."""
    import vtk

    parent = node.GetParentTransformNode() if hasattr(node, "GetParentTransformNode") else None
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"node {node.GetName()!r}: its parent transforms are not linear")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return numpy_matrix(m)


def apply_transform(node_to_move, transform_node) -> None:
    """Put `node_to_move` under `transform_node` (None removes its parent transform)."""
    slicer = import_slicer()
    if not hasattr(node_to_move, "SetAndObserveTransformNodeID"):
        raise InputError(f"node_to_move: expected a transformable MRML node, got {type(node_to_move).__name__}")
    if transform_node is None:
        node_to_move.SetAndObserveTransformNodeID(None)
        return
    if not isinstance(transform_node, slicer.vtkMRMLTransformNode):
        raise InputError(f"transform_node: expected a transform node, got {type(transform_node).__name__}")
    if transform_node.GetScene() is None or transform_node.GetScene() is not node_to_move.GetScene():
        raise InputError(
            f"transform_node {transform_node.GetName()!r}: expected a node in the same scene as "
            f"{node_to_move.GetName()!r}"
        )
    node_to_move.SetAndObserveTransformNodeID(transform_node.GetID())
