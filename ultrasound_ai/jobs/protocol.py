"""The job file (JOB.json), the event messages and the job result: the contract between launcher and worker.

JOB.json is one JSON object::

    {"task": "diagnostics",                    # a name from ultrasound_ai.jobs.registry
     "inputs": {"name": "path", ...},          # files or folders that must exist
     "outputs": {"name": "path", ...},         # written atomically, only when the task succeeds
     "parameters": {...},                      # optional, default {}
     "device": "auto"}                         # optional: auto | cpu | cuda | cuda:N | mps

Relative paths are taken relative to the folder holding JOB.json (like a project file), so a job
folder can be moved as a whole. No other keys are allowed: a typo must not be silently ignored.

Events are JSON objects, one per line, UTF-8, each line flushed as soon as it is written, on a
channel of their own (never stdout). Every event has an "event" key:

    started    {"pid", "task", "device", "engine_version", "job", "threads"}
    progress   {"fraction" in [0, 1], never decreasing, "message"}
    log        {"message"}
    partial    {"name", "path"}   a temporary output is about to be written (the launcher removes it
                                  if the worker is killed before it could clean up); sent before
                                  the file exists, once per temporary name (names never nest)
    result     {"result": {...}, "outputs": {name: final path}}        then exit code 0
    error      {"message", "exit_code", "type", ["traceback"]}          then exit code 2 or 1
    cancelled  {"message", "exit_code": 3}                              then exit code 3

Exactly one of result / error / cancelled ends the stream. The outputs are in place before
"result" is sent; after it the job is finished and a cancel changes nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ultrasound_ai.core.errors import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, InputError

REQUIRED_KEYS = ("task", "inputs", "outputs")
OPTIONAL_KEYS = {"parameters": dict, "device": "auto"}
ALLOWED_KEYS = frozenset(REQUIRED_KEYS) | frozenset(OPTIONAL_KEYS)

# docs/ARCHITECTURE.md, Conventions (devices): every entry point accepts these spellings; whether the
# device is present is checked later, when a task asks for it (ultrasound_ai.core.device.resolve_device).
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")

TERMINAL_EVENTS = frozenset({"result", "error", "cancelled"})
EVENT_NAMES = frozenset({"started", "progress", "log", "partial"}) | TERMINAL_EVENTS

STATUS_PENDING = "pending"
STATUS_RUNNING = "running"
STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"
STATUS_CANCELLED = "cancelled"

__all__ = [
    "Job",
    "JobResult",
    "load_job",
    "parse_job",
    "job_to_dict",
    "encode_event",
    "decode_event",
    "to_jsonable",
    "number_parameter",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_BAD_INPUT",
    "EXIT_CANCELLED",
]


@dataclass(frozen=True)
class Job:
    """A validated job: absolute input and output paths, parameters and the requested device spec."""

    task: str
    inputs: dict[str, Path] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    path: Path | None = None  # the JOB.json it came from, when there is one


@dataclass
class JobResult:
    """What a finished job left: its status, exit code, the task's result and every event seen.

    `exit_code` is the job exit code (0, 1, 2, 3; 3 for every cancelled job, also one killed after the
    grace period); `returncode` is the worker process's own return code (negative signal number on
    POSIX when it was killed).
    """

    status: str
    exit_code: int
    result: dict | None = None
    error: str | None = None
    events: list[dict] = field(default_factory=list)
    stdout_tail: str = ""
    stderr_tail: str = ""
    returncode: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCEEDED


def _check_mapping_of_paths(value: Any, key: str, base: Path, source: str) -> dict[str, Path]:
    if not isinstance(value, dict):
        raise InputError(f"{source}: '{key}' must be an object mapping names to file paths, got {type(value).__name__}")
    paths: dict[str, Path] = {}
    for name, raw in value.items():
        if not NAME_PATTERN.match(name):
            raise InputError(f"{source}: {key} name {name!r} is not a valid name (letters, digits, _ . -)")
        if not isinstance(raw, str) or not raw.strip():
            raise InputError(
                f"{source}: {key}[{name!r}] must be a non-empty path string, got {type(raw).__name__} {raw!r}"
            )
        path = Path(os.path.expanduser(raw))
        paths[name] = path if path.is_absolute() else (base / path)
    return paths


def parse_job(data: Any, *, base_dir: str | os.PathLike | None = None, source: str = "job") -> Job:
    """Validate a decoded JOB.json object and return a Job; raise InputError naming what is wrong.

    Checks the keys and their types, the device spelling, and that every input exists; output folders
    are created later, by the worker, only when it writes them. The task name is checked against the
    registry by the worker (so this module needs no registry import).
    """
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a JSON object with keys {sorted(ALLOWED_KEYS)}, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise InputError(f"{source}: missing required key(s) {missing}; a job needs {list(REQUIRED_KEYS)}")
    extra = sorted(set(data) - ALLOWED_KEYS)
    if extra:
        raise InputError(f"{source}: unknown key(s) {extra}; allowed keys are {sorted(ALLOWED_KEYS)}")
    task = data["task"]
    if not isinstance(task, str) or not task.strip():
        raise InputError(f"{source}: 'task' must be a non-empty string, got {type(task).__name__} {task!r}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    inputs = _check_mapping_of_paths(data["inputs"], "inputs", base, source)
    outputs = _check_mapping_of_paths(data["outputs"], "outputs", base, source)
    parameters = data.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InputError(f"{source}: 'parameters' must be an object, got {type(parameters).__name__}")
    device = data.get("device", "auto")
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device.strip().lower()):
        raise InputError(f"{source}: 'device' must be one of auto, cpu, cuda, cuda:N, mps; got {device!r}")
    for name, path in inputs.items():
        if not path.exists():
            raise InputError(f"{source}: input {name!r} does not exist: {path}")
    for name, path in outputs.items():
        if path.is_dir():
            raise InputError(f"{source}: output {name!r} is an existing folder, expected a file path: {path}")
    return Job(
        task=task.strip(),
        inputs=inputs,
        outputs=outputs,
        parameters=dict(parameters),
        device=device.strip().lower(),
    )


def number_parameter(task: str, name: str, value: Any, *, integer: bool = False, positive: bool = True):
    """A job parameter that must be a (positive) number: the value as int or float, or InputError naming
    the task, the parameter, what was expected and what came (a string "lots" is bad input, exit 2)."""
    kind = "integer" if integer else "number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and float(value) != int(value):
        ok = False
    if ok and positive and value <= 0:
        ok = False
    if not ok:
        raise InputError(f"{task}: parameter {name!r} must be a {'positive ' if positive else ''}{kind}, "
                         f"got {type(value).__name__} {value!r}")
    return int(value) if integer else float(value)


def load_job(path: str | os.PathLike) -> Job:
    """Read and validate JOB.json; every problem is an InputError naming the file and the problem."""
    job_path = Path(path)
    if not job_path.is_file():
        raise InputError(f"job file not found: {job_path}")
    try:
        text = job_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"job file {job_path} could not be read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"job file {job_path} is not valid JSON: {exc}") from exc
    job = parse_job(data, base_dir=job_path.resolve().parent, source=f"job file {job_path}")
    return Job(job.task, job.inputs, job.outputs, job.parameters, job.device, job_path.resolve())


def job_to_dict(job: Job | Mapping[str, Any]) -> dict:
    """The JOB.json object for a Job (or a plain mapping, with paths turned into strings)."""
    if isinstance(job, Job):
        return {
            "task": job.task,
            "inputs": {k: str(v) for k, v in job.inputs.items()},
            "outputs": {k: str(v) for k, v in job.outputs.items()},
            "parameters": to_jsonable(job.parameters),
            "device": job.device,
        }
    return to_jsonable(dict(job))


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars and arrays, paths, tuples and sets; non-finite floats -> None.

    Strict JSON (no NaN tokens) keeps the event stream readable by any JSON parser.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    # numpy (and torch) scalars and arrays, without importing either here.
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    raise TypeError(f"value of type {type(obj).__name__} cannot be written as JSON: {obj!r}")


def encode_event(event: str, **fields: Any) -> str:
    """One event line (no trailing newline)."""
    payload = {"event": event}
    payload.update(to_jsonable(fields))
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def decode_event(line: str) -> dict | None:
    """Parse one event line; None for blank lines or anything that is not an event object."""
    line = line.strip()
    if not line:
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return None
    return data
