"""UltrasoundAIULM Logic: ultrasound localization microscopy of an IQ acquisition held in the scene (or a file).

Imports ``slicer``, ``vtk`` and the engine, never ``qt`` or ``ctk``: it runs inside the Slicer
application and, for the tests, with the slicer-core wheel.

    logic = UltrasoundAIULMLogic()
    browser = logic.load_acquisition("acq.h5")                     # file -> two-component IQ sequence
    nodes = logic.run({"inputSequence": browser, "method": "rs"})  # blocking: job, then nodes
    launcher = logic.start(parameters)                             # non-blocking (the Widget's Apply)
    ... launcher.drain() from a timer ...; logic.cancel()
    nodes = logic.load_results(launcher.wait(), parameters)

Parameters are a dict or any object (the Widget's parameter node wrapper) with these names:
inputSequence (a vtkMRMLSequenceBrowserNode or vtkMRMLSequenceNode of two-component (real, imaginary)
IQ volumes, as ultrasound_ai.mrml.complex_sequence makes them) or inputAcquisitionFile (an acquisition
HDF5 file or a PALA IQ .mat file; used when there is no sequence), method ("rs" radial symmetry | "wa"
weighted average | "3dml" 3DML-ResNet), resolutionFactor (rendering pixel = wavelength / factor),
useCountingNetwork (per-frame counts from the counting network) or bubblesPerFrame, linkDistance
(maximum linking distance, acquisition pixels), minTrackLength (points), svdCutoff (singular
components removed per block; 0 = no clutter filter), blockFrames (frames per processing block),
wavelengthMm / frameRateHz (0 = from the sequence's attributes; needed for sequences that have none),
device ("auto", "cpu", "cuda[:N]", "mps"), createNewNodes (new nodes instead of replacing the previous
run's).

IQ in the scene. An acquisition is a browser over a sequence of single-slice two-component volumes in
the geometry of ``ultrasound_ai.mrml.ulm_geometry`` (i = lateral -> L, j = depth -> I). The wavelength,
which the volumes cannot carry, is the sequence attribute ``UltrasoundAI.WavelengthMm``; ground truth,
when the acquisition has it, is a vtkMRMLTableNode referenced from the browser with the role
``UltrasoundAI.GroundTruth`` (columns frame, z_mm, x_mm, bubble_id). Both save with the scene.

Files. A sequence (or a PALA .mat file) is exported to ``<workdir>/inputs-<id>/<name>.h5`` for the job
and that folder is removed when the run ends (results loaded, failed or cancelled): a long acquisition
must not stay on disk twice. The result ``<workdir>/<name>-<method>-result.h5`` (ULM result contract)
stays. An acquisition HDF5 file is read in place.

Results (load_results), named after the input and the method, so that the same method run again
replaces its nodes and another method adds its own (createNewNodes=True keeps them all):
  "<name>-<method>-Density"    track count per λ/10 pixel; colour table Inferno (hot-like)
  "<name>-<method>-Direction"  ±density (+ towards the probe); DivergingBlueRed, centred on 0
  "<name>-<method>-Velocity"   mean speed, mm/s; Viridis (perceptual)
  "<name>-<method>-Metrics"    vtkMRMLTableNode, only when the acquisition has ground truth
The maps are single-slice scalar volumes placed by the same ulm_geometry convention as the IQ
sequence, so they overlay the IQ exactly in the slice views and sit in its plane in 3D.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.mrml.module_logic import ModuleLogic, PanelParameters, path_or_none, remove_browser, safe_name
from ultrasound_ai.mrml.tables import new_table_node, set_table
from ultrasound_ai.ulm.localizers import localizer_info, localizer_names

log = logging.getLogger(__name__)

TASK_NAME = "ulm.process"
METHODS = tuple(localizer_names())  # offered in the panel: the localizer registry's names, labels, tooltips
METHOD_LABELS = {name: localizer_info(name).label for name in METHODS}
METHOD_TOOLTIPS = {name: f"{localizer_info(name).label}: {localizer_info(name).tooltip}" for name in METHODS}
DEVICES = ("auto", "cpu", "cuda", "mps")

WAVELENGTH_ATTRIBUTE = "UltrasoundAI.WavelengthMm"
ACQUISITION_FILE_ATTRIBUTE = "UltrasoundAI.AcquisitionFile"
GROUND_TRUTH_ROLE = "UltrasoundAI.GroundTruth"
OUTPUT_ATTRIBUTE = "UltrasoundAI.Output"  # kind of result node: density, direction, velocity, metrics
METHOD_ATTRIBUTE = "UltrasoundAI.Method"
GT_COLUMNS = ("frame", "z_mm", "x_mm", "bubble_id")

# Slicer's built-in colour tables (Libs/MRML/Core/Resources/ColorFiles): perceptual and diverging maps
# matching the PNG export of ultrasound_ai.ulm.rendering (hot / RdBu / viridis).
COLOR_NODE_IDS = {
    "density": "vtkMRMLColorTableNodeFileInferno.txt",
    "direction": "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "velocity": "vtkMRMLColorTableNodeFileViridis.txt",
}
# result-file dataset -> (output kind, node name suffix)
MAPS = (("density", "density", "Density"), ("direction", "direction", "Direction"),
        ("velocity_mm_s", "velocity", "Velocity"))


# ---------------------------------------------------------------------------------------------------
# Parameters


@dataclass
class UlmRunParameters(PanelParameters):
    """One ULM run: its input and its processing settings, checked in check()."""

    inputSequence: Any = None
    inputAcquisitionFile: str | None = None
    method: str = "rs"
    resolutionFactor: float = 10.0
    useCountingNetwork: bool = True  # per-frame counts from the counting network by default (no guessing)
    bubblesPerFrame: int = 40
    linkDistance: float = 2.0
    minTrackLength: int = 15
    svdCutoff: int = 4
    blockFrames: int = 800
    wavelengthMm: float = 0.0
    frameRateHz: float = 0.0
    device: str = "auto"
    createNewNodes: bool = False

    REQUIRED = "inputSequence or inputAcquisitionFile"

    def check(self) -> None:
        self.inputAcquisitionFile = path_or_none(self.inputAcquisitionFile)
        self.method = str(self.method or "").strip().lower()
        if self.method not in METHODS:
            raise InputError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        self.device = str(self.device or "auto").strip().lower()
        self.resolutionFactor = _number(self.resolutionFactor, "resolutionFactor", "a positive factor (10 gives λ/10 pixels)")
        self.linkDistance = _number(self.linkDistance, "linkDistance", "a positive distance in acquisition pixels")
        self.useCountingNetwork = bool(self.useCountingNetwork)
        # A given number is checked even when the counting network (the default) is on.
        if not self.useCountingNetwork or self.bubblesPerFrame is not None:
            self.bubblesPerFrame = _integer(self.bubblesPerFrame, "bubblesPerFrame", 1, "detections kept per frame")
        self.minTrackLength = _integer(self.minTrackLength, "minTrackLength", 1, "points a track needs")
        self.svdCutoff = _integer(self.svdCutoff, "svdCutoff", 0, "singular components removed per block")
        self.blockFrames = _integer(self.blockFrames, "blockFrames", 2, "frames per processing block")
        for name in ("wavelengthMm", "frameRateHz"):
            value = _number(getattr(self, name) or 0.0, name, "a positive number, or 0 to read it from the sequence",
                            allow_zero=True)
            setattr(self, name, value)
        if self.inputSequence is None and self.inputAcquisitionFile is None:
            raise InputError("input: select an IQ sequence (inputSequence) or an acquisition file (inputAcquisitionFile)")
        if self.inputSequence is not None and not isinstance(
                self.inputSequence, (slicer.vtkMRMLSequenceBrowserNode, slicer.vtkMRMLSequenceNode)):
            raise InputError(f"inputSequence: expected a vtkMRMLSequenceBrowserNode or vtkMRMLSequenceNode, "
                             f"got {type(self.inputSequence).__name__}")


def _number(value, name: str, expected: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected {expected}, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InputError(f"{name}: expected {expected}, got {value!r}")
    return v


def _integer(value, name: str, minimum: int, what: str) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected an integer >= {minimum} ({what}), got {value!r}") from None
    if not math.isfinite(v) or v != round(v) or v < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum} ({what}), got {value!r}")
    return int(v)


# ---------------------------------------------------------------------------------------------------
# Ground truth table


def _column(name: str, values, dtype):
    from vtk.util import numpy_support

    array = numpy_support.numpy_to_vtk(np.ascontiguousarray(values, dtype=dtype), deep=True)
    array.SetName(name)
    return array


def gt_to_table(gt_positions, name: str = "GroundTruth", node=None, scene=None):
    """A vtkMRMLTableNode holding ground truth [K, 4] = (frame, z_mm, x_mm, bubble_id) or [K, 3]
    (bubble_id -1 then): one row per position, columns GT_COLUMNS."""
    g = np.asarray(gt_positions, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] not in (3, 4):
        raise InputError(f"gt_positions: expected [K, 4] = (frame, z_mm, x_mm, bubble_id) or [K, 3], got shape {g.shape}")
    node = new_table_node(name, node, scene)
    ids = g[:, 3] if g.shape[1] == 4 else np.full(g.shape[0], -1.0)
    set_table(node, (_column("frame", g[:, 0], np.int32), _column("z_mm", g[:, 1], np.float64),
                     _column("x_mm", g[:, 2], np.float64),
                     _column("bubble_id", ids, np.int64 if ids.size and np.abs(ids).max() > 2**31 - 1 else np.int32)))
    return node


def table_to_gt(node) -> np.ndarray:
    """Inverse of gt_to_table: float64 [K, 4] (or [K, 3] when no row has a bubble id)."""
    from vtk.util import numpy_support

    if not isinstance(node, slicer.vtkMRMLTableNode):
        raise InputError(f"ground truth table: expected a vtkMRMLTableNode, got {type(node).__name__}")
    table = node.GetTable()
    cols = []
    for col in GT_COLUMNS:
        array = table.GetColumnByName(col)
        if array is None:
            raise InputError(f"ground truth table {node.GetName()!r}: missing column {col!r}; expected {', '.join(GT_COLUMNS)}")
        cols.append(numpy_support.vtk_to_numpy(array).astype(np.float64))
    g = np.stack(cols, axis=1) if cols[0].size else np.zeros((0, 4))
    return g[:, :3] if g.shape[0] and np.all(g[:, 3] < 0) else g


# ---------------------------------------------------------------------------------------------------
# The Logic


class UltrasoundAIULMLogic(ModuleLogic):
    """Processing behind the UltrasoundAIULM panel; usable from the Python console and tests."""

    TASK_NAME = TASK_NAME
    TITLE = "ULM processing"
    Parameters = UlmRunParameters
    OUTPUT_ATTRIBUTE = OUTPUT_ATTRIBUTE
    METHOD_ATTRIBUTE = METHOD_ATTRIBUTE
    MODEL_METHODS = {"3dml": "ulm_3dml_resnet"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._run_stem: str | None = None  # the running job's result name

    # -- inputs --------------------------------------------------------------------------------------
    @staticmethod
    def read_acquisition_file(path):
        """An acquisition HDF5 file or a PALA IQ .mat file as an Acquisition (InputError naming the file)."""
        from ultrasound_ai.io.ulm_files import read_acquisition, read_pala_mat

        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError(f"acquisition file {path}: not found (expected an acquisition .h5 or a PALA IQ .mat file)")
        if path.suffix.lower() == ".mat":
            return read_pala_mat(path)
        return read_acquisition(path)

    def load_acquisition(self, path, name: str | None = None, scene=None):
        """An IQ acquisition file (HDF5 contract or PALA .mat) as a browser over a two-component IQ
        sequence (ultrasound_ai.mrml.complex_sequence), with the wavelength attribute and, when the file
        has ground truth, the ground truth table. A browser loaded earlier from the same file is replaced."""
        from ultrasound_ai.mrml import complex_sequence, resolve_scene
        from ultrasound_ai.mrml.sequences import FRAME_RATE_ATTRIBUTE

        self.ensure_dependencies()  # reading HDF5 needs h5py
        path = Path(path).expanduser().resolve()
        acq = self.read_acquisition_file(path)
        if acq.iq is None:
            raise InputError(f"acquisition file {path}: holds B-mode frames; only complex IQ can be shown as a "
                             f"two-component sequence (process the file directly with inputAcquisitionFile)")
        scene = resolve_scene(scene)
        for old in list(scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")):
            if old.GetAttribute(ACQUISITION_FILE_ATTRIBUTE) == str(path):
                self.remove_browser(old)
        name = name or path.stem
        # Frame numbers as index values, the rate as the bridge's attribute: a sequence node merges
        # numeric index values closer than its tolerance (0.001 by default), i.e. the time stamps of
        # any acquisition faster than 1 kHz.
        browser = complex_sequence(acq.iq, acq.pixel_size_mm, acq.origin_mm, None, name=name, scene=scene)
        seq = browser.GetMasterSequenceNode()
        seq.SetAttribute(FRAME_RATE_ATTRIBUTE, repr(float(acq.frame_rate_hz)))
        seq.SetAttribute(WAVELENGTH_ATTRIBUTE, repr(float(acq.wavelength_mm)))
        browser.SetAttribute(ACQUISITION_FILE_ATTRIBUTE, str(path))
        if acq.gt_positions is not None:
            table = gt_to_table(acq.gt_positions, name=f"{name}-GroundTruth", scene=scene)
            browser.SetAndObserveNodeReferenceID(GROUND_TRUTH_ROLE, table.GetID())
        return browser

    @staticmethod
    def remove_browser(browser) -> None:
        """Remove a browser with its sequences, proxy nodes and ground truth table."""
        remove_browser(browser, GROUND_TRUTH_ROLE)

    @staticmethod
    def iq_sequence(source):
        """(browser or None, IQ vtkMRMLSequenceNode) of a browser or sequence, checked to hold
        two-component (real, imaginary) volumes; InputError naming the node otherwise."""
        browser = source if isinstance(source, slicer.vtkMRMLSequenceBrowserNode) else None
        name = source.GetName() or "sequence"
        if browser is not None:
            seq = browser.GetMasterSequenceNode()
            if seq is None:
                raise InputError(f"input sequence browser {name!r}: has no sequence; expected a sequence of "
                                 f"two-component (real, imaginary) IQ volumes")
        elif isinstance(source, slicer.vtkMRMLSequenceNode):
            seq = source
        else:
            raise InputError(f"inputSequence: expected a vtkMRMLSequenceBrowserNode or vtkMRMLSequenceNode, "
                             f"got {type(source).__name__}")
        if seq.GetNumberOfDataNodes() == 0:
            raise InputError(f"input sequence {name!r}: has no frames; expected a sequence of two-component "
                             f"(real, imaginary) IQ volumes")
        first = seq.GetNthDataNode(0)
        components = 0
        if isinstance(first, slicer.vtkMRMLScalarVolumeNode) and first.GetImageData() is not None:
            components = first.GetImageData().GetNumberOfScalarComponents()
        if not isinstance(first, slicer.vtkMRMLVectorVolumeNode) or components != 2:
            what = f"{components}-component volumes" if components else f"{first.GetClassName()} items"
            if isinstance(first, slicer.vtkMRMLScalarVolumeNode) and not isinstance(first, slicer.vtkMRMLVectorVolumeNode):
                what = "scalar volumes"
            raise InputError(f"input sequence {name!r}: holds {what}; expected complex IQ as two-component "
                             f"(real, imaginary) vector volumes (ultrasound_ai.mrml.complex_sequence)")
        return browser, seq

    def export_sequence(self, source, params: UlmRunParameters, folder) -> Path:
        """Write the IQ sequence (with its ground truth table, when the browser has one) as an
        acquisition HDF5 file in `folder`; returns its path."""
        from ultrasound_ai.io.ulm_files import Acquisition, write_acquisition
        from ultrasound_ai.mrml import sequence_to_complex

        browser, seq = self.iq_sequence(source)
        name = (browser or seq).GetName() or "IQ"
        # Checked before the frames are read: a long sequence should not be converted to be refused.
        wavelength = params.wavelengthMm or _float_attribute(seq, WAVELENGTH_ATTRIBUTE)
        if not wavelength:
            raise InputError(f"input sequence {name!r}: wavelength unknown (no {WAVELENGTH_ATTRIBUTE} attribute); "
                             f"set the wavelength in mm (wavelengthMm)")
        data = sequence_to_complex(seq)
        rate = params.frameRateHz or data["frame_rate_hz"]
        if not rate:
            raise InputError(f"input sequence {name!r}: frame rate unknown (no frame-rate attribute and no time "
                             f"index); set the frame rate in Hz (frameRateHz)")
        gt = None
        table = browser.GetNodeReference(GROUND_TRUTH_ROLE) if browser is not None else None
        if table is not None:
            gt = table_to_gt(table)
        acq = Acquisition(iq=data["iq"], pixel_size_mm=tuple(data["pixel_size_mm"]), origin_mm=tuple(data["origin_mm"]),
                          frame_rate_hz=float(rate), wavelength_mm=float(wavelength), gt_positions=gt,
                          attrs={"source": f"Slicer sequence {name}"}, source=f"input sequence {name!r}")
        return write_acquisition(acq, Path(folder) / f"{safe_name(name, 'IQ')}.h5")

    def prepare_inputs(self, params: UlmRunParameters, folder) -> tuple[Path, str]:
        """(acquisition file the job reads, name of the run). A sequence or a .mat file is written into
        `folder`; an acquisition .h5 file is checked (geometry, frames) and used in place."""
        from ultrasound_ai.io.ulm_files import acquisition_info, write_acquisition

        if params.inputSequence is not None:
            browser, seq = self.iq_sequence(params.inputSequence)
            stem = safe_name((browser or seq).GetName() or "IQ", "IQ")
            return self.export_sequence(params.inputSequence, params, folder), stem
        path = Path(params.inputAcquisitionFile).expanduser().resolve()
        stem = safe_name(path.stem, "IQ")
        if path.suffix.lower() == ".mat":
            acq = self.read_acquisition_file(path)
            return write_acquisition(acq, Path(folder) / f"{stem}.h5"), stem
        if not path.is_file():
            raise InputError(f"acquisition file {path}: not found (expected an acquisition .h5 or a PALA IQ .mat file)")
        acquisition_info(path)  # a bad file fails here, with its name, before any job starts
        return path, stem

    # -- running -------------------------------------------------------------------------------------
    def _job(self, params: UlmRunParameters, acquisition: Path, stem: str) -> dict:
        parameters = {
            "method": params.method,
            "resolution_factor": params.resolutionFactor,
            "link_distance_px": params.linkDistance,
            "min_track_length": params.minTrackLength,
            "svd_cutoff": params.svdCutoff if params.svdCutoff > 0 else None,
            "block_frames": params.blockFrames,
        }
        if params.useCountingNetwork:
            parameters["counting_network"] = True
        else:
            parameters["bubbles_per_frame"] = params.bubblesPerFrame
        return {
            "task": TASK_NAME,
            "inputs": {"acquisition": str(acquisition)},
            "outputs": {"result": str(self.workdir / f"{stem}-{params.method}-result.h5")},
            "parameters": parameters,
            "device": params.device,
        }

    def make_job(self, params: UlmRunParameters) -> dict:
        """Export a sequence (or convert a .mat file) into a new inputs folder, removed when the run
        ends; an acquisition .h5 file is checked and read in place."""
        acquisition, stem = self.prepare_inputs(params, self.new_inputs_folder())
        self._run_stem = stem
        return self._job(params, acquisition, stem)

    # -- results -------------------------------------------------------------------------------------
    def load_results(self, result, parameters) -> dict:
        """Turn a finished job into nodes (module docstring); returns {"density", "direction",
        "velocity": volume nodes, "metrics": table node or None, "result": the task's result dict,
        "result_file": path}. A failed job raises InputError (bad input) or RuntimeError with the job's
        message; a cancelled one raises Cancelled. Nothing is created then. The run's exported inputs
        are removed in every case."""
        from ultrasound_ai.io.ulm_files import read_result

        if hasattr(result, "wait") and hasattr(result, "drain"):  # a JobLauncher
            result = result.wait()
        payload = self.finished_payload(result)
        params = UlmRunParameters.from_any(parameters)
        result_path = Path(result.outputs.get("result") or payload.get("result", ""))
        ulm = read_result(result_path)
        if ulm.image_shape is None:
            raise RuntimeError(f"ULM result {result_path}: holds no rendered maps")
        method = str(payload.get("method") or ulm.attrs.get("method") or params.method)
        stem = self._run_stem or _result_stem(result_path, method)
        base = f"{stem}-{method}"
        scene = _scene_of(params)
        new = bool(params.createNewNodes)

        nodes = {}
        for dataset, kind, suffix in MAPS:
            image = getattr(ulm, dataset)
            if image is None:
                raise RuntimeError(f"ULM result {result_path}: no {dataset!r} map")
            node = self.find_output(scene, "vtkMRMLScalarVolumeNode", f"{base}-{suffix}", kind, new)
            node = map_to_node(image, ulm.pixel_size_mm, ulm.origin_mm, name=f"{base}-{suffix}", node=node, scene=scene)
            self.tag(node, kind, method)
            set_map_display(node, kind, image)
            nodes[kind] = node

        metrics_node = self.metrics_output(scene, f"{base}-Metrics", payload.get("metrics"), method, new)
        nodes.update({"metrics": metrics_node, "result": payload, "result_file": result_path})
        return nodes

    @staticmethod
    def show_results(nodes: dict, scene=None) -> None:
        """Density as the slice views' background (direction available as foreground at 0 opacity)
        and the views' slice showing it in 3D. Works on whatever slice views the scene has (none with
        slicer-core)."""
        density = nodes["density"]
        scene = scene or density.GetScene()
        for composite in scene.GetNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetBackgroundVolumeID(density.GetID())
            composite.SetForegroundVolumeID(nodes["direction"].GetID())
            composite.SetForegroundOpacity(0.0)
        # The maps lie in the coronal plane (ulm_geometry): show the coronal (green) view's slice in 3D.
        for slice_node in scene.GetNodesByClass("vtkMRMLSliceNode"):
            get = getattr(slice_node, "GetOrientation", None) or slice_node.GetOrientationString
            if get() == "Coronal":
                slice_node.JumpSliceByOffsetting(0.0, 0.0, 0.0)  # through A = 0, the maps' plane
                slice_node.SetSliceVisible(True)


# ---------------------------------------------------------------------------------------------------
# Helpers shared with the scenarios


def map_to_node(image, pixel_size_mm, origin_mm, name: str = "ULM map", node=None, scene=None, thickness_mm=None):
    """A rendered ULM map [H, W] (rows = depth z, columns = lateral x; `pixel_size_mm` [dz, dx],
    `origin_mm` [z0, x0]) as a single-slice scalar volume placed by ulm_geometry, the IQ sequence's
    convention: voxel (i, j, 0) = (column, row) lies at LPS (x0 + i dx, 0, -(z0 + j dz))."""
    from ultrasound_ai.io.volume import Volume
    from ultrasound_ai.mrml import ulm_geometry, volume_to_node

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or 0 in image.shape:
        raise InputError(f"ULM map {name!r}: expected a 2-D image [H, W], got shape {image.shape}")
    spacing, origin, direction = ulm_geometry(pixel_size_mm, origin_mm, thickness_mm)
    volume = Volume(array=image[np.newaxis], spacing_xyz=spacing, origin_lps=origin, direction=direction)
    return volume_to_node(volume, name=name, node=node, scene=scene)


def map_ras_position(row: float, col: float, pixel_size_mm, origin_mm) -> np.ndarray:
    """RAS mm of map pixel (row, col) by the documented convention (for checks): LPS (x, 0, -z)."""
    z = float(origin_mm[0]) + row * float(pixel_size_mm[0])
    x = float(origin_mm[1]) + col * float(pixel_size_mm[1])
    return np.array([-x, 0.0, -z])


def display_range(image, kind: str) -> tuple[float, float]:
    """Window of a map: density 0 .. its 99th percentile of non-zero pixels (track counts span decades),
    direction symmetric about 0 (so the diverging table's centre is "no net flow"), velocity 0 .. the
    99th percentile."""
    a = np.asarray(image, dtype=np.float64)
    if kind == "direction":
        values = np.abs(a[a != 0])
        top = float(np.percentile(values, 99)) if values.size else 1.0
        return -max(top, 1.0), max(top, 1.0)
    values = a[a > 0]
    top = float(np.percentile(values, 99)) if values.size else 1.0
    return 0.0, max(top, 1e-6)


def set_map_display(node, kind: str, image) -> None:
    """Colour table and window of a map's display node (COLOR_NODE_IDS)."""
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(COLOR_NODE_IDS[kind])
    lo, hi = display_range(image, kind)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(lo, hi)
    if kind != "direction":
        # Empty pixels see-through when the map is a foreground layer over the IQ.
        display.SetApplyThreshold(True)
        display.SetLowerThreshold(1e-6)
        display.SetUpperThreshold(float(np.max(image)) + 1.0)


def _float_attribute(node, name: str) -> float | None:
    text = node.GetAttribute(name)
    try:
        value = float(text) if text else None
    except ValueError:
        raise InputError(f"{node.GetName()!r}: attribute {name} is not a number: {text!r}") from None
    return value if value and math.isfinite(value) and value > 0 else None


def _scene_of(params: UlmRunParameters):
    if params.inputSequence is not None and params.inputSequence.GetScene() is not None:
        return params.inputSequence.GetScene()
    from ultrasound_ai.mrml import resolve_scene

    return resolve_scene(None)


def _result_stem(path: Path, method: str) -> str:
    suffix = f"-{method}-result"
    stem = path.stem
    return stem[: -len(suffix)] if stem.endswith(suffix) else stem
