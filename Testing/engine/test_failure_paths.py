"""Failure paths: nothing half-written on a kill, a cancel, SIGTERM or a full disk; errors that name the
user's path; output paths checked before any work; result/cancel ordering; the thread policy; memory
estimates. The disk tests use a real tmpfs (`mount -t tmpfs`), skipped only where mounting is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import job_test_tasks
import numpy as np
import pytest
from launcher_waiting import wait_for_event

from ultrasound_ai.cli import main as cli_main
from ultrasound_ai.core.atomic import atomic_output, is_partial
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.jobs import launcher as launcher_module
from ultrasound_ai.jobs.launcher import JobLauncher, run_job

# Names added with these failure paths are imported inside the tests, so that each test also runs
# (and fails for its own reason) against the code before them.

HERE = Path(__file__).resolve().parent
LINUX = sys.platform.startswith("linux")


def task_env(**extra) -> dict:
    path = os.pathsep.join(p for p in [str(HERE), os.environ.get("PYTHONPATH", "")] if p)
    return {"ULTRASOUND_AI_EXTRA_TASKS": job_test_tasks.EXTRA_TASKS, "PYTHONPATH": path, **extra}


def job(task, *, outputs=None, parameters=None):
    return {"task": task, "inputs": {}, "outputs": outputs or {}, "parameters": parameters or {}}


def wait_for(launcher: JobLauncher, predicate, timeout=60.0) -> dict:
    return wait_for_event(launcher, predicate, timeout)


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64k", read_only: bool = False):
    """A real small file system at `folder` (skipped with the reason where mounting is refused)."""
    if not LINUX:
        pytest.skip("tmpfs mounts need Linux")
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0777" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here ({done.stderr.strip()}); CI runs as root and runs this")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- one temporary name per output ------------------------------------------------------------------


def test_a_writer_inside_an_atomic_output_reuses_its_temporary_name(tmp_path):
    from ultrasound_ai.core.atomic import add_listener

    final = tmp_path / "est.h5"
    announced = []
    remove = add_listener(lambda tmp, fin: announced.append((tmp, fin)))
    try:
        with atomic_output(final) as outer:
            with atomic_output(outer) as inner:  # what write_sweep does with a task's ctx.output()
                assert inner == outer
                inner.write_bytes(b"complete")
            assert listing(tmp_path) == [outer.name]
    finally:
        remove()
    assert listing(tmp_path) == ["est.h5"] and final.read_bytes() == b"complete"
    assert announced == [(outer, final)]  # announced once, before the file existed


def test_errors_name_the_users_path_not_the_temporary_one(tmp_path):
    final = tmp_path / "volume.nrrd"
    with pytest.raises(PermissionError) as info:
        with atomic_output(final) as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp))
    assert info.value.filename == str(final) and ".partial-" not in str(info.value)
    with pytest.raises(RuntimeError, match="could not encode volume.nrrd$"):
        with atomic_output(final) as tmp:
            raise RuntimeError(f"could not encode {tmp.name}")
    assert listing(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="kills with SIGKILL")
def test_a_worker_killed_at_any_point_of_a_write_leaves_only_the_previous_output(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    previous = folder / "data.bin"
    previous.write_bytes(b"previous result")
    for stop_at in (0, 1, 2):
        launcher = JobLauncher(job("nested_writer", outputs={"data": str(previous)}, parameters={"stop_at": stop_at}),
                               env=task_env()).start()
        wait_for(launcher, lambda e, n=stop_at: e["event"] == "log" and e["message"] == f"point {n}")
        if stop_at == 1:
            assert [p for p in folder.iterdir() if is_partial(p)], "the kill must land mid-write"
        os.kill(launcher.pid, signal.SIGKILL)  # a crash: no clean-up code of the worker runs
        result = launcher.wait(timeout=60)
        assert result.status == "failed", result.error
        assert listing(folder) == ["data.bin"] and previous.read_bytes() == b"previous result", stop_at
    ok = run_job(job("nested_writer", outputs={"data": str(previous)}), env=task_env(), timeout=60)
    assert ok.ok and listing(folder) == ["data.bin"] and previous.read_bytes() == b"new " * 2000
    partials = [e for e in ok.events if e["event"] == "partial"]
    assert len(partials) == 1 and partials[0]["name"] == "data"


@pytest.mark.skipif(os.name != "posix", reason="sends SIGTERM")
def test_sigterm_to_the_cli_removes_the_temporary_file_and_exits_3(tmp_path):
    target = tmp_path / "out.nrrd"
    target.write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import argparse, sys, time
        from ultrasound_ai import cli
        from ultrasound_ai.core.atomic import atomic_output

        def slow_write(args):
            with atomic_output(args.out) as tmp:
                tmp.write_bytes(b"half")
                print("writing", flush=True)
                time.sleep(60)

        build = cli.build_parser
        def with_slow_write():
            parser = build()
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            verb = sub.add_parser("slow-write")
            verb.add_argument("out")
            verb.set_defaults(func=slow_write)
            return parser
        cli.build_parser = with_slow_write
        sys.exit(cli.main(["slow-write", {str(target)!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "SIGTERM" in err and listing(tmp_path) == ["out.nrrd"] and target.read_bytes() == b"previous"


# -- result / cancel ordering -----------------------------------------------------------------------


def test_a_cancel_after_the_result_reports_already_finished_and_keeps_the_outputs(tmp_path):
    out = tmp_path / "data.bin"
    launcher = JobLauncher(job("slow_exit", outputs={"data": str(out)}), env=task_env()).start()
    wait_for(launcher, lambda e: e["event"] == "result")
    assert launcher.cancel(grace_s=0.0) == "already finished"  # the worker is still in its 3 s teardown
    result = launcher.wait(timeout=60)
    assert (result.status, result.exit_code) == ("succeeded", 0)
    assert out.read_bytes() == b"complete"


# -- output paths checked before any work -----------------------------------------------------------


def test_output_paths_are_checked_before_the_task_starts(tmp_path):
    bad_ext = run_job({"task": "diagnostics", "inputs": {}, "outputs": {"report": str(tmp_path / "r.txt")}}, timeout=60)
    assert (bad_ext.status, bad_ext.exit_code) == ("failed", 2)
    assert "r.txt" in bad_ext.error and ".json" in bad_ext.error
    assert not [e for e in bad_ext.events if e["event"] == "started"]  # refused before any work
    unknown = run_job({"task": "diagnostics", "inputs": {}, "outputs": {"repport": str(tmp_path / "r.json")}},
                      timeout=60)
    assert unknown.exit_code == 2 and "repport" in unknown.error
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")
    not_a_folder = run_job({"task": "diagnostics", "inputs": {}, "outputs": {"report": str(blocked / "r.json")}},
                           timeout=60)
    assert not_a_folder.exit_code == 2 and "not a folder" in not_a_folder.error
    assert listing(tmp_path) == ["a-file"]


def test_a_two_file_volume_cannot_be_a_temporary_output(tmp_path):
    from ultrasound_ai.io.volume import write_volume

    with pytest.raises(InputError, match=r"v\.mhd: a \.mhd volume is two files"):
        with atomic_output(tmp_path / "v.mhd") as tmp:
            write_volume(_volume(), tmp)
    assert listing(tmp_path) == []


def test_check_output_path_accepts_a_creatable_folder_and_refuses_bad_extensions(tmp_path):
    from ultrasound_ai.core.atomic import check_output_path

    assert check_output_path(tmp_path / "new" / "deeper" / "v.nii.gz", extensions=(".nii.gz", ".nrrd"))
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(InputError, match=r"--out .*r\.txt: unsupported extension; expected one of \.h5"):
        check_output_path(tmp_path / "r.txt", what="--out", extensions=(".h5",))
    with pytest.raises(InputError, match="existing folder"):
        check_output_path(tmp_path, extensions=None)


def test_registry_output_extensions_match_the_writers():
    from ultrasound_ai.io.volume import WRITE_EXTENSIONS
    from ultrasound_ai.jobs.registry import OUTPUT_EXTENSIONS, TASKS

    assert OUTPUT_EXTENSIONS["freehand.reconstruct"]["volume"] == tuple(e for e in WRITE_EXTENSIONS if e != ".mhd")
    assert set(OUTPUT_EXTENSIONS) == set(TASKS)  # every engine task declares its outputs


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path):
    from ultrasound_ai.core.atomic import check_output_path

    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(InputError, match="read-only file system"):
            check_output_path(ro / "sub" / "v.nrrd")
        refused = run_job({"task": "diagnostics", "inputs": {}, "outputs": {"report": str(ro / "r.json")}}, timeout=60)
        assert refused.exit_code == 2 and "read-only" in refused.error and str(ro) in refused.error


def test_a_file_system_turning_read_only_mid_write_names_the_users_path(tmp_path):
    from ultrasound_ai.core.errors import OutputWriteError

    with tmpfs(tmp_path / "disk", size="1m") as disk:
        final = disk / "out.bin"
        with pytest.raises(OutputWriteError, match=f"cannot write {final}: the file system is read-only"):
            with atomic_output(final) as tmp:
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
                tmp.write_bytes(b"data")
        assert listing(disk) == []


# -- a full disk --------------------------------------------------------------------------------------


def _volume():
    from ultrasound_ai.io.volume import Volume

    rng = np.random.default_rng(0)
    return Volume(rng.random((40, 50, 60)).astype(np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))


def _write_volume(path):
    from ultrasound_ai.io.volume import write_volume

    write_volume(_volume(), path)


def _write_png_pil(path):
    from ultrasound_ai.ulm.rendering import save_png

    save_png(np.random.default_rng(0).random((300, 300)), path)


def _write_png_vtk(path):
    from ultrasound_ai.io.vtk_output import write_vtk_image_png

    write_vtk_image_png(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8), path)


@pytest.mark.parametrize("name, write", [
    ("v.nii", _write_volume), ("v.nrrd", _write_volume), ("v.mha", _write_volume), ("v.nii.gz", _write_volume),
    ("v.mhd", _write_volume), ("p.png", _write_png_pil), ("vtk.png", _write_png_vtk),
])
def test_a_full_disk_is_an_error_naming_the_output_and_leaves_nothing(tmp_path, name, write):
    from ultrasound_ai.core.errors import OutputWriteError

    with tmpfs(tmp_path / "disk", size="64k") as disk:
        final = disk / name
        with pytest.raises(OutputWriteError) as info:
            write(final)
        assert str(info.value) == f"no space left on device writing {final}" or (
            name.endswith(".mhd") and str(info.value).startswith("no space left on device writing"))
        assert listing(disk) == []


def test_hdf5_on_a_full_disk_exits_1_through_the_cli_without_a_crash(tmp_path):
    with tmpfs(tmp_path / "disk", size="64k") as disk:
        target = disk / "sweep.h5"
        done = subprocess.run([sys.executable, "-m", "ultrasound_ai.cli", "freehand", "simulate", str(target),
                               "--frames", "10", "--quiet"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-2000:]  # not 139 (segmentation fault) nor 2
        assert done.stderr.strip().splitlines()[-1] == f"ultrasound-ai: error: no space left on device writing {target}"
        assert listing(disk) == []


# -- threads ------------------------------------------------------------------------------------------


def test_usable_cores_follow_the_affinity_with_fallbacks(monkeypatch):
    from ultrasound_ai.core import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert threads.usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # Windows and macOS have none
    import psutil

    monkeypatch.setattr(psutil.Process, "cpu_affinity", lambda self: [0, 1], raising=False)
    assert threads.usable_cores() == 2
    monkeypatch.setattr(psutil.Process, "cpu_affinity", lambda self: (_ for _ in ()).throw(AttributeError()),
                        raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert threads.usable_cores() == 6


def test_choose_threads_leaves_a_core_and_honours_overrides(monkeypatch):
    from ultrasound_ai.core import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.choose_threads(leave_free=1) == 3 and threads.choose_threads() == 4
    monkeypatch.setattr(threads, "usable_cores", lambda: 1)
    assert threads.choose_threads(leave_free=1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads(leave_free=1) == 2 and threads.choose_threads(5) == 5


def test_a_job_from_slicer_leaves_one_core_and_waits_passively(monkeypatch):
    from ultrasound_ai.core import threads

    monkeypatch.setattr(launcher_module, "_inside_slicer", lambda: True)
    monkeypatch.setattr(launcher_module, "find_python", lambda: sys.executable)
    env = task_env(OMP_NUM_THREADS=None, OMP_WAIT_POLICY=None, MKL_NUM_THREADS=None)
    result = run_job(job("report_threads"), env=env, timeout=120)
    assert result.ok, result.error
    expected = max(1, threads.usable_cores() - 1)
    assert result.result["torch_threads"] == expected and result.result["omp_num_threads"] == str(expected)
    assert result.result["omp_wait_policy"] == "PASSIVE" and not result.result["torch_imported_before_task"]
    assert result.events[0]["threads"] == expected
    # An explicit count goes to the worker's --threads (which the CLI test below exercises).
    assert JobLauncher(job("report_threads"), threads=3)._thread_arguments() == ["--threads", "3"]
    with pytest.raises(InputError, match="threads"):
        JobLauncher(job("report_threads"), threads=0)


def test_cli_threads_option_sets_the_policy(monkeypatch, capsys):
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "")) if name in os.environ else monkeypatch.delenv(name, raising=False)
    import torch

    before = torch.get_num_threads()
    try:
        assert cli_main(["--threads", "1", "diagnostics", "--json"]) == 0
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as info:
        cli_main(["--threads", "0", "diagnostics"])
    assert info.value.code == 2 and "positive integer" in capsys.readouterr().err


# -- memory estimates ---------------------------------------------------------------------------------


def test_check_memory_names_the_option_and_the_sizes():
    from ultrasound_ai.core import atomic, memory

    memory.check_memory(2**30, what="a block", option="--block-frames", available=8 * 2**30)
    with pytest.raises(InputError, match=r"--block-frames: a block of 20000 frames would need about 6\.4 GiB, but "
                                         r"only 2\.0 GiB is available in memory; lower --block-frames"):
        memory.check_memory(6.4 * 2**30, what="a block of 20000 frames", option="--block-frames",
                            available=2 * 2**30)
    assert memory.available_memory_bytes() > 0
    assert atomic.final_path_of("nothing") is None


@pytest.fixture
def tiny_ulm_acquisition(tmp_path):
    from ultrasound_ai.io.ulm_files import Acquisition, write_acquisition

    rng = np.random.default_rng(1)
    iq = (rng.standard_normal((40, 16, 16)) + 1j * rng.standard_normal((40, 16, 16))).astype(np.complex64)
    path = tmp_path / "acq.h5"
    write_acquisition(Acquisition(iq=iq, pixel_size_mm=(0.1, 0.1), origin_mm=(5.0, -0.8), frame_rate_hz=1000.0,
                                  wavelength_mm=0.1), path)
    return path


def test_ulm_refuses_sizes_that_cannot_fit_in_memory_before_any_work(tiny_ulm_acquisition, capsys, monkeypatch):
    out = tiny_ulm_acquisition.parent / "r.h5"
    base = ["ulm", "process", str(tiny_ulm_acquisition), "--out", str(out), "--bubbles-per-frame", "2", "--quiet"]
    # 1e5 pixels per wavelength: a grid of 1.6e6 x 1.6e6 pixels (about 112 TiB), not an allocator crash.
    assert cli_main([*base, "--resolution-factor", "100000"]) == 2
    err = capsys.readouterr().err
    assert "--resolution-factor" in err and "TiB" in err and "is available in memory" in err
    from ultrasound_ai.core import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda device=None: 100_000)
    assert cli_main([*base, "--block-frames", "20000"]) == 2
    err = capsys.readouterr().err
    assert "--block-frames" in err and "a block of 40 frames of 16x16 pixels" in err
    assert not out.exists()


def test_output_extensions_are_checked_before_the_work(tiny_ulm_acquisition, tmp_path, capsys):
    assert cli_main(["ulm", "process", str(tiny_ulm_acquisition), "--out", str(tmp_path / "r.txt"), "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err
    img = tmp_path / "img.nrrd"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(img))
    # The model does not exist either: the output is refused first, before anything is loaded.
    assert cli_main(["foundation", "segment", str(img), "--model", "no_such_model", "--output",
                     str(tmp_path / "m.txt")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "m.txt" in err and "unsupported extension" in err


# -- freehand: evaluation is a phase of its own; memory estimates; parameter types ----------------------


@pytest.fixture(scope="module")
def small_sweep_file(tmp_path_factory):
    from ultrasound_ai.freehand.simulation.phantom import Psf
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
    from ultrasound_ai.io.sweep import write_sweep

    sweep = simulate_sweep(5, n_frames=30, tactic="linear", frame_shape=(64, 72), psf=Psf(), reverse=False)
    path = tmp_path_factory.mktemp("sweep") / "sweep.h5"
    write_sweep(sweep, path)
    return path


def test_metrics_are_computed_only_when_asked_and_never_for_tracked_by_default(small_sweep_file):
    from ultrasound_ai.freehand.reconstruct import run_reconstruction

    messages = []
    tracked = run_reconstruction(small_sweep_file, "tracked", progress=lambda f, m: messages.append(m))
    assert tracked.metrics is None and "evaluate" not in tracked.seconds
    assert not [m for m in messages if "pixel error" in m]
    imu = run_reconstruction(small_sweep_file, "imu", progress=lambda f, m: messages.append(m))
    assert imu.metrics is not None and imu.metrics["md_mm"] > 0 and imu.seconds["evaluate"] >= 0
    assert run_reconstruction(small_sweep_file, "imu", evaluate=False).metrics is None


def test_evaluation_reports_progress_and_is_cancelled_inside_it(small_sweep_file, tmp_path):
    from ultrasound_ai.core.errors import Cancelled
    from ultrasound_ai.freehand.reconstruct import run_reconstruction

    seen = []

    def progress(fraction, message):
        seen.append((fraction, message))

    def cancel():  # the user presses Cancel once the pixel errors are being computed
        return any("pixel error" in m for _, m in seen)

    with pytest.raises(Cancelled):
        run_reconstruction(small_sweep_file, "imu", out_volume=tmp_path / "v.nrrd", evaluate=True,
                           progress=progress, cancel=cancel)
    evaluation = [f for f, m in seen if "pixel error" in m]
    assert evaluation and all(0.45 <= f <= 0.55 for f in evaluation)
    assert seen[-1][1] == "global pixel error"  # stopped there, the volume never started
    assert listing(tmp_path) == []


def test_a_wrong_parameter_type_in_a_job_is_bad_input(small_sweep_file, tmp_path):
    import io

    from ultrasound_ai.jobs.protocol import decode_event
    from ultrasound_ai.jobs.worker import EventWriter, execute

    for parameters, needle in (({"max_voxels": "lots"}, "'max_voxels' must be a positive integer, got str 'lots'"),
                               ({"spacing_mm": [1]}, "'spacing_mm' must be a positive number"),
                               ({"evaluate": "yes"}, "'evaluate' must be true or false")):
        stream = io.StringIO()
        job_data = {"task": "freehand.reconstruct", "inputs": {"sweep": str(small_sweep_file)},
                    "outputs": {"volume": str(tmp_path / "v.nrrd")}, "parameters": parameters, "device": "cpu"}
        assert execute(job_data, EventWriter(stream)) == 2, parameters
        error = decode_event(stream.getvalue().splitlines()[-1])
        assert needle in error["message"] and "traceback" not in error
    assert listing(tmp_path) == []


def test_compounding_and_fima_estimate_memory_before_allocating(small_sweep_file, monkeypatch):
    from ultrasound_ai.core import memory
    from ultrasound_ai.freehand.reconstruct import run_reconstruction

    monkeypatch.setattr(memory, "available_memory_bytes", lambda device=None: 200_000)
    with pytest.raises(InputError, match=r"--spacing \(spacing_mm\): a compounding grid of \d+x\d+x\d+ voxels"):
        run_reconstruction(small_sweep_file, "tracked", make_volume=True, spacing_mm=0.2)
    from ultrasound_ai.freehand.fima.method import estimate_sweep, method_options, window_memory_bytes
    from ultrasound_ai.freehand.fima.model import FimaNet, make_config
    from ultrasound_ai.io.sweep import read_sweep

    # Calibration: bench_fima_memory measured 9.5 GiB for the paper preset's 179 pairs at once.
    assert 8.5 < window_memory_bytes(make_config("paper"), 179) / 2**30 < 11
    net = FimaNet(make_config("tiny", "rem")).eval()
    sweep = read_sweep(small_sweep_file)
    with pytest.raises(InputError, match=r"pair_chunk \(fima method parameter\): encoding 15 frame pairs"):
        estimate_sweep(net, {"input": {}}, sweep, method_options({"online_align": False}, net.cfg, 0))


def test_ulm_job_parameters_of_the_wrong_type_are_bad_input(tiny_ulm_acquisition):
    import io

    from ultrasound_ai.jobs.protocol import decode_event
    from ultrasound_ai.jobs.worker import EventWriter, execute

    for parameters in ({"block_frames": "lots"}, {"resolution_factor": "x"}, {"link_distance_px": [1]}):
        stream = io.StringIO()
        job_data = {"task": "ulm.process", "inputs": {"acquisition": str(tiny_ulm_acquisition)},
                    "outputs": {"result": str(tiny_ulm_acquisition.parent / "r.h5")}, "parameters": parameters}
        assert execute(job_data, EventWriter(stream)) == 2, parameters
        name = next(iter(parameters))
        assert f"parameter {name!r} must be" in decode_event(stream.getvalue().splitlines()[-1])["message"]


def test_registration_refuses_a_bad_output_before_reading_the_volumes(tmp_path, capsys):
    # The inputs do not even exist: the output is the first thing checked.
    missing = str(tmp_path / "missing.nrrd")
    assert cli_main(["registration", "register", "--fixed", missing, "--moving", missing, "--method", "mi",
                     "--out", str(tmp_path / "T.txt.gz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "unsupported extension" in err


def test_a_freehand_job_announces_one_temporary_per_output(small_sweep_file, tmp_path):
    import io

    from ultrasound_ai.jobs.protocol import decode_event
    from ultrasound_ai.jobs.worker import EventWriter, execute

    class Watching(io.StringIO):
        """Every time an event is sent, the temporary files on disk must all have been announced."""

        def __init__(self):
            super().__init__()
            self.unannounced = set()

        def write(self, text):
            n = super().write(text)
            told = {e["path"] for e in map(decode_event, self.getvalue().splitlines()) if e["event"] == "partial"}
            self.unannounced |= {str(p) for p in tmp_path.iterdir() if is_partial(p)} - told
            return n

    stream = Watching()
    outputs = {"estimate": str(tmp_path / "e.h5"), "volume": str(tmp_path / "v.nrrd")}
    job_data = {"task": "freehand.reconstruct", "inputs": {"sweep": str(small_sweep_file)}, "outputs": outputs,
                "parameters": {"method": "imu", "spacing_mm": 0.8}, "device": "cpu"}
    assert execute(job_data, EventWriter(stream)) == 0
    # Before: the estimate went through three nested temporary names and only the outermost was told,
    # while the file on disk had another.
    assert stream.unannounced == set()
    partials = [e for e in map(decode_event, stream.getvalue().splitlines()) if e["event"] == "partial"]
    assert sorted(e["name"] for e in partials) == ["estimate", "volume"]
    assert all(Path(e["path"]).name.count(".partial-") == 1 for e in partials)
    assert listing(tmp_path) == ["e.h5", "v.nrrd"]


def test_the_cli_skips_or_asks_for_the_metrics(small_sweep_file, capsys):
    # (--no-metrics and the default for other methods go through run_reconstruction's evaluate, tested above.)
    base = ["freehand", "reconstruct", str(small_sweep_file), "--quiet"]
    assert cli_main([*base, "--method", "tracked"]) == 0 and "fdr_pct" not in capsys.readouterr().out
    assert cli_main([*base, "--method", "tracked", "--metrics"]) == 0 and "fdr_pct" in capsys.readouterr().out
