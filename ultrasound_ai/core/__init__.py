"""Shared foundations: errors and exit codes, atomic outputs, devices, geometry, training harness."""
