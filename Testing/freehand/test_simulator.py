"""Simulator, trajectories and IMU model: units, conventions, determinism, the file contract, the CLI."""

import numpy as np
import pytest

from ultrasound_ai.cli import main
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import euler_to_matrix, make_rigid, matrix_to_euler
from ultrasound_ai.freehand.simulation.imu_model import (
    EARTH_FROM_WORLD,
    ImuNoise,
    default_imu_positions,
    imu_truth,
    integrate_specific_force,
    simulate_imus,
)
from ultrasound_ai.freehand.simulation.simulator import SIMULATOR_VERSION, simulate_sweep
from ultrasound_ai.freehand.simulation.trajectories import (
    TACTICS,
    generate_trajectory,
    mean_rotation_deg_s,
    mean_speed_mm_s,
)
from ultrasound_ai.io.sweep import read_sweep, write_sweep

FACE = (19.35, 0.0, 0.0)


def _rigid(T):
    R = T[..., :3, :3]
    return np.allclose(np.swapaxes(R, -1, -2) @ R, np.eye(3), atol=1e-9) and np.allclose(np.linalg.det(R), 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_sweep_units(seed):
    tr = generate_trajectory(seed, n_frames=200, tactic="linear", reverse=False, face_center_image_mm=FACE)
    assert tr.poses.shape == (200, 4, 4) and _rigid(tr.poses)
    assert np.allclose(np.diff(tr.timestamps_s), 0.05)  # 20 fps
    face = tr.poses[:, :3, :3] @ np.array(FACE) + tr.poses[:, :3, 3]
    dt = 0.05
    assert 5.0 <= mean_speed_mm_s(face, dt) <= 15.0
    assert 4.0 <= mean_rotation_deg_s(tr.poses[:, :3, :3], dt) <= 13.0
    length = np.linalg.norm(np.diff(face, axis=0), axis=1).sum()
    assert 50.0 <= length <= 150.0
    # The image looks into the tissue (image y = depth = world +y), the face stays on the skin (y ≈ 0).
    assert np.all(tr.poses[:, 1, 1] > 0.9) and np.abs(face[:, 1]).max() < 1.0
    # Without reversal the elevational progression never turns back.
    elev = np.einsum("ni,ni->n", np.diff(face, axis=0), tr.poses[1:, :3, 2])
    assert np.all(elev > 0)


@pytest.mark.parametrize("tactic", TACTICS)
def test_tactics_and_reversal(tactic):
    tr = generate_trajectory(7, n_frames=120, tactic=tactic, reverse=True, face_center_image_mm=FACE)
    assert tr.tactic == tactic and tr.reversed and _rigid(tr.fine_poses)
    assert np.allclose(tr.fine_poses[:: tr.oversample], tr.poses)
    assert 4.0 <= tr.params["mean_rotation_deg_s"] <= 13.0
    if tactic == "sector":
        # A fan: the tilt about the probe's lateral axis goes one way, then back.
        tilt = np.degrees(np.arctan2(tr.poses[:, 2, 1], tr.poses[:, 1, 1]))
        d = np.diff(tilt)
        assert d[: len(d) // 5].mean() * d[-len(d) // 5:].mean() < 0
    else:
        face = tr.poses[:, :3, :3] @ np.array(FACE) + tr.poses[:, :3, 3]
        elev = np.einsum("ni,ni->n", np.diff(face, axis=0), tr.poses[1:, :3, 2])
        assert elev[:10].mean() * elev[-10:].mean() < 0  # moving forward first, backward at the end
    tr2 = generate_trajectory(7, n_frames=120, tactic=tactic, reverse=True, face_center_image_mm=FACE)
    assert np.array_equal(tr.poses, tr2.poses)


def test_trajectory_is_smooth():
    tr = generate_trajectory(3, n_frames=60, tactic="curved", face_center_image_mm=FACE)
    p = tr.fine_poses[:, :3, 3]
    dt = tr.fine_dt_s
    acc = (p[2:] - 2 * p[1:-1] + p[:-2]) / dt**2
    jerk = np.diff(acc, axis=0) / dt
    # Bounded jerk (C²): tremor of ≤ 0.08 mm at ≤ 9 Hz gives |jerk| ≲ 0.08·(2π·9)³ ≈ 15000 mm/s³.
    assert np.abs(jerk).max() < 3e4


def test_imu_at_rest_reads_gravity_up():
    # Image z pointing up (Earth z = anterior = −y_LPS): image z = (0, −1, 0) in LPS.
    R_world = EARTH_FROM_WORLD.T  # image axes = Earth axes
    assert np.allclose(R_world[:, 2], [0, -1, 0])
    poses = np.repeat(make_rigid(R_world, [1.0, 2.0, 3.0])[None], 40, axis=0)
    acc, euler, _ = simulate_imus(poses, 0.01, 5, default_imu_positions(3), noise=None)
    assert acc.shape == (3, 8, 3) and euler.shape == (3, 8, 3)
    assert np.allclose(acc, [0, 0, 9.81], atol=1e-5)
    assert np.allclose(euler, 0, atol=1e-5)
    # Probe vertical (image y = depth = down): gravity reads along −y of the image.
    acc2, _, _ = simulate_imus(np.repeat(np.eye(4)[None], 40, 0), 0.01, 5, default_imu_positions(2), noise=None)
    assert np.allclose(acc2, [0, -9.81, 0], atol=1e-5)


def test_imu_constant_acceleration_and_lever_arm():
    t = np.arange(200) * 0.005
    a_world = np.array([300.0, -200.0, 500.0])  # mm/s²
    R = euler_to_matrix(np.radians([10.0, -20.0, 30.0]), "xyz")
    poses = make_rigid(np.broadcast_to(R, (200, 3, 3)), 0.5 * t[:, None] ** 2 * a_world)
    acc, euler, _ = simulate_imus(poses, 0.005, 10, default_imu_positions(2), noise=None)
    r_earth = EARTH_FROM_WORLD @ R
    expected = r_earth.T @ (EARTH_FROM_WORLD @ a_world / 1000.0 - np.array([0, 0, -9.81]))
    assert np.allclose(acc, expected, atol=1e-6)
    assert np.allclose(euler_to_matrix(euler[0].astype(np.float64), "xyz", degrees=True), r_earth, atol=1e-6)
    assert np.allclose(euler, matrix_to_euler(r_earth, "xyz", degrees=True), atol=1e-4)
    # Rotating probe at constant rate about image z: an IMU off the axis feels the centripetal term.
    w = 2.0  # rad/s
    tt = np.arange(400) * 0.001
    Rz = euler_to_matrix(np.stack([0 * tt, 0 * tt, w * tt], 1), "xyz")
    rot_poses = make_rigid(Rz, np.zeros((400, 3)))
    spec, r_e = imu_truth(rot_poses, 0.001, np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]]))
    centripetal = np.linalg.norm((r_e[100] @ spec[1, 100]) - (r_e[100] @ spec[0, 100]))
    assert abs(centripetal - w**2 * 0.1) < 1e-4  # ω² r with r = 0.1 m


