"""The MRML bridge against real slicer-core scenes: exact round trips and known RAS positions."""

import subprocess
import sys

import numpy as np
import pytest

from ultrasound_ai import mrml
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import LPS_TO_RAS
from ultrasound_ai.io.volume import Volume


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _rigid(axis, angle, t):
    m = np.eye(4)
    m[:3, :3] = _rotation(axis, angle)
    m[:3, 3] = t
    return m


def _vtk_apply(vtk_matrix, point4):
    return np.array(vtk_matrix.MultiplyPoint([float(v) for v in point4]))


# -- import hygiene ----------------------------------------------------------------------------------
def test_importing_the_bridge_does_not_import_slicer_or_vtk():
    code = (
        "import sys, ultrasound_ai.mrml; "
        "bad = [m for m in ('slicer', 'vtk', 'slicer_core') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# -- volumes -----------------------------------------------------------------------------------------
def _oblique_volume(dtype=np.int16, components=None):
    rng = np.random.default_rng(0)
    shape = (4, 5, 6) if components is None else (4, 5, 6, components)
    array = rng.integers(-500, 500, size=shape).astype(dtype)
    return Volume(
        array=array,
        spacing_xyz=[0.3, 0.7, 1.9],
        origin_lps=[12.5, -7.25, 40.0],
        direction=_rotation([1.0, 2.0, 0.5], 0.6),
    )


def test_volume_round_trip_is_exact_and_node_is_in_ras(scene):
    vol = _oblique_volume()
    node = mrml.volume_to_node(vol, name="oblique", scene=scene)
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert node.GetName() == "oblique"
    assert node.GetScene() is scene
    back = mrml.node_to_volume(node)
    assert back.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.spacing_xyz, vol.spacing_xyz)
    np.testing.assert_array_equal(back.origin_lps, vol.origin_lps)
    np.testing.assert_allclose(back.direction, vol.direction, rtol=0, atol=1e-15)
    np.testing.assert_allclose(mrml.ijk_to_ras(node), LPS_TO_RAS @ vol.ijk_to_lps(), rtol=0, atol=1e-12)

    # Voxel (i, j, k) = (5, 1, 3), computed by hand in LPS, then x and y negated.
    import vtk

    ijk = np.array([5.0, 1.0, 3.0])
    lps = vol.origin_lps + vol.direction @ (vol.spacing_xyz * ijk)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ras = _vtk_apply(m, [*ijk, 1.0])[:3]
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], rtol=0, atol=1e-12)
    # The voxel value at that index is the array's [k, j, i].
    assert node.GetImageData().GetScalarComponentAsDouble(5, 1, 3, 0) == vol.array[3, 1, 5]


