"""What the engine runs on: versions, CPU, memory, CUDA/MPS devices and whether mamba_ssm works.

`collect_diagnostics()` never raises because of the environment: every probe that fails records
its reason instead (a support request must still produce a report on a broken install).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from typing import Any, Callable

from ultrasound_ai import __version__

# Packages reported by version: (import name, distribution name for importlib.metadata).
PACKAGES = [
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("torch", "torch"),
    ("SimpleITK", "SimpleITK"),
    ("h5py", "h5py"),
    ("vtk", "vtk"),
    ("skimage", "scikit-image"),
    ("psutil", "psutil"),
]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _distribution_version(dist: str) -> str | None:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or broken metadata
        return None


def _package_info(module_name: str, dist: str) -> dict[str, Any]:
    """Import the package (proves it works, not just that it is installed) and read its version."""
    try:
        if module_name == "vtk":
            # The full `vtk` module imports every kit (slow); the core kit carries the version.
            from vtkmodules.vtkCommonCore import vtkVersion

            return {"available": True, "version": vtkVersion.GetVTKVersion()}
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        return {"available": False, "version": _distribution_version(dist), "reason": _reason(exc)}
    version = getattr(module, "__version__", None) or _distribution_version(dist)
    return {"available": True, "version": str(version) if version is not None else None}


def _memory() -> dict[str, Any]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"total_bytes": int(vm.total), "available_bytes": int(vm.available)}
    except Exception as exc:  # noqa: BLE001
        return {"total_bytes": None, "available_bytes": None, "reason": _reason(exc)}


def _cpu() -> dict[str, Any]:
    info: dict[str, Any] = {"logical": os.cpu_count(), "physical": None, "processor": platform.processor() or None}
    try:
        import psutil

        info["physical"] = psutil.cpu_count(logical=False)
        if hasattr(os, "sched_getaffinity"):
            info["usable"] = len(os.sched_getaffinity(0))  # containers and taskset limit this
    except Exception:  # noqa: BLE001
        pass
    return info


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        return {"available": False, "reason": _reason(exc)}
    info: dict[str, Any] = {
        "available": True,
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,  # None for a CPU-only build
        "hip_build": getattr(torch.version, "hip", None),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": False,
        "cuda_device_count": 0,
        "cuda_devices": [],
    }
    try:
        info["cudnn_version"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001
        info["cudnn_version"] = None
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            info["cuda_device_count"] = torch.cuda.device_count()
            for index in range(info["cuda_device_count"]):
                info["cuda_devices"].append(_cuda_device(torch, index))
    except Exception as exc:  # noqa: BLE001 - e.g. a driver too old for this build
        info["cuda_error"] = _reason(exc)
    try:
        mps = getattr(torch.backends, "mps", None)
        info["mps_built"] = bool(mps is not None and mps.is_built())
        info["mps_available"] = bool(mps is not None and mps.is_available())
    except Exception as exc:  # noqa: BLE001
        info["mps_built"] = info["mps_available"] = False
        info["mps_error"] = _reason(exc)
    return info


def _cuda_device(torch, index: int) -> dict[str, Any]:
    device: dict[str, Any] = {"index": index}
    try:
        props = torch.cuda.get_device_properties(index)
        device.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            total_memory_bytes=int(props.total_memory),
            multiprocessors=int(getattr(props, "multi_processor_count", 0)) or None,
        )
        free, _total = torch.cuda.mem_get_info(index)
        device["free_memory_bytes"] = int(free)
    except Exception as exc:  # noqa: BLE001
        device["error"] = _reason(exc)
    return device


def _mamba_info(cuda_available: bool) -> dict[str, Any]:
    """mamba_ssm is optional and CUDA-only; a broken build must read as "not available", never crash."""
    info: dict[str, Any] = {"installed_version": _distribution_version("mamba-ssm") or _distribution_version("mamba_ssm")}
    try:
        module = importlib.import_module("mamba_ssm")
        # The selective-scan kernel is what the engine uses; its import loads the compiled extension.
        importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except BaseException as exc:  # noqa: BLE001 - broken CUDA extensions raise all sorts of things
        if isinstance(exc, KeyboardInterrupt):
            raise
        info.update(importable=False, available=False, reason=_reason(exc))
        return info
    info["importable"] = True
    info["version"] = getattr(module, "__version__", None) or info["installed_version"]
    info["available"] = bool(cuda_available)
    if not cuda_available:
        info["reason"] = "mamba_ssm imports but needs a CUDA device; the engine's PyTorch selective scan is used"
    return info


def _auto_device(torch_info: dict[str, Any]) -> str:
    # docs/ARCHITECTURE.md, Conventions (devices): "auto" is CUDA when available, else CPU.
    return "cuda" if torch_info.get("cuda_available") else "cpu"


def _inside_slicer() -> bool:
    slicer = sys.modules.get("slicer")
    return slicer is not None and getattr(slicer, "app", None) is not None


def collect_diagnostics(progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """A JSON-ready description of the engine's environment (see the module docstring)."""

    def step(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    step(0.0, "system")
    report: dict[str, Any] = {
        "engine": {"name": "ultrasound-ai", "version": __version__, "path": os.path.dirname(os.path.dirname(__file__))},
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "platform": platform.platform(),
        },
        "inside_slicer": _inside_slicer(),
        "cpu": _cpu(),
        "memory": _memory(),
    }
    step(0.1, "packages")
    packages: dict[str, Any] = {}
    plain = [(m, d) for m, d in PACKAGES if m != "torch"]  # torch gets its own, fuller section
    for i, (module_name, dist) in enumerate(plain):
        packages[dist] = _package_info(module_name, dist)
        step(0.1 + 0.5 * (i + 1) / len(plain), f"package {dist}")
    report["packages"] = packages
    step(0.6, "torch and devices")
    report["torch"] = _torch_info()
    packages["torch"] = {
        "available": report["torch"]["available"],
        "version": report["torch"].get("version"),
        **({"reason": report["torch"]["reason"]} if "reason" in report["torch"] else {}),
    }
    report["packages"] = {dist: packages[dist] for _, dist in PACKAGES}  # keep the listed order
    report["auto_device"] = _auto_device(report["torch"])
    step(0.85, "mamba_ssm")
    report["mamba_ssm"] = _mamba_info(bool(report["torch"].get("cuda_available")))
    step(1.0, "done")
    return report


