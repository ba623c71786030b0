"""Static checks that stand in for what only the Slicer application could show (docs/ARCHITECTURE.md,
"Tests and benchmarks").

For a scripted module folder <Module>/:
  ui-names          every `self.ui.<name>` used in the module's Python exists in Resources/UI/<Module>.ui
  parameter-names   every `SlicerParameterName` property in the .ui names a field of the module's
                    @parameterNodeWrapper class (dotted names go through @parameterPack fields)
  cmake-listing     every script and resource of the folder is listed in its CMakeLists.txt
                    (SCRIPTS / RESOURCES of slicerMacroBuildScriptedModule), and every listed file exists
  compile           every .py file of the folder compiles
  logic-no-qt       <Module>Lib/logic.py has no qt/ctk import and imports, in a fresh interpreter,
                    with `qt` and `ctk` made unimportable
For the extension's top CMakeLists.txt:
  install-rules     the install tree the CMake rules produce (cmake_layout: slicerMacroBuildScriptedModule,
                    ctkMacroCompilePythonScript, install(DIRECTORY)) has `ultrasound_ai/` and the models in
                    `Resources/Models/` beside the module files; install(DIRECTORY) rules use COMPONENT
                    RuntimeLibraries and exclude __pycache__
  subdirectories    every module folder checked is add_subdirectory()'d

Usage: python Testing/module_checks.py [MODULE_DIR ...] [--top CMakeLists.txt]
With no MODULE_DIR, every module folder at the repository root is checked. Exit status 1 when any
problem is found.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator
from xml.parsers import expat

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_DIR = "ultrasound_ai"
MODELS_DIR = "Resources/Models"
INSTALL_DIR_VAR = "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"

# Files of a module folder that are not packaged and need not be listed.
_SKIP_DIRS = {"__pycache__", "Testing", ".pytest_cache", ".hypothesis"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".orig", ".rej", ".swp"}
# Keywords of slicerMacroBuildScriptedModule that end a SCRIPTS / RESOURCES list.
_MACRO_KEYWORDS = {"NAME", "SCRIPTS", "RESOURCES", "TARGET_LIBRARIES", "WITH_GENERIC_TESTS", "WITH_SUBDIR",
                   "VERBOSE"}
_QT_MODULES = {"qt", "ctk", "PythonQt", "qSlicerBaseQTCLIPython"}


@dataclass(frozen=True)
class Problem:
    check: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.check}] {self.message}"


# ---------------------------------------------------------------------------------------------------
# Module folder layout


def module_name(module_dir: Path) -> str:
    return Path(module_dir).resolve().name


def module_files(module_dir: Path) -> list[Path]:
    """Every file of the module folder that should be packaged (relative paths, sorted)."""
    module_dir = Path(module_dir)
    out: list[Path] = []
    for root, dirs, files in os.walk(module_dir):
        rel_root = Path(root).relative_to(module_dir)
        # Testing/ is skipped only at the module's top level (Slicer's convention for test data).
        dirs[:] = sorted(
            d for d in dirs
            if d not in {"__pycache__", ".pytest_cache", ".hypothesis"} and not d.startswith(".")
            and not (rel_root == Path(".") and d in _SKIP_DIRS)
        )
        for f in sorted(files):
            if f.startswith(".") or Path(f).suffix in _SKIP_SUFFIXES:
                continue
            rel = rel_root / f
            if rel == Path("CMakeLists.txt"):
                continue
            out.append(rel)
    return out


def python_files(module_dir: Path, include_testing: bool = False) -> list[Path]:
    module_dir = Path(module_dir)
    files = [module_dir / p for p in module_files(module_dir) if p.suffix == ".py"]
    if include_testing and (module_dir / "Testing").is_dir():
        files += sorted(p for p in (module_dir / "Testing").rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _parse_python(path: Path) -> ast.Module | None:
    """The AST of a file, or None when it does not parse (the compile check reports that)."""
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None


def _rel(path: Path, base: Path | None = None) -> str:
    path = Path(path)
    for b in (base, REPO_ROOT):
        if b is None:
            continue
        try:
            return path.resolve().relative_to(Path(b).resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


# ---------------------------------------------------------------------------------------------------
# Qt Designer .ui files (expat, so that every element keeps its line number)


@dataclass
class _XmlNode:
    tag: str
    attrs: dict
    line: int
    children: list
    text: str = ""

    def iter(self, tag: str | None = None) -> Iterator["_XmlNode"]:
        if tag is None or self.tag == tag:
            yield self
        for c in self.children:
            yield from c.iter(tag)


def _parse_xml(path: Path) -> _XmlNode:
    parser = expat.ParserCreate()
    root = _XmlNode("#document", {}, 0, [])
    stack = [root]

    def start(tag, attrs):
        node = _XmlNode(tag, dict(attrs), parser.CurrentLineNumber, [])
        stack[-1].children.append(node)
        stack.append(node)

    def end(tag):
        stack.pop()

    def chars(data):
        stack[-1].text += data

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.Parse(Path(path).read_bytes(), True)
    return root


def ui_object_names(ui_path: Path) -> set[str]:
    """Names `slicer.util.childWidgetVariables` can expose: widgets, layouts and actions."""
    root = _parse_xml(ui_path)
    return {n.attrs["name"] for n in root.iter() if n.tag in {"widget", "layout", "action", "actiongroup"}
            and n.attrs.get("name")}


def ui_parameter_names(ui_path: Path) -> list[tuple[str, int, str]]:
    """(parameter name, line, widget name) for every SlicerParameterName dynamic property."""
    root = _parse_xml(ui_path)
    out = []
    for widget in root.iter("widget"):
        for prop in widget.children:
            if prop.tag == "property" and prop.attrs.get("name") == "SlicerParameterName":
                value = "".join(c.text for c in prop.children if c.tag in {"string", "cstring"}).strip()
                out.append((value, prop.line, widget.attrs.get("name", "?")))
    return out


def _ui_path(module_dir: Path) -> Path:
    return Path(module_dir) / "Resources" / "UI" / f"{module_name(module_dir)}.ui"


def _load_ui(module_dir: Path, check: str) -> tuple[Path, list[Problem]]:
    ui = _ui_path(module_dir)
    if not ui.is_file():
        return ui, [Problem(check, _rel(ui), 0, f"missing Qt Designer file {ui.name} (expected at "
                                                f"Resources/UI/{ui.name})")]
    try:
        _parse_xml(ui)
    except expat.ExpatError as exc:
        return ui, [Problem(check, _rel(ui), exc.lineno, f"{ui.name} is not well-formed XML: {exc}")]
    return ui, []


# ---------------------------------------------------------------------------------------------------
# a) self.ui.<name>


def _self_ui_uses(tree: ast.AST) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            yield node.attr, node.lineno


def check_ui_names(module_dir: Path) -> list[Problem]:
    module_dir = Path(module_dir)
    uses = []
    for path in python_files(module_dir):
        tree = _parse_python(path)
        if tree is not None:
            uses += [(name, line, path) for name, line in _self_ui_uses(tree)]
    if not uses:
        return []
    ui, problems = _load_ui(module_dir, "ui-names")
    if problems:
        return problems
    names = ui_object_names(ui)
    return [Problem("ui-names", _rel(path), line, f"self.ui.{name} is used but {ui.name} has no widget "
                                                  f"named '{name}'")
            for name, line, path in uses if name not in names]


# ---------------------------------------------------------------------------------------------------
# b) SlicerParameterName -> parameter node wrapper fields


def _decorator_name(dec: ast.expr) -> str:
    if isinstance(dec, ast.Call):
        dec = dec.func
    if isinstance(dec, ast.Name):
        return dec.id
    if isinstance(dec, ast.Attribute):
        return dec.attr
    return ""


def _class_fields(cls: ast.ClassDef) -> dict[str, ast.expr]:
    """Class-level annotated names (what @parameterNodeWrapper / @parameterPack turn into parameters)."""
    return {stmt.target.id: stmt.annotation for stmt in cls.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}


def _annotation_class_names(annotation: ast.expr) -> set[str]:
    """Every bare name inside an annotation (Annotated[Pack, ...] and Optional[Pack] included)."""
    return {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(annotation) if isinstance(n, ast.Attribute)}


def parameter_classes(module_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """({wrapper class: fields}, {parameter pack class: fields}) found in the module's Python files."""
    wrappers: dict[str, dict] = {}
    packs: dict[str, dict] = {}
    for path in python_files(module_dir):
        tree = _parse_python(path)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                decorators = {_decorator_name(d) for d in node.decorator_list}
                if "parameterNodeWrapper" in decorators:
                    wrappers[node.name] = _class_fields(node)
                if "parameterPack" in decorators:
                    packs[node.name] = _class_fields(node)
    return wrappers, packs


