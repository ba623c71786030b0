"""Table nodes: metric tables, numeric columns and the header flag every module's tables share.

``vtk`` is imported inside the functions (the bridge imports without Slicer).

    node = metrics_to_table({"fdr_pct": 12.5, "raw": {"jaccard": 0.4}}, name="Metrics")
    table_to_metrics(node)   # {"fdr_pct": 12.5, "raw.jaccard": 0.4}
"""

from __future__ import annotations

import math

from ultrasound_ai.core.errors import InputError


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """{"jaccard": .., "raw": {"jaccard": ..}} -> {"jaccard": .., "raw.jaccard": ..}; None -> NaN (JSON null:
    undefined, e.g. no true positive); strings and booleans dropped (a table of numbers)."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{name}."))
        elif value is None:
            out[name] = math.nan
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def column_titles_as_header(node) -> None:
    """Show the column names as the table header. Slicer 5.10 renamed the setter; older Slicer (and
    older slicer-core) has only SetUseColumnNameAsColumnHeader; a node with neither is left alone."""
    for setter in ("SetUseColumnTitleAsColumnHeader", "SetUseColumnNameAsColumnHeader"):
        method = getattr(node, setter, None)
        if method is not None:
            method(True)
            return


def float_column(name: str, values):
    """A vtkFloatArray named `name` (float32, as the contracts store IMU samples and weights)."""
    import vtk

    array = vtk.vtkFloatArray()
    array.SetName(name)
    array.SetNumberOfValues(len(values))
    for k, v in enumerate(values):
        array.SetValue(k, float(v))
    return array


def int_column(name: str, values):
    import vtk

    array = vtk.vtkIntArray()
    array.SetName(name)
    array.SetNumberOfValues(len(values))
    for k, v in enumerate(values):
        array.SetValue(k, int(v))
    return array


def set_table(node, columns) -> None:
    """Replace the node's table with one holding `columns` (vtk arrays), names as the header."""
    import vtk

    table = vtk.vtkTable()
    for column in columns:
        table.AddColumn(column)
    node.SetAndObserveTable(table)
    column_titles_as_header(node)


def new_table_node(name: str, node=None, scene=None):
    """`node` as it is, or a new vtkMRMLTableNode named `name` in `scene` (default: slicer.mrmlScene)."""
    if node is not None:
        return node
    from ultrasound_ai.mrml.scene import resolve_scene

    return resolve_scene(scene).AddNewNodeByClass("vtkMRMLTableNode", name)


def metrics_to_table(metrics: dict, name: str = "Metrics", node=None, scene=None):
    """A two-column vtkMRMLTableNode: "metric" (names carrying their units, e.g. fdr_pct; nested ones
    dotted) and "value"."""
    import vtk

    if not isinstance(metrics, dict) or not metrics:
        raise InputError(f"metrics: expected a non-empty dict of name -> number, got {metrics!r}")
    node = new_table_node(name, node, scene)
    names = vtk.vtkStringArray()
    names.SetName("metric")
    values = vtk.vtkDoubleArray()
    values.SetName("value")
    for key, value in flatten_metrics(metrics).items():
        names.InsertNextValue(key)
        values.InsertNextValue(value)
    set_table(node, (names, values))
    return node


def table_to_metrics(node) -> dict:
    """Inverse of metrics_to_table (flattened names)."""
    table = node.GetTable()
    names, values = table.GetColumnByName("metric"), table.GetColumnByName("value")
    if names is None or values is None:
        raise InputError(f"metrics table {node.GetName()!r}: expected the columns 'metric' and 'value'")
    return {names.GetValue(k): values.GetValue(k) for k in range(table.GetNumberOfRows())}
