"""Slicer-fidelity checks: what the 3D Slicer application itself does with a module, emulated.

Written from Slicer's documented behaviour and its source (read, not copied; Slicer v5.10):
  node-fields      every node-typed field of the @parameterNodeWrapper class names concrete MRML classes:
                   the node combobox connector instantiates each one to fill `nodeTypes`
                   (parameterNodeWrapper/util.py getNodeTypes), so an abstract class raises in connectGui
  widget-bindings  every widget bound with SlicerParameterName is of a class that Slicer's GUI connector
                   for that field's type accepts (ACCEPTED_WIDGETS; the connectors compare type(widget)
                   exactly; a combobox needs a Choice annotation)
  import-layouts   the module file imports in a fresh interpreter with only its own folder on sys.path and
                   the engine not installed (Slicer's scripted-module factory appends only the folder of the
                   module file, qSlicerScriptedLoadableModuleFactory.cxx), in the source checkout and in the
                   installed layout produced by the CMake rules; the engine and the shipped models are then
                   found inside that layout
  ctest            the module's Test classes run as `slicer_add_python_unittest` runs them:
                   unittest.TestLoader().loadTestsFromName("<Module>") (slicer/testing.py runUnitTest), i.e.
                   every test_* on its own after setUp, never through runTest (scenario functions recorded,
                   not run: the slicer-core tests run them)
  first-apply      with the packages Slicer does not bundle made unimportable (NOT_BUNDLED), the module
                   file and its Logic import, and Apply (Logic.start) asks to install them before anything
                   imports one
  min-python       every engine and module file parses with the grammar of the minimum Slicer's Python
                   and imports no standard-library module that Python removed by then; Slicer API newer
                   than the minimum Slicer (NEWER_SLICER_API) is called only behind a hasattr/getattr guard
  packaging        the engine and the models are in the build tree (what ctest and the generic tests load)
                   and in the install tree; LICENSE exists; every repository file that the CMake metadata
                   names (icon, screenshots) exists

Usage: python Testing/slicer_checks.py [MODULE_DIR ...]   (exit 1 when a problem is found)
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TESTING = Path(__file__).resolve().parent
if str(TESTING) not in sys.path:
    sys.path.insert(0, str(TESTING))

import module_checks as mc  # noqa: E402 - a sibling script, found through the line above
from module_checks import Problem  # noqa: E402

REPO_ROOT = mc.REPO_ROOT
# The minimum supported Slicer and its Python (SuperBuild/External_python.cmake: 5.10 ships 3.12.10;
# 5.6 and 5.8 ship 3.9.10, older than the engine's 3.10).
MIN_SLICER = (5, 10)
MIN_SLICER_PYTHON = (3, 12)
# Standard-library modules removed by Python 3.12 (PEP 594 removals start in 3.13; these went in 3.12).
REMOVED_STDLIB = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}
# Slicer API that appeared after some release: name -> first Slicer version that has it.
NEWER_SLICER_API = {"SetUseColumnTitleAsColumnHeader": (5, 10)}
# What the engine needs that Slicer does not bundle (its SuperBuild builds numpy, scipy, SimpleITK, vtk,
# pillow, pydicom, requests, packaging ...; none of these): import names.
NOT_BUNDLED = ("torch", "h5py", "skimage", "tqdm", "psutil", "yaml")
# The build / install folder of scripted modules, as Slicer names it (Slicer_QTSCRIPTEDMODULES_LIB_DIR).
SCRIPTED_DIR = "lib/Slicer-{0}.{1}/qt-scripted-modules".format(*MIN_SLICER)

# Widget classes Slicer's GUI connectors accept for each field type: Slicer v5.10
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py (the canRepresent of each connector) and
# Docs/developer_guide/parameter_nodes/gui_connection.md. "choice" kinds need a Choice annotation.
_SPIN = {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
         "qMRMLSpinBox"}
_COMBO = {"QComboBox", "ctkComboBox"}
ACCEPTED_WIDGETS = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSlider", "QSpinBox"} | _SPIN,
    "float": set(_SPIN),
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView", "qMRMLSubjectHierarchyComboBox"},
    "FloatRange": {"ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"},
    "choice": set(_COMBO),  # int, float, str, bool with Choice(...)
}
_PATH_TYPES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


def _p(check: str, path, line: int, message: str) -> Problem:
    return Problem(check, mc._rel(Path(path)), line, message)


def module_file(module_dir: Path) -> Path:
    return Path(module_dir) / f"{mc.module_name(module_dir)}.py"


# ---------------------------------------------------------------------------------------------------
# Field types from the AST of the @parameterNodeWrapper class


def _wrapper_fields(module_dir: Path) -> tuple[dict[str, ast.expr], Path | None]:
    path = module_file(module_dir)
    tree = mc._parse_python(path) if path.is_file() else None
    if tree is None:
        return {}, None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and "parameterNodeWrapper" in {mc._decorator_name(d)
                                                                        for d in node.decorator_list}:
            return mc._class_fields(node), path
    return {}, path


def _strip_annotated(annotation: ast.expr) -> tuple[ast.expr, bool]:
    """(the type inside Annotated[...], whether a Choice(...) annotation is present)."""
    if isinstance(annotation, ast.Subscript) and _name(annotation.value) == "Annotated":
        elts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        choice = any(isinstance(e, ast.Call) and _name(e.func) == "Choice" for e in elts[1:])
        return elts[0], choice
    return annotation, False


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    return ""


def _union_members(annotation: ast.expr) -> list[str]:
    """Names in Union[...] / Optional[...] / A | B, or [name] for a plain type."""
    if isinstance(annotation, ast.Subscript) and _name(annotation.value) in {"Union", "Optional"}:
        elts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        return [n for e in elts for n in _union_members(e)]
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _union_members(annotation.left) + _union_members(annotation.right)
    return [_name(annotation)]


def field_kind(annotation: ast.expr) -> tuple[str, bool, list[str]]:
    """(kind, has Choice, MRML class names) of a field: kind is bool, int, float, str, path, node,
    FloatRange, enum or other."""
    inner, choice = _strip_annotated(annotation)
    members = [m for m in _union_members(inner) if m != "None"]
    if members and all(m.startswith("vtkMRML") for m in members):
        return "node", choice, members
    if len(members) == 1:
        m = members[0]
        if m in {"bool", "int", "float", "str", "FloatRange"}:
            return m, choice, []
        if m in _PATH_TYPES:
            return "path", choice, []
    return "other", choice, []


# ---------------------------------------------------------------------------------------------------
# node-fields


def check_node_fields(module_dir: Path) -> list[Problem]:
    """Each MRML class of a node-typed field must exist in slicer and be instantiable."""
    import slicer

    fields, path = _wrapper_fields(module_dir)
    out = []
    for field, annotation in fields.items():
        kind, _, classes = field_kind(annotation)
        for cls_name in classes if kind == "node" else []:
            cls = getattr(slicer, cls_name, None)
            if cls is None:
                out.append(_p("node-fields", path, annotation.lineno, f"field {field!r}: slicer has no class "
                                                                      f"{cls_name}"))
                continue
            try:
                cls()
            except TypeError as exc:
                out.append(_p("node-fields", path, annotation.lineno,
                              f"field {field!r}: {cls_name} cannot be instantiated ({exc}); Slicer's node "
                              f"combobox connector instantiates every type of a node field in connectGui. Use "
                              f"concrete classes, e.g. typing.Union[vtkMRMLLabelMapVolumeNode, "
                              f"vtkMRMLSegmentationNode, None]"))
    return out


# ---------------------------------------------------------------------------------------------------
# widget-bindings


def _ui_widget_classes(ui_path: Path) -> dict[str, tuple[str, int, str]]:
    """SlicerParameterName -> (widget class, line, widget name)."""
    root = mc._parse_xml(ui_path)
    out = {}
    for widget in root.iter("widget"):
        for prop in widget.children:
            if prop.tag == "property" and prop.attrs.get("name") == "SlicerParameterName":
                value = "".join(c.text for c in prop.children if c.tag in {"string", "cstring"}).strip()
                out[value] = (widget.attrs.get("class", "?"), prop.line, widget.attrs.get("name", "?"))
    return out


def check_widget_bindings(module_dir: Path) -> list[Problem]:
    fields, _ = _wrapper_fields(module_dir)
    ui = mc._ui_path(module_dir)
    if not fields or not ui.is_file():
        return []
    out = []
    for name, (cls, line, widget) in _ui_widget_classes(ui).items():
        if name not in fields:
            continue  # module_checks' parameter-names reports it
        kind, choice, _ = field_kind(fields[name])
        accepted = set(ACCEPTED_WIDGETS.get(kind, ()))
        if kind in {"bool", "int", "float", "str"} and choice:
            accepted |= ACCEPTED_WIDGETS["choice"]
        if kind == "enum":
            accepted |= ACCEPTED_WIDGETS["choice"]
        if cls in _COMBO and kind in {"bool", "int", "float", "str"} and not choice:
            out.append(_p("widget-bindings", ui, line, f"widget {widget!r} ({cls}) binds {name!r} ({kind}) without "
                                                       f"a Choice annotation: Slicer's combobox connector raises"))
        elif cls not in accepted:
            out.append(_p("widget-bindings", ui, line,
                          f"widget {widget!r} is a {cls}; Slicer's GUI connectors bind a {kind} field "
                          f"({name!r}) only to {', '.join(sorted(accepted)) or 'no widget'}"))
    return out


# ---------------------------------------------------------------------------------------------------
# Layouts: the source checkout and the trees the CMake rules produce


def materialise(layout: dict[str, Path], dest: Path) -> Path:
    """Copy a layout into dest/<SCRIPTED_DIR>; returns that folder (links would let Python resolve the
    real files, i.e. the checkout)."""
    folder = Path(dest) / SCRIPTED_DIR
    for rel, src in layout.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return folder


# ---------------------------------------------------------------------------------------------------
# Probes: a fresh interpreter as a fresh Slicer (stand-ins for the application's Python parts, the
# packages Slicer does not bundle unimportable), the engine not installed, one module folder on sys.path

_PROBE = textwrap.dedent(
    r"""
    import json, sys
    request = json.loads(sys.argv[1])
    # The engine is not installed: drop the editable install's finders and any path to the checkout.
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", repr(f))]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", repr(h))]
    sys.path_importer_cache.clear()
    sys.path[:] = [p for p in sys.path if p and p not in request["drop_paths"]]
    sys.path.insert(0, request["testing"])
    import slicer_standin
    slicer_standin.install(application=True, blocked=request["blocked"])
    sys.path.remove(request["testing"])
    sys.path.insert(0, request["module_path"])
    print("PROBE-RESULT " + json.dumps(slicer_standin.probe(request["modules"], request["steps"]), default=str))
    """
)

_PROBES: dict[tuple, dict] = {}  # one interpreter per (folder, modules, steps, blocked): the checks share it


def run_probe(folder: Path, modules, steps=("ctest", "first_apply"), blocked=NOT_BUNDLED,
              python: str | None = None, timeout_s: float = 180.0) -> dict:
    """The stand-in probe's report for `modules` imported with only `folder` on sys.path."""
    key = (str(folder), tuple(modules), tuple(steps), tuple(blocked), python,
           tuple(sorted((str(p), p.stat().st_mtime_ns) for p in Path(folder).rglob("*.py"))))
    if key in _PROBES:
        return _PROBES[key]
    request = {"module_path": str(folder), "modules": list(modules), "steps": list(steps),
               "blocked": list(blocked), "testing": str(TESTING),
               "drop_paths": [str(REPO_ROOT), str(TESTING), os.getcwd()]}
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONSTARTUP"}}
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="slicer-probe-") as cwd:
        proc = subprocess.run([python or sys.executable, "-c", _PROBE, json.dumps(request)], capture_output=True,
                              text=True, timeout=timeout_s, env=env, cwd=cwd)
    report = None
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE-RESULT "):
            report = json.loads(line[len("PROBE-RESULT "):])
    if report is None:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        report = {m: {"error": f"the probe interpreter exited {proc.returncode}: {tail}"} for m in modules}
    _PROBES[key] = report
    return report


