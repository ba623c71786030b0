"""UltrasoundAIULM: ultrasound localization microscopy (RS, WA, 3DML-ResNet) of an IQ acquisition.

The Widget binds Resources/UI/UltrasoundAIULM.ui to a parameter node and calls the Logic
(UltrasoundAIULMLib/logic.py), which runs the engine's ``ulm.process`` job in a background process; the
panel only shows progress per block, offers Cancel and shows the density, direction and velocity maps.
The Test class runs the scenario functions of UltrasoundAIULMLib/scenarios.py, the same ones the
slicer-core tests run.
"""

import os
import pathlib
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLSequenceBrowserNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# UltrasoundAIULMLib puts the engine on sys.path (a source checkout), so it is imported first.
from UltrasoundAIULMLib.logic import METHOD_TOOLTIPS, METHODS, UltrasoundAIULMLogic

from ultrasound_ai.mrml.job_panel import JobPanel, ParameterNodePanel, describe_module
from ultrasound_ai.mrml.scenario_support import SelfTestSetUp


class UltrasoundAIULM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(parent, "UltrasoundAI ULM", ["Sequences", "Colors"], help_text=(
            "Ultrasound localization microscopy: localize microbubbles in an ultrafast IQ acquisition (radial "
            "symmetry, weighted average or 3DML-ResNet), track them and render super-resolved density, flow "
            "direction and velocity maps on a wavelength/10 grid. Select an IQ sequence (two-component "
            "real/imaginary volumes) or an acquisition file (.h5 or PALA .mat) and press Apply. The work runs "
            "in a background process; press the button again to cancel. The shipped model is trained on "
            "simulated acquisitions only and is not validated on patient data."
        ), acknowledgement="Methods: 3DML-ResNet and the bubble-count network (Pustovalov et al., EUSIPCO 2024); tracking and "
            "rendering after PALA (Heiles et al., 2022).")


@parameterNodeWrapper
class UltrasoundAIULMParameterNode:
    inputSequence: vtkMRMLSequenceBrowserNode
    inputAcquisitionFile: pathlib.Path
    wavelengthMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    frameRateHz: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    method: Annotated[str, Choice(list(METHODS))] = "rs"
    resolutionFactor: Annotated[float, WithinRange(1.0, 40.0)] = 10.0
    useCountingNetwork: bool = True  # per-frame counts from the counting network by default (no guessing)
    bubblesPerFrame: Annotated[int, WithinRange(1, 1000)] = 40
    linkDistance: Annotated[float, WithinRange(0.1, 20.0)] = 2.0
    minTrackLength: Annotated[int, WithinRange(1, 1000)] = 15
    svdCutoff: Annotated[int, WithinRange(0, 200)] = 4
    blockFrames: Annotated[int, WithinRange(2, 100000)] = 800
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    createNewNodes: bool = False


class UltrasoundAIULMWidget(ParameterNodePanel, ScriptedLoadableModuleWidget, VTKObservationMixin):
    ParameterNode = UltrasoundAIULMParameterNode

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.loadPanel("UI/UltrasoundAIULM.ui")
        self.logic = UltrasoundAIULMLogic()
        self.jobs = JobPanel(
            self.logic, qt.QTimer(), self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel,
            title="ULM processing", parameters=self.logicParameters, ready=self.inputsReady,
            on_results=self.showResults, error_display=slicer.util.errorDisplay,
            not_ready_tip="Select an IQ sequence or an acquisition file.", on_update=self.onUpdate,
            model_label=self.ui.modelCardLabel, model_line=self.modelLine,
            path_boxes=(self.ui.inputAcquisitionFilePathLineEdit,))
        self.ui.loadAcquisitionButton.connect("clicked(bool)", self.onLoadAcquisitionButton)
        self.setupPanel()

    def onParameterNodeSet(self):
        # connectGui refills the method combobox from its Choice: its item tooltips are set after it.
        for index, method in enumerate(METHODS):
            self.ui.methodComboBox.setItemData(index, METHOD_TOOLTIPS[method], qt.Qt.ToolTipRole)

    def _acquisitionFile(self):
        path = self._parameterNode.inputAcquisitionFile if self._parameterNode else None
        return str(path) if path and str(path) != "." and os.path.isfile(str(path)) else None

    def inputsReady(self):
        p = self._parameterNode
        return p is not None and (bool(p.inputSequence) or bool(self._acquisitionFile()))

    def onUpdate(self, running):
        self.ui.loadAcquisitionButton.enabled = not running and bool(self._acquisitionFile())
        counting = bool(self._parameterNode and self._parameterNode.useCountingNetwork)
        self.ui.bubblesPerFrameSpinBox.enabled = not counting

    def modelLine(self):
        return self.logic.model_line(self._parameterNode.method) if self._parameterNode else ""

    def onLoadAcquisitionButton(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the acquisition.", waitCursor=True):
            browser = self.logic.load_acquisition(self._acquisitionFile())
            self._parameterNode.inputSequence = browser
            slicer.util.setSliceViewerLayers(background=browser.GetProxyNode(browser.GetMasterSequenceNode()), fit=True)

    def showResults(self, nodes, duration_s):
        payload = nodes["result"]
        text = (f"{payload.get('method', '')}: {payload.get('n_localizations', '?')} localizations, "
                f"{payload.get('n_tracks', '?')} tracks in {duration_s:.1f} s.")
        if nodes["metrics"] is not None:
            m = payload["metrics"]
            text += f"  Jaccard {m.get('jaccard') or float('nan'):.3f}, SSIM {m.get('ssim') or float('nan'):.3f}."
            self.ui.metricsTableView.setMRMLTableNode(nodes["metrics"])
        else:
            text += "  No ground truth in the acquisition: no accuracy metrics."
        self.ui.statusLabel.text = text
        self.logic.show_results(nodes)
        slicer.util.setSliceViewerLayers(background=nodes["density"], fit=True)


class UltrasoundAIULMTest(SelfTestSetUp, ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the scenarios that Testing/mrml/test_ulm_module.py runs with slicer-core.
    Each test_* stands alone (ctest runs each with setUp only; runTest runs them all)."""

    def test_rs(self):
        from UltrasoundAIULMLib import scenarios

        acquisition = scenarios.make_acquisition(self.work / "acq.h5")
        scenarios.process_scenario(acquisition, self.work / "rs", "rs", repeat=True)
        self.delayDisplay("RS processing passed")

    def test_cancel(self):
        from UltrasoundAIULMLib import scenarios

        scenarios.cancel_scenario(scenarios.make_acquisition(self.work / "acq.h5"), self.work / "cancel")
        self.delayDisplay("cancel passed")

    def test_bad_input(self):
        from UltrasoundAIULMLib import scenarios

        scenarios.bad_input_scenario(self.work)
        self.delayDisplay("bad input passed")
