"""The Slicer-fidelity checks (Testing/slicer_checks.py): the repository's modules pass them, and each
check catches the defect it guards, planted in a small fixture module."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
from fixture_module import copy_good_module, edit

pytest.importorskip("slicer", reason="the Slicer-fidelity checks need the slicer-core wheel")

TESTING = Path(__file__).resolve().parent.parent
REPO = TESTING.parent
MODULES = ("UltrasoundAI", "UltrasoundAIRegistration", "UltrasoundAIULM")


def _load(name: str):
    if str(TESTING) not in sys.path:
        sys.path.insert(0, str(TESTING))
    spec = importlib.util.spec_from_file_location(name, TESTING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sc = _load("slicer_checks")


@pytest.fixture
def good(tmp_path) -> Path:
    return copy_good_module(tmp_path)


def _messages(problems) -> str:
    return "\n".join(map(str, problems))


# --------------------------------------------------------------------------------------------------
# The repository


@pytest.mark.parametrize("module", MODULES)
def test_repository_modules_pass(module):
    d = REPO / module
    problems = (sc.check_node_fields(d) + sc.check_widget_bindings(d) + sc.check_ctest(d) + sc.check_first_apply(d)
                + sc.check_import_layouts(d))
    assert problems == [], _messages(problems)


def test_repository_minimum_python_and_packaging_pass():
    problems = sc.check_min_python(sc.engine_and_module_files()) + sc.check_packaging()
    assert problems == [], _messages(problems)


def test_minimum_slicer_is_stated_consistently():
    """CMake metadata, README and the checks name the same minimum Slicer; its Python satisfies the
    engine's requires-python."""
    import re

    import tomllib

    version = "{0}.{1}".format(*sc.MIN_SLICER)
    assert f'set(UltrasoundAI_MINIMUM_SLICER_VERSION "{version}")' in (REPO / "CMakeLists.txt").read_text()
    assert f"3D Slicer {version} or newer" in (REPO / "README.md").read_text()
    assert f"Slicer {version} or newer" in (TESTING / "Slicer" / "README.md").read_text()
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    lo = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", spec).groups())
    hi = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert lo <= sc.MIN_SLICER_PYTHON and (hi is None or sc.MIN_SLICER_PYTHON < tuple(map(int, hi.groups())))


# --------------------------------------------------------------------------------------------------
# node-fields and widget-bindings (static: the fixture's source is read, not imported)


def test_abstract_node_field_is_caught_and_a_union_of_concrete_nodes_passes(good):
    module = good / "GoodModule.py"
    assert sc.check_node_fields(good) == []
    edit(module, "from slicer import vtkMRMLScalarVolumeNode",
          "import typing\n\nfrom slicer import vtkMRMLDisplayableNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode")
    edit(module, "    inputVolume: vtkMRMLScalarVolumeNode", "    inputVolume: vtkMRMLDisplayableNode")
    (p,) = sc.check_node_fields(good)
    assert p.check == "node-fields" and "vtkMRMLDisplayableNode" in p.message and "abstract" in p.message
    edit(module, "    inputVolume: vtkMRMLDisplayableNode",
          "    inputVolume: typing.Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]")
    assert sc.check_node_fields(good) == []


def test_widget_of_a_class_no_connector_accepts_is_caught(good):
    ui = good / "Resources" / "UI" / "GoodModule.ui"
    assert sc.check_widget_bindings(good) == []
    # A QLineEdit cannot show a bool; a plain QComboBox needs a Choice for a str field.
    edit(ui, '<widget class="QCheckBox" name="invertCheckBox">', '<widget class="QLineEdit" name="invertCheckBox">')
    (p,) = sc.check_widget_bindings(good)
    assert p.check == "widget-bindings" and "QLineEdit" in p.message and "'invert'" in p.message
    assert "QCheckBox" in p.message


def test_combobox_without_choice_is_caught(good):
    edit(good / "GoodModule.py", "    invert: bool = False", "    invert: str = 'no'")
    edit(good / "Resources" / "UI" / "GoodModule.ui", '<widget class="QCheckBox" name="invertCheckBox">',
          '<widget class="QComboBox" name="invertCheckBox">')
    (p,) = sc.check_widget_bindings(good)
    assert "without a Choice annotation" in p.message


