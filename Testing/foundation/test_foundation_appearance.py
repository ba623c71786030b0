"""Foundation model: the simulator's scanner settings (what the classifier and its encoder are trained
across) behave as a scanner's would, and the frozen image sets drawn before they existed are unchanged."""

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation import classifier_study as cs
from ultrasound_ai.foundation.bmode_sim import (
    SCANNER_VARIATION,
    check_appearance,
    draw_appearance,
    simulate_batch,
    simulate_bmode,
    speckle_field,
)


def _summary(images):
    return [round(float(s.image.astype(np.float64).mean()), 4) for s in images], [int(s.mask.sum()) for s in images]


def test_sets_drawn_before_the_new_settings_are_unchanged():
    # The label-efficiency and segmentation sets (nominal settings) and the classifier's held-out set
    # (TEST_APPEARANCE) must not move when settings are added: numbers from the simulator before them.
    assert _summary(simulate_batch(5, range(4), 64)) == ([0.6703, 0.655, 0.6504, 0.693], [296, 0, 584, 0])
    assert _summary(simulate_batch(5, range(4), 64, appearance=cs.TEST_APPEARANCE)) == (
        [0.7533, 0.7412, 0.7168, 0.7776], [296, 0, 584, 0])


def test_classifier_and_its_encoder_train_across_a_broad_scanner_band():
    # The defect: the classifier was trained at 40-50 dB and PSF 0.2-0.3 / 0.4-0.6 mm with the nominal gain,
    # TGC, speckle and lesions, so any other scanner setting was new to it.
    app = check_appearance(cs.TRAIN_APPEARANCE)
    for key, (lo, hi) in {"dynamic_range_db": (35, 75), "psf_axial_mm": (0.15, 0.45),
                          "psf_lateral_mm": (0.3, 0.9), "gain_db": (-6, 3), "tgc_slope_db_cm": (0, 2),
                          "tgc_ripple_db": (0, 3), "scatterer_density_mm2": (1, 20), "noise_db": (-65, -40),
                          "focus_depth_mm": (10, 30), "lesion_contrast": (0.8, 1.2), "lesion_scale": (0.8, 1.2)}.items():
        assert key in app, f"training does not vary {key}"
        assert app[key][0] <= lo and app[key][1] >= hi, f"{key} varies only over {app[key]}"
    draws = [draw_appearance(1, i, app) for i in range(300)]
    density = np.array([d["scatterer_density_mm2"] for d in draws])
    assert (density < 3).mean() > 0.15 and (density > 15).mean() > 0.15  # sparse and developed speckle both seen
    cfg = cs.encoder_config(cs.settings())
    # The encoder's images span the same band (built before the BI-RADS masses: default lesions and organs).
    assert cfg["data"]["appearance"] == SCANNER_VARIATION and cfg["name"] == cs.CLASSIFIER_STUDY["encoder"]["name"]
    assert {k: v for k, v in cs.TRAIN_APPEARANCE.items() if k in SCANNER_VARIATION} == SCANNER_VARIATION
    assert cs.cell_config(cs.settings(), "pretrained", 0.2, 0)["model"]["pretrained"] == cs.encoder_source(cs.settings())
    assert cs.cell_config(cs.settings(), "scratch", 0.2, 0)["data"]["appearance"] == cs.TRAIN_APPEARANCE


def _snr(env):
    return float(env.mean() / env.std())


def test_speckle_is_rayleigh_when_dense_and_not_when_sparse():
    # Fully developed speckle: envelope mean / std = sqrt(pi / (4 - pi)) = 1.913 (Rayleigh). One scatterer
    # or so per resolution cell gives K-distributed, spikier speckle (lower SNR).
    rng = np.random.default_rng(0)
    echo = np.ones((256, 256))
    dense = np.abs(speckle_field(rng, echo, (0.3125, 0.3125), (0.25, 0.5)))
    developed = np.abs(speckle_field(rng, echo, (0.3125, 0.3125), (0.25, 0.5), scatterer_density_mm2=200.0))
    sparse = np.abs(speckle_field(rng, echo, (0.3125, 0.3125), (0.25, 0.5), scatterer_density_mm2=0.7))
    assert _snr(dense) == pytest.approx(1.913, abs=0.06)
    assert _snr(developed) == pytest.approx(1.913, abs=0.08)
    assert _snr(sparse) < 1.6


def _lateral_corr_length(env_rows):
    x = env_rows - env_rows.mean(axis=1, keepdims=True)
    ac = np.fft.ifft(np.abs(np.fft.fft(x, axis=1)) ** 2, axis=1).real.mean(0)
    ac = ac / ac[0]
    return int(np.argmax(ac < 0.5))


def test_focus_narrows_the_lateral_speckle_at_its_depth():
    rng = np.random.default_rng(1)
    echo = np.ones((128, 256))
    env = np.abs(speckle_field(rng, echo, (0.3125, 0.3125), (0.2, 0.3), focus_depth_mm=8.0))
    near = _lateral_corr_length(env[16:36])  # rows around 8 mm
    far = _lateral_corr_length(env[100:128])  # 31-40 mm: sigma about 3.5x the focal one
    assert far >= 2 * near


