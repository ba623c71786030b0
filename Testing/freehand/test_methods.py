"""Pose-method registry (tracked, imu) and IMU dead reckoning."""

import dataclasses

import numpy as np
import pytest

from ultrasound_ai.core.errors import Cancelled, InputError
from ultrasound_ai.core.geometry import euler_to_matrix, make_rigid, matrix_to_euler, normalize_to_first
from ultrasound_ai.freehand import methods as registry
from ultrasound_ai.freehand.imu_dead_reckoning import dead_reckon, fuse_rotations, integrate_twice
from ultrasound_ai.freehand.methods import PoseEstimate, PoseMethod, available_methods, get_method, register_method
from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
from ultrasound_ai.io.sweep import Sweep

G = np.array([0.0, 0.0, -9.81])


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


def _rest_to_rest_motion(t, duration):
    """Closed-form probe motion that starts and ends at rest (position mm, static-xyz angles rad)."""
    u = t / duration
    pos = np.stack([2.0 * np.sin(np.pi * u) ** 2, 1.0 + 0.0 * u, 30.0 * (u - np.sin(2 * np.pi * u) / (2 * np.pi))], -1)
    bump = np.sin(np.pi * u) ** 2  # zero value and zero slope at both ends: no angular velocity there
    ang = np.stack([0.2 * bump, 0.1 * bump, -0.15 * bump], -1)
    return pos, ang


def _analytic_imu_sweep(n=60, duration=3.0, earth_from_world=(0.3, -0.2, 1.0)):
    """A sweep with exact IMU data for a rest-to-rest motion: accelerations differentiated analytically
    (by a fine central difference of the closed form), an Earth frame that is not the world frame, three
    IMUs with lever arms, and 8x8 dummy frames."""
    t = np.linspace(0.0, duration, n)
    E = euler_to_matrix(np.asarray(earth_from_world), "xyz")
    lever = np.array([[10.0, -20.0, 5.0], [-10.0, -20.0, 5.0], [0.0, -30.0, -5.0]])

    def imu_point(tt, r):
        pos, ang = _rest_to_rest_motion(tt, duration)
        return (pos + euler_to_matrix(ang, "xyz") @ r) @ E.T

    pos, ang = _rest_to_rest_motion(t, duration)
    R_world = euler_to_matrix(ang, "xyz")
    R_earth = E @ R_world
    h = 1e-3
    acc = []
    for r in lever:
        a = (imu_point(t + h, r) - 2 * imu_point(t, r) + imu_point(t - h, r)) / h**2 / 1000.0  # m/s²
        acc.append(np.einsum("nji,nj->ni", R_earth, a - G))  # specific force in the IMU axes
    euler = np.degrees(matrix_to_euler(R_earth, "xyz"))
    return Sweep(
        frames=np.zeros((n, 8, 8), np.uint8), pixel_spacing_xy=(0.2, 0.3), tforms=make_rigid(R_world, pos),
        timestamps_s=t, imu_acc=np.stack(acc), imu_euler_deg=np.repeat(euler[None], 3, 0), imu_position_mm=lever,
    )


@pytest.fixture(scope="module")
def sector_clean():
    # Sector (fan) sweeps rotate the most, so the lever arm and the rotation path are exercised.
    return simulate_sweep(21, n_frames=60, tactic="sector", frame_shape=(40, 44), imu_noise=None, image_noise=False)


@pytest.fixture(scope="module")
def linear_noisy():
    return simulate_sweep(22, n_frames=60, tactic="linear", frame_shape=(40, 44))


def _fit_initial_velocity(est, truth, t):
    """The one unobservable of double integration, fitted from the truth (test-side only)."""
    dt = (t - t[0])[:, None]
    r = normalize_to_first(truth)[:, :3, 3] - est[:, :3, 3]
    return (dt * r).sum(0) / (dt**2).sum()


def _rotation_errors_deg(est, truth):
    rel = np.einsum("nji,njk->nik", est[:, :3, :3], normalize_to_first(truth)[:, :3, :3])
    return np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))


def _translation_errors_mm(est, truth):
    return np.linalg.norm(est[:, :3, 3] - normalize_to_first(truth)[:, :3, 3], axis=1)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_builtin_methods_and_unknown_name():
    assert available_methods()[:2] == ["tracked", "imu"]
    assert get_method("tracked").uses_tracking and not get_method("imu").uses_tracking
    with pytest.raises(InputError, match="unknown pose method 'nope'.*tracked"):
        get_method("nope")


class _Spy(PoseMethod):
    """Records what it was given; returns the identity chain."""

    seen = []

    def _estimate(self, sweep, ctx):
        _Spy.seen.append(sweep.tforms)
        ctx.report(0.5, "half")
        return PoseEstimate(np.repeat(np.eye(4)[None], sweep.n_frames, 0))


class _TrackingSpy(_Spy):
    uses_tracking = True


