"""Frame pairs read at the interval the models were trained on (freehand/pair_interval.py)."""

import copy
import dataclasses
import functools

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import euler_to_matrix
from ultrasound_ai.freehand.methods import get_method
from ultrasound_ai.freehand.pair_interval import (
    interpolate_poses,
    keyframe_indices,
    resolve_stride,
    spread_pair_values,
    subsample,
)
from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
from ultrasound_ai.validation.pose_agreement import out_of_plane_correlation

pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/conftest.py


@functools.lru_cache(maxsize=None)
def _simulated(seed, fps, n_frames=120):
    return simulate_sweep(seed, n_frames=n_frames, tactic="linear", frame_shape=(64, 64), pixel_spacing=0.3, n_imus=4,
                          motion="varied", frame_rate_hz=fps)


def _sweep(seed, fps, n_frames=120):
    return copy.deepcopy(_simulated(seed, fps, n_frames))


@pytest.mark.parametrize("fps, stride", [(10, 1), (20, 1), (25, 1), (30, 2), (40, 2), (50, 3), (60, 3), (100, 5)])
def test_auto_stride_nearest_the_trained_interval(fps, stride):
    sweep = _sweep(3, 20.0, 8)
    sweep = dataclasses.replace(sweep, frame_rate_hz=float(fps), timestamps_s=None)
    assert resolve_stride("auto", sweep, 0.05, "fima") == stride
    assert resolve_stride(None, sweep, 0.05, "fima") == stride
    assert resolve_stride("auto", sweep, None, "fima") == 1  # a card without the setting: every frame, as published
    assert resolve_stride(4, sweep, 0.05, "fima") == 4


def test_auto_stride_uses_the_median_interval_of_irregular_timestamps():
    sweep = _sweep(3, 20.0, 8)
    t = np.cumsum(np.r_[0.0, np.tile([0.02, 0.03, 0.025], 3)[:7]])  # about 40 Hz, jittered
    assert resolve_stride("auto", dataclasses.replace(sweep, timestamps_s=t, frame_rate_hz=None), 0.05, "x") == 2


@pytest.mark.parametrize("bad", [0, -2, 2.5, "fast", True, [2]])
def test_bad_frame_stride_is_refused_naming_the_parameter(bad):
    sweep = _sweep(3, 20.0, 8)
    with pytest.raises(InputError, match="moglo parameter frame_stride"):
        resolve_stride(bad, sweep, 0.05, "moglo")


def test_keyframes_start_at_the_first_and_end_at_the_last_frame():
    """Every k-th frame and the last; a shorter last step joins the one before (k+1 to 2k-1 frames: still
    within the trained pairs, where a 1-frame pair is what the stride avoids)."""
    assert keyframe_indices(9, 2).tolist() == [0, 2, 4, 6, 8]
    assert keyframe_indices(10, 3).tolist() == [0, 3, 6, 9]
    assert keyframe_indices(11, 3).tolist() == [0, 3, 6, 10]
    assert keyframe_indices(12, 3).tolist() == [0, 3, 6, 11]
    assert keyframe_indices(6, 2).tolist() == [0, 2, 5]
    assert keyframe_indices(5, 1).tolist() == [0, 1, 2, 3, 4]
    assert keyframe_indices(3, 4).tolist() == [0, 2]
    assert keyframe_indices(2, 4).tolist() == [0, 1]


def test_interpolation_reproduces_a_steady_screw_motion_exactly():
    """Rotation at a constant rate about a fixed axis with the origin moving at constant velocity: slerp and
    linear interpolation between every third pose give back the poses in between; the keyframes are kept."""
    t = np.cumsum(np.r_[0.0, np.full(12, 0.025)])
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    truth = np.tile(np.eye(4), (len(t), 1, 1))
    for i, ti in enumerate(t):
        a = 40.0 * ti  # degrees
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        truth[i, :3, :3] = np.eye(3) + np.sin(np.radians(a)) * k + (1 - np.cos(np.radians(a))) * k @ k
        truth[i, :3, 3] = np.array([1.0, -2.0, 7.0]) * ti
    idx = keyframe_indices(len(t), 3)
    out = interpolate_poses(truth[idx], idx, t)
    assert np.abs(out - truth).max() < 1e-9
    # and a motion that is not steady is only approximated (the test above could not pass by accident)
    wobble = truth.copy()
    wobble[1:-1:3, :3, :3] = wobble[1:-1:3, :3, :3] @ euler_to_matrix(np.array([[2.0, 0.0, 0.0]]), "xyz", True)[0]
    assert np.abs(interpolate_poses(wobble[idx], idx, t) - wobble).max() > 1e-3


def test_pair_values_spread_over_the_pairs_of_each_key_interval():
    idx = np.array([0, 3, 6, 7])
    got = spread_pair_values(np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]), idx, 8)
    assert got.tolist() == [[1, 0]] * 3 + [[0.5, 0.5]] * 3 + [[0, 1]]


def test_subsample_keeps_the_frames_times_and_imu_samples_of_the_keyframes():
    sweep = _sweep(3, 40.0, 9)
    idx = keyframe_indices(9, 2)
    sub = subsample(sweep, idx)
    assert np.array_equal(sub.frames, sweep.frames[idx])
    assert np.allclose(sub.times_s(), sweep.times_s()[idx])
    assert np.array_equal(sub.imu_acc, sweep.imu_acc[:, idx])
    assert np.array_equal(sub.imu_euler_deg, sweep.imu_euler_deg[:, idx])
    assert np.array_equal(sub.tforms, sweep.tforms[idx])
    sub.validate()