def _resolve_parameter(name: str, fields: dict, packs: dict) -> str | None:
    """None when `name` (possibly dotted, through parameter packs) is a field; else what is wrong."""
    head, _, rest = name.partition(".")
    if head not in fields:
        return f"'{head}' is not a field"
    if not rest:
        return None
    pack_names = _annotation_class_names(fields[head]) & packs.keys()
    if not pack_names:
        return f"'{head}' is not a @parameterPack, so '{name}' cannot name a sub-field"
    for pack in pack_names:
        if _resolve_parameter(rest, packs[pack], packs) is None:
            return None
    return f"'{rest}' is not a field of {'/'.join(sorted(pack_names))}"


def check_parameter_names(module_dir: Path) -> list[Problem]:
    module_dir = Path(module_dir)
    ui = _ui_path(module_dir)
    if not ui.is_file():
        return []  # nothing to bind (a missing .ui that is used is reported by ui-names)
    ui, problems = _load_ui(module_dir, "parameter-names")
    if problems:
        return problems
    bindings = ui_parameter_names(ui)
    if not bindings:
        return []
    wrappers, packs = parameter_classes(module_dir)
    if not wrappers:
        return [Problem("parameter-names", _rel(ui), bindings[0][1],
                        f"{ui.name} binds widgets with SlicerParameterName but no class decorated with "
                        f"@parameterNodeWrapper was found in the module's Python files")]
    fields: dict = {}
    for f in wrappers.values():
        fields.update(f)
    out = []
    for value, line, widget in bindings:
        if not value:
            out.append(Problem("parameter-names", _rel(ui), line, f"widget '{widget}' has an empty "
                                                                  f"SlicerParameterName"))
            continue
        why = _resolve_parameter(value, fields, packs)
        if why is not None:
            out.append(Problem("parameter-names", _rel(ui), line,
                               f"widget '{widget}' has SlicerParameterName '{value}': {why} of the parameter "
                               f"node wrapper {'/'.join(sorted(wrappers))} (fields: {', '.join(sorted(fields))})"))
    return out


