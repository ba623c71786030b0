"""The worker side of a job: run one task from JOB.json and report on an event channel of its own.

``python -m ultrasound_ai.jobs run JOB.json [--events PATH | --events-fd N] [--cancel-file PATH]``

Event channel (see protocol.py for the messages):
  --events PATH    append one JSON line per event to PATH (a regular file or a named pipe). This is
                   what the launcher uses on every platform: it tails the file on a thread.
  --events-fd N    write to an inherited file descriptor (POSIX pipes: ``pass_fds``).
  neither          events go to stderr (handy by hand; library prints may then interleave).
Events never go to stdout, so whatever a library prints cannot corrupt them.

Cancellation: SIGTERM (and SIGBREAK / CTRL_BREAK_EVENT on Windows) only sets a flag; the task sees
it at its next ``ctx.check_cancelled()``, which raises Cancelled -> "cancelled" event, exit code 3.
``--cancel-file PATH`` adds a signal-free way (its existence means "cancel"), for Windows processes
without a console. A task that never checks is killed by the launcher after its grace period.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

from ultrasound_ai import __version__
from ultrasound_ai.core import atomic
from ultrasound_ai.core.atomic import atomic_output, check_output_path
from ultrasound_ai.core.errors import EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, Cancelled, InputError, exit_code_for
from ultrasound_ai.jobs.protocol import EVENT_NAMES, Job, encode_event, load_job, parse_job, to_jsonable
from ultrasound_ai.jobs.registry import available_tasks, output_extensions, resolve_task


class EventWriter:
    """Writes events as flushed JSON lines; thread-safe (tasks may report from helper threads)."""

    def __init__(self, stream: TextIO, *, close: bool = False):
        self._stream = stream
        self._close = close
        self._lock = threading.Lock()
        self.terminal_sent = False

    @classmethod
    def open(cls, events: str | None = None, events_fd: int | None = None) -> "EventWriter":
        if events is not None and events_fd is not None:
            raise InputError("give either --events PATH or --events-fd N, not both")
        if events is not None:
            try:
                # Append + line buffering: each event is one write of one complete line.
                stream = open(events, "a", encoding="utf-8", newline="\n", buffering=1)
            except OSError as exc:
                raise InputError(f"events channel {events!r} cannot be opened for writing: {exc}") from exc
            return cls(stream, close=True)
        if events_fd is not None:
            try:
                stream = os.fdopen(events_fd, "w", encoding="utf-8", newline="\n", buffering=1)
            except OSError as exc:
                raise InputError(f"events file descriptor {events_fd} cannot be opened: {exc}") from exc
            return cls(stream, close=True)
        return cls(sys.stderr)

    def emit(self, event: str, **fields: Any) -> None:
        line = encode_event(event, **fields) + "\n"
        with self._lock:
            if self.terminal_sent:
                return  # nothing may follow the result / error / cancelled line
            if event in ("result", "error", "cancelled"):
                self.terminal_sent = True
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):
                # A launcher that went away must not turn a finished task into a crash.
                pass

    def close(self) -> None:
        if self._close:
            with contextlib.suppress(OSError, ValueError):
                self._stream.close()


class CancelState:
    """The cancel flag, set from a signal handler or by a cancel file appearing."""

    def __init__(self, cancel_file: str | os.PathLike | None = None):
        self._event = threading.Event()
        self.cancel_file = Path(cancel_file) if cancel_file else None
        self.reason = ""
        self.finished = False  # set once the outputs are committed: a cancel then comes too late

    def request(self, reason: str = "cancel requested") -> None:
        if self.finished:
            return
        self.reason = self.reason or reason
        self._event.set()

    @property
    def requested(self) -> bool:
        if not self._event.is_set() and self.cancel_file is not None and self.cancel_file.exists():
            self.request(f"cancel file {self.cancel_file} appeared")
        return self._event.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM (and SIGBREAK on Windows) set the flag; only possible in the main thread."""

        def _handler(signum, _frame):
            self.request(f"received signal {signal.Signals(signum).name}")

        for name in ("SIGTERM", "SIGBREAK"):
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, _handler)