def test_vector_volume_and_node_update(scene):
    vol = _oblique_volume(np.float32, components=3)
    node = mrml.volume_to_node(vol, scene=scene)
    assert node.GetClassName() == "vtkMRMLVectorVolumeNode"
    back = mrml.node_to_volume(node)
    np.testing.assert_array_equal(back.array, vol.array)
    # Updating the same node with new data keeps the node, replaces voxels and geometry.
    vol2 = Volume(vol.array * 2, [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], np.eye(3))
    same = mrml.volume_to_node(vol2, node=node)
    assert same is node
    back2 = mrml.node_to_volume(node)
    np.testing.assert_array_equal(back2.array, vol2.array)
    np.testing.assert_array_equal(back2.spacing_xyz, [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="node"):
        mrml.volume_to_node(_oblique_volume(), node=node)  # scalar data into a vector node
    with pytest.raises(InputError, match="Volume"):
        mrml.volume_to_node(np.zeros((2, 2, 2)), scene=scene)


def test_labelmap_volume(scene):
    vol = _oblique_volume(np.uint8)
    node = mrml.volume_to_node(vol, "label", scene=scene, labelmap=True)
    assert node.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    np.testing.assert_array_equal(mrml.node_to_volume(node).array, vol.array)
    with pytest.raises(InputError, match="labelmap"):
        mrml.volume_to_node(_oblique_volume(np.float32), scene=scene, labelmap=True)


def test_node_to_volume_in_world_includes_parent_transform(scene):
    vol = _oblique_volume()
    node = mrml.volume_to_node(vol, scene=scene)
    t_lps = _rigid([0, 0, 1], 0.3, [5.0, -2.0, 1.0])
    tnode = mrml.matrix_to_transform_node(t_lps, "move", scene=scene)
    mrml.apply_transform(node, tnode)
    assert node.GetParentTransformNode() is tnode
    world = mrml.node_to_volume(node, world=True)
    np.testing.assert_allclose(world.ijk_to_lps(), t_lps @ vol.ijk_to_lps(), rtol=0, atol=1e-12)
    local = mrml.node_to_volume(node)
    np.testing.assert_allclose(local.ijk_to_lps(), vol.ijk_to_lps(), rtol=0, atol=1e-15)
    mrml.apply_transform(node, None)
    assert node.GetParentTransformNode() is None


def test_complex_volume_round_trip(scene):
    rng = np.random.default_rng(1)
    iq = (rng.standard_normal((3, 4, 5)) + 1j * rng.standard_normal((3, 4, 5))).astype(np.complex64)
    node = mrml.complex_to_node(iq, spacing_xyz=[0.1, 0.2, 0.5], origin_lps=[1, 2, 3], scene=scene)
    assert node.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert node.GetImageData().GetNumberOfScalarComponents() == 2
    arr = mrml.node_to_volume(node).array
    np.testing.assert_array_equal(arr[..., 0], iq.real)
    np.testing.assert_array_equal(arr[..., 1], iq.imag)
    back = mrml.node_to_complex(node)
    assert back.array.dtype == np.complex64
    np.testing.assert_array_equal(back.array, iq)
    np.testing.assert_array_equal(back.spacing_xyz, [0.1, 0.2, 0.5])
    # A complex Volume goes through volume_to_node as well, double precision kept.
    vol = Volume(iq.astype(np.complex128) * 1e-3, [1, 1, 1], [0, 0, 0], np.eye(3))
    back2 = mrml.node_to_complex(mrml.volume_to_node(vol, scene=scene))
    assert back2.array.dtype == np.complex128
    np.testing.assert_array_equal(back2.array, vol.array)
    with pytest.raises(InputError, match="complex"):
        mrml.complex_to_node(np.zeros((2, 2, 2), np.float32), scene=scene)
    with pytest.raises(InputError, match="two-component"):
        mrml.node_to_complex(mrml.volume_to_node(_oblique_volume(), scene=scene))


# -- transforms --------------------------------------------------------------------------------------
def test_transform_round_trip_and_known_point(scene):
    t_lps = _rigid([0.3, -1.0, 0.2], 0.9, [10.0, -4.0, 2.5])
    node = mrml.matrix_to_transform_node(t_lps, "T", scene=scene)
    assert node.GetClassName() == "vtkMRMLLinearTransformNode"
    np.testing.assert_array_equal(mrml.transform_node_to_matrix(node), t_lps)
    np.testing.assert_array_equal(mrml.transform_node_to_matrix_ras(node), LPS_TO_RAS @ t_lps @ LPS_TO_RAS)

    import vtk

    p_lps = np.array([3.0, -8.0, 5.0, 1.0])
    q_lps = t_lps @ p_lps
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(m)
    q_ras = _vtk_apply(m, [-p_lps[0], -p_lps[1], p_lps[2], 1.0])
    np.testing.assert_allclose(q_ras[:3], [-q_lps[0], -q_lps[1], q_lps[2]], rtol=0, atol=1e-12)

    # RAS variant: stored unchanged; updating the node in place.
    m_ras = _rigid([1, 0, 0], -0.4, [0, 1, 2])
    same = mrml.matrix_to_transform_node_ras(m_ras, node=node)
    assert same is node
    np.testing.assert_array_equal(mrml.transform_node_to_matrix_ras(node), m_ras)


def test_transform_bad_inputs(scene):
    with pytest.raises(InputError, match="4x4"):
        mrml.matrix_to_transform_node(np.eye(3), "bad", scene=scene)
    bad = np.eye(4)
    bad[3, 0] = 1.0
    with pytest.raises(InputError, match="last row"):
        mrml.matrix_to_transform_node(bad, "bad", scene=scene)
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(InputError, match="finite"):
        mrml.matrix_to_transform_node_ras(bad, "bad", scene=scene)
    with pytest.raises(InputError, match="transform node"):
        mrml.transform_node_to_matrix(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))


