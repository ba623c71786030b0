"""Render fusion.png and ulm.png (the Extensions Index screenshots) from real engine results.

    python Resources/Screenshots/make_screenshots.py [--work DIR]

fusion.png: a simulated MRI-TRUS case registered with the shipped Attention-Reg models
(`ultrasound-ai registration register`); an axial MRI slice as a checkerboard with the TRUS resampled
through the start (physical positions) and through the result, the SRE of each from the case's truth.
ulm.png: a simulated ultrafast acquisition processed with radial-symmetry localization
(`ultrasound-ai ulm process`); the density map on a hot scale, with the Jaccard index against the
simulated bubble positions. Both are drawn with VTK offscreen (no display needed). Takes a few minutes
on a CPU. Every shipped model and every picture here comes from simulated data only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "ultrasound_ai.cli"]
SIZE = (900, 520)


def _run(*args) -> None:
    subprocess.run([*CLI, *map(str, args)], check=True)


def _unit(a: np.ndarray) -> np.ndarray:
    values = a[a != 0] if np.any(a != 0) else a.reshape(-1)
    lo, hi = np.percentile(values, [1.0, 99.0])
    return np.clip((a - lo) / max(hi - lo, 1e-9), 0.0, 1.0)


def _checkerboard(fixed: np.ndarray, moving: np.ndarray, square_px: int) -> np.ndarray:
    rows, cols = np.indices(fixed.shape)
    parity = ((rows // square_px) + (cols // square_px)) % 2 == 1
    return np.where(parity, _unit(moving), _unit(fixed))


def _image_actor(rgb: np.ndarray):
    """A vtkImageActor showing an [H, W, 3] float image in [0, 1] (row 0 at the top)."""
    import vtk
    from vtk.util import numpy_support

    h, w, _ = rgb.shape
    data = np.ascontiguousarray((np.clip(rgb[::-1], 0, 1) * 255).astype(np.uint8).reshape(-1, 3))
    image = vtk.vtkImageData()
    image.SetDimensions(w, h, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(data, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    return actor


def _text(renderer, text: str, x: float, y: float, size: int, bold: bool = False) -> None:
    import vtk

    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontSize(size)
    prop.SetBold(bold)
    prop.SetColor(1, 1, 1)
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.SetPosition(x, y)
    renderer.AddViewProp(actor)


def _render(panels, title: str, footer: str, path: Path) -> None:
    """Side-by-side panels [(rgb image, caption)], a title and a footer, written as a PNG."""
    import vtk

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.SetSize(*SIZE)
    background = vtk.vtkRenderer()
    background.SetBackground(0.08, 0.09, 0.13)
    background.SetViewport(0, 0, 1, 1)
    background.SetLayer(0)
    _text(background, title, 0.02, 0.92, 20, bold=True)
    _text(background, footer, 0.02, 0.02, 13)
    window.SetNumberOfLayers(2)
    window.AddRenderer(background)
    n = len(panels)
    for k, (rgb, caption) in enumerate(panels):
        renderer = vtk.vtkRenderer()
        renderer.SetLayer(1)
        renderer.SetViewport(k / n + 0.01, 0.08, (k + 1) / n - 0.01, 0.88)
        renderer.AddActor(_image_actor(rgb))
        renderer.ResetCamera()
        renderer.GetActiveCamera().Zoom(1.35)
        _text(renderer, caption, 0.03, 0.03, 15, bold=True)
        window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    window.Finalize()


def make_fusion(work: Path, out: Path) -> None:
    from ultrasound_ai.io.volume import resample_volume
    from ultrasound_ai.registration.case import read_case
    from ultrasound_ai.registration.metrics import sre

    _run("registration", "simulate", work / "cases", "--cases", 1, "--seed", 11, "--quiet")
    case_dir = next(p for p in sorted((work / "cases").iterdir()) if p.is_dir())
    _run("registration", "register", "--case", case_dir, "--method", "attention", "--device", "cpu",
         "--out", work / "attention.tfm", "--json", work / "attention.json", "--quiet")
    result = json.loads((work / "attention.json").read_text())
    case = read_case(case_dir)
    T = np.asarray(result["fixed_to_moving_lps"], dtype=np.float64)
    start = np.asarray(resample_volume(case.moving, case.fixed, np.eye(4), output_dtype=np.float32).array)
    registered = np.asarray(resample_volume(case.moving, case.fixed, T, output_dtype=np.float32).array)
    label = np.asarray(case.fixed_label.array)
    k = int(np.argmax((label != 0).sum(axis=(1, 2))))  # the axial slice through most of the gland
    fixed = np.asarray(case.fixed.array, dtype=np.float32)[k]
    square = max(4, fixed.shape[0] // 8)
    gray = lambda a: np.repeat(a[..., None], 3, axis=2)  # noqa: E731 - a one-line helper
    truth = case.truth_fixed_to_moving
    panels = [(gray(_checkerboard(fixed, start[k], square)),
               f"start: SRE {sre(np.eye(4), truth, case.surface_fixed):.1f} mm"),
              (gray(_checkerboard(fixed, registered[k], square)),
               f"Attention-Reg: SRE {sre(T, truth, case.surface_fixed):.1f} mm")]
    _render(panels, "MRI-TRUS fusion: MRI / registered TRUS checkerboard",
            "Simulated prostate phantom (seed 11); shipped models trained on simulated data only.", out)


def make_ulm(work: Path, out: Path) -> None:
    from ultrasound_ai.io.ulm_files import read_acquisition, read_result
    from ultrasound_ai.ulm.metrics import evaluate_result

    acquisition = work / "acq.h5"
    _run("ulm", "simulate", acquisition, "--frames", 1600, "--bubbles-per-frame", 60, "--seed", 5, "--quiet")
    _run("ulm", "process", acquisition, "--method", "rs", "--bubbles-per-frame", 45, "--out", work / "rs.h5",
         "--quiet")
    ulm = read_result(work / "rs.h5")
    density = np.log1p(np.asarray(ulm.density, dtype=np.float64))
    density = density / max(np.percentile(density[density > 0], 99.5), 1e-9) if np.any(density > 0) else density
    d = np.clip(density, 0, 1)
    hot = np.stack([np.clip(3 * d, 0, 1), np.clip(3 * d - 1, 0, 1), np.clip(3 * d - 2, 0, 1)], axis=-1)
    acq = read_acquisition(acquisition)
    metrics = evaluate_result(ulm, acq.gt_positions, acq.wavelength_mm, acq.frame_rate_hz)
    caption = f"radial symmetry: tracked Jaccard {metrics['jaccard']:.2f} vs the simulated bubbles"
    _render([(hot, caption)], "Ultrasound localization microscopy: density map (lambda/10 pixels)",
            "Simulated 1,600-frame acquisition at 1 kHz (seed 5).", out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the intermediate files")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="screenshots-"))
    (work / "fusion").mkdir(parents=True, exist_ok=True)
    (work / "ulm").mkdir(parents=True, exist_ok=True)
    make_fusion(work / "fusion", HERE / "fusion.png")
    make_ulm(work / "ulm", HERE / "ulm.png")
    print(f"wrote {HERE / 'fusion.png'} and {HERE / 'ulm.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
