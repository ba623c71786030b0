"""Freehand sweeps and ULM IQ data <-> sequences in a vtkMRMLSequenceBrowserNode.

Freehand sweep (docs/DATA_FORMATS.md contract: frames uint8 [N, H, W], pixel_spacing_mm = [sx, sy], tforms
[N, 4, 4] image-mm -> LPS mm), stored as PLUS / SlicerIGT do:

* an image sequence: each frame a single-slice scalar volume [1, H, W] with spacing 1 and identity
  IJKToRAS, so voxel (i, j) = (column, row) sits at RAS (i, j, 0) before any transform;
* an "ImageToReference" linear-transform sequence whose matrices map those pixel indices to RAS:
  ``LPS_TO_RAS @ tforms[n] @ diag(sx, sy, 1, 1)`` (the pixel -> mm scaling inside the transform);
* both in one browser, index values the timestamps in seconds (or frame numbers), with the image
  proxy under the transform proxy so the views show the current frame in place.
Without tforms there is no transform sequence and the frames keep their physical size instead
(spacing sx, sy, 1), so the spacing is still recoverable.

ULM IQ (complex [T, Z, X], pixel_size_mm = [dz, dx], origin_mm = [z0, x0]): a sequence of
two-component (real, imaginary) vector volumes, one per frame, each a single slice [1, Z, X, 2].
The image is put in the coronal plane so Slicer shows it as a B-mode display:
  i = x (lateral)  -> LPS +x (patient left; screen right in the coronal view), spacing dx;
  j = z (depth)    -> LPS -z (inferior; downwards on screen), spacing dz;
  k (one slice)    -> LPS +y (posterior; i x j, right-handed), spacing `thickness_mm`;
  voxel (0, 0, 0) at LPS (x0, 0, -z0).
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import LPS_TO_RAS
from ultrasound_ai.io.volume import Volume
from ultrasound_ai.mrml.scene import ensure_logics, import_slicer, node_scene, resolve_scene
from ultrasound_ai.mrml.transforms import check_affine, numpy_matrix, vtk_matrix
from ultrasound_ai.mrml.volumes import (
    COMPLEX_COMPONENTS,
    COMPONENTS_ATTRIBUTE,
    complex_to_two_components,
    fill_volume_node,
    ijk_to_ras,
    node_to_volume,
    two_components_to_complex,
)

ROLE_ATTRIBUTE = "UltrasoundAI.Role"
SPACING_ATTRIBUTE = "UltrasoundAI.PixelSpacingMm"  # exact "sx sy" beside the matrices' column norms
FRAME_RATE_ATTRIBUTE = "UltrasoundAI.FrameRateHz"
ROLE_IMAGE = "Image"
ROLE_IMAGE_TO_REFERENCE = "ImageToReference"
ROLE_ESTIMATE = "ImageToReference-estimated"
ROLE_IQ = "IQ"

# Directions (columns: i, j, k) of a ULM frame in LPS; see the module docstring.
ULM_DIRECTION_LPS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
# A stored spacing attribute is used when it agrees with the matrix column norms to this relative
# tolerance (it then gives the exact numbers back; the norms carry rounding).
_SPACING_RTOL = 1e-9
# Column norms of different frames' matrices must agree to this relative tolerance.
_SPACING_CONSISTENCY_RTOL = 1e-4


# -- index values ------------------------------------------------------------------------------------
def _index_values(n: int, timestamps_s, what: str = "timestamps_s"):
    """(index value strings, index name, unit, float timestamps or None)."""
    if timestamps_s is None:
        return [str(k) for k in range(n)], "frame", "", None
    t = np.asarray(timestamps_s, dtype=np.float64)
    if t.shape != (n,):
        raise InputError(f"{what}: expected {n} values (one per frame), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise InputError(f"{what}: expected finite times in seconds, got NaN or infinity")
    if n > 1 and not np.all(np.diff(t) > 0):
        raise InputError(f"{what}: expected strictly increasing times (sequence index values must be unique)")
    # repr gives the shortest string that parses back to the same float, so the round trip is exact.
    return [repr(float(v)) for v in t], "time", "s", t


def _new_sequence(scene, name: str, index_name: str, index_unit: str, role: str):
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    seq.SetIndexName(index_name)
    seq.SetIndexUnit(index_unit)
    seq.SetIndexType(seq.NumericIndex)
    seq.SetAttribute(ROLE_ATTRIBUTE, role)
    return seq


def _sequence_logic(scene):
    logic = ensure_logics(scene).get("sequences")
    if logic is None:  # pragma: no cover - every Slicer build has it
        raise RuntimeError("the Sequences module logic is not available")
    return logic


def _new_browser(scene, name: str, master, synchronized=()):
    _sequence_logic(scene)  # registers vtkMRMLSequenceBrowserNode with slicer-core scenes
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", name)
    browser.SetAndObserveMasterSequenceNodeID(master.GetID())
    for seq in synchronized:
        browser.AddSynchronizedSequenceNode(seq.GetID())
    browser.SetSelectedItemNumber(0)
    _sequence_logic(scene).UpdateProxyNodesFromSequences(browser)
    return browser


def _check_browser(browser):
    slicer = import_slicer()
    if not isinstance(browser, slicer.vtkMRMLSequenceBrowserNode):
        raise InputError(f"browser: expected a vtkMRMLSequenceBrowserNode, got {type(browser).__name__}")
    if browser.GetMasterSequenceNode() is None:
        raise InputError(f"browser {browser.GetName()!r}: has no master sequence")
    return browser


def _browser_sequences(browser) -> list:
    """All sequences of a browser, master first."""
    nodes = [browser.GetMasterSequenceNode()]
    import vtk

    collection = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(collection, True)
    for k in range(collection.GetNumberOfItems()):
        seq = collection.GetItemAsObject(k)
        if all(seq is not s for s in nodes):
            nodes.append(seq)
    return nodes


browser_sequences = _browser_sequences  # the public name (module Logics remove a browser's sequences)


# -- matrices ----------------------------------------------------------------------------------------
def _check_spacing(pixel_spacing_xy, what: str = "pixel_spacing_xy") -> np.ndarray:
    s = np.asarray(pixel_spacing_xy, dtype=np.float64).reshape(-1)
    if s.shape != (2,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise InputError(f"{what}: expected [sx, sy], two positive mm values (column spacing first), got {s.tolist()}")
    return s


def _check_tforms(tforms, n: int, what: str = "tforms") -> np.ndarray:
    t = np.asarray(tforms, dtype=np.float64)
    if t.shape != (n, 4, 4):
        raise InputError(f"{what}: expected shape [{n}, 4, 4] (one 4x4 per frame), got {t.shape}")
    for k in range(n):
        check_affine(t[k], f"{what}[{k}]")
    return t


def pixel_to_ras_matrices(tforms, pixel_spacing_xy) -> np.ndarray:
    """tforms [N, 4, 4] (image mm -> LPS) -> PLUS ImageToReference matrices (pixel -> RAS) [N, 4, 4]."""
    s = _check_spacing(pixel_spacing_xy)
    t = np.asarray(tforms, dtype=np.float64)
    return LPS_TO_RAS @ t @ np.diag([s[0], s[1], 1.0, 1.0])


def _transform_sequence(scene, name, tforms, spacing, index, index_name, index_unit, role):
    slicer = import_slicer()
    seq = _new_sequence(scene, name, index_name, index_unit, role)
    seq.SetAttribute(SPACING_ATTRIBUTE, f"{spacing[0]!r} {spacing[1]!r}")
    node = slicer.vtkMRMLLinearTransformNode()
    for k, m in enumerate(pixel_to_ras_matrices(tforms, spacing)):
        node.SetMatrixTransformToParent(vtk_matrix(m))
        seq.SetDataNodeAtValue(node, index[k])  # the sequence stores a copy
    return seq


# -- freehand sweeps ---------------------------------------------------------------------------------
def sweep_to_browser(frames, pixel_spacing_xy, tforms=None, timestamps_s=None, name: str = "Sweep", scene=None):
    """A sequence browser holding a freehand sweep (see the module docstring); shows frame 0.

    Sequences are named "<name>-Image" and "<name>-ImageToReference", as are their proxy nodes.
    """
    slicer = import_slicer()
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise InputError(f"frames: expected a non-empty uint8 array [N, H, W], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise InputError(f"frames: expected dtype uint8, got {frames.dtype}")
    n = frames.shape[0]
    spacing = _check_spacing(pixel_spacing_xy)
    t = None if tforms is None else _check_tforms(tforms, n)
    index, index_name, index_unit, _ = _index_values(n, timestamps_s)
    scene = resolve_scene(scene)

    image_seq = _new_sequence(scene, f"{name}-Image", index_name, index_unit, ROLE_IMAGE)
    image_seq.SetAttribute(SPACING_ATTRIBUTE, f"{spacing[0]!r} {spacing[1]!r}")
    # PLUS convention (spacing 1, identity) when the transforms carry the scaling; physical size otherwise.
    frame_spacing = (1.0, 1.0, 1.0) if t is not None else (float(spacing[0]), float(spacing[1]), 1.0)
    frame = slicer.vtkMRMLScalarVolumeNode()
    for k in range(n):
        slicer.util.updateVolumeFromArray(frame, np.ascontiguousarray(frames[k][np.newaxis]))
        frame.SetSpacing(*frame_spacing)
        image_seq.SetDataNodeAtValue(frame, index[k])

    synchronized = []
    if t is not None:
        synchronized.append(
            _transform_sequence(
                scene, f"{name}-{ROLE_IMAGE_TO_REFERENCE}", t, spacing, index, index_name, index_unit,
                ROLE_IMAGE_TO_REFERENCE,
            )
        )
    browser = _new_browser(scene, name, image_seq, synchronized)
    image_proxy = browser.GetProxyNode(image_seq)
    if image_proxy is not None and image_proxy.GetScene() is not None:
        image_proxy.CreateDefaultDisplayNodes()
    if synchronized:
        transform_proxy = browser.GetProxyNode(synchronized[0])
        if image_proxy is not None and transform_proxy is not None:
            image_proxy.SetAndObserveTransformNodeID(transform_proxy.GetID())
    return browser


def poses_to_transform_sequence(browser, tforms, pixel_spacing_xy, name: str = ROLE_ESTIMATE):
    """Add an estimated pose sequence (image mm -> LPS, one per frame of the browser's master
    sequence) to `browser` as a synchronized ImageToReference-style transform sequence named `name`.
    Returns the new vtkMRMLSequenceNode; its proxy is ``browser.GetProxyNode(sequence)``."""
    browser = _check_browser(browser)
    master = browser.GetMasterSequenceNode()
    n = master.GetNumberOfDataNodes()
    spacing = _check_spacing(pixel_spacing_xy)
    t = _check_tforms(tforms, n)
    scene = node_scene(browser, "browser")
    index = [master.GetNthIndexValue(k) for k in range(n)]
    seq = _transform_sequence(
        scene, name, t, spacing, index, master.GetIndexName(), master.GetIndexUnit(), ROLE_ESTIMATE
    )
    browser.AddSynchronizedSequenceNode(seq.GetID())
    _sequence_logic(scene).UpdateProxyNodesFromSequences(browser)
    return seq


def _is_volume_sequence(seq) -> bool:
    slicer = import_slicer()
    node = seq.GetNthDataNode(0) if seq.GetNumberOfDataNodes() else None
    return isinstance(node, slicer.vtkMRMLScalarVolumeNode)


def _is_linear_transform_sequence(seq) -> bool:
    slicer = import_slicer()
    node = seq.GetNthDataNode(0) if seq.GetNumberOfDataNodes() else None
    return isinstance(node, slicer.vtkMRMLLinearTransformNode)


def _pick_transform_sequence(browser, sequences, transform_name):
    transforms = [s for s in sequences if _is_linear_transform_sequence(s)]
    if transform_name is not None:
        for seq in transforms:
            proxy = browser.GetProxyNode(seq)
            if seq.GetName() == transform_name or (proxy is not None and proxy.GetName() == transform_name):
                return seq
        raise InputError(f"transform_name: browser {browser.GetName()!r} has no transform sequence named {transform_name!r}")
    # Ours first (by role), then PLUS's naming; an estimate is never taken for the tracked poses.
    for seq in transforms:
        if seq.GetAttribute(ROLE_ATTRIBUTE) == ROLE_IMAGE_TO_REFERENCE:
            return seq
    for seq in transforms:
        if "ImageToReference" in seq.GetName() and seq.GetAttribute(ROLE_ATTRIBUTE) != ROLE_ESTIMATE:
            return seq
    return None


def _stored_spacing(seq):
    text = seq.GetAttribute(SPACING_ATTRIBUTE) if seq is not None else None
    if not text:
        return None
    try:
        s = np.array([float(v) for v in text.split()], dtype=np.float64)
    except ValueError:
        return None
    return s if s.shape == (2,) and np.all(s > 0) else None


def browser_to_sweep(browser, transform_name: str | None = None) -> dict:
    """The sweep held by a browser: {"frames" [N, H, W], "pixel_spacing_mm" [sx, sy], "tforms"
    [N, 4, 4] image mm -> LPS or None, "timestamps_s" [N] or None}.

    The image sequence is the master (or the first volume sequence); the transform sequence is the one
    named `transform_name` (sequence or proxy name), else ours, else one whose name contains
    "ImageToReference" (PLUS), else none. Spacing comes from the column norms of pixel -> RAS (the
    transform times the frame's IJKToRAS); frames whose spacing differs raise InputError.
    """
    slicer = import_slicer()
    browser = _check_browser(browser)
    sequences = _browser_sequences(browser)
    image_seq = next((s for s in sequences if _is_volume_sequence(s)), None)
    if image_seq is None:
        raise InputError(f"browser {browser.GetName()!r}: expected an image (volume) sequence, found none")
    n = image_seq.GetNumberOfDataNodes()
    index = [image_seq.GetNthIndexValue(k) for k in range(n)]
    frames, frame_ijk = [], []
    for k in range(n):
        node = image_seq.GetNthDataNode(k)
        a = slicer.util.arrayFromVolume(node)
        if a.ndim != 3 or a.shape[0] != 1:
            raise InputError(
                f"browser {browser.GetName()!r}: frame {k} expected a single-slice scalar image [1, H, W], "
                f"got shape {a.shape}"
            )
        if frames and a.shape[1:] != frames[0].shape:
            raise InputError(f"browser {browser.GetName()!r}: frame {k} has shape {a.shape[1:]}, frame 0 {frames[0].shape}")
        frames.append(np.array(a[0], copy=True))
        frame_ijk.append(ijk_to_ras(node))
    frames = np.stack(frames)

    timestamps = None
    unit = (image_seq.GetIndexUnit() or "").strip().lower()
    if unit in ("s", "sec", "second", "seconds") or (image_seq.GetIndexName() or "").lower() == "time":
        try:
            timestamps = np.array([float(v) for v in index], dtype=np.float64)
        except ValueError as exc:
            raise InputError(f"browser {browser.GetName()!r}: time index values are not numbers: {exc}") from exc
        if unit in ("ms", "millisecond", "milliseconds"):  # pragma: no cover - not produced by us
            timestamps = timestamps / 1000.0

    tfm_seq = _pick_transform_sequence(browser, sequences, transform_name)
    if tfm_seq is None:
        p = frame_ijk[0]
        spacing = np.linalg.norm(p[:3, :2], axis=0)
        stored = _stored_spacing(image_seq)
        if stored is not None and np.allclose(stored, spacing, rtol=_SPACING_RTOL, atol=0):
            spacing = stored
        return {"frames": frames, "pixel_spacing_mm": spacing, "tforms": None, "timestamps_s": timestamps}

    pixel_to_ras = np.zeros((n, 4, 4))
    for k in range(n):
        data = tfm_seq.GetDataNodeAtValue(index[k], True)
        if data is None:
            raise InputError(
                f"browser {browser.GetName()!r}: transform sequence {tfm_seq.GetName()!r} has no item at "
                f"index value {index[k]} (frame {k})"
            )
        import vtk

        m = vtk.vtkMatrix4x4()
        data.GetMatrixTransformToParent(m)
        pixel_to_ras[k] = numpy_matrix(m) @ frame_ijk[k]
    norms = np.linalg.norm(pixel_to_ras[:, :3, :2], axis=1)  # [N, 2]: column norms = sx, sy
    spacing = norms[0]
    if not np.allclose(norms, spacing, rtol=_SPACING_CONSISTENCY_RTOL, atol=0):
        raise InputError(
            f"browser {browser.GetName()!r}: pixel spacing differs between frames of {tfm_seq.GetName()!r} "
            f"(from {norms.min(axis=0).tolist()} to {norms.max(axis=0).tolist()} mm)"
        )
    stored = _stored_spacing(tfm_seq)
    if stored is not None and np.allclose(stored, spacing, rtol=_SPACING_RTOL, atol=0):
        spacing = stored
    tforms = LPS_TO_RAS @ pixel_to_ras @ np.diag([1.0 / spacing[0], 1.0 / spacing[1], 1.0, 1.0])
    # PLUS may scale the out-of-plane column too; image mm's z axis is a unit vector.
    z_norm = np.linalg.norm(tforms[:, :3, 2], axis=1)
    off = np.abs(z_norm - 1.0) > 1e-6
    if np.any(off):
        tforms[off, :3, 2] /= z_norm[off, None]
    return {"frames": frames, "pixel_spacing_mm": spacing, "tforms": tforms, "timestamps_s": timestamps}


# -- volume sequences (ULM) --------------------------------------------------------------------------
def volume_sequence_from_arrays(
    arrays,
    spacing_xyz,
    origin_lps,
    direction=None,
    timestamps_s=None,
    name: str = "Volumes",
    scene=None,
    role: str | None = None,
):
    """A browser over a sequence of volumes on one grid: `arrays` real [T, k, j, i] (scalar) or
    [T, k, j, i, C] (vector), geometry as in `Volume` (LPS). Index values are the timestamps in
    seconds, or frame numbers. The sequence is named `name`, as is its proxy."""
    slicer = import_slicer()
    arrays = np.asarray(arrays)
    if arrays.ndim not in (4, 5) or arrays.shape[0] == 0:
        raise InputError(f"arrays: expected [T, k, j, i] or [T, k, j, i, C] with T >= 1, got shape {arrays.shape}")
    if np.iscomplexobj(arrays):
        raise InputError("arrays: complex data go through complex_sequence (two-component volumes)")
    n = arrays.shape[0]
    index, index_name, index_unit, _ = _index_values(n, timestamps_s)
    scene = resolve_scene(scene)
    direction = np.eye(3) if direction is None else direction
    vector = arrays.ndim == 5
    seq = _new_sequence(scene, name, index_name, index_unit, role or "Volumes")
    node = slicer.vtkMRMLVectorVolumeNode() if vector else slicer.vtkMRMLScalarVolumeNode()
    for k in range(n):
        fill_volume_node(node, Volume(arrays[k], spacing_xyz, origin_lps, direction))
        seq.SetDataNodeAtValue(node, index[k])
    browser = _new_browser(scene, name, seq)
    proxy = browser.GetProxyNode(seq)
    if proxy is not None and proxy.GetScene() is not None:
        proxy.CreateDefaultDisplayNodes()
    return browser


def _volume_sequence(browser_or_sequence):
    slicer = import_slicer()
    if isinstance(browser_or_sequence, slicer.vtkMRMLSequenceBrowserNode):
        seq = next((s for s in _browser_sequences(_check_browser(browser_or_sequence)) if _is_volume_sequence(s)), None)
    elif isinstance(browser_or_sequence, slicer.vtkMRMLSequenceNode):
        seq = browser_or_sequence if _is_volume_sequence(browser_or_sequence) else None
    else:
        raise InputError(
            f"sequence: expected a vtkMRMLSequenceBrowserNode or vtkMRMLSequenceNode, got {type(browser_or_sequence).__name__}"
        )
    if seq is None:
        raise InputError(f"sequence {browser_or_sequence.GetName()!r}: expected a sequence of volumes")
    return seq


def sequence_to_arrays(browser_or_sequence) -> dict:
    """Inverse of volume_sequence_from_arrays: {"arrays" [T, k, j, i(, C)], "spacing_xyz",
    "origin_lps", "direction", "timestamps_s" [T] or None}. All frames must share one grid."""
    seq = _volume_sequence(browser_or_sequence)
    volumes = [node_to_volume(seq.GetNthDataNode(k)) for k in range(seq.GetNumberOfDataNodes())]
    first = volumes[0]
    for k, v in enumerate(volumes[1:], start=1):
        if v.array.shape != first.array.shape or not v.same_grid(first, atol=1e-9):
            raise InputError(f"sequence {seq.GetName()!r}: frame {k} is not on frame 0's grid")
    timestamps = None
    if (seq.GetIndexUnit() or "").strip().lower() == "s":
        timestamps = np.array([float(seq.GetNthIndexValue(k)) for k in range(len(volumes))])
    return {
        "arrays": np.stack([v.array for v in volumes]),
        "spacing_xyz": first.spacing_xyz,
        "origin_lps": first.origin_lps,
        "direction": first.direction,
        "timestamps_s": timestamps,
    }


def ulm_geometry(pixel_size_mm, origin_mm, thickness_mm: float | None = None):
    """(spacing_xyz, origin_lps, direction) of a ULM frame [Z, X] as a one-slice volume (docstring)."""
    p = np.asarray(pixel_size_mm, dtype=np.float64).reshape(-1)
    o = np.asarray(origin_mm, dtype=np.float64).reshape(-1)
    if p.shape != (2,) or not np.all(np.isfinite(p)) or not np.all(p > 0):
        raise InputError(f"pixel_size_mm: expected [dz, dx], two positive mm values, got {p.tolist()}")
    if o.shape != (2,) or not np.all(np.isfinite(o)):
        raise InputError(f"origin_mm: expected [z0, x0], two finite mm values, got {o.tolist()}")
    dz, dx = p
    thickness = float(dx) if thickness_mm is None else float(thickness_mm)
    if not thickness > 0:
        raise InputError(f"thickness_mm: expected a positive slice thickness in mm, got {thickness_mm}")
    spacing = np.array([dx, dz, thickness])
    origin = np.array([o[1], 0.0, -o[0]])
    return spacing, origin, ULM_DIRECTION_LPS.copy()


def complex_sequence(iq, pixel_size_mm, origin_mm, frame_rate_hz=None, name: str = "IQ", scene=None, thickness_mm=None):
    """A browser over ULM IQ data, complex [T, Z, X]: one two-component (real, imaginary) single-slice
    vector volume per frame, in the coronal plane (module docstring). Index values are t = n /
    frame_rate_hz seconds, or frame numbers without a frame rate. The slice thickness defaults to dx."""
    iq = np.asarray(iq)
    if iq.ndim != 3 or 0 in iq.shape:
        raise InputError(f"iq: expected a non-empty complex array [T, Z, X], got shape {iq.shape}")
    if not np.iscomplexobj(iq):
        raise InputError(f"iq: expected complex64 or complex128, got {iq.dtype}")
    spacing, origin, direction = ulm_geometry(pixel_size_mm, origin_mm, thickness_mm)
    timestamps = None
    if frame_rate_hz is not None:
        rate = float(frame_rate_hz)
        if not np.isfinite(rate) or rate <= 0:
            raise InputError(f"frame_rate_hz: expected a positive frame rate in Hz, got {frame_rate_hz}")
        timestamps = np.arange(iq.shape[0]) / rate
    two = complex_to_two_components(iq)[:, np.newaxis]  # [T, 1, Z, X, 2]: k is the single slice
    browser = volume_sequence_from_arrays(
        two, spacing, origin, direction, timestamps_s=timestamps, name=name, scene=scene, role=ROLE_IQ
    )
    seq = browser.GetMasterSequenceNode()
    seq.SetAttribute(COMPONENTS_ATTRIBUTE, COMPLEX_COMPONENTS)
    if frame_rate_hz is not None:
        seq.SetAttribute(FRAME_RATE_ATTRIBUTE, repr(float(frame_rate_hz)))
    return browser


def sequence_to_complex(browser_or_sequence) -> dict:
    """Inverse of complex_sequence: {"iq" complex [T, Z, X], "pixel_size_mm" [dz, dx], "origin_mm"
    [z0, x0], "frame_rate_hz" or None, "timestamps_s" [T] or None}."""
    seq = _volume_sequence(browser_or_sequence)
    data = sequence_to_arrays(seq)
    arrays = data["arrays"]
    if arrays.ndim != 5 or arrays.shape[1] != 1 or arrays.shape[4] != 2:
        raise InputError(
            f"sequence {seq.GetName()!r}: expected single-slice two-component (real, imaginary) volumes "
            f"[T, 1, Z, X, 2], got {arrays.shape}"
        )
    if not np.allclose(data["direction"], ULM_DIRECTION_LPS, atol=1e-9):
        raise InputError(
            f"sequence {seq.GetName()!r}: expected the ULM frame orientation (i = lateral -> L, j = depth -> I), "
            f"got direction {data['direction'].tolist()}"
        )
    spacing, origin = data["spacing_xyz"], data["origin_lps"]
    rate = None
    text = seq.GetAttribute(FRAME_RATE_ATTRIBUTE)
    if text:
        rate = float(text)
    elif data["timestamps_s"] is not None and len(data["timestamps_s"]) > 1:
        rate = float((len(data["timestamps_s"]) - 1) / (data["timestamps_s"][-1] - data["timestamps_s"][0]))
    return {
        "iq": two_components_to_complex(arrays[:, 0], f"sequence {seq.GetName()!r}"),
        "pixel_size_mm": np.array([spacing[1], spacing[0]]),
        "origin_mm": np.array([-origin[2], origin[0]]),
        "frame_rate_hz": rate,
        "timestamps_s": data["timestamps_s"],
    }
