"""Choosing the torch device: `auto`, `cpu`, `cuda`, `cuda:N` or `mps` (docs/ARCHITECTURE.md, Conventions).

"auto" picks CUDA when it is available and the CPU otherwise. It never picks Apple's MPS on its own:
MPS lacks float64 and several operators the engine uses (complex FFTs for the frequency losses, some
grid-sample and scatter variants), and PyTorch either raises or silently falls back to the CPU for
them, so results or speed would differ from what the user asked for. MPS is used only when asked for
explicitly with `mps`.

torch is imported inside the functions so that CLI modules can add `--device` without importing it.
"""

from __future__ import annotations

import argparse
import re

from ultrasound_ai.core.errors import InputError

DEVICE_CHOICES_HELP = "auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps"

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """Devices present on this machine, e.g. ["cpu", "cuda:0", "cuda:1"] or ["cpu", "mps"]."""
    devices = ["cpu"]
    devices += [f"cuda:{n}" for n in range(_cuda_count())]
    if _mps_available():
        devices.append("mps")
    return devices


def _unavailable(spec, why: str) -> InputError:
    return InputError(f"device {spec!r}: {why}; available devices: {', '.join(available_devices())}")


def resolve_device(spec="auto"):
    """Turn a device spec into a `torch.device` that exists here, or raise InputError.

    spec: "auto" (or None), "cpu", "cuda", "cuda:N", "mps", or a torch.device. "cuda" means the current
    CUDA device (cuda:0 unless changed).
    """
    import torch

    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        return _check_torch_device(spec, str(spec))
    if not isinstance(spec, str):
        raise InputError(f"device {spec!r}: expected a string ({DEVICE_CHOICES_HELP}) or a torch.device")
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if _cuda_count() > 0 else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        return _check_torch_device(torch.device("mps"), spec)
    match = _CUDA_RE.match(text)
    if match:
        index = None if match.group(1) is None else int(match.group(1))
        return _check_torch_device(torch.device("cuda", index), spec)
    raise InputError(f"device {spec!r}: unknown device; expected {DEVICE_CHOICES_HELP}; "
                     f"available devices: {', '.join(available_devices())}")


def _check_torch_device(device, spec):
    import torch

    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        count = _cuda_count()
        if count == 0:
            raise _unavailable(spec, "CUDA is not available (no NVIDIA GPU, or a CPU-only PyTorch build)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise _unavailable(spec, f"there {'is' if count == 1 else 'are'} only {count} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise _unavailable(spec, "Apple MPS is not available (it needs macOS on Apple silicon)")
        return torch.device("mps")
    raise _unavailable(spec, f"device type {device.type!r} is not supported; expected {DEVICE_CHOICES_HELP}")


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> argparse.Action:
    """Add `--device` (a string, resolved later with `resolve_device`, so --help needs no torch)."""
    return parser.add_argument(
        "--device",
        default=default,
        metavar="DEVICE",
        help=f"compute device: {DEVICE_CHOICES_HELP} (default: {default})",
    )


def describe_device(device) -> str:
    """A one-line description for logs and diagnostics, e.g. 'cuda:0 (NVIDIA H100, 79.1 GiB)'."""
    import torch

    device = resolve_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