class TaskContext:
    """What a task gets besides its Job: progress, cancellation, device, temporary outputs, log."""

    def __init__(self, job: Job, events: EventWriter, cancel: CancelState | None = None):
        self.job = job
        self._events = events
        self._cancel = cancel or CancelState()
        self._fraction = 0.0
        self._last_progress: tuple[float, str] | None = None
        self._device: str | None = None
        self._outputs: dict[str, Path] = {}
        self._stack = contextlib.ExitStack()

    # -- progress and messages -------------------------------------------------------------------
    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress; the fraction is clamped to [0, 1] and never goes backwards."""
        try:
            value = float(fraction)
        except (TypeError, ValueError):
            value = self._fraction
        if not math.isfinite(value):
            value = self._fraction
        self._fraction = max(self._fraction, min(1.0, max(0.0, value)))
        key = (self._fraction, str(message))
        if key == self._last_progress:
            return  # tight loops repeating the same report would only flood the channel
        self._last_progress = key
        self._events.emit("progress", fraction=self._fraction, message=str(message))

    def stage(self, start: float, end: float) -> Callable[[float, str], None]:
        """A progress function mapping a sub-step's [0, 1] onto [start, end] of the whole task."""

        def report(fraction: float, message: str = "") -> None:
            f = min(1.0, max(0.0, float(fraction)))
            self.progress(start + (end - start) * f, message)

        return report

    def log(self, message: str) -> None:
        self._events.emit("log", message=str(message))

    # -- cancellation -----------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.requested

    def check_cancelled(self) -> None:
        """Raise Cancelled once the launcher asked the job to stop (SIGTERM or the cancel file)."""
        if self._cancel.requested:
            raise Cancelled(f"task {self.job.task!r} cancelled ({self._cancel.reason})")

    # -- device -----------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """The resolved torch device string (e.g. "cpu", "cuda:0"); torch is imported on first use."""
        if self._device is None:
            from ultrasound_ai.core.device import resolve_device

            self._device = str(resolve_device(self.job.device))
        return self._device

    # -- outputs ----------------------------------------------------------------------------------
    def output(self, name: str) -> Path:
        """A temporary path for output `name`; renamed onto the job's path only if the task succeeds."""
        if name in self._outputs:
            return self._outputs[name]
        if name not in self.job.outputs:
            given = ", ".join(sorted(self.job.outputs)) or "none"
            raise InputError(f"job has no output named {name!r} (outputs given: {given})")
        # atomic_output announces the temporary name ("partial" event, see execute) before it is used.
        tmp = self._stack.enter_context(atomic_output(self.job.outputs[name]))
        self._outputs[name] = tmp
        return tmp

    def has_output(self, name: str) -> bool:
        return name in self.job.outputs

    def _finish(self, exc: BaseException | None) -> None:
        """Rename the temporary outputs into place (exc is None) or remove them."""
        if exc is None:
            self._stack.close()
        else:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)


def execute(job: Job | dict | str | os.PathLike, events: EventWriter, cancel: CancelState | None = None) -> int:
    """Run one job in this process and report on `events`; return the job exit code (never raises).

    `job` may be a Job, a JOB.json-like dict, or the path of a JOB.json file.
    """
    cancel = cancel or CancelState()
    try:
        if isinstance(job, Job):
            loaded = job
        elif isinstance(job, dict):
            loaded = parse_job(job)
        else:
            loaded = load_job(job)
        if cancel.requested:
            raise Cancelled(f"job cancelled before it started ({cancel.reason})")
        known = available_tasks()  # names only: an unknown task fails before "started"
        if loaded.task not in known:
            raise InputError(f"unknown task {loaded.task!r}; available tasks: {', '.join(sorted(known))}")
        check_job_outputs(loaded)  # before any work: an unwritable folder must not cost an hour first
    except BaseException as exc:  # noqa: BLE001 - every failure is reported as an event + exit code
        return _report_failure(events, exc)

    events.emit(
        "started",
        pid=os.getpid(),
        task=loaded.task,
        device=loaded.device,
        engine_version=__version__,
        job=str(loaded.path) if loaded.path else None,
        threads=int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None,
    )
    ctx = TaskContext(loaded, events, cancel)
    names = {atomic.path_key(path): name for name, path in loaded.outputs.items()}

    def announce(tmp: Path, final: Path) -> None:
        # Every temporary output of this process, also those a library writer makes itself, is told
        # to the launcher before it is written, so a killed worker leaves nothing the launcher misses.
        events.emit("partial", name=names.get(atomic.path_key(final), final.name), path=str(tmp))

    stop_announcing = atomic.add_listener(announce)
    try:
        return _execute_task(loaded, ctx, events, cancel)
    finally:
        stop_announcing()


