"""Checkpoints, model cards and the registry of shipped models."""
