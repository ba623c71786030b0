"""The in-Slicer dependency installer: its decisions (what it installs, through what, what it refuses)
and the installer calls it makes, all without installing anything."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.mrml import dependencies as deps

REPO = Path(__file__).resolve().parents[2]

ALL_PRESENT = {
    "numpy": "1.26.4", "scipy": "1.13.1", "torch": "2.5.1+cu121", "SimpleITK": "2.3.1", "h5py": "3.11.0",
    "scikit-image": "0.24.0", "vtk": "9.3.0", "tqdm": "4.66.4", "psutil": "6.0.0", "PyYAML": "6.0.1",
}
PINS = ["numpy==1.26.4", "SimpleITK==2.3.1", "vtk==9.3.0"]


def with_(**changes):
    versions = dict(ALL_PRESENT)
    for name, version in changes.items():
        versions[name.replace("_", "-")] = version
    return versions


def plan(versions):
    return deps.plan_dependencies(deps.ENGINE_REQUIREMENTS, versions)


# --------------------------------------------------------------------------------------------------
# Decisions


def test_all_present_installs_nothing():
    p = plan(ALL_PRESENT)
    assert p.nothing_to_install and p.torch is None and p.pip == () and p.refused == ()
    assert len(p.satisfied) == len(deps.ENGINE_REQUIREMENTS)
    # Named as the requirement spells them, whatever the spelling of the installed metadata.
    assert {"torch 2.5.1+cu121", "pyyaml 6.0.1", "SimpleITK 2.3.1", "scikit-image 0.24.0"} <= set(p.satisfied)
    assert list(p.constraints) == PINS + ["torch==2.5.1+cu121"]
    assert not p.needs_restart


def test_missing_h5py_goes_to_pip_only():
    versions = with_(h5py=None)
    p = plan(versions)
    assert p.pip == ("h5py>=3.8",) and p.torch is None and p.refused == ()
    assert not p.needs_restart
    # Absent from the mapping altogether means missing too.
    del versions["h5py"]
    assert plan(versions).pip == ("h5py>=3.8",)


def test_outdated_pip_package_is_upgraded_and_asks_for_restart():
    p = plan(with_(scikit_image="0.19.3", tqdm="4.59.0"))
    assert p.pip == ("scikit-image>=0.21", "tqdm>=4.60")
    assert p.upgrades == ("scikit-image", "tqdm") and p.needs_restart


def test_outdated_torch_goes_to_pytorchutils_never_pip():
    p = plan(with_(torch="2.1.2"))
    assert p.torch == ">=2.4" and p.pip == ()
    assert p.upgrades == ("torch",) and p.needs_restart
    # The old torch is not pinned: it is about to be replaced.
    assert list(p.constraints) == PINS


def test_missing_torch_goes_to_pytorchutils():
    p = plan(with_(torch=None))
    assert p.torch == ">=2.4" and p.pip == () and not p.needs_restart
    assert all(not c.startswith("torch") for c in p.constraints)


def test_torch_prerelease_and_local_versions():
    assert plan(with_(torch="2.4.0rc1")).torch == ">=2.4"  # a release candidate is older than 2.4
    assert plan(with_(torch="2.4.0+cpu")).torch is None
    assert plan(with_(torch="2.13.0+cpu")).torch is None  # 13 > 4 numerically, not as text
    assert plan(with_(torch="10.0")).torch is None


@pytest.mark.parametrize("name, version", [("numpy", "1.23.5"), ("numpy", None), ("SimpleITK", "2.2.1"),
                                           ("SimpleITK", None), ("vtk", "9.1.0"), ("vtk", None)])
def test_protected_packages_are_refused_never_installed(name, version):
    p = plan(with_(**{name: version}))
    assert p.nothing_to_install and p.pip == () and p.torch is None
    (refusal,) = p.refused
    assert refusal.requirement.startswith(name) and refusal.installed == version
    assert f"never installs or replaces Slicer's own {name}" in refusal.reason
    assert ("is missing" in refusal.reason) == (version is None)
    # The installed protected packages are still pinned, whatever their version.
    expected = [f"{name}=={version}" if c.startswith(name + "==") else c for c in PINS]
    if version is None:
        expected = [c for c in expected if not c.startswith(name + "==")]
    assert [c for c in p.constraints if not c.startswith("torch")] == expected


def test_protected_names_in_any_spelling_never_reach_pip():
    p = deps.plan_dependencies(["NumPy>=99", "simpleitk>=99", "VTK>=99", "h5py"], {})
    assert p.pip == ("h5py",)
    assert [r.requirement for r in p.refused] == ["NumPy>=99", "simpleitk>=99", "VTK>=99"]


def test_bad_requirements_are_input_errors():
    for bad in ["", "numpy<2", "torch>=two", ">=2.4", "h5py>=3.8; python_version<'3.9'"]:
        with pytest.raises(InputError, match="requirement"):
            deps.parse_requirement(bad)
    assert deps.parse_requirement("torch >= 2.4") == deps.Requirement("torch", "2.4")


def test_version_ordering():
    key = deps.version_key
    assert key("2.4") == key("2.4.0") == key("2.4.0+cpu")
    assert key("2.4.0rc1") < key("2.4.0") < key("2.4.1") < key("2.13.0")
    assert key("1.26.4") < key("2.0.0.dev0") < key("2.0.0")
    assert key("not a version") is None
    assert not deps.satisfies("garbage", deps.Requirement("x", "1.0"))
    assert deps.satisfies("garbage", deps.Requirement("x"))  # any version meets a bare name


def test_requirements_agree_with_pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    normalise = lambda r: re.sub(r"\s+", "", r).lower()  # noqa: E731
    assert sorted(map(normalise, deps.ENGINE_REQUIREMENTS)) == sorted(map(normalise, project["dependencies"]))
    # Every protected package is an engine requirement (else protecting it means nothing).
    names = {deps.parse_requirement(r).key for r in deps.ENGINE_REQUIREMENTS}
    assert {deps.canonical_name(n) for n in deps.PROTECTED} <= names and deps.TORCH in names


def test_the_question_lists_everything():
    text = plan(with_(torch=None, h5py=None, numpy="1.23.5", scikit_image="0.19")).describe()
    assert "torch>=2.4" in text and "SlicerPyTorch" in text
    assert "h5py>=3.8, scikit-image>=0.21, installed with pip" in text
    assert "Not installed: numpy>=1.24" in text and "restarted" in text and text.rstrip().endswith("?")


# --------------------------------------------------------------------------------------------------
# ensure_dependencies: one question, then the installers, with exact arguments


class FakeInstaller:
    """Records calls and, like a real install, changes what the environment reports afterwards."""

    def __init__(self, env: dict, torch_result: bool = True, torch_version: str = "2.6.0+cpu"):
        self.env, self.torch_result, self.torch_version = env, torch_result, torch_version
        self.calls: list = []

    def install_torch(self, requirement):
        self.calls.append(("install_torch", requirement))
        if self.torch_result:
            self.env["torch"] = self.torch_version
        return self.torch_result

    def pip_install(self, requirements, constraints):
        self.calls.append(("pip_install", list(requirements), list(constraints)))
        for r in requirements:
            req = deps.parse_requirement(r)
            self.env[req.name] = "99.0"


def env_reader(env):
    def versions(names):
        lookup = {deps.canonical_name(k): v for k, v in env.items()}
        return {deps.canonical_name(n): lookup.get(deps.canonical_name(n)) for n in names}
    return versions


def test_ensure_installs_torch_then_pip_with_exact_arguments():
    env = with_(torch=None, h5py=None, scikit_image="0.19.3")
    installer = FakeInstaller(env)
    questions = []
    ok = deps.ensure_dependencies(ask=lambda q: questions.append(q) or True, installer=installer,
                                  versions=env_reader(env))
    assert ok is True and len(questions) == 1
    assert installer.calls == [
        ("install_torch", ">=2.4"),
        ("pip_install", ["h5py>=3.8", "scikit-image>=0.21"], PINS + ["torch==2.6.0+cpu"]),
    ]


def test_ensure_user_declines_installs_nothing():
    env = with_(torch=None, h5py=None)
    installer = FakeInstaller(env)
    questions = []
    ok = deps.ensure_dependencies(ask=lambda q: questions.append(q) or False, installer=installer,
                                  versions=env_reader(env))
    assert ok is False and installer.calls == [] and len(questions) == 1
    assert "torch>=2.4" in questions[0] and "h5py>=3.8" in questions[0]
    assert env["torch"] is None and env["h5py"] is None


def test_ensure_all_present_asks_nothing():
    installer = FakeInstaller(dict(ALL_PRESENT))
    ask = lambda q: pytest.fail("must not ask when nothing is missing")  # noqa: E731
    assert deps.ensure_dependencies(ask=ask, installer=installer, versions=env_reader(ALL_PRESENT)) is True
    assert installer.calls == []


def test_ensure_outdated_numpy_is_refused_not_installed(caplog):
    env = with_(numpy="1.23.5")
    installer = FakeInstaller(env)
    ask = lambda q: pytest.fail("nothing installable, so nothing to ask")  # noqa: E731
    with caplog.at_level("WARNING"):
        assert deps.ensure_dependencies(ask=ask, installer=installer, versions=env_reader(env)) is True
    assert installer.calls == [] and env["numpy"] == "1.23.5"
    assert "numpy>=1.24" in caplog.text


def test_ensure_outdated_numpy_with_missing_h5py_pins_the_old_numpy():
    env = with_(numpy="1.23.5", h5py=None)
    installer = FakeInstaller(env)
    assert deps.ensure_dependencies(ask=lambda q: True, installer=installer, versions=env_reader(env))
    assert installer.calls == [("pip_install", ["h5py>=3.8"],
                                ["numpy==1.23.5", "SimpleITK==2.3.1", "vtk==9.3.0", "torch==2.5.1+cu121"])]


def test_ensure_torch_install_aborted_skips_pip():
    env = with_(torch=None, h5py=None)
    installer = FakeInstaller(env, torch_result=False)
    assert deps.ensure_dependencies(ask=lambda q: True, installer=installer, versions=env_reader(env)) is False
    assert installer.calls == [("install_torch", ">=2.4")]


def test_ensure_reports_an_install_that_did_not_take():
    env = with_(torch="2.1.0")
    installer = FakeInstaller(env, torch_version="2.1.0")  # light-the-torch found nothing newer
    with pytest.raises(RuntimeError, match=r"torch>=2.4 is still not available"):
        deps.ensure_dependencies(ask=lambda q: True, installer=installer, versions=env_reader(env))


# --------------------------------------------------------------------------------------------------
# The Slicer installers, against slicer-core's slicer.util with pip_install and PyTorchUtils mocked


@pytest.fixture
def slicer_util(monkeypatch):
    slicer = pytest.importorskip("slicer")
    calls = []

    def pip_install(requirements, **kwargs):
        constraints = kwargs.get("constraints")
        if constraints is None and "--constraint" in requirements:
            constraints = requirements[requirements.index("--constraint") + 1]
        # The constraints file must exist while pip runs; record its content.
        content = Path(constraints).read_text() if constraints else None
        calls.append((list(requirements), kwargs, content))

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    return calls


def test_slicer_pip_install_passes_a_constraints_file_older_api(slicer_util, monkeypatch):
    monkeypatch.setattr(deps, "_slicer_has_packaging_api", lambda: False)
    deps.SlicerInstaller().pip_install(["h5py>=3.8", "tqdm>=4.60"], ["numpy==1.26.4", "vtk==9.3.0"])
    ((args, kwargs, content),) = slicer_util
    assert args[:3] == ["h5py>=3.8", "tqdm>=4.60", "--constraint"] and len(args) == 4 and kwargs == {}
    assert content == "numpy==1.26.4\nvtk==9.3.0\n"
    assert not Path(args[3]).exists()  # a temporary file, removed after the install


def test_slicer_pip_install_passes_constraints_by_keyword_newer_api(slicer_util, monkeypatch):
    monkeypatch.setattr(deps, "_slicer_has_packaging_api", lambda: True)
    deps.SlicerInstaller().pip_install(["h5py>=3.8"], ["numpy==2.0.1"])
    ((args, kwargs, content),) = slicer_util
    assert args == ["h5py>=3.8"] and set(kwargs) == {"constraints"} and content == "numpy==2.0.1\n"


def test_slicer_torch_install_goes_through_pytorchutils(monkeypatch):
    calls = []

    class PyTorchUtilsLogic:
        result = types.SimpleNamespace(__version__="2.6.0")

        def installTorch(self, *args, **kwargs):
            calls.append((args, kwargs))
            return self.result

    fake = types.ModuleType("PyTorchUtils")
    fake.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake)
    assert deps.SlicerInstaller().install_torch(">=2.4") is True
    assert calls == [((), {"askConfirmation": False, "torchVersionRequirement": ">=2.4"})]
    PyTorchUtilsLogic.result = None  # what installTorch returns when its install is aborted
    assert deps.SlicerInstaller().install_torch(">=2.4") is False


def test_slicer_torch_install_without_slicerpytorch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(RuntimeError, match="Extensions Manager"):
        deps.SlicerInstaller().install_torch(">=2.4")


def test_installed_versions_reads_metadata_without_importing():
    import numpy

    found = deps.installed_versions(["numpy", "PyYAML", "ultrasound-ai-no-such-package"])
    assert found["numpy"] == numpy.__version__
    assert found["pyyaml"] and found["ultrasound-ai-no-such-package"] is None


def test_protected_versions_without_pip_metadata_are_read_from_the_modules(monkeypatch):
    # Slicer's own builds of vtk and SimpleITK may have no pip metadata.
    real = deps.importlib.metadata.version

    def version(name):
        if deps.canonical_name(name) in {"vtk", "simpleitk"}:
            raise deps.importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(deps.importlib.metadata, "version", version)
    import SimpleITK
    from vtkmodules.vtkCommonCore import vtkVersion

    found = deps.installed_versions(["vtk", "SimpleITK"])
    assert found == {"vtk": vtkVersion.GetVTKVersion(), "simpleitk": SimpleITK.Version_VersionString()}
