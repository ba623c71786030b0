"""Direction of out-of-plane travel from the IMUs fitted to the images' distances (freehand/imu_travel.py)."""

import copy
import functools

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import chain_relative
from ultrasound_ai.freehand.imu_travel import apply_imu_direction, imu_translation_model
from ultrasound_ai.freehand.metrics import fdr
from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
from ultrasound_ai.validation.pose_agreement import frame_centre_mm

pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/conftest.py


@functools.lru_cache(maxsize=None)
def _simulated(seed, noisy=True):
    return simulate_sweep(seed, n_frames=120, tactic="loop", frame_shape=(64, 64), pixel_spacing=0.3, n_imus=4,
                          motion="varied", **({} if noisy else {"imu_noise": None}))


def _sweep(seed, noisy=True):
    """A looping 6 s sweep with reversals (a copy: tests may cut it)."""
    return copy.deepcopy(_simulated(seed, noisy))


def _truth(sweep):
    """(true pair transforms T_i<-i+1, the frame centre's translation per pair)."""
    tf = np.asarray(sweep.tforms)
    rel = np.linalg.inv(tf[:-1]) @ tf[1:]
    c = frame_centre_mm(sweep.frames.shape[1:], sweep.pixel_spacing_xy)
    return rel, np.einsum("nij,j->ni", rel[:, :3, :3], c) + rel[:, :3, 3] - c


def test_translation_model_holds_the_true_motion_for_noise_free_imus():
    """With exact IMU readings some (initial velocity, bias) reproduces every pair's translation of the frame
    centre: a wrong axis, lever arm or gravity sign would leave errors of the size of the motion itself."""
    sweep = _sweep(13, noisy=False)
    _, t_true = _truth(sweep)
    # no orientation smoothing: the model itself must be exact (smoothing trades a little bias for less noise)
    t0, basis, knots = imu_translation_model(sweep, frame_centre_mm(sweep.frames.shape[1:], sweep.pixel_spacing_xy),
                                             smooth_s=0.0)
    assert basis.shape == (len(t_true), 3, 3 + 3 * knots)
    theta = np.linalg.lstsq(basis.reshape(-1, basis.shape[2]), (t_true - t0).ravel(), rcond=None)[0]
    err = np.sqrt(((t0 + basis @ theta - t_true) ** 2).mean(axis=0))
    scale = np.sqrt((t_true ** 2).mean(axis=0))
    assert np.all(err < 0.05 * scale.max()), (err, scale)
    assert np.sqrt(((t0 - t_true) ** 2).mean()) > 5 * err.max()  # the unknowns matter: zero is far off


def test_imu_direction_recovers_reversals_from_unsigned_distances():
    """Truth with every out-of-plane step made positive (what images alone give) on looping sweeps with
    reversals and noisy IMUs: the fitted signs agree with the truth on most of the motion and the chained
    sweep drifts far less; rotation and in-plane motion are left as they were."""
    agree, before, after = [], [], []
    for seed in (13, 16, 17):
        sweep = _sweep(seed)
        rel, t_c = _truth(sweep)
        c = frame_centre_mm(sweep.frames.shape[1:], sweep.pixel_spacing_xy)
        unsigned = rel.copy()
        t_abs = t_c.copy()
        t_abs[:, 2] = np.abs(t_c[:, 2])
        unsigned[:, :3, 3] = t_abs - np.einsum("nij,j->ni", rel[:, :3, :3], c) + c
        out, facts = apply_imu_direction(unsigned, sweep)
        assert facts["direction"] == "imus" and facts["direction_pairs_flipped"] > 0
        np.testing.assert_allclose(out[:, :3, :3], rel[:, :3, :3])
        t_out = np.einsum("nij,j->ni", out[:, :3, :3], c) + out[:, :3, 3] - c
        np.testing.assert_allclose(t_out[:, :2], t_c[:, :2], atol=1e-9)
        np.testing.assert_allclose(np.abs(t_out[:, 2]), np.abs(t_c[:, 2]), atol=1e-9)
        w = np.abs(t_c[:, 2])
        agree.append((w * (np.sign(t_out[:, 2]) == np.sign(t_c[:, 2]))).sum() / w.sum())
        shape, sp = sweep.frames.shape[1:], sweep.pixel_spacing_xy
        before.append(fdr(chain_relative(unsigned), sweep.tforms, shape, sp))
        after.append(fdr(chain_relative(out), sweep.tforms, shape, sp))
    assert np.mean(agree) > 0.85, agree
    assert np.mean(after) < 0.3 * np.mean(before), (before, after)


