"""UltrasoundAIRegistration Logic: rigid MRI-TRUS fusion (Attention-Reg or Mattes MI) of scene volumes.

Imports ``slicer``, ``vtk`` and the engine, never ``qt`` or ``ctk``: it runs inside the Slicer
application and, for the tests, with the slicer-core wheel.

    logic = UltrasoundAIRegistrationLogic()
    nodes = logic.run({"fixedVolume": mri, "fixedLabel": label, "movingVolume": trus, "method": "mi"})
    launcher = logic.start(parameters)          # non-blocking (the Widget's Apply); drain() from a timer
    logic.cancel()
    nodes = logic.load_results(launcher.wait(), parameters)
    nodes = logic.show_registration(T_fixed_to_moving, parameters)   # a known transform, no job
    case_nodes = logic.load_case("CASE_DIR")    # a case folder (docs/DATA_FORMATS.md)

Parameters are a dict or any object (the Widget's parameter node wrapper) with these names:
fixedVolume (MRI, scalar volume), fixedLabel (prostate label on the MRI: a labelmap volume on the MRI's
grid, or a segmentation node, exported onto the MRI's grid), movingVolume (TRUS, scalar volume), method
("attention+refine" | "attention" | "mi"; the default refines the guarded cascade's result by LC2), mode ("label" | "image", Attention-Reg's fixed channel), device ("auto", "cpu",
"cuda[:N]", "mps"), initialTransform (linear transform node, same convention as the result; optional),
surfacePoints (markups on the MRI's gland surface; optional, default: derived from the label),
truthTransform (linear transform node holding the true registration, same convention; optional: SRE),
biopsyTargets (markups point list on the MRI; optional), outputTransform (node to fill; optional),
checkerboard (bool), checkerboardSquareMm, miIterations (MI optimiser iterations per level; 0 keeps the
initial transform), checkpoints (Attention-Reg .pt paths, stage 1 first; default: the shipped ones).

Spaces. The MRI and its label are used in world coordinates (their parent transforms, if any, applied);
the TRUS in its own (local) coordinates, because the result becomes its parent transform. The start is
the initial transform node when given, else the TRUS's current parent transform (what the views show),
else the volumes' physical positions. Transform nodes follow docs/DATA_FORMATS.md: the to-parent matrix of a
transform node applied to the TRUS volume maps TRUS RAS -> MRI RAS ("moving_to_fixed_ras"); the engine's
transform maps MRI LPS -> TRUS LPS (T_fixed_to_moving).

Results (show_registration / load_results), named after the volumes so that a second run replaces them:
  "<TRUS>-Registration"        linear transform node (to-parent = moving_to_fixed_ras), set as the TRUS
                               volume's parent; slice views show the TRUS over the MRI at 50 % opacity
  "<targets>-TRUS"             the biopsy targets in TRUS coordinates (T_fixed_to_moving of each target,
                               as RAS), under the registration transform, so they overlay the MRI targets
  "<label>-Gland"              model of the gland surface (3D view), in MRI space
  "<MRI>-<TRUS>-Checkerboard"  with checkerboard=True: alternating squares of the MRI and of the TRUS
                               resampled onto the MRI grid, shown as the slice background
  "<TRUS>-Registration-Metrics" table of the job's metrics (sre_mm when a truth is given, ...)
Work files: each run's inputs go to <workdir>/inputs-<id>/ and are removed when the run ends; the outputs
<TRUS>-<method>.tfm / .json stay in the work folder (a new temporary folder by default).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.mrml.module_logic import ModuleLogic, PanelParameters, remove_with_helpers, safe_name

log = logging.getLogger(__name__)

TASK_NAME = "registration.register"
METHODS = ("attention+refine", "attention", "mi")
MODES = ("label", "image")
OUTPUT_ATTRIBUTE = "UltrasoundAIRegistration.Output"  # transform, targets, gland, checkerboard, metrics
METHOD_ATTRIBUTE = "UltrasoundAIRegistration.Method"
FUSION_OPACITY = 0.5


# ---------------------------------------------------------------------------------------------------
# Parameters


@dataclass
class RegistrationParameters(PanelParameters):
    """Inputs and settings of one registration, checked (see the module docstring for each name)."""

    fixedVolume: Any = None
    fixedLabel: Any = None
    movingVolume: Any = None
    method: str = "attention+refine"
    mode: str = "label"
    device: str = "auto"
    initialTransform: Any = None
    surfacePoints: Any = None
    truthTransform: Any = None
    biopsyTargets: Any = None
    outputTransform: Any = None
    checkerboard: bool = False
    checkerboardSquareMm: float = 10.0
    miIterations: int = 200
    checkpoints: Any = None

    REQUIRED = "fixedVolume, fixedLabel, movingVolume"

    def check(self) -> None:
        self.method = str(self.method or "").strip().lower()
        self.mode = str(self.mode or "label").strip().lower()
        self.device = str(self.device or "auto").strip().lower()
        if self.method not in METHODS:
            raise InputError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.mode not in MODES:
            raise InputError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        try:
            self.checkerboardSquareMm = float(self.checkerboardSquareMm)
            self.miIterations = int(self.miIterations)
        except (TypeError, ValueError):
            raise InputError("checkerboardSquareMm / miIterations: expected numbers") from None
        if not (np.isfinite(self.checkerboardSquareMm) and self.checkerboardSquareMm > 0):
            raise InputError(f"checkerboardSquareMm: expected a positive size in mm, got {self.checkerboardSquareMm}")
        if self.miIterations < 0:
            raise InputError(f"miIterations: expected >= 0, got {self.miIterations}")
        for name, cls_name, what in (
            ("fixedVolume", "vtkMRMLScalarVolumeNode", "the MRI"),
            ("movingVolume", "vtkMRMLScalarVolumeNode", "the TRUS volume"),
        ):
            node = getattr(self, name)
            if node is None:
                raise InputError(f"{name}: select {what} (a scalar volume node)")
            if not isinstance(node, getattr(slicer, cls_name)) or isinstance(node, slicer.vtkMRMLLabelMapVolumeNode) \
                    or isinstance(node, slicer.vtkMRMLVectorVolumeNode):
                raise InputError(f"{name}: expected a scalar volume node ({what}), got {type(node).__name__}")
        if self.fixedLabel is None:
            raise InputError("fixedLabel: select the prostate label on the MRI (a labelmap volume or a segmentation)")
        if not isinstance(self.fixedLabel, (slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLSegmentationNode)):
            raise InputError(f"fixedLabel: expected a labelmap volume node or a segmentation node, got "
                             f"{type(self.fixedLabel).__name__}")
        if self.fixedVolume is self.movingVolume:
            raise InputError("movingVolume: the TRUS volume must be another node than the MRI (fixedVolume)")
        for name in ("initialTransform", "truthTransform", "outputTransform"):
            node = getattr(self, name)
            if node is not None and not isinstance(node, slicer.vtkMRMLLinearTransformNode):
                raise InputError(f"{name}: expected a linear transform node, got {type(node).__name__}")
        for name in ("surfacePoints", "biopsyTargets"):
            node = getattr(self, name)
            if node is not None and not isinstance(node, slicer.vtkMRMLMarkupsNode):
                raise InputError(f"{name}: expected a markups node (point list), got {type(node).__name__}")
        if isinstance(self.checkpoints, (str, os.PathLike)):
            text = os.fspath(self.checkpoints).strip()
            self.checkpoints = [p.strip() for p in text.split(";") if p.strip()] or None
        elif self.checkpoints is not None:
            self.checkpoints = [os.fspath(p) for p in self.checkpoints] or None


# ---------------------------------------------------------------------------------------------------
# Conversions (every LPS <-> RAS step goes through ultrasound_ai.core.geometry)


def moving_to_fixed_ras(T_fixed_to_moving) -> np.ndarray:
    """The to-parent matrix of a transform node on the TRUS volume for an engine transform (MRI LPS -> TRUS LPS)."""
    from ultrasound_ai.core.geometry import invert_rigid, lps_to_ras_transform
    from ultrasound_ai.registration.case import check_rigid_matrix

    return lps_to_ras_transform(invert_rigid(check_rigid_matrix(T_fixed_to_moving, "transform (fixed -> moving)")))


def fixed_to_moving_lps(moving_to_fixed_ras_matrix) -> np.ndarray:
    """Inverse of moving_to_fixed_ras: the engine transform (MRI LPS -> TRUS LPS) of a to-parent matrix."""
    from ultrasound_ai.core.geometry import invert_rigid, ras_to_lps_transform
    from ultrasound_ai.registration.case import check_rigid_matrix

    m = check_rigid_matrix(moving_to_fixed_ras_matrix, "transform node matrix (moving -> fixed, RAS)")
    return invert_rigid(ras_to_lps_transform(m))


def map_targets_to_moving(points_fixed_lps, T_fixed_to_moving) -> np.ndarray:
    """Biopsy targets [N, 3] in MRI LPS -> the same anatomical points in TRUS LPS."""
    from ultrasound_ai.core.geometry import apply_transform

    pts = np.asarray(points_fixed_lps, dtype=np.float64).reshape(-1, 3)
    return apply_transform(np.asarray(T_fixed_to_moving, dtype=np.float64), pts) if len(pts) else pts


def checkerboard_array(fixed, moving_on_fixed, square_mm: float) -> np.ndarray:
    """float32 [k, j, i]: squares of square_mm (along the MRI grid's axes) alternating between the MRI and the
    TRUS resampled onto the MRI grid, each scaled to [0, 1] between its 1st and 99th percentile."""
    if square_mm <= 0:
        raise InputError(f"square_mm: expected a positive size, got {square_mm}")
    a = _robust_unit(np.asarray(fixed.array, dtype=np.float32))
    b = _robust_unit(np.asarray(moving_on_fixed.array, dtype=np.float32))
    nk, nj, ni = a.shape
    sx, sy, sz = fixed.spacing_xyz
    # Parity of the square each voxel centre falls in (grid-aligned, so the squares follow the slices).
    pi = np.floor(np.arange(ni) * sx / square_mm).astype(np.int64)
    pj = np.floor(np.arange(nj) * sy / square_mm).astype(np.int64)
    pk = np.floor(np.arange(nk) * sz / square_mm).astype(np.int64)
    parity = (pk[:, None, None] + pj[None, :, None] + pi[None, None, :]) % 2 == 1
    return np.where(parity, b, a).astype(np.float32)


def _robust_unit(a: np.ndarray) -> np.ndarray:
    values = a[a != 0] if np.any(a != 0) else a.reshape(-1)
    lo, hi = np.percentile(values, [1.0, 99.0])
    if hi - lo <= 1e-12:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def label_surface_polydata(label):
    """vtkPolyData (RAS) of the boundary of a binary label Volume (discrete flying edges, then smoothed)."""
    from vtk.util import numpy_support

    from ultrasound_ai.core.geometry import LPS_TO_RAS

    arr = np.ascontiguousarray((np.asarray(label.array) != 0).astype(np.uint8))
    nk, nj, ni = arr.shape
    image = vtk.vtkImageData()
    image.SetDimensions(ni, nj, nk)  # VTK's x runs fastest, as the last numpy axis does
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.reshape(-1), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    surface = vtk.vtkDiscreteFlyingEdges3D()
    surface.SetInputData(image)
    surface.SetValue(0, 1)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(surface.GetOutputPort())
    smooth.SetNumberOfIterations(15)
    smooth.SetPassBand(0.1)
    smooth.NormalizeCoordinatesOn()
    to_ras = vtk.vtkTransform()
    to_ras.SetMatrix(_vtk_matrix(LPS_TO_RAS @ label.ijk_to_lps()))
    place = vtk.vtkTransformPolyDataFilter()
    place.SetTransform(to_ras)
    place.SetInputConnection(smooth.GetOutputPort())
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(place.GetOutputPort())
    normals.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(normals.GetOutput())
    return out


def _vtk_matrix(array) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


# ---------------------------------------------------------------------------------------------------
# The Logic


class UltrasoundAIRegistrationLogic(ModuleLogic):
    """Processing behind the UltrasoundAIRegistration panel; usable from the Python console and tests."""

    TASK_NAME = TASK_NAME
    TITLE = "registration"
    Parameters = RegistrationParameters
    OUTPUT_ATTRIBUTE = OUTPUT_ATTRIBUTE
    METHOD_ATTRIBUTE = METHOD_ATTRIBUTE
    MODEL_METHODS = {"attention+refine": "attention_reg", "attention": "attention_reg"}

    # -- inputs --------------------------------------------------------------------------------------
    @staticmethod
    def label_volume(label_node, fixed_node):
        """The gland label as an engine Volume (world coordinates): a labelmap node as it is, a segmentation
        node exported (visible segments) onto the MRI's grid."""
        from ultrasound_ai.mrml import node_to_volume

        if isinstance(label_node, slicer.vtkMRMLSegmentationNode):
            if label_node.GetSegmentation() is None or label_node.GetSegmentation().GetNumberOfSegments() == 0:
                raise InputError(f"fixedLabel {label_node.GetName()!r}: the segmentation has no segment; expected the "
                                 "prostate segmented on the MRI")
            scene = label_node.GetScene()
            temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("GlandLabel"))
            try:
                ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(label_node, temp, fixed_node)
                image = temp.GetImageData()
                if not ok or image is None or image.GetPointData().GetScalars() is None:
                    raise InputError(f"fixedLabel {label_node.GetName()!r}: the segmentation could not be exported "
                                     "to a labelmap on the MRI grid (no visible segment?)")
                return node_to_volume(temp, world=True)
            finally:
                remove_with_helpers(scene, temp)
        return node_to_volume(label_node, world=True)

    def initial_transform(self, params: RegistrationParameters) -> np.ndarray:
        """The start, MRI LPS -> TRUS LPS: the initial transform node, else the TRUS's current parent
        transform, else the identity (physical positions)."""
        from ultrasound_ai.mrml import transform_node_to_matrix_ras, world_matrix_ras

        if params.initialTransform is not None:
            return fixed_to_moving_lps(transform_node_to_matrix_ras(params.initialTransform))
        return fixed_to_moving_lps(world_matrix_ras(params.movingVolume))

    def check_inputs(self, parameters) -> dict:
        """Read and check the inputs without starting anything: {"params", "fixed", "label", "moving",
        "initial"} (engine Volumes and the 4x4 start). InputError names the input and what was expected:
        a 2D image, an empty label, a label off the MRI grid, volumes that do not overlap, ..."""
        from ultrasound_ai.mrml import node_to_volume
        from ultrasound_ai.registration.case import binary_label, check_3d
        from ultrasound_ai.registration.preprocessing import check_overlap

        params = RegistrationParameters.from_any(parameters)
        names = {"fixedVolume": params.fixedVolume, "movingVolume": params.movingVolume}
        for key, node in names.items():
            if node.GetImageData() is None:
                raise InputError(f"{key} {node.GetName()!r}: the volume node holds no image")
        fixed = check_3d(node_to_volume(params.fixedVolume, world=True), f"fixedVolume {params.fixedVolume.GetName()!r} (MRI)")
        moving = check_3d(node_to_volume(params.movingVolume, world=False),
                          f"movingVolume {params.movingVolume.GetName()!r} (TRUS)")
        label_name = f"fixedLabel {params.fixedLabel.GetName()!r}"
        if isinstance(params.fixedLabel, slicer.vtkMRMLLabelMapVolumeNode) and params.fixedLabel.GetImageData() is None:
            raise InputError(f"{label_name}: the labelmap node holds no image")
        label = binary_label(self.label_volume(params.fixedLabel, params.fixedVolume), label_name, reference=fixed)
        T0 = self.initial_transform(params)
        check_overlap(label, moving, T0)
        if params.surfacePoints is not None and params.surfacePoints.GetNumberOfControlPoints() == 0:
            raise InputError(f"surfacePoints {params.surfacePoints.GetName()!r}: no points; place points on the gland "
                             "surface or leave it empty to derive them from the label")
        return {"params": params, "fixed": fixed, "label": label, "moving": moving, "initial": T0}

    def prepare_inputs(self, parameters, folder: str | os.PathLike | None = None) -> dict:
        """Check the inputs and write the files a job reads into `folder` (default a new
        <workdir>/inputs-<id>/): {"inputs": {name: path}, "params", "initial"}."""
        from ultrasound_ai.io.volume import write_volume
        from ultrasound_ai.mrml import fiducials_to_points, transform_node_to_matrix_ras
        from ultrasound_ai.registration.case import write_points_csv, write_transform_tfm

        checked = self.check_inputs(parameters)
        params = checked["params"]
        if folder is None:
            folder = self.new_inputs_folder()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        inputs = {
            "fixed": write_volume(checked["fixed"], folder / "fixed.nrrd"),
            "fixed_label": write_volume(checked["label"], folder / "fixed_label.nrrd"),
            "moving": write_volume(checked["moving"], folder / "moving.nrrd"),
            "initial": write_transform_tfm(checked["initial"], folder / "initial.tfm"),
        }
        if params.surfacePoints is not None:
            points, _ = fiducials_to_points(params.surfacePoints, world=True)
            inputs["surface"] = write_points_csv(points, folder / "surface_fixed.csv")
        if params.truthTransform is not None:
            truth = fixed_to_moving_lps(transform_node_to_matrix_ras(params.truthTransform))
            path = folder / "truth.json"
            from ultrasound_ai.core.atomic import atomic_output

            with atomic_output(path) as tmp:
                tmp.write_text(json.dumps({"fixed_to_moving_lps": truth.tolist()}))
            inputs["truth"] = path
        return {"inputs": {k: str(v) for k, v in inputs.items()}, "params": params, "initial": checked["initial"],
                "folder": folder}

    # -- running -------------------------------------------------------------------------------------
    def output_paths(self, params: RegistrationParameters) -> dict:
        stem = f"{safe_name(params.movingVolume.GetName(), 'Volume')}-{params.method}"
        return {"transform": str(self.workdir / f"{stem}.tfm"), "json": str(self.workdir / f"{stem}.json")}

    def make_job(self, params: RegistrationParameters) -> dict:
        """Check the inputs and write them into a new inputs folder (removed when the run ends)."""
        prepared = self.prepare_inputs(params)
        return {
            "task": TASK_NAME,
            "inputs": prepared["inputs"],
            "outputs": self.output_paths(params),
            "parameters": {"method": params.method, "mode": params.mode, "iterations": params.miIterations,
                           "checkpoints": params.checkpoints},
            "device": params.device,
        }

    # -- results -------------------------------------------------------------------------------------
    def load_results(self, result, parameters) -> dict:
        """Turn a finished job into nodes (see show_registration). The run's input files are removed
        whatever the outcome. A failed job raises InputError (bad input) or RuntimeError with the job's
        message; a cancelled one raises Cancelled; nothing is created then."""
        payload = self.finished_payload(result)
        params = RegistrationParameters.from_any(parameters)
        T = np.asarray(payload["fixed_to_moving_lps"], dtype=np.float64)
        nodes = self.show_registration(T, params, metrics=payload.get("metrics") or None, method=payload.get("method"))
        nodes["result"] = payload
        return nodes

    def show_registration(self, T_fixed_to_moving, parameters, metrics: dict | None = None,
                          method: str | None = None) -> dict:
        """Show a registration (MRI LPS -> TRUS LPS) in the scene: the transform node on the TRUS, the
        fused slice views (or the checkerboard), the gland model, the biopsy targets in TRUS space and the
        metrics table. Returns {"transform", "targets", "gland", "checkerboard", "metrics"} (None where
        not made)."""
        from ultrasound_ai.mrml import (
            apply_transform,
            fiducials_to_points,
            matrix_to_transform_node_ras,
            points_to_fiducials,
        )

        params = RegistrationParameters.from_any(parameters)
        method = method or params.method
        fixed, moving = params.fixedVolume, params.movingVolume
        scene = moving.GetScene()
        matrix = moving_to_fixed_ras(T_fixed_to_moving)

        transform = params.outputTransform or self.find_output(
            scene, "vtkMRMLLinearTransformNode", f"{moving.GetName()}-Registration", "transform")
        transform = matrix_to_transform_node_ras(matrix, name=f"{moving.GetName()}-Registration", node=transform,
                                                 scene=scene)
        self.tag(transform, "transform", method)
        apply_transform(moving, transform)

        targets = None
        if params.biopsyTargets is not None:
            points, labels = fiducials_to_points(params.biopsyTargets, world=True)
            name = f"{params.biopsyTargets.GetName()}-TRUS"
            targets = self.find_output(scene, "vtkMRMLMarkupsFiducialNode", name, "targets")
            targets = points_to_fiducials(map_targets_to_moving(points, T_fixed_to_moving), labels, name=name,
                                          node=targets, scene=scene)
            # Local coordinates are TRUS coordinates; under the registration they overlay the MRI targets.
            apply_transform(targets, transform)
            self.tag(targets, "targets", method)

        gland = None
        try:
            gland = self.show_gland_model(params)
        except Exception as exc:  # noqa: BLE001 - a missing 3D piece must not lose the registration
            log.warning("UltrasoundAIRegistration: gland model not shown: %s", exc)

        checkerboard = None
        if params.checkerboard:
            checkerboard = self.checkerboard_volume(params, T_fixed_to_moving)
            self.show_fusion(checkerboard, None, scene=scene)
        else:
            self.show_fusion(fixed, moving, scene=scene)
        try:
            self.show_trus_rendering(moving)
        except Exception as exc:  # noqa: BLE001
            log.warning("UltrasoundAIRegistration: volume rendering not shown: %s", exc)

        metrics_node = self.metrics_output(scene, f"{moving.GetName()}-Registration-Metrics", metrics, method)
        return {"transform": transform, "targets": targets, "gland": gland, "checkerboard": checkerboard,
                "metrics": metrics_node}

    @staticmethod
    def show_trus_rendering(moving):
        """Volume rendering of the TRUS in the 3D view (it follows the registration transform). A rendering
        made before is reused. Only inside the Slicer application: there is no 3D view without it, and with
        slicer-core the volume rendering logic crashes the process on some scenes (seen with the registration
        phantom's volumes), which no try/except could catch. Returns the display node or None."""
        from ultrasound_ai.mrml import in_slicer_application, show_volume_rendering

        if not in_slicer_application():
            return None

        for k in range(moving.GetNumberOfDisplayNodes()):
            display = moving.GetNthDisplayNode(k)
            if display is not None and display.IsA("vtkMRMLVolumeRenderingDisplayNode"):
                display.SetVisibility(True)
                return display
        return show_volume_rendering(moving, preset="US-Fetal")

    def checkerboard_volume(self, parameters, T_fixed_to_moving=None, node=None):
        """A scalar volume on the MRI grid alternating MRI and TRUS squares (checkerboardSquareMm). The TRUS
        is resampled through T_fixed_to_moving (default: its current place in the scene)."""
        from ultrasound_ai.io.volume import resample_volume
        from ultrasound_ai.mrml import node_to_volume, volume_to_node

        params = RegistrationParameters.from_any(parameters)
        fixed = node_to_volume(params.fixedVolume, world=True)
        if T_fixed_to_moving is None:
            moving = node_to_volume(params.movingVolume, world=True)
            T_fixed_to_moving = np.eye(4)
        else:
            moving = node_to_volume(params.movingVolume, world=False)
        on_fixed = resample_volume(moving, fixed, T_fixed_to_moving, output_dtype=np.float32)
        board = fixed.with_array(checkerboard_array(fixed, on_fixed, params.checkerboardSquareMm))
        scene = params.fixedVolume.GetScene()
        name = f"{params.fixedVolume.GetName()}-{params.movingVolume.GetName()}-Checkerboard"
        node = node or self.find_output(scene, "vtkMRMLScalarVolumeNode", name, "checkerboard")
        node = volume_to_node(board, name=name, node=node, scene=scene)
        node.SetAttribute(OUTPUT_ATTRIBUTE, "checkerboard")
        return node

    def show_gland_model(self, parameters):
        """Model "<label>-Gland" of the gland surface in MRI space (3D view); replaced on a second call."""
        params = RegistrationParameters.from_any(parameters)
        label = self.label_volume(params.fixedLabel, params.fixedVolume)
        scene = params.fixedVolume.GetScene()
        name = f"{params.fixedLabel.GetName()}-Gland"
        model = self.find_output(scene, "vtkMRMLModelNode", name, "gland")
        if model is None:
            model = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
        model.SetAndObservePolyData(label_surface_polydata(label))
        if model.GetDisplayNode() is None:
            model.CreateDefaultDisplayNodes()
        display = model.GetDisplayNode()
        display.SetColor(0.9, 0.6, 0.3)
        display.SetOpacity(0.4)
        display.SetVisibility2D(True)  # the gland outline in the slice views too
        model.SetAttribute(OUTPUT_ATTRIBUTE, "gland")
        return model

    @staticmethod
    def show_fusion(background, foreground, opacity: float = FUSION_OPACITY, scene=None) -> int:
        """Every slice view: `background` under `foreground` (None: no foreground) at `opacity`. Returns the
        number of slice views changed (0 in a scene without views, e.g. slicer-core)."""
        scene = scene if scene is not None else background.GetScene()
        count = 0
        for composite in scene.GetNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            composite.SetForegroundOpacity(float(opacity) if foreground is not None else 0.0)
            count += 1
        return count

    # -- cases ---------------------------------------------------------------------------------------
    def load_case(self, case_dir, scene=None) -> dict:
        """A case folder (docs/DATA_FORMATS.md) into the scene: {"fixed", "fixed_label", "moving", "surface", "truth"
        (transform node, not applied, or None), "landmarks" (markups on the MRI, or None), "case"}."""
        from ultrasound_ai.mrml import matrix_to_transform_node_ras, points_to_fiducials, resolve_scene, volume_to_node
        from ultrasound_ai.registration.case import read_case

        self.ensure_dependencies()
        case = read_case(case_dir)
        scene = resolve_scene(scene)
        name = case.name
        fixed = volume_to_node(case.fixed, name=f"{name}-MRI", scene=scene)
        label = volume_to_node(case.fixed_label, name=f"{name}-MRI-label", scene=scene, labelmap=True)
        moving = volume_to_node(case.moving, name=f"{name}-TRUS", scene=scene)
        surface = points_to_fiducials(case.surface_fixed, name=f"{name}-Surface", scene=scene)
        surface.SetDisplayVisibility(False)  # hundreds of points would hide the images
        truth = None
        if case.truth_fixed_to_moving is not None:
            truth = matrix_to_transform_node_ras(moving_to_fixed_ras(case.truth_fixed_to_moving), name=f"{name}-Truth",
                                                 scene=scene)
        landmarks = None
        if case.landmarks_fixed is not None and len(case.landmarks_fixed):
            landmarks = points_to_fiducials(case.landmarks_fixed, name=f"{name}-Landmarks", scene=scene)
        return {"fixed": fixed, "fixed_label": label, "moving": moving, "surface": surface, "truth": truth,
                "landmarks": landmarks, "case": case}
