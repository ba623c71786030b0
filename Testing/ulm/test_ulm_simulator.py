"""Microbubble flow simulator: determinism, concentration, geometry, flow, PSF placement, levels, CLI."""

import math

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.ulm_files import read_acquisition
from ultrasound_ai.ulm.simulator import ULM_SIM_VERSION, FlowSimulator, UlmSimConfig, simulate_acquisition

TINY = dict(shape_zx=(24, 32), n_frames=30, bubbles_per_frame=10)


def test_same_seed_same_data_other_seed_other_data():
    a = simulate_acquisition(UlmSimConfig(seed=4, **TINY))
    b = simulate_acquisition(UlmSimConfig(seed=4, **TINY))
    c = simulate_acquisition(UlmSimConfig(seed=5, **TINY))
    np.testing.assert_array_equal(a.iq, b.iq)
    np.testing.assert_array_equal(a.gt_positions, b.gt_positions)
    assert not np.array_equal(a.iq, c.iq)


def test_contract_and_recorded_parameters(small_acquisition, sim_config):
    acq = small_acquisition
    assert acq.shape == (200, 84, 143) and acq.iq.dtype == np.complex64
    lam = 1540.0 / 15.625e6 * 1e3
    assert acq.wavelength_mm == pytest.approx(0.09856)
    assert acq.pixel_size_mm == pytest.approx((lam, lam))
    assert acq.frame_rate_hz == 1000.0
    assert acq.attrs["ulm_sim_version"] == ULM_SIM_VERSION
    assert acq.attrs["sim_seed"] == 7 and acq.attrs["sim_config"]["bubbles_per_frame"] == 40
    assert acq.gt_positions.shape[1] == 4


def test_bubble_count_per_frame_near_target(small_acquisition):
    gt = small_acquisition.gt_positions
    counts = np.bincount(gt[:, 0].astype(int), minlength=200)
    assert 0.8 * 40 <= counts.mean() <= 1.2 * 40
    assert counts.min() > 0
    # Ids are unique within a frame.
    for f in (0, 100, 199):
        ids = gt[gt[:, 0] == f, 3]
        assert np.unique(ids).size == ids.size


def test_truth_lies_inside_the_field_of_view(small_acquisition):
    acq = small_acquisition
    gt = acq.gt_positions
    dz, dx = acq.pixel_size_mm
    z, x = acq.z_mm(), acq.x_mm()
    assert np.all(gt[:, 1] >= z[0] - dz / 2) and np.all(gt[:, 1] <= z[-1] + dz / 2)
    assert np.all(gt[:, 2] >= x[0] - dx / 2) and np.all(gt[:, 2] <= x[-1] + dx / 2)


def test_tracks_move_smoothly_at_plausible_speeds(small_acquisition, sim_config):
    gt = small_acquisition.gt_positions
    steps = []
    for bid in np.unique(gt[:, 3]):
        tr = gt[gt[:, 3] == bid]
        tr = tr[np.argsort(tr[:, 0])]
        consecutive = np.diff(tr[:, 0]) == 1
        d = np.hypot(*np.diff(tr[:, 1:3], axis=0).T)[consecutive]
        steps.append(d)
    steps = np.concatenate(steps) * sim_config.frame_rate_hz  # mm/s
    # Never faster than the peak speed (a bubble entering a narrower branch may shift sideways by the
    # radius difference once), no teleporting (well within a tracker's 2-pixel linking distance),
    # and really flowing.
    assert np.quantile(steps, 0.995) <= sim_config.peak_speed_mm_s * 1.05
    assert steps.max() / sim_config.frame_rate_hz < small_acquisition.wavelength_mm
    assert np.median(steps) > 0.2
    # Long tracks exist (a bubble keeps its id while in view).
    ids, n = np.unique(gt[:, 3], return_counts=True)
    assert n.max() >= 50


def test_bubbles_stay_inside_their_vessels_and_follow_poiseuille():
    sim = FlowSimulator(UlmSimConfig(seed=2, bubbles_per_frame=30))
    net = sim.network
    assert net.radius_mm.max() <= 0.2 and net.radius_mm.min() >= 0.01
    for _ in range(20):
        ids0, pos0 = sim.ids.copy(), sim.positions()
        speed0 = sim.speeds_mm_s()
        centre, _ = net.locate(sim.seg, sim.s)
        off = np.hypot(*(pos0 - centre).T)
        assert np.all(off <= net.radius_mm[sim.seg] * (1 + 1e-9))
        np.testing.assert_allclose(speed0, sim.vmax[sim.seg] * (1 - sim.rho ** 2))
        seg0, s0 = sim.seg.copy(), sim.s.copy()
        sim._advance()
        # Bubbles that stayed on the same segment moved by exactly speed * dt along the centre line.
        keep = np.isin(sim.ids, ids0)
        i0 = np.searchsorted(ids0, sim.ids[keep])
        same = sim.seg[keep] == seg0[i0]
        moved = sim.s[keep][same] - s0[i0][same]
        expected = sim.flow_sign[seg0[i0][same]] * speed0[i0][same] * sim.dt
        assert same.sum() > 10
        np.testing.assert_allclose(moved, expected, rtol=1e-9, atol=1e-12)