def check_import_layouts(module_dir: Path, layouts: dict[str, Path] | None = None,
                         python: str | None = None) -> list[Problem]:
    """`layouts`: {label: folder holding <Module>.py}; default: the source checkout and the installed
    layout of the repository's CMake rules. In each, the module file must import and the engine (when
    the module uses it) must come from inside that layout, with the shipped models found there."""
    module_dir = Path(module_dir).resolve()
    name = mc.module_name(module_dir)
    path = module_file(module_dir)
    if layouts is None:
        layouts = {"source checkout": module_dir, "installed extension": installed_layout()}
    out = []
    for label, folder in layouts.items():
        folder = Path(folder)
        # Not resolved: a layout may link to files elsewhere; what counts is the path imported through.
        root = Path(os.path.abspath(folder)).parent if label == "source checkout" else Path(os.path.abspath(folder))
        siblings = [m for m in ALL_MODULES if (folder / f"{m}.py").is_file()] if label != "source checkout" else []
        report = run_probe(folder, siblings or [name], python=python)[name]
        if "error" in report:
            out.append(_p("import-layouts", path, 0, f"{name} does not import in the {label} layout with only "
                                                     f"{folder} on sys.path: {report['error']}"))
            continue
        engine = report.get("engine")
        if engine is not None and not Path(os.path.abspath(engine)).is_relative_to(root):
            out.append(_p("import-layouts", path, 0, f"in the {label} layout the engine came from {engine}, "
                                                     f"outside {root}"))
        if engine is not None and not report.get("models"):
            out.append(_p("import-layouts", path, 0, f"in the {label} layout the engine finds no shipped model"))
    return out


