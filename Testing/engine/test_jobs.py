"""Background jobs: protocol, worker, launcher (progress, result, errors, cancel, process trees) and the
diagnostics task and command."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import job_test_tasks
import psutil
import pytest
from launcher_waiting import wait_for_event

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import Cancelled, InputError
from ultrasound_ai.jobs import launcher as launcher_module
from ultrasound_ai.jobs.launcher import JobLauncher, find_python, run_job
from ultrasound_ai.jobs.protocol import Job, decode_event, load_job, parse_job
from ultrasound_ai.jobs.registry import TASKS, available_tasks, extra_tasks, resolve_task
from ultrasound_ai.jobs.worker import CancelState, EventWriter, TaskContext, execute

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
POSIX = os.name == "posix"


def task_env() -> dict:
    """Worker environment exposing the test-only tasks (never part of the engine's registry)."""
    path = os.pathsep.join(p for p in [str(HERE), os.environ.get("PYTHONPATH", "")] if p)
    return {"ULTRASOUND_AI_EXTRA_TASKS": job_test_tasks.EXTRA_TASKS, "PYTHONPATH": path}


def job(task, *, inputs=None, outputs=None, parameters=None, device="auto"):
    return {"task": task, "inputs": inputs or {}, "outputs": outputs or {}, "parameters": parameters or {}, "device": device}




def gone(pid: int, timeout=10.0) -> bool:
    """True once `pid` no longer runs (a zombie waiting for its reaper counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def in_process(job_data, cancel=None):
    """Run a job in this process; return (exit code, events)."""
    stream = io.StringIO()
    code = execute(job_data, EventWriter(stream), cancel)
    return code, [decode_event(line) for line in stream.getvalue().splitlines()]


# -- JOB.json validation -----------------------------------------------------------------------------


def test_parse_job_resolves_paths_and_defaults(tmp_path):
    (tmp_path / "in.h5").write_bytes(b"x")
    parsed = parse_job({"task": "t", "inputs": {"sweep": "in.h5"}, "outputs": {"out": "o/r.h5"}}, base_dir=tmp_path)
    assert parsed.inputs == {"sweep": tmp_path / "in.h5"}
    assert parsed.outputs == {"out": tmp_path / "o" / "r.h5"}
    assert parsed.parameters == {} and parsed.device == "auto"
    # load_job resolves relative paths against the folder of JOB.json, not the current folder.
    (tmp_path / "JOB.json").write_text(json.dumps({"task": "t", "inputs": {"sweep": "in.h5"}, "outputs": {}, "device": "CUDA:1"}))
    loaded = load_job(tmp_path / "JOB.json")
    assert loaded.inputs["sweep"] == tmp_path / "in.h5" and loaded.device == "cuda:1"


@pytest.mark.parametrize(
    "data, expected",
    [
        ([1, 2], "expected a JSON object"),
        ({"inputs": {}, "outputs": {}}, "missing required key(s) ['task']"),
        ({"task": "t", "inputs": {}, "outputs": {}, "parametres": {}}, "unknown key(s) ['parametres']"),
        ({"task": 3, "inputs": {}, "outputs": {}}, "'task' must be a non-empty string"),
        ({"task": "t", "inputs": ["a"], "outputs": {}}, "'inputs' must be an object"),
        ({"task": "t", "inputs": {"a": 5}, "outputs": {}}, "inputs['a'] must be a non-empty path string"),
        ({"task": "t", "inputs": {}, "outputs": {}, "parameters": []}, "'parameters' must be an object"),
        ({"task": "t", "inputs": {}, "outputs": {}, "device": "gpu"}, "'device' must be one of"),
        ({"task": "t", "inputs": {"sweep": "/no/such/sweep.h5"}, "outputs": {}}, "input 'sweep' does not exist"),
    ],
)
def test_parse_job_rejects_bad_jobs_with_clear_messages(data, expected):
    with pytest.raises(InputError) as info:
        parse_job(data)
    assert expected in str(info.value)


def test_launcher_makes_relative_paths_of_a_dict_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = launcher_module._absolute_paths({"task": "t", "inputs": {"a": "in.h5"}, "outputs": {"b": 7}})
    assert fixed["inputs"]["a"] == str(tmp_path / "in.h5")
    assert fixed["outputs"]["b"] == 7  # wrong types are left for the worker to report


# -- registry ---------------------------------------------------------------------------------------


def test_extra_tasks_parse_both_orders_and_reject_malformed_entries():
    assert extra_tasks("m.sub:f=one, two=m:g") == {"one": "m.sub:f", "two": "m:g"}
    assert extra_tasks("") == {}
    for bad in ("m:f", "m.f=name", "m:f=", "m:f=diagnostics", "1m:f=x"):
        with pytest.raises(InputError, match="ULTRASOUND_AI_EXTRA_TASKS"):
            extra_tasks(bad)


def test_test_tasks_are_not_in_the_engine_registry(monkeypatch):
    monkeypatch.delenv("ULTRASOUND_AI_EXTRA_TASKS", raising=False)
    assert "chatty" not in TASKS and "chatty" not in available_tasks()
    assert TASKS["diagnostics"] == "ultrasound_ai.core.diagnostics:diagnostics_task"
    with pytest.raises(InputError, match="unknown task 'chatty'; available tasks: diagnostics"):
        resolve_task("chatty")
    monkeypatch.setenv("ULTRASOUND_AI_EXTRA_TASKS", job_test_tasks.EXTRA_TASKS)
    assert resolve_task("chatty") is job_test_tasks.chatty


def test_task_modules_are_imported_only_when_the_task_runs():
    code = (
        "import sys, ultrasound_ai.jobs.worker, ultrasound_ai.jobs.registry as r; "
        "assert 'torch' not in sys.modules and 'ultrasound_ai.core.diagnostics' not in sys.modules, 'eager'; "
        "r.resolve_task('diagnostics'); assert 'ultrasound_ai.core.diagnostics' in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


# -- the worker, in this process ---------------------------------------------------------------------


def test_progress_is_clamped_and_never_goes_backwards():
    stream = io.StringIO()
    ctx = TaskContext(Job("t"), EventWriter(stream))
    for value in (0.2, -1.0, 0.1, float("nan"), 0.7, 5.0, 0.9):
        ctx.progress(value, f"at {value}")
    fractions = [decode_event(line)["fraction"] for line in stream.getvalue().splitlines()]
    assert fractions == [0.2, 0.2, 0.2, 0.2, 0.7, 1.0, 1.0]
    staged = io.StringIO()
    TaskContext(Job("t"), EventWriter(staged)).stage(0.5, 0.75)(0.5, "half of a stage")
    assert decode_event(staged.getvalue())["fraction"] == pytest.approx(0.625)


def test_check_cancelled_follows_the_flag_and_the_cancel_file(tmp_path):
    cancel = CancelState(tmp_path / "cancel")
    ctx = TaskContext(Job("t"), EventWriter(io.StringIO()), cancel)
    ctx.check_cancelled()  # nothing asked yet
    (tmp_path / "cancel").write_text("x")
    with pytest.raises(Cancelled, match="cancel file"):
        ctx.check_cancelled()
    flagged = CancelState()
    flagged.request("received signal SIGTERM")
    with pytest.raises(Cancelled, match="SIGTERM"):
        TaskContext(Job("t"), EventWriter(io.StringIO()), flagged).check_cancelled()


def test_in_process_execution_reports_result_and_renames_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRASOUND_AI_EXTRA_TASKS", job_test_tasks.EXTRA_TASKS)
    out = tmp_path / "deep" / "data.bin"
    code, events = in_process(job("stepwise_writer", outputs={"data": str(out)}, parameters={"steps": 3}))
    assert code == 0
    assert [e["event"] for e in events][0] == "started" and events[-1]["event"] == "result"
    assert events[-1]["result"] == {"bytes": 3000} and events[-1]["outputs"] == {"data": str(out)}
    assert out.read_bytes() == b"\x00" * 1000 + b"\x01" * 1000 + b"\x02" * 1000
    assert not [p for p in out.parent.iterdir() if is_partial(p)]


def test_in_process_asking_for_an_undeclared_output_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRASOUND_AI_EXTRA_TASKS", job_test_tasks.EXTRA_TASKS)
    code, events = in_process(job("stepwise_writer"))
    assert code == 2 and events[-1]["event"] == "error"
    assert "job has no output named 'data'" in events[-1]["message"]


def test_device_is_resolved_lazily_and_absent_devices_are_bad_input(monkeypatch):
    monkeypatch.setenv("ULTRASOUND_AI_EXTRA_TASKS", job_test_tasks.EXTRA_TASKS)
    code, events = in_process(job("report_device", device="cpu"))
    assert code == 0 and events[-1]["result"] == {"device": "cpu"}
    import torch

    if not torch.cuda.is_available():
        code, events = in_process(job("report_device", device="cuda:3"))
        assert code == 2 and events[-1]["event"] == "error" and "cuda:3" in events[-1]["message"]


def test_cancel_before_the_task_starts_and_task_import_errors(monkeypatch):
    monkeypatch.setenv("ULTRASOUND_AI_EXTRA_TASKS", job_test_tasks.EXTRA_TASKS + ",no_such_module:f=ghost")
    cancel = CancelState()
    cancel.request("received signal SIGTERM")
    code, events = in_process(job("chatty"), cancel)
    assert code == 3 and [e["event"] for e in events] == ["cancelled"]
    code, events = in_process(job("ghost"))
    assert code == 1 and [e["event"] for e in events] == ["started", "error"]
    assert "no_such_module" in events[-1]["message"]


# -- the launcher and real worker processes ----------------------------------------------------------


def test_progress_events_arrive_in_order_then_the_result_despite_noisy_output():
    seen = []
    launcher = JobLauncher(job("chatty", parameters={"steps": 6}), env=task_env(), on_event=seen.append)
    assert launcher.poll() == "pending"
    result = launcher.start().wait(timeout=60)
    assert result.status == "succeeded" and result.exit_code == 0 and result.returncode == 0
    assert result.result == {"steps": 6}  # not the fake result printed on stdout
    kinds = [e["event"] for e in result.events]
    assert kinds[0] == "started" and kinds[-1] == "result" and kinds.count("result") == 1
    progress = [e for e in result.events if e["event"] == "progress"]
    messages = [f"step {i}" for i in range(1, 5)] + ["backwards"] + [f"step {i}" for i in range(5, 7)] + ["done"]
    assert [e["message"] for e in progress] == messages
    fractions = [e["fraction"] for e in progress]
    assert fractions[3] == fractions[4] == pytest.approx(4 / 6)  # "backwards" kept the fraction
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert seen == result.events == launcher.drain()  # callback, queue and result agree
    assert launcher.progress == (1.0, "done") and launcher.poll() == "succeeded"
    assert "noise xxx" in result.stdout_tail and "noise xxx" in result.stderr_tail
    assert launcher.workdir is not None and not launcher.workdir.exists()  # its own temp folder is removed


def test_cancel_stops_the_worker_and_kills_its_child_process():
    launcher = JobLauncher(job("sleep_with_child"), env=task_env()).start()
    child_pid = int(wait_for_event(launcher, lambda e: e["event"] == "log")["message"].split("=")[1])
    assert launcher.poll() == "running" and psutil.pid_exists(child_pid)
    launcher.cancel(grace_s=20.0)
    result = launcher.wait(timeout=60)
    assert result.status == "cancelled" and result.exit_code == 3
    assert result.returncode == 3  # the worker handled SIGTERM itself
    assert result.events[-1]["event"] == "cancelled" and "source" not in result.events[-1]
    assert "SIGTERM" in result.error or "cancel file" in result.error
    assert gone(launcher.pid) and gone(child_pid)


@pytest.mark.skipif(not POSIX, reason="SIG_IGN for SIGTERM is a POSIX notion")
def test_a_task_ignoring_sigterm_is_killed_after_the_grace_period():
    launcher = JobLauncher(job("sleep_with_child", parameters={"ignore_sigterm": True}), env=task_env()).start()
    child_pid = int(wait_for_event(launcher, lambda e: e["event"] == "log")["message"].split("=")[1])
    launcher.cancel(grace_s=0.5)
    result = launcher.wait(timeout=60)
    assert result.status == "cancelled" and result.exit_code == 3
    assert result.returncode == -9  # SIGKILL: the worker never said anything itself
    last = result.events[-1]
    assert last["event"] == "cancelled" and last["source"] == "launcher" and "killed" in last["message"]
    assert gone(launcher.pid) and gone(child_pid)


def test_bad_job_files_exit_2_with_an_error_event_naming_the_problem(tmp_path):
    (tmp_path / "invalid.json").write_text('{"task": "diagnostics", ')
    cases = {
        "invalid JSON": (tmp_path / "invalid.json", "is not valid JSON"),
        "unknown task": (job("reconstruct_everything"), "unknown task 'reconstruct_everything'"),
        "missing input": (job("diagnostics", inputs={"sweep": str(tmp_path / "absent.h5")}), "input 'sweep' does not exist"),
        "missing file": (tmp_path / "nowhere.json", "job file not found"),
    }
    for name, (spec, expected) in cases.items():
        result = run_job(spec, timeout=60)
        assert (result.status, result.exit_code, result.returncode) == ("failed", 2, 2), name
        assert expected in result.error, (name, result.error)
        assert [e["event"] for e in result.events] == ["error"], name
    # The raw channel, without the launcher: only JSON lines, the error among them.
    events = tmp_path / "events.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "ultrasound_ai.jobs", "run", str(tmp_path / "invalid.json"), "--events", str(events)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 2 and out.stdout == ""
    lines = events.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["exit_code"] == 2


@pytest.mark.skipif(not POSIX, reason="inherited pipe descriptors are the POSIX variant of the channel")
def test_events_on_an_inherited_pipe():
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **task_env())
    with open(read_fd, "r", encoding="utf-8") as reader:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ultrasound_ai.jobs", "run", "-", "--events-fd", str(write_fd)],
            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
        )
        os.close(write_fd)  # only the worker holds the write end: EOF when it exits
        lines = reader.read().splitlines()
    assert proc.wait(timeout=60) == 2
    assert len(lines) == 1 and "job file not found" in json.loads(lines[0])["message"]


def test_failing_tasks_report_their_message_and_exit_code():
    result = run_job(job("fail", parameters={"message": "the sweep has only one frame"}), env=task_env(), timeout=60)
    assert (result.status, result.exit_code, result.returncode) == ("failed", 1, 1)
    assert result.error == "the sweep has only one frame"
    error = result.events[-1]
    assert error["type"] == "RuntimeError" and "Traceback" in error["traceback"]
    bad = run_job(job("bad_input"), env=task_env(), timeout=60)
    assert (bad.status, bad.exit_code) == ("failed", 2) and "must be a positive integer" in bad.error


def test_no_output_file_is_left_after_a_failure_or_a_cancel(tmp_path):
    # Success first: the file appears complete.
    ok = run_job(job("stepwise_writer", outputs={"data": str(tmp_path / "ok" / "data.bin")}), env=task_env(), timeout=60)
    assert ok.status == "succeeded" and (tmp_path / "ok" / "data.bin").stat().st_size == 4000
    assert ok.outputs == {"data": str(tmp_path / "ok" / "data.bin")}
    # Failure half-way, a handled cancel and a kill after the grace period: nothing left behind.
    runs = {
        "failed": ({"steps": 5, "fail_at": 2}, None),
        "cancelled": ({"steps": 5000, "delay_s": 0.02}, 20.0),
        "killed": ({"steps": 5000, "delay_s": 0.02, "ignore_sigterm": True}, 0.3),
    }
    for name, (parameters, grace) in runs.items():
        folder = tmp_path / name
        launcher = JobLauncher(
            job("stepwise_writer", outputs={"data": str(folder / "data.bin")}, parameters=parameters), env=task_env()
        ).start()
        wait_for_event(launcher, lambda e: e["event"] == "log" and e["message"] == "half written")
        partial = [e["path"] for e in launcher.events() if e["event"] == "partial"]
        assert len(partial) == 1 and is_partial(partial[0])
        if grace is not None:
            assert Path(partial[0]).stat().st_size >= 2000  # really killed mid-way
            launcher.cancel(grace_s=grace)
        result = launcher.wait(timeout=60)
        assert result.status == name.replace("killed", "cancelled"), (name, result.error)
        assert list(folder.iterdir()) == [], name


def test_context_manager_never_leaves_a_job_running():
    with JobLauncher(job("sleep_with_child"), env=task_env()) as launcher:
        wait_for_event(launcher, lambda e: e["event"] == "log")
    assert launcher.poll() == "cancelled" and gone(launcher.pid)


def test_find_python_uses_pythonslicer_inside_slicer(tmp_path, monkeypatch):
    assert find_python() == sys.executable
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "PythonSlicer").write_text("")
    monkeypatch.setattr(sys, "executable", str(fake_bin / "SlicerApp-real"))
    monkeypatch.setitem(sys.modules, "slicer", type(sys)("slicer"))
    sys.modules["slicer"].app = object()
    assert find_python() == str(fake_bin / "PythonSlicer")


# -- diagnostics ------------------------------------------------------------------------------------


def test_diagnostics_as_a_job_writes_its_report(tmp_path):
    report_path = tmp_path / "reports" / "diagnostics.json"
    result = run_job(job("diagnostics", outputs={"report": str(report_path)}, device="cpu"), timeout=120)
    assert result.status == "succeeded", result.error
    report = json.loads(report_path.read_text())
    assert report == result.result
    import torch

    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert isinstance(report["mamba_ssm"]["available"], bool) and report["job_device"] == "cpu"
    assert report["python"]["executable"] == sys.executable
    assert report["packages"]["numpy"]["available"] and report["memory"]["total_bytes"] > 0
    fractions = [e["fraction"] for e in result.events if e["event"] == "progress"]
    assert len(fractions) > 5 and fractions == sorted(fractions)


def test_diagnostics_command_prints_json_and_a_table():
    out = subprocess.run(
        [sys.executable, "-m", "ultrasound_ai.cli", "diagnostics", "--json"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["torch"]["version"].startswith("2.")
    assert "available" in report["mamba_ssm"] and ("reason" in report["mamba_ssm"]) != report["mamba_ssm"]["available"]
    from ultrasound_ai.core.diagnostics import format_diagnostics

    table = format_diagnostics(report)
    assert "torch" in table and report["torch"]["version"] in table and "mamba_ssm" in table


def test_mamba_probe_reports_any_import_failure(monkeypatch):
    from ultrasound_ai.core import diagnostics

    def fake_import(name, *args, **kwargs):
        if name.startswith("mamba_ssm"):
            raise OSError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    real_import = diagnostics.importlib.import_module
    monkeypatch.setattr(diagnostics.importlib, "import_module", fake_import)
    info = diagnostics._mamba_info(cuda_available=True)
    assert info["available"] is False and "libcudart" in info["reason"] and info["importable"] is False