def test_field_kinds_read_from_annotations():
    import ast

    def kind(text):
        return sc.field_kind(ast.parse(text, mode="eval").body)

    assert kind("Annotated[str, Choice(['a'])]") == ("str", True, [])
    assert kind("pathlib.Path") == ("path", False, [])
    assert kind("typing.Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]") == (
        "node", False, ["vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"])
    assert kind("Optional[vtkMRMLModelNode]")[0] == "node"
    assert kind("Annotated[float, WithinRange(0, 1)]") == ("float", False, [])


# --------------------------------------------------------------------------------------------------
# ctest, import layouts and first Apply (each a fresh interpreter, as Slicer would run it)


def test_test_method_depending_on_runtest_state_is_caught(good):
    assert sc.check_ctest(good) == []
    edit(good / "GoodModule.py", "        self.setUp()\n        self.test_threshold()",
          "        self.setUp()\n        self._offset = 12\n        self.test_threshold()")
    edit(good / "GoodModule.py", "threshold(volume, output, 12)", "threshold(volume, output, self._offset)")
    (p,) = sc.check_ctest(good)
    assert p.check == "ctest" and "_offset" in p.message and "test_threshold" in p.message


def _engine_module(root: Path, name: str, lib_init: str, logic_body: str) -> Path:
    """A module folder in a source-checkout layout: <root>/checkout/<name>/ beside ultrasound_ai/ (a
    link to this checkout's engine); `lib_init` is its <name>Lib/__init__.py."""
    checkout = root / "checkout"
    if not checkout.is_dir():
        checkout.mkdir()
        (checkout / "ultrasound_ai").symlink_to(REPO / "ultrasound_ai")
    d = checkout / name
    (d / f"{name}Lib").mkdir(parents=True)
    (d / f"{name}Lib" / "__init__.py").write_text(textwrap.dedent(lib_init))
    (d / f"{name}Lib" / "logic.py").write_text(textwrap.dedent(logic_body))
    (d / f"{name}.py").write_text(textwrap.dedent(f"""
        import pathlib

        from slicer import vtkMRMLScalarVolumeNode
        from slicer.parameterNodeWrapper import parameterNodeWrapper
        from slicer.ScriptedLoadableModule import ScriptedLoadableModule
        from {name}Lib.logic import {name}Logic  # noqa: F401


        class {name}(ScriptedLoadableModule):
            pass


        @parameterNodeWrapper
        class {name}ParameterNode:
            inputVolume: vtkMRMLScalarVolumeNode
            inputFile: pathlib.Path
        """))
    return d


# The modules' own engine path set-up (each <Module>Lib/__init__.py has it).
_ADD_CHECKOUT = (REPO / "UltrasoundAI" / "UltrasoundAILib" / "__init__.py").read_text()

_LOGIC = """
    from dataclasses import dataclass
    from typing import Any

    from ultrasound_ai.mrml.module_logic import ModuleLogic, parameters_from


    @dataclass
    class Params:
        inputVolume: Any = None
        inputFile: Any = None

        @classmethod
        def from_any(cls, parameters):
            return parameters_from(cls, parameters, "inputVolume")


    class {name}Logic(ModuleLogic):
        TITLE = "planted job"
        Parameters = Params

        def make_job(self, params):
            raise AssertionError("not reached: the install prompt is declined")
    """


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """Planted module folders in one source checkout (each check starts one interpreter per folder)."""
    root = tmp_path_factory.mktemp("planted")
    _engine_module(root, "Good", _ADD_CHECKOUT, _LOGIC.format(name="Good"))
    _engine_module(root, "PathBad", "", _LOGIC.format(name="PathBad"))
    # The launcher (psutil) imported before ensure_dependencies, as the Logics did.
    _engine_module(root, "ApplyEarly", _ADD_CHECKOUT, _LOGIC.format(name="ApplyEarly") + """
        def start(self, parameters, **kwargs):
            from ultrasound_ai.jobs.launcher import JobLauncher  # noqa: F401
            return super().start(parameters, **kwargs)
    """)
    # A package Slicer does not bundle imported at the top of the Logic.
    _engine_module(root, "ApplyTop", _ADD_CHECKOUT, "import h5py  # noqa: F401\n"
                   + textwrap.dedent(_LOGIC.format(name="ApplyTop")))
    return root / "checkout"


