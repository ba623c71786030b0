"""Start a job in a background process, stream its events, cancel it, and collect its result.

    launcher = JobLauncher(job_dict_or_path, on_event=None).start()
    launcher.poll()      # "running" | "succeeded" | "failed" | "cancelled"  (never blocks)
    launcher.drain()     # new events since the last drain (never blocks; call it from a QTimer)
    launcher.progress    # (fraction, message) of the last progress event
    launcher.cancel()    # SIGTERM now; the whole process tree is killed after grace_s (never blocks);
                         # returns "already finished" once the result arrived (outputs stay)
    result = launcher.wait()   # JobResult

How it works: the launcher writes JOB.json (when given a dict) into a work folder, starts
``python -m ultrasound_ai.jobs run JOB.json --events events.jsonl --cancel-file cancel`` in its own
process group (a new session on POSIX, CREATE_NEW_PROCESS_GROUP on Windows), sends the worker's
stdout and stderr to files (no pipe can fill up and stall a chatty task), and tails the events file
on one daemon thread. The same thread enforces the cancel grace period and finally kills whatever is
left of the process tree (psutil: descendants first, then the worker; the process group too on POSIX),
so no child of a job outlives it. A work folder the launcher created itself is removed at the end;
JobResult keeps the events and the tails of stdout and stderr.

`on_event(event)` is called on that background thread: Qt code must not touch widgets there and
should use drain() from a timer on the GUI thread instead.

The interpreter is ``PythonSlicer`` inside the Slicer application (found beside sys.executable or in
Slicer's bin folder) and sys.executable elsewhere; pass `python=` to choose another.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import psutil

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, InputError
from ultrasound_ai.jobs.protocol import (
    STATUS_CANCELLED,
    STATUS_FAILED,
    STATUS_PENDING,
    STATUS_RUNNING,
    STATUS_SUCCEEDED,
    TERMINAL_EVENTS,
    Job,
    JobResult,
    decode_event,
    job_to_dict,
)

_IS_WINDOWS = os.name == "nt"
_TAIL_CHARS = 8000
# The folder holding the ultrasound_ai package: put on the worker's PYTHONPATH so a source checkout
# (e.g. an extension's scripted-modules folder inside Slicer) runs without being pip-installed.
_ENGINE_ROOT = str(Path(__file__).resolve().parents[2])


def _inside_slicer() -> bool:
    slicer = sys.modules.get("slicer")
    return slicer is not None and getattr(slicer, "app", None) is not None


def find_python_slicer() -> str:
    """The PythonSlicer launcher of the running Slicer (it sets up Slicer's libraries and paths)."""
    names = ["PythonSlicer.exe", "PythonSlicer"] if _IS_WINDOWS else ["PythonSlicer"]
    exe_dir = Path(sys.executable).resolve().parent
    folders = [exe_dir, exe_dir.parent / "bin", exe_dir.parent.parent / "bin"]
    slicer = sys.modules.get("slicer")
    home = getattr(getattr(slicer, "app", None), "slicerHome", None)
    if isinstance(home, str) and home:
        folders.append(Path(home) / "bin")
    for folder in folders:
        for name in names:
            candidate = folder / name
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("PythonSlicer")
    if found:
        return found
    raise RuntimeError(
        "running inside Slicer but PythonSlicer was not found beside "
        f"{sys.executable} or in Slicer's bin folder; pass python= to JobLauncher"
    )


def find_python() -> str:
    """PythonSlicer inside the Slicer application, else this interpreter."""
    return find_python_slicer() if _inside_slicer() else sys.executable


def _absolute_paths(job: dict) -> dict:
    """Make relative input/output paths of a job dict absolute against the caller's folder.

    The dict is written into a temporary work folder, and the worker resolves relative paths against
    the JOB.json folder; without this, "in.h5" would silently mean a file in the temporary folder.
    Values of the wrong type are left alone for the worker to report.
    """
    job = dict(job)
    for key in ("inputs", "outputs"):
        table = job.get(key)
        if isinstance(table, dict):
            job[key] = {
                k: (str(Path(v).expanduser().absolute()) if isinstance(v, (str, os.PathLike)) and str(v).strip() else v)
                for k, v in table.items()
            }
    return job


def _tail(path: Path, limit: int = _TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.AccessDenied:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until killed processes are gone; a zombie counts as gone (it runs no code, and an init
    that does not reap orphans promptly must not stall every cancel)."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if not _gone(p)]
        if pending:
            time.sleep(0.02)


class JobLauncher:
    """One job in a background worker process; see the module docstring."""

    def __init__(
        self,
        job: Job | Mapping[str, Any] | str | os.PathLike,
        *,
        python: str | None = None,
        on_event: Callable[[dict], None] | None = None,
        workdir: str | os.PathLike | None = None,
        env: Mapping[str, str | None] | None = None,
        poll_interval: float = 0.05,
        threads: int | None = None,
    ):
        """`env` adds to (None values remove from) the inherited environment of the worker.

        `threads`: the worker's torch/OpenMP threads; by default it uses the cores it may run on, less
        one for the GUI when started from Slicer (ultrasound_ai.core.threads).
        """
        if not isinstance(job, (Job, Mapping, str, os.PathLike)):
            raise InputError(f"job must be a dict, a Job or the path of a JOB.json file, got {type(job).__name__}")
        self._job_arg = job
        self.python = python
        self.on_event = on_event
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self._env_arg = dict(env or {})
        self.poll_interval = float(poll_interval)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InputError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads

        self.workdir: Path | None = None
        self.job_path: Path | None = None
        self.pid: int | None = None
        self.callback_errors: list[str] = []

        self._lock = threading.Lock()
        self._queue: queue.Queue[dict] = queue.Queue()
        self._events: list[dict] = []
        self._progress: tuple[float, str] = (0.0, "")
        self._partials: dict[str, str] = {}  # temporary path -> output name
        self._terminal: dict | None = None
        self._status = STATUS_PENDING
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._wake = threading.Event()
        self._result: JobResult | None = None
        self._owns_workdir = False
        self._cancel_requested = False
        self._kill_deadline: float | None = None
        self._killed = False
        self._tree: dict[int, psutil.Process] = {}
        self._started_at = 0.0

    # -- starting ---------------------------------------------------------------------------------
    def _prepare_workdir(self) -> None:
        if self._workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="ultrasound-ai-job-"))
            self._owns_workdir = True
        else:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        if isinstance(self._job_arg, (str, os.PathLike)):
            self.job_path = Path(self._job_arg).absolute()
        else:
            data = job_to_dict(self._job_arg) if isinstance(self._job_arg, Job) else _absolute_paths(dict(self._job_arg))
            try:
                text = json.dumps(data, indent=2, allow_nan=False, default=os.fspath)
            except (TypeError, ValueError) as exc:
                raise InputError(f"job cannot be written as JSON: {exc}") from exc
            self.job_path = self.workdir / "JOB.json"
            with atomic_output(self.job_path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        self._events_path = self.workdir / "events.jsonl"
        self._events_path.write_bytes(b"")  # exists before the worker starts, so tailing can begin
        self._cancel_path = self.workdir / "cancel"
        with contextlib.suppress(FileNotFoundError):
            self._cancel_path.unlink()
        self._stdout_path = self.workdir / "stdout.txt"
        self._stderr_path = self.workdir / "stderr.txt"

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self._env_arg.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if _ENGINE_ROOT not in paths:
            paths.insert(0, _ENGINE_ROOT)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"  # stdout/stderr tails are current even if the worker is killed
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return env

    def command(self) -> list[str]:
        return [
            self.python or find_python(),
            "-m",
            "ultrasound_ai.jobs",
            "run",
            str(self.job_path),
            "--events",
            str(self._events_path),
            "--cancel-file",
            str(self._cancel_path),
            *self._thread_arguments(),
        ]

    def _thread_arguments(self) -> list[str]:
        if self.threads is not None:
            return ["--threads", str(self.threads)]
        # The GUI must stay responsive and keeps its own core (docs/ARCHITECTURE.md, Conventions).
        return ["--leave-free-cores", "1"] if _inside_slicer() else []

    def start(self) -> "JobLauncher":
        """Start the worker and the reader thread; returns self. Raises RuntimeError if started twice."""
        with self._lock:
            if self._status != STATUS_PENDING:
                raise RuntimeError("this job was already started; create a new JobLauncher to run it again")
            self._status = STATUS_RUNNING
        try:
            self._prepare_workdir()
            cmd = self.command()
            kwargs: dict[str, Any] = {}
            if _IS_WINDOWS:
                # Own process group: CTRL_BREAK reaches only the job; no console window pops up in Slicer.
                kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
            else:
                kwargs["start_new_session"] = True  # the job's tree is one process group we can kill
            self._stdout_file = open(self._stdout_path, "wb")
            self._stderr_file = open(self._stderr_path, "wb")
            self._started_at = time.monotonic()
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=self._stdout_file,
                    stderr=self._stderr_file,
                    env=self._environment(),
                    **kwargs,
                )
            except OSError as exc:
                raise RuntimeError(f"cannot start the job worker {cmd[0]!r}: {exc}") from exc
        except BaseException:
            with self._lock:
                self._status = STATUS_FAILED
            self._close_files()
            self._remove_workdir()
            raise
        self.pid = self._proc.pid
        self._thread = threading.Thread(target=self._monitor, name=f"ultrasound-ai-job-{self.pid}", daemon=True)
        self._thread.start()
        return self

    # -- state ------------------------------------------------------------------------------------
    def poll(self) -> str:
        """"pending" before start, then "running", then "succeeded", "failed" or "cancelled"."""
        with self._lock:
            return self._status

    @property
    def progress(self) -> tuple[float, str]:
        with self._lock:
            return self._progress

    def events(self) -> list[dict]:
        """Every event received so far (a copy)."""
        with self._lock:
            return list(self._events)

    def drain(self) -> list[dict]:
        """The events received since the last drain; never blocks."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def result(self) -> JobResult | None:
        return self._result

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends; TimeoutError if it is still running after `timeout` seconds."""
        if self._status == STATUS_PENDING:
            raise RuntimeError("the job was not started; call start() first")
        if not self._done.wait(timeout):
            raise TimeoutError(f"job still running after {timeout} s (pid {self.pid})")
        assert self._result is not None
        return self._result

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self, grace_s: float = 5.0) -> str:
        """Ask the worker to stop now; kill its whole process tree after `grace_s` seconds. Never blocks.

        The job ends "cancelled" whether the worker stops by itself (exit code 3) or has to be killed.
        Returns "cancelling", or "already finished" when the job ended before (a received "result"
        counts: its outputs are in place and stay), or "not started".
        """
        with self._lock:
            if self._status == STATUS_PENDING:
                self._status = STATUS_CANCELLED
                self._result = JobResult(STATUS_CANCELLED, EXIT_CANCELLED, error="cancelled before it started")
                self._done.set()
                return "not started"
            if self._done.is_set() or self._terminal is not None:
                # After the terminal event the worker only exits; killing it now would turn a finished
                # job into a "cancelled" one whose complete outputs stay on disk.
                return "already finished"
            deadline = time.monotonic() + max(0.0, float(grace_s))
            self._kill_deadline = deadline if self._kill_deadline is None else min(self._kill_deadline, deadline)
            already = self._cancel_requested
            self._cancel_requested = True
        if not already:
            self._refresh_tree()  # before the worker can exit and orphan its children
            with contextlib.suppress(OSError):
                self._cancel_path.write_bytes(b"cancel\n")
            with contextlib.suppress(OSError, ValueError):
                if _IS_WINDOWS:
                    os.kill(self.pid, signal.CTRL_BREAK_EVENT)
                else:
                    self._proc.send_signal(signal.SIGTERM)
        self._wake.set()
        return "cancelling"

    # -- background thread ------------------------------------------------------------------------
    def _refresh_tree(self) -> None:
        """Remember the worker's descendants: once it exits they are orphans we could not find again."""
        if self._proc is None or self._proc.returncode is not None:
            return  # reaped: its pid may already belong to an unrelated process
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return
        with self._lock:
            for child in children:
                self._tree.setdefault(child.pid, child)

    def _kill_tree(self, include_worker: bool) -> None:
        """SIGKILL the remembered descendants (deepest first), then the worker and its process group."""
        self._refresh_tree()
        with self._lock:
            procs = list(self._tree.values())
        # children() lists parents before their children; reversed kills the leaves first, so no
        # parent gets the chance to notice and start a replacement.
        for proc in reversed(procs):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                proc.kill()
        if include_worker and self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._killed = True
        if not _IS_WINDOWS:
            # Catches anything in the job's group that psutil could not see (e.g. a double fork).
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        _wait_gone(procs, timeout=3.0)

    def _monitor(self) -> None:
        try:
            self._monitor_loop()
        except BaseException as exc:  # noqa: BLE001 - the thread must always finish the job
            self._emit_local({"event": "error", "message": f"job monitor failed: {exc!r}", "exit_code": EXIT_FAILURE})
            with contextlib.suppress(Exception):
                self._kill_tree(include_worker=True)
                self._proc.wait(timeout=10)
            self._finalize()

    def _monitor_loop(self) -> None:
        buffer = ""
        last_refresh = 0.0
        with open(self._events_path, "r", encoding="utf-8", errors="replace", newline="") as stream:
            while True:
                chunk = stream.read()
                if chunk:
                    buffer = self._consume(buffer + chunk)
                rc = self._proc.poll()
                if rc is not None:
                    buffer = self._consume(buffer + stream.read())
                    if buffer.strip():
                        self._handle_line(buffer)  # a last line without its newline
                    break
                now = time.monotonic()
                with self._lock:
                    cancelling = self._cancel_requested
                    deadline = self._kill_deadline
                # While cancelling, every turn (the worker may exit any moment and orphan its
                # children); otherwise now and then, for children that leave the process group.
                if cancelling or now - last_refresh > 2.0:
                    self._refresh_tree()
                    last_refresh = now
                if cancelling and deadline is not None and now >= deadline:
                    self._kill_tree(include_worker=True)
                    self._proc.wait()
                    continue
                if not chunk:
                    self._wake.wait(self.poll_interval)
                    self._wake.clear()
        # The worker is gone: nothing of the job may outlive it (orphans of a cancel or a crash).
        self._kill_tree(include_worker=False)
        self._finalize()

    def _consume(self, text: str) -> str:
        *lines, rest = text.split("\n")
        for line in lines:
            self._handle_line(line)
        return rest

    def _handle_line(self, line: str) -> None:
        event = decode_event(line)
        if event is None:
            return  # only the worker writes here; anything else is not an event
        with self._lock:
            if self._terminal is not None:
                return
            if event["event"] == "progress":
                try:
                    fraction = float(event.get("fraction", 0.0))
                except (TypeError, ValueError):
                    fraction = self._progress[0]
                self._progress = (max(self._progress[0], min(1.0, max(0.0, fraction))), str(event.get("message", "")))
            elif event["event"] == "partial" and isinstance(event.get("path"), str):
                # Keyed by path: one output may come with several temporaries (e.g. a header and its data).
                self._partials[event["path"]] = str(event.get("name"))
            elif event["event"] in TERMINAL_EVENTS:
                self._terminal = event
        self._deliver(event)

    def _emit_local(self, event: dict) -> None:
        """An event the launcher makes up itself (the worker died without saying how it ended)."""
        event = dict(event, source="launcher")
        with self._lock:
            if self._terminal is not None:
                return
            self._terminal = event
        self._deliver(event)

    def _deliver(self, event: dict) -> None:
        with self._lock:
            self._events.append(event)
        self._queue.put(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception as exc:  # noqa: BLE001 - a GUI callback bug must not stop the job monitor
                self.callback_errors.append(repr(exc))

    def _finalize(self) -> None:
        rc = self._proc.returncode if self._proc.returncode is not None else self._proc.wait()
        self._close_files()
        stdout_tail, stderr_tail = _tail(self._stdout_path), _tail(self._stderr_path)
        terminal = self._terminal
        kind = terminal.get("event") if terminal else None
        result = None
        outputs: dict[str, str] = {}
        if kind == "result":
            # The worker commits its outputs before it sends "result": whatever ends the process
            # afterwards (a late kill, a crash in interpreter teardown), the job succeeded.
            status, exit_code, error = STATUS_SUCCEEDED, EXIT_OK, None
            result = terminal.get("result") if isinstance(terminal.get("result"), dict) else {}
            outputs = dict(terminal.get("outputs") or {})
        elif self._cancel_requested or kind == "cancelled" or rc == EXIT_CANCELLED:
            status, exit_code = STATUS_CANCELLED, EXIT_CANCELLED
            if kind == "cancelled":
                error = str(terminal.get("message", "cancelled"))
            else:
                how = "killed after the grace period" if self._killed else f"exited with return code {rc}"
                error = f"cancelled: the worker {how}"
                self._emit_local({"event": "cancelled", "message": error, "exit_code": EXIT_CANCELLED})
        else:
            status = STATUS_FAILED
            if kind == "error":
                error = str(terminal.get("message", ""))
                code = terminal.get("exit_code")
                exit_code = code if code in (EXIT_FAILURE, EXIT_BAD_INPUT) else EXIT_FAILURE
            else:
                last = "\n".join(stderr_tail.strip().splitlines()[-5:])
                error = f"the job worker exited with return code {rc} without reporting a result"
                if last:
                    error += f"; stderr ends with:\n{last}"
                exit_code = rc if rc in (EXIT_FAILURE, EXIT_BAD_INPUT) else EXIT_FAILURE
                self._emit_local({"event": "error", "message": error, "exit_code": exit_code})
        if status != STATUS_SUCCEEDED:
            self._remove_partials()
        job_result = JobResult(
            status=status,
            exit_code=exit_code,
            result=result,
            error=error,
            events=self.events(),
            stdout_tail=stdout_tail,
            stderr_tail=stderr_tail,
            returncode=rc,
            outputs=outputs,
            duration_s=time.monotonic() - self._started_at,
        )
        self._remove_workdir()
        with self._lock:
            self._result = job_result
            self._status = status
        self._done.set()

    def _remove_partials(self) -> None:
        """Temporary outputs of a worker that was killed before its own clean-up could run."""
        for path in self._partials:
            p = Path(path)
            with contextlib.suppress(OSError):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()

    def _close_files(self) -> None:
        for name in ("_stdout_file", "_stderr_file"):
            f = getattr(self, name, None)
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def _remove_workdir(self) -> None:
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- context manager: a job never outlives a `with` block ------------------------------------
    def __enter__(self) -> "JobLauncher":
        if self._status == STATUS_PENDING:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._status != STATUS_PENDING and not self._done.is_set():
            self.cancel()
            self._done.wait()


def run_job(
    job: Job | Mapping[str, Any] | str | os.PathLike,
    on_event: Callable[[dict], None] | None = None,
    timeout: float | None = None,
    **launcher_kwargs: Any,
) -> JobResult:
    """Run a job in a worker process and wait for it (scripts, the Python console, tests).

    On timeout (or Ctrl+C) the job is cancelled and its process tree killed before the TimeoutError
    (or KeyboardInterrupt) propagates. Extra keyword arguments go to JobLauncher.
    """
    launcher = JobLauncher(job, on_event=on_event, **launcher_kwargs).start()
    try:
        return launcher.wait(timeout)
    except BaseException:
        launcher.cancel(grace_s=2.0)
        launcher.wait()
        raise