# ---------------------------------------------------------------------------------------------------
# CMake (a small reader: commands, arguments, ${VAR} expansion of set() variables)


@dataclass
class CMakeCommand:
    name: str
    args: list[str]
    line: int


_CMAKE_TOKEN = re.compile(
    r"""(?P<bracket_comment>\#\[(?P<eq1>=*)\[.*?\](?P=eq1)\])
      |(?P<comment>\#[^\n]*)
      |(?P<bracket_arg>\[(?P<eq2>=*)\[.*?\](?P=eq2)\])
      |(?P<quoted>"(?:\\.|[^"\\])*")
      |(?P<open>\()
      |(?P<close>\))
      |(?P<newline>\n)
      |(?P<space>[ \t\r]+)
      |(?P<word>(?:\\.|[^\s()#"\\])(?:\\.|[^\s()"\\])*)
    """,
    re.VERBOSE | re.DOTALL,
)


def parse_cmake(text: str) -> list[CMakeCommand]:
    """Commands of a CMake file with their raw arguments (quotes removed, nesting flattened)."""
    commands: list[CMakeCommand] = []
    line = 1
    pos = 0
    current: CMakeCommand | None = None
    depth = 0
    pending_name: tuple[str, int] | None = None
    while pos < len(text):
        m = _CMAKE_TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"cannot read CMake text at line {line}: {text[pos:pos + 20]!r}")
        kind = m.lastgroup if m.lastgroup not in {"eq1", "eq2"} else None
        tok = m.group(0)
        if kind is None:  # lastgroup points at a back-reference group: find the real one
            kind = next(k for k in ("bracket_comment", "bracket_arg") if m.group(k))
        if current is None:
            if kind == "word":
                pending_name = (tok, line)
            elif kind == "open" and pending_name is not None:
                current = CMakeCommand(pending_name[0], [], pending_name[1])
                depth = 1
                pending_name = None
            elif kind not in {"space", "newline", "comment", "bracket_comment"}:
                pending_name = None
        else:
            if kind == "open":
                depth += 1
            elif kind == "close":
                depth -= 1
                if depth == 0:
                    commands.append(current)
                    current = None
            elif kind == "quoted":
                current.args.append(tok[1:-1].replace('\\"', '"'))
            elif kind == "bracket_arg":
                current.args.append(tok[tok.index("[", 1) + 1: tok.rindex("]", 0, -1)])
            elif kind == "word":
                current.args.append(tok)
        line += tok.count("\n")
        pos = m.end()
    if current is not None:
        raise ValueError(f"unterminated CMake command {current.name}( starting at line {current.line}")
    return commands


