"""The job loop of a module panel: Apply turns into Cancel, progress and status while the Logic's job
runs, the results (or the error) when it ends, Cancel when the scene closes.

The Widget gives it its timer and widgets; nothing here imports Qt, so stand-in widgets test it:

    self.jobs = JobPanel(self.logic, qt.QTimer(), self.ui.applyButton, self.ui.progressBar,
                         self.ui.statusLabel, title="reconstruction", parameters=self.logicParameters,
                         ready=self.inputsReady, on_results=self.showResults,
                         error_display=slicer.util.errorDisplay, model_label=self.ui.modelCardLabel,
                         model_line=self.modelLine)
    self.ui.applyButton.connect("clicked(bool)", self.jobs.apply)
    # parameter node modified -> self.jobs.update(); scene StartCloseEvent -> self.jobs.scene_closing()
    # Widget.cleanup() -> self.jobs.cleanup()

The timer needs `setInterval`, `start`, `stop` and `connect("timeout()", slot)` (qt.QTimer's); the
button `text`, `toolTip`, `enabled`; the progress bar `value`, `visible`, `setRange`; the status label
`text`. The Logic is a ModuleLogic (start, cancel, running, load_results, cleanup_inputs).
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)

PROGRESS_STEPS = 1000  # the progress bar's range: fractions to 0.1 %


class JobPanel:
    POLL_MS = 100  # often enough to look live, rare enough to cost nothing

    def __init__(self, logic, timer, apply_button, progress_bar, status_label, *, title: str,
                 parameters: Callable[[], dict], ready: Callable[[], bool],
                 on_results: Callable[[dict, float], None], error_display: Callable[[str], None],
                 not_ready_tip: str = "Select the inputs first.", on_update: Callable[[bool], None] | None = None,
                 model_label=None, model_line: Callable[[], str] | None = None, path_boxes=()):
        """`parameters()` snapshots the panel for the Logic (the parameter node may change while the
        job runs); `ready()` says whether Apply can start; `on_results(nodes, duration_s)` shows a
        successful run; `error_display(text)` shows a failure (slicer.util.errorDisplay);
        `on_update(running)` enables the Widget's other buttons; `model_label.text` shows
        `model_line()` (the selected model's "trained on ..." line); `path_boxes`: ctkPathLineEdits
        bound to pathlib.Path fields, which show an empty field as "." (Path("") is Path(".")): shown
        empty instead."""
        self.logic = logic
        self.timer = timer
        self.apply_button = apply_button
        self.progress_bar = progress_bar
        self.status_label = status_label
        self.title = title
        self.parameters = parameters
        self.ready = ready
        self.on_results = on_results
        self.error_display = error_display
        self.not_ready_tip = not_ready_tip
        self.on_update = on_update
        self.model_label = model_label
        self.model_line = model_line
        self.path_boxes = tuple(path_boxes)
        self.launcher = None
        self.run_parameters = None
        self._scene_closed = False  # a job cancelled by closing the scene: its results are not loaded
        timer.setInterval(self.POLL_MS)
        timer.connect("timeout()", self.poll)
        progress_bar.setRange(0, PROGRESS_STEPS)
        progress_bar.visible = False

    @property
    def running(self) -> bool:
        return self.launcher is not None and not self.launcher.done

    # -- the Apply / Cancel button ---------------------------------------------------------------
    def update(self, caller=None, event=None) -> None:
        """Button text, state and tool tip, and the model line (an observer of the parameter node)."""
        running = self.running
        if running:
            self.apply_button.text = "Cancel"
            self.apply_button.toolTip = f"Stop the running {self.title}."
            self.apply_button.enabled = True
        else:
            ready = bool(self.ready())
            self.apply_button.text = "Apply"
            self.apply_button.enabled = ready
            self.apply_button.toolTip = f"Run the {self.title} in a background process." if ready else self.not_ready_tip
        if self.model_label is not None and self.model_line is not None:
            try:
                line = self.model_line()
            except Exception as exc:  # noqa: BLE001 - an unreadable card must not break the panel
                line = f"Model card unreadable: {exc}"
            self.model_label.text = line
            self.model_label.toolTip = line
        for box in self.path_boxes:
            if box.currentPath == ".":
                # Reads back as Path("") == Path("."): the parameter node does not change.
                box.currentPath = ""
        if self.on_update is not None:
            self.on_update(running)

    def apply(self, *args) -> None:
        """Apply: start the job; while one runs (the button reads Cancel): cancel it."""
        if self.running:
            self.logic.cancel()
            self.status_label.text = "Cancelling..."
            self.apply_button.enabled = False
            return
        self._scene_closed = False
        self.status_label.text = "Starting..."
        try:
            # The Logic asks to install missing packages, then checks and writes the inputs: bad
            # input fails here, before a job starts.
            self.run_parameters = self.parameters()
            self.launcher = self.logic.start(self.run_parameters)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.launcher = None
            self.status_label.text = ""
            self.error_display(f"Failed to start the {self.title}: {exc}")
        else:
            self.progress_bar.value = 0
            self.progress_bar.visible = True
            self.timer.start()
        self.update()

    # -- while the job runs ----------------------------------------------------------------------
    def poll(self) -> None:
        """Timer slot: show the job's events (they arrive on the launcher's thread and are read here,
        on the GUI thread); when it has ended, load and show its results."""
        launcher = self.launcher
        if launcher is None:
            self.timer.stop()
            return
        for event in launcher.drain():
            kind = event.get("event")
            if kind == "progress":
                self.progress_bar.value = int(PROGRESS_STEPS * float(event.get("fraction", 0.0)))
                self.status_label.text = str(event.get("message", ""))
            elif kind == "log":
                self.status_label.text = str(event.get("message", ""))
            elif kind == "error":  # shown at once; the failure dialog follows when the job has ended
                self.status_label.text = f"Error: {event.get('message', '')}"
        if not launcher.done:
            return
        self.timer.stop()
        self.launcher = None
        self.progress_bar.visible = False
        self._finish(launcher.result)
        self.update()

    def _finish(self, result) -> None:
        from ultrasound_ai.core.errors import Cancelled

        if self._scene_closed:
            self.logic.cleanup_inputs()
            self.status_label.text = "Cancelled: the scene was closed."
            return
        try:
            nodes = self.logic.load_results(result, self.run_parameters)
        except Cancelled:
            self.status_label.text = "Cancelled; nothing was changed."
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.status_label.text = "Failed."
            self.error_display(f"The {self.title} failed: {exc}")
        else:
            self.on_results(nodes, float(getattr(result, "duration_s", 0.0) or 0.0))

    # -- scene and module life -------------------------------------------------------------------
    def scene_closing(self) -> None:
        """The scene is about to close: a running job is cancelled and its results are not loaded
        (its input nodes are gone)."""
        if self.running:
            self._scene_closed = True
            self.logic.cancel()
            self.status_label.text = "Cancelling: the scene is closing..."

    def cleanup(self) -> None:
        """The module is unloaded (Slicer quits): stop polling and cancel a running job."""
        self.timer.stop()
        if self.running:
            self.logic.cancel()


class ParameterNodePanel:
    """The parameter-node life of a module Widget, as Slicer's scripted-module template has it: bind
    the panel on setup and on entering the module, unbind on leaving it and while the scene closes.

    Mixed in before ScriptedLoadableModuleWidget (and with VTKObservationMixin, which gives
    addObserver / removeObserver). In setup() the Widget calls `self.loadPanel("UI/<Module>.ui")`,
    sets `self.logic` and `self.jobs` (a JobPanel), and ends with `self.setupPanel()`; its class names
    `ParameterNode` (its @parameterNodeWrapper class). Hooks: `onParameterNodeSet()` (after binding: defaults, tooltips the binding wiped)."""

    ParameterNode = None
    jobs: JobPanel | None = None
    _parameterNode = None
    _parameterNodeGuiTag = None

    def __init__(self, parent=None):
        # ScriptedLoadableModuleWidget.__init__ calls super().__init__(), i.e. VTKObservationMixin's.
        super().__init__(parent)

    def loadPanel(self, ui_file: str) -> None:
        """Load Resources/<ui_file> into the module's layout as `self.ui` (its named child widgets)."""
        import slicer

        uiWidget = slicer.util.loadUI(self.resourcePath(ui_file))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

    def setupPanel(self) -> None:
        import slicer

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.jobs.apply)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.jobs is not None:
            self.jobs.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self.jobs is not None:
            self.jobs.scene_closing()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.ParameterNode(self.logic.getParameterNode()))

    def setParameterNode(self, inputParameterNode) -> None:
        import vtk

        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.jobs.update)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.jobs.update)
            self.onParameterNodeSet()
            self.jobs.update()

    def onParameterNodeSet(self) -> None:
        """Called after the panel is bound to a parameter node; the default does nothing."""

    def logicParameters(self) -> dict:
        """A snapshot of the panel for the Logic (the parameter node may change while the job runs):
        every field of the Logic's Parameters class that the parameter node has."""
        p = self._parameterNode
        return {name: getattr(p, name) for name in self.logic.Parameters.__dataclass_fields__ if hasattr(p, name)}


def describe_module(parent, title: str, dependencies, help_text: str, acknowledgement: str) -> None:
    """The module's entry in Slicer's module list (a ScriptedLoadableModule's `parent`): all three
    modules sit in the Ultrasound category; the help says what the shipped models were trained on."""
    parent.title = title
    parent.categories = ["Ultrasound"]
    parent.dependencies = list(dependencies)
    parent.contributors = ["UltrasoundAI developers"]
    parent.helpText = help_text
    parent.acknowledgementText = acknowledgement