def _log_parabola_peak(v_m, v_0, v_p):
    # Exact for a sampled Gaussian: the log is a parabola.
    a, b, c = math.log(v_m), math.log(v_0), math.log(v_p)
    return 0.5 * (a - c) / (a - 2 * b + c)


def test_psf_is_placed_at_the_exact_subpixel_position():
    sim = FlowSimulator(UlmSimConfig(seed=0, shape_zx=(20, 24), n_frames=1, bubbles_per_frame=0,
                                     clutter_db=None, noise_db=None, pixel_size_lambda=(0.5, 1.0)))
    rng = np.random.default_rng(0)
    for _ in range(5):
        pz, px = rng.uniform(6, 13), rng.uniform(6, 17)  # pixel coordinates
        pos = np.array([[sim.z0 + pz * sim.dz, sim.x0 + px * sim.dx]])
        img = np.zeros((1, sim.Z, sim.X), np.complex128)
        sim._render_bubbles(img, np.array([0]), pos, np.array([1.0 + 0j]))
        a = np.abs(img[0])
        iz, ix = np.unravel_index(np.argmax(a), a.shape)
        ez = iz + _log_parabola_peak(a[iz - 1, ix], a[iz, ix], a[iz + 1, ix])
        ex = ix + _log_parabola_peak(a[iz, ix - 1], a[iz, ix], a[iz, ix + 1])
        assert abs(ez - pz) * sim.dz < 1e-6 * sim.lam and abs(ex - px) * sim.dx < 1e-6 * sim.lam
        # Peak amplitude 1, axial phase turning by 4 pi per wavelength of depth.
        assert a.max() <= 1.0 and a.max() > 0.5
        ph = np.angle(img[0, iz + 1, ix] / img[0, iz, ix])
        assert ph == pytest.approx(math.remainder(4 * math.pi * sim.dz / sim.lam, 2 * math.pi), abs=1e-9)


def test_isolated_bubbles_peak_at_their_truth(clean_acquisition):
    acq = clean_acquisition
    gt = acq.gt_positions
    dz, dx = acq.pixel_size_mm
    lam = acq.wavelength_mm
    errors = []
    for f in range(0, acq.n_frames, 10):
        rows = gt[gt[:, 0] == f]
        env = np.abs(acq.iq[f])
        for r in rows:
            d = np.hypot(rows[:, 1] - r[1], rows[:, 2] - r[2])
            if np.sort(d)[1] < 6 * lam if len(d) > 1 else False:
                continue  # a neighbour's PSF would bias the peak
            iz = int(round((r[1] - acq.origin_mm[0]) / dz))
            ix = int(round((r[2] - acq.origin_mm[1]) / dx))
            if not (2 <= iz < acq.shape[1] - 2 and 2 <= ix < acq.shape[2] - 2):
                continue
            win = env[iz - 1:iz + 2, ix - 1:ix + 2]
            jz, jx = np.unravel_index(np.argmax(win), win.shape)
            iz, ix = iz - 1 + jz, ix - 1 + jx
            ez = iz + _log_parabola_peak(env[iz - 1, ix], env[iz, ix], env[iz + 1, ix])
            ex = ix + _log_parabola_peak(env[iz, ix - 1], env[iz, ix], env[iz, ix + 1])
            zf = acq.origin_mm[0] + ez * dz
            xf = acq.origin_mm[1] + ex * dx
            errors.append(math.hypot(zf - r[1], xf - r[2]))
    assert len(errors) >= 20
    assert np.median(errors) < lam / 10


def test_noise_level_matches_requested_db():
    for db in (-20.0, -40.0):
        acq = simulate_acquisition(UlmSimConfig(seed=1, shape_zx=(40, 50), n_frames=20, bubbles_per_frame=0,
                                                clutter_db=None, noise_db=db))
        rms = float(np.sqrt(np.mean(np.abs(acq.iq) ** 2)))
        assert rms == pytest.approx(10 ** (db / 20), rel=0.03)
        assert acq.gt_positions.shape[0] == 0


def test_clutter_level_and_slow_variation():
    acq = simulate_acquisition(UlmSimConfig(seed=1, n_frames=30, bubbles_per_frame=0, clutter_db=20.0, noise_db=None))
    rms = float(np.sqrt(np.mean(np.abs(acq.iq) ** 2)))
    assert rms == pytest.approx(10.0, rel=0.2)
    a, b = acq.iq[0].ravel(), acq.iq[1].ravel()
    corr = abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert corr > 0.95  # tissue is slow: nearly the same from one frame to the next
    # ...and spatially correlated speckle (neighbouring pixels alike), unlike white noise.
    f = acq.iq[0]
    lat = abs(np.vdot(f[:, :-1], f[:, 1:])) / np.vdot(f, f).real
    assert lat > 0.3