ALL_MODULES = ("UltrasoundAI", "UltrasoundAIRegistration", "UltrasoundAIULM")
_INSTALLED: dict[str, Path] = {}


def installed_layout(root: Path = REPO_ROOT) -> Path:
    """The install tree of the repository's CMake rules, copied once per run into a temporary folder."""
    key = str(Path(root).resolve())
    if key not in _INSTALLED or not _INSTALLED[key].is_dir():
        _INSTALLED[key] = materialise(mc.cmake_layout(root, "install"), Path(tempfile.mkdtemp(prefix="slicer-install-")))
    return _INSTALLED[key]


def _test_methods(module_dir: Path) -> list[str]:
    tree = mc._parse_python(module_file(module_dir))
    names = []
    for node in ast.walk(tree) if tree is not None else []:
        if isinstance(node, ast.ClassDef) and any(_name(b) in {"ScriptedLoadableModuleTest", "TestCase"}
                                                  for b in node.bases):
            names += [f.name for f in node.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test")]
    return names


def check_ctest(module_dir: Path, python: str | None = None) -> list[Problem]:
    module_dir = Path(module_dir).resolve()
    name = mc.module_name(module_dir)
    expected = _test_methods(module_dir)
    path = module_file(module_dir)
    if not expected:
        return [_p("ctest", path, 0, f"{name} has no Test class with test_* methods for ctest to run")]
    report = run_probe(module_dir, [name], python=python)[name]
    if "ctest" not in report:
        return [_p("ctest", path, 0, f"loadTestsFromName({name!r}) could not run: {report.get('error')}")]
    result = report["ctest"]
    out = [_p("ctest", path, 0, f"run as ctest runs it (each test_* after setUp only): {p}")
           for p in result["problems"]]
    if result["run"] < len(expected):
        out.append(_p("ctest", path, 0, f"ctest ran {result['run']} test(s); the Test class has {len(expected)} "
                                        f"test_* methods"))
    return out


def check_first_apply(module_dir: Path, python: str | None = None) -> list[Problem]:
    """With NOT_BUNDLED unimportable: the module and its Logic import; Apply asks to install before any
    of them is imported; declining gives the Logic's "not installed" message, not an ImportError."""
    module_dir = Path(module_dir).resolve()
    name = mc.module_name(module_dir)
    path = module_file(module_dir)
    report = run_probe(module_dir, [name], python=python)[name]
    if "first_apply" not in report:
        return [_p("first-apply", path, 0, f"with {', '.join(NOT_BUNDLED)} not installed (Slicer bundles none of "
                                           f"them), {name} or its Logic does not import: {report.get('error')}")]
    result = report["first_apply"]
    out = []
    early = report.get("import_attempts", []) + result["before"]
    if early:
        out.append(_p("first-apply", path, 0, f"{name} tried to import {', '.join(sorted(set(early)))} before "
                                              f"anything was asked"))
    if not result["asked"]:
        out.append(_p("first-apply", path, 0, f"Apply never asked to install the missing packages; it ended "
                                              f"with {result['outcome']}"))
    elif result["asked"][0] != result["before"]:
        extra = result["asked"][0][len(result["before"]):]
        out.append(_p("first-apply", path, 0, f"Apply imported {', '.join(extra)} before asking to install it"))
    elif "ImportError" in result["outcome"] or "ModuleNotFoundError" in result["outcome"]:
        out.append(_p("first-apply", path, 0, f"after the user declined, Apply failed with {result['outcome']}"))
    return out


# ---------------------------------------------------------------------------------------------------
# min-python


def check_min_python(files, minimum=MIN_SLICER_PYTHON, slicer_version=MIN_SLICER) -> list[Problem]:
    out = []
    for path in files:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(text, filename=str(path), feature_version=minimum)
        except SyntaxError as exc:
            out.append(_p("min-python", path, exc.lineno or 0, f"does not parse as Python "
                                                               f"{minimum[0]}.{minimum[1]}: {exc.msg}"))
            continue
        # One walk: imports, the API names written as strings (hasattr/getattr guards), attribute uses.
        strings, attributes = set(), []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
            elif isinstance(node, ast.Attribute) and node.attr in NEWER_SLICER_API:
                attributes.append(node)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if node.level == 0 and node.module else [])
                for mod in mods:
                    if mod.split(".")[0] in REMOVED_STDLIB:
                        out.append(_p("min-python", path, node.lineno, f"imports {mod}, removed from Python "
                                                                       f"{minimum[0]}.{minimum[1]}"))
        for node in attributes:
            since = NEWER_SLICER_API[node.attr]
            if since > tuple(slicer_version) and node.attr not in strings:
                out.append(_p("min-python", path, node.lineno,
                              f"{node.attr} exists from Slicer {since[0]}.{since[1]}, newer than the minimum "
                              f"{slicer_version[0]}.{slicer_version[1]}: call it behind a hasattr/getattr guard"))
    return out


