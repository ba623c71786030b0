"""Write a VTK image as a PNG and check that it was written.

vtkPNGWriter does not raise when the disk fills up: libpng prints "Write Error", the writer sets an
error code and a truncated file stays behind. Here the error code is checked inside `atomic_output`,
so a failed write is an OutputWriteError naming the user's path and leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import OutputWriteError


def write_vtk_png(source, path: str | os.PathLike) -> Path:
    """Write `source` (a vtkAlgorithmOutput, e.g. a window grab's output port, or a vtkImageData)."""
    import vtk

    final = Path(path)
    with atomic_output(final) as tmp:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(os.fspath(tmp))
        if isinstance(source, vtk.vtkImageData):
            writer.SetInputData(source)
        else:
            writer.SetInputConnection(source)
        writer.Write()
        code = writer.GetErrorCode()
        if code != 0 or not tmp.exists() or tmp.stat().st_size == 0:
            reason = vtk.vtkErrorCode.GetStringFromErrorCode(code) if code else "no data written"
            if code == vtk.vtkErrorCode.OutOfDiskSpaceError:
                raise OutputWriteError(f"no space left on device writing {final}")
            raise OutputWriteError(f"could not write the picture {final}: {reason}")
    return final


def write_vtk_image_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an [H, W, 3] uint8 array (top row first) through VTK's PNG writer."""
    import vtk
    from vtk.util import numpy_support

    rgb = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[::-1])  # VTK's rows go bottom-up
    h, w = rgb.shape[:2]
    image = vtk.vtkImageData()
    image.SetDimensions(w, h, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    return write_vtk_png(image, path)