def test_registry_hides_truth_from_every_method_not_flagged_as_tracking():
    sweep = _analytic_imu_sweep(n=6)
    register_method("spy", _Spy)
    register_method("tracking_spy", _TrackingSpy)
    try:
        assert {"spy", "tracking_spy"} <= set(available_methods())
        with pytest.raises(InputError, match="already registered"):
            register_method("spy", _Spy)
        _Spy.seen.clear()
        get_method("spy").estimate(sweep)
        get_method("tracking_spy").estimate(sweep)
        assert _Spy.seen[0] is None  # the method never saw the tracker poses
        assert np.array_equal(_Spy.seen[1], sweep.tforms)
        assert sweep.tforms is not None  # the caller's sweep is untouched
        # Progress and cancellation go through the context.
        calls = []
        get_method("spy").estimate(sweep, progress=lambda f, m: calls.append((f, m)))
        assert calls == [(0.5, "half")]
        with pytest.raises(Cancelled):
            get_method("spy").estimate(sweep, cancel=lambda: True)
        with pytest.raises(InputError, match="unknown parameter"):
            get_method("spy").estimate(sweep, colour="red")
    finally:
        registry.unregister_method("spy")
        registry.unregister_method("tracking_spy")
    assert "spy" not in available_methods()


def test_method_output_is_checked():
    class Broken(PoseMethod):
        def _estimate(self, sweep, ctx):
            t = np.repeat(np.eye(4)[None], sweep.n_frames, 0)
            t[0, 0, 3] = 5.0  # tforms[0] must be the identity
            return PoseEstimate(t)

    register_method("broken", Broken)
    try:
        with pytest.raises(RuntimeError, match="identity"):
            get_method("broken").estimate(_analytic_imu_sweep(n=5))
    finally:
        registry.unregister_method("broken")


def test_tracked_normalises_the_file_poses_and_needs_them():
    sweep = _analytic_imu_sweep(n=10)
    est = get_method("tracked").estimate(sweep)
    assert np.array_equal(est.tforms[0], np.eye(4))
    np.testing.assert_allclose(est.tforms, np.linalg.inv(sweep.tforms[0]) @ sweep.tforms, atol=1e-12)
    with pytest.raises(InputError, match="no 'tforms'"):
        get_method("tracked").estimate(sweep.without_truth())


def test_imu_needs_imu_data():
    sweep = _analytic_imu_sweep(n=10)
    bare = Sweep(frames=sweep.frames, pixel_spacing_xy=sweep.pixel_spacing_xy, tforms=sweep.tforms)
    with pytest.raises(InputError, match="no IMU data"):
        get_method("imu").estimate(bare)
    with pytest.raises(InputError, match="initial_velocity_mm_s"):
        get_method("imu").estimate(sweep, initial_velocity_mm_s=[1.0, 2.0])


# ----------------------------------------------------------------------------------------------
# IMU dead reckoning
# ----------------------------------------------------------------------------------------------


def test_integrate_twice_is_exact_for_cubic_acceleration():
    t = np.sort(np.random.default_rng(0).uniform(0, 2, 30))  # non-uniform sampling
    t[0] = 0.0
    a = np.stack([np.full_like(t, 2.0), 6.0 * t, 3.0 * t**2 - t], 1)
    expected = np.stack([t**2, t**3, t**4 / 4 - t**3 / 6], 1)
    expected_v0 = expected + np.outer(t, [1.0, -2.0, 0.5])
    # Constant and linear components are exact; the quartic term is a cubic spline's, close.
    np.testing.assert_allclose(integrate_twice(t, a)[:, :2], expected[:, :2], atol=1e-9)
    np.testing.assert_allclose(integrate_twice(t, a, v0=[1.0, -2.0, 0.5])[:, :2], expected_v0[:, :2], atol=1e-9)
    np.testing.assert_allclose(integrate_twice(t, a)[:, 2], expected[:, 2], atol=1e-3)


def test_quaternion_mean_of_symmetric_rotations():
    base = euler_to_matrix(np.array([0.4, -0.3, 2.0]), "xyz")
    d = 0.01
    offsets = euler_to_matrix(np.array([[d, 0, 0], [-d, 0, 0], [0, d, 0], [0, -d, 0]]), "xyz")
    fused = fuse_rotations((base @ offsets)[:, None])[0]
    np.testing.assert_allclose(fused, base, atol=1e-4)
    # A rotation given once as itself and once with an opposite-sign quaternion still averages to itself.
    np.testing.assert_allclose(fuse_rotations(np.stack([base, base])[:, None])[0], base, atol=1e-12)