def test_imu_direction_needs_imus():
    sweep = simulate_sweep(3, n_frames=12, tactic="linear", frame_shape=(32, 32), pixel_spacing=0.3, n_imus=0)
    rel, _ = _truth(sweep)
    with pytest.raises(InputError, match="no IMU data"):
        apply_imu_direction(rel, sweep)


def test_fima_direction_parameter_is_checked():
    from ultrasound_ai.freehand.fima.method import method_options
    from ultrasound_ai.freehand.fima.model import make_config

    assert method_options({}, make_config("tiny", "fima"), 4)["direction"] == "network"
    assert method_options({}, make_config("tiny", "fima"), 4, card_direction="imus")["direction"] == "imus"
    with pytest.raises(InputError, match="direction"):
        method_options({"direction": "forward"}, make_config("tiny", "fima"), 4)
    with pytest.raises(InputError, match="direction 'imus' needs an IMU variant"):
        method_options({"direction": "imus"}, make_config("tiny", "rem"), 0)


def test_shipped_fima_takes_its_direction_from_the_imus():
    """The shipped card sets inference.direction 'imus': through the method the out-of-plane signs follow
    the IMU fit on a sweep with reversals, and the parameter restores the network's signs."""
    from ultrasound_ai.freehand.methods import get_method

    sweep = _sweep(13)  # FDR about 3 % with the IMU direction, 90 % with the network's
    est = get_method("fima").estimate(sweep, device="cpu")
    net = get_method("fima").estimate(sweep, device="cpu", direction="network")
    assert est.attrs["direction"] == "imus" and net.attrs["direction"] == "network"
    shape, sp = sweep.frames.shape[1:], sweep.pixel_spacing_xy
    assert fdr(est.tforms, sweep.tforms, shape, sp) < fdr(net.tforms, sweep.tforms, shape, sp)


def test_fima_card_direction_is_skipped_where_the_fit_cannot_run():
    """A 3-frame sweep still reconstructs with the shipped card (the IMU direction skipped, and the result says
    why); asked for explicitly, the direction fails naming the cause. (IMU data without frame times, or
    accelerations in g, break the sweep contract before any method runs.)"""
    from ultrasound_ai.freehand.methods import get_method

    short = _sweep(13).without_truth()
    short.frames, short.imu_acc, short.imu_euler_deg = short.frames[:3], short.imu_acc[:, :3], short.imu_euler_deg[:, :3]
    short.timestamps_s = short.timestamps_s[:3]
    est = get_method("fima").estimate(short, device="cpu")
    assert est.tforms.shape == (3, 4, 4) and est.attrs["direction"] == "network"
    assert "3 frames" in est.attrs["direction_skipped"]
    with pytest.raises(InputError, match="direction 'imus': the sweep has 3 frames"):
        get_method("fima").estimate(short, device="cpu", direction="imus")
    in_g = _sweep(13).without_truth()  # accelerations in g instead of m/s^2
    in_g.imu_acc = in_g.imu_acc / 9.81
    for method in ("fima", "decorrelation", "imu"):
        with pytest.raises(InputError, match="imu_acc.*expected the specific force in m/s"):
            get_method(method).estimate(in_g, device="cpu")


