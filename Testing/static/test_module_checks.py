"""The static module checks: a good fixture module passes, each planted defect is caught by exactly the
check meant for it, and the repository's own module folders and top CMakeLists.txt pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from fixture_module import FIXTURE, copy_good_module, edit

TESTING = Path(__file__).resolve().parent.parent
REPO = TESTING.parent


def _load_checks():
    spec = importlib.util.spec_from_file_location("ultrasound_ai_module_checks", TESTING / "module_checks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


mc = _load_checks()


@pytest.fixture
def good(tmp_path) -> Path:
    return copy_good_module(tmp_path)


def _checks(problems) -> set[str]:
    return {p.check for p in problems}


# --------------------------------------------------------------------------------------------------
# The good fixture


def test_good_module_passes_every_check():
    assert mc.check_module(FIXTURE) == []


def test_good_module_reading_is_real():
    # The checks pass because they read the module, not because they found nothing to check.
    ui = FIXTURE / "Resources" / "UI" / "GoodModule.ui"
    names = mc.ui_object_names(ui)
    assert {"applyButton", "statusLabel", "inputSelector", "verticalLayout"} <= names
    assert "verticalSpacer" not in names  # a spacer is no QObject, childWidgetVariables cannot see it
    assert [b[0] for b in mc.ui_parameter_names(ui)] == ["inputVolume", "thresholdValue", "invert", "outputVolume"]
    wrappers, _ = mc.parameter_classes(FIXTURE)
    assert set(wrappers["GoodModuleParameterNode"]) == {"inputVolume", "thresholdValue", "invert", "outputVolume"}
    listed, _ = mc.cmake_listed_files(FIXTURE / "CMakeLists.txt")
    assert set(listed) == {p.as_posix() for p in mc.module_files(FIXTURE)} == {
        "GoodModule.py", "GoodModuleLib/__init__.py", "GoodModuleLib/logic.py",
        "Resources/Icons/GoodModule.png", "Resources/UI/GoodModule.ui"}


def test_import_closure_follows_the_logic_imports(good):
    (good / "GoodModuleLib" / "helpers.py").write_text("X = 1\n")
    (good / "GoodModuleLib" / "unused.py").write_text("Y = 1\n")
    edit(good / "GoodModuleLib" / "logic.py", "import vtk\n", "import vtk\nfrom .helpers import X\n")
    closure = [p.relative_to(good).as_posix() for p in mc.local_import_closure(good, "GoodModuleLib.logic")]
    assert closure == ["GoodModuleLib/__init__.py", "GoodModuleLib/helpers.py", "GoodModuleLib/logic.py"]


def test_logic_import_leaves_no_bytecode(good):
    mc._IMPORT_CACHE.clear()  # make sure the import really runs here
    assert mc.check_logic_imports(good) == []
    assert len(mc._IMPORT_CACHE) == 1
    assert not list(good.rglob("__pycache__"))


# --------------------------------------------------------------------------------------------------
# Planted defects, one check each


def test_missing_ui_widget_is_caught(good):
    edit(good / "GoodModule.py", "self.ui.applyButton.enabled = True",
          "self.ui.applyButton.enabled = True\n            self.ui.missingButton.enabled = False")
    problems = mc.check_module(good)
    assert _checks(problems) == {"ui-names"}
    (p,) = problems
    assert "missingButton" in p.message and p.file.endswith("GoodModule.py")
    line = (good / "GoodModule.py").read_text().splitlines()[p.line - 1]
    assert "self.ui.missingButton" in line


def test_unknown_parameter_name_is_caught(good):
    edit(good / "Resources" / "UI" / "GoodModule.ui", "<string>invert</string>", "<string>notAField</string>")
    problems = mc.check_module(good)
    assert _checks(problems) == {"parameter-names"}
    (p,) = problems
    assert "notAField" in p.message and "invertCheckBox" in p.message
    line = (good / "Resources" / "UI" / "GoodModule.ui").read_text().splitlines()[p.line - 1]
    assert "SlicerParameterName" in line


def test_unlisted_python_file_is_caught(good):
    (good / "GoodModuleLib" / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    problems = mc.check_module(good)
    assert _checks(problems) == {"cmake-listing"}
    (p,) = problems
    assert "GoodModuleLib/helpers.py" in p.message and "MODULE_PYTHON_SCRIPTS" in p.message


def test_unlisted_resource_and_listed_missing_file_are_caught(good):
    (good / "Resources" / "Icons" / "extra.svg").write_text("<svg/>")
    (good / "Resources" / "Icons" / "GoodModule.png").unlink()
    problems = mc.check_cmake_listing(good)
    messages = " | ".join(p.message for p in problems)
    assert len(problems) == 2
    assert "Resources/Icons/extra.svg is not listed" in messages
    assert "Resources/Icons/GoodModule.png is listed but does not exist" in messages


def test_syntax_error_is_caught(good):
    broken = good / "GoodModuleLib" / "report.py"
    broken.write_text("def summary(values:\n    return len(values)\n")
    edit(good / "CMakeLists.txt", "${MODULE_NAME}Lib/logic.py", "${MODULE_NAME}Lib/logic.py\n  ${MODULE_NAME}Lib/report.py")
    problems = mc.check_module(good)
    assert _checks(problems) == {"compile"}
    (p,) = problems
    assert p.file.endswith("GoodModuleLib/report.py") and p.line >= 1


def test_syntax_error_in_module_testing_folder_is_caught(good):
    # Testing/ is not packaged, but it must still compile.
    (good / "Testing").mkdir()
    (good / "Testing" / "scenario.py").write_text("x = = 1\n")
    assert _checks(mc.check_module(good)) == {"compile"}


def test_logic_importing_qt_is_caught(good):
    edit(good / "GoodModuleLib" / "logic.py", "import vtk\n", "import qt\nimport vtk\n")
    problems = mc.check_module(good)
    assert _checks(problems) == {"logic-no-qt"}
    messages = [p.message for p in problems]
    assert any("imports 'qt'" in m for m in messages)  # the AST check, with its line
    assert any("does not import without qt/ctk" in m for m in messages)  # the real import


def test_logic_importing_ctk_indirectly_is_caught(good):
    # No qt/ctk import in logic.py itself: only the real import in a subprocess can see this one.
    (good / "GoodModuleLib" / "widgets.py").write_text("from ctk import ctkCollapsibleButton\n")
    edit(good / "GoodModuleLib" / "logic.py", "import vtk\n", "import vtk\nfrom . import widgets\n")
    edit(good / "CMakeLists.txt", "${MODULE_NAME}Lib/logic.py", "${MODULE_NAME}Lib/logic.py\n  ${MODULE_NAME}Lib/widgets.py")
    problems = mc.check_module(good)
    assert _checks(problems) == {"logic-no-qt"}
    (p,) = problems
    assert "does not import without qt/ctk" in p.message


def test_top_cmake_without_the_engine_is_caught(tmp_path):
    text = (REPO / "CMakeLists.txt").read_text()
    assert "SCRIPTS ${UltrasoundAI_ENGINE_SCRIPTS}" in text
    broken = tmp_path / "CMakeLists.txt"
    broken.write_text(text.replace("SCRIPTS ${UltrasoundAI_ENGINE_SCRIPTS}", ""))
    problems = mc.check_install_rules(broken, source_root=REPO)
    assert _checks(problems) == {"install-rules"}
    (p,) = problems
    assert "ultrasound_ai" in p.message and "Resources/Models" not in p.message
    # Without NO_INSTALL_SUBDIR the macro installs the build folder itself, one level too deep.
    broken.write_text(text.replace("NO_INSTALL_SUBDIR", ""))
    assert len(mc.check_install_rules(broken, source_root=REPO)) == 2


@pytest.mark.parametrize(
    "rule, expected",
    [
        # A trailing slash installs the package's contents, not the package folder.
        ("install(DIRECTORY ultrasound_ai/ DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} "
         "COMPONENT RuntimeLibraries PATTERN \"__pycache__\" EXCLUDE)", "puts it at"),
        ("install(DIRECTORY ultrasound_ai DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} "
         "COMPONENT RuntimeLibraries)", "__pycache__"),
        ("install(DIRECTORY ultrasound_ai DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} "
         "PATTERN \"__pycache__\" EXCLUDE)", "RuntimeLibraries"),
    ],
)
def test_wrong_engine_install_rules_are_caught(tmp_path, rule, expected):
    models = ("install(DIRECTORY Resources/Models DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources\n"
              "  COMPONENT RuntimeLibraries PATTERN \"__pycache__\" EXCLUDE)\n")
    cmake = tmp_path / "CMakeLists.txt"
    cmake.write_text(f"project(X)\n# install(DIRECTORY ultrasound_ai) in a comment does not count\n{rule}\n{models}")
    problems = mc.check_install_rules(cmake, source_root=REPO)
    assert len(problems) == 1 and expected in problems[0].message and "ultrasound_ai" in problems[0].message
    assert problems[0].line == 3


def test_models_installed_in_the_wrong_place_is_caught(tmp_path):
    cmake = tmp_path / "CMakeLists.txt"
    cmake.write_text(
        "install(DIRECTORY ultrasound_ai DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} "
        "COMPONENT RuntimeLibraries PATTERN __pycache__ EXCLUDE)\n"
        "install(DIRECTORY Resources/Models DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} "
        "COMPONENT RuntimeLibraries PATTERN __pycache__ EXCLUDE)\n")
    (p,) = mc.check_install_rules(cmake, source_root=REPO)
    assert "Resources/Models" in p.message and "puts it at ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Models" in p.message


def test_module_not_added_as_subdirectory_is_caught():
    problems = mc.check_subdirectories(REPO / "CMakeLists.txt", ["UltrasoundAI", "NotAModule"])
    assert [p.check for p in problems] == ["subdirectories"] and "NotAModule" in problems[0].message


def test_cli_exit_status(good, tmp_path, capsys):
    assert mc.main([str(good), "--no-top"]) == 0
    edit(good / "Resources" / "UI" / "GoodModule.ui", "<string>invert</string>", "<string>notAField</string>")
    assert mc.main([str(good), "--no-top"]) == 1
    out = capsys.readouterr().out
    assert "[parameter-names]" in out and "notAField" in out


def test_cmake_reader():
    cmds = mc.parse_cmake('set(A "x y" b) # c(\nfoo (${A} [[z)]] "q\\"r")\n#[[ block(\n]] bar()')
    assert [(c.name, c.args, c.line) for c in cmds] == [
        ("set", ["A", "x y", "b"], 1), ("foo", ["${A}", "z)", 'q"r'], 2), ("bar", [], 4)]
    with pytest.raises(ValueError, match="unterminated"):
        mc.parse_cmake("set(A\n")


# --------------------------------------------------------------------------------------------------
# The repository itself


def test_repository_modules_and_top_cmake_pass():
    modules = [REPO / m for m in ("UltrasoundAI", "UltrasoundAIRegistration", "UltrasoundAIULM")
               if (REPO / m / "CMakeLists.txt").is_file()]
    # The top-level check always runs, so this test checks something real before any module exists.
    for tree in ("build", "install"):
        layout = mc.cmake_layout(REPO, tree)
        assert layout["ultrasound_ai/__init__.py"] == REPO / "ultrasound_ai" / "__init__.py"
        assert "Resources/Models/fima_small.card.json" in layout and "UltrasoundAI.py" in layout
    problems = mc.run_checks(modules, top_cmake=REPO / "CMakeLists.txt")
    assert problems == [], "\n".join(map(str, problems))
