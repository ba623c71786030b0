"""`ultrasound-ai demo`: simulate a freehand sweep, reconstruct it with each demo method, show the numbers.

Writes into the output folder (``make demo`` uses ``demo-output/``):

- ``sweep.h5``: the simulated sweep (frames, true poses, 4 IMUs), seeded;
- ``<method>_estimate.h5``, ``<method>_volume.nrrd``, ``<method>.png`` per method;
- ``<method>_trajectory.mrk.json`` and ``true_trajectory.mrk.json``: frame-centre curves;
- ``metrics.json`` and the printed table (FiMA Table-1 columns plus TUS-REC GPE/LPE);
- ``scene.mrml``: a Slicer scene referencing the volumes and curves (File > Add Data, or drag it onto
  Slicer). It is plain MRML XML written here, so the demo needs no Slicer.

Estimates, volumes and curves are all in the first frame's image coordinates (the estimate contract),
so everything overlays in Slicer.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

DEMO_METHODS = ("tracked", "imu")
# Learned methods join the default list when a model for them is installed (shipped or ULTRASOUND_AI_MODELS).
LEARNED_DEMO_METHODS = ("fima", "moglo")
# Method parameters of the demo. FiMA's online alignment (60 Adam steps per sweep) takes about 27 times its
# inference and changed the frozen benchmark's FDR by -0.4 points (BENCHMARKS.md freehand_methods): the demo
# leaves it off to finish in minutes; `--online-align` turns it on.
DEMO_METHOD_PARAMS = {"fima": {"online_align": False}}
DEFAULT_SEED = 7
DEFAULT_FRAMES = 200
# Table-1 columns (FiMA paper) and the TUS-REC pixel errors, as (key, header, format).
TABLE_COLUMNS = (
    ("fdr_pct", "FDR (%)", "{:.2f}"),
    ("adr_pct", "ADR (%)", "{:.2f}"),
    ("md_mm", "MD (mm)", "{:.2f}"),
    ("sd_mm", "SD (mm)", "{:.1f}"),
    ("hd_mm", "HD (mm)", "{:.2f}"),
    ("mea_deg", "MEA (°)", "{:.3f}"),
    ("gpe_mm", "GPE (mm)", "{:.2f}"),
    ("lpe_mm", "LPE (mm)", "{:.3f}"),
)
CURVE_COLOURS = {"true": (0.2, 0.8, 1.0), "tracked": (0.3, 1.0, 0.4), "imu": (1.0, 0.55, 0.1)}
_OTHER_COLOURS = ((1.0, 0.3, 0.6), (0.8, 0.8, 0.2), (0.7, 0.5, 1.0))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="simulate a sweep, reconstruct it (tracked, imu) and write volumes, pictures and a Slicer scene",
        description="Simulate a seeded freehand sweep, reconstruct it with each demo pose method, print the "
                    "metrics table and write the results (sweep, estimates, NRRD volumes, PNG pictures, "
                    "trajectory curves and a Slicer .mrml scene) into --out.",
    )
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"simulation seed (default: {DEFAULT_SEED})")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"frames to simulate (default: {DEFAULT_FRAMES})")
    p.add_argument("--frame-shape", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="frame size in pixels (default: the simulator's 248 x 260, jittered)")
    p.add_argument("--tactic", choices=("linear", "curved", "loop", "sector"), default="curved",
                   help="scanning tactic (default: curved)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"pose methods to run (default: {' '.join(DEMO_METHODS)}, plus "
                        f"{' and '.join(LEARNED_DEMO_METHODS)} when a model for them is installed)")
    p.add_argument("--spacing", type=float, default=0.3, metavar="MM", help="voxel size in mm (default: 0.3)")
    p.add_argument("--no-png", action="store_true", help="skip the pictures")
    p.add_argument("--online-align", action="store_true",
                   help="run FiMA's online alignment (off in the demo: it multiplies FiMA's time by about 27)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (one line per stage instead; also when the output is not a terminal)")
    from ultrasound_ai.core.device import add_device_argument

    add_device_argument(p)
    p.set_defaults(func=run_demo_command)


# ----------------------------------------------------------------------------------------------
# Slicer files (plain JSON / XML, no Slicer needed)
# ----------------------------------------------------------------------------------------------


def write_markups_curve(path, points_lps, name: str, colour=(1.0, 0.5, 0.0)) -> Path:
    """A Slicer markups curve file (.mrk.json) through the points [K, 3] (LPS mm), written atomically."""
    from ultrasound_ai.core.atomic import atomic_output
    from ultrasound_ai.core.errors import InputError

    pts = np.asarray(points_lps, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.all(np.isfinite(pts)):
        raise InputError(f"curve {name!r}: expected finite points [K, 3] in mm, got shape {pts.shape}")
    doc = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                   "Schema/markups-schema-v1.0.3.json#",
        "markups": [{
            "type": "Curve",
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "locked": True,
            "labelFormat": "%N-%d",
            "controlPoints": [
                {"id": str(i + 1), "label": f"{name}-{i}", "position": [float(v) for v in p],
                 "selected": False, "locked": True, "visibility": True, "positionStatus": "defined"}
                for i, p in enumerate(pts)
            ],
            "display": {"visibility": True, "opacity": 1.0, "color": [float(c) for c in colour],
                        "selectedColor": [float(c) for c in colour], "pointLabelsVisibility": False,
                        "glyphScale": 0.6, "lineThickness": 0.3},
        }],
    }
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    return path


def write_slicer_scene(path, volumes, curves) -> Path:
    """A minimal MRML scene (.mrml) that loads `volumes` [(name, file)] and `curves` [(name, file, rgb)].

    File names are relative to the scene's folder, so the folder can be moved as a whole. Volumes get a
    grey display with automatic window/level; curves keep their colour, as linear (not spline) curves.
    """
    from ultrasound_ai.core.atomic import atomic_output

    path = Path(path)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', '<MRML version="Slicer5" userTags="">']
    for i, (name, file) in enumerate(volumes, start=1):
        vid, did, sid = f"vtkMRMLScalarVolumeNode{i}", f"vtkMRMLScalarVolumeDisplayNode{i}", \
            f"vtkMRMLVolumeArchetypeStorageNode{i}"
        lines += [
            f' <Volume id="{vid}" name={quoteattr(name)} hideFromEditors="false" selectable="true" '
            f'references="display:{did};storage:{sid};" ></Volume>',
            f' <VolumeDisplay id="{did}" name="VolumeDisplay" hideFromEditors="true" '
            f'colorNodeID="vtkMRMLColorTableNodeGrey" autoWindowLevel="1" interpolate="1" ></VolumeDisplay>',
            f' <VolumeArchetypeStorage id="{sid}" name="VolumeArchetypeStorage" hideFromEditors="true" '
            f'fileName={quoteattr(str(file))} useCompression="1" centerImage="0" UseOrientationFromFile="1" >'
            f'</VolumeArchetypeStorage>',
        ]
    for i, (name, file, colour) in enumerate(curves, start=1):
        cid, did, sid = f"vtkMRMLMarkupsCurveNode{i}", f"vtkMRMLMarkupsDisplayNode{i}", \
            f"vtkMRMLMarkupsJsonStorageNode{i}"
        rgb = " ".join(f"{c:g}" for c in colour)
        lines += [
            f' <MarkupsCurve id="{cid}" name={quoteattr(name)} hideFromEditors="false" selectable="true" '
            f'references="display:{did};storage:{sid};" locked="true" curveType="linear" ></MarkupsCurve>',
            f' <MarkupsDisplay id="{did}" name="MarkupsDisplay" hideFromEditors="true" color="{rgb}" '
            f'selectedColor="{rgb}" pointLabelsVisibility="false" propertiesLabelVisibility="false" '
            f'glyphScale="0.6" lineThickness="0.3" ></MarkupsDisplay>',
            f' <MarkupsJsonStorage id="{sid}" name="MarkupsJsonStorage" hideFromEditors="true" '
            f'fileName={quoteattr(str(file))} coordinateSystem="LPS" ></MarkupsJsonStorage>',
        ]
    lines.append("</MRML>")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------


def format_table(rows: dict) -> str:
    """Plain-text table: one row per method, the Table-1 columns."""
    header = ["method"] + [h for _, h, _ in TABLE_COLUMNS]
    body = [[name] + [fmt.format(m[key]) if m and key in m else "-" for key, _, fmt in TABLE_COLUMNS]
            for name, m in rows.items()]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in [header] + body]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def default_demo_methods() -> list:
    """tracked and imu, then each learned method that has an installed model."""
    from ultrasound_ai.models.registry import list_models

    return list(DEMO_METHODS) + [m for m in LEARNED_DEMO_METHODS if list_models(m)]


def run_demo(out_dir="demo-output", seed: int = DEFAULT_SEED, n_frames: int = DEFAULT_FRAMES, frame_shape=None,
             tactic: str = "curved", methods=None, spacing_mm: float = 0.3, png: bool = True,
             device="auto", quiet: bool = False, online_align: bool = False, log=None) -> dict:
    """Run the demo; returns {"metrics": {method: dict}, "files": [paths], "seconds": {...}}.

    quiet: no progress bars; each stage logs a line when it starts and one with its seconds when it ends.
    online_align: run FiMA's online alignment (`DEMO_METHOD_PARAMS` leaves it off).
    log: where the lines go (default: stdout, flushed line by line, so a pipe or a log file shows each stage
    as it ends).
    """
    if log is None:
        log = functools.partial(print, flush=True)
    from tqdm import tqdm

    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.freehand.methods import available_methods
    from ultrasound_ai.freehand.reconstruct import run_reconstruction
    from ultrasound_ai.freehand.render import trajectory_points
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
    from ultrasound_ai.io.sweep import write_sweep

    methods = default_demo_methods() if methods is None else list(methods)
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise InputError(f"demo: unknown method(s) {', '.join(unknown)}; available: {', '.join(available_methods())}")
    if int(n_frames) < 2:
        raise InputError(f"demo: --frames must be at least 2, got {n_frames}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"demo output {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    def started(stage: str):
        if quiet:  # no progress bar shows that the stage is running
            log(f"{stage}: started")
        return time.perf_counter()

    def finished(stage: str, key: str, t0: float):
        seconds[key] = time.perf_counter() - t0
        if quiet:
            log(f"{stage}: finished in {seconds[key]:.1f} s")

    t0 = started("simulate sweep")
    with tqdm(total=int(n_frames), desc="simulate sweep", unit="frame", disable=quiet, leave=False) as bar:
        sweep = simulate_sweep(int(seed), n_frames=int(n_frames), tactic=tactic, frame_shape=frame_shape,
                               progress=lambda done, total: bar.update(done - bar.n))
    sweep_path = write_sweep(sweep, out / "sweep.h5")
    finished("simulate sweep", "simulate", t0)
    n, h, w = sweep.frames.shape
    log(f"simulated {n} frames of {h}x{w} px at {sweep.pixel_spacing_xy[0]:.3f} mm, tactic "
        f"{sweep.attrs.get('tactic')}, {sweep.n_imus} IMUs (seed {seed}) in {seconds['simulate']:.1f} s")

    from ultrasound_ai.core.geometry import normalize_to_first

    truth = normalize_to_first(sweep.tforms)
    files = [sweep_path]
    metrics = {}
    volumes, curves = [], []
    for k, method in enumerate(methods):
        params = dict(DEMO_METHOD_PARAMS.get(method, {}))
        if method == "fima" and online_align:
            params["online_align"] = True
        t0 = started(f"reconstruct ({method})")
        with tqdm(total=1000, desc=f"reconstruct ({method})", disable=quiet, leave=False,
                  bar_format="{l_bar}{bar}| {elapsed}<{remaining}") as bar:
            def progress(fraction, _message, bar=bar):
                bar.n = int(round(1000 * fraction))
                bar.refresh()

            run = run_reconstruction(
                sweep_path, method, out_sweep=out / f"{method}_estimate.h5", out_volume=out / f"{method}_volume.nrrd",
                out_png=(out / f"{method}.png") if png else None, spacing_mm=spacing_mm, device=device,
                method_params=params or None, progress=progress, evaluate=True, title=f"{method} reconstruction (simulated {sweep.attrs.get('tactic')} sweep, "
                                         f"seed {seed})",
            )
        finished(f"reconstruct ({method})", method, t0)
        for note in run.notes:
            log(f"note ({method}): {note}")
        metrics[method] = run.metrics
        files += list(run.outputs.values())
        colour = CURVE_COLOURS.get(method, _OTHER_COLOURS[k % len(_OTHER_COLOURS)])
        curve = write_markups_curve(out / f"{method}_trajectory.mrk.json",
                                    trajectory_points(run.tforms, (h, w), sweep.pixel_spacing_xy),
                                    f"{method} trajectory", colour)
        files.append(curve)
        volumes.append((f"{method} volume", run.outputs["volume"].name))
        curves.append((f"{method} trajectory", curve.name, colour))
    true_curve = write_markups_curve(out / "true_trajectory.mrk.json",
                                     trajectory_points(truth, (h, w), sweep.pixel_spacing_xy), "true trajectory",
                                     CURVE_COLOURS["true"])
    files.append(true_curve)
    curves.append(("true trajectory", true_curve.name, CURVE_COLOURS["true"]))
    files.append(write_slicer_scene(out / "scene.mrml", volumes, curves))

    from ultrasound_ai.core.atomic import atomic_output

    summary = {"seed": int(seed), "n_frames": int(n), "frame_shape_hw": [int(h), int(w)],
               "pixel_spacing_mm": [float(v) for v in sweep.pixel_spacing_xy], "tactic": sweep.attrs.get("tactic"),
               "simulator_version": sweep.attrs.get("simulator_version"), "metrics": metrics, "seconds": seconds}
    with atomic_output(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    files.append(out / "metrics.json")
    log("")
    log(format_table(metrics))
    log("")
    log(f"wrote {len(files)} files to {out}/ — open {out / 'scene.mrml'} in 3D Slicer (drag and drop) to see the "
        f"volumes and trajectories; pictures: " + ", ".join(str(out / f"{m}.png") for m in methods if png))
    return {"metrics": metrics, "files": [str(f) for f in files], "seconds": seconds}


def run_demo_command(args) -> int:
    run_demo(args.out, seed=args.seed, n_frames=args.frames, frame_shape=args.frame_shape, tactic=args.tactic,
             methods=args.methods, spacing_mm=args.spacing, png=not args.no_png, device=args.device,
             quiet=args.quiet or not sys.stderr.isatty(), online_align=args.online_align)
    return 0