def test_noisier_imus_weigh_less_in_the_fused_orientation():
    """Four IMUs on one probe with angle noise 0.1, 0.1, 0.5, 0.5 deg: the jitter-based weights rank them and
    the weighted quaternion mean lies closer to the true orientation than the plain mean."""
    from ultrasound_ai.core.geometry import euler_to_matrix
    from ultrasound_ai.freehand.imu_dead_reckoning import angle_noise_weights, fuse_rotations

    rng = np.random.default_rng(5)
    t = np.linspace(0.0, 10.0, 200)
    true = np.column_stack([5 * np.sin(0.7 * t), 3 * np.cos(0.4 * t), 20 + 10 * np.sin(0.2 * t)])
    sigma = np.array([0.1, 0.1, 0.5, 0.5])
    rots = euler_to_matrix(true[None] + rng.normal(0.0, 1.0, (4, 200, 3)) * sigma[:, None, None], "xyz", degrees=True)
    w = angle_noise_weights(rots, 11)
    assert w[0] > 5 * w[2] and w[1] > 5 * w[3] and np.isclose(w.sum(), 1.0)
    ref = euler_to_matrix(true, "xyz", degrees=True)

    def err(fused):
        cos = (np.einsum("nij,nij->n", fused, ref) - 1.0) / 2.0
        return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).mean()

    assert err(fuse_rotations(rots, w)) < 0.7 * err(fuse_rotations(rots))


@pytest.mark.parametrize("scale", [0.6, 1.6])
def test_imu_fit_reads_the_scale_of_mis_scaled_distances(scale):
    """Image distances off by a factor (another probe's beam width): the fitted scale comes out near its
    inverse (the accelerometers are in absolute units) and the signs still agree with the truth."""
    from ultrasound_ai.freehand.imu_travel import fit_travel

    agree, kappa = [], []
    for seed in (13, 16, 17):
        sweep = _sweep(seed)
        _, t_c = _truth(sweep)
        w = np.abs(t_c[:, 2])
        fit = fit_travel(sweep, frame_centre_mm(sweep.frames.shape[1:], sweep.pixel_spacing_xy), t_c[:, :2], scale * w)
        agree.append((w * (fit.signs == np.sign(t_c[:, 2]))).sum() / w.sum())
        kappa.append(fit.attrs["imu_travel_distance_scale"])
    assert np.mean(agree) > 0.85, agree
    assert 0.7 / scale < np.median(kappa) < 1.15 / scale, kappa


def test_weak_imu_evidence_keeps_the_expected_signs():
    """A steady forward sweep whose four IMUs are all noisy (0.4-0.5 deg): the noise alone can make a reversal
    fit a little better, but not by more than the fit's own noise, so the expected (forward) signs stand; on a
    looping sweep with reversals the evidence is strong and the fit's signs are applied."""
    from ultrasound_ai.freehand.imu_travel import fit_travel
    from ultrasound_ai.freehand.simulation.imu_model import ImuNoise

    sweep = simulate_sweep(7, n_frames=200, tactic="curved", frame_shape=(64, 64), pixel_spacing=0.3, n_imus=4,
                           imu_noise=ImuNoise(angle_noise_deg=(0.4, 0.5)))
    _, t_c = _truth(sweep)
    assert np.all(t_c[:, 2] > 0)
    centre = frame_centre_mm(sweep.frames.shape[1:], sweep.pixel_spacing_xy)
    fit = fit_travel(sweep, centre, t_c[:, :2], np.abs(t_c[:, 2]))
    assert not fit.attrs["imu_travel_applied"] and np.all(fit.signs == 1.0), fit.attrs
    forced = fit_travel(sweep, centre, t_c[:, :2], np.abs(t_c[:, 2]), min_evidence=0.0)
    assert np.any(forced.signs < 0)  # what the gate prevents
    loop = _sweep(13)
    _, t_loop = _truth(loop)
    fit = fit_travel(loop, frame_centre_mm(loop.frames.shape[1:], loop.pixel_spacing_xy), t_loop[:, :2],
                     np.abs(t_loop[:, 2]))
    assert fit.attrs["imu_travel_applied"] and fit.attrs["imu_travel_evidence"] > 5.0
