"""Job task ``freehand.reconstruct``: a sweep file -> estimated poses, volume (and picture), in a worker.

JOB.json (see ultrasound_ai.jobs.protocol)::

    {"task": "freehand.reconstruct",
     "inputs": {"sweep": "SWEEP.h5"},
     "outputs": {"estimate": "EST.h5", "volume": "VOL.nrrd", "png": "VOL.png"},   # any non-empty subset
     "parameters": {"method": "imu", "spacing_mm": 0.5, "compounding": "mean", "fill_holes": "none",
                    "fill_kernel_mm": 1.0, "checkpoint": null, "method_params": {}, "max_voxels": 40000000,
                    "evaluate": false},
     "device": "auto"}

The work is ``freehand.reconstruct.run_reconstruction`` (the same pipeline as the CLI): the method sees
the sweep without its tforms (unless it is ``tracked``). The metrics against the input's tforms are a
phase of their own, run only when asked for ("evaluate": true; the panel asks when the sweep has tracker
poses and the method is not ``tracked``) and when the input has tforms; it reports progress and
honours Cancel like the others. Outputs are written to the job's temporary paths and
renamed by the worker only when the task succeeds, so a failure or a cancel leaves nothing behind.
The result: {"method", "n_frames", "spacing_mm", "coverage_fraction", "metrics" (dict with unit-bearing
keys, or None without ground truth), "notes", "seconds", "paths": {output name: final path}}, plus
the final paths as top-level "estimate" / "volume" / "png" keys.
"""

from __future__ import annotations

from typing import Any

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.jobs.protocol import number_parameter

TASK = "freehand.reconstruct"

INPUTS = ("sweep",)
OUTPUTS = ("estimate", "volume", "png")
PARAMETERS = ("method", "spacing_mm", "compounding", "fill_holes", "fill_kernel_mm", "checkpoint",
              "method_params", "max_voxels", "evaluate")
DEFAULTS: dict[str, Any] = {"method": "tracked", "spacing_mm": 0.5, "compounding": "mean", "fill_holes": "none",
                            "fill_kernel_mm": 1.0, "checkpoint": None, "method_params": None,
                            "evaluate": False}


def _check_job(job) -> dict:
    """The task's parameters with defaults; InputError naming every unexpected or missing name."""
    missing = [k for k in INPUTS if k not in job.inputs]
    if missing:
        raise InputError(f"freehand.reconstruct: missing input {missing[0]!r}; expected inputs {{'sweep': SWEEP.h5}}")
    extra = sorted(set(job.inputs) - set(INPUTS))
    if extra:
        raise InputError(f"freehand.reconstruct: unknown input(s) {extra}; expected only 'sweep'")
    extra = sorted(set(job.outputs) - set(OUTPUTS))
    if extra:
        raise InputError(f"freehand.reconstruct: unknown output(s) {extra}; expected some of {list(OUTPUTS)}")
    if not job.outputs:
        raise InputError(f"freehand.reconstruct: no outputs; expected at least one of {list(OUTPUTS)}")
    extra = sorted(set(job.parameters) - set(PARAMETERS))
    if extra:
        raise InputError(f"freehand.reconstruct: unknown parameter(s) {extra}; expected some of {list(PARAMETERS)}")
    params = dict(DEFAULTS)
    params.update(job.parameters)
    if not isinstance(params["method"], str) or not params["method"].strip():
        raise InputError(f"freehand.reconstruct: parameter 'method' must be a method name, got {params['method']!r}")
    if params["method_params"] is not None and not isinstance(params["method_params"], dict):
        raise InputError("freehand.reconstruct: parameter 'method_params' must be an object of method options")
    if params["checkpoint"] is not None and not isinstance(params["checkpoint"], str):
        raise InputError("freehand.reconstruct: parameter 'checkpoint' must be a file path or null")
    if not isinstance(params["evaluate"], bool):
        raise InputError(f"freehand.reconstruct: parameter 'evaluate' must be true or false, got {params['evaluate']!r}")
    for name in ("spacing_mm", "fill_kernel_mm"):
        params[name] = number_parameter(TASK, name, params[name])
    if "max_voxels" in params:
        params["max_voxels"] = number_parameter(TASK, "max_voxels", params["max_voxels"], integer=True)
    return params


def reconstruct_task(job, ctx) -> dict:
    """Task ``freehand.reconstruct`` (registered in ultrasound_ai.jobs.registry); see the module docstring."""
    params = _check_job(job)
    from ultrasound_ai.freehand.reconstruct import run_reconstruction

    ctx.progress(0.0, f"reconstructing with {params['method']}")
    kwargs = {}
    if "max_voxels" in params:
        kwargs["max_voxels"] = params["max_voxels"]
    run = run_reconstruction(
        job.inputs["sweep"],
        params["method"].strip(),
        # ctx.output gives temporary paths the worker renames only after the task returned.
        out_sweep=ctx.output("estimate") if ctx.has_output("estimate") else None,
        out_volume=ctx.output("volume") if ctx.has_output("volume") else None,
        out_png=ctx.output("png") if ctx.has_output("png") else None,
        spacing_mm=params["spacing_mm"],
        compounding=params["compounding"],
        fill_holes=params["fill_holes"],
        fill_kernel_mm=params["fill_kernel_mm"],
        device=ctx.device,
        checkpoint=params["checkpoint"],
        method_params=params["method_params"],
        evaluate=params["evaluate"],
        progress=ctx.progress,
        cancel=lambda: ctx.cancelled,
        **kwargs,
    )
    ctx.check_cancelled()
    paths = {name: str(job.outputs[name]) for name in OUTPUTS if name in job.outputs}
    summary = run.to_dict()
    result = {
        "method": run.method,
        "n_frames": run.n_frames,
        "spacing_mm": run.spacing_mm,
        "coverage_fraction": run.coverage_fraction,
        "metrics": run.metrics,
        "notes": summary["notes"],
        "seconds": summary["seconds"],
        "paths": paths,
    }
    result.update(paths)
    return result
