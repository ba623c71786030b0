"""The independent validation phantom: its own code path, the anatomy TRUS shows, and the frozen set."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ultrasound_ai.core.geometry import apply_transform, invert_rigid
from ultrasound_ai.io.volume import resample_volume
from ultrasound_ai.registration import indep_phantom
from ultrasound_ai.registration.frozen_sets import FROZEN_SETS, initial_with_sre
from ultrasound_ai.registration.indep_phantom import simulate_indep_case
from ultrasound_ai.registration.metrics import sre

ALLOWED = {"__future__", "numpy", "scipy", "ultrasound_ai.io.volume", "ultrasound_ai.registration.case"}


@pytest.fixture(scope="module")
def indep_case():
    return simulate_indep_case(11, coarse=2.0)


def test_imports_nothing_from_the_training_phantom():
    tree = ast.parse(Path(indep_phantom.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= ALLOWED, imported - ALLOWED
    # Nor through what it imports: a fresh interpreter never loads the training phantom.
    code = ("import sys, ultrasound_ai.registration.indep_phantom as m; m.simulate_indep_case(1, coarse=3.0); "
            "print('ultrasound_ai.registration.phantom' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_truth_maps_the_mri_gland_onto_the_trus_gland(indep_case):
    c = indep_case
    mr_in_us = resample_volume(c.fixed_label, c.moving_label, invert_rigid(c.truth_fixed_to_moving), "nearest")
    a, b = mr_in_us.array.astype(bool), c.moving_label.array.astype(bool)
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.75  # elastic deformation and the fan's crop keep it below 1
    shifted = c.truth_fixed_to_moving.copy()
    shifted[:3, 3] += [0, 8, 0]
    off = resample_volume(c.fixed_label, c.moving_label, invert_rigid(shifted), "nearest").array.astype(bool)
    assert 2 * (off & b).sum() / (off.sum() + b.sum()) < dice - 0.1
    # Landmarks move with the truth plus the small elastic push (a few mm at most).
    moved = apply_transform(c.truth_fixed_to_moving, c.landmarks_fixed)
    assert np.all(np.linalg.norm(moved - c.landmarks_moving, axis=1) < 4.5)


def test_probe_lies_just_behind_the_gland(indep_case):
    """As in real TRUS: the probe surface a few mm behind the gland, inside the image's near field."""
    c = indep_case
    gland = c.moving_label.array.astype(bool)
    kji = np.argwhere(gland)
    p = c.moving_label.index_to_physical(kji[:, ::-1].astype(float))  # probe frame: axis along z through x=y=0
    closest = np.hypot(p[:, 0], p[:, 1]).min() - c.attrs["probe_radius_mm"]
    assert 0.0 <= closest <= c.attrs["probe_gap_mm"] + 3.0


def test_initial_transforms_have_the_exact_sre(indep_case):
    rng = np.random.default_rng(3)
    for level in (0.0, 8.0, 16.0):
        T0 = initial_with_sre(indep_case.truth_fixed_to_moving, indep_case.surface_fixed, level, rng)
        assert sre(T0, indep_case.truth_fixed_to_moving, indep_case.surface_fixed) == pytest.approx(level, abs=1e-6)
    spec = FROZEN_SETS["registration-indep-v1"]
    assert len(spec["seeds"]) >= 24 and spec["initial_sre_mm"] == [0.0, 8.0, 16.0]
    assert spec["version"] == indep_phantom.INDEP_SIM_VERSION