# -- freehand sweeps ---------------------------------------------------------------------------------
def _sweep(n=4, h=5, w=7):
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    tforms = np.stack([_rigid([1.0, 0.5, -0.3], 0.2 * k, [k * 1.5, -2.0 + k, 30.0 - k]) for k in range(n)])
    timestamps = 0.05 * np.arange(n) + 1.234
    return frames, np.array([0.21, 0.37]), tforms, timestamps


def test_sweep_round_trip_and_known_pixel(scene):
    frames, spacing, tforms, timestamps = _sweep()
    browser = mrml.sweep_to_browser(frames, spacing, tforms, timestamps, name="Sweep", scene=scene)
    assert browser.GetClassName() == "vtkMRMLSequenceBrowserNode"
    assert browser.GetNumberOfItems() == len(frames)
    image_seq = browser.GetMasterSequenceNode()
    assert image_seq.GetNumberOfDataNodes() == len(frames)
    assert image_seq.GetIndexUnit() == "s"

    back = mrml.browser_to_sweep(browser)
    np.testing.assert_array_equal(back["frames"], frames)
    assert back["frames"].dtype == np.uint8
    np.testing.assert_array_equal(back["pixel_spacing_mm"], spacing)
    np.testing.assert_allclose(back["tforms"], tforms, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back["timestamps_s"], timestamps)

    # The stored ImageToReference matrix maps pixel (c, r) of frame i to RAS.
    seqs = [s for s in scene.GetNodesByClass("vtkMRMLSequenceNode") if s.GetName() == "Sweep-ImageToReference"]
    assert len(seqs) == 1
    tfm_seq = seqs[0]
    assert tfm_seq.GetNumberOfDataNodes() == len(frames)
    import vtk

    i, c, r = 2, 6, 3
    m = vtk.vtkMatrix4x4()
    tfm_seq.GetNthDataNode(i).GetMatrixTransformToParent(m)
    expected = LPS_TO_RAS @ tforms[i] @ np.array([c * spacing[0], r * spacing[1], 0.0, 1.0])
    np.testing.assert_allclose(_vtk_apply(m, [c, r, 0, 1]), expected, rtol=0, atol=1e-12)

    # Proxies: frame 0 shown, under the transform proxy holding frame 0's matrix.
    image_proxy = browser.GetProxyNode(image_seq)
    tfm_proxy = browser.GetProxyNode(tfm_seq)
    assert image_proxy is not None and tfm_proxy is not None
    assert image_proxy.GetScene() is scene and tfm_proxy.GetScene() is scene
    assert browser.GetSelectedItemNumber() == 0
    import slicer

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(image_proxy)[0], frames[0])
    assert image_proxy.GetParentTransformNode() is tfm_proxy
    np.testing.assert_allclose(
        mrml.transform_node_to_matrix_ras(tfm_proxy),
        LPS_TO_RAS @ tforms[0] @ np.diag([spacing[0], spacing[1], 1, 1]),
        rtol=0,
        atol=1e-12,
    )
    # World position of pixel (c, r) of the shown frame, through the proxy's transform.
    world = mrml.world_matrix_ras(image_proxy) @ mrml.ijk_to_ras(image_proxy) @ np.array([c, r, 0, 1.0])
    np.testing.assert_allclose(world, LPS_TO_RAS @ tforms[0] @ [c * spacing[0], r * spacing[1], 0, 1], atol=1e-12)


def test_sweep_without_tforms_or_timestamps(scene):
    frames, spacing, _, _ = _sweep(n=3)
    browser = mrml.sweep_to_browser(frames, spacing, scene=scene)
    back = mrml.browser_to_sweep(browser)
    np.testing.assert_array_equal(back["frames"], frames)
    np.testing.assert_array_equal(back["pixel_spacing_mm"], spacing)
    assert back["tforms"] is None and back["timestamps_s"] is None
    assert browser.GetMasterSequenceNode().GetNthIndexValue(2) == "2"


