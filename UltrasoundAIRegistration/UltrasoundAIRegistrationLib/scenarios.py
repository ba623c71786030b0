"""MRI-TRUS registration scenarios for Testing/mrml/test_registration_module.py and, in Slicer, for
UltrasoundAIRegistrationTest. Shared helpers and the paused-task set-up: ultrasound_ai.mrml.scenario_support.
Every scenario uses ``slicer.mrmlScene`` and real background jobs; a failed check raises AssertionError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ultrasound_ai.mrml import scenario_support as support

# Short names for the shared checks (used on almost every line below).
_check, _close, _partials, _scene_node_ids, _expect_input_error = support.check, support.close, support.partial_files, support.scene_node_ids, support.expect_input_error

PAUSED_TASK = "registration.register_paused"
_PAUSED_TARGET = "UltrasoundAIRegistrationLib.scenarios:paused_register_task"
_MODULE_DIR = str(Path(__file__).resolve().parents[1])
MI_ITERATIONS = 30  # enough for the small phantom to improve on a 6 mm start; a second or two


def _files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else []


# ---------------------------------------------------------------------------------------------------
# Data


def make_case(folder, seed: int = 3) -> Path:
    """A small simulated case folder (coarse voxels, known transform, landmarks); returns its path."""
    from ultrasound_ai.registration.case import write_case
    from ultrasound_ai.registration.phantom import PhantomConfig, simulate_case

    case = simulate_case(seed, PhantomConfig.small())
    return write_case(case, Path(folder) / case.name)


def _ensure_slice_views(scene) -> None:
    # The Slicer application has slice composite nodes (one per view); slicer-core has none, so add one
    # so that the fusion display is checked there too.
    if scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == 0:
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")


def _params(case_nodes, **extra) -> dict:
    out = {"fixedVolume": case_nodes["fixed"], "fixedLabel": case_nodes["fixed_label"],
           "movingVolume": case_nodes["moving"], "device": "cpu"}
    out.update(extra)
    return out


def _perturbed_initial(case, sre_mm: float, seed: int = 1) -> np.ndarray:
    from ultrasound_ai.registration.metrics import perturbation_with_sre

    return perturbation_with_sre(case.truth_fixed_to_moving, sre_mm, case.surface_fixed, np.random.default_rng(seed))


# ---------------------------------------------------------------------------------------------------
# Known transform: LPS/RAS and the direction of the transform


def known_transform_scenario(case_dir, workdir) -> dict:
    """Show the case's true registration through the Logic (no job) and check, in world space, that the
    TRUS lands on the MRI: transform node = moving -> fixed RAS, the TRUS voxel imaging a landmark lies
    on the MRI landmark, the TRUS as the views show it equals the engine's resampling through the truth,
    the biopsy targets in TRUS space are T(p) (LPS) as RAS and overlay the MRI targets, fusion and
    checkerboard display, gland model; a second call replaces the nodes."""
    from ultrasound_ai.core.geometry import LPS_TO_RAS, apply_transform, invert_rigid, lps_to_ras_points
    from ultrasound_ai.io.volume import resample_volume
    from ultrasound_ai.mrml import (
        curve_to_trajectory,
        ijk_to_ras,
        node_to_volume,
        resolve_scene,
        transform_node_to_matrix_ras,
        world_matrix_ras,
    )
    from UltrasoundAIRegistrationLib.logic import (
        OUTPUT_ATTRIBUTE,
        UltrasoundAIRegistrationLogic,
        checkerboard_array,
        moving_to_fixed_ras,
    )

    scene = resolve_scene(None)
    _ensure_slice_views(scene)
    logic = UltrasoundAIRegistrationLogic(workdir=workdir)
    nodes = logic.load_case(case_dir)
    case = nodes["case"]
    T = case.truth_fixed_to_moving
    targets = nodes["landmarks"]
    _check(targets is not None and targets.GetNumberOfControlPoints() >= 3, "the case has no landmarks to use as targets")
    params = _params(nodes, biopsyTargets=targets)
    shown = logic.show_registration(T, params)

    # The transform node: to-parent = moving -> fixed RAS, the parent of the TRUS volume.
    transform = shown["transform"]
    M = transform_node_to_matrix_ras(transform)
    _close(M, LPS_TO_RAS @ invert_rigid(T) @ LPS_TO_RAS, 1e-9, "to-parent matrix vs moving_to_fixed_ras(truth)")
    _close(M, moving_to_fixed_ras(T), 1e-12, "to-parent matrix vs moving_to_fixed_ras")
    _check(nodes["moving"].GetParentTransformNode() is transform, "the TRUS volume is not under the registration transform")
    _check(nodes["fixed"].GetParentTransformNode() is None, "the MRI must stay where it is")
    _check(transform.GetAttribute(OUTPUT_ATTRIBUTE) == "transform", "transform node not tagged")

    # A landmark p (MRI, LPS) and the TRUS voxel that images it coincide in world space.
    moving_node = nodes["moving"]
    ras_to_ijk = np.linalg.inv(ijk_to_ras(moving_node))
    to_world = world_matrix_ras(moving_node)
    for p_lps, q_lps in zip(case.landmarks_fixed, case.landmarks_moving):
        ijk = ras_to_ijk @ np.append(lps_to_ras_points(q_lps), 1.0)  # the TRUS voxel of the landmark
        world = (to_world @ ijk_to_ras(moving_node) @ ijk)[:3]
        _close(world, lps_to_ras_points(p_lps), 1e-6, "TRUS voxel of a landmark vs the MRI landmark (world RAS)")
    # The same through the images: the TRUS as shown (parent transform hardened), resampled onto the MRI
    # grid, equals the engine's own resampling of the TRUS through the truth.
    shown_trus = node_to_volume(moving_node, world=True)
    mine = resample_volume(shown_trus, case.fixed, None, output_dtype=np.float32).array
    engine = resample_volume(case.moving, case.fixed, T, output_dtype=np.float32).array
    _check(float(np.abs(engine).max()) > 0, "the TRUS misses the MRI grid under the truth")
    _close(mine, engine, 1e-3 * float(np.abs(engine).max()), "TRUS in world space vs engine resampling through the truth")
    wrong = resample_volume(case.moving, case.fixed, invert_rigid(T), output_dtype=np.float32).array
    _check(float(np.abs(mine - wrong).mean()) > 10 * float(np.abs(mine - engine).mean()) + 1e-6,
           "the check cannot tell the transform from its inverse")

    # Biopsy targets: TRUS coordinates = T(p) (LPS) as RAS; under the transform they overlay the MRI targets.
    mapped = shown["targets"]
    _check(mapped is not None and mapped.GetNumberOfControlPoints() == targets.GetNumberOfControlPoints(),
           "the mapped target list does not have one point per target")
    _check(mapped.GetParentTransformNode() is transform, "the mapped targets are not under the registration transform")
    local_lps = curve_to_trajectory(mapped)
    _close(local_lps, apply_transform(T, case.landmarks_fixed), 1e-6, "targets in TRUS space vs T_fixed_to_moving(p)")
    p = [0.0, 0.0, 0.0]
    mapped.GetNthControlPointPosition(0, p)
    _close(p, lps_to_ras_points(apply_transform(T, case.landmarks_fixed[:1]))[0], 1e-6, "first target, TRUS RAS")
    _close(curve_to_trajectory(mapped, world=True), case.landmarks_fixed, 1e-6, "mapped targets in world vs MRI targets")
    _check([mapped.GetNthControlPointLabel(k) for k in range(mapped.GetNumberOfControlPoints())]
           == [targets.GetNthControlPointLabel(k) for k in range(targets.GetNumberOfControlPoints())],
           "target labels changed")

    # Fusion: TRUS over MRI at 50 % in every slice view.
    for composite in scene.GetNodesByClass("vtkMRMLSliceCompositeNode"):
        _check(composite.GetBackgroundVolumeID() == nodes["fixed"].GetID(), "slice background is not the MRI")
        _check(composite.GetForegroundVolumeID() == moving_node.GetID(), "slice foreground is not the TRUS")
        _close(composite.GetForegroundOpacity(), 0.5, 1e-12, "foreground opacity")

    # Gland model in MRI space: its bounds lie within the label's bounding box (RAS), give or take a voxel.
    gland = shown["gland"]
    _check(gland is not None and gland.GetPolyData().GetNumberOfPoints() > 100, "no gland model")
    kji = np.argwhere(case.fixed_label.array != 0)
    box = lps_to_ras_points(case.fixed_label.index_to_physical(kji[:, ::-1].astype(float)))
    bounds = np.array(gland.GetPolyData().GetBounds()).reshape(3, 2)
    tol = float(case.fixed.spacing_xyz.max())
    _check(np.all(bounds[:, 0] >= box.min(axis=0) - tol) and np.all(bounds[:, 1] <= box.max(axis=0) + tol),
           f"gland model bounds {bounds.tolist()} outside the label's {box.min(axis=0)} .. {box.max(axis=0)}")

    # Checkerboard option: a second call replaces the nodes and shows the checkerboard instead.
    n_before = scene.GetNumberOfNodes()
    again = logic.show_registration(T, dict(params, checkerboard=True, checkerboardSquareMm=8.0))
    board = again["checkerboard"]
    _check(again["transform"].GetID() == transform.GetID(), "a second run made a new transform node")
    _check(again["targets"].GetID() == mapped.GetID(), "a second run made a new target list")
    _check(again["gland"].GetID() == gland.GetID(), "a second run made a new gland model")
    _check(scene.GetNumberOfNodes() - n_before == (1 + board.GetNumberOfDisplayNodes()),
           f"a second run changed the node count beyond the checkerboard: {n_before} -> {scene.GetNumberOfNodes()}")
    _close(ijk_to_ras(board), ijk_to_ras(nodes["fixed"]), 1e-9, "checkerboard grid vs the MRI grid")
    expected = checkerboard_array(case.fixed, case.fixed.with_array(engine), 8.0)
    _close(node_to_volume(board).array, expected, 1e-4, "checkerboard voxels")
    for composite in scene.GetNodesByClass("vtkMRMLSliceCompositeNode"):
        _check(composite.GetBackgroundVolumeID() == board.GetID() and composite.GetForegroundVolumeID() is None,
               "the checkerboard is not the slice background")
    return {"logic": logic, "nodes": nodes, "shown": again}


# ---------------------------------------------------------------------------------------------------
# Jobs


def initial_truth_job_scenario(case_dir, workdir) -> dict:
    """A real job through files: the truth as the initial transform node and a 0-iteration MI run gives
    back the truth (the node -> .tfm -> job -> JSON -> node path keeps LPS/RAS and the direction), SRE 0."""
    from ultrasound_ai.mrml import resolve_scene, transform_node_to_matrix_ras
    from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic, moving_to_fixed_ras

    resolve_scene(None)
    workdir = Path(workdir)
    logic = UltrasoundAIRegistrationLogic(workdir=workdir)
    nodes = logic.load_case(case_dir)
    T = nodes["case"].truth_fixed_to_moving
    params = _params(nodes, method="mi", miIterations=0, initialTransform=nodes["truth"], truthTransform=nodes["truth"],
                     surfacePoints=nodes["surface"])
    out = logic.run(params)
    payload = out["result"]
    _close(payload["fixed_to_moving_lps"], T, 1e-6, "0-iteration MI result vs the truth given as initial")
    _close(transform_node_to_matrix_ras(out["transform"]), moving_to_fixed_ras(T), 1e-6, "result node vs truth")
    _check(payload["metrics"]["sre_mm"] < 1e-4, f"SRE of the truth against itself: {payload['metrics']}")
    _check(nodes["moving"].GetParentTransformNode() is out["transform"], "TRUS not under the result")
    return {"logic": logic, "nodes": nodes, "out": out}


def mi_job_scenario(case_dir, workdir, initial_sre_mm: float = 6.0, iterations: int = MI_ITERATIONS) -> dict:
    """A background MI job from a perturbed start: progress events, result nodes and files, and an SRE that
    is no worse than the initial one (both reported, from the truth transform node and the surface points)."""
    import json

    from ultrasound_ai.mrml import matrix_to_transform_node_ras, resolve_scene, transform_node_to_matrix_ras
    from ultrasound_ai.mrml.tables import table_to_metrics
    from UltrasoundAIRegistrationLib.logic import (
        UltrasoundAIRegistrationLogic,
        fixed_to_moving_lps,
        moving_to_fixed_ras,
    )

    scene = resolve_scene(None)
    _ensure_slice_views(scene)
    workdir = Path(workdir)
    logic = UltrasoundAIRegistrationLogic(workdir=workdir)
    nodes = logic.load_case(case_dir)
    case = nodes["case"]
    T0 = _perturbed_initial(case, initial_sre_mm)
    initial = matrix_to_transform_node_ras(moving_to_fixed_ras(T0), name="Initial", scene=scene)
    _close(fixed_to_moving_lps(transform_node_to_matrix_ras(initial)), T0, 1e-9, "initial node round trip")
    params = _params(nodes, method="mi", miIterations=iterations, initialTransform=initial,
                     truthTransform=nodes["truth"], surfacePoints=nodes["surface"], biopsyTargets=nodes["landmarks"])
    events = []
    out = logic.run(params, on_event=events.append)

    support.check_progress_events(events)

    payload = out["result"]
    metrics = payload["metrics"]
    _close(metrics["initial_sre_mm"], initial_sre_mm, 1e-6, "initial SRE reported by the job")
    print(f"MI ({iterations} iterations): SRE {metrics['initial_sre_mm']:.2f} mm -> {metrics['sre_mm']:.2f} mm")
    _check(metrics["sre_mm"] <= metrics["initial_sre_mm"], f"MI made the SRE worse: {metrics}")
    _check(out["metrics"] is not None, "no metrics table")
    table = table_to_metrics(out["metrics"])
    _close(table["sre_mm"], metrics["sre_mm"], 1e-9, "metrics table sre_mm")
    T = np.asarray(payload["fixed_to_moving_lps"])
    _close(transform_node_to_matrix_ras(out["transform"]), moving_to_fixed_ras(T), 1e-9, "result node vs the job's T")
    _check(out["targets"] is not None and out["targets"].GetNumberOfControlPoints() == len(case.landmarks_fixed),
           "biopsy targets not mapped")

    # The files the job wrote: the .tfm reads back as T; the JSON's moving_to_fixed_ras is the node's matrix.
    from ultrasound_ai.registration.case import read_transform_tfm

    _close(read_transform_tfm(payload["transform"]), T, 1e-6, "the .tfm output vs the result")
    doc = json.loads(Path(payload["json"]).read_text())
    _close(doc["moving_to_fixed_ras"], transform_node_to_matrix_ras(out["transform"]), 1e-9, "JSON moving_to_fixed_ras")
    _check(not [p for p in workdir.iterdir() if p.name.startswith("inputs-")], "the run's input files were not removed")
    _check(_partials(workdir) == [], f"temporary files left behind: {_partials(workdir)}")
    return {"logic": logic, "nodes": nodes, "out": out, "events": events}


# ---------------------------------------------------------------------------------------------------
# Cancel


def paused_register_task(job, ctx):
    """``registration.register`` that stops after writing its transform file (still temporary) until it
    is cancelled."""
    from ultrasound_ai.registration.tasks import WRITING_FRACTION, register_task

    return register_task(job, support.PausingContext(ctx, WRITING_FRACTION, "registration"))


def _paused_task_env() -> dict:
    return support.paused_task_env(_MODULE_DIR, _PAUSED_TARGET, PAUSED_TASK)


def cancel_scenario(case_dir, workdir, timeout_s: float = 180.0) -> None:
    """Cancel a registration while it writes its outputs: the job ends "cancelled", no node is added or
    changed in the scene, and no file is left in the work folder (outputs, temporaries, inputs)."""
    from ultrasound_ai.mrml import resolve_scene
    from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic

    scene = resolve_scene(None)
    workdir = Path(workdir)
    loader = UltrasoundAIRegistrationLogic(workdir=workdir / "unused")
    nodes = loader.load_case(case_dir)
    logic = UltrasoundAIRegistrationLogic(workdir=workdir / "run")
    before = _scene_node_ids(scene)
    params = _params(nodes, method="mi", miIterations=2, biopsyTargets=nodes["landmarks"])
    launcher = logic.start(params, task=PAUSED_TASK, env=_paused_task_env())
    support.wait_until_paused(launcher, timeout_s)
    _check(_partials(workdir / "run") != [], "expected a half-written transform file while running")

    support.cancel_paused(logic, launcher, params, timeout_s)
    _check(_scene_node_ids(scene) == before, "a cancelled job changed the scene")
    _check(nodes["moving"].GetParentTransformNode() is None, "a cancelled job moved the TRUS")
    _check(_files(workdir / "run") == [], f"files left after cancel: {_files(workdir / 'run')}")


# ---------------------------------------------------------------------------------------------------
# Bad input


def bad_input_scenario(case_dir, workdir) -> None:
    """Clear errors, no job and no change to the scene, for: missing inputs, an unknown method, an empty
    label, a label off the MRI grid, a 2D image, the same volume twice, volumes that do not overlap, and a
    segmentation whose segments are all hidden or absent."""
    from ultrasound_ai.core.geometry import params_to_matrix
    from ultrasound_ai.io.volume import Volume
    from ultrasound_ai.mrml import matrix_to_transform_node, resolve_scene, volume_to_node
    from UltrasoundAIRegistrationLib.logic import UltrasoundAIRegistrationLogic

    scene = resolve_scene(None)
    workdir = Path(workdir)
    logic = UltrasoundAIRegistrationLogic(workdir=workdir / "run")
    nodes = logic.load_case(case_dir)
    case = nodes["case"]
    empty = volume_to_node(case.fixed_label.with_array(np.zeros_like(case.fixed_label.array)), name="EmptyLabel",
                           scene=scene, labelmap=True)
    off = case.fixed_label
    off_grid = volume_to_node(Volume(off.array[:, :, :-3], off.spacing_xyz, off.origin_lps, off.direction),
                              name="CroppedLabel", scene=scene, labelmap=True)
    mv = case.moving
    flat = volume_to_node(Volume(mv.array[:1], mv.spacing_xyz, mv.origin_lps, mv.direction), name="FlatTRUS", scene=scene)
    far = matrix_to_transform_node(params_to_matrix([0.0, 0.0, 500.0, 0.0, 0.0, 0.0]), name="FarAway", scene=scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "NoSegments")
    before = _scene_node_ids(scene)

    def start(**kw):
        return lambda: logic.start(_params(nodes, **{"method": "mi", **kw}))

    _expect_input_error(lambda: logic.start({"fixedVolume": nodes["fixed"], "movingVolume": nodes["moving"]}),
                        "fixedLabel")
    _expect_input_error(lambda: logic.start({"fixedLabel": nodes["fixed_label"], "movingVolume": nodes["moving"]}),
                        "fixedVolume")
    _expect_input_error(start(method="magic"), "method", "magic")
    _expect_input_error(start(fixedLabel=empty), "EmptyLabel", "empty")
    _expect_input_error(start(fixedLabel=off_grid), "CroppedLabel", "same grid")
    _expect_input_error(start(movingVolume=flat), "FlatTRUS", "3D")
    _expect_input_error(start(movingVolume=nodes["fixed"]), "movingVolume")
    _expect_input_error(start(fixedLabel=nodes["moving"]), "fixedLabel", "labelmap")
    _expect_input_error(start(initialTransform=far), "do not overlap")
    _expect_input_error(start(fixedLabel=segmentation), "NoSegments")
    _check(logic.launcher is None, "a job was started for bad input")
    _check(_scene_node_ids(scene) == before, "bad input changed the scene")
    _check(_files(workdir / "run") == [], f"bad input left files: {_files(workdir / 'run')}")
