"""Shared pytest setup: torch thread settings, a hypothesis profile, and the gpu marker."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ultrasound_ai", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile("ultrasound_ai")
except ImportError:  # pragma: no cover - hypothesis is part of the test extra
    pass


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tiny networks, then the session's setting back.

    A second intra-op thread gains tiny models nothing and, on a busy 2-core machine, slows them severalfold.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
