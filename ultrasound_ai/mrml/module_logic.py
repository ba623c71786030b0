"""The base of the three module Logics: work folder, dependencies, start / run / cancel, result nodes.

A module Logic (``<Module>Lib/logic.py``) subclasses ``ModuleLogic``, names its task and parameters
class and writes ``make_job`` (inputs -> job dict) and ``load_results`` (finished job -> nodes):

    class UltrasoundAIULMLogic(ModuleLogic):
        TASK_NAME = "ulm.process"
        TITLE = "ULM processing"
        Parameters = UlmRunParameters          # a dataclass with from_any(dict or parameter node)
        MODEL_METHODS = {"3dml": "ulm_3dml_resnet"}   # panel method -> model card method

        def make_job(self, params): ...        # may put exported inputs in self.new_inputs_folder()
        def load_results(self, result, parameters):
            payload = self.finished_payload(result)   # raises Cancelled / InputError / RuntimeError
            ...

No Qt here; ``slicer`` is imported only inside functions, except the Slicer application's
ScriptedLoadableModuleLogic, taken as the base class when it exists (it gives the Widget its
parameter node); slicer-core and a plain interpreter have none. The order in ``start`` matters: the
Python packages Slicer does not bundle (torch, h5py, scikit-image, psutil, tqdm, pyyaml) are installed,
after asking, before anything that imports them (the job launcher imports psutil).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from ultrasound_ai.core.errors import InputError

log = logging.getLogger(__name__)


def _scripted_logic_base() -> type:
    try:  # the Slicer application; slicer-core and plain Python have no ScriptedLoadableModule
        from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
    except ImportError:
        return object
    return ScriptedLoadableModuleLogic


_LogicBase = _scripted_logic_base()


# ---------------------------------------------------------------------------------------------------
# Parameters and names


def parameters_from(cls, parameters, what: str) -> Any:
    """An instance of the dataclass `cls` from a dict (unknown names refused) or from any object with
    attributes of the field names (the Widget's parameter node wrapper). `what` completes the error
    message for None: "expected a dict or a parameter node with <what>"."""
    if isinstance(parameters, cls):
        return parameters
    if parameters is None:
        raise InputError(f"parameters: expected a dict or a parameter node with {what}")
    fields = cls.__dataclass_fields__
    if isinstance(parameters, dict):
        unknown = sorted(set(parameters) - set(fields))
        if unknown:
            raise InputError(f"parameters: unknown name(s) {unknown}; expected some of {sorted(fields)}")
        return cls(**parameters)
    return cls(**{k: getattr(parameters, k) for k in fields if hasattr(parameters, k)})


class PanelParameters:
    """Base of a Logic's parameters dataclass: ``from_any`` reads a dict or the Widget's parameter
    node wrapper (parameters_from), then ``check`` normalises and validates the values in place,
    raising InputError that names the field."""

    REQUIRED = "its inputs"  # completes "expected a dict or a parameter node with ..."

    @classmethod
    def from_any(cls, parameters):
        out = parameters_from(cls, parameters, cls.REQUIRED)
        if out is not parameters:  # an instance given is already checked
            out.check()
        return out

    def check(self) -> None:
        """Normalise and validate the fields (InputError naming the field)."""


def path_or_none(value) -> str | None:
    """A path field as text, None when empty: an empty ctkPathLineEdit bound to a pathlib.Path field
    reads back as Path("") == Path("."), so "." means "no path" here."""
    if value is None:
        return None
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    text = text.strip()
    return None if text in ("", ".") else text


def safe_name(name, default: str) -> str:
    """A node name made safe for a file name (letters, digits, - _ .), or `default` when nothing is left."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip("._")
    return keep or default


def remove_with_helpers(scene, node) -> None:
    """Remove a node with its storage and display nodes (the scene keeps them otherwise)."""
    if node is None or node.GetScene() is not scene:
        return
    helpers = []
    if hasattr(node, "GetNumberOfStorageNodes"):
        helpers += [node.GetNthStorageNode(k) for k in range(node.GetNumberOfStorageNodes())]
    if hasattr(node, "GetNumberOfDisplayNodes"):
        helpers += [node.GetNthDisplayNode(k) for k in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)


def remove_browser(browser, *roles: str) -> None:
    """Remove a sequence browser with its sequences, their proxy nodes and the nodes it references
    under `roles` (an IMU or ground-truth table)."""
    from ultrasound_ai.mrml.sequences import browser_sequences

    scene = browser.GetScene()
    if scene is None:
        return
    nodes = []
    for seq in browser_sequences(browser) if browser.GetMasterSequenceNode() is not None else []:
        nodes += [browser.GetProxyNode(seq), seq]
    nodes += [browser.GetNodeReference(role) for role in roles]
    scene.RemoveNode(browser)
    for node in nodes:
        remove_with_helpers(scene, node)


# ---------------------------------------------------------------------------------------------------
# Model cards in the panels


def training_data_text(card: dict) -> str:
    """What a model card says its model was trained on: its "training_data" (or "trained_on") text,
    else the training record's "data" / "simulator" entry; "not stated in its model card" otherwise."""
    for key in ("training_data", "trained_on"):
        value = card.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, dict) and isinstance(value.get("summary"), str):
            return value["summary"].strip()
    training = card.get("training")
    if isinstance(training, dict):
        data = training.get("data")
        if isinstance(data, str) and data.strip():
            return data.strip()
        if isinstance(data, dict):
            parts = [f"{k} {v}" for k, v in data.items() if isinstance(v, (str, int, float)) and k != "seed"]
            if parts:
                return "data: " + ", ".join(parts[:3])
        simulator = training.get("simulator")
        if isinstance(simulator, str) and simulator.strip():
            return f"simulated data only ({simulator.strip()})"
    return "not stated in its model card"


