"""Stand-ins for what the 3D Slicer application adds to slicer-core: `qt`, `ctk`,
`slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper` and `slicer.app` / `slicer.modules`.

Enough to import a scripted module file, run its Test class as Slicer's ctest does, and drive a
Widget's job loop without Qt. Written from Slicer's documented behaviour (its developer guide and
the signatures in Base/Python/slicer/ScriptedLoadableModule.py); no Slicer code is copied.

    import slicer_standin
    slicer_standin.install(application=True, blocked=("psutil", "torch"))

`application=True` makes `ultrasound_ai.mrml.in_slicer_application()` true (a `slicer.app` and
`slicer.modules`); `blocked` makes those top-level packages unimportable, as on a fresh Slicer that
does not bundle them, and records each attempt in `ATTEMPTS`.
"""

from __future__ import annotations

import importlib.abc
import sys
import tempfile
import types
import unittest

ATTEMPTS: list[str] = []  # imports of blocked packages, in order


class StandInTimer:
    """qt.QTimer's surface used by the panels: interval, start / stop, the timeout() connection."""

    def __init__(self):
        self.interval = 0
        self.active = False
        self.slots = []

    def setInterval(self, ms):
        self.interval = ms

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active

    def connect(self, signal, slot):
        assert signal == "timeout()", signal
        self.slots.append(slot)

    def fire(self):
        for slot in list(self.slots):
            slot()


class StandInWidget:
    """Any widget: attributes as Qt properties (text, enabled, visible, value, toolTip, currentPath),
    connect() records the slot, click() calls it."""

    def __init__(self, **properties):
        self.text = ""
        self.toolTip = ""
        self.enabled = True
        self.visible = True
        self.value = 0
        self.minimum, self.maximum = 0, 100
        self.slots = {}
        self.__dict__.update(properties)

    def setRange(self, lo, hi):
        self.minimum, self.maximum = lo, hi

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def click(self):
        for slot in self.slots.get("clicked(bool)", []):
            slot(False)


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top in self.names:
            ATTEMPTS.append(fullname)
            raise ModuleNotFoundError(f"No module named {top!r} (not bundled with Slicer)", name=top)
        return None


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _parameter_node_wrapper_module():
    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    def parameterNodeWrapper(cls):
        # Only the class and its annotations are needed here (the checks read them); binding to a
        # real parameter node is what slicer-core cannot do.
        cls.__parameterNodeWrapper__ = True
        return cls

    return _module("slicer.parameterNodeWrapper", Choice=Choice, WithinRange=WithinRange,
                   parameterNodeWrapper=parameterNodeWrapper)


def _scripted_loadable_module():
    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            name = type(self).__name__
            self.moduleName = name[:-5] if name.endswith("Logic") else name

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            pass

        def runTest(self):
            for name in sorted(n for n in dir(self) if n.startswith("test_")):
                self.setUp()
                getattr(self, name)()
                self.tearDown()

    return _module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
                   ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
                   ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
                   ScriptedLoadableModuleTest=ScriptedLoadableModuleTest)


def install(application: bool = False, blocked=()) -> None:
    """Add the stand-ins to slicer-core's `slicer` (imported here) and to sys.modules."""
    if blocked:
        sys.meta_path.insert(0, _Blocker(blocked))
    import slicer

    qt = _module("qt", QTimer=StandInTimer, Qt=types.SimpleNamespace(ToolTipRole=3), QWidget=StandInWidget)
    _module("ctk")
    slicer.parameterNodeWrapper = _parameter_node_wrapper_module()
    slicer.ScriptedLoadableModule = _scripted_loadable_module()
    if getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()  # not the engine's new_scene: it may not be importable yet
    if application:
        slicer.app = types.SimpleNamespace(temporaryPath=tempfile.mkdtemp(prefix="standin-slicer-"))
        slicer.modules = types.SimpleNamespace()
    sys.modules.setdefault("qt", qt)


# ---------------------------------------------------------------------------------------------------
# What Testing/slicer_checks.py runs inside a fresh interpreter (after install()), per module