def test_estimated_poses_added_to_browser(scene):
    frames, spacing, tforms, timestamps = _sweep()
    browser = mrml.sweep_to_browser(frames, spacing, tforms, timestamps, scene=scene)
    estimate = tforms.copy()
    estimate[:, :3, 3] += 1.0
    seq = mrml.poses_to_transform_sequence(browser, estimate, spacing)
    assert seq.GetName() == "ImageToReference-estimated"
    assert browser.IsSynchronizedSequenceNodeID(seq.GetID(), True)
    assert browser.GetProxyNode(seq) is not None
    # The tracked poses stay the default; the estimate is read back by name.
    np.testing.assert_allclose(mrml.browser_to_sweep(browser)["tforms"], tforms, rtol=0, atol=1e-12)
    back = mrml.browser_to_sweep(browser, transform_name="ImageToReference-estimated")
    np.testing.assert_allclose(back["tforms"], estimate, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back["timestamps_s"], timestamps)
    with pytest.raises(InputError, match=r"\[4, 4, 4\]"):
        mrml.poses_to_transform_sequence(browser, estimate[:3], spacing)


def test_sweep_bad_inputs(scene):
    frames, spacing, tforms, timestamps = _sweep(n=3)
    with pytest.raises(InputError, match="uint8"):
        mrml.sweep_to_browser(frames.astype(np.float32), spacing, scene=scene)
    with pytest.raises(InputError, match="frames"):
        mrml.sweep_to_browser(np.zeros((0, 4, 4), np.uint8), spacing, scene=scene)
    with pytest.raises(InputError, match="pixel_spacing_xy"):
        mrml.sweep_to_browser(frames, [0.2, -1.0], scene=scene)
    with pytest.raises(InputError, match="tforms"):
        mrml.sweep_to_browser(frames, spacing, tforms[:2], scene=scene)
    with pytest.raises(InputError, match="increasing"):
        mrml.sweep_to_browser(frames, spacing, tforms, timestamps[::-1], scene=scene)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode") == 0  # nothing half-built


# -- ULM IQ sequences --------------------------------------------------------------------------------
def test_complex_sequence_round_trip_and_orientation(scene):
    rng = np.random.default_rng(3)
    iq = (rng.standard_normal((3, 6, 4)) + 1j * rng.standard_normal((3, 6, 4))).astype(np.complex64)
    pixel_size, origin = np.array([0.05, 0.1]), np.array([2.0, -0.15])  # [dz, dx], [z0, x0]
    browser = mrml.complex_sequence(iq, pixel_size, origin, frame_rate_hz=500.0, name="IQ", scene=scene)
    seq = browser.GetMasterSequenceNode()
    assert seq.GetNumberOfDataNodes() == 3
    frame = seq.GetNthDataNode(1)
    assert frame.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert frame.GetImageData().GetDimensions() == (4, 6, 1)  # i = x, j = z, one slice

    back = mrml.sequence_to_complex(browser)
    assert back["iq"].dtype == np.complex64
    np.testing.assert_array_equal(back["iq"].real, iq.real)
    np.testing.assert_array_equal(back["iq"].imag, iq.imag)
    np.testing.assert_array_equal(back["pixel_size_mm"], pixel_size)
    np.testing.assert_array_equal(back["origin_mm"], origin)
    assert back["frame_rate_hz"] == 500.0
    np.testing.assert_array_equal(back["timestamps_s"], np.arange(3) / 500.0)

    # Pixel (z=4, x=3) lies at lateral x0 + 3 dx (LPS +x -> RAS -x) and depth z0 + 4 dz below (RAS -S).
    ras = mrml.ijk_to_ras(frame) @ np.array([3, 4, 0, 1.0])
    np.testing.assert_allclose(ras[:3], [-(origin[1] + 3 * 0.1), 0.0, -(origin[0] + 4 * 0.05)], atol=1e-12)
    # The shown proxy is frame 0.
    proxy = browser.GetProxyNode(seq)
    np.testing.assert_array_equal(mrml.node_to_complex(proxy).array[0], iq[0])