def test_gain_tgc_noise_and_lesion_settings_act_as_named():
    base = dict(label=1, organ="liver")
    nominal = simulate_bmode(4, 128, **base)
    assert simulate_bmode(4, 128, gain_db=-8.0, **base).image.mean() < nominal.image.mean() - 0.05
    sloped = simulate_bmode(4, 128, tgc_slope_db_cm=3.0, **base).image
    flat = simulate_bmode(4, 128, tgc_slope_db_cm=-1.0, **base).image
    assert (flat[96:].mean() - sloped[96:].mean()) > (flat[:32].mean() - sloped[:32].mean()) + 0.05
    noisy = simulate_bmode(4, 128, noise_db=-20.0, dynamic_range_db=60.0, **base).image
    quiet = simulate_bmode(4, 128, noise_db=-70.0, dynamic_range_db=60.0, **base).image
    m = nominal.mask > 0
    assert noisy[m].mean() > quiet[m].mean() + 0.05  # noise fills the dark lesion
    faint = simulate_bmode(4, 128, lesion_contrast=0.5, **base)
    contrast = [s.image[s.mask == 0].mean() - s.image[s.mask > 0].mean() for s in (nominal, faint)]
    assert contrast[1] < contrast[0] - 0.05
    assert simulate_bmode(4, 128, lesion_scale=1.4, **base).mask.sum() > 1.5 * nominal.mask.sum()
    # Settings come from their own stream: the lesion and class of image i do not change with them.
    a = simulate_batch(2, range(3), 64)
    b = simulate_batch(2, range(3), 64, appearance={"gain_db": [-3.0, 3.0], "noise_db": [-60.0, -40.0]})
    assert [s.label for s in a] == [s.label for s in b] and all(np.array_equal(x.mask, y.mask) for x, y in zip(a, b))


def test_bad_appearance_ranges_name_the_key():
    with pytest.raises(InputError, match="appearance.psf_axial_mm"):
        check_appearance({"psf_axial_mm": [0.0, 0.2]})
    with pytest.raises(InputError, match="appearance.gain_db"):
        check_appearance({"gain_db": [3.0, -3.0]})
    with pytest.raises(InputError, match="unknown key"):
        check_appearance({"brightness": [0, 1]})
    assert check_appearance({"gain_db": [-3, 0]}) == {"gain_db": [-3.0, 0.0]}
    assert check_appearance(SCANNER_VARIATION) == SCANNER_VARIATION


def test_study_summary_means_per_arm_and_fraction():
    runs = [{"init": i, "fraction": f, "seed": k, "accuracy": a, "macro_f1": a - 0.1, "indep_accuracy": a / 2,
             "indep_macro_f1": a / 4} for i, f, k, a in (("pretrained", 0.2, 0, 0.6), ("pretrained", 0.2, 1, 0.8),
                                                        ("scratch", 0.2, 0, 0.4), ("scratch", 1.0, 0, 0.9))]
    out = cs.study_summary({"runs": runs})
    assert out["pretrained_f0.2"]["seeds"] == [0, 1]
    assert out["pretrained_f0.2"]["heldout_macro_f1_mean"] == pytest.approx(0.6)
    assert out["pretrained_f0.2"]["indep_accuracy_mean"] == pytest.approx(0.35)
    assert out["scratch_f1"]["heldout_accuracy_mean"] == pytest.approx(0.9) and set(out) == {
        "pretrained_f0.2", "scratch_f0.2", "scratch_f1"}


def test_paired_difference_matches_seed_by_seed_and_its_standard_error():
    # Pairs are matched by seed (same labels), unmatched cells are left out; SE = sample std / sqrt(n).
    runs = [{"init": i, "fraction": 0.2, "seed": k, "macro_f1": v, "indep_macro_f1": v / 2}
            for i, k, v in (("pretrained", 0, 0.5), ("pretrained", 1, 0.4), ("pretrained", 2, 0.6), ("pretrained", 5, 0.9),
                            ("scratch", 0, 0.3), ("scratch", 1, 0.45), ("scratch", 2, 0.4), ("scratch", 3, 0.1))]
    p = cs.paired_difference({"runs": runs}, 0.2)
    d = np.array([0.2, -0.05, 0.2])
    assert p["seeds"] == [0, 1, 2] and p["ahead"] == 2 and p["n"] == 3
    assert p["mean"] == pytest.approx(d.mean()) and p["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert cs.paired_difference({"runs": runs}, 0.2, "indep_macro_f1")["mean"] == pytest.approx(d.mean() / 2)
    assert cs.paired_difference({"runs": runs}, 1.0) is None
    for r in runs:
        r.update(accuracy=r["macro_f1"], indep_accuracy=0.3, val_accuracy=0.4)
    text = cs.format_table({"settings": cs.settings({"fractions": [0.2]}), "runs": runs, "test_counts": [1, 1, 1]})
    assert "| 20 % | 3 | not run | 0.400 / 0.100 / 0.050 |" in text
    assert f"20 % held-out {d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(3):.3f}, pre-trained ahead on 2 of 3 seeds" in text


def test_logistic_probe_separates_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    centres = rng.normal(0, 1, (3, 16)) * 3
    x = centres[y] + rng.normal(0, 1, (300, 16))
    predict = cs.fit_logistic(x[:200], y[:200], 3, c=0.01)  # strong penalty: converges in a few iterations
    assert (predict(x[200:]) == y[200:]).mean() > 0.95
    noise = rng.normal(0, 1, (300, 16))
    assert (cs.fit_logistic(noise[:200], y[:200], 3)(noise[200:]) == y[200:]).mean() < 0.5
