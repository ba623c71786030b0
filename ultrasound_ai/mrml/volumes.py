"""Engine `Volume` <-> MRML volume nodes, and complex arrays <-> two-component (real, imaginary) volumes.

A node's IJKToRAS matrix is ``LPS_TO_RAS @ volume.ijk_to_lps()``: spacing unchanged, origin and
direction columns with x and y negated. The geometry is set as spacing, origin and direction
separately (not through SetIJKToRASMatrix, which would re-derive them from the product), so a round
trip gives back the same numbers.
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import LPS_TO_RAS
from ultrasound_ai.io.volume import Volume
from ultrasound_ai.mrml.scene import import_slicer, resolve_scene

_FLIP3 = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS on a 3-vector
COMPONENTS_ATTRIBUTE = "UltrasoundAI.Components"
COMPLEX_COMPONENTS = "real,imaginary"


def _storable_array(array: np.ndarray, what: str) -> np.ndarray:
    """The array as VTK can hold it (Slicer rejects 64-bit integers; VTK has no bool)."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputError(f"{what}: 64-bit integer values outside the int32 range cannot be stored in a volume node")
        return array.astype(np.int32)
    if array.dtype.kind not in "iuf":
        raise InputError(f"{what}: expected a real numeric dtype, got {array.dtype}")
    return array


def fill_volume_node(node, volume: Volume) -> None:
    """Write `volume`'s voxels and geometry into an existing (possibly scene-less) volume node."""
    slicer = import_slicer()
    array = _storable_array(volume.array, "volume array")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetSpacing(*(float(s) for s in volume.spacing_xyz))
    node.SetOrigin(*(float(v) for v in volume.origin_lps * _FLIP3))
    directions = np.eye(4)
    directions[:3, :3] = _FLIP3[:, None] * volume.direction
    node.SetIJKToRASDirectionMatrix(slicer.util.vtkMatrixFromArray(directions))


def ijk_to_ras(node) -> np.ndarray:
    """The node's IJKToRAS matrix as a 4x4 float64 array."""
    slicer = import_slicer()
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def volume_to_node(volume: Volume, name: str = "Volume", node=None, scene=None, labelmap: bool = False):
    """A vtkMRMLScalarVolumeNode (vtkMRMLVectorVolumeNode for [k, j, i, C] arrays, a
    vtkMRMLLabelMapVolumeNode with labelmap=True for integer label images) holding `volume`.

    IJKToRAS = LPS_TO_RAS @ volume.ijk_to_lps(). A complex volume becomes a two-component
    (real, imaginary) vector volume (see complex_to_node). With `node` given, that node is updated
    (its name is kept); otherwise a new node named `name` is added to `scene` (slicer.mrmlScene when
    None). Display nodes are created so the volume shows in the views.
    """
    slicer = import_slicer()
    if not isinstance(volume, Volume):
        raise InputError(f"volume: expected an ultrasound_ai.io.volume.Volume, got {type(volume).__name__}")
    if np.iscomplexobj(volume.array):
        return complex_to_node(volume, name=name, node=node, scene=scene)
    class_name = "vtkMRMLVectorVolumeNode" if volume.is_vector else "vtkMRMLScalarVolumeNode"
    if labelmap:
        if volume.is_vector or volume.array.dtype.kind not in "biu":
            raise InputError(
                f"volume: a labelmap needs a scalar integer array, got shape {volume.array.shape} dtype {volume.array.dtype}"
            )
        class_name = "vtkMRMLLabelMapVolumeNode"
    if node is not None:
        if labelmap and not isinstance(node, slicer.vtkMRMLLabelMapVolumeNode):
            raise InputError(f"node: expected a vtkMRMLLabelMapVolumeNode for a labelmap, got {node.GetClassName()}")
        if not isinstance(node, slicer.vtkMRMLScalarVolumeNode) or (
            isinstance(node, slicer.vtkMRMLVectorVolumeNode) != volume.is_vector
        ):
            raise InputError(
                f"node: expected a {class_name} for a volume of shape {volume.array.shape}, got {node.GetClassName()}"
            )
    else:
        scene = resolve_scene(scene)
        node = scene.AddNewNodeByClass(class_name, name)
    fill_volume_node(node, volume)
    if node.GetScene() is not None:
        node.CreateDefaultDisplayNodes()
    return node