_VAR_REF = re.compile(r"\$\{([A-Za-z0-9_.+-]+)\}")


def _expand(arg: str, variables: dict[str, list[str]]) -> list[str]:
    """Expand ${VAR} references; an unquoted reference to a list splits into its items."""
    for _ in range(10):  # nested references
        new = _VAR_REF.sub(lambda m: ";".join(variables[m.group(1)]) if m.group(1) in variables else m.group(0), arg)
        if new == arg:
            break
        arg = new
    return [a for a in arg.split(";") if a]


def _expanded_commands(path: Path) -> list[CMakeCommand]:
    """Commands with set() variables expanded in order (enough for module CMakeLists files)."""
    variables: dict[str, list[str]] = {}
    out = []
    for cmd in parse_cmake(Path(path).read_text(encoding="utf-8")):
        args = [item for a in cmd.args for item in _expand(a, variables)]
        if cmd.name.lower() == "set" and args:
            variables[args[0]] = [a for a in args[1:] if a != "PARENT_SCOPE"]
        out.append(CMakeCommand(cmd.name, args, cmd.line))
    return out


# ---------------------------------------------------------------------------------------------------
# c) every file listed in the module's CMakeLists.txt


def cmake_listed_files(cmake_path: Path) -> tuple[dict[str, int], int]:
    """({listed path: line} from SCRIPTS and RESOURCES of slicerMacroBuildScriptedModule, macro line)."""
    listed: dict[str, int] = {}
    macro_line = 0
    for cmd in _expanded_commands(cmake_path):
        if cmd.name.lower() != "slicermacrobuildscriptedmodule":
            continue
        macro_line = cmd.line
        section = None
        for a in cmd.args:
            if a in _MACRO_KEYWORDS:
                section = a
            elif section in {"SCRIPTS", "RESOURCES"}:
                listed.setdefault(_normalise_listed(a), cmd.line)
    return listed, macro_line


def _normalise_listed(entry: str) -> str:
    for prefix in ("${CMAKE_CURRENT_SOURCE_DIR}/", "./"):
        if entry.startswith(prefix):
            entry = entry[len(prefix):]
    return Path(entry).as_posix()


def check_cmake_listing(module_dir: Path) -> list[Problem]:
    module_dir = Path(module_dir)
    cmake = module_dir / "CMakeLists.txt"
    if not cmake.is_file():
        return [Problem("cmake-listing", _rel(cmake), 0, f"module folder {module_name(module_dir)} has no "
                                                          f"CMakeLists.txt")]
    try:
        listed, macro_line = cmake_listed_files(cmake)
    except ValueError as exc:
        return [Problem("cmake-listing", _rel(cmake), 0, str(exc))]
    if not macro_line:
        return [Problem("cmake-listing", _rel(cmake), 0, "no slicerMacroBuildScriptedModule(...) call, so "
                                                         "nothing of the module would be packaged")]
    out = []
    for rel in module_files(module_dir):
        if rel.as_posix() not in listed:
            kind = "MODULE_PYTHON_SCRIPTS" if rel.suffix == ".py" else "MODULE_PYTHON_RESOURCES"
            out.append(Problem("cmake-listing", _rel(module_dir / rel), 0,
                               f"{rel.as_posix()} is not listed in {_rel(cmake)} (add it to {kind}); unlisted "
                               f"files are left out of the Slicer package"))
    for entry, line in listed.items():
        if not (module_dir / entry).is_file():
            out.append(Problem("cmake-listing", _rel(cmake), line, f"{entry} is listed but does not exist"))
    return out


