"""The Slicer panels offer exactly the names the engine's registries know.

For every module: each `.ui` combobox bound to a parameter (`SlicerParameterName`), each `Choice([...])`
of the module's parameter node class and each choice tuple of its Logic (`METHODS`, `MODES`, ...) must
hold the registry's names. The module files are read as text (they import Qt); a `Choice` argument
that names a Logic constant is resolved through the Logic, which imports with the slicer-core wheel.
"""

from __future__ import annotations

import ast
import importlib
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("UltrasoundAI", "UltrasoundAIRegistration", "UltrasoundAIULM")


def _freehand_methods():
    from ultrasound_ai.freehand.methods import PANEL_CHOICES, available_methods

    return [*PANEL_CHOICES, *available_methods()]


def _ulm_localizers():
    from ultrasound_ai.ulm.pipeline import localizer_names

    return localizer_names()


def _registration_methods():
    from ultrasound_ai.registration.tasks import METHODS

    return list(METHODS)


def _registration_modes():
    from ultrasound_ai.registration.inference import MODES

    return list(MODES)


def _compounding():
    from ultrasound_ai.freehand.compounding import COMPOUNDING_MODES

    return list(COMPOUNDING_MODES)


def _fill_holes():
    from ultrasound_ai.freehand.compounding import FILL_METHODS

    return list(FILL_METHODS)


# (module, parameter) -> (the registry's names, the Logic constant holding the panel's list, exact). Exact:
# the panel offers every registered name (a new pose method or localizer appears in the panel by itself);
# otherwise the panel may offer a subset (registration: "attention+refine" is a command-line variant).
REGISTRIES = {
    ("UltrasoundAI", "method"): (_freehand_methods, "METHODS", True),
    ("UltrasoundAI", "compounding"): (_compounding, "COMPOUNDING", True),
    ("UltrasoundAI", "fillHoles"): (_fill_holes, "FILL_HOLES", True),
    ("UltrasoundAIRegistration", "method"): (_registration_methods, "METHODS", False),
    ("UltrasoundAIRegistration", "mode"): (_registration_modes, "MODES", True),
    ("UltrasoundAIULM", "method"): (_ulm_localizers, "METHODS", True),
}


def ui_combobox_items(ui_path: Path) -> dict[str, list[str]]:
    """SlicerParameterName -> the combobox's item texts (empty when the panel fills it at run time)."""
    out = {}
    for widget in ET.parse(ui_path).iter("widget"):
        if widget.get("class") not in ("QComboBox", "ctkComboBox"):
            continue
        props = {p.get("name"): p.find("string") for p in widget.findall("property")}
        param = props.get("SlicerParameterName")
        if param is None:
            continue
        out[param.text] = [item.find("property/string").text for item in widget.findall("item")]
    return out


def parameter_choices(module_py: Path) -> dict[str, object]:
    """Field name -> the `Choice(...)` argument of the parameter node class: a list of literals, or the
    name of a constant (resolved through the Logic)."""
    out = {}
    for node in ast.walk(ast.parse(module_py.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        for call in ast.walk(node.annotation):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Choice" and call.args:
                arg = call.args[0]
                if isinstance(arg, (ast.List, ast.Tuple)) and all(isinstance(e, ast.Constant) for e in arg.elts):
                    out[node.target.id] = [e.value for e in arg.elts]
                else:
                    out[node.target.id] = ast.unparse(arg)
    return out


@pytest.fixture(scope="module")
def logics():
    pytest.importorskip("slicer")
    loaded = {}
    for module in MODULES:
        folder = str(REPO / module)
        sys.path.insert(0, folder)
        try:
            loaded[module] = importlib.import_module(f"{module}Lib.logic")
        finally:
            sys.path.remove(folder)
    return loaded


def _resolve(value, logic):
    if isinstance(value, list):
        return value
    # A constant of the Logic, possibly wrapped: METHODS, list(METHODS), [*METHODS].
    names = [n.id for n in ast.walk(ast.parse(value, mode="eval")) if isinstance(n, ast.Name) and n.id != "list"]
    assert len(names) == 1, f"Choice({value}): expected a literal list or one constant of the Logic"
    return list(getattr(logic, names[0]))


@pytest.mark.parametrize("module,parameter", sorted(REGISTRIES))
def test_panel_choices_match_the_registry(module, parameter, logics):
    registry, constant, exact = REGISTRIES[(module, parameter)]
    known = registry()
    logic = logics[module]
    offered = list(getattr(logic, constant))

    def check(names, where):
        assert len(set(names)) == len(names), f"{where}: repeated names {names}"
        if exact:
            assert sorted(names) == sorted(known), f"{where}: {names}, the registry has {known}"
        else:
            assert set(names) <= set(known), f"{where}: {sorted(set(names) - set(known))} not in the registry {known}"

    check(offered, f"{module}Lib/logic.py {constant}")
    choice = parameter_choices(REPO / module / f"{module}.py").get(parameter)
    assert choice is not None, f"{module}.py: the parameter node has no Choice for {parameter!r}"
    assert sorted(_resolve(choice, logic)) == sorted(offered), f"{module}.py Choice of {parameter!r}"
    items = ui_combobox_items(REPO / module / "Resources" / "UI" / f"{module}.ui").get(parameter)
    assert items is not None, f"{module}.ui: no combobox bound to {parameter!r}"
    # Items in the .ui are only the designer's preview (the parameter node refills the combobox from its
    # Choice); when present they must match.
    assert not items or sorted(items) == sorted(offered), f"{module}.ui items of {parameter!r}"


def test_ulm_panel_labels_and_tooltips_come_from_the_registry(logics):
    from ultrasound_ai.ulm.localizers import localizer_info

    logic = logics["UltrasoundAIULM"]
    assert logic.METHOD_LABELS == {name: localizer_info(name).label for name in _ulm_localizers()}
    assert all(localizer_info(name).tooltip in logic.METHOD_TOOLTIPS[name] for name in _ulm_localizers())


def test_the_readers_see_planted_mismatches(tmp_path):
    ui = tmp_path / "M.ui"
    ui.write_text('<ui><widget class="QComboBox" name="methodComboBox">'
                  '<property name="SlicerParameterName"><string>method</string></property>'
                  '<item><property name="text"><string>rs</string></property></item>'
                  '<item><property name="text"><string>typo</string></property></item></widget></ui>')
    assert ui_combobox_items(ui) == {"method": ["rs", "typo"]}
    py = tmp_path / "M.py"
    py.write_text("class P:\n    method: Annotated[str, Choice(['rs', 'wa'])] = 'rs'\n"
                  "    device: Annotated[str, Choice(list(DEVICES))] = 'auto'\n")
    assert parameter_choices(py) == {"method": ["rs", "wa"], "device": "list(DEVICES)"}
