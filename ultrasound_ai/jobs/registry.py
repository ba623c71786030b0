"""The table of tasks a job can run, imported lazily: a task's module is imported only when it runs.

A capability adds a task with one line in TASKS, "name": "package.module:function". The function has
the signature ``task(job: Job, ctx: TaskContext) -> dict`` (see ultrasound_ai.jobs.worker). Keep the
module path cheap to *name* but do the heavy imports (torch, SimpleITK) inside it, not here.

Extra tasks (tests, plug-ins) are not part of the engine's table. They come from the environment
variable ULTRASOUND_AI_EXTRA_TASKS, a comma-separated list of entries ``module:function=name`` (the
form ``name=module:function`` is accepted too); for example::

    ULTRASOUND_AI_EXTRA_TASKS="job_test_tasks:sleep_with_child=sleep_with_child,job_test_tasks:fail=fail"

The module must be importable by the worker (put its folder on PYTHONPATH). An extra task may not
shadow an engine task.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

from ultrasound_ai.core.errors import InputError

EXTRA_TASKS_ENV = "ULTRASOUND_AI_EXTRA_TASKS"

# name -> "module:function". One line per task.
TASKS: dict[str, str] = {
    "diagnostics": "ultrasound_ai.core.diagnostics:diagnostics_task",
    "foundation.classify": "ultrasound_ai.foundation.tasks:classify_task",
    "foundation.segment": "ultrasound_ai.foundation.tasks:segment_task",
    "freehand.reconstruct": "ultrasound_ai.freehand.tasks:reconstruct_task",
    "registration.register": "ultrasound_ai.registration.tasks:register_task",
    "ulm.process": "ultrasound_ai.ulm.tasks:process_task",
}

_HDF5 = (".h5", ".hdf5")
# ultrasound_ai.io.volume.WRITE_EXTENSIONS but .mhd: a header and a data file, which one temporary
# output cannot hold (use .mha, the same format in one file).
_VOLUME = (".nii.gz", ".nrrd", ".nii", ".mha")

# name -> {output name: extensions its writer supports}. The worker checks a job's outputs against
# this before the task starts (names and extensions), so a typo costs nothing but an error message.
OUTPUT_EXTENSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "diagnostics": {"report": (".json",)},
    "foundation.classify": {"table": (".csv",)},
    "foundation.segment": {"labels": (".png", ".nrrd", ".nii.gz", ".nii", ".mha"),
                           "probabilities": (".nrrd", ".nii.gz", ".nii", ".mha"), "table": (".csv",)},
    "freehand.reconstruct": {"estimate": _HDF5, "volume": _VOLUME, "png": (".png",)},
    "registration.register": {"transform": (".tfm", ".txt", ".h5"), "json": (".json",)},
    "ulm.process": {"result": _HDF5, "png": (".png",)},
}


def output_extensions(name: str) -> dict[str, tuple[str, ...]] | None:
    """The outputs task `name` writes and their extensions; None for a task outside the engine's table."""
    return OUTPUT_EXTENSIONS.get(name)


def _parse_target(target: str, where: str) -> str:
    module, sep, func = target.strip().partition(":")
    if not sep or not module or not func or not all(p.isidentifier() for p in module.split(".")) or not func.isidentifier():
        raise InputError(f"{where}: {target!r} is not of the form package.module:function")
    return f"{module}:{func}"


def extra_tasks(value: str | None = None) -> dict[str, str]:
    """Parse ULTRASOUND_AI_EXTRA_TASKS (or `value`); raise InputError naming the variable when malformed."""
    raw = os.environ.get(EXTRA_TASKS_ENV, "") if value is None else value
    table: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        left, sep, right = entry.partition("=")
        if not sep:
            raise InputError(f"{EXTRA_TASKS_ENV}: entry {entry!r} must look like module:function=name")
        # Task names never contain ':', targets always do, so both orders are unambiguous.
        target, name = (left, right) if ":" in left else (right, left)
        name = name.strip()
        if not name or ":" in name:
            raise InputError(f"{EXTRA_TASKS_ENV}: entry {entry!r} must look like module:function=name")
        if name in TASKS:
            raise InputError(f"{EXTRA_TASKS_ENV}: {name!r} would shadow the engine task of the same name")
        table[name] = _parse_target(target, EXTRA_TASKS_ENV)
    return table


def available_tasks() -> dict[str, str]:
    """Every task name a job may use now: the engine's table plus the extras from the environment."""
    table = dict(TASKS)
    table.update(extra_tasks())
    return table


def resolve_task(name: str) -> Callable:
    """Import and return the task function; InputError for an unknown name, listing the known ones."""
    table = available_tasks()
    if name not in table:
        raise InputError(f"unknown task {name!r}; available tasks: {', '.join(sorted(table))}")
    module_name, _, func_name = table[name].partition(":")
    module = importlib.import_module(module_name)
    try:
        func = getattr(module, func_name)
    except AttributeError:
        raise RuntimeError(f"task {name!r}: module {module_name} has no function {func_name}") from None
    if not callable(func):
        raise RuntimeError(f"task {name!r}: {module_name}.{func_name} is not callable")
    return func