def test_real_volume_sequence_round_trip_and_bad_inputs(scene):
    arrays = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    direction = _rotation([0, 1, 1], 0.4)
    browser = mrml.volume_sequence_from_arrays(arrays, [0.5, 0.25, 2.0], [1, 2, 3], direction, scene=scene)
    back = mrml.sequence_to_arrays(browser)
    np.testing.assert_array_equal(back["arrays"], arrays)
    np.testing.assert_array_equal(back["spacing_xyz"], [0.5, 0.25, 2.0])
    np.testing.assert_allclose(back["direction"], direction, rtol=0, atol=1e-15)
    assert back["timestamps_s"] is None
    with pytest.raises(InputError, match="ULM frame orientation"):
        mrml.sequence_to_complex(
            mrml.volume_sequence_from_arrays(np.zeros((2, 1, 3, 4, 2), np.float32), [1, 1, 1], [0, 0, 0], scene=scene)
        )
    with pytest.raises(InputError, match="complex"):
        mrml.complex_sequence(np.zeros((2, 3, 4), np.float32), [0.1, 0.1], [0, 0], scene=scene)
    with pytest.raises(InputError, match="pixel_size_mm"):
        mrml.complex_sequence(np.zeros((2, 3, 4), np.complex64), [0.1], [0, 0], scene=scene)


# -- markups -----------------------------------------------------------------------------------------
def test_curve_round_trip_in_ras(scene):
    pts = np.array([[1.0, 2.0, 3.0], [-4.5, 0.25, 7.0], [0.0, -3.0, -1.0]])
    node = mrml.trajectory_to_curve(pts, "Probe path", scene=scene)
    assert node.GetClassName() == "vtkMRMLMarkupsCurveNode"
    assert node.GetNumberOfControlPoints() == 3
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(1, p)
    assert p == [4.5, -0.25, 7.0]
    np.testing.assert_array_equal(mrml.curve_to_trajectory(node), pts)
    # Updating with fewer points replaces them all.
    mrml.trajectory_to_curve(pts[:2], node=node)
    np.testing.assert_array_equal(mrml.curve_to_trajectory(node), pts[:2])
    with pytest.raises(InputError, match=r"\[N, 3\]"):
        mrml.trajectory_to_curve(np.zeros((3, 2)), scene=scene)
    with pytest.raises(InputError, match="at least one"):
        mrml.trajectory_to_curve(np.zeros((0, 3)), scene=scene)


def test_fiducials_round_trip_with_labels(scene):
    pts = np.array([[10.0, -20.0, 30.0], [0.5, 0.5, -0.5]])
    node = mrml.points_to_fiducials(pts, ["apex", "base"], "Targets", scene=scene)
    assert node.GetClassName() == "vtkMRMLMarkupsFiducialNode"
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, p)
    assert p == [-10.0, 20.0, 30.0]
    back, labels = mrml.fiducials_to_points(node)
    np.testing.assert_array_equal(back, pts)
    assert labels == ["apex", "base"]
    default = mrml.points_to_fiducials(pts, name="T", scene=scene)
    assert mrml.fiducials_to_points(default)[1] == ["T-1", "T-2"]
    # World coordinates follow a parent transform (LPS translation by +1 in x).
    shift = np.eye(4)
    shift[0, 3] = 1.0
    mrml.apply_transform(node, mrml.matrix_to_transform_node(shift, "shift", scene=scene))
    np.testing.assert_allclose(mrml.fiducials_to_points(node, world=True)[0], pts + [1.0, 0, 0], atol=1e-12)
    with pytest.raises(InputError, match="labels"):
        mrml.points_to_fiducials(pts, ["only one"], scene=scene)
    empty = mrml.points_to_fiducials(np.zeros((0, 3)), scene=scene)
    assert empty.GetNumberOfControlPoints() == 0
    assert mrml.fiducials_to_points(empty)[0].shape == (0, 3)


# -- scene -------------------------------------------------------------------------------------------
def test_scene_logics_idempotent_and_volume_rendering(scene):
    import slicer

    assert slicer.mrmlScene is scene
    first = mrml.ensure_logics(scene)
    assert mrml.ensure_logics(scene) is first
    assert {"sequences", "markups", "volumerendering"} <= set(first)
    # Default scene: functions called without `scene` use slicer.mrmlScene.
    node = mrml.volume_to_node(_oblique_volume(np.float32))
    assert node.GetScene() is scene
    display = mrml.show_volume_rendering(node)
    assert display is not None and display.IsA("vtkMRMLVolumeRenderingDisplayNode")
    assert display.GetVisibility() == 1
    assert mrml.show_volume_rendering(node) is display  # reused, not duplicated
    with pytest.raises(InputError, match="scene"):
        mrml.ensure_logics("not a scene")
