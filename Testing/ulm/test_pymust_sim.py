"""pymust (SIMUS + delay-and-sum) frame formation for ULM: geometry, file contract, truth, levels, determinism.

Skipped when pymust is not installed. Small on purpose: one 3-frame PALA-grid file through the CLI,
the rest on tiny grids with one plane wave.
"""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("pymust")

from ultrasound_ai.cli import main  # noqa: E402
from ultrasound_ai.core.errors import Cancelled, InputError  # noqa: E402
from ultrasound_ai.io.ulm_files import acquisition_info, read_acquisition  # noqa: E402
from ultrasound_ai.ulm.pymust_sim import PYMUST_MODE, PymustProbe, simulate_pymust_acquisition, simulate_pymust_to_file  # noqa: E402
from ultrasound_ai.ulm.simulator import ULM_SIM_VERSION, UlmSimConfig, simulate_acquisition  # noqa: E402

LAM = 1540.0 / 15.625e6 * 1e3
# Tiny grids, one plane wave: a fraction of a second per frame.
TINY = dict(shape_zx=(20, 32), depth_start_mm=4.0)
ONE_WAVE = PymustProbe(tilts_deg=(0.0,), tissue_keyframe_every=2, tissue_scatterers_per_mm2=4.0)


@pytest.fixture(scope="module")
def cli_file(tmp_path_factory):
    """3 frames on the PALA grid (84 x 143, lambda pixels), few bubbles, no tissue, no noise: via the CLI."""
    path = tmp_path_factory.mktemp("pymust") / "pymust.h5"
    code = main(["ulm", "simulate", str(path), "--pymust", "--frames", "3", "--bubbles-per-frame", "6",
                 "--clutter-db", "off", "--noise-db", "off", "--seed", "3", "--quiet"])
    assert code == 0
    return path


def test_file_contract_and_recorded_parameters(cli_file):
    info = acquisition_info(cli_file)
    assert info.kind == "iq" and info.shape == (3, 84, 143) and info.dtype == np.complex64
    cfg = UlmSimConfig()
    assert info.pixel_size_mm == pytest.approx((LAM, LAM))
    assert info.origin_mm == pytest.approx(cfg.origin_mm)
    assert info.wavelength_mm == pytest.approx(LAM) and info.frame_rate_hz == 1000.0
    a = info.attrs
    assert a["ulm_sim_version"] == ULM_SIM_VERSION and a["sim_mode"] == PYMUST_MODE
    assert a["pymust_param"]["Nelements"] == 128 and a["pymust_param"]["pitch_m"] == pytest.approx(1e-4)
    assert a["pymust_param"]["fc_hz"] == pytest.approx(15.625e6)
    assert a["pymust_probe"]["tilts_deg"] == [-5.0, 0.0, 5.0]
    assert a["sim_seed"] == 3 and a["sim_clutter_db"] == "off"
    acq = read_acquisition(cli_file)
    assert np.all(np.isfinite(acq.iq.view(np.float32)))


def test_ground_truth_is_the_fast_simulators(cli_file):
    """Same config -> same bubbles, ids and positions as the analytic-PSF simulator."""
    acq = read_acquisition(cli_file)
    fast = simulate_acquisition(UlmSimConfig(n_frames=3, bubbles_per_frame=6, clutter_db=None, noise_db=None, seed=3))
    assert acq.gt_positions.shape[1] == 4 and acq.gt_positions.shape[0] > 0
    np.testing.assert_array_equal(acq.gt_positions, fast.gt_positions)


def _subpixel_peak(env, iz, ix):
    """Brightest pixel within +-2 px of (iz, ix), refined by a 3-point parabola per axis."""
    z0, x0 = iz - 2, ix - 2
    w = env[z0:iz + 3, x0:ix + 3]
    kz, kx = np.unravel_index(int(np.argmax(w)), w.shape)
    cz, cx = z0 + kz, x0 + kx

    def par(a, b, c):
        d = a - 2 * b + c
        return 0.0 if d == 0 else 0.5 * (a - c) / d

    return cz + par(*env[cz - 1:cz + 2, cx]), cx + par(*env[cz, cx - 1:cx + 2])


