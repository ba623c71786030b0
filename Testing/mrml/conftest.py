"""Fixtures for the MRML bridge tests: a fresh slicer-core scene per test (logics registered)."""

import pytest

pytest.importorskip("slicer", reason="the MRML tests need the slicer-core wheel")


@pytest.fixture
def scene():
    from ultrasound_ai.mrml import close_scene, new_scene

    s = new_scene()
    yield s
    close_scene(s)
