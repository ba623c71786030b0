"""How many torch/OpenMP threads to use, and how they wait (docs/ARCHITECTURE.md, Conventions).

A machine is never ours alone: Slicer's GUI runs beside every job, and other programs run beside the
CLI. Two things keep a CPU job from slowing down by an unbounded factor there:

- the thread count comes from the cores this process may run on (its affinity, which containers,
  `taskset` and job schedulers restrict), not from the machine's core count; one core is left for the
  GUI when the job was started from Slicer;
- OpenMP threads wait passively (`OMP_WAIT_POLICY=PASSIVE`): an OpenMP thread that spins while it
  waits for the others burns the very core the others need on a busy machine. OpenMP reads this once,
  when the runtime starts, so `apply_thread_policy` must run before torch is imported.

`--threads N` (CLI and job worker) overrides the choice; so does OMP_NUM_THREADS set by the user.
"""

from __future__ import annotations

import os
import sys

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS reports it, else the core count.

    Linux has os.sched_getaffinity; Windows reports the affinity through psutil; macOS has no affinity,
    so every logical core counts there.
    """
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    try:
        import psutil

        cores = psutil.Process().cpu_affinity()
        if cores:
            return len(cores)
    except (ImportError, AttributeError, NotImplementedError, OSError):
        pass
    return max(1, os.cpu_count() or 1)


def _env_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def choose_threads(requested: int | None = None, *, leave_free: int = 0) -> int:
    """The thread count: `requested` if given, else OMP_NUM_THREADS if the user set it, else the
    usable cores minus `leave_free` (at least 1)."""
    if requested is not None:
        return int(requested)
    from_env = _env_threads()
    if from_env is not None:
        return from_env
    return max(1, usable_cores() - int(leave_free))


def apply_thread_policy(threads: int) -> int:
    """Use `threads` threads in OpenMP, MKL, OpenBLAS and torch, waiting passively; returns it.

    Sets the environment for libraries not yet loaded (and for child processes); if torch is already
    imported its intra-op pool is resized too (the wait policy then applies only to later processes).
    """
    n = max(1, int(threads))
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def parse_threads(text: str) -> int:
    """argparse type for --threads: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"--threads: expected a positive integer, got {text!r}")
    return value
