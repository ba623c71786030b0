"""The MRML bridge: the only place that converts between engine data and 3D Slicer MRML nodes.

Engine data are LPS millimetres (docs/DATA_FORMATS.md); MRML nodes are RAS. ``slicer`` and ``vtk`` are imported
inside the functions only, so importing this package (and the engine) works without Slicer. It runs
inside the Slicer application and with the ``slicer-core`` wheel (tests: ``new_scene()``).
"""

from ultrasound_ai.mrml.markups import (
    curve_to_trajectory,
    fiducials_to_points,
    points_to_fiducials,
    trajectory_to_curve,
)
from ultrasound_ai.mrml.scene import (
    close_scene,
    ensure_logics,
    get_logic,
    in_slicer_application,
    new_scene,
    resolve_scene,
    show_volume_rendering,
)
from ultrasound_ai.mrml.sequences import (
    browser_to_sweep,
    complex_sequence,
    pixel_to_ras_matrices,
    poses_to_transform_sequence,
    sequence_to_arrays,
    sequence_to_complex,
    sweep_to_browser,
    ulm_geometry,
    volume_sequence_from_arrays,
)
from ultrasound_ai.mrml.transforms import (
    apply_transform,
    matrix_to_transform_node,
    matrix_to_transform_node_ras,
    transform_node_to_matrix,
    transform_node_to_matrix_ras,
    world_matrix_ras,
)
from ultrasound_ai.mrml.volumes import (
    complex_to_node,
    ijk_to_ras,
    node_to_complex,
    node_to_volume,
    volume_to_node,
)

__all__ = [
    "apply_transform",
    "browser_to_sweep",
    "close_scene",
    "complex_sequence",
    "complex_to_node",
    "curve_to_trajectory",
    "ensure_logics",
    "fiducials_to_points",
    "get_logic",
    "ijk_to_ras",
    "in_slicer_application",
    "matrix_to_transform_node",
    "matrix_to_transform_node_ras",
    "new_scene",
    "node_to_complex",
    "node_to_volume",
    "pixel_to_ras_matrices",
    "points_to_fiducials",
    "poses_to_transform_sequence",
    "resolve_scene",
    "sequence_to_arrays",
    "sequence_to_complex",
    "show_volume_rendering",
    "sweep_to_browser",
    "trajectory_to_curve",
    "transform_node_to_matrix",
    "transform_node_to_matrix_ras",
    "ulm_geometry",
    "volume_sequence_from_arrays",
    "volume_to_node",
    "world_matrix_ras",
]
