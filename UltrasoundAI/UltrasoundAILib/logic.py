"""UltrasoundAI Logic: freehand 3D reconstruction of a sweep held in a sequence browser (or a file).

Imports ``slicer``, ``vtk`` and the engine, never ``qt`` or ``ctk``: it runs inside the Slicer
application and, for the tests, with the slicer-core wheel.

    logic = UltrasoundAILogic()
    browser = logic.load_sweep("sweep.h5")                       # sweep file -> browser (+ IMU table)
    nodes = logic.run({"inputBrowser": browser, "method": "imu"})  # blocking: job, then nodes
    launcher = logic.start(parameters)                           # non-blocking (the Widget's Apply)
    ... launcher.drain() from a timer ...; logic.cancel()
    nodes = logic.load_results(launcher.wait(), parameters)

Parameters are a dict or any object (the Widget's parameter node wrapper) with these names:
inputBrowser (vtkMRMLSequenceBrowserNode) or inputSweepFile (path; used when there is no browser),
method ("auto" | "tracked" | "imu" | "fima" | "moglo" | any registered pose method; "auto" picks FiMA
for sweeps with IMU data and MoGLo-Net for sweeps without, when their models are installed, see
``resolve_method``), device ("auto", "cpu", "cuda[:N]", "mps"), checkpoint (a .pt path or model name
for the networks; empty = the installed default), onlineAlignment (bool: FiMA's test-time alignment),
imuSelection (FiMA: comma-separated 0-based IMU indices to use; empty = all), sweepDirection (which way
each pair moved out of plane: "model" = the model card's setting, "network" = the network's signs; MoGLo-Net
also "ordering" = forward, then each pair's direction from the frames' spectral order, and "forward" = the
sweep moves towards +z; FiMA also "imus" = the sign from the accelerometers),
outputSpacing (mm),
compounding ("mean" | "max" | "latest"), fillHoles ("none" | "gaussian" | "nearest"), outputVolume /
outputTrajectory (nodes to fill; found or created by name when None), createNewNodes (bool: new nodes
instead of replacing the previous run's).

Files. The Logic's work folder (``workdir``; a new temporary folder by default, under Slicer's
temporary path inside Slicer) holds a browser's exported sweep, ``inputs/<browser>.h5``, and the job's
outputs, ``<name>-<method>-estimate.h5`` (a sweep contract file with the estimated tforms) and
``<name>-<method>-volume.nrrd``; they stay there after the run. A sweep file input is read in place.

IMU data in a scene. A browser carries IMU samples as a vtkMRMLTableNode referenced from the browser
with the node reference role ``UltrasoundAI.IMU`` (IMU_TABLE_ROLE): one row per (imu, frame), imu-major,
columns ``imu``, ``frame``, ``acc_x_m_s2`` .. ``acc_z_m_s2`` (the contract's specific force, IMU axes)
and ``euler_x_deg`` .. ``euler_z_deg`` (static-xyz Euler angles of the IMU orientation), float32 as in
the sweep file; table attributes ``UltrasoundAI.ImuPositionMm`` (JSON [M][3], image mm; optional)
and ``UltrasoundAI.FrameRateHz`` (when the frames have no timestamps). A table saves with the scene
(.tsv), so a saved and reopened scene keeps its IMU data; no side file is needed.
The browser also records the sweep file it was loaded from (``UltrasoundAI.SweepFile``), for reuse.

Results (load_results), named after the browser and the method so that running the same method
again replaces its nodes and another method adds its own (createNewNodes=True keeps them all):
  "<browser>-<method>-ImageToReference"  estimated pixel -> RAS transform sequence in the browser
  "<browser>-<method>-Volume"            the reconstruction (volume rendering on where available)
  "<browser>-<method>-Trajectory"        markups curve through the frame centres
  "<browser>-<method>-Metrics"           vtkMRMLTableNode, only when the sweep has tracked poses, the
                                         method is not tracked and computeMetrics is on
  "<browser>-<method>-ImuWeights"        vtkMRMLTableNode, only when the method fuses IMUs (FiMA): one
                                         row per frame pair, the fusion weight of each IMU
Estimates are in the contract's frame (frame 0 = identity, docs/DATA_FORMATS.md), so the estimated transforms,
the volume and the trajectory agree with each other; the tracked ImageToReference of the input
browser stays in the tracker's frame.
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

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.methods import PANEL_CHOICES, available_methods
from ultrasound_ai.mrml.module_logic import (
    ModuleLogic,
    PanelParameters,
    path_or_none,
    remove_browser,
    remove_with_helpers,
    safe_name,
)
from ultrasound_ai.mrml.tables import float_column, int_column, new_table_node, set_table

log = logging.getLogger(__name__)

TASK_NAME = "freehand.reconstruct"
METHODS = (*PANEL_CHOICES, *available_methods())  # offered in the panel: the registry's names
IMU_METHODS = ("fima",)  # methods that take onlineAlignment / imuSelection
SWEEP_DIRECTIONS = ("model", "ordering", "forward", "network", "imus")  # MoGLo-Net's and FiMA's; "model": the card's setting
DEVICES = ("auto", "cpu", "cuda", "mps")
COMPOUNDING = ("mean", "max", "latest")
FILL_HOLES = ("none", "gaussian", "nearest")

IMU_TABLE_ROLE = "UltrasoundAI.IMU"
SWEEP_FILE_ATTRIBUTE = "UltrasoundAI.SweepFile"
IMU_POSITION_ATTRIBUTE = "UltrasoundAI.ImuPositionMm"
FRAME_RATE_ATTRIBUTE = "UltrasoundAI.FrameRateHz"
OUTPUT_ATTRIBUTE = "UltrasoundAI.Output"  # kind of result node: volume, trajectory, metrics, estimate
METHOD_ATTRIBUTE = "UltrasoundAI.Method"
_ACC_COLUMNS = ("acc_x_m_s2", "acc_y_m_s2", "acc_z_m_s2")
_EULER_COLUMNS = ("euler_x_deg", "euler_y_deg", "euler_z_deg")


# ---------------------------------------------------------------------------------------------------
# Parameters


@dataclass
class ReconstructionParameters(PanelParameters):
    """A reconstruction run as the Logic sees it (names as in the module docstring)."""

    inputBrowser: Any = None
    inputSweepFile: str | None = None
    method: str = "auto"
    device: str = "auto"
    checkpoint: str | None = None
    onlineAlignment: bool = False
    imuSelection: str = ""
    sweepDirection: str = "model"
    outputSpacing: float = 0.5
    compounding: str = "mean"
    fillHoles: str = "none"
    outputVolume: Any = None
    outputTrajectory: Any = None
    createNewNodes: bool = False
    # Compare the estimate with the sweep's tracker poses, when it has them and the method is not
    # `tracked` (whose estimate they are): the job's evaluation phase, which takes time on long sweeps.
    computeMetrics: bool = True

    REQUIRED = "inputBrowser or inputSweepFile"

    def check(self) -> None:
        self.inputSweepFile = path_or_none(self.inputSweepFile)
        self.method = str(self.method or "").strip()
        self.device = str(self.device or "auto").strip().lower()
        self.checkpoint = path_or_none(self.checkpoint)
        self.onlineAlignment = bool(self.onlineAlignment)
        self.imuSelection = str(self.imuSelection or "").strip()
        parse_imu_selection(self.imuSelection)  # a bad list fails here, naming the field
        self.sweepDirection = str(self.sweepDirection or "model").strip().lower()
        if self.sweepDirection not in SWEEP_DIRECTIONS:
            raise InputError(f"sweepDirection: expected one of {', '.join(SWEEP_DIRECTIONS)}, got {self.sweepDirection!r}")
        try:
            self.outputSpacing = float(self.outputSpacing)
        except (TypeError, ValueError):
            raise InputError(f"outputSpacing: expected a voxel size in mm, got {self.outputSpacing!r}") from None
        if not (np.isfinite(self.outputSpacing) and self.outputSpacing > 0):
            raise InputError(f"outputSpacing: expected a positive voxel size in mm, got {self.outputSpacing}")
        if self.compounding not in COMPOUNDING:
            raise InputError(f"compounding: expected one of {', '.join(COMPOUNDING)}, got {self.compounding!r}")
        if self.fillHoles not in FILL_HOLES:
            raise InputError(f"fillHoles: expected one of {', '.join(FILL_HOLES)}, got {self.fillHoles!r}")
        if not self.method:
            raise InputError(f"method: expected one of {', '.join(METHODS)} (or another registered method)")
        if self.inputBrowser is None and self.inputSweepFile is None:
            raise InputError("input: select a sequence browser (inputBrowser) or a sweep file (inputSweepFile)")
        if self.inputBrowser is not None and not isinstance(self.inputBrowser, slicer.vtkMRMLSequenceBrowserNode):
            raise InputError(
                f"inputBrowser: expected a vtkMRMLSequenceBrowserNode, got {type(self.inputBrowser).__name__}"
            )


def _has_tforms(sweep_path) -> bool:
    """Whether a sweep file holds tracker poses (read without loading its frames)."""
    import h5py

    with h5py.File(sweep_path, "r") as fh:
        return "tforms" in fh


def parse_imu_selection(text: str) -> list[int] | None:
    """ "0, 2,3" -> [0, 2, 3]; "" -> None (all IMUs). InputError for anything else."""
    text = str(text or "").strip()
    if not text:
        return None
    try:
        values = [int(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise InputError(f"imuSelection: expected comma-separated IMU indices such as '0,1,3', got {text!r}") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise InputError(f"imuSelection: expected distinct IMU indices >= 0, got {text!r}")
    return values


def resolve_method(method: str, has_imu: bool, has_tforms: bool) -> str:
    """The method a run uses: anything but "auto" as it is. "auto": FiMA for a sweep with IMU data and
    MoGLo-Net for one without, when a default model of that method is installed (Resources/Models or
    ULTRASOUND_AI_MODELS); otherwise the classical choice: IMU dead reckoning with IMUs, the tracker's
    poses without them. InputError when nothing fits."""
    if method != "auto":
        return method
    from ultrasound_ai.models.registry import default_model

    def installed(name: str) -> bool:
        try:
            default_model(name)
            return True
        except Exception:  # noqa: BLE001 - not installed (or unreadable): fall back
            return False

    if has_imu:
        return "fima" if installed("fima") else "imu"
    if installed("moglo"):
        return "moglo"
    if has_tforms:
        return "tracked"
    raise InputError("method 'auto': the sweep has neither IMU data nor tracker poses and no MoGLo-Net model is "
                     "installed; choose a method and a checkpoint (MoGLo-Net needs a trained model)")


# ---------------------------------------------------------------------------------------------------
# IMU table


def imu_to_table(imu_acc, imu_euler_deg, imu_position_mm=None, frame_rate_hz=None, name="IMU", node=None, scene=None):
    """A vtkMRMLTableNode holding IMU samples [M, N, 3] (see the module docstring for the layout)."""
    acc = np.asarray(imu_acc, dtype=np.float32)
    euler = np.asarray(imu_euler_deg, dtype=np.float32)
    if acc.ndim != 3 or acc.shape[2] != 3 or acc.shape != euler.shape or acc.shape[0] < 1:
        raise InputError(
            f"imu_acc / imu_euler_deg: expected two arrays [M, N, 3] of the same shape, got {acc.shape} and {euler.shape}"
        )
    m, n, _ = acc.shape
    node = new_table_node(name, node, scene)
    imu_index, frame_index = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    columns = [int_column("imu", imu_index.reshape(-1)), int_column("frame", frame_index.reshape(-1))]
    columns += [float_column(col, acc[:, :, c].reshape(-1)) for c, col in enumerate(_ACC_COLUMNS)]
    columns += [float_column(col, euler[:, :, c].reshape(-1)) for c, col in enumerate(_EULER_COLUMNS)]
    set_table(node, columns)
    node.SetAttribute(IMU_POSITION_ATTRIBUTE, json.dumps(np.asarray(imu_position_mm, float).tolist())
                      if imu_position_mm is not None else None)
    node.SetAttribute(FRAME_RATE_ATTRIBUTE, repr(float(frame_rate_hz)) if frame_rate_hz is not None else None)
    return node


def table_to_imu(node) -> dict:
    """Inverse of imu_to_table: {"imu_acc", "imu_euler_deg" float32 [M, N, 3], "imu_position_mm" or
    None, "frame_rate_hz" or None}."""
    if not isinstance(node, slicer.vtkMRMLTableNode):
        raise InputError(f"IMU table: expected a vtkMRMLTableNode, got {type(node).__name__}")
    table = node.GetTable()
    what = f"IMU table {node.GetName()!r}"

    def column(col: str) -> np.ndarray:
        array = table.GetColumnByName(col)
        if array is None:
            raise InputError(f"{what}: missing column {col!r}; expected imu, frame, {', '.join(_ACC_COLUMNS + _EULER_COLUMNS)}")
        return np.array([array.GetValue(k) for k in range(array.GetNumberOfTuples())])

    imu, frame = column("imu").astype(int), column("frame").astype(int)
    if imu.size == 0:
        raise InputError(f"{what}: has no rows")
    m, n = int(imu.max()) + 1, int(frame.max()) + 1
    if imu.size != m * n or not np.array_equal(imu * n + frame, np.arange(m * n)):
        raise InputError(f"{what}: expected one row per (imu, frame), imu-major, for {m} IMUs x {n} frames")
    acc = np.stack([column(c) for c in _ACC_COLUMNS], axis=-1).astype(np.float32).reshape(m, n, 3)
    euler = np.stack([column(c) for c in _EULER_COLUMNS], axis=-1).astype(np.float32).reshape(m, n, 3)
    position = node.GetAttribute(IMU_POSITION_ATTRIBUTE)
    rate = node.GetAttribute(FRAME_RATE_ATTRIBUTE)
    try:
        position = np.asarray(json.loads(position), dtype=np.float64) if position else None
        rate = float(rate) if rate else None
    except ValueError as exc:
        raise InputError(f"{what}: unreadable attribute ({exc})") from exc
    return {"imu_acc": acc, "imu_euler_deg": euler, "imu_position_mm": position, "frame_rate_hz": rate}


# ---------------------------------------------------------------------------------------------------
# The Logic


class UltrasoundAILogic(ModuleLogic):
    """Processing behind the UltrasoundAI panel; usable from the Python console and tests."""

    TASK_NAME = TASK_NAME
    TITLE = "reconstruction"
    Parameters = ReconstructionParameters
    OUTPUT_ATTRIBUTE = OUTPUT_ATTRIBUTE
    METHOD_ATTRIBUTE = METHOD_ATTRIBUTE
    MODEL_METHODS = {"fima": "fima", "moglo": "moglo"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_method = None  # the method the last start() used ("auto" resolved)

    # -- inputs --------------------------------------------------------------------------------------
    def load_sweep(self, path, name: str | None = None, scene=None):
        """A sweep file (docs/DATA_FORMATS.md) as a sequence browser: image sequence, ImageToReference
        transforms when the file has tforms, and the IMU table when it has IMU data. A browser loaded
        earlier from the same file is reused (replaced)."""
        from ultrasound_ai.io.sweep import read_sweep
        from ultrasound_ai.mrml import resolve_scene, sweep_to_browser

        self.ensure_dependencies()  # reading HDF5 needs h5py
        path = Path(path).expanduser().resolve()
        sweep = read_sweep(path)
        scene = resolve_scene(scene)
        for old in list(scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")):
            if old.GetAttribute(SWEEP_FILE_ATTRIBUTE) == str(path):
                self.remove_browser(old)
        browser = sweep_to_browser(
            sweep.frames, sweep.pixel_spacing_xy, sweep.tforms, sweep.timestamps_s, name=name or path.stem, scene=scene
        )
        browser.SetAttribute(SWEEP_FILE_ATTRIBUTE, str(path))
        if sweep.imu_acc is not None and sweep.imu_euler_deg is not None:
            table = imu_to_table(
                sweep.imu_acc, sweep.imu_euler_deg, sweep.imu_position_mm,
                sweep.frame_rate_hz if sweep.timestamps_s is None else None,
                name=f"{browser.GetName()}-IMU", scene=scene,
            )
            browser.SetAndObserveNodeReferenceID(IMU_TABLE_ROLE, table.GetID())
        return browser

    @staticmethod
    def remove_browser(browser) -> None:
        """Remove a browser with its sequences, proxy nodes and IMU table."""
        remove_browser(browser, IMU_TABLE_ROLE)

    def prepare_inputs(self, source, workdir: str | os.PathLike | None = None) -> Path:
        """The sweep file a job reads: `source` is a sweep file path (checked, used as it is) or a
        vtkMRMLSequenceBrowserNode (written through the bridge to <workdir>/<browser name>.h5, with its
        IMU table when it has one). Raises InputError naming what is missing."""
        from ultrasound_ai.io.sweep import Sweep, read_sweep, write_sweep
        from ultrasound_ai.mrml import browser_to_sweep

        if isinstance(source, (str, os.PathLike)):
            path = Path(source).expanduser().resolve()
            read_sweep(path)  # a bad file fails here, with its name, before any job starts
            return path
        if not isinstance(source, slicer.vtkMRMLSequenceBrowserNode):
            raise InputError(
                f"input: expected a sweep file path or a vtkMRMLSequenceBrowserNode, got {type(source).__name__}"
            )
        name = source.GetName() or "Sweep"
        master = source.GetMasterSequenceNode()
        if master is None or master.GetNumberOfDataNodes() == 0:
            raise InputError(
                f"input browser {name!r}: has no frames; expected an image sequence of at least 2 ultrasound frames"
            )
        data = browser_to_sweep(source)
        frames = data["frames"]
        if frames.dtype != np.uint8:
            raise InputError(f"input browser {name!r}: frames are {frames.dtype}; expected 8-bit (uint8) B-mode images")
        imu = {}
        table = source.GetNodeReference(IMU_TABLE_ROLE)
        if table is not None:
            imu = table_to_imu(table)
            if imu["imu_acc"].shape[1] != frames.shape[0]:
                raise InputError(
                    f"IMU table {table.GetName()!r}: has samples for {imu['imu_acc'].shape[1]} frames, "
                    f"the browser {name!r} holds {frames.shape[0]}"
                )
        sweep = Sweep(
            frames=frames,
            pixel_spacing_xy=tuple(float(s) for s in data["pixel_spacing_mm"]),
            tforms=data["tforms"],
            timestamps_s=data["timestamps_s"],
            frame_rate_hz=imu.get("frame_rate_hz"),
            imu_acc=imu.get("imu_acc"),
            imu_euler_deg=imu.get("imu_euler_deg"),
            imu_position_mm=imu.get("imu_position_mm"),
            attrs={"source": f"Slicer sequence browser {name}"},
        )
        if sweep.tforms is not None:
            # The bridge's pixel -> RAS -> image-mm conversion leaves ~1e-16 rounding; keep the
            # contract's exact last row.
            sweep.tforms[:, 3, :] = [0.0, 0.0, 0.0, 1.0]
        # A subfolder: a work folder that also holds the user's own sweep files must never have one
        # overwritten by this export.
        folder = Path(workdir) if workdir is not None else self.workdir / "inputs"
        path = folder / f"{safe_name(name, 'Sweep')}.h5"
        write_sweep(sweep.validate(name=f"input browser {name!r}"), path)
        return path

    # -- running -------------------------------------------------------------------------------------
    def _job(self, params: ReconstructionParameters, sweep_path: Path, stem: str) -> dict:
        out = self.workdir
        return {
            "task": TASK_NAME,
            "inputs": {"sweep": str(sweep_path)},
            "outputs": {
                "estimate": str(out / f"{stem}-{params.method}-estimate.h5"),
                "volume": str(out / f"{stem}-{params.method}-volume.nrrd"),
            },
            "parameters": {
                "method": params.method,
                "spacing_mm": params.outputSpacing,
                "compounding": params.compounding,
                "fill_holes": params.fillHoles,
                "checkpoint": params.checkpoint if params.method not in ("tracked", "imu") else None,
                "method_params": self._method_params(params),
                "evaluate": bool(params.computeMetrics) and params.method != "tracked" and _has_tforms(sweep_path),
            },
            "device": params.device,
        }

    @staticmethod
    def _method_params(params: ReconstructionParameters) -> dict:
        if params.method == "moglo":
            return {} if params.sweepDirection == "model" else {"direction": params.sweepDirection}
        if params.method not in IMU_METHODS:
            return {}
        out = {"online_align": params.onlineAlignment}
        if params.method == "fima" and params.sweepDirection != "model":
            out["direction"] = params.sweepDirection
        imus = parse_imu_selection(params.imuSelection)
        if imus is not None:
            out["imus"] = imus
        return out

    def make_job(self, params: ReconstructionParameters) -> dict:
        """Check the method, write a browser's sweep (a sweep file is read in place) and resolve
        "auto" from what the sweep holds; the job of the reconstruction."""
        if params.method != "auto":
            self._check_method(params.method)
        source = params.inputBrowser if params.inputBrowser is not None else params.inputSweepFile
        sweep_path = self.prepare_inputs(source)
        if params.method == "auto":
            from ultrasound_ai.io.sweep import read_sweep

            sweep = read_sweep(sweep_path)
            params.method = resolve_method("auto", sweep.imu_acc is not None, sweep.tforms is not None)
            self._check_method(params.method)
        self.last_method = params.method
        stem = safe_name(params.inputBrowser.GetName() if params.inputBrowser is not None else Path(sweep_path).stem,
                         "Sweep")
        return self._job(params, sweep_path, stem)

    @staticmethod
    def _check_method(method: str) -> None:
        from ultrasound_ai.freehand.methods import available_methods

        known = available_methods()
        if method not in known:
            raise InputError(f"method: unknown pose method {method!r}; available: {', '.join(known)}")

    # -- results -------------------------------------------------------------------------------------
    def load_results(self, result, parameters) -> dict:
        """Turn a finished job into nodes (see the module docstring); returns {"estimate": sequence,
        "volume": volume node, "trajectory": curve node, "metrics": table node or None, "browser":
        browser, "result": the task's result dict}. A failed job raises InputError (bad input) or
        RuntimeError with the job's message; a cancelled one raises Cancelled. Nothing is created then."""
        from ultrasound_ai.io.sweep import read_sweep
        from ultrasound_ai.io.volume import read_volume
        from ultrasound_ai.mrml import show_volume_rendering, trajectory_to_curve, volume_to_node

        if hasattr(result, "wait") and hasattr(result, "drain"):  # a JobLauncher
            result = result.wait()
        params = ReconstructionParameters.from_any(parameters)
        payload = self.finished_payload(result)
        estimate_path = Path(result.outputs.get("estimate") or payload.get("estimate", ""))
        volume_path = Path(result.outputs.get("volume") or payload.get("volume", ""))
        estimate = read_sweep(estimate_path)
        volume = read_volume(volume_path)
        method = str(payload.get("method") or params.method)

        browser = params.inputBrowser
        if browser is None or browser.GetScene() is None:
            browser = self._browser_for_file(params.inputSweepFile)
        scene = browser.GetScene()
        base = f"{browser.GetName()}-{method}"
        new = bool(params.createNewNodes)

        sequence = self._estimate_sequence(browser, estimate.tforms, estimate.pixel_spacing_xy, f"{base}-ImageToReference", new)
        sequence.SetAttribute(METHOD_ATTRIBUTE, method)

        volume_node = params.outputVolume or self.find_output(scene, "vtkMRMLScalarVolumeNode", f"{base}-Volume", "volume", new)
        volume_node = volume_to_node(volume, name=f"{base}-Volume", node=volume_node, scene=scene)
        self.tag(volume_node, "volume", method)
        try:
            show_volume_rendering(volume_node, preset="US-Fetal")
        except Exception as exc:  # noqa: BLE001 - a missing renderer must not lose the results
            log.warning("UltrasoundAI: volume rendering not shown: %s", exc)

        curve = params.outputTrajectory or self.find_output(scene, "vtkMRMLMarkupsCurveNode", f"{base}-Trajectory", "trajectory", new)
        curve = trajectory_to_curve(frame_centres_lps(estimate), name=f"{base}-Trajectory", node=curve, scene=scene)
        self.tag(curve, "trajectory", method)

        metrics_node = self.metrics_output(scene, f"{base}-Metrics", payload.get("metrics"), method, new)
        weights_node = None
        if estimate.imu_weights is not None:
            weights_node = self.find_output(scene, "vtkMRMLTableNode", f"{base}-ImuWeights", "imu_weights", new)
            weights_node = imu_weights_to_table(estimate.imu_weights, name=f"{base}-ImuWeights", node=weights_node,
                                                scene=scene)
            self.tag(weights_node, "imu_weights", method)
        return {"estimate": sequence, "volume": volume_node, "trajectory": curve, "metrics": metrics_node,
                "imu_weights": weights_node, "browser": browser, "result": payload}

    def _browser_for_file(self, sweep_file):
        if sweep_file is None:
            raise InputError("input: no browser and no sweep file to attach the results to")
        path = str(Path(sweep_file).expanduser().resolve())
        for browser in slicer.mrmlScene.GetNodesByClass("vtkMRMLSequenceBrowserNode"):
            if browser.GetAttribute(SWEEP_FILE_ATTRIBUTE) == path:
                return browser
        return self.load_sweep(path)

    @staticmethod
    def _estimate_sequence(browser, tforms, spacing, name: str, new: bool):
        """Add the estimate to the browser, removing a previous sequence of the same name (and its
        proxy) unless new=True."""
        from ultrasound_ai.mrml import poses_to_transform_sequence
        from ultrasound_ai.mrml.sequences import browser_sequences

        scene = browser.GetScene()
        if new:
            name = scene.GenerateUniqueName(name)
        else:
            for seq in browser_sequences(browser):
                if seq.GetName() == name and seq.GetAttribute(OUTPUT_ATTRIBUTE) == "estimate":
                    proxy = browser.GetProxyNode(seq)
                    browser.RemoveSynchronizedSequenceNode(seq.GetID())
                    remove_with_helpers(scene, proxy)
                    remove_with_helpers(scene, seq)
        seq = poses_to_transform_sequence(browser, tforms, spacing, name=name)
        seq.SetAttribute(OUTPUT_ATTRIBUTE, "estimate")
        proxy = browser.GetProxyNode(seq)
        if proxy is not None:
            proxy.SetName(name)
        return seq


# ---------------------------------------------------------------------------------------------------
# Helpers shared with the scenarios


def frame_centres_lps(sweep) -> np.ndarray:
    """[N, 3] LPS mm of each frame's centre, (W-1)/2 columns and (H-1)/2 rows from pixel (0, 0)."""
    n, h, w = sweep.frames.shape
    sx, sy = sweep.pixel_spacing_xy
    centre = np.array([(w - 1) / 2.0 * sx, (h - 1) / 2.0 * sy, 0.0, 1.0])
    return (np.asarray(sweep.tforms) @ centre)[:, :3]


def imu_weights_to_table(weights, name: str = "ImuWeights", node=None, scene=None):
    """A vtkMRMLTableNode of fusion weights [N-1, M]: column "pair" (frame pair i -> i+1) and one column
    "imu_k" per IMU (Slicer's plot module draws them against "pair")."""
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise InputError(f"imu_weights: expected an array [N-1, M], got shape {w.shape}")
    node = new_table_node(name, node, scene)
    set_table(node, [int_column("pair", np.arange(w.shape[0]))] + [float_column(f"imu_{k}", w[:, k])
                                                                   for k in range(w.shape[1])])
    return node


def table_to_imu_weights(node) -> np.ndarray:
    """Inverse of imu_weights_to_table: float32 [N-1, M]."""
    table = node.GetTable()
    cols = [table.GetColumnByName(f"imu_{k}") for k in range(table.GetNumberOfColumns())]
    cols = [c for c in cols if c is not None]
    if not cols:
        raise InputError(f"IMU weights table {node.GetName()!r}: expected columns imu_0, imu_1, ...")
    return np.array([[c.GetValue(r) for c in cols] for r in range(table.GetNumberOfRows())], dtype=np.float32)
