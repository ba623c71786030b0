"""PALA metrics on hand-made cases: greedy pairing, lambda/2 match, lambda/4 true positive, rendering SSIM/RMSE."""

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.ulm_files import UlmResult
from ultrasound_ai.ulm.metrics import (
    evaluate_result,
    greedy_pairs,
    localization_metrics,
    rendering_metrics,
    vessel_metrics,
)
from ultrasound_ai.ulm.rendering import RenderGrid, render_ground_truth

LAM = 0.1  # mm


def test_hand_counted_case():
    truth = np.array([[0, 1.0, 1.0], [0, 2.0, 2.0], [0, 3.0, 3.0], [1, 1.0, 1.0]])
    est = np.array([
        [0, 1.0 + 0.1 * LAM, 1.0],      # TP, error 0.1 lambda
        [0, 2.0, 2.0 + 0.3 * LAM],      # matched in (lambda/4, lambda/2]: 1 FP + 1 FN
        [0, 5.0, 5.0],                  # unmatched: FP
        [1, 1.0, 1.0 - 0.2 * LAM],      # TP, error 0.2 lambda (frame 1)
        [2, 1.0, 1.0],                  # a frame without truth: FP
    ])
    m = localization_metrics(est, truth, LAM)
    # truth (0, 3, 3) is unmatched: FN.  TP = 2, FP = 1 + 1 + 1 = 3, FN = 1 + 1 = 2.
    assert (m["tp"], m["fp"], m["fn"], m["matched_far"]) == (2, 3, 2, 1)
    assert m["jaccard"] == pytest.approx(2 / 7)
    assert m["precision"] == pytest.approx(2 / 5) and m["recall"] == pytest.approx(2 / 4)
    assert m["loc_error_lambda"] == pytest.approx(0.15) and m["loc_error_mm"] == pytest.approx(0.015)


def test_pairs_never_cross_frames():
    m = localization_metrics(np.array([[1, 0.0, 0.0]]), np.array([[0, 0.0, 0.0]]), LAM)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1)


def test_greedy_order_not_optimal_assignment():
    # e1 is closest to t2, so greedy pairs them first; e2 is then beyond lambda/2 from t1.
    # (An optimal assignment would give two TPs: e1-t1 0.21, e2-t2 0.22.)
    truth = np.array([[0, 0.0, 0.0], [0, 0.0, 0.40 * LAM]])
    est = np.array([[0, 0.0, 0.21 * LAM], [0, 0.0, 0.62 * LAM]])
    i, j, d = greedy_pairs(est, truth, LAM / 2)
    assert i.tolist() == [0] and j.tolist() == [1] and d[0] == pytest.approx(0.19 * LAM)
    m = localization_metrics(est, truth, LAM)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)


def test_boundaries_are_inclusive():
    truth = np.array([[0, 0.0, 0.0], [0, 10.0, 0.0]])
    est = np.array([[0, 0.0, 0.25 * LAM], [0, 10.0, 0.5 * LAM]])
    m = localization_metrics(est, truth, LAM)
    assert (m["tp"], m["matched_far"], m["fp"], m["fn"]) == (1, 1, 1, 1)


def test_empty_and_bad_inputs():
    m = localization_metrics(np.zeros((0, 3)), np.array([[0, 0.0, 0.0]]), LAM)
    assert (m["tp"], m["fn"], m["jaccard"]) == (0, 1, 0.0) and np.isnan(m["loc_error_lambda"])
    with pytest.raises(InputError, match="positions"):
        localization_metrics(np.zeros((3, 2)), np.zeros((1, 3)), LAM)
    with pytest.raises(InputError, match="wavelength"):
        localization_metrics(np.zeros((0, 3)), np.zeros((0, 3)), 0.0)


def test_rendering_metrics():
    rng = np.random.default_rng(0)
    img = rng.random((20, 30))
    same = rendering_metrics(img * 5, img)  # max normalisation makes the scale irrelevant
    assert same["ssim"] == pytest.approx(1.0) and same["rmse"] == pytest.approx(0.0, abs=1e-12)
    other = rendering_metrics(rng.random((20, 30)), img)
    assert other["ssim"] < 0.5 and other["rmse"] > 0.2
    with pytest.raises(InputError, match="same shape"):
        rendering_metrics(img, img[:10])


