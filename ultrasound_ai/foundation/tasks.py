"""Job tasks ``foundation.segment`` and ``foundation.classify``: an image or a stack of frames -> a label
volume on the input's geometry / class probabilities, in a worker.

JOB.json (see ultrasound_ai.jobs.protocol)::

    {"task": "foundation.segment",                 # or "foundation.classify"
     "inputs": {"image": "IMAGE.nrrd"},             # 2D, or frames along the third axis; scalar or RGB(A)
     "outputs": {"labels": "LABELS.nrrd",           # segment: the label map on the input's geometry
                 "probabilities": "PROB.nrrd",      # segment, optional: probability of any structure
                 "table": "PROBS.csv"},             # optional: per-frame class probabilities (classify) or
                                                    # label fractions (segment)
     "parameters": {"model": null,                  # installed model name or .pt; null = the default one
                    "pixel_spacing_mm": [0.3, 0.3], # the input's physical pixel size (x, y); "file" = the
                                                    # file's spacing; null = unknown (warned, resized whole)
                    "region": [x0, y0, x1, y1],     # optional image rectangle (inclusive pixel indices)
                    "frame": null},                 # a frame index = only that frame (current frame)
     "device": "auto"}

Progress is reported after every frame and Cancel is honoured between frames. A cine's third axis is
time: frames are segmented one by one, never as a volume. The result names the model and its classes,
the pixel sizes used, any warning (e.g. no physical pixel size), and per frame the class probabilities
(classify) or the fraction of pixels of each label (segment).
"""

from __future__ import annotations

import csv
from typing import Any

from ultrasound_ai.core.errors import InputError

INPUTS = ("image",)
PARAMETERS = ("model", "pixel_spacing_mm", "region", "frame")
OUTPUTS = {"foundation.segment": ("labels", "probabilities", "table"), "foundation.classify": ("table",)}
REQUIRED = {"foundation.segment": ("labels",), "foundation.classify": ()}
_WORK = (0.05, 0.95)  # progress span of the frames (loading the model before, the table after)


def _check_job(job, name: str) -> dict[str, Any]:
    from ultrasound_ai.core.atomic import check_output_path

    if sorted(job.inputs) != list(INPUTS):
        raise InputError(f"{name}: expected exactly the input 'image' (an image or frame stack, e.g. NRRD), got "
                         f"{sorted(job.inputs) or 'none'}")
    extra = sorted(set(job.outputs) - set(OUTPUTS[name]))
    if extra:
        raise InputError(f"{name}: unknown output(s) {extra}; expected some of {list(OUTPUTS[name])}")
    missing = [o for o in REQUIRED[name] if o not in job.outputs]
    if missing:
        raise InputError(f"{name}: missing output(s) {missing}")
    extra = sorted(set(job.parameters) - set(PARAMETERS))
    if extra:
        hint = " (the device is the job's 'device' key)" if "device" in extra else ""
        raise InputError(f"{name}: unknown parameter(s) {extra}{hint}; expected some of {list(PARAMETERS)}")
    if "table" in job.outputs:
        check_output_path(job.outputs["table"], what=f"{name} output 'table'", extensions=[".csv"])
    _check_parameters(job, dict(job.parameters))
    return dict(job.parameters)


def _check_parameters(job, params: dict) -> None:
    """Spacing, region and frame checked against the image header before the model is loaded."""
    import SimpleITK as sitk

    from ultrasound_ai.foundation.inference import check_region, check_spacing

    if params.get("pixel_spacing_mm") != "file":
        check_spacing(params.get("pixel_spacing_mm"))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(job.inputs["image"]))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # unreadable: read_input raises the InputError naming the file
    size = reader.GetSize()
    check_region(params.get("region"), (int(size[1]), int(size[0])))
    frame, n = params.get("frame"), int(size[2]) if len(size) > 2 else 1
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < n):
        raise InputError(f"frame: expected a frame index in 0..{n - 1} of {job.inputs['image']}, got {frame!r}")


def _write_table(path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _run(job, ctx, name: str) -> dict:
    from ultrasound_ai.foundation.inference import classify_file, default_model_for, load_model, segment_file

    task = name.split(".", 1)[1]
    params = _check_job(job, name)
    ctx.check_cancelled()
    ctx.progress(0.0, "loading the model")
    lm = load_model(params.get("model") or default_model_for(task), job.device, task)
    report = ctx.stage(*_WORK)
    common = dict(device=job.device, pixel_spacing_mm=params.get("pixel_spacing_mm"), region=params.get("region"),
                  frame=params.get("frame"), cancel_check=lambda: ctx.cancelled, warn=ctx.log)
    n = _frame_count(job.inputs["image"], params.get("frame"))
    verb = "segmenting" if task == "segment" else "classifying"
    common["progress"] = lambda f: report(f, f"{verb}: frame {max(1, round(f * n))} of {n}")
    if task == "segment":
        result = segment_file(job.inputs["image"], ctx.output("labels"), lm,
                              probabilities_path=ctx.output("probabilities") if ctx.has_output("probabilities") else None,
                              **common)
        header = ["frame"] + [f"fraction_{c}" for c in result["label_names"]]
        rows = [[i] + [round(v, 6) for v in fr] for i, fr in zip(result["frame_indices"],
                                                                   result["label_fraction_per_frame"])]
    else:
        result = classify_file(job.inputs["image"], lm, **common)
        header = ["frame"] + list(result["class_names"]) + ["predicted"]
        rows = [[i] + list(p) + [c] for i, p, c in zip(result["frame_indices"], result["probabilities"],
                                                       result["predicted"])]
    ctx.check_cancelled()
    if ctx.has_output("table"):
        ctx.progress(0.97, "writing the table")
        _write_table(ctx.output("table"), header, rows)
    result["description"] = lm.card.get("description", "")
    # Paths of the job's temporary files mean nothing to the caller.
    result.pop("output", None)
    result["input"] = str(job.inputs["image"])
    return result


def _frame_count(path, frame) -> int:
    """Frames the task will process, from the file's header (for progress messages only)."""
    import SimpleITK as sitk

    if frame is not None:
        return 1
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 1  # unreadable: read_input raises the InputError naming the file
    size = reader.GetSize()
    return int(size[2]) if len(size) > 2 else 1


def segment_task(job, ctx) -> dict:
    """``foundation.segment``; see the module docstring."""
    return _run(job, ctx, "foundation.segment")


def classify_task(job, ctx) -> dict:
    """``foundation.classify``; see the module docstring."""
    return _run(job, ctx, "foundation.classify")
