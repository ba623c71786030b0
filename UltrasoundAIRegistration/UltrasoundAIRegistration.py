"""UltrasoundAIRegistration: rigid MRI-TRUS fusion (Attention-Reg, or Mattes mutual information).

The Widget binds Resources/UI/UltrasoundAIRegistration.ui to a parameter node and calls the Logic
(UltrasoundAIRegistrationLib/logic.py), which runs the engine job in a background process; the panel only
shows progress, offers Cancel and reports the results. The Test class runs the scenario functions of
UltrasoundAIRegistrationLib/scenarios.py, the same ones the slicer-core tests run.
"""

import os
import pathlib
from typing import Annotated

import qt
import vtk

import slicer
from slicer import (
    vtkMRMLDisplayableNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic


def _ensure_engine_on_path():
    """Make `import ultrasound_ai` work from a source checkout too (the engine sits beside the module
    folders in an installed extension, one level up in the repository)."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isdir(os.path.join(candidate, "ultrasound_ai")) and candidate not in sys.path:
            sys.path.append(candidate)


_ensure_engine_on_path()


class UltrasoundAIRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UltrasoundAI Registration"
        self.parent.categories = ["Ultrasound"]
        self.parent.dependencies = ["Markups", "Segmentations", "VolumeRendering"]
        self.parent.contributors = ["UltrasoundAI developers"]
        self.parent.helpText = (
            "MRI-TRUS rigid fusion. Select the T2 MRI, its prostate label (labelmap or segmentation) and the 3D "
            "TRUS volume, a method (Attention-Reg or mutual information) and press Apply. The registration runs "
            "in a background process (press the button again to cancel); the result is a linear transform "
            "applied to the TRUS volume, shown fused over the MRI (or as a checkerboard), with the biopsy "
            "targets marked on the MRI carried into TRUS space. With a ground-truth transform the surface "
            "registration error (SRE) is reported."
        )
        self.parent.acknowledgementText = "Method: Attention-Reg (Song et al., MICCAI 2021)."


@parameterNodeWrapper
class UltrasoundAIRegistrationParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    fixedLabel: vtkMRMLDisplayableNode  # labelmap volume or segmentation
    movingVolume: vtkMRMLScalarVolumeNode
    method: Annotated[str, Choice(["attention", "mi"])] = "attention"
    mode: Annotated[str, Choice(["label", "image"])] = "label"
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    miIterations: Annotated[int, WithinRange(0, 2000)] = 200
    initialTransform: vtkMRMLLinearTransformNode
    biopsyTargets: vtkMRMLMarkupsFiducialNode
    surfacePoints: vtkMRMLMarkupsFiducialNode
    truthTransform: vtkMRMLLinearTransformNode
    outputTransform: vtkMRMLLinearTransformNode
    checkerboard: bool = False
    checkerboardSquareMm: Annotated[float, WithinRange(1.0, 50.0)] = 10.0


class UltrasoundAIRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._launcher = None
        self._runParameters = None
        self._lastTransform = None
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self.onTimer)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UltrasoundAIRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UltrasoundAIRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.updateViewButton.connect("clicked(bool)", self.onUpdateViewButton)
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(UltrasoundAIRegistrationParameterNode(self.logic.getParameterNode()))

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None):
        running = self._launcher is not None and not self._launcher.done
        if running:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running registration."
            self.ui.applyButton.enabled = True
            self.ui.updateViewButton.enabled = False
            return
        p = self._parameterNode
        self.ui.applyButton.text = "Apply"
        ready = p is not None and bool(p.fixedVolume) and bool(p.fixedLabel) and bool(p.movingVolume)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = ("Register the TRUS onto the MRI in a background process." if ready
                                       else "Select the MRI, its prostate label and the TRUS volume.")
        self.ui.updateViewButton.enabled = ready and self._lastTransform is not None

    # -- actions --------------------------------------------------------------------------------
    def onApplyButton(self):
        if self._launcher is not None and not self._launcher.done:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            self.ui.applyButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the registration.", waitCursor=True):
            # Bad inputs (empty label, label off the MRI grid, 2D image, no overlap) fail here, before a job.
            self._runParameters = self.logicParameters()
            self.ui.statusLabel.text = "Starting..."
            self._launcher = self.logic.start(self._runParameters)
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self._timer.start()
        if self._launcher is None:
            self.ui.statusLabel.text = ""
        self._updateButtons()

    def logicParameters(self):
        """A snapshot of the panel for the Logic (the parameter node may change while the job runs)."""
        p = self._parameterNode
        names = ("fixedVolume", "fixedLabel", "movingVolume", "method", "mode", "device", "miIterations",
                 "initialTransform", "biopsyTargets", "surfacePoints", "truthTransform", "outputTransform",
                 "checkerboard", "checkerboardSquareMm")
        return {name: getattr(p, name) for name in names}

    def onUpdateViewButton(self):
        """Redraw the fusion (after toggling the checkerboard or changing its square size) without a new job."""
        with slicer.util.tryWithErrorDisplay("Failed to update the fused view.", waitCursor=True):
            nodes = self.logic.show_registration(self._lastTransform, self.logicParameters())
            self._parameterNode.outputTransform = nodes["transform"]

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
        from ultrasound_ai.core.errors import Cancelled

        try:
            nodes = self.logic.load_results(result, self._runParameters)
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled; nothing was changed."
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"Registration failed: {exc}")
        else:
            import numpy as np

            self._lastTransform = np.asarray(nodes["result"]["fixed_to_moving_lps"])
            self._parameterNode.outputTransform = nodes["transform"]
            self.showResults(nodes, result.duration_s)
        self._updateButtons()

    def showResults(self, nodes, duration_s):
        payload = nodes["result"]
        metrics = payload.get("metrics") or {}
        text = f"{payload.get('method')}: registered in {payload.get('runtime_s', duration_s):.1f} s."
        if "sre_mm" in metrics:
            text += f"  SRE {metrics['initial_sre_mm']:.2f} mm -> {metrics['sre_mm']:.2f} mm."
        else:
            text += (f"  No ground truth: the gland surface moved {metrics.get('surface_shift_mm', float('nan')):.1f} mm;"
                     f" {metrics.get('surface_in_fov_pct', float('nan')):.0f} % of it lies in the TRUS data.")
        if nodes["targets"] is not None:
            text += f"  {nodes['targets'].GetNumberOfControlPoints()} target(s) in TRUS space: {nodes['targets'].GetName()}."
        self.ui.statusLabel.text = text
        if nodes["metrics"] is not None:
            self.ui.metricsTableView.setMRMLTableNode(nodes["metrics"])
        slicer.util.resetSliceViews()


class UltrasoundAIRegistrationTest(ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the scenarios that Testing/mrml/test_registration_module.py runs with slicer-core."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import tempfile

        from UltrasoundAIRegistrationLib import scenarios

        self._work = pathlib.Path(tempfile.mkdtemp(prefix="UltrasoundAIRegistrationTest-"))
        self._case = scenarios.make_case(self._work / "case")
        for test in (self.test_known_transform, self.test_truth_as_initial, self.test_mi_job, self.test_cancel,
                     self.test_bad_input):
            self.setUp()
            test()

    def _dir(self, name):
        return self._work / name

    def test_known_transform(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.known_transform_scenario(self._case, self._dir("known"))
        self.delayDisplay("known transform: LPS/RAS and direction passed")

    def test_truth_as_initial(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.initial_truth_job_scenario(self._case, self._dir("truth"))
        self.delayDisplay("truth as initial transform passed")

    def test_mi_job(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.mi_job_scenario(self._case, self._dir("mi"))
        self.delayDisplay("MI job passed")

    def test_cancel(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.cancel_scenario(self._case, self._dir("cancel"))
        self.delayDisplay("cancel passed")

    def test_bad_input(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.bad_input_scenario(self._case, self._dir("bad"))
        self.delayDisplay("bad input passed")