def _execute_task(loaded: Job, ctx: TaskContext, events: EventWriter, cancel: CancelState) -> int:
    try:
        # Importing the task's module can take seconds (torch); "started" has already told the launcher.
        task = resolve_task(loaded.task)
        result = task(loaded, ctx)
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise TypeError(f"task {loaded.task!r} returned {type(result).__name__}; a task must return a dict")
        payload = to_jsonable(result)  # fail before committing outputs if the result cannot be sent
    except BaseException as exc:  # noqa: BLE001
        with contextlib.suppress(BaseException):
            ctx._finish(exc)
        return _report_failure(events, exc)
    try:
        ctx._finish(None)
    except BaseException as exc:  # noqa: BLE001 - e.g. a requested output that was never written
        return _report_failure(events, exc)
    ctx.progress(1.0, "done")
    # The outputs are in place: from here on the job is finished, and a late cancel changes nothing.
    cancel.finished = True
    events.emit("result", result=payload, outputs={k: str(v) for k, v in loaded.outputs.items()})
    return EXIT_OK


def check_job_outputs(job: Job) -> None:
    """Each output's folder exists or can be created and is writable, and its extension suits the
    task's output of that name (registry.OUTPUT_EXTENSIONS); InputError naming the output otherwise."""
    allowed = output_extensions(job.task)
    for name, path in job.outputs.items():
        exts = allowed.get(name) if allowed is not None else None
        if allowed is not None and name not in allowed:
            raise InputError(f"task {job.task!r}: unknown output {name!r}; expected some of {sorted(allowed)}")
        check_output_path(path, what=f"output {name!r}", extensions=exts)


def _report_failure(events: EventWriter, exc: BaseException) -> int:
    code = exit_code_for(exc)
    message = str(exc) or type(exc).__name__
    if code == EXIT_CANCELLED:
        events.emit("cancelled", message=message, exit_code=code)
        return code
    fields: dict[str, Any] = {"message": message, "exit_code": code, "type": type(exc).__name__}
    if code == EXIT_FAILURE:
        # Unexpected failures carry the traceback; bad input needs only its message.
        fields["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    events.emit("error", **fields)
    return code


def run(job_path: str | os.PathLike, *, events: str | None = None, events_fd: int | None = None,
        cancel_file: str | None = None, threads: int | None = None, leave_free_cores: int = 0) -> int:
    """The `run` command: open the event channel, install the cancel handlers, execute the job.

    threads: torch/OpenMP threads (None: the usable cores minus `leave_free_cores`; see core/threads.py).
    """
    from ultrasound_ai.core.threads import apply_thread_policy, choose_threads

    apply_thread_policy(choose_threads(threads, leave_free=leave_free_cores))
    try:
        writer = EventWriter.open(events, events_fd)
    except InputError as exc:
        print(f"ultrasound-ai job: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    cancel = CancelState(cancel_file)
    cancel.install_signal_handlers()
    try:
        code = execute(job_path, writer, cancel)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        writer.close()
    return code


__all__ = ["EventWriter", "CancelState", "TaskContext", "execute", "run", "EVENT_NAMES"]