def test_rest_to_rest_motion_is_recovered_exactly_with_lever_arms():
    sweep = _analytic_imu_sweep()
    est = get_method("imu").estimate(sweep)
    assert est.imu_weights.shape == (sweep.n_frames - 1, 3)
    np.testing.assert_allclose(est.imu_weights.sum(1), 1.0, rtol=1e-6)
    assert _rotation_errors_deg(est.tforms, sweep.tforms).max() < 1e-4
    assert _translation_errors_mm(est.tforms, sweep.tforms).max() < 0.01
    # Same answer when the timing comes from the frame rate instead of timestamps.
    rate = (sweep.n_frames - 1) / sweep.timestamps_s[-1]
    by_rate = dataclasses.replace(sweep, timestamps_s=None, frame_rate_hz=rate)
    np.testing.assert_allclose(get_method("imu").estimate(by_rate).tforms, est.tforms, atol=1e-6)
    # Ignoring the lever arm is visibly wrong: the rotation moves the IMUs relative to the image origin.
    no_lever = dataclasses.replace(sweep, imu_position_mm=None)
    assert _translation_errors_mm(get_method("imu").estimate(no_lever).tforms, sweep.tforms).max() > 1.0


def test_noise_free_simulated_imus_give_the_true_trajectory(sector_clean):
    sweep = sector_clean
    t = sweep.times_s()
    est = dead_reckon(sweep.without_truth(), remove_bias=False)
    assert _rotation_errors_deg(est.tforms, sweep.tforms).max() < 0.01
    # The simulated sweep is already moving at frame 0: its initial velocity is the one thing the
    # sensors cannot tell. Given it (fitted here from the truth), the integrated path is the true one.
    v0 = _fit_initial_velocity(est.tforms, sweep.tforms, t)
    given = dead_reckon(sweep.without_truth(), initial_velocity_mm_s=v0, remove_bias=False)
    err = _translation_errors_mm(given.tforms, sweep.tforms)
    path = np.linalg.norm(np.diff(normalize_to_first(sweep.tforms)[:, :3, 3], axis=0), axis=1).sum()
    assert path > 2.0
    assert err.max() < 0.2, (err.max(), path)


def test_realistic_noise_keeps_rotation_and_drifts_in_translation(linear_noisy):
    sweep = linear_noisy
    t = sweep.times_s()
    est = get_method("imu").estimate(sweep)
    assert _rotation_errors_deg(est.tforms, sweep.tforms).mean() < 2.0

    def final_error(remove_bias):
        # Each configuration gets its own best initial velocity (fitted from the truth, test-side only),
        # so what remains is the drift that no choice of v0 explains.
        raw = dead_reckon(sweep.without_truth(), remove_bias=remove_bias)
        v0 = _fit_initial_velocity(raw.tforms, sweep.tforms, t)
        est = dead_reckon(sweep.without_truth(), initial_velocity_mm_s=v0, remove_bias=remove_bias)
        return _translation_errors_mm(est.tforms, sweep.tforms)[-1]

    # Accelerometer bias (up to 0.05 m/s²) double-integrates into millimetres of drift within 3 s ...
    drift = final_error(False)
    assert drift > 3.0
    # ... and the bias estimated under the "same velocity at both ends" assumption removes much of it.
    assert final_error(True) < 0.75 * drift


def test_imu_estimate_is_identical_without_the_tracker_poses(linear_noisy):
    with_truth = get_method("imu").estimate(linear_noisy)
    without = get_method("imu").estimate(linear_noisy.without_truth())
    assert np.array_equal(with_truth.tforms, without.tforms)
    assert np.array_equal(with_truth.imu_weights, without.imu_weights)
    assert with_truth.attrs == without.attrs


# ----------------------------------------------------------------------------------------------
# Frozen benchmark set
# ----------------------------------------------------------------------------------------------


def test_benchmark_set_specs_and_manifest_checks(tmp_path):
    from ultrasound_ai.freehand.simulation import benchmark_set
    from ultrasound_ai.freehand.simulation.simulator import SIMULATOR_VERSION

    specs = benchmark_set.benchmark_specs()
    assert [s.seed for s in specs] == list(range(900_000, 900_020))
    assert [s.tactic for s in specs] == [t for t in ("linear", "curved", "loop", "sector") for _ in range(5)]
    tiny = dict(n_frames=3, frame_shape=(8, 10), pixel_spacing=0.5)
    paths, manifest = benchmark_set.ensure_benchmark_set(tmp_path, **tiny)
    assert manifest["simulator_version"] == SIMULATOR_VERSION and len(paths) == 20
    assert [e["seed"] for e in manifest["sweeps"]] == [s.seed for s in specs]
    first = paths[0].read_bytes()
    # Reuse: nothing regenerated; a damaged file is regenerated identically (deterministic simulator).
    paths[0].write_bytes(b"damaged")
    again, manifest2 = benchmark_set.ensure_benchmark_set(tmp_path, **tiny)
    assert again == paths and paths[0].read_bytes() == first and manifest2 == manifest
    # Different settings than the cached set: refused, never mixed.
    with pytest.raises(InputError, match="different settings"):
        benchmark_set.ensure_benchmark_set(tmp_path, **{**tiny, "n_frames": 4})