def node_to_volume(node, world: bool = False) -> Volume:
    """The `Volume` held by a scalar or vector volume node (array copied, geometry in LPS).

    world=True includes the node's parent transforms (which must be linear), as the views show it.
    """
    slicer = import_slicer()
    if not isinstance(node, slicer.vtkMRMLScalarVolumeNode):
        raise InputError(f"node: expected a scalar or vector volume node, got {type(node).__name__}")
    if node.GetImageData() is None:
        raise InputError(f"node {node.GetName()!r}: volume node has no image data")
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    if array.ndim == 4 and array.shape[3] == 1 and not isinstance(node, slicer.vtkMRMLVectorVolumeNode):
        array = array[..., 0]
    spacing = np.array(node.GetSpacing(), dtype=np.float64)
    origin = np.array(node.GetOrigin(), dtype=np.float64) * _FLIP3
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    direction = _FLIP3[:, None] * slicer.util.arrayFromVTKMatrix(m)[:3, :3]
    if world and node.GetParentTransformNode() is not None:
        from ultrasound_ai.mrml.transforms import world_matrix_ras

        to_world = LPS_TO_RAS @ world_matrix_ras(node) @ LPS_TO_RAS  # LPS -> LPS
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = direction * spacing
        ijk_to_lps[:3, 3] = origin
        ijk_to_lps = to_world @ ijk_to_lps
        spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
        direction = ijk_to_lps[:3, :3] / spacing
        origin = ijk_to_lps[:3, 3]
    return Volume(array=array, spacing_xyz=spacing, origin_lps=origin, direction=direction)


def complex_to_two_components(array) -> np.ndarray:
    """Complex [...] -> float [..., 2] (real, imaginary); complex64 gives float32, complex128 float64."""
    array = np.asarray(array)
    if not np.iscomplexobj(array):
        raise InputError(f"complex array: expected a complex dtype (complex64 or complex128), got {array.dtype}")
    out_dtype = np.float32 if array.dtype == np.complex64 else np.float64
    out = np.empty(array.shape + (2,), dtype=out_dtype)
    out[..., 0] = array.real
    out[..., 1] = array.imag
    return out


def two_components_to_complex(array, what: str = "array") -> np.ndarray:
    """Float [..., 2] (real, imaginary) -> complex64 (from float32 or narrower) or complex128."""
    array = np.asarray(array)
    if array.ndim < 1 or array.shape[-1] != 2 or array.dtype.kind != "f":
        raise InputError(
            f"{what}: expected two floating-point components (real, imaginary), got shape {array.shape} "
            f"dtype {array.dtype}"
        )
    out = np.empty(array.shape[:-1], dtype=np.complex128 if array.dtype == np.float64 else np.complex64)
    out.real = array[..., 0]
    out.imag = array[..., 1]
    return out


def complex_to_node(
    data,
    spacing_xyz=(1.0, 1.0, 1.0),
    origin_lps=(0.0, 0.0, 0.0),
    direction=None,
    name: str = "IQ",
    node=None,
    scene=None,
):
    """A complex [k, j, i] array (or a `Volume` holding one, whose geometry is then used) as a
    two-component (real, imaginary) vtkMRMLVectorVolumeNode; the geometry arguments as in `Volume`.
    """
    if isinstance(data, Volume):
        array = data.array
        spacing_xyz, origin_lps, direction = data.spacing_xyz, data.origin_lps, data.direction
    else:
        array = np.asarray(data)
    if array.ndim != 3:
        raise InputError(f"complex array: expected 3 dimensions [k, j, i], got shape {array.shape}")
    two = complex_to_two_components(array)
    volume = Volume(
        array=two,
        spacing_xyz=spacing_xyz,
        origin_lps=origin_lps,
        direction=np.eye(3) if direction is None else direction,
    )
    node = volume_to_node(volume, name=name, node=node, scene=scene)
    node.SetAttribute(COMPONENTS_ATTRIBUTE, COMPLEX_COMPONENTS)
    return node


def node_to_complex(node, world: bool = False) -> Volume:
    """The complex `Volume` ([k, j, i] complex64/complex128) held by a two-component volume node."""
    volume = node_to_volume(node, world=world)
    if volume.array.ndim != 4 or volume.array.shape[3] != 2:
        raise InputError(
            f"node {node.GetName()!r}: expected a two-component (real, imaginary) vector volume, "
            f"got array shape {volume.array.shape}"
        )
    return Volume(
        array=two_components_to_complex(volume.array, f"node {node.GetName()!r}"),
        spacing_xyz=volume.spacing_xyz,
        origin_lps=volume.origin_lps,
        direction=volume.direction,
    )
