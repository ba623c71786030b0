"""Session-scoped small simulated ULM acquisitions shared by the ULM tests (cheap: seconds in all)."""

import pytest

from ultrasound_ai.ulm.simulator import UlmSimConfig, simulate_acquisition


@pytest.fixture(scope="session")
def sim_config():
    # The PALA grid (84 x 143, lambda pixels, 1 kHz) at 40 bubbles per frame, 200 frames.
    return UlmSimConfig(n_frames=200, bubbles_per_frame=40, clutter_db=20.0, noise_db=-30.0, seed=7)


@pytest.fixture(scope="session")
def small_acquisition(sim_config):
    return simulate_acquisition(sim_config)


@pytest.fixture(scope="session")
def clean_acquisition():
    """Bubbles only (no clutter, no noise): for PSF and geometry checks."""
    return simulate_acquisition(UlmSimConfig(n_frames=100, bubbles_per_frame=40, clutter_db=None, noise_db=None, seed=3))


@pytest.fixture(scope="session")
def small_acquisition_file(tmp_path_factory, small_acquisition):
    from ultrasound_ai.io.ulm_files import write_acquisition

    path = tmp_path_factory.mktemp("ulm") / "small_acq.h5"
    write_acquisition(small_acquisition, path)
    return path
