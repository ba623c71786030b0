"""Job task ``registration.register``: MRI (fixed) + gland label + TRUS (moving) -> rigid transform, in a worker.

JOB.json (see ultrasound_ai.jobs.protocol)::

    {"task": "registration.register",
     "inputs": {"fixed": "MRI.nrrd", "fixed_label": "LABEL.nrrd", "moving": "TRUS.nrrd",
                "initial": "T0.tfm",            # optional: fixed->moving start (default: physical positions)
                "surface": "SURFACE.csv",       # optional: x,y,z LPS gland-surface points (default: from the label)
                "truth": "truth.json",          # optional: {"fixed_to_moving_lps": 4x4} -> SRE
                "moving_label": "US_LABEL.nrrd",  # optional: gland label on the TRUS -> Dice
                "landmarks_fixed": "LF.csv", "landmarks_moving": "LM.csv"},  # optional, paired -> TRE
     (or "inputs": {"case": CASE_DIR, "initial": ...}: a case folder in the docs/DATA_FORMATS.md layout)
     "outputs": {"transform": "T.tfm", "json": "T.json"},   # any non-empty subset
     "parameters": {"method": "attention+refine" | "attention" | "mi", "mode": "label", "checkpoints": null,
                    "guard": true,                # attention: keep a stage's proposal only if LC2 does not drop
                    "iterations": 200, "shrink": [4, 2, 1], "smoothing_mm": [2, 1, 0], "sampling": 0.25,
                    "bins": 32, "use_mask": true, "seed": 12345},
     "device": "auto"}

Transforms follow docs/DATA_FORMATS.md: the result maps a fixed-space LPS point to the moving-space LPS point
(ITK); the JSON output adds ``moving_to_fixed_ras``, the to-parent matrix of a Slicer transform node
applied to the TRUS volume. MI with ``iterations: 0`` returns the initial transform unchanged (a way
to show and measure a given transform through the same path).

Metrics (result["metrics"], keys carry their units; a value that cannot be computed is absent):
  sre_mm / initial_sre_mm   with a truth: mean ||T(p) - T_true(p)|| over the fixed surface points
  tre_mm / initial_tre_mm   with paired landmarks (or landmarks and a truth)
  surface_shift_mm          mean ||T(p) - T_initial(p)||: how far the registration moved the gland surface
  surface_in_fov_pct        % of the surface points mapped by T inside the TRUS volume's non-zero voxels
  dice                      with a moving label: Dice of the fixed label and the moving label mapped onto
                            the MRI grid through T
The last three need no truth: they say whether the result is plausible on a clinical case.

runtime_s is the registration alone; load_s the import and model loading before it. For the attention
methods, result["cascade"] is the guard's report (LC2 at each stage's start and proposal, which was kept
and why; ``inference.guarded_register``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ultrasound_ai.core.errors import InputError

TASK = "registration.register"
METHODS = ("attention+refine", "attention", "mi")
REQUIRED_INPUTS = ("fixed", "fixed_label", "moving")
OPTIONAL_INPUTS = ("initial", "surface", "truth", "moving_label", "landmarks_fixed", "landmarks_moving")
INPUTS = ("case",) + REQUIRED_INPUTS + OPTIONAL_INPUTS
OUTPUTS = ("transform", "json")
DEFAULTS: dict[str, Any] = {
    "method": "attention",
    "mode": "label",
    "checkpoints": None,
    "guard": True,
    "iterations": 200,
    "shrink": [4, 2, 1],
    "smoothing_mm": [2.0, 1.0, 0.0],
    "sampling": 0.25,
    "bins": 32,
    "use_mask": True,
    "seed": 12345,
}
PARAMETERS = tuple(DEFAULTS)
# Progress: reading 0-10 %, registering 10-90 %, metrics and writing 90-100 %.
_REGISTER_SPAN = (0.10, 0.90)
WRITING_FRACTION = 0.95  # reported after the transform file is written, before the JSON


def _check_job(job) -> dict:
    """The task's parameters with defaults; InputError naming every unexpected or missing name."""
    extra = sorted(set(job.inputs) - set(INPUTS))
    if extra:
        raise InputError(f"{TASK}: unknown input(s) {extra}; expected some of {list(INPUTS)}")
    if "case" in job.inputs:
        clash = [k for k in REQUIRED_INPUTS + ("surface", "truth", "moving_label") if k in job.inputs]
        if clash:
            raise InputError(f"{TASK}: give either input 'case' or the separate inputs, not both (also got {clash})")
    else:
        missing = [k for k in REQUIRED_INPUTS if k not in job.inputs]
        if missing:
            raise InputError(f"{TASK}: missing input(s) {missing}; expected fixed (MRI), fixed_label (gland label on "
                             "the MRI grid) and moving (TRUS), or a case folder as input 'case'")
    if ("landmarks_fixed" in job.inputs) != ("landmarks_moving" in job.inputs) and "truth" not in job.inputs:
        raise InputError(f"{TASK}: inputs landmarks_fixed and landmarks_moving come in pairs (or give a truth)")
    extra = sorted(set(job.outputs) - set(OUTPUTS))
    if extra:
        raise InputError(f"{TASK}: unknown output(s) {extra}; expected some of {list(OUTPUTS)}")
    if not job.outputs:
        raise InputError(f"{TASK}: no outputs; expected at least one of {list(OUTPUTS)}")
    extra = sorted(set(job.parameters) - set(PARAMETERS))
    if extra:
        raise InputError(f"{TASK}: unknown parameter(s) {extra}; expected some of {list(PARAMETERS)}")
    params = dict(DEFAULTS)
    params.update(job.parameters)
    if params["method"] not in METHODS:
        raise InputError(f"{TASK}: parameter 'method' must be one of {list(METHODS)}, got {params['method']!r}")
    if params["mode"] not in ("label", "image"):
        raise InputError(f"{TASK}: parameter 'mode' must be 'label' or 'image', got {params['mode']!r}")
    ck = params["checkpoints"]
    if ck is not None:
        if isinstance(ck, str):
            ck = [ck]
        if not isinstance(ck, list) or not ck or not all(isinstance(c, str) and c.strip() for c in ck):
            raise InputError(f"{TASK}: parameter 'checkpoints' must be null or a list of checkpoint paths "
                             f"(stage 1 first), got {params['checkpoints']!r}")
        params["checkpoints"] = ck
    try:
        params["iterations"] = int(params["iterations"])
        params["bins"] = int(params["bins"])
        params["seed"] = int(params["seed"])
        params["sampling"] = float(params["sampling"])
        params["shrink"] = [int(s) for s in params["shrink"]]
        params["smoothing_mm"] = [float(s) for s in params["smoothing_mm"]]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{TASK}: MI parameters must be numbers (iterations, bins, seed, sampling) and lists of "
                         f"numbers (shrink, smoothing_mm): {exc}") from None
    if params["iterations"] < 0:
        raise InputError(f"{TASK}: parameter 'iterations' must be >= 0, got {params['iterations']}")
    if not (0.0 < params["sampling"] <= 1.0):
        raise InputError(f"{TASK}: parameter 'sampling' must be a fraction in (0, 1], got {params['sampling']}")
    return params


