"""Install the engine's Python dependencies inside 3D Slicer, on first Apply, after asking the user.

A module Logic calls ``ensure_dependencies(ask=slicer.util.confirmOkCancelDisplay)`` before it starts
its first job. The decisions are a pure function, ``plan_dependencies``, tested without installing:

- torch is installed through SlicerPyTorch's ``PyTorchUtils`` (it picks the build matching the GPU
  driver, or the CPU build), never with pip;
- the other missing or outdated packages are installed with ``slicer.util.pip_install``, with a pip
  constraints file pinning Slicer's numpy, SimpleITK and vtk (and torch) at their installed versions,
  so pip cannot upgrade them as a side effect of resolving another package's dependencies (pip then
  picks versions that work with them, or fails without touching Slicer);
- numpy, SimpleITK and vtk are never installed or upgraded, even when missing or older than wanted:
  they are reported as refused, with the reason (replacing them breaks Slicer itself).

SlicerPyTorch's API (fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py):
``PyTorchUtilsLogic().installTorch(askConfirmation=False, forceComputationBackend=None,
torchVersionRequirement=None, torchvisionVersionRequirement=None)`` runs light-the-torch
(``ltt install torch<req> torchvision<req>``) and returns the ``torch`` module, or None when the user
declined its own confirmation; ``PyTorchUtilsLogic.torchInstalled()`` checks without importing.
We ask once ourselves, so it is called with ``askConfirmation=False``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import InputError

log = logging.getLogger(__name__)

# The engine's runtime requirements: the single list, kept equal to pyproject.toml's dependencies
# (a test compares them).
ENGINE_REQUIREMENTS: tuple[str, ...] = (
    "numpy>=1.24",
    "scipy>=1.10",
    "torch>=2.4",
    "SimpleITK>=2.3",
    "h5py>=3.8",
    "scikit-image>=0.21",
    "vtk>=9.2",
    "tqdm>=4.60",
    "psutil>=5.9",
    "pyyaml>=6.0",
)

# Slicer ships these built against its own libraries; a pip-installed copy breaks the application.
PROTECTED: tuple[str, ...] = ("numpy", "SimpleITK", "vtk")
TORCH = "torch"

# Where a protected package built into Slicer may have no pip metadata, its version is read from the
# module (already imported by Slicer, so this is cheap there).
def _module_version(module: str, *getters: str) -> Callable[[], str | None]:
    def read() -> str | None:
        mod = importlib.import_module(module)
        for getter in getters:
            obj = mod
            for part in getter.split("."):
                obj = getattr(obj, part, None)
            value = obj() if callable(obj) else obj
            if value:
                return str(value)
        return None
    return read


_VERSION_FROM_MODULE = {
    "numpy": ("numpy", _module_version("numpy", "__version__")),
    "simpleitk": ("SimpleITK", _module_version("SimpleITK", "__version__", "Version_VersionString")),
    "vtk": ("vtkmodules", _module_version("vtkmodules.vtkCommonCore", "vtkVersion.GetVTKVersion")),
}


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name: 'PyYAML' -> 'pyyaml', 'scikit_image' -> 'scikit-image'."""
    return re.sub(r"[-_.]+", "-", name).lower()


_PROTECTED_CANONICAL = {canonical_name(n) for n in PROTECTED}


@dataclass(frozen=True)
class Requirement:
    name: str
    minimum: str | None = None

    @property
    def key(self) -> str:
        return canonical_name(self.name)

    @property
    def specifier(self) -> str:
        return f">={self.minimum}" if self.minimum else ""

    def __str__(self) -> str:
        return f"{self.name}{self.specifier}"


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.+!_-]*))?\s*$")


def parse_requirement(text: str) -> Requirement:
    """'name' or 'name>=version' (the forms the engine's requirement list uses)."""
    m = _REQUIREMENT.match(text or "")
    if not m:
        raise InputError(f"requirement {text!r}: expected 'name' or 'name>=version'")
    if m.group(2) is not None and version_key(m.group(2)) is None:
        raise InputError(f"requirement {text!r}: {m.group(2)!r} is not a version number")
    return Requirement(m.group(1), m.group(2))


_VERSION = re.compile(r"^\s*v?(?:\d+!)?(\d+(?:\.\d+)*)(.*?)(?:\+[0-9A-Za-z.]*)?\s*$")


