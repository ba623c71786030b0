"""LC² similarity, the cascade's guard and the LC² refinement (on an independent-family case)."""

import types
from pathlib import Path

import numpy as np
import pytest

from ultrasound_ai.registration.frozen_sets import initial_with_sre
from ultrasound_ai.registration.indep_phantom import simulate_indep_case
from ultrasound_ai.registration.inference import guarded_register
from ultrasound_ai.registration.metrics import sre
from ultrasound_ai.registration.similarity import LC2


@pytest.fixture(scope="module")
def case():
    return simulate_indep_case(21, coarse=1.6)


class _FixedStage:
    """A stage that proposes a given transform whatever its input (a network gone wrong, or right)."""

    def __init__(self, proposal):
        self.proposal = np.asarray(proposal, dtype=np.float64)
        self.path = Path("fake_stage.pt")

    def step(self, data, T):
        return self.proposal.copy()


def test_lc2_peaks_near_the_truth(case):
    m = LC2(case.fixed, case.fixed_label, case.moving, spacing_mm=2.0, patch=5, blur_mm=1.0)
    at_truth = m(case.truth_fixed_to_moving)
    rng = np.random.default_rng(0)
    off = [m(initial_with_sre(case.truth_fixed_to_moving, case.surface_fixed, 8.0, rng)) for _ in range(4)]
    assert 0 < max(off) < at_truth <= 1
    # A transform that moves the gland out of the TRUS fan scores 0 (no overlap, no evidence).
    far = case.truth_fixed_to_moving.copy()
    far[:3, 3] += [0, 0, 500]
    assert m(far) == 0.0


def test_guard_keeps_the_start_when_a_stage_makes_it_worse(case):
    truth = case.truth_fixed_to_moving
    bad = truth.copy()
    bad[:3, 3] += [0.0, -9.0, 0.0]  # the anterior shift the shipped cascade made on independent cases
    cascade = types.SimpleNamespace(stages=[_FixedStage(bad)])
    T, report = guarded_register(case, cascade, initial=truth)
    assert np.allclose(T, truth)
    entry = report["stages"][0]
    assert entry["kept"] is False and report["kept"] == "start"
    assert entry["lc2_proposal"] < entry["lc2_start"] == report["start_lc2"]
    # Without the guard the same stage's proposal is taken; so it is with a margin that accepts any LC2.
    T_raw, raw = guarded_register(case, cascade, initial=truth, guard=False)
    assert np.allclose(T_raw, bad) and raw["kept"] == "stage 1"
    T_any, _ = guarded_register(case, cascade, initial=truth, margin=-1.0)
    assert np.allclose(T_any, bad)


def test_guard_keeps_a_stage_that_improves(case):
    truth = case.truth_fixed_to_moving
    T0 = initial_with_sre(truth, case.surface_fixed, 8.0, np.random.default_rng(1))
    cascade = types.SimpleNamespace(stages=[_FixedStage(truth)])
    T, report = guarded_register(case, cascade, initial=T0)
    assert np.allclose(T, truth) and report["kept"] == "stage 1"
    assert report["stages"][0]["lc2_proposal"] > report["stages"][0]["lc2_start"]


def test_refinement_recovers_from_a_wrong_start(case):
    truth = case.truth_fixed_to_moving
    T0 = initial_with_sre(truth, case.surface_fixed, 7.0, np.random.default_rng(2))
    T, report = guarded_register(case, None, initial=T0, refine=True)
    assert report["kept"] == "refinement"
    # Cuts the error by 40 % or more (coarse test voxels; the elastic push moves the LC2 optimum off the rigid truth).
    assert sre(T, truth, case.surface_fixed) < 0.6 * sre(T0, truth, case.surface_fixed)


