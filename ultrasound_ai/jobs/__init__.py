"""Background jobs: run any engine task in a separate process with progress, result and cancel.

    from ultrasound_ai.jobs import JobLauncher, run_job
    launcher = JobLauncher({"task": "diagnostics", "inputs": {}, "outputs": {}}).start()
    ...  # launcher.drain() from a timer, launcher.progress, launcher.cancel()
    result = launcher.wait()

Worker: ``python -m ultrasound_ai.jobs run JOB.json --events PATH``. Tasks are listed in
ultrasound_ai.jobs.registry. Names are imported lazily so that starting a worker stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Job": "ultrasound_ai.jobs.protocol",
    "JobResult": "ultrasound_ai.jobs.protocol",
    "load_job": "ultrasound_ai.jobs.protocol",
    "parse_job": "ultrasound_ai.jobs.protocol",
    "TaskContext": "ultrasound_ai.jobs.worker",
    "execute": "ultrasound_ai.jobs.worker",
    "JobLauncher": "ultrasound_ai.jobs.launcher",
    "run_job": "ultrasound_ai.jobs.launcher",
    "find_python": "ultrasound_ai.jobs.launcher",
    "available_tasks": "ultrasound_ai.jobs.registry",
    "TASKS": "ultrasound_ai.jobs.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ultrasound_ai.jobs' has no attribute {name!r}")