def version_key(version: str) -> tuple | None:
    """A sortable key for a PEP 440-ish version ('2.13.0+cpu', '2.5.0rc1', '9.3.20240617'), or None.

    Pre-releases (a, b, rc, dev) sort before their release; local labels (+cpu) are ignored.
    """
    m = _VERSION.match(version or "")
    if not m:
        return None
    release = [int(p) for p in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:  # 2.4 == 2.4.0
        release.pop()
    pre = re.search(r"(a|b|c|rc|alpha|beta|pre|preview|dev)", m.group(2), re.IGNORECASE)
    return (tuple(release), 0 if pre else 1)


def satisfies(installed: str | None, requirement: Requirement) -> bool:
    if installed is None:
        return False
    if requirement.minimum is None:
        return True
    have = version_key(installed)
    if have is None:
        return False  # an unreadable version cannot be shown to satisfy the requirement
    return have >= version_key(requirement.minimum)


@dataclass(frozen=True)
class Refusal:
    """A requirement the installer will not act on, and why."""

    requirement: str
    installed: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.requirement}: {self.reason}"


@dataclass(frozen=True)
class DependencyPlan:
    torch: str | None  # the version requirement handed to PyTorchUtils (">=2.4"), None: nothing to do
    pip: tuple[str, ...] = ()  # requirements for slicer.util.pip_install
    refused: tuple[Refusal, ...] = ()
    satisfied: tuple[str, ...] = ()  # "name version" of the requirements already met
    constraints: tuple[str, ...] = ()  # pip constraints: "numpy==1.26.4", ... (installed protected packages)
    upgrades: tuple[str, ...] = field(default=())  # installed but too old: a restart is needed after

    @property
    def nothing_to_install(self) -> bool:
        return self.torch is None and not self.pip

    @property
    def needs_restart(self) -> bool:
        # A module already imported in Slicer's interpreter (an older torch, say) stays loaded until restart.
        return bool(self.upgrades)

    def describe(self) -> str:
        """The text of the one question asked before installing."""
        lines = ["UltrasoundAI needs Python packages that are not installed yet in Slicer:"]
        if self.torch is not None:
            lines.append(f"  - torch{self.torch}, installed through the PyTorch extension (SlicerPyTorch), "
                         f"which picks the build for this computer's GPU or CPU")
        if self.pip:
            lines.append(f"  - {', '.join(self.pip)}, installed with pip")
        lines.append("Slicer's own " + ", ".join(PROTECTED) + " are kept as they are.")
        for r in self.refused:
            lines.append(f"Not installed: {r}")
        if self.needs_restart:
            lines.append(f"Slicer must be restarted afterwards ({', '.join(self.upgrades)} will be upgraded).")
        lines.append("This downloads packages from the internet and can take several minutes. Install now?")
        return "\n".join(lines)