def test_imu_double_integration_recovers_path():
    tr = generate_trajectory(5, n_frames=401, tactic="loop", frame_rate_hz=200.0, face_center_image_mm=FACE,
                             oversample=4)
    pos = default_imu_positions(2, FACE[0])
    acc, euler, _ = simulate_imus(tr.fine_poses, tr.fine_dt_s, tr.oversample, pos, noise=None)
    true = tr.poses[:, :3, :3] @ pos[1] + tr.poses[:, :3, 3]
    v0 = (tr.fine_poses[1, :3, :3] @ pos[1] + tr.fine_poses[1, :3, 3]
          - (tr.fine_poses[0, :3, :3] @ pos[1] + tr.fine_poses[0, :3, 3])) / tr.fine_dt_s
    est = integrate_specific_force(acc[1], euler[1], 1 / 200.0, true[0], v0)
    path = np.linalg.norm(np.diff(true, axis=0), axis=1).sum()
    assert path > 10 and np.abs(est - true).max() < 0.5  # mm, over 2 s


def test_imu_noise_levels():
    poses = np.repeat(np.eye(4)[None], 20 * 600 + 1, axis=0)  # 60 s at rest, 20 fps
    acc, euler, info = simulate_imus(poses, 0.0025, 20, default_imu_positions(4), noise=ImuNoise(), seed=3)
    assert acc.dtype == np.float32 and euler.dtype == np.float32
    err = acc - np.array([0, -9.81, 0], np.float32)
    assert np.all(np.abs(info["imu_acc_bias_m_s2"]) <= 0.05)
    assert np.all(np.abs(err[:, :20].mean(axis=1)) < 0.07)  # bias-dominated at first
    assert len({tuple(np.round(b, 6)) for b in info["imu_acc_bias_m_s2"]}) == 4  # each IMU its own
    # Heading drift ≈ 0.5–1.5°/min about Earth z, plus 0.1–0.5° orientation noise.
    R = euler_to_matrix(euler.astype(np.float64), "xyz", degrees=True)
    yaw_end = np.degrees(np.arctan2(R[:, -200:, 1, 0], R[:, -200:, 0, 0])).mean(axis=1)
    assert np.all((np.abs(yaw_end) > 0.3) & (np.abs(yaw_end) < 2.0))
    assert np.all((info["imu_angle_noise_deg"] >= 0.1) & (info["imu_angle_noise_deg"] <= 0.5))


