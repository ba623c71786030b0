"""Moved to `ultrasound_ai.freehand.moglo.method`; this old path is kept for one release."""

from ultrasound_ai.core.deprecation import alias_moved_module

alias_moved_module(__name__, "ultrasound_ai.freehand.moglo.method")