@pytest.mark.parametrize("method, margin", [("fima", 0.1), ("moglo", 0.03), ("decorrelation", 0.1)])
def test_a_40_hz_sweep_is_read_at_the_trained_interval(method, margin):
    """The shipped models were trained on 20 Hz pairs (strides 1-2), the decorrelation curve calibrated on them:
    a 40 Hz sweep runs on every second frame (the keyframes' poses are those of the subsampled sweep, the frames
    between are interpolated) and its per-pair out-of-plane motion follows the truth better than when read
    pair by pair (MoGLo-Net on its finer 0.15-mm grid reads 25-ms pairs nearly as well: a smaller margin)."""
    sweep = _sweep(40, 40.0)
    m = get_method(method)
    auto = m.estimate(sweep, device="cpu")
    native = m.estimate(sweep, device="cpu", frame_stride=1)
    assert auto.attrs["frame_stride"] == 2 and native.attrs["frame_stride"] == 1
    assert auto.tforms.shape == native.tforms.shape == (sweep.n_frames, 4, 4)
    idx = keyframe_indices(sweep.n_frames, 2)
    on_keys = m.estimate(subsample(sweep, idx), device="cpu", frame_stride=1)
    assert np.allclose(auto.tforms[idx], on_keys.tforms, atol=1e-9)
    if method == "fima":
        assert auto.imu_weights.shape == (sweep.n_frames - 1, sweep.n_imus)
        assert np.allclose(auto.imu_weights.sum(axis=1), 1.0, atol=1e-5)
    shape, spacing = sweep.frames.shape[1:], sweep.pixel_spacing_xy
    r_auto, r_native = (out_of_plane_correlation(e.tforms, sweep.tforms, shape, spacing) for e in (auto, native))
    assert r_auto > r_native + margin, (r_auto, r_native)


def test_a_20_hz_sweep_is_read_pair_by_pair_as_before():
    sweep = _sweep(41, 20.0, 40)
    m = get_method("fima")
    auto, native = m.estimate(sweep, device="cpu"), m.estimate(sweep, device="cpu", frame_stride=1)
    assert auto.attrs["frame_stride"] == 1
    assert np.array_equal(auto.tforms, native.tforms)


def test_cli_frame_stride_option(tmp_path):
    """`freehand reconstruct --frame-stride K` reaches the method and is recorded in the output sweep; a bad value
    or a method without the option exits 2 and writes nothing."""
    from ultrasound_ai.cli import main
    from ultrasound_ai.io.sweep import read_sweep, write_sweep

    src = write_sweep(_sweep(41, 40.0, 13), tmp_path / "sweep.h5")
    common = ["--no-metrics", "--no-progress", "--device", "cpu"]
    for stride, want in (("3", 3), ("auto", 2)):
        out = tmp_path / f"est_{stride}.h5"
        assert main(["freehand", "reconstruct", str(src), "--method", "moglo", "--frame-stride", stride,
                     "--out-sweep", str(out), *common]) == 0
        assert read_sweep(out).attrs["pose_frame_stride"] == want
    for args in (["--method", "moglo", "--frame-stride", "0"], ["--method", "fima", "--frame-stride", "two"],
                 ["--method", "imu", "--frame-stride", "2"]):
        bad = tmp_path / "bad.h5"
        assert main(["freehand", "reconstruct", str(src), *args, "--out-sweep", str(bad), *common]) == 2
        assert not bad.exists()


def test_a_sweep_slower_than_the_training_pairs_is_flagged():
    """5 Hz: every pair is 200 ms, twice the longest the models were trained on (card max_pair_interval_s): the
    result says so (nothing can be done: there are no frames in between); a 20 Hz sweep carries no warning."""
    slow = _sweep(41, 20.0, 12)
    slow = dataclasses.replace(slow, frame_rate_hz=5.0, timestamps_s=None)
    est = get_method("moglo").estimate(slow, device="cpu")
    assert est.attrs["frame_stride"] == 1 and est.attrs["pair_interval_s"] == pytest.approx(0.2)
    assert "200 ms" in est.attrs["pair_interval_warning"] and "100 ms" in est.attrs["pair_interval_warning"]
    ok = get_method("moglo").estimate(_sweep(41, 20.0, 12), device="cpu")
    assert "pair_interval_warning" not in ok.attrs and ok.attrs["pair_interval_s"] == pytest.approx(0.05)


def test_reconstruction_notes_say_how_the_sweep_was_read(tmp_path):
    """The run's notes (printed by the CLI, shown by the Slicer panel) carry the frame stride and the slow-sweep
    warning; a 20 Hz sweep read pair by pair gets neither."""
    from ultrasound_ai.freehand.reconstruct import run_reconstruction

    fast = run_reconstruction(_sweep(41, 40.0, 13), "moglo", device="cpu", evaluate=False)
    assert any("one frame in 2" in n and "50 ms" in n for n in fast.notes), fast.notes
    slow = run_reconstruction(dataclasses.replace(_sweep(41, 20.0, 12), frame_rate_hz=5.0, timestamps_s=None),
                              "moglo", device="cpu", evaluate=False)
    assert any("200 ms apart" in n for n in slow.notes), slow.notes
    plain = run_reconstruction(_sweep(41, 20.0, 12), "moglo", device="cpu", evaluate=False)
    assert not any("frame in" in n or "ms apart" in n for n in plain.notes), plain.notes