def test_simulated_sweep_contract(small_sweep, tmp_path):
    sweep, phantom = small_sweep
    assert sweep.frames.shape == (24, 64, 72) and sweep.frames.dtype == np.uint8
    assert sweep.pixel_spacing_xy == (0.2, 0.2)
    assert sweep.tforms.shape == (24, 4, 4) and _rigid(sweep.tforms)
    assert sweep.imu_acc.shape == (3, 24, 3) and sweep.imu_euler_deg.shape == (3, 24, 3)
    assert sweep.imu_position_mm.shape == (3, 3) and sweep.frame_rate_hz == 20.0
    assert np.allclose(np.diff(sweep.timestamps_s), 0.05)
    a = sweep.attrs
    assert a["simulator_version"] == SIMULATOR_VERSION == "freehand-sim-1"
    assert a["seed"] == 11 and a["tactic"] == "linear" and a["reversed"] is False and a["sigma_e_mm"] > 0
    assert 10 < sweep.frames.mean() < 200 and sweep.frames.std() > 10
    back = read_sweep(write_sweep(sweep, tmp_path / "sim.h5"))
    assert np.array_equal(back.frames, sweep.frames) and np.array_equal(back.tforms, sweep.tforms)
    assert back.attrs["tactic"] == "linear"
    # The frames are the phantom's planes at the true poses (plus gain and noise).
    clean = phantom.render_plane(sweep.tforms[5], (64, 72), (0.2, 0.2), _psf_of(sweep))
    assert np.corrcoef(clean.ravel(), sweep.frames[5].ravel())[0, 1] > 0.9
    wrong = phantom.render_plane(sweep.tforms[15], (64, 72), (0.2, 0.2), _psf_of(sweep))
    assert np.corrcoef(wrong.ravel(), sweep.frames[5].ravel())[0, 1] < 0.5


def _psf_of(sweep):
    from ultrasound_ai.freehand.simulation.phantom import Psf

    return Psf(**{k[4:]: v for k, v in sweep.attrs.items() if k.startswith("psf_")})


def test_simulation_is_deterministic(small_sweep, tmp_path):
    sweep, _ = small_sweep
    again = simulate_sweep(11, n_frames=24, tactic="linear", frame_shape=(64, 72), pixel_spacing=(0.2, 0.2),
                           n_imus=3, reverse=False)
    a = write_sweep(sweep, tmp_path / "a.h5").read_bytes()
    b = write_sweep(again, tmp_path / "b.h5").read_bytes()
    assert a == b
    other = simulate_sweep(12, n_frames=4, frame_shape=(32, 40), n_imus=0)
    assert other.imu_acc is None and other.frames.shape[1:] == (32, 40)


