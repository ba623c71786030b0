"""UltrasoundAI: freehand 3D ultrasound reconstruction (tracked, IMU dead reckoning, FiMA, MoGLo-Net), and
an Analysis section: segment or classify an image with the ultrasound foundation model (USFM).

The Widget binds Resources/UI/UltrasoundAI.ui to a parameter node and calls the Logic
(UltrasoundAILib/logic.py), which runs the engine job in a background process; the panel only shows
progress, offers Cancel and reports the results (the job loop is ultrasound_ai.mrml.job_panel's). The
Test class runs the scenario functions of UltrasoundAILib/scenarios.py, the same ones the slicer-core
tests run; ctest runs each test_* method on its own.
"""

import os
import pathlib
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLMarkupsCurveNode, vtkMRMLScalarVolumeNode, vtkMRMLSequenceBrowserNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# UltrasoundAILib puts the engine on sys.path (a source checkout), so it is imported first.
from UltrasoundAILib.analysis import AnalysisParameters, UltrasoundAIAnalysisLogic, summary_text
from UltrasoundAILib.logic import METHODS, UltrasoundAILogic

from ultrasound_ai.mrml.job_panel import JobPanel, ParameterNodePanel, describe_module
from ultrasound_ai.mrml.scenario_support import SelfTestSetUp


