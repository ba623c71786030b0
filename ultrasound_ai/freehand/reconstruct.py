"""End-to-end freehand reconstruction: sweep -> poses (a registered method) -> volume -> output files.

Used by the CLI (``ultrasound-ai freehand reconstruct`` / ``evaluate``, in cli.py), the job task
``freehand.reconstruct`` (the Slicer module) and ``ultrasound-ai demo``:

    result = run_reconstruction("sweep.h5", "imu", out_sweep="est.h5", out_volume="vol.nrrd",
                                out_png="vol.png", progress=lambda f, msg: ..., cancel=lambda: False)

The estimate file is a sweep contract file: the input's frames, the estimated ``tforms``
(``tforms[0]`` = identity), timestamps / frame rate and IMU data copied, ``imu_weights`` when the
method gives them, and attributes naming the method (``pose_method``) and the source file. The volume
lies in the first frame's image coordinates (the estimate's world), on a grid aligned with that frame.
Every output is written under a temporary name and renamed only when all of them are complete, so a
failure or a cancel leaves no output behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ultrasound_ai.core.errors import Cancelled, InputError

__all__ = [
    "DEFAULT_SPACING_MM",
    "DEFAULT_MAX_VOXELS",
    "ReconstructionRun",
    "estimate_to_sweep",
    "method_notes",
    "blank_frames_note",
    "choose_grid",
    "run_reconstruction",
    "evaluate_files",
]

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

DEFAULT_SPACING_MM = 0.5
# A drifting estimate (IMU dead reckoning) can spread frames over metres; past this many voxels the
# spacing is coarsened (and the run says so) instead of exhausting memory.
DEFAULT_MAX_VOXELS = 40_000_000

# Share of the progress bar per stage: read, poses, evaluation (when asked for), volume, outputs.
_STAGES = {"read": (0.0, 0.05), "poses": (0.05, 0.45), "evaluate": (0.45, 0.55), "volume": (0.55, 0.9),
           "write": (0.9, 1.0)}


@dataclass
class ReconstructionRun:
    """What ``run_reconstruction`` did. ``to_dict()`` is the JSON-able summary (job result, CLI)."""

    method: str
    source: str
    n_frames: int
    tforms: np.ndarray
    imu_weights: Optional[np.ndarray] = None
    volume: object = None  # io.volume.Volume (float32) when a volume was made
    coverage: object = None  # io.volume.Volume (uint8): 1 where a pixel was pasted
    coverage_fraction: Optional[float] = None
    spacing_mm: Optional[float] = None
    metrics: Optional[dict] = None
    outputs: dict = field(default_factory=dict)  # "sweep" / "volume" / "png" -> path written
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    method_attrs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "source": self.source,
            "n_frames": self.n_frames,
            "spacing_mm": self.spacing_mm,
            "coverage_fraction": self.coverage_fraction,
            "metrics": self.metrics,
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "seconds": self.seconds,
            "notes": list(self.notes),
        }


class _Progress:
    """Maps stage-local fractions onto the whole run and checks for cancellation at every report."""

    def __init__(self, progress: Optional[ProgressFn], cancel: Optional[CancelFn]):
        self._progress = progress
        self._cancel = cancel

    def check(self) -> None:
        if self._cancel is not None and self._cancel():
            raise Cancelled("reconstruction cancelled")

    def stage(self, name: str) -> ProgressFn:
        lo, hi = _STAGES[name]

        def report(fraction: float, message: str = "") -> None:
            self.check()
            if self._progress is not None:
                f = min(1.0, max(0.0, float(fraction)))
                self._progress(lo + (hi - lo) * f, message)

        return report


def estimate_to_sweep(sweep, tforms: np.ndarray, method: str, imu_weights=None, source: str | None = None,
                      method_attrs: dict | None = None):
    """The estimate as a sweep contract object: input frames/timing/IMU data, estimated tforms, attrs."""
    import dataclasses

    from ultrasound_ai import __version__

    attrs = dict(sweep.attrs)
    attrs.update({
        "pose_method": method,
        "pose_source_file": "" if source is None else str(source),
        "pose_estimated_by": f"ultrasound-ai {__version__}",
    })
    for k, v in (method_attrs or {}).items():
        attrs[f"pose_{k}"] = v
    return dataclasses.replace(sweep, tforms=np.asarray(tforms, dtype=np.float64), imu_weights=imu_weights,
                               attrs=attrs)


def method_notes(attrs: dict) -> list[str]:
    """What a user should know about how a pose method read this sweep (CLI notes, the Slicer panel's status):
    its skips and warnings as the method wrote them, and a frame stride other than 1."""
    notes = [str(attrs[k]) for k in ("direction_skipped", "smoothing_skipped", "pair_interval_warning") if attrs.get(k)]
    stride = int(attrs.get("frame_stride", 1) or 1)
    if stride > 1:
        interval = attrs.get("pair_interval_s")
        apart = f", pairs {1000 * float(interval):.0f} ms apart" if interval else ""
        notes.append(f"read one frame in {stride}{apart} (the interval the model was trained on); the frames "
                     "between interpolated")
    return notes


BLANK_FRAME_STD = 1.0  # grey levels: a lifted-off probe or a frozen screen leaves (almost) no texture


def blank_frames_note(frames) -> Optional[str]:
    """A note naming the frames without an image (uniform: the probe lifted off, a frozen or blanked screen), whose
    motion no method reads from the images; None when there are none."""
    f = np.asarray(frames)
    n = len(f)
    std = np.concatenate([c.reshape(len(c), -1).std(axis=1) for c in np.array_split(f, -(-n // 64))])  # bounded memory
    blank = np.flatnonzero(std < BLANK_FRAME_STD)
    if blank.size == 0:
        return None
    runs = np.split(blank, np.flatnonzero(np.diff(blank) > 1) + 1)
    named = ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return (f"frames {named} ({blank.size} of {n}) show no image (uniform: probe lifted off or screen frozen?); "
            "their motion is not read from the images")


def choose_grid(tforms, frame_shape_hw, pixel_spacing_xy, spacing_mm=DEFAULT_SPACING_MM,
                max_voxels: int = DEFAULT_MAX_VOXELS):
    """Output grid aligned with the first frame; coarsened if it would exceed `max_voxels`.

    Returns (grid, spacing used, note or None).
    """
    from ultrasound_ai.freehand.compounding import output_grid_for

    try:
        spacing = float(spacing_mm)
    except (TypeError, ValueError):
        spacing = float("nan")
    if not (math.isfinite(spacing) and spacing > 0):
        raise InputError(f"spacing: expected a positive voxel size in mm, got {spacing_mm!r}")
    grid = output_grid_for(tforms, frame_shape_hw, pixel_spacing_xy, spacing, orientation="first")
    note = None
    if grid.n_voxels > max_voxels:
        factor = (grid.n_voxels / max_voxels) ** (1.0 / 3.0)
        coarse = math.ceil(spacing * factor * 1.05 * 100.0) / 100.0
        grid = output_grid_for(tforms, frame_shape_hw, pixel_spacing_xy, coarse, orientation="first")
        note = (f"the frames span {np.ptp(np.asarray(tforms)[:, :3, 3], axis=0).round(1).tolist()} mm; voxel size "
                f"raised from {spacing:g} to {coarse:g} mm to stay under {max_voxels} voxels")
        spacing = coarse
    return grid, spacing, note


def _load_sweep(sweep):
    from ultrasound_ai.io.sweep import Sweep, read_sweep

    if isinstance(sweep, Sweep):
        return sweep.validate(name="input sweep"), "<in memory>"
    if not isinstance(sweep, (str, os.PathLike)):
        raise InputError(f"sweep: expected a sweep file path or a Sweep, got {type(sweep).__name__}")
    return read_sweep(sweep), str(sweep)


def _check_output_path(path, what: str, suffixes: tuple[str, ...]) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path)
    if not any(p.name.lower().endswith(s) for s in suffixes):
        raise InputError(f"{what} {p}: expected a file name ending in {' or '.join(suffixes)}")
    if p.exists() and p.is_dir():
        raise InputError(f"{what} {p}: is a folder; expected a file name")
    from ultrasound_ai.core.atomic import check_output_path

    return check_output_path(p, what=what)  # its folder can be made and written, before any work


def run_reconstruction(sweep, method: str = "tracked", *, out_sweep=None, out_volume=None, out_png=None,
                       spacing_mm: float = DEFAULT_SPACING_MM, compounding: str = "mean", fill_holes: str = "none",
                       fill_kernel_mm: float = 1.0, device="auto", checkpoint: Optional[str] = None,
                       method_params: Optional[dict] = None, evaluate: Optional[bool] = None,
                       make_volume: Optional[bool] = None,
                       max_voxels: int = DEFAULT_MAX_VOXELS, png_size=(900, 700), title: Optional[str] = None,
                       progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> ReconstructionRun:
    """Estimate the poses of a sweep with `method`, compound a volume and write the requested outputs.

    sweep: a sweep file (HDF5 contract) or a ``Sweep``. out_sweep (.h5), out_volume (.nrrd/.nii.gz/.mha/
    .nii) and out_png (.png) are optional; nothing is written without them. The volume is built when
    out_volume or out_png is asked for (or make_volume=True). evaluate: compare the estimate with the
    input's true tforms (``metrics.evaluate_sweep``, into ``run.metrics``): True, False, or None = when
    the method is not ``tracked`` (whose estimate is the truth itself); a phase of its own, with
    progress and cancel checks, skipped without true tforms. progress(fraction, message)
    and cancel() -> bool (True = stop: raises ``Cancelled``, nothing written) serve the job runner.
    """
    from ultrasound_ai.freehand.methods import get_method

    p = _Progress(progress, cancel)
    out_sweep = _check_output_path(out_sweep, "estimate output", (".h5", ".hdf5"))
    out_volume = _check_output_path(out_volume, "volume output", (".nrrd", ".nii.gz", ".nii", ".mha"))
    out_png = _check_output_path(out_png, "picture output", (".png",))
    pose_method = get_method(method)  # unknown names fail before any work
    from ultrasound_ai.freehand.compounding import COMPOUNDING_MODES, FILL_METHODS

    if compounding not in COMPOUNDING_MODES:
        raise InputError(f"compounding: expected one of {', '.join(COMPOUNDING_MODES)}, got {compounding!r}")
    if fill_holes not in FILL_METHODS:
        raise InputError(f"fill_holes: expected one of {', '.join(FILL_METHODS)}, got {fill_holes!r}")

    read = p.stage("read")
    read(0.0, "reading the sweep")
    t0 = time.perf_counter()
    sw, source = _load_sweep(sweep)
    n, h, w = sw.frames.shape
    read(1.0, f"read {n} frames of {h}x{w}")
    seconds = {"read": time.perf_counter() - t0}

    t0 = time.perf_counter()
    est = pose_method.estimate(sw, device=device, checkpoint=checkpoint, progress=p.stage("poses"), cancel=cancel,
                               **(method_params or {}))
    seconds["poses"] = time.perf_counter() - t0
    run = ReconstructionRun(method=pose_method.name, source=source, n_frames=n, tforms=est.tforms,
                            imu_weights=est.imu_weights, method_attrs=dict(est.attrs), seconds=seconds)
    run.notes.extend(method_notes(est.attrs))
    blank = blank_frames_note(sw.frames)
    if blank:
        run.notes.append(blank)

    if evaluate is None:
        evaluate = pose_method.name != "tracked"
    if evaluate and sw.tforms is not None:
        from ultrasound_ai.freehand.metrics import evaluate_sweep

        t0 = time.perf_counter()
        try:
            # Every pixel of every frame (GPE, LPE): long on big sweeps, so it reports and can be cancelled.
            run.metrics = evaluate_sweep(est.tforms, sw.tforms, (h, w), sw.pixel_spacing_xy,
                                         progress=p.stage("evaluate"))
        except InputError as exc:  # e.g. a motionless tracked sweep: rates undefined, still reconstruct
            run.notes.append(f"metrics not computed: {exc}")
        seconds["evaluate"] = time.perf_counter() - t0

    want_volume = make_volume if make_volume is not None else (out_volume is not None or out_png is not None)
    if want_volume:
        from ultrasound_ai.freehand.compounding import reconstruct_volume

        t0 = time.perf_counter()
        vol_progress = p.stage("volume")
        grid, spacing, note = choose_grid(est.tforms, (h, w), sw.pixel_spacing_xy, spacing_mm, max_voxels)
        if note:
            run.notes.append(note)
            vol_progress(0.0, note)
        result = reconstruct_volume(sw.frames, est.tforms, sw.pixel_spacing_xy, grid=grid, compounding=compounding,
                                    fill_holes=fill_holes, fill_kernel_mm=fill_kernel_mm, device=device,
                                    progress=vol_progress)
        run.volume = result.volume
        run.coverage = result.coverage
        run.spacing_mm = spacing
        run.coverage_fraction = float(np.mean(result.coverage.array > 0))
        seconds["volume"] = time.perf_counter() - t0

    p.check()
    write = p.stage("write")
    t0 = time.perf_counter()
    _write_outputs(run, sw, source, out_sweep, out_volume, out_png, png_size, title, write)
    seconds["write"] = time.perf_counter() - t0
    write(1.0, "done")
    return run


def _write_outputs(run: ReconstructionRun, sw, source, out_sweep, out_volume, out_png, png_size, title, report):
    """Write every output under a temporary name; rename them all only when all are complete."""
    from ultrasound_ai.core.atomic import atomic_output
    from ultrasound_ai.core.geometry import normalize_to_first
    from ultrasound_ai.io.sweep import write_sweep
    from ultrasound_ai.io.volume import write_volume

    n, h, w = sw.frames.shape
    with contextlib.ExitStack() as stack:
        if out_sweep is not None:
            report(0.0, f"writing {out_sweep.name}")
            tmp = stack.enter_context(atomic_output(out_sweep))
            write_sweep(estimate_to_sweep(sw, run.tforms, run.method, run.imu_weights, source, run.method_attrs), tmp)
            run.outputs["sweep"] = out_sweep
        if out_volume is not None:
            report(0.3, f"writing {out_volume.name}")
            tmp = stack.enter_context(atomic_output(out_volume))
            write_volume(run.volume, tmp, compress=True)
            run.outputs["volume"] = out_volume
        if out_png is not None:
            from ultrasound_ai.freehand.render import render_reconstruction_png

            report(0.6, f"rendering {out_png.name}")
            tmp = stack.enter_context(atomic_output(out_png))
            truth = normalize_to_first(sw.tforms) if sw.tforms is not None and run.method != "tracked" else None
            caption = title or f"{run.method} reconstruction of {Path(source).name}"
            if run.metrics:
                m = run.metrics
                caption += f"\nFDR {m['fdr_pct']:.1f} %  MD {m['md_mm']:.1f} mm  MEA {m['mea_deg']:.2f} deg"
            render_reconstruction_png(run.volume, tmp, est_tforms=run.tforms, true_tforms=truth, frame_shape_hw=(h, w),
                                      pixel_spacing_xy=sw.pixel_spacing_xy, size=png_size, title=caption,
                                      est_label=run.method)
            run.outputs["png"] = out_png
        report(0.95, "finishing outputs")
        run.outputs = dict(run.outputs)
    # Leaving the stack renamed every temporary file (or removed them all on an error).


# ----------------------------------------------------------------------------------------------
# Evaluation of an estimate file against the truth
# ----------------------------------------------------------------------------------------------


def evaluate_files(estimate_path, truth_path) -> dict:
    """Metrics of an estimate file against a sweep with true tforms (keys carry units)."""
    from ultrasound_ai.freehand.metrics import evaluate_sweep
    from ultrasound_ai.io.sweep import read_sweep

    est = read_sweep(estimate_path)
    truth = read_sweep(truth_path)
    if est.tforms is None:
        raise InputError(f"{estimate_path}: no 'tforms' dataset; expected the estimated poses [N, 4, 4]")
    if truth.tforms is None:
        raise InputError(f"{truth_path}: no 'tforms' dataset; the truth file needs the true poses [N, 4, 4]")
    if est.frames.shape != truth.frames.shape:
        raise InputError(f"{estimate_path}: frames {est.frames.shape} do not match the truth's {truth.frames.shape} "
                         f"in {truth_path}; expected the estimate of that same sweep")
    if not np.allclose(est.pixel_spacing_xy, truth.pixel_spacing_xy, rtol=1e-6):
        raise InputError(f"{estimate_path}: pixel spacing {est.pixel_spacing_xy} differs from the truth's "
                         f"{truth.pixel_spacing_xy}")
    metrics = evaluate_sweep(est.tforms, truth.tforms, truth.frames.shape[1:], truth.pixel_spacing_xy)
    out = {"method": str(est.attrs.get("pose_method", "unknown")), "n_frames": int(truth.n_frames)}
    out.update({k: float(v) for k, v in metrics.items()})
    return out


# ----------------------------------------------------------------------------------------------
# CLI verbs (registered by ultrasound_ai/freehand/cli.py)
# ----------------------------------------------------------------------------------------------