class _TwoBasins:
    """An LC²-like score of the translation alone: a weak narrow peak at the start (a side lobe) and the
    true, stronger peak 14 mm away. Rotations leave it unchanged (the centre is the origin)."""

    centre = np.zeros(3)

    def __init__(self, peak):
        self.peak = np.asarray(peak, dtype=np.float64)

    def __call__(self, T):
        t = np.asarray(T)[:3, 3]
        return float(0.4 * np.exp(-np.sum(t ** 2) / 8.0) + np.exp(-np.sum((t - self.peak) ** 2) / 32.0))


def test_capture_search_leaves_a_side_lobe_the_local_refinement_stays_in():
    from ultrasound_ai.registration.similarity import capture_search, refine_lc2

    metric = _TwoBasins([10.0, -8.0, 6.0])
    T_local, _, _ = refine_lc2(metric, np.eye(4), step_mm=4.0, min_step_mm=1.0, max_evals=150)
    assert np.linalg.norm(T_local[:3, 3]) < 2.0  # the defect: a compass search keeps to its own basin
    T, value, evals, starts = capture_search(metric, metric, np.eye(4), reach_mm=12.0, grid_mm=6.0, keep=3)
    assert np.linalg.norm(T[:3, 3] - metric.peak) < 1.0 and value > 0.99
    assert starts[0][0] == [0.0, 0.0, 0.0] and len(starts) == 3  # the start itself is always refined too
    assert evals >= 125


def test_refinement_beyond_its_reach_is_not_kept(case, monkeypatch):
    """A refinement that jumps to a distant LC² optimum (seen on training-family cases: 9-17 mm from the
    truth) is refused when it moves the gland farther than refine_reach_mm, whatever its LC² gain."""
    import ultrasound_ai.registration.similarity as similarity
    from ultrasound_ai.registration.inference import gland_motion_mm

    truth = case.truth_fixed_to_moving
    jump = truth.copy()
    jump[:3, 3] += [12.0, 0.0, -9.0]  # 15 mm
    monkeypatch.setattr(similarity, "refine_lc2", lambda metric, T0, **kw: (jump.copy(), 1.0, 1))
    assert abs(gland_motion_mm(case, truth, jump) - 15.0) < 1e-6
    T, report = guarded_register(case, None, initial=truth, refine=True, margin=-1.0, refine_reach_mm=8.0)
    entry = report["stages"][-1]
    assert np.allclose(T, truth) and not entry["kept"] and "reach" in entry["reason"]
    assert abs(entry["moved_mm"] - 15.0) < 1e-6
    T_free, _ = guarded_register(case, None, initial=truth, refine=True, margin=-1.0, refine_reach_mm=None)
    assert np.allclose(T_free, jump)


def test_refinement_within_lc2_localisation_error_keeps_the_start(case, monkeypatch):
    """From a well-aligned start, LC²'s optimum lies a few mm off the rigid truth (probe push, elastic
    deformation) with a gain above the margin; a refinement that moves the gland less than
    REFINE_MIN_MOVE_MM cannot be told from that bias, so the default keeps the start."""
    import ultrasound_ai.registration.similarity as similarity
    from ultrasound_ai.registration.inference import REFINE_MIN_MOVE_MM, gland_motion_mm

    truth = case.truth_fixed_to_moving
    drift = truth.copy()
    drift[:3, 3] += [1.2, -1.6, 0.0]  # 2 mm: the size of the drift seen from the truth
    monkeypatch.setattr(similarity, "refine_lc2", lambda metric, T0, **kw: (drift.copy(), 1.0, 1))
    assert abs(gland_motion_mm(case, truth, drift) - 2.0) < 1e-6 < REFINE_MIN_MOVE_MM - 2.0
    T, report = guarded_register(case, None, initial=truth, refine=True, margin=-1.0)
    entry = report["stages"][-1]
    assert np.allclose(T, truth) and not entry["kept"] and entry["within_noise"]
    assert report["kept"] == "start" and "localisation" in entry["reason"]
    T_free, report = guarded_register(case, None, initial=truth, refine=True, margin=-1.0, refine_min_move_mm=0.0)
    assert np.allclose(T_free, drift) and report["kept"] == "refinement"