def _vessel(shape=(200, 300), gap=None, shift=0):
    """A hand-drawn rendering: a curved vessel 3 px wide (density 4) and a straight one (density 2);
    `gap` = (x0, x1) removes the curved vessel between those columns."""
    img = np.zeros(shape)
    x = np.arange(20, 280)
    z = (100 + 50 * np.sin(x / 40.0)).astype(int) + shift
    for dz in (-1, 0, 1):
        img[z + dz, x] = 4.0
    img[30:33, 40:260] = 2.0
    if gap is not None:
        img[:, gap[0]:gap[1]][img[:, gap[0]:gap[1]] == 4.0] = 0.0
    return img


def test_vessel_metrics_see_a_gap_that_ssim_does_not():
    truth = _vessel()
    full = _vessel(shift=1)  # every vessel found, 1 px (lambda/10) off
    gapped = _vessel(shift=1, gap=(100, 165))  # a quarter of the curved vessel missing
    tol = 2.5  # lambda/4 at lambda/10 pixels
    s_full, s_gap = rendering_metrics(full, truth)["ssim"], rendering_metrics(gapped, truth)["ssim"]
    s_empty = rendering_metrics(np.zeros_like(truth), truth)["ssim"]
    assert abs(s_full - s_gap) < 0.03 and s_empty > 0.9  # SSIM barely moves, and rates an empty image high
    v_full, v_gap = vessel_metrics(full, truth, tol), vessel_metrics(gapped, truth, tol)
    v_empty = vessel_metrics(np.zeros_like(truth), truth, tol)
    assert v_full["vessel_dice"] == pytest.approx(1.0) and v_full["vessel_precision"] == 1.0
    # 65 of the 260 columns of the curved vessel (3/4 of all vessel pixels) are gone: recall 1 - 195/1440.
    n_curved, n_straight = 3 * 260, 3 * 220
    assert v_gap["vessel_recall"] == pytest.approx(1 - 3 * 65 / (n_curved + n_straight), abs=0.01)
    assert v_gap["vessel_dice"] < v_full["vessel_dice"] - 0.06
    assert v_gap["ssim_vessel"] < v_full["ssim_vessel"] - 0.05
    assert v_empty["vessel_dice"] == 0.0 and v_empty["ssim_vessel"] < 0.2
    # A spurious vessel lowers the precision, not the recall.
    spurious = full.copy()
    spurious[170:173, 20:120] = 1.0
    v_sp = vessel_metrics(spurious, truth, tol)
    assert v_sp["vessel_recall"] == 1.0 and v_sp["vessel_precision"] < 0.95
    with pytest.raises(InputError, match="empty"):
        vessel_metrics(full, np.zeros_like(truth), tol)


def test_evaluate_result_against_its_own_truth():
    gt = np.array([[f, 0.5 + 0.02 * f, 0.3, 0] for f in range(30)] + [[f, 0.2, 0.1 + 0.03 * f, 1] for f in range(30)])
    grid = RenderGrid(origin_mm=(0.0, 0.0), pixel_size_mm=(0.01, 0.01), shape=(130, 130))
    density = render_ground_truth(gt, grid, 1000.0)["density"]
    loc = np.column_stack([gt[:, :3], np.ones(len(gt)), gt[:, 3]])
    loc[:5, 4] = -1  # a few untracked rows: counted in raw, not in tracked
    res = UlmResult(localizations=loc, density=density, pixel_size_mm=grid.pixel_size_mm, origin_mm=grid.origin_mm)
    out = evaluate_result(res, gt, LAM, 1000.0)
    assert out["raw"]["jaccard"] == 1.0 and out["raw"]["loc_error_lambda"] == 0.0
    assert out["tracked"]["tp"] == 55 and out["tracked"]["fn"] == 5 and out["jaccard"] == pytest.approx(55 / 60)
    assert out["ssim"] == pytest.approx(1.0) and out["rmse"] == pytest.approx(0.0)
    assert out["vessel_dice"] == pytest.approx(1.0) and out["ssim_vessel"] == pytest.approx(1.0)
