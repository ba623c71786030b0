"""Session-scoped simulated sweeps shared by the freehand tests (small frames keep them fast)."""

import pytest

from ultrasound_ai.freehand.simulation.simulator import simulate_sweep


@pytest.fixture(scope="session")
def small_sweep():
    """A short, small-frame linear sweep with IMUs, and the phantom it scanned."""
    return simulate_sweep(11, n_frames=24, tactic="linear", frame_shape=(64, 72), pixel_spacing=(0.2, 0.2),
                          n_imus=3, reverse=False, return_phantom=True)
