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
import vtk

import slicer
from slicer import vtkMRMLSequenceBrowserNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from UltrasoundAIULMLib.logic import METHOD_LABELS, UltrasoundAIULMLogic


def _ensure_engine_on_path():
    """Make `import ultrasound_ai` work from a source checkout too (the engine sits beside the module
    folders in an installed extension, one level up in the repository)."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isdir(os.path.join(candidate, "ultrasound_ai")) and candidate not in sys.path:
            sys.path.append(candidate)


_ensure_engine_on_path()


class UltrasoundAIULM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UltrasoundAI ULM"
        self.parent.categories = ["Ultrasound"]
        self.parent.dependencies = ["Sequences", "Colors"]
        self.parent.contributors = ["UltrasoundAI developers"]
        self.parent.helpText = (
            "Ultrasound localization microscopy: localize microbubbles in an ultrafast IQ acquisition (radial "
            "symmetry, weighted average or 3DML-ResNet), track them and render super-resolved density, flow "
            "direction and velocity maps on a wavelength/10 grid. Select an IQ sequence (two-component "
            "real/imaginary volumes) or an acquisition file (.h5 or PALA .mat) and press Apply. The work runs "
            "in a background process; press the button again to cancel."
        )
        self.parent.acknowledgementText = (
            "Methods: 3DML-ResNet and the bubble-count network (Pustovalov et al., EUSIPCO 2024); tracking and "
            "rendering after PALA (Heiles et al., 2022)."
        )


@parameterNodeWrapper
class UltrasoundAIULMParameterNode:
    inputSequence: vtkMRMLSequenceBrowserNode
    inputAcquisitionFile: pathlib.Path
    wavelengthMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    frameRateHz: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    method: Annotated[str, Choice(["rs", "wa", "3dml"])] = "rs"
    resolutionFactor: Annotated[float, WithinRange(1.0, 40.0)] = 10.0
    useCountingNetwork: bool = False
    bubblesPerFrame: Annotated[int, WithinRange(1, 1000)] = 40
    linkDistance: Annotated[float, WithinRange(0.1, 20.0)] = 2.0
    minTrackLength: Annotated[int, WithinRange(1, 1000)] = 15
    svdCutoff: Annotated[int, WithinRange(0, 200)] = 4
    blockFrames: Annotated[int, WithinRange(2, 100000)] = 800
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    createNewNodes: bool = False


class UltrasoundAIULMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
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
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UltrasoundAIULM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UltrasoundAIULMLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadAcquisitionButton.connect("clicked(bool)", self.onLoadAcquisitionButton)
        for index, method in enumerate(("rs", "wa", "3dml")):
            self.ui.methodComboBox.setItemData(index, METHOD_LABELS[method], qt.Qt.ToolTipRole)
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
        self.setParameterNode(UltrasoundAIULMParameterNode(self.logic.getParameterNode()))

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _hasAcquisitionFile(self):
        path = self._parameterNode.inputAcquisitionFile if self._parameterNode else None
        return bool(path) and str(path) not in ("", ".") and os.path.isfile(str(path))

    def _updateButtons(self, caller=None, event=None):
        running = self._launcher is not None and not self._launcher.done
        if running:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running ULM processing."
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = "Apply"
        ready = self._parameterNode is not None and (bool(self._parameterNode.inputSequence) or self._hasAcquisitionFile())
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (
            "Process in a background process." if ready else "Select an IQ sequence or an acquisition file."
        )
        self.ui.loadAcquisitionButton.enabled = self._hasAcquisitionFile()
        counting = bool(self._parameterNode and self._parameterNode.useCountingNetwork)
        self.ui.bubblesPerFrameSpinBox.enabled = not counting

    # -- actions --------------------------------------------------------------------------------
    def onLoadAcquisitionButton(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the acquisition.", waitCursor=True):
            browser = self.logic.load_acquisition(str(self._parameterNode.inputAcquisitionFile))
            self._parameterNode.inputSequence = browser
            slicer.util.setSliceViewerLayers(background=browser.GetProxyNode(browser.GetMasterSequenceNode()), fit=True)

    def onApplyButton(self):
        if self._launcher is not None and not self._launcher.done:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            self.ui.applyButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the ULM processing.", waitCursor=True):
            # The Logic installs the engine's dependencies on first use, after asking.
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
        return {
            "inputSequence": p.inputSequence,
            "inputAcquisitionFile": str(p.inputAcquisitionFile) if p.inputAcquisitionFile else None,
            "method": p.method,
            "resolutionFactor": p.resolutionFactor,
            "useCountingNetwork": p.useCountingNetwork,
            "bubblesPerFrame": p.bubblesPerFrame,
            "linkDistance": p.linkDistance,
            "minTrackLength": p.minTrackLength,
            "svdCutoff": p.svdCutoff,
            "blockFrames": p.blockFrames,
            "wavelengthMm": p.wavelengthMm,
            "frameRateHz": p.frameRateHz,
            "device": p.device,
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
        if result.status == "cancelled" or not result.ok:
            self.logic.cleanup_inputs()
            if result.status == "cancelled":
                self.ui.statusLabel.text = "Cancelled; nothing was changed."
            else:
                self.ui.statusLabel.text = "Failed."
                slicer.util.errorDisplay(f"ULM processing failed: {result.error}")
        else:
            with slicer.util.tryWithErrorDisplay("Failed to load the results.", waitCursor=True):
                nodes = self.logic.load_results(result, self._runParameters)
                self.showResults(nodes, result.duration_s)
        self._updateButtons()

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


class UltrasoundAIULMTest(ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the scenarios that Testing/mrml/test_ulm_module.py runs with slicer-core."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_rs()
        self.setUp()
        self.test_cancel()
        self.setUp()
        self.test_bad_input()

    def _workdir(self):
        import tempfile

        return pathlib.Path(tempfile.mkdtemp(prefix="UltrasoundAIULMTest-"))

    def test_rs(self):
        from UltrasoundAIULMLib import scenarios

        work = self._workdir()
        scenarios.process_scenario(scenarios.make_acquisition(work / "acq.h5"), work / "rs", "rs", repeat=True)
        self.delayDisplay("RS processing passed")

    def test_cancel(self):
        from UltrasoundAIULMLib import scenarios

        work = self._workdir()
        scenarios.cancel_scenario(scenarios.make_acquisition(work / "acq.h5"), work / "cancel")
        self.delayDisplay("cancel passed")

    def test_bad_input(self):
        from UltrasoundAIULMLib import scenarios

        scenarios.bad_input_scenario(self._workdir())
        self.delayDisplay("bad input passed")
