"""Session-scoped small simulated registration cases (coarse voxels keep them fast)."""

import pytest

from ultrasound_ai.registration.phantom import PhantomConfig, simulate_case


@pytest.fixture(scope="session")
def small_case():
    return simulate_case(5, PhantomConfig.small())


@pytest.fixture(scope="session")
def small_case_dir(tmp_path_factory, small_case):
    from ultrasound_ai.registration.case import write_case

    return write_case(small_case, tmp_path_factory.mktemp("reg_cases") / small_case.name)
