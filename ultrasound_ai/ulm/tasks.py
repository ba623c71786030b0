"""Job task ``ulm.process``: an ULM acquisition -> ULM result (density, direction, velocity), in a worker.

JOB.json (see ultrasound_ai.jobs.protocol)::

    {"task": "ulm.process",
     "inputs": {"acquisition": "ACQ.h5"},               # the ULM acquisition contract (iq or bmode)
     "outputs": {"result": "RESULT.h5",                 # the ULM result contract
                 "png": "MAPS.png"},                    # optional: density | direction | velocity picture
     "parameters": {"method": "rs",                     # rs | wa | 3dml (or another registered method)
                    "bubbles_per_frame": 40,            # omitted: the counting network (rs/wa: when installed)
                    "resolution_factor": 10, "link_distance_px": 2, "min_track_length": 15,
                    "svd_cutoff": 4, "band_hz": null, "block_frames": 800,
                    "checkpoint": null,                 # 3DML-ResNet .pt (3dml, counting network); null = installed
                    "window_mode": "tiled", ...},       # any other field of pipeline.UlmParams but device
     "device": "auto"}

Progress is reported after every block, and Cancel is honoured between blocks. The outputs are
written through the job's temporary paths (renamed into place only when the task succeeds).

Result: {"method", "n_frames", "n_localizations", "n_tracked_localizations", "n_tracks",
"image_shape", "pixel_size_mm", and "metrics" when the acquisition holds ground truth}. The metrics
(PALA definitions, `ultrasound_ai.ulm.metrics`) are computed after processing, from the file's
`gt_positions`, which the processing itself never reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.jobs.protocol import number_parameter

TASK = "ulm.process"
INPUTS = ("acquisition",)
OUTPUTS = ("result", "png")
# Progress: processing 0-90 %, metrics and the picture 90-100 %.
_PROCESS_SPAN = (0.0, 0.90)


def _params(job) -> tuple[str, dict[str, Any]]:
    """(method, UlmParams keyword arguments) from the job's parameters; InputError naming any bad name."""
    from ultrasound_ai.ulm.pipeline import UlmParams

    fields = set(UlmParams.__dataclass_fields__) - {"device"}
    allowed = {"method", "checkpoint"} | fields
    extra = sorted(set(job.parameters) - allowed)
    if extra:
        hint = " (the device is the job's 'device' key)" if "device" in extra else ""
        raise InputError(f"{TASK}: unknown parameter(s) {extra}{hint}; expected some of {sorted(allowed)}")
    params = dict(job.parameters)
    method = params.pop("method", "rs")
    if not isinstance(method, str) or not method.strip():
        raise InputError(f"{TASK}: parameter 'method' must be a method name such as 'rs', 'wa' or '3dml', got {method!r}")
    if "checkpoint" in params:
        # "checkpoint" is the Slicer-facing name of UlmParams.model.
        if params.get("model") is not None:
            raise InputError(f"{TASK}: give either 'checkpoint' or 'model', not both")
        params["model"] = params.pop("checkpoint")
    # Plain numbers must be numbers (a string "lots" is bad input, exit 2); UlmParams checks the ranges.
    for name in ("block_frames", "link_distance_px", "max_gap", "min_track_length", "smooth_window",
                 "resolution_factor", "window", "margin_frames", "max_maxima", "window_stride"):
        if params.get(name) is not None:
            integer = isinstance(getattr(UlmParams, name, None), int)  # from the default's type
            params[name] = number_parameter(TASK, name, params[name], integer=integer, positive=False)
    if params.get("band_hz") is not None and not isinstance(params["band_hz"], (list, tuple)):
        raise InputError(f"{TASK}: parameter 'band_hz' must be null or [lo, hi] in Hz, got {params['band_hz']!r}")
    if isinstance(params.get("svd_cutoff"), list):
        params["svd_cutoff"] = tuple(params["svd_cutoff"])
    if isinstance(params.get("fwhm_px"), list):
        params["fwhm_px"] = tuple(params["fwhm_px"])
    if params.get("svd_cutoff") == 0:
        params["svd_cutoff"] = None  # as the CLI: 0 = no SVD filter
    return method.strip().lower(), params


def _metrics(result, acquisition_path) -> dict | None:
    """PALA metrics against the file's ground truth, or None when it has none."""
    from ultrasound_ai.io.ulm_files import acquisition_info, read_gt_positions
    from ultrasound_ai.ulm.metrics import evaluate_result, localization_metrics

    gt = read_gt_positions(acquisition_path)
    if gt is None:
        return None
    info = acquisition_info(acquisition_path)
    if gt.shape[1] == 4:
        return evaluate_result(result, gt, info.wavelength_mm, info.frame_rate_hz)
    # [K, 3] truth has no bubble ids, hence no true tracks to render: localization metrics only.
    loc = result.localizations
    tracked = localization_metrics(loc[loc[:, 4] >= 0, :3], gt[:, :3], info.wavelength_mm)
    out = dict(tracked)
    out["tracked"] = tracked
    out["raw"] = localization_metrics(loc[:, :3], gt[:, :3], info.wavelength_mm)
    out["wavelength_mm"] = float(info.wavelength_mm)
    return out


def process_task(job, ctx) -> dict:
    """Run the ULM pipeline on the job's acquisition; see the module docstring."""
    from ultrasound_ai.ulm.pipeline import UlmParams, process_acquisition
    from ultrasound_ai.ulm.rendering import save_maps_png

    extra = sorted(set(job.inputs) - set(INPUTS))
    if extra or "acquisition" not in job.inputs:
        raise InputError(f"{TASK}: expected exactly the input 'acquisition' (an ULM acquisition .h5), got "
                         f"{sorted(job.inputs) or 'none'}")
    extra = sorted(set(job.outputs) - set(OUTPUTS))
    if extra:
        raise InputError(f"{TASK}: unknown output(s) {extra}; expected 'result' and optionally 'png'")
    if "result" not in job.outputs:
        raise InputError(f"{TASK}: missing output 'result' (the ULM result .h5)")
    method, kwargs = _params(job)
    try:
        params = UlmParams(device=job.device, **kwargs)
    except TypeError as exc:  # a field given a value the dataclass cannot take
        raise InputError(f"{TASK}: bad parameters: {exc}") from None
    acq = job.inputs["acquisition"]
    ctx.check_cancelled()
    report = ctx.stage(*_PROCESS_SPAN)
    result = process_acquisition(acq, method, params, ctx.output("result"),
                                 progress=lambda f, msg: report(f, f"localizing and tracking: {msg}"),
                                 cancel_check=lambda: ctx.cancelled)
    ctx.check_cancelled()
    if ctx.has_output("png"):
        ctx.progress(0.92, "writing the picture")
        save_maps_png({"density": result.density, "direction": result.direction,
                       "velocity_mm_s": result.velocity_mm_s}, ctx.output("png"))
    loc = result.localizations
    summary: dict[str, Any] = {
        "method": method,
        "n_frames": int(result.attrs.get("n_frames", 0)),
        "n_localizations": int(loc.shape[0]),
        "n_tracked_localizations": int((loc[:, 4] >= 0).sum()),
        "n_tracks": int(result.attrs.get("n_tracks", 0)),
        "image_shape": [int(v) for v in np.shape(result.density)],
        "pixel_size_mm": [float(v) for v in result.pixel_size_mm],
    }
    ctx.progress(0.95, "metrics")
    metrics = _metrics(result, acq)
    if metrics is not None:
        summary["metrics"] = metrics
    return summary