# ---------------------------------------------------------------------------------------------------
# d) every module .py compiles


def check_compiles(module_dir: Path) -> list[Problem]:
    out = []
    for path in python_files(module_dir, include_testing=True):
        try:
            # compile() in memory: nothing is written next to the sources.
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except SyntaxError as exc:
            out.append(Problem("compile", _rel(path), exc.lineno or 0, f"does not compile: {exc.msg}"))
        except ValueError as exc:  # null bytes
            out.append(Problem("compile", _rel(path), 0, f"does not compile: {exc}"))
    return out


# ---------------------------------------------------------------------------------------------------
# e) the Logic imports without qt / ctk

_IMPORT_PROBE = textwrap.dedent(
    """
    import importlib, sys, traceback
    # Make the Qt wrappers unimportable, as outside the Slicer application.
    sys.modules["qt"] = None
    sys.modules["ctk"] = None
    sys.path.insert(0, sys.argv[1])
    try:
        importlib.import_module(sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    """
)


def _qt_imports(tree: ast.AST) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in _QT_MODULES:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in _QT_MODULES:
                yield node.module, node.lineno


def check_logic_imports(module_dir: Path, python: str | None = None, timeout_s: float = 120.0) -> list[Problem]:
    module_dir = Path(module_dir).resolve()
    name = module_name(module_dir)
    logic = module_dir / f"{name}Lib" / "logic.py"
    if not logic.is_file():
        return [Problem("logic-no-qt", _rel(logic), 0, f"missing the Logic file {name}Lib/logic.py")]
    out = []
    tree = _parse_python(logic)
    if tree is not None:
        for mod, line in _qt_imports(tree):
            out.append(Problem("logic-no-qt", _rel(logic), line, f"the Logic imports '{mod}'; it must run "
                                                                  f"outside the Slicer application (no qt/ctk)"))
    else:
        return out  # the compile check reports the syntax error
    error = _import_probe(module_dir, f"{name}Lib.logic", python or sys.executable, timeout_s)
    if error is not None:
        out.append(Problem("logic-no-qt", _rel(logic), 0, f"{name}Lib.logic does not import without qt/ctk: {error}"))
    return out


def _module_for_name(module_dir: Path, dotted: str) -> list[Path]:
    """Files of the module folder that importing `dotted` executes (package __init__ files included)."""
    parts = dotted.split(".")
    out = []
    for i in range(1, len(parts) + 1):
        base = module_dir.joinpath(*parts[:i])
        if (base / "__init__.py").is_file():
            out.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            out.append(base.with_suffix(".py"))
    return out