def test_engine_imported_before_the_path_is_set_is_caught(checkout):
    assert sc.check_import_layouts(checkout / "Good", layouts={"source checkout": checkout / "Good"}) == []
    (p,) = sc.check_import_layouts(checkout / "PathBad", layouts={"source checkout": checkout / "PathBad"})
    assert p.check == "import-layouts" and "No module named 'ultrasound_ai'" in p.message


def test_unbundled_package_imported_before_asking_is_caught(checkout):
    assert sc.check_first_apply(checkout / "Good") == []
    (p,) = sc.check_first_apply(checkout / "ApplyEarly")
    assert p.check == "first-apply" and "never asked" in p.message and "psutil" in p.message
    (p,) = sc.check_first_apply(checkout / "ApplyTop")
    assert "does not import" in p.message and "h5py" in p.message


# --------------------------------------------------------------------------------------------------
# min-python and packaging


def test_code_newer_than_the_minimum_python_and_unguarded_new_api_are_caught(tmp_path):
    f = tmp_path / "a.py"
    f.write_text("match 1:\n    case 1:\n        pass\n")
    (p,) = sc.check_min_python([f], minimum=(3, 9))
    assert "does not parse as Python 3.9" in p.message
    assert sc.check_min_python([f], minimum=(3, 10)) == []
    f.write_text("import imp\n")
    (p,) = sc.check_min_python([f])
    assert "removed" in p.message
    f.write_text("def header(node):\n    node.SetUseColumnTitleAsColumnHeader(True)\n")
    (p,) = sc.check_min_python([f], slicer_version=(5, 8))
    assert "SetUseColumnTitleAsColumnHeader" in p.message and "guard" in p.message
    assert sc.check_min_python([f], slicer_version=(5, 10)) == []
    f.write_text("def header(node):\n    if hasattr(node, 'SetUseColumnTitleAsColumnHeader'):\n"
                 "        node.SetUseColumnTitleAsColumnHeader(True)\n")
    assert sc.check_min_python([f], slicer_version=(5, 8)) == []


def test_engine_missing_from_the_build_tree_is_caught(tmp_path):
    root = tmp_path / "ext"
    root.mkdir()
    text = (REPO / "CMakeLists.txt").read_text()
    for name in ("ultrasound_ai", "Resources", *MODULES):
        (root / name).symlink_to(REPO / name)
    (root / "LICENSE").write_text("x")
    (root / "CMakeLists.txt").write_text(text)
    assert sc.check_packaging(root) == []
    # The engine and the models installed only (install(DIRECTORY)): the build tree, which ctest and
    # the generic tests load, has neither.
    start = text.index("ctkMacroCompilePythonScript(")
    end = text.index(")", start) + 1
    (root / "CMakeLists.txt").write_text(text[:start] + (
        "install(DIRECTORY ultrasound_ai DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} "
        "COMPONENT RuntimeLibraries PATTERN __pycache__ EXCLUDE)\n"
        "install(DIRECTORY Resources/Models DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources "
        "COMPONENT RuntimeLibraries PATTERN __pycache__ EXCLUDE)\n") + text[end:])
    problems = sc.check_packaging(root)
    assert {p.check for p in problems} == {"packaging"} and len(problems) == 2
    assert all("build tree" in p.message for p in problems)


def test_missing_license_and_screenshot_are_caught(tmp_path):
    (tmp_path / "CMakeLists.txt").write_text(
        'set(EXTENSION_SCREENSHOTURLS "https://raw.githubusercontent.com/o/r/main/Resources/Screenshots/a.png")\n')
    messages = _messages(sc.check_packaging(tmp_path))
    assert "no LICENSE file" in messages and "Resources/Screenshots/a.png" in messages
