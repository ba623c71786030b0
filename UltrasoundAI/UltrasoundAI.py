"""UltrasoundAI: freehand 3D ultrasound reconstruction (tracked, IMU; FiMA and MoGLo-Net later).

The Widget binds Resources/UI/UltrasoundAI.ui to a parameter node and calls the Logic
(UltrasoundAILib/logic.py), which runs the engine job in a background process; the panel only shows
progress, offers Cancel and reports the results. The Test class runs the scenario functions of
UltrasoundAILib/scenarios.py, the same ones the slicer-core tests run.
"""

import os
import pathlib
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsCurveNode, vtkMRMLScalarVolumeNode, vtkMRMLSequenceBrowserNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from UltrasoundAILib.logic import UltrasoundAILogic


def _ensure_engine_on_path():
    """Make `import ultrasound_ai` work from a source checkout too (the engine sits beside the module
    folders in an installed extension, one level up in the repository)."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isdir(os.path.join(candidate, "ultrasound_ai")) and candidate not in sys.path:
            sys.path.append(candidate)


_ensure_engine_on_path()


class UltrasoundAI(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UltrasoundAI"
        self.parent.categories = ["Ultrasound"]
        self.parent.dependencies = ["Sequences", "Markups", "VolumeRendering"]
        self.parent.contributors = ["UltrasoundAI developers"]
        self.parent.helpText = (
            "Freehand 3D ultrasound reconstruction: estimate the probe poses of a sweep (from its tracker, "
            "or from IMUs alone), then compound the frames into a volume. Select a sequence browser (image "
            "sequence, optional ImageToReference transforms and IMU table) or a sweep file, a method, and "
            "press Apply. The work runs in a background process; press the button again to cancel."
        )
        self.parent.acknowledgementText = (
            "Methods: FiMA (Yan et al., MICCAI 2024), MoGLo-Net (Kim et al., IEEE TMI 2025)."
        )


@parameterNodeWrapper
class UltrasoundAIParameterNode:
    inputBrowser: vtkMRMLSequenceBrowserNode
    inputSweepFile: pathlib.Path
    method: Annotated[str, Choice(["auto", "tracked", "imu", "fima", "moglo"])] = "auto"
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    checkpoint: pathlib.Path
    onlineAlignment: bool = False
    imuSelection: str = ""
    outputSpacing: Annotated[float, WithinRange(0.05, 5.0)] = 0.5
    compounding: Annotated[str, Choice(["mean", "max", "latest"])] = "mean"
    fillHoles: Annotated[str, Choice(["none", "gaussian", "nearest"])] = "none"
    outputVolume: vtkMRMLScalarVolumeNode
    outputTrajectory: vtkMRMLMarkupsCurveNode
    createNewNodes: bool = False


class UltrasoundAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._launcher = None
        self._runParameters = None
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self.onTimer)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UltrasoundAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UltrasoundAILogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSweepButton.connect("clicked(bool)", self.onLoadSweepButton)
        self.ui.progressBar.setRange(0, 1000)
        self.initializeParameterNode()

    def cleanup(self):
        self._timer.stop()
        if self._launcher is not None and not self._launcher.done:
            self.logic.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApplyButton)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(UltrasoundAIParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputBrowser:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
            if first:
                self._parameterNode.inputBrowser = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApplyButton)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApplyButton)
            self._updateApplyButton()

    def _hasSweepFile(self):
        path = self._parameterNode.inputSweepFile if self._parameterNode else None
        return bool(path) and str(path) not in ("", ".") and os.path.isfile(str(path))

    def _updateApplyButton(self, caller=None, event=None):
        running = self._launcher is not None and not self._launcher.done
        if running:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running reconstruction."
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = "Apply"
        ready = self._parameterNode is not None and (bool(self._parameterNode.inputBrowser) or self._hasSweepFile())
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (
            "Run the reconstruction in a background process." if ready else "Select a sweep browser or a sweep file."
        )
        self.ui.loadSweepButton.enabled = self._hasSweepFile()

    # -- actions --------------------------------------------------------------------------------
    def onLoadSweepButton(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the sweep file.", waitCursor=True):
            browser = self.logic.load_sweep(str(self._parameterNode.inputSweepFile))
            self._parameterNode.inputBrowser = browser

    def onApplyButton(self):
        if self._launcher is not None and not self._launcher.done:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            self.ui.applyButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the reconstruction.", waitCursor=True):
            # The Logic installs the engine's dependencies on first use, after asking.
            self._runParameters = self.logic_parameters()
            self.ui.statusLabel.text = "Starting..."
            self._launcher = self.logic.start(self._runParameters)
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self._timer.start()
        if self._launcher is None:
            self.ui.statusLabel.text = ""
        self._updateApplyButton()

    def logic_parameters(self):
        """A snapshot of the panel for the Logic (the parameter node may change while the job runs)."""
        p = self._parameterNode
        return {
            "inputBrowser": p.inputBrowser,
            "inputSweepFile": str(p.inputSweepFile) if p.inputSweepFile else None,
            "method": p.method,
            "device": p.device,
            "checkpoint": str(p.checkpoint) if p.checkpoint else None,
            "onlineAlignment": p.onlineAlignment,
            "imuSelection": p.imuSelection,
            "outputSpacing": p.outputSpacing,
            "compounding": p.compounding,
            "fillHoles": p.fillHoles,
            "outputVolume": p.outputVolume,
            "outputTrajectory": p.outputTrajectory,
            "createNewNodes": p.createNewNodes,
        }

    def onTimer(self):
        launcher = self._launcher
        if launcher is None:
            self._timer.stop()
            return
        # Events arrive on the launcher's thread; the GUI reads them here, on the GUI thread.
        for event in launcher.drain():
            if event.get("event") == "progress":
                self.ui.progressBar.value = int(1000 * float(event.get("fraction", 0.0)))
                self.ui.statusLabel.text = str(event.get("message", ""))
            elif event.get("event") == "log":
                self.ui.statusLabel.text = str(event.get("message", ""))
        if not launcher.done:
            return
        self._timer.stop()
        self._launcher = None
        result = launcher.result
        self.ui.progressBar.visible = False
        if result.status == "cancelled":
            self.ui.statusLabel.text = "Cancelled; nothing was changed."
        elif not result.ok:
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"Reconstruction failed: {result.error}")
        else:
            with slicer.util.tryWithErrorDisplay("Failed to load the results.", waitCursor=True):
                nodes = self.logic.load_results(result, self._runParameters)
                self.showResults(nodes, result.duration_s)
        self._updateApplyButton()

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
        self.ui.statusLabel.text = text
        # The parameter node's output selectors are left alone: a run with another method must not
        # write into this method's nodes.
        slicer.util.setSliceViewerLayers(background=nodes["volume"], fit=True)


class UltrasoundAITest(ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the scenarios that Testing/mrml/test_freehand_module.py runs with slicer-core."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_tracked_and_imu()
        self.setUp()
        self.test_cancel()
        self.setUp()
        self.test_bad_input()

    def _workdir(self):
        import tempfile

        return pathlib.Path(tempfile.mkdtemp(prefix="UltrasoundAITest-"))

    def test_tracked_and_imu(self):
        from UltrasoundAILib import scenarios

        work = self._workdir()
        sweep_path = scenarios.make_sweep(work / "sweep.h5")
        for method in ("tracked", "imu"):
            scenarios.reconstruct_scenario(sweep_path, method, work / method)
        self.delayDisplay("tracked and imu reconstructions passed")

    def test_cancel(self):
        from UltrasoundAILib import scenarios

        work = self._workdir()
        scenarios.cancel_scenario(scenarios.make_sweep(work / "sweep.h5"), work / "cancel")
        self.delayDisplay("cancel passed")

    def test_bad_input(self):
        from UltrasoundAILib import scenarios

        scenarios.bad_input_scenario(self._workdir())
        self.delayDisplay("bad input passed")
