"""What the modules' scenario functions share (``<Module>Lib/scenarios.py``: the checks that the
slicer-core tests and each module's Test class inside Slicer both run): assertions that survive
``python -O``, scene and work-folder snapshots, and the deterministic "cancel while running" set-up.

Cancel while running: the scenario registers a paused variant of its task with the job worker
(``paused_task_env``); the variant's progress reports go through ``PausingContext``, which waits at a
chosen fraction, checking for cancellation, until the scenario cancels (``wait_until_paused`` then
``cancel_paused``). No ``slicer`` import here: a job worker imports the scenario modules.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

PAUSE_LIMIT_S = 120.0  # a paused job that is never cancelled fails after this


def check(condition, message: str) -> None:
    # Not `assert`: the checks must also run under python -O.
    if not condition:
        raise AssertionError(message)


def close(a, b, atol, what: str) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    check(a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}")
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    check(err <= atol, f"{what}: max difference {err:.3g} > {atol:.3g}")


def scene_node_ids(scene) -> set:
    return {scene.GetNthNode(k).GetID() for k in range(scene.GetNumberOfNodes())}


def partial_files(folder) -> list:
    """Names of half-written (temporary) outputs left anywhere under `folder`."""
    from ultrasound_ai.core.atomic import is_partial

    return sorted(p.name for p in Path(folder).rglob("*") if is_partial(p))


class PausingContext:
    """The worker's TaskContext, except that the first progress report at or past `at` waits (checking
    for cancellation) until the job is cancelled: a deterministic "cancel while running"."""

    def __init__(self, ctx, at: float, what: str = "job"):
        self._ctx = ctx
        self._at = at
        self._what = what
        self._paused = False

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def progress(self, fraction, message=""):
        self._ctx.progress(fraction, message)
        if not self._paused and float(fraction) >= self._at:
            self._paused = True
            self._ctx.log("paused: waiting to be cancelled")
            deadline = time.monotonic() + PAUSE_LIMIT_S
            while time.monotonic() < deadline:
                self._ctx.check_cancelled()
                time.sleep(0.02)
            raise RuntimeError(f"the paused {self._what} was not cancelled within {PAUSE_LIMIT_S} s")


def paused_task_env(module_dir, target: str, task: str) -> dict:
    """Worker environment that registers `target` ("<Module>Lib.scenarios:function") as `task`, with
    the module folder importable (kept with any tasks already registered the same way)."""
    paths = [str(module_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    extra = ",".join(filter(None, [os.environ.get("ULTRASOUND_AI_EXTRA_TASKS", ""), f"{target}={task}"]))
    return {"ULTRASOUND_AI_EXTRA_TASKS": extra, "PYTHONPATH": os.pathsep.join(paths)}


def wait_until_paused(launcher, timeout_s: float) -> list:
    """Drain the launcher's events until its task reports the pause; returns the events seen."""
    events = []
    deadline = time.monotonic() + timeout_s
    while not any(e.get("event") == "log" and "paused" in e.get("message", "") for e in events):
        events += launcher.drain()
        if launcher.done:
            events += launcher.drain()
            raise AssertionError(f"the job ended before it could be cancelled: {launcher.result.error} {events[-3:]}")
        check(time.monotonic() < deadline, "the job did not reach its pause point in time")
        time.sleep(0.05)
    return events


def cancel_paused(logic, launcher, parameters, timeout_s: float):
    """Cancel through the Logic; the job must end "cancelled" (exit 3) and load_results must refuse it.
    Returns the job's result."""
    from ultrasound_ai.core.errors import Cancelled

    logic.cancel()
    result = launcher.wait(timeout_s)
    check(result.status == "cancelled" and result.exit_code == 3, f"expected a cancelled job, got {result.status} "
                                                                  f"{result.error}")
    try:
        logic.load_results(result, parameters)
    except Cancelled:
        return result
    raise AssertionError("load_results accepted a cancelled job")


def expect_input_error(call, *needles) -> str:
    """Call `call()`; it must raise InputError whose message mentions every needle. Returns the message."""
    from ultrasound_ai.core.errors import InputError

    try:
        call()
    except InputError as exc:
        message = str(exc)
        for needle in needles:
            check(needle in message, f"error message {message!r} does not mention {needle!r}")
        return message
    raise AssertionError(f"expected an InputError mentioning {needles}")


def check_progress_events(events) -> None:
    """A job's streamed events: at least three progress reports, never going backwards, ending with
    the result."""
    fractions = [e["fraction"] for e in events if e.get("event") == "progress"]
    check(len(fractions) >= 3, f"expected progress events from the job, got {fractions}")
    check(all(b >= a for a, b in zip(fractions, fractions[1:])), f"progress went backwards: {fractions}")
    check(events[-1].get("event") == "result", f"the job's last event is {events[-1]}")


class SelfTestSetUp:
    """setUp of a module's Test class (mixed in before ScriptedLoadableModuleTest): a cleared scene and a
    new work folder `self.work` for each test_*, since ctest runs each test_* after setUp alone."""

    def setUp(self):
        import tempfile

        import slicer

        slicer.mrmlScene.Clear()
        self.work = Path(tempfile.mkdtemp(prefix=f"{type(self).__name__}-"))
