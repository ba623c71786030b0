"""Readers and writers for the data contracts of DESIGN.md (volumes, sweeps, acquisitions)."""
