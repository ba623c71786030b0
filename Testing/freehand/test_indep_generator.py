"""The independent validation generator (freehand-indep-v1): independence, determinism, physics, contract."""

import ast
from pathlib import Path

import numpy as np
import pytest

import ultrasound_ai.validation.freehand_indep as fi
import ultrasound_ai.validation.freehand_indep_set as fis
import ultrasound_ai.validation.pose_agreement as pa
from ultrasound_ai.core.geometry import euler_to_matrix, params_to_matrix

# What the independent family may use from the engine: the contract, errors, atomic writes, itself.
ALLOWED = ("ultrasound_ai.core.errors", "ultrasound_ai.core.atomic", "ultrasound_ai.io.sweep",
           "ultrasound_ai.validation")


@pytest.mark.parametrize("module", [fi, fis])
def test_imports_nothing_from_the_training_simulator(module):
    tree = ast.parse(Path(module.__file__).read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(("." * node.level) + (node.module or ""))
    engine = [n for n in names if n.startswith(("ultrasound_ai", "."))]
    assert engine, "the parser found no engine import at all: the check would be vacuous"
    bad = [n for n in engine if not n.startswith(ALLOWED)]
    assert not bad, f"{module.__name__} imports {bad}"


@pytest.fixture(scope="module")
def sweep():
    return fi.generate_sweep(4242, "linear", n_frames=40, frame_shape_hw=(48, 56), pixel_spacing_mm=0.2)


def test_deterministic_and_through_the_contract(sweep, tmp_path):
    from ultrasound_ai.io.sweep import read_sweep, write_sweep

    again = fi.generate_sweep(4242, "linear", n_frames=40, frame_shape_hw=(48, 56), pixel_spacing_mm=0.2)
    assert np.array_equal(sweep.frames, again.frames) and np.array_equal(sweep.imu_acc, again.imu_acc)
    back = read_sweep(write_sweep(sweep, tmp_path / "s.h5"))
    assert np.array_equal(back.frames, sweep.frames) and np.allclose(back.tforms, sweep.tforms)
    assert back.imu_acc.shape == (4, 40, 3) and back.frames.dtype == np.uint8
    assert 40 < sweep.frames.mean() < 200  # neither black nor saturated
    other = fi.generate_sweep(4243, "linear", n_frames=40, frame_shape_hw=(48, 56), pixel_spacing_mm=0.2)
    assert not np.array_equal(other.frames, sweep.frames)


def test_imus_follow_the_design_convention(sweep):
    """Orientation: static-xyz Euler angles of the IMU in an Earth frame (read with the ENGINE's own
    conversion); specific force R^T (a - g): rotated to Earth and plus g it is the small true acceleration."""
    r = euler_to_matrix(sweep.imu_euler_deg.astype(np.float64), "xyz", degrees=True)  # [M, N, 3, 3]
    true_rel = np.linalg.solve(sweep.tforms[0, :3, :3], sweep.tforms[-1, :3, :3])
    for m in range(4):
        imu_rel = r[m, 0].T @ r[m, -1]
        angle = np.degrees(np.arccos(np.clip((np.trace(imu_rel.T @ true_rel) - 1) / 2, -1, 1)))
        assert angle < 1.5, f"IMU {m}: relative rotation off by {angle:.2f} deg"
        a_earth = np.einsum("nij,nj->ni", r[m], sweep.imu_acc[m].astype(np.float64)) + np.array([0, 0, -9.81])
        assert np.abs(a_earth.mean(0)).max() < 0.3  # a wrong Euler order or sign leaves metres per s^2
    # image y (depth) points down at rest: gravity's specific force reads about -9.8 on y
    assert np.all(sweep.imu_acc[:, :, 1].mean(1) < -9.0)


def test_speckle_decorrelates_with_elevation_as_specified():
    """Intensity correlation between planes d apart along the elevational axis is exp(-d^2 / 2 s^2)."""
    s = np.array([0.25, 0.15, 0.6])
    field = fi.SpeckleField(np.random.default_rng(3), s)
    rng = np.random.default_rng(4)
    pts = rng.uniform(0, 40, (20000, 3))
    base = np.abs(field.sample(pts)) ** 2
    assert abs(base.mean() - 1.0) < 0.05
    for d in (0.3, 0.6, 1.2):
        moved = np.abs(field.sample(pts + np.array([0.0, 0.0, d]))) ** 2
        r = np.corrcoef(base, moved)[0, 1]
        assert abs(r - np.exp(-d * d / (2 * s[2] ** 2))) < 0.05, (d, r)


@pytest.mark.parametrize("tactic", fi.TACTICS)
def test_motion_tactics(tactic):
    rng = np.random.default_rng(np.random.SeedSequence([7, fi.TACTICS.index(tactic)]))
    motion = fi.generate_motion(rng, tactic, 200)
    frames = fi._PAD + np.arange(200) * fi._OVERSAMPLE
    face = motion.face_mm[frames]
    step = np.linalg.norm(np.diff(face, axis=0), axis=1) * fi.FRAME_RATE_HZ  # mm/s
    assert step.max() < 30.0
    if tactic == "sector":
        assert np.ptp(face, axis=0).max() < 5.0  # the face stays put; the probe rocks
        tilt = np.degrees(np.arccos(motion.rotations[frames][:, 2, 2]))
        assert np.ptp(tilt) > 8.0
    else:
        assert np.ptp(face[:, 2]) > 10.0
    if tactic == "loop":  # along an ellipse: the elevational motion reverses
        dz = np.diff(face[:, 2])
        assert (dz > 0.05).any() and (dz < -0.05).any()


def test_set_definition_is_frozen():
    d = fis.set_definition()
    assert d["name"] == "freehand-indep-v1" and d["generator_version"] == fi.GENERATOR_VERSION
    assert [s["seed"] for s in d["sweeps"]] == list(range(610_000, 610_020))
    assert [s["tactic"] for s in d["sweeps"]].count("loop") == 5 and len(d["sweeps"]) == 20


def test_pose_agreement_known_answers():
    rng = np.random.default_rng(0)
    steps = np.column_stack([rng.normal(0, 0.1, (30, 2)), rng.uniform(0.1, 0.8, 30), rng.normal(0, 0.2, (30, 3))])
    true = np.empty((31, 4, 4))
    true[0] = np.eye(4)
    for i, p in enumerate(steps):
        true[i + 1] = true[i] @ params_to_matrix(p, "xyz", degrees=True)
    shape, spacing = (50, 60), (0.2, 0.2)
    # the truth at half scale about the frame centre: correlation 1, fitted scale 2, scaled estimate exact
    centre = pa.frame_centre_mm(shape, spacing)
    shift = np.eye(4)
    shift[:3, 3] = centre
    rel = np.linalg.inv(shift) @ np.linalg.solve(true[:-1], true[1:]) @ shift
    rel[:, :3, 3] *= 0.5
    half = [np.eye(4)]
    for r in shift @ rel @ np.linalg.inv(shift):
        half.append(half[-1] @ r)
    half = np.array(half)
    assert pa.out_of_plane_correlation(half, true, shape, spacing) == pytest.approx(1.0)
    k, fixed = pa.rescale_translations(half, true, shape, spacing)
    assert k == pytest.approx(2.0) and np.allclose(fixed, true, atol=1e-9)
    const = np.array([np.eye(4)] + [params_to_matrix([0, 0, 0.4 * i, 0, 0, 0], "xyz", degrees=True)
                                    for i in range(1, 31)])
    assert pa.out_of_plane_correlation(const, true, shape, spacing) == 0.0