def test_envelope_peaks_on_isolated_bubbles(cli_file):
    """Geometry and [T, Z, X] orientation: each isolated bubble's envelope peak lies within lambda/2
    of its true position (a transposed, flipped or shifted grid would fail)."""
    acq = read_acquisition(cli_file)
    (z0, x0), (dz, dx) = acq.origin_mm, acq.pixel_size_mm
    T, Z, X = acq.shape
    checked = 0
    for f in range(T):
        env = np.abs(acq.iq[f]).astype(np.float64)
        g = acq.gt_positions[acq.gt_positions[:, 0] == f]
        for k, (_, zb, xb, _) in enumerate(g):
            others = np.delete(g[:, 1:3], k, axis=0)
            if others.size and np.min(np.hypot(others[:, 0] - zb, others[:, 1] - xb)) < 6 * LAM:
                continue
            iz, ix = int(round((zb - z0) / dz)), int(round((xb - x0) / dx))
            if not (4 <= iz < Z - 4 and 4 <= ix < X - 4):
                continue
            pz, px = _subpixel_peak(env, iz, ix)
            err = np.hypot(z0 + pz * dz - zb, x0 + px * dx - xb)
            assert err < LAM / 2, f"frame {f}: bubble at ({zb:.3f}, {xb:.3f}) mm, peak off by {err / LAM:.2f} lambda"
            # The bubble is a real peak, far above the background.
            assert env[int(round(pz)), int(round(px))] > 10 * np.median(env)
            checked += 1
    assert checked >= 3


def test_deterministic_for_a_seed_with_tissue_and_noise():
    cfg = UlmSimConfig(n_frames=3, bubbles_per_frame=3, clutter_db=10.0, noise_db=-20.0, seed=11, **TINY)
    a = simulate_pymust_acquisition(cfg, probe=ONE_WAVE)
    b = simulate_pymust_acquisition(cfg, probe=ONE_WAVE)
    np.testing.assert_array_equal(a.iq, b.iq)
    np.testing.assert_array_equal(a.gt_positions, b.gt_positions)
    assert a.attrs["pymust_n_tissue_scatterers"] > 0
    c = simulate_pymust_acquisition(dataclasses.replace(cfg, seed=12, n_frames=1), probe=ONE_WAVE)
    assert not np.array_equal(a.iq[:1], c.iq)
    # Tissue at +10 dB dominates: rms over the frame about 10^(10/20) (bubbles and noise add a little).
    rms = np.sqrt(np.mean(np.abs(a.iq) ** 2, axis=(1, 2)))
    assert np.all((0.6 * 3.16 < rms) & (rms < 1.6 * 3.16))
    # Slow tissue motion: consecutive frames stay highly correlated.
    corr = np.abs(np.vdot(a.iq[0], a.iq[1])) / (np.linalg.norm(a.iq[0]) * np.linalg.norm(a.iq[1]))
    assert corr > 0.9


def test_noise_level_matches_noise_db():
    cfg = UlmSimConfig(n_frames=2, bubbles_per_frame=0, clutter_db=None, noise_db=-20.0, seed=2, **TINY)
    acq = simulate_pymust_acquisition(cfg, probe=ONE_WAVE)
    rms = np.sqrt(np.mean(np.abs(acq.iq) ** 2))
    assert rms == pytest.approx(0.1, rel=0.2)
    assert not np.array_equal(acq.iq[0], acq.iq[1])  # fresh noise each frame


def test_cancel_leaves_no_file(tmp_path):
    def progress(done, total):
        raise Cancelled("stop")

    out = tmp_path / "c.h5"
    cfg = UlmSimConfig(n_frames=2, bubbles_per_frame=2, clutter_db=None, noise_db=None, seed=1, **TINY)
    with pytest.raises(Cancelled):
        simulate_pymust_to_file(out, cfg, progress=progress, probe=ONE_WAVE)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(sampling_factor=2.0), dict(tilts_deg=()), dict(tilts_deg=(60.0,)),
                                 dict(kerf_mm=0.2), dict(n_elements=1), dict(workers=0)])
def test_bad_probe_parameters_raise_input_error(bad):
    with pytest.raises(InputError, match="pymust probe"):
        PymustProbe(**bad).validate()


def test_bad_config_raises_input_error():
    with pytest.raises(InputError):
        simulate_pymust_acquisition(UlmSimConfig(n_frames=0, **TINY), probe=ONE_WAVE)