def local_import_closure(module_dir: Path, dotted: str) -> list[Path]:
    """The module folder's own files that importing `dotted` can reach, by following imports in the AST."""
    module_dir = Path(module_dir)
    seen: dict[Path, None] = {}
    todo = [(dotted, p) for p in _module_for_name(module_dir, dotted)]
    while todo:
        name, path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        tree = _parse_python(path)
        if tree is None:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".") if package else []
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import name` may import the submodule pkg.name.
                targets = [base] + [f"{base}.{a.name}" if base else a.name for a in node.names]
            for t in targets:
                if t:
                    todo += [(".".join(t.split(".")[: i + 1]), p) for i, p in enumerate(_module_for_name(module_dir, t))]
    return sorted(seen)


# Import results by (interpreter, import name, digest of the files the import can reach): the import
# probe starts a fresh interpreter that loads slicer and vtk (seconds), and checking several module
# variants with the same Logic need not pay that again.
_IMPORT_CACHE: dict[tuple[str, str, str], str | None] = {}


def _import_probe(module_dir: Path, dotted: str, python: str, timeout_s: float) -> str | None:
    digest = hashlib.sha256()
    for path in local_import_closure(module_dir, dotted):
        digest.update(path.relative_to(module_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    key = (python, dotted, digest.hexdigest())
    if key not in _IMPORT_CACHE:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # nothing written into the module folder
        proc = subprocess.run([python, "-c", _IMPORT_PROBE, str(module_dir), dotted], capture_output=True,
                              text=True, timeout=timeout_s, env=env, cwd=str(REPO_ROOT))
        if proc.returncode == 0:
            _IMPORT_CACHE[key] = None
        else:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            _IMPORT_CACHE[key] = lines[-1] if lines else f"exit status {proc.returncode}"
    return _IMPORT_CACHE[key]


def check_module(module_dir: Path, python: str | None = None) -> list[Problem]:
    """Checks a) to e) on one module folder."""
    module_dir = Path(module_dir)
    if not module_dir.is_dir():
        return [Problem("module", str(module_dir), 0, "is not a module folder")]
    return (check_ui_names(module_dir) + check_parameter_names(module_dir) + check_cmake_listing(module_dir)
            + check_compiles(module_dir) + check_logic_imports(module_dir, python))


# ---------------------------------------------------------------------------------------------------
# f) the top CMakeLists.txt installs the engine and the models


@dataclass
class InstallRule:
    source: str  # as written, normalised: relative to the source dir, no trailing slash
    keeps_folder: bool  # False when written with a trailing slash (installs the contents only)
    destination: str
    component: str | None
    excluded_patterns: list[str]
    line: int

    @property
    def installed_as(self) -> str:
        dest = self.destination.rstrip("/")
        return f"{dest}/{Path(self.source).name}" if self.keeps_folder else dest


def install_directory_rules(cmake_path: Path) -> list[InstallRule]:
    return [rule for cmd in parse_cmake(Path(cmake_path).read_text(encoding="utf-8"))
            for rule in _install_directory_rules(cmd)]


def _install_directory_rules(cmd: CMakeCommand) -> list[InstallRule]:
    rules = []
    if cmd.name.lower() == "install" and cmd.args[:1] == ["DIRECTORY"]:
        args = cmd.args[1:]
        keywords = {"DESTINATION", "COMPONENT", "PATTERN", "REGEX", "FILES_MATCHING", "USE_SOURCE_PERMISSIONS",
                    "FILE_PERMISSIONS", "DIRECTORY_PERMISSIONS", "CONFIGURATIONS", "OPTIONAL", "MESSAGE_NEVER",
                    "EXCLUDE_FROM_ALL", "TYPE", "PERMISSIONS", "EXCLUDE"}
        sources, i = [], 0
        while i < len(args) and args[i] not in keywords:
            sources.append(args[i])
            i += 1
        destination = component = None
        excluded: list[str] = []
        while i < len(args):
            a = args[i]
            if a == "DESTINATION" and i + 1 < len(args):
                destination = args[i + 1]
                i += 2
            elif a == "COMPONENT" and i + 1 < len(args):
                component = args[i + 1]
                i += 2
            elif a in {"PATTERN", "REGEX"} and i + 1 < len(args):
                pattern = args[i + 1]
                j = i + 2
                # A PATTERN's options run to the next PATTERN/REGEX; EXCLUDE among them drops the match.
                while j < len(args) and args[j] not in {"PATTERN", "REGEX", "DESTINATION", "COMPONENT"}:
                    if args[j] == "EXCLUDE":
                        excluded.append(pattern)
                    j += 1
                i = j
            else:
                i += 1
        for src in sources:
            norm = _normalise_listed(src)
            rules.append(InstallRule(norm.rstrip("/"), not src.endswith("/"), destination or "", component,
                                     excluded, cmd.line))
    return rules


_COMPILE_KEYWORDS = {"NAME", "TARGET_NAME", "DESTINATION_DIR", "INSTALL_DIR", "SOURCE_DIR", "NO_INSTALL_SUBDIR",
                     "GLOBAL_TARGET", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE", "TARGET_LIBRARIES"}


def _cmake_variables(path: Path, variables: dict[str, list[str]]) -> list[CMakeCommand]:
    """Commands with set() and file(GLOB[_RECURSE] VAR [RELATIVE dir] patterns...) evaluated in order."""
    out = []
    for cmd in parse_cmake(Path(path).read_text(encoding="utf-8")):
        args = [item for a in cmd.args for item in _expand(a, variables)]
        name = cmd.name.lower()
        if name == "set" and args:
            variables[args[0]] = [a for a in args[1:] if a != "PARENT_SCOPE"]
        elif name == "file" and args and args[0] in {"GLOB", "GLOB_RECURSE"} and len(args) > 1:
            rest = args[2:]
            relative = None
            if rest[:1] == ["RELATIVE"] and len(rest) > 1:
                relative, rest = Path(rest[1]), rest[2:]
            files = set()
            for pattern in (r for r in rest if r not in {"LIST_DIRECTORIES", "true", "false", "CONFIGURE_DEPENDS"}):
                base, _, glob = pattern.rpartition("/")
                found = (Path(base).rglob(glob) if args[0] == "GLOB_RECURSE" else Path(base).glob(glob))
                files |= {f for f in found if f.is_file() and "__pycache__" not in f.parts}
            variables[args[1]] = sorted(f.relative_to(relative).as_posix() if relative else str(f) for f in files)
        out.append(CMakeCommand(cmd.name, args, cmd.line))
    return out


def cmake_layout(root: Path = REPO_ROOT, tree: str = "install", top_cmake: Path | None = None) -> dict[str, Path]:
    """{path in the scripted-modules folder: source file} of the build tree ("build") or the install
    tree ("install"), from the top CMakeLists.txt and the module folders it adds:
    slicerMacroBuildScriptedModule and ctkMacroCompilePythonScript copy SCRIPTS and RESOURCES (relative
    to their CMakeLists.txt) into both trees; install(DIRECTORY) adds to the install tree only."""
    root = Path(root)
    layout: dict[str, Path] = {}

    def read(cmake: Path, source_dir: Path) -> None:
        variables = {"CMAKE_CURRENT_SOURCE_DIR": [str(source_dir)], "CMAKE_SOURCE_DIR": [str(root)]}
        for cmd in _cmake_variables(cmake, variables):
            name = cmd.name.lower()
            if name == "add_subdirectory" and cmd.args and (source_dir / cmd.args[0] / "CMakeLists.txt").is_file():
                read(source_dir / cmd.args[0] / "CMakeLists.txt", source_dir / cmd.args[0])
            elif name in {"slicermacrobuildscriptedmodule", "ctkmacrocompilepythonscript"}:
                if name == "ctkmacrocompilepythonscript" and not _compiles_into_scripted_modules(cmd.args, tree):
                    continue
                section = None
                for a in cmd.args:
                    if a in {"SCRIPTS", "RESOURCES"}:
                        section = a
                    elif a in _COMPILE_KEYWORDS:
                        section = None
                    elif section:
                        rel = _normalise_listed(a.replace(str(source_dir) + "/", ""))
                        layout[rel] = source_dir / rel
            elif name == "install" and tree == "install" and cmd.args[:1] == ["DIRECTORY"]:
                for rule in _install_directory_rules(cmd):
                    if "QTSCRIPTEDMODULES_LIB_DIR" not in rule.destination:
                        continue
                    src = root / rule.source
                    prefix = rule.installed_as.split("QTSCRIPTEDMODULES_LIB_DIR}", 1)[1].strip("/")
                    for f in src.rglob("*"):
                        if f.is_file() and "__pycache__" not in f.parts and not f.name.startswith("."):
                            layout[f"{prefix}/{f.relative_to(src).as_posix()}".strip("/")] = f

    read(Path(top_cmake) if top_cmake is not None else root / "CMakeLists.txt", root)
    return layout


def _compiles_into_scripted_modules(args: list[str], tree: str) -> bool:
    """ctkMacroCompilePythonScript copies into DESTINATION_DIR (the build tree) and installs that whole
    folder into INSTALL_DIR, its contents only with NO_INSTALL_SUBDIR (CTK's ctkMacroCompilePythonScript)."""
    def value(key):
        return args[args.index(key) + 1] if key in args[:-1] else ""

    if tree == "build":
        return "QTSCRIPTEDMODULES_LIB_DIR" in value("DESTINATION_DIR")
    return "QTSCRIPTEDMODULES_LIB_DIR" in value("INSTALL_DIR") and "NO_INSTALL_SUBDIR" in args


def check_install_rules(top_cmake: Path, source_root: Path | None = None) -> list[Problem]:
    """The engine and the models sit beside the module files in the install tree the CMake rules
    produce; install(DIRECTORY) rules among them use COMPONENT RuntimeLibraries and skip __pycache__."""
    top_cmake = Path(top_cmake)
    rel = _rel(top_cmake)
    if not top_cmake.is_file():
        return [Problem("install-rules", rel, 0, "the extension's top CMakeLists.txt does not exist")]
    root = Path(source_root) if source_root is not None else top_cmake.parent
    try:
        layout = cmake_layout(root, "install", top_cmake)
        rules = install_directory_rules(top_cmake)
    except ValueError as exc:
        return [Problem("install-rules", rel, 0, str(exc))]
    out = []
    for source, why in (
        (ENGINE_DIR, "so installed modules can import the engine"),
        (MODELS_DIR, "where the engine's registry looks for weights (beside ultrasound_ai/)"),
    ):
        expected = f"{INSTALL_DIR_VAR}/{source}"
        wanted = {f"{source}/{p.relative_to(root / source).as_posix()}" for p in (root / source).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
                  and p.suffix in ({".py"} if source == ENGINE_DIR else {".pt", ".json"})}
        if not wanted or not wanted <= set(layout):
            placed = [r for r in rules if r.source == source]
            where = f" (install(DIRECTORY {source}) puts it at {placed[0].installed_as})" if placed else ""
            out.append(Problem("install-rules", rel, placed[0].line if placed else 0,
                               f"{source}/ is not installed as {expected}{where} {why}"))
        for r in (r for r in rules if r.source == source):
            if r.component != "RuntimeLibraries":
                out.append(Problem("install-rules", rel, r.line, f"install(DIRECTORY {source}) has COMPONENT "
                                                                 f"{r.component}, expected RuntimeLibraries (the "
                                                                 f"component Slicer's extension package contains)"))
            if "__pycache__" not in r.excluded_patterns:
                out.append(Problem("install-rules", rel, r.line, f"install(DIRECTORY {source}) must exclude "
                                                                 f"__pycache__ (PATTERN \"__pycache__\" EXCLUDE)"))
    return out


def check_subdirectories(top_cmake: Path, module_names: Iterable[str]) -> list[Problem]:
    top_cmake = Path(top_cmake)
    if not top_cmake.is_file():
        return []  # reported by install-rules
    added = {c.args[0].rstrip("/") for c in parse_cmake(top_cmake.read_text(encoding="utf-8"))
             if c.name.lower() == "add_subdirectory" and c.args}
    return [Problem("subdirectories", _rel(top_cmake), 0, f"module folder {m} is not added with "
                                                          f"add_subdirectory({m})")
            for m in module_names if m not in added]


# ---------------------------------------------------------------------------------------------------


def find_module_dirs(root: Path = REPO_ROOT) -> list[Path]:
    """Folders at the repository root whose CMakeLists.txt builds a scripted module."""
    out = []
    for d in sorted(Path(root).iterdir()):
        cmake = d / "CMakeLists.txt"
        if d.is_dir() and cmake.is_file() and "slicerMacroBuildScriptedModule" in cmake.read_text(encoding="utf-8"):
            out.append(d)
    return out


def run_checks(module_dirs: Iterable[Path], top_cmake: Path | None = None, python: str | None = None) -> list[Problem]:
    module_dirs = [Path(d) for d in module_dirs]
    problems: list[Problem] = []
    for d in module_dirs:
        problems += check_module(d, python)
    if top_cmake is not None:
        problems += check_install_rules(top_cmake)
        problems += check_subdirectories(top_cmake, [module_name(d) for d in module_dirs])
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", type=Path, help="module folders (default: all at the repo root)")
    parser.add_argument("--top", type=Path, default=REPO_ROOT / "CMakeLists.txt",
                        help="the extension's top CMakeLists.txt (default: the repository's)")
    parser.add_argument("--no-top", action="store_true", help="skip the top CMakeLists.txt checks")
    parser.add_argument("--python", default=None, help="interpreter for the Logic import check "
                                                       "(default: this one)")
    args = parser.parse_args(argv)
    modules = args.modules or find_module_dirs()
    problems = run_checks(modules, None if args.no_top else args.top, args.python)
    for p in problems:
        print(p)
    checked = ", ".join(module_name(m) for m in modules) or "no module folders"
    top = "" if args.no_top else f" and {_rel(args.top)}"
    if problems:
        print(f"{len(problems)} problem(s) in {checked}{top}", file=sys.stderr)
        return 1
    print(f"ok: {checked}{top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
