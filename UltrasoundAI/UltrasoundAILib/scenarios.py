"""Freehand reconstruction scenarios, run by Testing/mrml/test_freehand_module.py (slicer-core) and by
UltrasoundAITest inside Slicer: the same checks in both (what they share and how a job is paused for
the cancel scenario: ultrasound_ai.mrml.scenario_support). Each works on ``slicer.mrmlScene``, runs real
jobs and raises AssertionError when a check fails; ``paused_reconstruct_task`` is imported by the worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ultrasound_ai.mrml import scenario_support as support

# Short names for the shared checks (used on almost every line below).
_check, _close, _partials, _scene_node_ids, _expect_input_error = support.check, support.close, support.partial_files, support.scene_node_ids, support.expect_input_error

# The cancel scenario's task, made importable for the worker through ULTRASOUND_AI_EXTRA_TASKS.
PAUSED_TASK = "freehand.reconstruct_paused"
_PAUSED_TARGET = "UltrasoundAILib.scenarios:paused_reconstruct_task"
_PAUSE_AT = 0.92  # run_reconstruction's "writing" stage: the estimate's temporary file exists then
_MODULE_DIR = str(Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------------------------------
# Data


def make_sweep(path, seed: int = 7, n_frames: int = 10, frame_shape=(40, 48), pixel_spacing=(0.3, 0.25),
               n_imus: int = 2, imu: bool = True) -> Path:
    """A small simulated sweep file (tracked poses, IMU data unless imu=False); non-square pixels so
    that an axis swap cannot pass."""
    import dataclasses

    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
    from ultrasound_ai.io.sweep import write_sweep

    sweep = simulate_sweep(seed, n_frames=n_frames, frame_shape=tuple(frame_shape), pixel_spacing=tuple(pixel_spacing),
                           n_imus=n_imus)
    if not imu:
        sweep = dataclasses.replace(sweep, imu_acc=None, imu_euler_deg=None, imu_position_mm=None)
    return write_sweep(sweep, Path(path))


# ---------------------------------------------------------------------------------------------------
# Reconstruction


def reconstruct_scenario(sweep_path, method: str, workdir, browser=None, repeat: bool = False,
                         spacing_mm: float = 0.6) -> dict:
    """Load the sweep as a browser (unless given), run the Logic with `method` in a real job and check
    every result node against the files the job wrote. With repeat=True load the results a second
    time and check that they replaced the first nodes instead of adding new ones. Returns {"logic", "browser", "nodes", ...}."""
    from ultrasound_ai.core.geometry import LPS_TO_RAS, lps_to_ras_points
    from ultrasound_ai.freehand.metrics import evaluate_sweep
    from ultrasound_ai.io.sweep import read_sweep
    from ultrasound_ai.io.volume import read_volume
    from ultrasound_ai.mrml import curve_to_trajectory, ijk_to_ras, node_to_volume
    from ultrasound_ai.mrml.sequences import _browser_sequences
    from ultrasound_ai.mrml.tables import table_to_metrics
    from UltrasoundAILib.logic import IMU_TABLE_ROLE, OUTPUT_ATTRIBUTE, UltrasoundAILogic, frame_centres_lps

    workdir = Path(workdir)
    truth = read_sweep(sweep_path)
    n, h, w = truth.frames.shape
    sx, sy = truth.pixel_spacing_xy
    logic = UltrasoundAILogic(workdir=workdir)
    if browser is None:
        browser = logic.load_sweep(sweep_path)
    _check(browser.GetNodeReference(IMU_TABLE_ROLE) is not None or truth.imu_acc is None,
           "the browser of a sweep with IMU data must reference its IMU table")

    # The sweep file the job reads, written from the browser: frames, poses, timing and IMU data.
    prepared = read_sweep(logic.prepare_inputs(browser, workdir / "prepared"))
    _check(np.array_equal(prepared.frames, truth.frames), "frames changed on the way through the browser")
    _close(prepared.pixel_spacing_xy, truth.pixel_spacing_xy, 1e-12, "pixel spacing through the browser")
    _close(prepared.tforms, truth.tforms, 1e-9, "tracked poses through the browser")
    if truth.imu_acc is not None:
        _check(np.array_equal(prepared.imu_acc, truth.imu_acc), "imu_acc changed through the IMU table")
        _check(np.array_equal(prepared.imu_euler_deg, truth.imu_euler_deg), "imu_euler_deg changed through the IMU table")
        _close(prepared.imu_position_mm, truth.imu_position_mm, 0.0, "imu_position_mm through the IMU table")
        _close(prepared.times_s(), truth.times_s(), 1e-12, "frame times through the browser")

    events = []
    parameters = {"inputBrowser": browser, "method": method, "outputSpacing": spacing_mm, "device": "cpu"}
    nodes = logic.run(parameters, on_event=events.append)

    support.check_progress_events(events)

    payload = nodes["result"]
    estimate = read_sweep(payload["estimate"])
    volume_file = read_volume(payload["volume"])
    _check(payload["method"] == method and estimate.attrs.get("pose_method") == method,
           f"the estimate names method {estimate.attrs.get('pose_method')!r}, expected {method!r}")
    _check(np.array_equal(estimate.frames, truth.frames), "the estimate file's frames differ from the input's")
    _close(estimate.tforms[0], np.eye(4), 1e-9, "estimate tforms[0] (must be the identity)")

    # Estimated transform sequence: N items in the browser, mapping pixels to RAS as the estimate says.
    seq = nodes["estimate"]
    _check(any(s is seq for s in _browser_sequences(browser)), "the estimate sequence is not in the browser")
    _check(seq.GetNumberOfDataNodes() == n, f"estimate sequence has {seq.GetNumberOfDataNodes()} items, expected {n}")
    _check(seq.GetAttribute(OUTPUT_ATTRIBUTE) == "estimate", "estimate sequence not tagged")
    pixel = np.array([3.0, 5.0, 0.0, 1.0])  # column 3, row 5
    for k in range(n):
        matrix = vtk_to_numpy_matrix(seq.GetNthDataNode(k))
        expected = lps_to_ras_points((estimate.tforms[k] @ np.array([3 * sx, 5 * sy, 0.0, 1.0]))[None, :3])[0]
        _close((matrix @ pixel)[:3], expected, 1e-6, f"estimate item {k}: pixel (3, 5) in RAS")
        _check(seq.GetNthIndexValue(k) == browser.GetMasterSequenceNode().GetNthIndexValue(k),
               f"estimate item {k} is not at the frame's index value")

    # Volume node: the NRRD's voxels on the NRRD's grid.
    volume_node = nodes["volume"]
    _close(ijk_to_ras(volume_node), LPS_TO_RAS @ volume_file.ijk_to_lps(), 1e-9, "volume IJKToRAS vs the NRRD")
    _check(np.array_equal(node_to_volume(volume_node).array, volume_file.array), "volume voxels differ from the NRRD's")
    _check(float(volume_file.array.max()) > 0, "the reconstructed volume is empty")

    # Trajectory: one control point per frame, at the estimated frame centres.
    curve = nodes["trajectory"]
    _check(curve.GetNumberOfControlPoints() == n, f"curve has {curve.GetNumberOfControlPoints()} points, expected {n}")
    centres = frame_centres_lps(estimate)
    _close(curve_to_trajectory(curve), centres, 1e-6, "curve points vs estimated frame centres (LPS)")
    p = [0.0, 0.0, 0.0]
    curve.GetNthControlPointPosition(n - 1, p)
    _close(p, lps_to_ras_points(centres[-1:])[0], 1e-6, "last curve point in RAS")

    # Metrics: asked for because the sweep has tracker poses, except with `tracked`, whose estimate is
    # those poses (nothing to measure: the job skips its evaluation phase).
    metrics_node = nodes["metrics"]
    table = None
    if method == "tracked":
        _check(metrics_node is None, "a metrics table for the tracked method, which does not ask for one")
    else:
        _check(metrics_node is not None, "no metrics table although the sweep has tracked poses")
        table = table_to_metrics(metrics_node)
        for key in ("fdr_pct", "adr_pct", "md_mm", "sd_mm", "hd_mm", "mea_deg", "gpe_mm", "lpe_mm"):
            _check(key in table and np.isfinite(table[key]), f"metrics table lacks a finite {key}: {table}")
        reference = evaluate_sweep(estimate.tforms, truth.tforms, (h, w), truth.pixel_spacing_xy)
        for key, value in reference.items():
            _close(table[key], value, 1e-6 * max(1.0, abs(value)), f"metrics table {key} vs evaluate_sweep")

    _check(_partials(workdir) == [], f"temporary files left behind: {_partials(workdir)}")

    out = {"logic": logic, "browser": browser, "nodes": nodes, "estimate": estimate, "metrics": table,
           "events": events}
    if repeat:
        scene = browser.GetScene()
        n_sync = len(_browser_sequences(browser))
        n_nodes = scene.GetNumberOfNodes()
        # Replacement is load_results' business: loading the same job's result again must reuse the
        # nodes (a second job would only cost time).
        again = logic.load_results(logic.launcher.result, parameters)
        for kind in ("volume", "trajectory", "metrics"):
            if nodes[kind] is None:  # no metrics for `tracked`
                _check(again[kind] is None, f"a repeated run made a {kind} node")
                continue
            _check(again[kind].GetID() == nodes[kind].GetID(), f"a repeated run made a new {kind} node instead of replacing it")
        _check(len(_browser_sequences(browser)) == n_sync, "a repeated run added another estimate sequence")
        _check(scene.GetNumberOfNodes() == n_nodes, f"a repeated run changed the node count {n_nodes} -> {scene.GetNumberOfNodes()}")
        _check(again["estimate"].GetName() == seq.GetName(), "a repeated run renamed the estimate sequence")
        out["nodes"] = again
    return out


def vtk_to_numpy_matrix(transform_node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToParent(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---------------------------------------------------------------------------------------------------
# Cancel


def paused_reconstruct_task(job, ctx):
    """``freehand.reconstruct`` that stops mid-way (outputs half written) until it is cancelled."""
    from ultrasound_ai.freehand.tasks import reconstruct_task

    return reconstruct_task(job, support.PausingContext(ctx, _PAUSE_AT, "reconstruction"))


def _paused_task_env() -> dict:
    return support.paused_task_env(_MODULE_DIR, _PAUSED_TARGET, PAUSED_TASK)


def cancel_scenario(sweep_path, workdir, timeout_s: float = 180.0) -> None:
    """Cancel a reconstruction while it is writing its outputs: the job ends "cancelled", no result
    node appears in the scene, and no output or temporary file is left."""
    from UltrasoundAILib.logic import UltrasoundAILogic

    workdir = Path(workdir)
    logic = UltrasoundAILogic(workdir=workdir)
    browser = logic.load_sweep(sweep_path)
    scene = browser.GetScene()
    before = _scene_node_ids(scene)
    parameters = {"inputBrowser": browser, "method": "tracked", "outputSpacing": 0.6, "device": "cpu"}
    launcher = logic.start(parameters, task=PAUSED_TASK, env=_paused_task_env())
    events = support.wait_until_paused(launcher, timeout_s)
    announced = [e["name"] for e in events if e.get("event") == "partial"]
    _check(sorted(announced) == ["estimate", "volume"], f"expected both outputs announced as temporary, got {announced}")
    _check(_partials(workdir) != [], "expected half-written outputs in the work folder while running")

    support.cancel_paused(logic, launcher, parameters, timeout_s)
    _check(_scene_node_ids(scene) == before, "a cancelled job changed the scene")
    _check(_partials(workdir) == [], f"half-written files left after cancel: {_partials(workdir)}")
    outputs = [p for p in workdir.iterdir() if p.suffix in (".nrrd",) or p.name.endswith("-estimate.h5")]
    _check(outputs == [], f"outputs left after cancel: {outputs}")


# ---------------------------------------------------------------------------------------------------
# Bad input


def bad_input_scenario(workdir, with_job: bool = True) -> None:
    """Clear errors, and nothing created, for: an empty browser, a browser whose image sequence is
    empty, a missing sweep file, an unknown method, no input at all, and (with_job) the IMU method on a
    sweep without IMU data (an error reported by the real job)."""
    from ultrasound_ai.mrml import resolve_scene
    from UltrasoundAILib.logic import UltrasoundAILogic

    workdir = Path(workdir)
    scene = resolve_scene(None)
    logic = UltrasoundAILogic(workdir=workdir)
    empty = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "EmptySweep")
    hollow = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "HollowSweep")
    hollow.SetAndObserveMasterSequenceNodeID(scene.AddNewNodeByClass("vtkMRMLSequenceNode", "HollowFrames").GetID())
    before = _scene_node_ids(scene)

    _expect_input_error(lambda: logic.start({"inputBrowser": empty, "method": "tracked"}), "EmptySweep", "no frames")
    _expect_input_error(lambda: logic.start({"inputBrowser": hollow, "method": "tracked"}), "HollowSweep", "no frames")
    missing = workdir / "no-such-sweep.h5"
    _expect_input_error(lambda: logic.start({"inputSweepFile": str(missing), "method": "tracked"}), str(missing))
    _expect_input_error(lambda: logic.start({"inputSweepFile": str(missing), "method": "no-such-method"}),
                        "no-such-method", "tracked")
    _expect_input_error(lambda: logic.start({"method": "tracked"}), "inputBrowser", "inputSweepFile")
    _expect_input_error(lambda: logic.start({"inputSweepFile": str(missing), "outputSpacing": -1}), "outputSpacing")
    _check(logic.launcher is None, "a job was started for bad input")
    _check(_scene_node_ids(scene) == before, "bad input changed the scene")

    if with_job:
        sweep_path = make_sweep(workdir / "no-imu.h5", imu=False)
        browser = logic.load_sweep(sweep_path)
        before = _scene_node_ids(scene)
        launcher = logic.start({"inputBrowser": browser, "method": "imu", "device": "cpu"})
        result = launcher.wait(180)
        _check(result.status == "failed" and result.exit_code == 2, f"expected a bad-input failure, got {result.status}")
        _expect_input_error(lambda: logic.load_results(result, {"inputBrowser": browser, "method": "imu"}), "IMU")
        _check(_scene_node_ids(scene) == before, "a failed job changed the scene")
        _check(_partials(workdir) == [] and not list(workdir.glob("*.nrrd")), "a failed job left files")