class UltrasoundAI(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(parent, "UltrasoundAI", ["Sequences", "Markups", "VolumeRendering"], help_text=(
            "Freehand 3D ultrasound reconstruction: estimate the probe poses of a sweep (from its tracker, "
            "or from IMUs alone), then compound the frames into a volume. Select a sequence browser (image "
            "sequence, optional ImageToReference transforms and IMU table) or a sweep file, a method, and "
            "press Apply. The work runs in a background process; press the button again to cancel. "
            "Analysis: segment (lesion) or classify (benign / malignant / normal) a 2D image, a cine frame "
            "by frame, or a 3D volume with the ultrasound foundation model. The shipped models are trained "
            "on simulated data only and are not validated on patient data."
        ), acknowledgement="Methods: FiMA (Yan et al., MICCAI 2024), MoGLo-Net (Kim et al., IEEE TMI 2025), USFM (Jiao et "
            "al., Medical Image Analysis 2024).")


@parameterNodeWrapper
class UltrasoundAIParameterNode:
    inputBrowser: vtkMRMLSequenceBrowserNode
    inputSweepFile: pathlib.Path
    method: Annotated[str, Choice(list(METHODS))] = "auto"
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    checkpoint: pathlib.Path
    onlineAlignment: bool = False
    imuSelection: str = ""
    sweepDirection: Annotated[str, Choice(["model", "ordering", "forward", "network", "imus"])] = "model"
    outputSpacing: Annotated[float, WithinRange(0.05, 5.0)] = 0.5
    compounding: Annotated[str, Choice(["mean", "max", "latest"])] = "mean"
    fillHoles: Annotated[str, Choice(["none", "gaussian", "nearest"])] = "none"
    outputVolume: vtkMRMLScalarVolumeNode
    outputTrajectory: vtkMRMLMarkupsCurveNode
    createNewNodes: bool = False
    computeMetrics: bool = True
    analysisInput: vtkMRMLScalarVolumeNode
    analysisTask: Annotated[str, Choice(["segment", "classify"])] = "segment"
    analysisFrames: Annotated[str, Choice(["all", "current"])] = "all"
    analysisFrame: Annotated[int, WithinRange(0, 100000)] = 0
    analysisInputKind: Annotated[str, Choice(["auto", "cine", "volume"])] = "auto"
    analysisModel: str = ""


class UltrasoundAIWidget(ParameterNodePanel, ScriptedLoadableModuleWidget, VTKObservationMixin):
    ParameterNode = UltrasoundAIParameterNode

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.loadPanel("UI/UltrasoundAI.ui")
        self.logic = UltrasoundAILogic()
        self.jobs = JobPanel(
            self.logic, qt.QTimer(), self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel,
            title="reconstruction", parameters=self.logicParameters, ready=self.inputsReady,
            on_results=self.showResults, error_display=slicer.util.errorDisplay,
            not_ready_tip="Select a sweep browser or a sweep file.", on_update=self.onUpdate,
            model_label=self.ui.modelCardLabel, model_line=self.modelLine,
            path_boxes=(self.ui.inputSweepFilePathLineEdit, self.ui.checkpointPathLineEdit))
        self.ui.loadSweepButton.connect("clicked(bool)", self.onLoadSweepButton)
        self.analysisLogic = UltrasoundAIAnalysisLogic()
        self.analysisJobs = JobPanel(
            self.analysisLogic, qt.QTimer(), self.ui.analysisApplyButton, self.ui.analysisProgressBar,
            self.ui.analysisStatusLabel, title="analysis", parameters=self.analysisParameters,
            ready=lambda: self._parameterNode is not None and bool(self._parameterNode.analysisInput),
            on_results=self.showAnalysisResults, error_display=slicer.util.errorDisplay,
            not_ready_tip="Select an image volume.", model_label=self.ui.analysisModelCardLabel,
            model_line=self.analysisModelLine)
        self.ui.analysisApplyButton.connect("clicked(bool)", self.analysisJobs.apply)
        self.setupPanel()

    # -- the Analysis section: a second job loop on the same parameter node --------------------------
    def setParameterNode(self, inputParameterNode):
        import vtk

        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.analysisJobs.update)
        ParameterNodePanel.setParameterNode(self, inputParameterNode)
        if self._parameterNode:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.analysisJobs.update)
            self.analysisJobs.update()

    def onSceneStartClose(self, caller, event):
        self.analysisJobs.scene_closing()
        ParameterNodePanel.onSceneStartClose(self, caller, event)

    def cleanup(self):
        self.analysisJobs.cleanup()
        ParameterNodePanel.cleanup(self)

    def analysisParameters(self):
        p = self._parameterNode
        return {name: getattr(p, name) for name in AnalysisParameters.__dataclass_fields__ if hasattr(p, name)}

    def analysisModelLine(self):
        p = self._parameterNode
        return "" if p is None else self.analysisLogic.analysis_model_line(p.analysisTask, p.analysisModel)

    def showAnalysisResults(self, nodes, duration_s):
        self.ui.analysisStatusLabel.text = f"{summary_text(nodes['result'])}  ({duration_s:.1f} s)"
        self.ui.analysisTableView.setMRMLTableNode(nodes["table"])
        slicer.util.setSliceViewerLayers(background=self._parameterNode.analysisInput, fit=True)

    def onParameterNodeSet(self):
        if not self._parameterNode.inputBrowser:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
            if first:
                self._parameterNode.inputBrowser = first

    def _sweepFile(self):
        path = self._parameterNode.inputSweepFile if self._parameterNode else None
        return str(path) if path and str(path) != "." and os.path.isfile(str(path)) else None

    def inputsReady(self):
        return self._parameterNode is not None and (bool(self._parameterNode.inputBrowser) or bool(self._sweepFile()))

    def onUpdate(self, running):
        self.ui.loadSweepButton.enabled = not running and bool(self._sweepFile())

    def modelLine(self):
        p = self._parameterNode
        if p is None:
            return ""
        if p.method == "auto":
            return "auto: " + "; ".join(self.logic.model_line(m) for m in ("fima", "moglo"))
        return self.logic.model_line(p.method, p.checkpoint if str(p.checkpoint) != "." else None)

    def onLoadSweepButton(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the sweep file.", waitCursor=True):
            self._parameterNode.inputBrowser = self.logic.load_sweep(self._sweepFile())

    def showResults(self, nodes, duration_s):
        payload = nodes["result"]
        text = f"{payload.get('method')}: {payload.get('n_frames')} frames in {duration_s:.1f} s."
        if nodes["metrics"] is not None:
            m = payload["metrics"]
            text += f"  FDR {m.get('fdr_pct', float('nan')):.2f} %, MEA {m.get('mea_deg', float('nan')):.2f}°."
            self.ui.metricsTableView.setMRMLTableNode(nodes["metrics"])
        else:
            text += "  No tracked poses in the sweep: no accuracy metrics."
        if nodes.get("imu_weights") is not None:
            self.ui.imuWeightsTableView.setMRMLTableNode(nodes["imu_weights"])
        for note in payload.get("notes") or []:  # how the method read the sweep: skips, warnings, frame stride
            text += f"\nNote: {note}."
        self.ui.statusLabel.text = text
        # The parameter node's output selectors are left alone: a run with another method must not
        # write into this method's nodes.
        slicer.util.setSliceViewerLayers(background=nodes["volume"], fit=True)


class UltrasoundAITest(SelfTestSetUp, ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the scenarios that Testing/mrml/test_freehand_module.py runs with slicer-core.
    Each test_* stands alone (ctest runs each with setUp only; runTest runs them all)."""

    def test_tracked_and_imu(self):
        from UltrasoundAILib import scenarios

        sweep_path = scenarios.make_sweep(self.work / "sweep.h5")
        for method in ("tracked", "imu"):
            scenarios.reconstruct_scenario(sweep_path, method, self.work / method)
        self.delayDisplay("tracked and imu reconstructions passed")

    def test_cancel(self):
        from UltrasoundAILib import scenarios

        scenarios.cancel_scenario(scenarios.make_sweep(self.work / "sweep.h5"), self.work / "cancel")
        self.delayDisplay("cancel passed")

    def test_bad_input(self):
        from UltrasoundAILib import scenarios

        scenarios.bad_input_scenario(self.work)
        self.delayDisplay("bad input passed")

    def test_analysis_dicom_frame(self):
        from UltrasoundAILib import analysis_scenarios

        analysis_scenarios.dicom_frame_scenario(self.work / "frame")
        self.delayDisplay("analysis of a DICOM frame passed")

    def test_analysis_dicom_cine(self):
        from UltrasoundAILib import analysis_scenarios

        analysis_scenarios.dicom_cine_scenario(self.work / "cine")
        self.delayDisplay("analysis of a DICOM cine passed")

    def test_analysis_volume(self):
        from UltrasoundAILib import analysis_scenarios

        analysis_scenarios.volume_surface_scenario(self.work / "volume")
        self.delayDisplay("analysis of a 3D volume passed")
