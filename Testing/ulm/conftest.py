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


@pytest.fixture(scope="session")
def tiny_dml_checkpoint(tmp_path_factory):
    """A randomly initialised tiny 3DML-ResNet + counting network saved through the checkpoint API."""
    import torch

    from ultrasound_ai.models.checkpoint import save_checkpoint
    from ultrasound_ai.ulm.dml_resnet import build_model

    torch.manual_seed(0)
    net = build_model("tiny")
    path = tmp_path_factory.mktemp("dml_counter") / "dml_tiny.pt"
    card = {"name": "dml_tiny_pipeline_test", "method": "ulm_3dml_resnet", "configuration": net.config.to_dict(),
            "input": {"pixel_size_lambda": [1.0, 1.0]}, "training": {}, "metrics": {}}
    save_checkpoint(net.state_dict(), path, card)
    return path


@pytest.fixture(scope="session")
def tiny_acq():
    """24 small frames (24 x 28) with +20 dB tissue and noise: for the network-driven paths."""
    return simulate_acquisition(UlmSimConfig(n_frames=24, bubbles_per_frame=8, clutter_db=20.0, noise_db=-30.0,
                                             seed=5, shape_zx=(24, 28)))


@pytest.fixture
def one_torch_thread():
    import torch

    # Tiny convolutions run faster on one thread than on two contended ones.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