def read_truth(path) -> np.ndarray:
    """The fixed->moving LPS 4x4 of a truth file: truth.json ({"fixed_to_moving_lps": 4x4}) or an ITK .tfm."""
    from ultrasound_ai.registration.case import check_rigid_matrix, read_transform_tfm

    path = Path(path)
    if path.suffix.lower() != ".json":
        return read_transform_tfm(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        matrix = doc["fixed_to_moving_lps"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"truth file {path}: expected JSON {{\"fixed_to_moving_lps\": 4x4}}: {exc}") from exc
    return check_rigid_matrix(matrix, f"truth file {path}")


def _load_case(job):
    """A Case from the job's inputs (a case folder, or the separate files)."""
    from ultrasound_ai.io.volume import read_volume
    from ultrasound_ai.registration.case import Case, read_case, read_points_csv

    if "case" in job.inputs:
        case = read_case(job.inputs["case"])
    else:
        names = {"fixed": "fixed (MRI)", "fixed_label": "fixed_label", "moving": "moving (TRUS)"}
        vols = {}
        for key, what in names.items():
            try:
                vols[key] = read_volume(job.inputs[key])
            except InputError as exc:
                raise InputError(f"input {what}: {exc}") from exc
        moving_label = read_volume(job.inputs["moving_label"]) if "moving_label" in job.inputs else None
        surface = read_points_csv(job.inputs["surface"]) if "surface" in job.inputs else None
        truth = read_truth(job.inputs["truth"]) if "truth" in job.inputs else None
        case = Case(vols["fixed"], vols["fixed_label"], vols["moving"], moving_label, surface, truth_fixed_to_moving=truth,
                    name=Path(job.inputs["moving"]).stem.split(".")[0])
        if surface is not None and len(surface) == 0:
            raise InputError(f"input surface {job.inputs['surface']}: no points; expected x,y,z rows (LPS mm)")
    if "landmarks_fixed" in job.inputs:
        case.landmarks_fixed = read_points_csv(job.inputs["landmarks_fixed"])
        case.landmarks_moving = (read_points_csv(job.inputs["landmarks_moving"]) if "landmarks_moving" in job.inputs
                                 else None)
        if case.landmarks_moving is not None and case.landmarks_moving.shape != case.landmarks_fixed.shape:
            raise InputError(f"inputs landmarks_fixed / landmarks_moving: expected paired rows, got "
                             f"{len(case.landmarks_fixed)} and {len(case.landmarks_moving)}")
    return case


def consistency_metrics(T, T_initial, case) -> dict:
    """Measures that need no ground truth (see the module docstring): surface_shift_mm, surface_in_fov_pct,
    and dice when the case has a moving label."""
    from ultrasound_ai.core.geometry import apply_transform
    from ultrasound_ai.io.volume import resample_volume

    pts = case.surface_fixed
    mapped = apply_transform(T, pts)
    out = {"surface_shift_mm": float(np.linalg.norm(mapped - apply_transform(T_initial, pts), axis=1).mean())}
    # Inside the TRUS data: the nearest voxel is in the volume and non-zero (zero = outside the fan).
    idx = np.rint(case.moving.physical_to_index(mapped)).astype(np.int64)
    n = np.array(case.moving.shape_ijk)
    inside = np.all((idx >= 0) & (idx < n), axis=1)
    hit = np.zeros(len(pts), dtype=bool)
    if inside.any():
        i, j, k = idx[inside].T
        hit[inside] = case.moving.array[k, j, i] != 0
    out["surface_in_fov_pct"] = float(100.0 * hit.mean())
    if case.moving_label is not None:
        warped = resample_volume(case.moving_label, case.fixed_label, T, interpolator="nearest").array != 0
        fixed = case.fixed_label.array != 0
        denom = int(warped.sum() + fixed.sum())
        out["dice"] = float(2.0 * np.logical_and(warped, fixed).sum() / denom) if denom else 0.0
    return out


def evaluate(T, T_initial, case) -> dict:
    """Every metric the case allows (see the module docstring), as {name: float}."""
    from ultrasound_ai.registration.metrics import sre, tre

    out = {}
    truth = case.truth_fixed_to_moving
    if truth is not None:
        out["sre_mm"] = sre(T, truth, case.surface_fixed)
        out["initial_sre_mm"] = sre(T_initial, truth, case.surface_fixed)
    if case.landmarks_fixed is not None and len(case.landmarks_fixed) and (
            case.landmarks_moving is not None or truth is not None):
        out["tre_mm"] = tre(T, truth, case.landmarks_fixed, case.landmarks_moving)
        out["initial_tre_mm"] = tre(T_initial, truth, case.landmarks_fixed, case.landmarks_moving)
    out.update(consistency_metrics(T, T_initial, case))
    return out


def register_task(job, ctx) -> dict:
    """Task ``registration.register`` (registered in ultrasound_ai.jobs.registry); see the module docstring."""
    params = _check_job(job)
    from ultrasound_ai.registration.case import read_transform_tfm, result_json, write_transform_tfm
    from ultrasound_ai.registration.preprocessing import check_overlap

    ctx.progress(0.0, "reading the volumes")
    case = _load_case(job)
    T0 = read_transform_tfm(job.inputs["initial"]) if "initial" in job.inputs else np.eye(4)
    check_overlap(case.fixed_label, case.moving, T0)  # before any heavy work
    ctx.check_cancelled()
    report = ctx.stage(*_REGISTER_SPAN)
    method = params["method"]
    ctx.progress(_REGISTER_SPAN[0], f"registering ({method})")
    t0 = time.perf_counter()
    extra: dict = {}
    if method == "mi":
        from ultrasound_ai.registration.mi_baseline import register_mi

        T = register_mi(
            case.fixed, case.moving, initial=T0, fixed_label=case.fixed_label, use_mask=bool(params["use_mask"]),
            shrink=params["shrink"], smoothing_mm=params["smoothing_mm"], iterations=params["iterations"],
            bins=params["bins"], sampling=params["sampling"], seed=params["seed"],
            progress=report, cancel_check=lambda: ctx.cancelled,
        )
        runtime, load = time.perf_counter() - t0, 0.0
    else:
        from ultrasound_ai.registration.inference import register_attention_report

        def progress(fraction, message=""):
            ctx.check_cancelled()  # between the stages' forward passes
            report(fraction, message)

        t_imported = time.perf_counter()
        T, cascade_report = register_attention_report(
            case, initial=T0, checkpoints=params["checkpoints"], mode=params["mode"], device=ctx.device,
            guard=bool(params["guard"]), refine=method == "attention+refine", progress=progress)
        runtime = cascade_report.pop("runtime_s")
        load = cascade_report.pop("load_s") + (t_imported - t0)
        extra["cascade"] = cascade_report
    ctx.check_cancelled()
    ctx.progress(_REGISTER_SPAN[1], "measuring")
    metrics = evaluate(T, T0, case)
    doc = result_json(T, method, initial_fixed_to_moving_lps=np.asarray(T0).tolist(), runtime_s=runtime,
                      load_s=load, metrics=metrics, mode=params["mode"] if method != "mi" else None, **extra)
    if ctx.has_output("transform"):
        write_transform_tfm(T, ctx.output("transform"))
    ctx.progress(WRITING_FRACTION, "writing the results")
    if ctx.has_output("json"):
        with open(ctx.output("json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    ctx.check_cancelled()
    paths = {name: str(job.outputs[name]) for name in OUTPUTS if name in job.outputs}
    doc["paths"] = paths
    doc.update(paths)
    return doc
