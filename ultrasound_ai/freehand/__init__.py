"""Freehand 3D ultrasound reconstruction: sweeps, pose estimation methods, compounding, metrics."""
