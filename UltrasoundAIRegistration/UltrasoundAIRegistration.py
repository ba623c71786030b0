"""UltrasoundAIRegistration: rigid MRI-TRUS fusion (Attention-Reg, or Mattes mutual information).

The Widget binds Resources/UI/UltrasoundAIRegistration.ui to a parameter node and calls the Logic
(UltrasoundAIRegistrationLib/logic.py), which runs the engine job in a background process; the panel only
shows progress, offers Cancel and reports the results. The Test class runs the scenario functions of
UltrasoundAIRegistrationLib/scenarios.py, the same ones the slicer-core tests run.
"""

import typing
from typing import Annotated

import qt
import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# UltrasoundAIRegistrationLib puts the engine on sys.path (a source checkout), so it is imported first.
from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic

from ultrasound_ai.mrml.job_panel import JobPanel, ParameterNodePanel, describe_module
from ultrasound_ai.mrml.scenario_support import SelfTestSetUp


class UltrasoundAIRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(parent, "UltrasoundAI Registration", ["Markups", "Segmentations", "VolumeRendering"], help_text=(
            "MRI-TRUS rigid fusion. Select the T2 MRI, its prostate label (labelmap or segmentation) and the 3D "
            "TRUS volume, a method (Attention-Reg or mutual information) and press Apply. The registration runs "
            "in a background process (press the button again to cancel); the result is a linear transform "
            "applied to the TRUS volume, shown fused over the MRI (or as a checkerboard), with the biopsy "
            "targets marked on the MRI carried into TRUS space. With a ground-truth transform the surface "
            "registration error (SRE) is reported. The shipped models are trained on simulated phantoms only and are not validated on patient data."
        ), acknowledgement="Method: Attention-Reg (Song et al., MICCAI 2021).")


@parameterNodeWrapper
class UltrasoundAIRegistrationParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    # Concrete classes only: Slicer's node combobox connector instantiates each type to fill nodeTypes
    # (an abstract vtkMRMLDisplayableNode raised in connectGui). None: the wrapper's default.
    fixedLabel: typing.Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    movingVolume: vtkMRMLScalarVolumeNode
    method: Annotated[str, Choice(["attention+refine", "attention", "mi"])] = "attention+refine"
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


class UltrasoundAIRegistrationWidget(ParameterNodePanel, ScriptedLoadableModuleWidget, VTKObservationMixin):
    ParameterNode = UltrasoundAIRegistrationParameterNode

    _lastTransform = None  # the last registration (MRI LPS -> TRUS LPS), for Update view

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.loadPanel("UI/UltrasoundAIRegistration.ui")
        self.logic = UltrasoundAIRegistrationLogic()
        self.jobs = JobPanel(
            self.logic, qt.QTimer(), self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel,
            title="registration", parameters=self.logicParameters, ready=self.inputsReady,
            on_results=self.showResults, error_display=slicer.util.errorDisplay,
            not_ready_tip="Select the MRI, its prostate label and the TRUS volume.", on_update=self.onUpdate,
            model_label=self.ui.modelCardLabel, model_line=self.modelLine)
        self.ui.updateViewButton.connect("clicked(bool)", self.onUpdateViewButton)
        self.setupPanel()

    def inputsReady(self):
        p = self._parameterNode
        return p is not None and bool(p.fixedVolume) and bool(p.fixedLabel) and bool(p.movingVolume)

    def onUpdate(self, running):
        self.ui.updateViewButton.enabled = not running and self.inputsReady() and self._lastTransform is not None

    def modelLine(self):
        return self.logic.model_line(self._parameterNode.method) if self._parameterNode else ""

    def onUpdateViewButton(self):
        """Redraw the fusion (after toggling the checkerboard or changing its square size) without a new job."""
        with slicer.util.tryWithErrorDisplay("Failed to update the fused view.", waitCursor=True):
            nodes = self.logic.show_registration(self._lastTransform, self.logicParameters())
            self._parameterNode.outputTransform = nodes["transform"]

    def showResults(self, nodes, duration_s):
        import numpy as np

        payload = nodes["result"]
        self._lastTransform = np.asarray(payload["fixed_to_moving_lps"])
        self._parameterNode.outputTransform = nodes["transform"]
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


class UltrasoundAIRegistrationTest(SelfTestSetUp, ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the scenarios that Testing/mrml/test_registration_module.py runs with slicer-core.
    Each test_* stands alone: ctest runs each with setUp only (runTest runs them all)."""

    def setUp(self):
        from UltrasoundAIRegistrationLib import scenarios

        SelfTestSetUp.setUp(self)
        self._case = scenarios.make_case(self.work / "case")

    def test_known_transform(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.known_transform_scenario(self._case, self.work / "known")
        self.delayDisplay("known transform: LPS/RAS and direction passed")

    def test_truth_as_initial(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.initial_truth_job_scenario(self._case, self.work / "truth")
        self.delayDisplay("truth as initial transform passed")

    def test_mi_job(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.mi_job_scenario(self._case, self.work / "mi")
        self.delayDisplay("MI job passed")

    def test_cancel(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.cancel_scenario(self._case, self.work / "cancel")
        self.delayDisplay("cancel passed")

    def test_bad_input(self):
        from UltrasoundAIRegistrationLib import scenarios

        scenarios.bad_input_scenario(self._case, self.work / "bad")
        self.delayDisplay("bad input passed")