def diagnostics_task(job, ctx) -> dict[str, Any]:
    """Job task "diagnostics": no inputs; optional output "report" (JSON); returns the report."""
    unexpected = sorted(set(job.inputs))
    if unexpected:
        from ultrasound_ai.core.errors import InputError

        raise InputError(f"diagnostics takes no inputs, got {unexpected}")
    report = collect_diagnostics(progress=lambda f, m: (ctx.check_cancelled(), ctx.progress(0.95 * f, m)))
    report["job_device"] = job.device
    if ctx.has_output("report"):
        ctx.output("report").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _human_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024.0
    return str(value)


def format_diagnostics(report: dict[str, Any]) -> str:
    """A readable two-column table of a diagnostics report."""
    rows: list[tuple[str, str]] = []

    def add(key: str, value: Any) -> None:
        rows.append((key, "" if value is None else str(value)))

    eng, py, plat, cpu, mem = (report.get(k, {}) for k in ("engine", "python", "platform", "cpu", "memory"))
    add("ultrasound-ai", f"{eng.get('version')}  ({eng.get('path')})")
    add("python", f"{py.get('version')} {py.get('implementation')}  ({py.get('executable')})")
    add("platform", plat.get("platform"))
    add("inside Slicer", "yes" if report.get("inside_slicer") else "no")
    cpus = f"{cpu.get('logical')} logical, {cpu.get('physical')} physical"
    if cpu.get("usable") is not None:
        cpus += f", {cpu.get('usable')} usable"
    add("CPU", cpus)
    add("memory", f"{_human_bytes(mem.get('total_bytes'))} total, {_human_bytes(mem.get('available_bytes'))} available")
    for dist, info in report.get("packages", {}).items():
        if info.get("available"):
            add(dist, info.get("version"))
        else:
            add(dist, f"NOT AVAILABLE ({info.get('reason')})")
    t = report.get("torch", {})
    if t.get("available"):
        add("torch CUDA build", t.get("cuda_build") or "none (CPU-only build)")
        add("CUDA available", "yes" if t.get("cuda_available") else "no")
        if t.get("cuda_error"):
            add("CUDA error", t["cuda_error"])
        for dev in t.get("cuda_devices", []):
            if "error" in dev:
                add(f"  cuda:{dev['index']}", f"error: {dev['error']}")
            else:
                add(
                    f"  cuda:{dev['index']}",
                    f"{dev.get('name')}, compute {dev.get('capability')}, "
                    f"{_human_bytes(dev.get('total_memory_bytes'))} total, "
                    f"{_human_bytes(dev.get('free_memory_bytes'))} free",
                )
        add("MPS available", "yes" if t.get("mps_available") else "no")
        add("torch threads", f"{t.get('num_threads')} intra-op, {t.get('num_interop_threads')} inter-op")
    add("device 'auto'", report.get("auto_device"))
    m = report.get("mamba_ssm", {})
    add("mamba_ssm", f"available {m.get('version')}" if m.get("available") else f"not available ({m.get('reason')})")
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