def _stage_then_refine(case, monkeypatch, ends_at):
    """A 14 mm start, a stage proposing a point 12 mm from it (the guard keeps it: margin -1), and a refinement
    (patched) that ends where ends_at(start) says; the estimate's own refinement moves ~11 mm, beyond a 5 mm reach."""
    import ultrasound_ai.registration.similarity as similarity

    truth = case.truth_fixed_to_moving
    T0, P = truth.copy(), truth.copy()
    T0[:3, 3] += [0.0, 0.0, 14.0]
    P[:3, 3] += [0.0, -9.0, 6.0]
    made = []

    def fake_refine(metric, T, **kw):
        if not any(np.allclose(T, e) for e in made):  # the fine search starts at the coarse one's end: stays
            made.append(ends_at(np.asarray(T)))
            T = made[-1]
        return T.copy(), 1.0, 1

    monkeypatch.setattr(similarity, "refine_lc2", fake_refine)
    cascade = types.SimpleNamespace(stages=[_FixedStage(P)])
    return truth, P, guarded_register(case, cascade, initial=T0, refine=True, margin=-1.0, refine_reach_mm=5.0)


def test_refinement_beyond_its_reach_is_kept_when_two_starts_reach_it(case, monkeypatch):
    """From 16 mm the networks can stop ~10 mm short, and the refinement must then move beyond the reach; when
    the refinements from the user's start and from the estimate (starts 12 mm apart) end at the same optimum,
    it is kept (the reach refuses jumps to LC² peaks reached from one start only)."""
    peak = case.truth_fixed_to_moving.copy()
    peak[:3, 3] += [0.5, 0.0, 0.0]
    truth, P, (T, report) = _stage_then_refine(case, monkeypatch, lambda T: peak.copy())
    entry = report["stages"][-1]
    assert np.allclose(T, peak) and report["kept"] == "refinement" and entry["kept"]
    multi = entry["multistart"]
    assert multi["agreeing"] == [["estimate", "start"]] and multi["chosen"] in ("estimate", "start")
    assert [e["from"] for e in multi["ends"]] == ["estimate", "start"]  # stage 1 (no guard) = the estimate
    assert entry["moved_mm"] > 5.0 and "reached within" in entry["reason"]
    # One start only (the previous rule): refused for its reach.
    T1, report1 = guarded_register(case, types.SimpleNamespace(stages=[_FixedStage(P)]),
                                   initial=np.asarray(multi["ends"][1]["start"]), refine=True, margin=-1.0,
                                   refine_reach_mm=5.0, multistart=False)
    assert np.allclose(T1, P) and report1["stages"][-1]["beyond_reach"]
    # Agreement exempts from the reach only up to agree_reach_mm (the largest initial error specified, 16 mm).
    T2, report2 = guarded_register(case, types.SimpleNamespace(stages=[_FixedStage(P)]),
                                   initial=np.asarray(multi["ends"][1]["start"]), refine=True, margin=-1.0,
                                   refine_reach_mm=5.0, agree_reach_mm=8.0)
    assert np.allclose(T2, P) and report2["stages"][-1]["multistart"]["chosen"] is None


def test_refinement_to_peaks_reached_from_one_start_each_stays_within_reach(case, monkeypatch):
    def away(T):  # each start runs 15 mm further along its own offset: no two ends agree
        end = T.copy()
        off = T[:3, 3] - case.truth_fixed_to_moving[:3, 3]
        end[:3, 3] += 15.0 * off / np.linalg.norm(off)
        return end

    truth, P, (T, report) = _stage_then_refine(case, monkeypatch, away)
    entry = report["stages"][-1]
    assert np.allclose(T, P) and report["kept"] == "stage 1" and entry["beyond_reach"]
    assert entry["multistart"]["agreeing"] == [] and entry["multistart"]["chosen"] is None
