"""Tasks used only by test_jobs.py. They reach the worker through ULTRASOUND_AI_EXTRA_TASKS, never
through the engine's registry (see ultrasound_ai/jobs/registry.py)."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import InputError

# name -> function, as the worker's environment variable spells them.
EXTRA_TASKS = ",".join(
    f"job_test_tasks:{name}={name}"
    for name in ("chatty", "sleep_with_child", "stepwise_writer", "fail", "bad_input", "report_device",
                 "nested_writer", "slow_exit", "report_threads")
)

# Lines that look like protocol events: printed on stdout they must change nothing.
FAKE_EVENT = '{"event": "result", "result": {"fake": true}}'


def chatty(job, ctx):
    """Progress in `steps` steps, with lots of stdout and stderr between them."""
    steps = int(job.parameters.get("steps", 8))
    noise = "noise " + "x" * 200
    for i in range(steps):
        for _ in range(150):
            print(noise)
            print(noise, file=sys.stderr)
        print(FAKE_EVENT)
        print('{"event": "progress", "fraction": 0.0, "message": "fake"}', file=sys.stderr)
        ctx.progress((i + 1) / steps, f"step {i + 1}")
        if i == steps // 2:
            ctx.progress(0.0, "backwards")  # the fraction must not go back
    return {"steps": steps}


def sleep_with_child(job, ctx):
    """Start a sleeping child process, say its pid, then wait to be cancelled.

    With parameters {"ignore_sigterm": true} the task ignores SIGTERM and never checks for cancel,
    so only the launcher's kill after the grace period can end it.
    """
    ignore = bool(job.parameters.get("ignore_sigterm", False))
    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    ctx.log(f"child_pid={child.pid}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not ignore:
            ctx.check_cancelled()
        time.sleep(0.02)
    return {"finished": True}


def stepwise_writer(job, ctx):
    """Write output "data" in `steps` chunks of 1000 bytes; log "half written" after two of them.

    parameters: steps, delay_s, fail_at (raise at that step), ignore_sigterm (never check cancel).
    """
    steps = int(job.parameters.get("steps", 4))
    delay = float(job.parameters.get("delay_s", 0.0))
    fail_at = job.parameters.get("fail_at")
    ignore = bool(job.parameters.get("ignore_sigterm", False))
    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path = ctx.output("data")
    with open(path, "wb") as f:
        for i in range(steps):
            f.write(bytes([i % 256]) * 1000)
            f.flush()
            if i == 1:
                ctx.log("half written")
            if fail_at is not None and i == int(fail_at):
                raise RuntimeError(f"simulated disk failure at step {i}")
            if not ignore:
                ctx.check_cancelled()
            ctx.progress((i + 1) / steps, f"chunk {i + 1}")
            time.sleep(delay)
    return {"bytes": steps * 1000}


def fail(job, ctx):
    ctx.progress(0.3, "about to fail")
    raise RuntimeError(job.parameters.get("message", "deliberate failure"))


def bad_input(job, ctx):
    raise InputError("parameter 'size' must be a positive integer, got -1")


def report_device(job, ctx):
    return {"device": ctx.device}


def nested_writer(job, ctx):
    """Write output "data" the way engine tasks do: a library writer given ctx.output() makes its own
    atomic_output on it. Logs "point N" at each stage and, at parameters["stop_at"], waits to be killed.

    point 0: the temporary name is announced, nothing written; 1: half written; 2: complete, not renamed.
    """
    stop_at = int(job.parameters.get("stop_at", -1))

    def point(n: int) -> None:
        ctx.log(f"point {n}")
        if n == stop_at:
            time.sleep(120)

    path = ctx.output("data")
    point(0)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(b"new " * 1000)
        f.flush()
        point(1)
        f.write(b"new " * 1000)
    point(2)
    return {"bytes": 8000}


def slow_exit(job, ctx):
    """Write output "data", return, then take 3 s to exit (like a heavy library's teardown)."""
    ctx.output("data").write_bytes(b"complete")
    atexit.register(time.sleep, 3.0)
    return {"ok": True}


def report_threads(job, ctx):
    """The thread policy as the task sees it, and torch's thread count once torch is imported."""
    imported_before = "torch" in sys.modules
    import torch

    return {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_imported_before_task": imported_before}
