"""Validation-only data generators, written independently of the training simulators.

Nothing here may import a training simulator (a test checks the imports): a model that learned a
simulator's quirks must not find them again here. Never train or select a model on these data.
"""
