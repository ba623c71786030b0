"""Memory estimates before big allocations: a clear error naming the option, not an allocator crash.

Callers estimate what an allocation will take from the sizes they are about to use (e.g. frames per
block x pixels x bytes x working copies) and call `check_memory` before allocating. When the estimate
exceeds what is available, the user gets an InputError (exit 2) naming the option that sets the
size, the estimate and what is available, instead of minutes of work followed by "can't allocate".
"""

from __future__ import annotations

from pathlib import Path

from ultrasound_ai.core.errors import InputError

# Leave some room for everything else (the GUI, the interpreter, fragmentation).
USABLE_FRACTION = 0.9


def _cgroup_limit_bytes() -> int | None:
    """Memory left under a cgroup v2 limit (containers, job schedulers), or None without one."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((base / "memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_memory_bytes(device: str | None = None) -> int | None:
    """Memory an allocation may take now: free memory on a CUDA device, else the host's available
    memory (and the container's remaining limit, if lower); None when it cannot be told."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        return None
    limit = _cgroup_limit_bytes()
    return available if limit is None else min(available, limit)


def format_bytes(nbytes: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def check_memory(nbytes: float, *, what: str, option: str, device: str | None = None,
                 available: int | None = None) -> None:
    """InputError naming `option` when `nbytes` (an estimate for `what`) exceeds the usable memory.

    `available` overrides the measured free memory (tests, or a caller that knows better).
    """
    if available is None:
        available = available_memory_bytes(device)
    if available is None:
        return
    if nbytes > USABLE_FRACTION * available:
        where = f"on {device}" if device is not None and str(device).startswith("cuda") else "in memory"
        raise InputError(f"{option}: {what} would need about {format_bytes(nbytes)}, but only "
                         f"{format_bytes(available)} is available {where}; lower {option}")