def engine_and_module_files(root: Path = REPO_ROOT) -> list[Path]:
    files = sorted(p for p in (Path(root) / "ultrasound_ai").rglob("*.py") if "__pycache__" not in p.parts)
    for d in mc.find_module_dirs(root):
        files += mc.python_files(d)
    return files


# ---------------------------------------------------------------------------------------------------
# packaging


_RAW_URL = re.compile(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(\S+)")


def check_packaging(root: Path = REPO_ROOT) -> list[Problem]:
    root = Path(root)
    top = root / "CMakeLists.txt"
    out = []
    for tree in ("build", "install"):
        layout = mc.cmake_layout(root, tree)
        if "ultrasound_ai/__init__.py" not in layout:
            out.append(_p("packaging", top, 0, f"the {tree} tree has no ultrasound_ai/ package beside the modules "
                                               f"({SCRIPTED_DIR}); {'ctest and generic tests' if tree == 'build' else 'installed modules'} "
                                               f"cannot import the engine"))
        engine = {p.relative_to(root).as_posix() for p in (root / "ultrasound_ai").rglob("*.py")
                  if "__pycache__" not in p.parts}
        missing = sorted(engine - set(layout))
        if "ultrasound_ai/__init__.py" in layout and missing:
            out.append(_p("packaging", top, 0, f"the {tree} tree lacks engine files: {', '.join(missing[:5])}"))
        models = {p.relative_to(root).as_posix() for p in (root / "Resources" / "Models").glob("*")
                  if p.suffix in {".pt", ".json"}}
        missing = sorted(models - set(layout))
        if missing:
            out.append(_p("packaging", top, 0, f"the {tree} tree lacks the models {', '.join(missing[:4])}"
                                               f"{' ...' if len(missing) > 4 else ''}"))
    if not any((root / n).is_file() for n in ("LICENSE", "LICENSE.txt", "LICENSE.md")):
        out.append(_p("packaging", root / "LICENSE", 0, "no LICENSE file (the Extensions Index requires one)"))
    if top.is_file():
        for cmd in mc.parse_cmake(top.read_text(encoding="utf-8")):
            if cmd.name.lower() == "set" and cmd.args and cmd.args[0] in {"EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"}:
                for url in " ".join(cmd.args[1:]).split():
                    m = _RAW_URL.match(url)
                    if m and not (root / m.group(1)).is_file():
                        out.append(_p("packaging", top, cmd.line, f"{cmd.args[0]} names {m.group(1)}, which is not "
                                                                  f"in the repository"))
    return out


# ---------------------------------------------------------------------------------------------------


def check_module(module_dir: Path, python: str | None = None) -> list[Problem]:
    return (check_node_fields(module_dir) + check_widget_bindings(module_dir) + check_ctest(module_dir, python)
            + check_first_apply(module_dir, python))


def run_all(module_dirs=None, python: str | None = None) -> list[Problem]:
    module_dirs = [Path(d) for d in (module_dirs or mc.find_module_dirs())]
    problems = []
    for d in module_dirs:
        problems += check_module(d, python) + check_import_layouts(d, python=python)
    problems += check_min_python(engine_and_module_files()) + check_packaging()
    return problems


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    problems = run_all(args or None)
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)" if problems else "ok", file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