def probe(names, steps) -> dict:
    """{module: {"module_file", "engine", "models", "ctest", "first_apply" or "error"}} for the module
    files `names`, imported from sys.path as Slicer imports them; `steps` among "ctest", "first_apply"."""
    import importlib
    import traceback

    out = {}
    for name in names:
        report = out[name] = {}
        try:
            before = list(ATTEMPTS)
            module = importlib.import_module(name)
            report["import_attempts"] = ATTEMPTS[len(before):]
            report["module_file"] = module.__file__
            engine = sys.modules.get("ultrasound_ai")
            report["engine"] = engine.__file__ if engine is not None else None
            if engine is not None:
                from ultrasound_ai.models.registry import list_models

                report["models"] = sorted(str(e.pt_path) for e in list_models())
            if "ctest" in steps:
                report["ctest"] = run_ctest(name)
            if "first_apply" in steps:
                report["first_apply"] = first_apply(module, name)
        except BaseException as exc:  # noqa: BLE001 - reported to the check
            report["error"] = f"{type(exc).__name__}: {exc}"
            report["traceback"] = traceback.format_exc()[-1500:]
    return out


def run_ctest(name) -> dict:
    """Run the module's tests as Slicer's ctest does (slicer.testing.runUnitTest): loadTestsFromName on
    the module, so each test_* runs after setUp alone. The scenario functions of the module's Lib
    (every <Module>Lib/*scenarios.py) are recorded, not run (the slicer-core tests run them)."""
    import importlib
    from pathlib import Path

    calls = []

    class Recorder(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def record(*args, **kwargs):
                calls.append(attr)
                return types.SimpleNamespace(name=attr)

            return record

    lib = importlib.import_module(name + "Lib")
    for path in Path(lib.__file__).parent.glob("*scenarios.py"):
        recorder = Recorder(f"{name}Lib.{path.stem}")
        sys.modules[recorder.__name__] = recorder
        setattr(lib, path.stem, recorder)
    suite = unittest.TestLoader().loadTestsFromName(name)
    result = unittest.TestResult()
    suite.run(result)
    return {"run": result.testsRun, "calls": calls,
            "problems": [f"{t.id()}: {tb.strip().splitlines()[-1]}" for t, tb in result.errors + result.failures]}


def first_apply(module, name) -> dict:
    """Press Apply on a fresh Slicer: every node field of the parameter node filled with a new node of
    its first type, path fields with a file that does not exist; the install prompt is answered "no".
    Returns the imports of blocked packages before the prompt, and how start() ended."""
    import typing

    import slicer

    import ultrasound_ai.mrml.dependencies as deps

    asked = []
    start = len(ATTEMPTS)  # earlier probe steps (ctest) do not count

    def ensure_dependencies(ask=None, **kwargs):
        asked.append(ATTEMPTS[start:])
        return False

    deps.ensure_dependencies = ensure_dependencies
    logic = getattr(module, name + "Logic")()
    wrapper = next(v for v in vars(module).values()
                   if getattr(v, "__parameterNodeWrapper__", False) and v.__module__ == name)
    fields = getattr(getattr(logic, "Parameters", None), "__dataclass_fields__", None)
    params = {}
    for field, hint in typing.get_type_hints(wrapper).items():
        if fields is not None and field not in fields:
            continue
        kinds = [t for t in (typing.get_args(hint) or (hint,)) if isinstance(t, type)]
        nodes = [t for t in kinds if issubclass(t, slicer.vtkMRMLNode)]
        if nodes:
            params[field] = slicer.mrmlScene.AddNewNodeByClass(nodes[0]().GetClassName(), field)
        elif any(t.__name__.endswith("Path") for t in kinds):
            params[field] = "/nonexistent/input.h5"
    before = ATTEMPTS[start:]
    try:
        logic.start(params)
        outcome = "started"
    except BaseException as exc:  # noqa: BLE001 - reported to the check
        outcome = f"{type(exc).__name__}: {exc}"
    return {"before": before, "asked": asked, "outcome": outcome}
