"""A picture of a freehand reconstruction: VTK offscreen volume rendering plus the probe trajectories.

``render_reconstruction_png(volume, path, ...)`` draws the compounded volume where it lies in world
coordinates (its direction and origin applied), the estimated trajectory of the frame centres as a
tube (and the true one in another colour when known), the first and last frames' outlines, a caption
and a legend, and writes a PNG through ``io.vtk_output.write_vtk_png`` (atomic, the writer's error code
checked). It renders offscreen (EGL or OSMesa where VTK has them, so no display is needed). The volume is drawn with ``vtkSmartVolumeMapper`` (GPU ray
casting where OpenGL allows it, VTK's CPU ray caster otherwise); ``mode="mip"`` draws a maximum
intensity projection instead, ``mode="slices"`` three orthogonal slices (for drivers where volume
rendering misbehaves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["render_reconstruction_png", "trajectory_points"]

EST_COLOUR = (1.0, 0.55, 0.1)  # orange
TRUE_COLOUR = (0.2, 0.8, 1.0)  # cyan
FRAME_COLOUR = (0.85, 0.85, 0.85)
_MODES = ("volume", "mip", "slices")


def trajectory_points(tforms, frame_shape_hw, pixel_spacing_xy) -> np.ndarray:
    """World positions [N, 3] of the frame centres for poses [N, 4, 4] (image mm -> world mm)."""
    from ultrasound_ai.core.geometry import apply_transform, frame_reference_points

    T = np.asarray(tforms, dtype=np.float64)
    if T.ndim != 3 or T.shape[1:] != (4, 4):
        raise InputError(f"tforms: expected [N, 4, 4] poses, got shape {T.shape}")
    centre = frame_reference_points(frame_shape_hw, pixel_spacing_xy)[0]
    return apply_transform(T, centre[None, :])


def _frame_outline(T: np.ndarray, h: int, w: int, sx: float, sy: float) -> np.ndarray:
    from ultrasound_ai.core.geometry import apply_transform

    corners = np.array([[0, 0, 0], [(w - 1) * sx, 0, 0], [(w - 1) * sx, (h - 1) * sy, 0], [0, (h - 1) * sy, 0],
                        [0, 0, 0]], dtype=np.float64)
    return apply_transform(T, corners)


def _polyline(points: np.ndarray):
    import vtk

    pts = vtk.vtkPoints()
    for p in points:
        pts.InsertNextPoint(*map(float, p))
    line = vtk.vtkPolyLine()
    line.GetPointIds().SetNumberOfIds(len(points))
    for i in range(len(points)):
        line.GetPointIds().SetId(i, i)
    cells = vtk.vtkCellArray()
    cells.InsertNextCell(line)
    poly = vtk.vtkPolyData()
    poly.SetPoints(pts)
    poly.SetLines(cells)
    return poly


def _tube_actor(points: np.ndarray, colour, radius: float):
    import vtk

    # Consecutive duplicate points make the tube filter's normals undefined; drop them.
    keep = np.ones(len(points), dtype=bool)
    keep[1:] = np.linalg.norm(np.diff(points, axis=0), axis=1) > 1e-6
    points = points[keep]
    poly = _polyline(points)
    mapper = vtk.vtkPolyDataMapper()
    if len(points) >= 2:
        tube = vtk.vtkTubeFilter()
        tube.SetInputData(poly)
        tube.SetRadius(radius)
        tube.SetNumberOfSides(16)
        tube.CappingOn()
        mapper.SetInputConnection(tube.GetOutputPort())
    else:
        mapper.SetInputData(poly)
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    prop = actor.GetProperty()
    prop.SetColor(*colour)
    prop.SetSpecular(0.4)
    prop.SetSpecularPower(20)
    return actor


def _line_actor(points: np.ndarray, colour, width: float = 2.0):
    import vtk

    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputData(_polyline(points))
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*colour)
    actor.GetProperty().SetLineWidth(width)
    actor.GetProperty().LightingOff()
    return actor


def _image_data(volume):
    """vtkImageData in index space scaled by the spacing (origin 0), plus the matrix placing it in world."""
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(np.asarray(volume.array, dtype=np.float32))
    nk, nj, ni = arr.shape[:3]
    img = vtk.vtkImageData()
    img.SetDimensions(ni, nj, nk)
    img.SetSpacing(*map(float, volume.spacing_xyz))
    img.SetOrigin(0.0, 0.0, 0.0)
    scalars = numpy_support.numpy_to_vtk(arr.reshape(-1), deep=True, array_type=vtk.VTK_FLOAT)
    img.GetPointData().SetScalars(scalars)
    m = vtk.vtkMatrix4x4()
    D = np.asarray(volume.direction, dtype=np.float64)
    o = np.asarray(volume.origin_lps, dtype=np.float64)
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, float(D[r, c]))
        m.SetElement(r, 3, float(o[r]))
    return img, m


def _volume_prop(img, matrix, lo: float, hi: float, mode: str):
    import vtk

    mapper = vtk.vtkSmartVolumeMapper()
    mapper.SetInputData(img)
    if mode == "mip":
        mapper.SetBlendModeToMaximumIntensity()
    colour = vtk.vtkColorTransferFunction()
    opacity = vtk.vtkPiecewiseFunction()
    span = max(hi - lo, 1e-6)
    # Warm grey ramp; uncovered voxels (0) and dark speckle stay transparent so structures show through.
    colour.AddRGBPoint(lo, 0.0, 0.0, 0.0)
    colour.AddRGBPoint(lo + 0.35 * span, 0.55, 0.5, 0.45)
    colour.AddRGBPoint(lo + 0.7 * span, 0.95, 0.9, 0.82)
    colour.AddRGBPoint(hi, 1.0, 1.0, 0.97)
    if mode == "mip":
        opacity.AddPoint(lo, 0.0)
        opacity.AddPoint(hi, 1.0)
    else:
        opacity.AddPoint(0.0, 0.0)
        opacity.AddPoint(lo + 0.3 * span, 0.0)
        opacity.AddPoint(lo + 0.55 * span, 0.12)
        opacity.AddPoint(lo + 0.8 * span, 0.5)
        opacity.AddPoint(hi, 0.9)
    prop = vtk.vtkVolumeProperty()
    prop.SetColor(colour)
    prop.SetScalarOpacity(opacity)
    prop.SetInterpolationTypeToLinear()
    prop.ShadeOff()
    vol = vtk.vtkVolume()
    vol.SetMapper(mapper)
    vol.SetProperty(prop)
    vol.SetUserMatrix(matrix)
    return vol


def _slice_actors(img, matrix, lo: float, hi: float):
    import vtk

    nx, ny, nz = img.GetDimensions()
    lut = vtk.vtkLookupTable()
    lut.SetRange(lo, hi)
    lut.SetSaturationRange(0, 0)
    lut.SetValueRange(0, 1)
    lut.Build()
    actors = []
    for extent in ((nx // 2, nx // 2, 0, ny - 1, 0, nz - 1), (0, nx - 1, ny // 2, ny // 2, 0, nz - 1),
                   (0, nx - 1, 0, ny - 1, nz // 2, nz // 2)):
        colours = vtk.vtkImageMapToColors()
        colours.SetInputData(img)
        colours.SetLookupTable(lut)
        actor = vtk.vtkImageActor()
        actor.GetMapper().SetInputConnection(colours.GetOutputPort())
        actor.SetDisplayExtent(*extent)
        actor.SetUserMatrix(matrix)
        actors.append(actor)
    return actors


def _text(text: str, x: float, y: float, size: int, colour=(1, 1, 1), bold=False, right=False):
    import vtk

    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.SetPosition(x, y)
    p = actor.GetTextProperty()
    p.SetFontSize(size)
    p.SetColor(*colour)
    p.SetBold(bold)
    p.SetShadow(True)
    if right:
        p.SetJustificationToRight()
    return actor


def _offscreen_window(width: int, height: int):
    import vtk

    window = None
    # Prefer the EGL / OSMesa windows when this VTK build has them: no X display is ever touched.
    for name in ("vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow"):
        cls = getattr(vtk, name, None)
        if cls is not None:
            try:
                window = cls()
                break
            except Exception:  # noqa: BLE001 - not usable here, try the next kind
                window = None
    if window is None:
        window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(int(width), int(height))
    window.SetMultiSamples(0)
    return window


def render_reconstruction_png(volume, path, est_tforms=None, true_tforms=None, frame_shape_hw=None,
                              pixel_spacing_xy=None, size: Sequence[int] = (900, 700), title: Optional[str] = None,
                              est_label: str = "estimate", mode: str = "volume",
                              view: tuple[float, float] = (35.0, 25.0)) -> Path:
    """Render the reconstruction to a PNG at `path` (written atomically); returns the path.

    volume: io.volume.Volume (scalar). est_tforms / true_tforms: [N, 4, 4] poses in the volume's world
    (image mm -> world mm); their frame-centre trajectories are drawn when frame_shape_hw (H, W) and
    pixel_spacing_xy (sx, sy) are given. mode: "volume" (composite), "mip" or "slices".
    view: camera azimuth and elevation (degrees) from the default view along the volume's z axis.
    """
    import vtk

    from ultrasound_ai.io.volume import Volume
    from ultrasound_ai.io.vtk_output import write_vtk_png

    if not isinstance(volume, Volume):
        raise InputError(f"volume: expected an io.volume.Volume, got {type(volume).__name__}")
    if volume.array.ndim != 3:
        raise InputError(f"volume: expected a scalar volume [k, j, i], got shape {volume.array.shape}")
    if mode not in _MODES:
        raise InputError(f"mode: expected one of {_MODES}, got {mode!r}")
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size: expected (width, height) in pixels, got {size!r}") from None
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise InputError(f"size: expected (width, height) between 16 and 8192 pixels, got {size!r}")
    path = Path(path)
    if not path.name.lower().endswith(".png"):
        raise InputError(f"picture output {path}: expected a .png file name")
    have_geometry = frame_shape_hw is not None and pixel_spacing_xy is not None
    if (est_tforms is not None or true_tforms is not None) and not have_geometry:
        raise InputError("render: trajectories need frame_shape_hw (H, W) and pixel_spacing_xy (sx, sy)")

    arr = np.asarray(volume.array, dtype=np.float32)
    covered = arr[arr > 0]
    lo, hi = (np.percentile(covered, [1.0, 99.7]) if covered.size else (0.0, 1.0))
    lo, hi = float(lo), float(max(hi, lo + 1e-3))

    renderer = vtk.vtkRenderer()
    renderer.GradientBackgroundOn()
    renderer.SetBackground(0.02, 0.03, 0.06)
    renderer.SetBackground2(0.16, 0.19, 0.26)
    img, matrix = _image_data(volume)
    if mode == "slices":
        for actor in _slice_actors(img, matrix, lo, hi):
            renderer.AddActor(actor)
    else:
        renderer.AddVolume(_volume_prop(img, matrix, lo, hi, mode))
    outline = vtk.vtkOutlineFilter()
    outline.SetInputData(img)
    outline_mapper = vtk.vtkPolyDataMapper()
    outline_mapper.SetInputConnection(outline.GetOutputPort())
    box = vtk.vtkActor()
    box.SetMapper(outline_mapper)
    box.SetUserMatrix(matrix)
    box.GetProperty().SetColor(0.45, 0.5, 0.6)
    renderer.AddActor(box)

    extent = float(np.max(np.asarray(volume.spacing_xyz) * np.asarray(volume.shape_ijk)))
    radius = max(0.15, 0.006 * extent)
    legend = []
    if have_geometry:
        h, w = (int(v) for v in frame_shape_hw)
        sx, sy = (float(v) for v in pixel_spacing_xy)
        for tforms, colour, label in ((true_tforms, TRUE_COLOUR, "true trajectory"),
                                      (est_tforms, EST_COLOUR, f"{est_label} trajectory")):
            if tforms is None:
                continue
            T = np.asarray(tforms, dtype=np.float64)
            renderer.AddActor(_tube_actor(trajectory_points(T, (h, w), (sx, sy)), colour, radius))
            for idx in (0, len(T) - 1):
                renderer.AddActor(_line_actor(_frame_outline(T[idx], h, w, sx, sy), colour, 2.0))
            legend.append((label, colour))

    renderer.ResetCamera()
    camera = renderer.GetActiveCamera()
    # Look from above the probe face (image -y) and to the side, so depth and the sweep direction both show.
    D = np.asarray(volume.direction, dtype=np.float64)
    centre = np.asarray(camera.GetFocalPoint())
    distance = camera.GetDistance()
    camera.SetPosition(*(centre + distance * D[:, 2]))
    camera.SetViewUp(*(-D[:, 1]))
    camera.Azimuth(view[0])
    camera.Elevation(view[1])
    camera.OrthogonalizeViewUp()
    renderer.ResetCamera()
    camera.Zoom(1.15)
    renderer.ResetCameraClippingRange()

    if title:
        lines = str(title).splitlines()
        renderer.AddViewProp(_text(lines[0], 0.02, 0.94, 20, bold=True))
        for i, line in enumerate(lines[1:]):
            renderer.AddViewProp(_text(line, 0.02, 0.895 - 0.045 * i, 15, colour=(0.85, 0.88, 0.95)))
    for i, (label, colour) in enumerate(legend):
        renderer.AddViewProp(_text("\u2014 " + label, 0.98, 0.04 + 0.045 * i, 16, colour=colour, bold=True,
                                  right=True))
    nk, nj, ni = volume.array.shape
    times = "\u00d7"
    box_mm = np.asarray(volume.spacing_xyz) * np.asarray(volume.shape_ijk)
    info = (f"volume {ni}{times}{nj}{times}{nk} voxels of "
            f"{times.join(f'{s:g}' for s in np.round(volume.spacing_xyz, 3))} mm, box "
            f"{times.join(f'{e:.0f}' for e in box_mm)} mm")
    renderer.AddViewProp(_text(info, 0.02, 0.03, 13, colour=(0.7, 0.74, 0.82)))

    window = _offscreen_window(width, height)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    # The writer's error code is checked there: on a full disk VTK only prints "Write Error".
    write_vtk_png(grab.GetOutputPort(), path)
    window.Finalize()
    return path