def plan_dependencies(requirements: Iterable[str | Requirement],
                      installed_versions: Mapping[str, str | None]) -> DependencyPlan:
    """Decide what to install, through which installer, and what to refuse. Installs nothing.

    `installed_versions` maps project names (any spelling) to installed versions; a name that is absent
    or maps to None is not installed.
    """
    installed = {canonical_name(k): v for k, v in installed_versions.items()}
    torch = None
    pip: list[str] = []
    refused: list[Refusal] = []
    satisfied: list[str] = []
    upgrades: list[str] = []
    for item in requirements:
        req = item if isinstance(item, Requirement) else parse_requirement(item)
        have = installed.get(req.key)
        if satisfies(have, req):
            satisfied.append(f"{req.name} {have}")
            continue
        if req.key in _PROTECTED_CANONICAL:
            state = "is missing" if have is None else f"{have} is installed"
            refused.append(Refusal(str(req), have,
                                   f"{state}; UltrasoundAI never installs or replaces Slicer's own {req.name} "
                                   f"(a pip copy breaks Slicer) — use a Slicer version that provides it"))
            continue
        if have is not None:
            upgrades.append(req.name)
        if req.key == TORCH:
            torch = req.specifier or ""
        elif str(req) not in pip:
            pip.append(str(req))
    constraints = tuple(f"{name}=={installed[canonical_name(name)]}"
                        for name in (*PROTECTED, TORCH)
                        if installed.get(canonical_name(name)) is not None and not (name == TORCH and torch is not None))
    return DependencyPlan(torch=torch, pip=tuple(pip), refused=tuple(refused), satisfied=tuple(satisfied),
                          constraints=constraints, upgrades=tuple(upgrades))


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each project (None when absent), without importing torch or the like."""
    out: dict[str, str | None] = {}
    for name in names:
        key = canonical_name(name)
        try:
            out[key] = importlib.metadata.version(name)
            continue
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
        # Slicer's own builds of the protected packages may lack pip metadata; ask the module.
        if key in _VERSION_FROM_MODULE and importlib.util.find_spec(_VERSION_FROM_MODULE[key][0]) is not None:
            try:
                out[key] = _VERSION_FROM_MODULE[key][1]()
            except (ImportError, AttributeError, TypeError):
                out[key] = None
    return out


class Installer(Protocol):
    def install_torch(self, requirement: str) -> bool:
        """Install torch meeting `requirement` (e.g. '>=2.4'); False when it was not installed."""

    def pip_install(self, requirements: Sequence[str], constraints: Sequence[str]) -> None:
        """pip-install `requirements` under the constraint lines `constraints`."""


class SlicerInstaller:
    """The installers of the Slicer application: SlicerPyTorch for torch, slicer.util.pip_install."""

    def install_torch(self, requirement: str) -> bool:
        try:
            import PyTorchUtils  # the SlicerPyTorch extension, an EXTENSION_DEPENDS of UltrasoundAI
        except ImportError as exc:
            raise RuntimeError("UltrasoundAI needs the PyTorch extension (SlicerPyTorch) to install torch: "
                               "install 'PyTorch' from the Extensions Manager and restart Slicer") from exc
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=requirement)
        return torch is not None

    def pip_install(self, requirements: Sequence[str], constraints: Sequence[str]) -> None:
        import slicer

        requirements = list(requirements)
        if not requirements:
            return
        with tempfile.TemporaryDirectory(prefix="ultrasound-ai-pip-") as tmp_dir:
            args: list[str] = list(requirements)
            constraints_file = None
            if constraints:
                constraints_file = Path(tmp_dir) / "constraints.txt"
                with atomic_output(constraints_file) as tmp:
                    tmp.write_text("\n".join(constraints) + "\n", encoding="utf-8")
            if _slicer_has_packaging_api():
                # Slicer >= 5.11: slicer.packaging.pip_install takes the constraints file by keyword.
                kwargs = {"constraints": str(constraints_file)} if constraints_file else {}
                slicer.util.pip_install(args, **kwargs)
            else:
                # Older Slicer passes a list straight to `pip install`.
                if constraints_file:
                    args += ["--constraint", str(constraints_file)]
                slicer.util.pip_install(args)


def _slicer_has_packaging_api() -> bool:
    try:
        return importlib.util.find_spec("slicer.packaging") is not None
    except (ImportError, ValueError):
        return False


def ensure_dependencies(ask: Callable[[str], bool], installer: Installer | None = None,
                        requirements: Iterable[str] = ENGINE_REQUIREMENTS,
                        versions: Callable[[list[str]], Mapping[str, str | None]] = installed_versions) -> bool:
    """Make the engine's dependencies available, asking the user once. True when they are ready.

    Returns False, installing nothing, when the user declines (or SlicerPyTorch's install of torch is
    aborted). Refused packages (Slicer's own numpy, SimpleITK, vtk) are logged, never installed.
    Raises RuntimeError when an install finished but the requirement is still not met.
    """
    reqs = [r if isinstance(r, Requirement) else parse_requirement(r) for r in requirements]
    names = [r.name for r in reqs]
    plan = plan_dependencies(reqs, versions(names))
    for refusal in plan.refused:
        log.warning("UltrasoundAI dependency not installed: %s", refusal)
    if plan.nothing_to_install:
        return True
    if not ask(plan.describe()):
        log.info("UltrasoundAI: installing dependencies declined by the user")
        return False
    installer = installer if installer is not None else SlicerInstaller()
    constraints = list(plan.constraints)
    if plan.torch is not None:
        if not installer.install_torch(plan.torch):
            log.info("UltrasoundAI: torch was not installed")
            return False
        # Pin the torch just installed too, so pip cannot swap it for a PyPI build.
        torch_version = versions([TORCH]).get(TORCH)
        if torch_version:
            constraints.append(f"{TORCH}=={torch_version}")
    if plan.pip:
        installer.pip_install(list(plan.pip), constraints)
    after = plan_dependencies(reqs, versions(names))
    if not after.nothing_to_install:
        still = ([f"torch{after.torch}"] if after.torch is not None else []) + list(after.pip)
        raise RuntimeError(f"installing UltrasoundAI's dependencies finished but {', '.join(still)} "
                           f"{'is' if len(still) == 1 else 'are'} still not available; see the Python console")
    if plan.needs_restart:
        log.warning("UltrasoundAI: restart Slicer to use the upgraded %s", ", ".join(plan.upgrades))
    return True