def test_bad_configuration():
    with pytest.raises(InputError, match="bubbles per frame"):
        FlowSimulator(UlmSimConfig(bubbles_per_frame=-1))
    with pytest.raises(InputError, match="frames"):
        FlowSimulator(UlmSimConfig(n_frames=0))


def test_cli_streams_the_same_data_as_in_memory(tmp_path):
    from ultrasound_ai.cli import main

    out = tmp_path / "sim.h5"
    code = main(["ulm", "simulate", str(out), "--frames", "120", "--bubbles-per-frame", "20", "--seed", "9",
                 "--noise-db", "-25", "--clutter-db", "off", "--quiet"])
    assert code == 0
    got = read_acquisition(out)
    ref = simulate_acquisition(UlmSimConfig(n_frames=120, bubbles_per_frame=20, seed=9, noise_db=-25, clutter_db=None))
    np.testing.assert_array_equal(got.iq, ref.iq)
    np.testing.assert_array_equal(got.gt_positions, ref.gt_positions)
    assert got.attrs["sim_clutter_db"] == "off" and got.attrs["sim_noise_db"] == -25.0
    assert main(["ulm", "simulate", str(tmp_path / "bad.h5"), "--frames", "0", "--quiet"]) == 2
    assert not (tmp_path / "bad.h5").exists()


def test_step_is_the_per_frame_stepping_of_blocks():
    cfg = UlmSimConfig(seed=6, clutter_db=None, noise_db=None, **TINY)
    sim = FlowSimulator(cfg)
    states = [sim.step() for _ in range(cfg.n_frames)]
    assert [s.index for s in states] == list(range(cfg.n_frames))
    ref = simulate_acquisition(cfg).gt_positions
    np.testing.assert_array_equal(np.concatenate([s.gt for s in states]), ref)
    s = states[5]
    assert s.positions.shape == (s.ids.size, 2) and s.amplitudes.shape == s.ids.shape == s.in_fov.shape
    np.testing.assert_array_equal(s.gt[:, 3], np.sort(s.ids[s.in_fov]))


def test_tissue_clutter_is_slow_and_low_rank_so_svd_removes_it():
    from ultrasound_ai.ulm.clutter import svd_filter

    # Clutter alone at +20 dB (rms 10x the mean bubble peak): nearly all its energy lies in the first
    # few singular components of a block (nothing white in time), so the default cutoff (4) takes it
    # far below the bubble level (1).
    acq = simulate_acquisition(UlmSimConfig(seed=5, n_frames=200, bubbles_per_frame=0, clutter_db=20.0, noise_db=None))
    a = acq.iq.reshape(acq.n_frames, -1).astype(np.complex128)
    sv2 = np.sort(np.linalg.eigvalsh(a @ a.conj().T))[::-1]  # squared singular values, via the Gram matrix
    assert sv2[:4].sum() / sv2.sum() > 1 - 1e-4
    resid = svd_filter(acq.iq, 4)
    assert np.sqrt(np.mean(np.abs(resid) ** 2)) < 0.1
    assert np.sqrt(np.mean(np.abs(resid) ** 2, axis=(1, 2))).max() < 0.3
    # ...yet it decorrelates over a few hundred ms (not a frozen pattern).
    f0, f1 = acq.iq[0].ravel(), acq.iq[-1].ravel()
    assert abs(np.vdot(f0, f1)) / (np.linalg.norm(f0) * np.linalg.norm(f1)) < 0.9


def test_rs_after_default_svd_at_plus_20_db_is_close_to_no_clutter(small_acquisition, sim_config):
    import dataclasses

    from ultrasound_ai.ulm.metrics import evaluate_result
    from ultrasound_ai.ulm.pipeline import process_acquisition

    # Same bubbles and noise (independent random streams), with and without +20 dB tissue.
    clean = simulate_acquisition(dataclasses.replace(sim_config, clutter_db=None))
    np.testing.assert_array_equal(clean.gt_positions, small_acquisition.gt_positions)

    def raw_jaccard(acq, svd_cutoff):
        res = process_acquisition(acq, "rs", dict(svd_cutoff=svd_cutoff, min_track_length=5))
        return evaluate_result(res, acq.gt_positions, acq.wavelength_mm, acq.frame_rate_hz)["raw"]["jaccard"]

    j_clean = raw_jaccard(clean, 4)
    j_clutter = raw_jaccard(small_acquisition, 4)
    assert j_clean > 0.5
    assert abs(j_clutter - j_clean) < 0.1
    # Without the filter the tissue swamps the bubbles: the test above is not vacuous.
    assert raw_jaccard(small_acquisition, None) < 0.2