def test_simulator_bad_arguments():
    with pytest.raises(InputError, match="tactic"):
        simulate_sweep(0, n_frames=4, tactic="zigzag")
    with pytest.raises(InputError, match="preset"):
        simulate_sweep(0, n_frames=4, preset="nope")
    with pytest.raises(InputError, match="n_frames"):
        simulate_sweep(0, n_frames=1)


def test_cli_simulate(tmp_path):
    out = tmp_path / "cli.h5"
    code = main(["freehand", "simulate", str(out), "--seed", "3", "--frames", "3", "--tactic", "sector",
                 "--imus", "2", "--reverse", "--quiet"])
    assert code == 0
    s = read_sweep(out)
    assert s.n_frames == 3 and s.attrs["tactic"] == "sector" and s.attrs["reversed"] is True and s.n_imus == 2
    assert main(["freehand", "simulate", str(tmp_path / "x.h5"), "--frames", "1", "--quiet"]) == 2
    assert not (tmp_path / "x.h5").exists()


def test_randomised_appearance_varies_per_sweep_and_leaves_the_nominal_sweeps_alone():
    """Issue 15: appearance="randomised" draws scatterer density (speckle not fully developed included),
    echogenicity contrast, gain/TGC, dynamic range, noise and the PSF per sweep, with the elevational beam in
    the nominal probe's band; the nominal draws are untouched."""
    import pytest

    from ultrasound_ai.core.errors import InputError
    from ultrasound_ai.freehand.simulation.simulator import (
        RANDOMISED_RANGES,
        random_appearance,
        simulate_sweep,
        simulate_sweep_for_grid,
    )

    looks = [random_appearance(s) for s in range(60)]
    density = np.array([a["phantom"]["scatterer_density_per_mm3"] for a in looks])
    assert density.min() < 5.0 and density.max() > 40.0  # sparse (not fully developed) to fully developed
    assert 2 <= sum(a["phantom"].get("kind") == "homogeneous" for a in looks) <= 20
    for key in ("dynamic_range_db", "noise_floor", "axial_fwhm_mm", "lateral_fwhm_mm", "tgc_compensation"):
        v = np.array([getattr(a["psf"], key) for a in looks])
        lo, hi = RANDOMISED_RANGES[key]
        assert lo <= v.min() < lo + 0.25 * (hi - lo) and hi - 0.25 * (hi - lo) < v.max() <= hi, key
    sig_e = np.array([a["psf"].sigma_e_mm for a in looks])
    assert 0.5 <= sig_e.min() and sig_e.max() <= 0.8  # the nominal probe's elevational band (model cards)
    assert random_appearance(7)["psf"] == random_appearance(7)["psf"]

    kw = dict(n_frames=3, tactic="linear", frame_shape=(24, 28), pixel_spacing=0.3, n_imus=0)
    a, b = simulate_sweep(5, **kw, appearance="randomised"), simulate_sweep(5, **kw, appearance="randomised")
    np.testing.assert_array_equal(a.frames, b.frames)
    nominal = simulate_sweep(5, **kw)
    np.testing.assert_array_equal(nominal.frames, simulate_sweep(5, **kw, appearance="nominal").frames)
    np.testing.assert_array_equal(nominal.tforms, a.tforms)  # same motion, another look
    assert not np.array_equal(nominal.frames, a.frames)
    assert a.attrs["appearance"] == "randomised" and "appearance" not in nominal.attrs
    assert a.attrs["psf_dynamic_range_db"] == pytest.approx(random_appearance(5)["psf"].dynamic_range_db)
    with pytest.raises(InputError, match="appearance"):
        simulate_sweep(5, **kw, appearance="random")
    # over a network grid: half the sweeps come shallower or narrower than the grid
    shapes = {simulate_sweep_for_grid(s, 2, (24, 26), 0.3, 0.15, 0.1, n_imus=0, appearance="randomised")
              .frames.shape[1:] for s in range(8)}
    full = simulate_sweep_for_grid(0, 2, (24, 26), 0.3, 0.15, 0.0, n_imus=0).frames.shape[1:]
    assert any(h < 0.9 * full[0] or w < 0.9 * full[1] for h, w in shapes)
