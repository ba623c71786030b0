"""Readers and writers for the data contracts of docs/DATA_FORMATS.md (volumes, sweeps, acquisitions)."""