def model_card_line(card_method: str | None, checkpoint=None) -> str:
    """The panel line beside a model selector: "<model>: trained on <data>" for the checkpoint given
    (a .pt path or installed model name) or the installed default of `card_method`; "" for a
    classical method (card_method None); a readable sentence when no model is installed."""
    if card_method is None and not checkpoint:
        return ""
    from ultrasound_ai.models.checkpoint import card_path_for
    from ultrasound_ai.models.registry import default_model, find_model

    try:
        if checkpoint:
            pt_path = find_model(checkpoint)
            card = json.loads(card_path_for(pt_path).read_text(encoding="utf-8"))
            name = card.get("name") or Path(pt_path).stem
        else:
            entry = default_model(card_method)
            card, name = entry.card, entry.name
    except (InputError, OSError, ValueError) as exc:
        return f"No model card found: {exc}"
    return f"{name}: trained on {training_data_text(card)}"


# ---------------------------------------------------------------------------------------------------
# The Logic


class ModuleLogic(_LogicBase):
    """Shared processing behind a module panel; usable from the Python console and tests."""

    TASK_NAME = ""  # the job task a run starts (ultrasound_ai.jobs.registry)
    TITLE = "job"  # what a run is called in messages: "reconstruction", "registration", ...
    Parameters: Any = None  # dataclass with from_any()
    OUTPUT_ATTRIBUTE = "UltrasoundAI.Output"  # node attribute: which result a node holds
    METHOD_ATTRIBUTE = "UltrasoundAI.Method"  # node attribute: the method that made it
    MODEL_METHODS: dict = {}  # panel method -> model card "method" (methods with trained models)

    def __init__(self, workdir: str | os.PathLike | None = None, python: str | None = None,
                 ask: Callable[[str], bool] | None = None):
        """`workdir`: where job inputs and outputs go (default: a new temporary folder, under Slicer's
        temporary path inside Slicer). `python`: the worker interpreter (default PythonSlicer inside
        Slicer, else this one). `ask(text) -> bool` asks before the engine's dependencies are
        installed (inside Slicer, first use only; default slicer.util.confirmOkCancelDisplay)."""
        if _LogicBase is not object:
            _LogicBase.__init__(self)
        self.ask = ask
        self.python = python
        self.launcher = None
        self._dependencies_ready = False
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self._run_inputs: Path | None = None  # the running job's exported inputs (removed at its end)

    @property
    def module_name(self) -> str:
        name = type(self).__name__
        return name[: -len("Logic")] if name.endswith("Logic") else name

    # -- folders -------------------------------------------------------------------------------------
    @property
    def workdir(self) -> Path:
        if self._workdir_arg is None:
            import slicer

            app = getattr(slicer, "app", None)
            base = app.temporaryPath if app is not None and getattr(app, "temporaryPath", None) else None
            self._workdir_arg = Path(tempfile.mkdtemp(prefix=f"{self.module_name}-", dir=base))
        self._workdir_arg.mkdir(parents=True, exist_ok=True)
        return self._workdir_arg

    def new_inputs_folder(self) -> Path:
        """A new <workdir>/inputs-<id>/ for this run's exported inputs, removed when the run ends
        (results loaded, failed or cancelled): a long acquisition must not stay on disk twice."""
        self.cleanup_inputs()
        folder = self.workdir / f"inputs-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        self._run_inputs = folder
        return folder

    def cleanup_inputs(self) -> None:
        """Remove the exported inputs of the last run (never while its job runs)."""
        if self.running:
            return
        if self._run_inputs is not None:
            shutil.rmtree(self._run_inputs, ignore_errors=True)
            self._run_inputs = None

    def ensure_dependencies(self) -> None:
        """Inside the Slicer application, install what the engine needs (torch through SlicerPyTorch,
        h5py, ...) after asking, once; outside it (slicer-core, tests) the environment is the user's."""
        from ultrasound_ai.mrml.scene import in_slicer_application

        if self._dependencies_ready or not in_slicer_application():
            return
        import slicer

        from ultrasound_ai.mrml.dependencies import ensure_dependencies

        ask = self.ask if self.ask is not None else slicer.util.confirmOkCancelDisplay
        if not ensure_dependencies(ask=ask):
            raise RuntimeError(f"{self.module_name} needs PyTorch and a few Python packages; they were not installed")
        self._dependencies_ready = True

    # -- running -------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.launcher is not None and not self.launcher.done

    def make_job(self, params) -> dict:
        """The job dict (task, inputs, outputs, parameters, device) for checked parameters; writes
        the inputs the job reads. Raises InputError for bad input, before any job starts."""
        raise NotImplementedError(f"{type(self).__name__} must define make_job")

    def start(self, parameters, on_event: Callable[[dict], None] | None = None, *, task: str | None = None,
              env: dict | None = None):
        """Check and write the inputs, then start the job in a background process; returns its
        JobLauncher at once (drain() its events from a timer). `task` and `env` choose another task
        name and add to the worker's environment (plug-ins and tests)."""
        if self.running:
            raise RuntimeError(f"a {self.TITLE} is already running; cancel it or wait for it first")
        params = self.Parameters.from_any(parameters)
        self.ensure_dependencies()  # before anything imports a package Slicer does not bundle
        try:
            job = self.make_job(params)
            if task is not None:
                job["task"] = task
            from ultrasound_ai.jobs.launcher import JobLauncher

            self.launcher = JobLauncher(job, python=self.python, on_event=on_event, env=env).start()
        except BaseException:
            self.launcher = None
            self.cleanup_inputs()
            raise
        return self.launcher

    def run(self, parameters, on_event=None, wait: bool = True, timeout: float | None = None, **start_kwargs):
        """Start the job; with wait=True block until it ends and return load_results' nodes (raising
        InputError / RuntimeError when the job failed, Cancelled when it was cancelled). With
        wait=False return the JobLauncher, as start() does."""
        launcher = self.start(parameters, on_event=on_event, **start_kwargs)
        if not wait:
            return launcher
        try:
            result = launcher.wait(timeout)
        except BaseException:
            launcher.cancel(grace_s=2.0)
            launcher.wait()
            self.cleanup_inputs()
            raise
        return self.load_results(result, parameters)

    def cancel(self) -> None:
        """Ask the running job to stop; it is killed with its whole process tree after a grace period."""
        if self.running:
            self.launcher.cancel()

    # -- results -------------------------------------------------------------------------------------
    def load_results(self, result, parameters) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define load_results")

    def finished_payload(self, result) -> dict:
        """The result dict of a finished job (a JobResult or a JobLauncher, waited for). The run's
        exported inputs are removed whatever the outcome. A cancelled job raises Cancelled, a failed
        one InputError (bad input, exit 2) or RuntimeError with the job's message."""
        from ultrasound_ai.core.errors import Cancelled

        if hasattr(result, "wait") and hasattr(result, "drain"):  # a JobLauncher
            result = result.wait()
        self.cleanup_inputs()
        if result.status == "cancelled":
            raise Cancelled(result.error or f"{self.TITLE} cancelled")
        if not result.ok:
            message = f"{self.TITLE} failed: {result.error}"
            raise InputError(message) if result.exit_code == 2 else RuntimeError(message)
        return dict(result.result or {})

    def find_output(self, scene, class_name: str, name: str, kind: str, new: bool = False):
        """The previous run's node of this name and kind (to be replaced), or None (a new one is
        made). With new=True a new node with a unique name is made instead, so earlier results stay."""
        if new:
            return scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
        for node in scene.GetNodesByClass(class_name):
            if node.GetName() == name and node.GetAttribute(self.OUTPUT_ATTRIBUTE) == kind:
                return node
        return None

    def metrics_output(self, scene, name: str, metrics, method: str, new: bool = False):
        """The job's metrics as the table node `name` (the previous run's replaced unless `new`), or
        None when the job reported none."""
        if not metrics:
            return None
        from ultrasound_ai.mrml.tables import metrics_to_table

        node = metrics_to_table(metrics, name=name, node=self.find_output(scene, "vtkMRMLTableNode", name, "metrics", new),
                                scene=scene)
        self.tag(node, "metrics", method)
        return node

    def tag(self, node, kind: str, method: str) -> None:
        """Mark a result node with its kind and method (find_output finds it again)."""
        node.SetAttribute(self.OUTPUT_ATTRIBUTE, kind)
        node.SetAttribute(self.METHOD_ATTRIBUTE, str(method))

    # -- the panel -----------------------------------------------------------------------------------
    def model_line(self, method: str, checkpoint=None) -> str:
        """The "trained on ..." line of the model a panel method runs (see model_card_line); a
        classical method says it has no trained model."""
        card_method = self.MODEL_METHODS.get(method)
        if card_method is None and not checkpoint:
            return f"{method}: a classical method, no trained model."
        return model_card_line(card_method, checkpoint)
