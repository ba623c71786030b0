"""The registration benchmark's --merge joins runs split with --skip/--cases into the one set's rows."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "bench_registration", Path(__file__).parents[2] / "bench" / "bench_registration.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _run(cases, values, ck=("s1.pt", "s2.pt")):
    return {"checkpoints": list(ck), "tag": "t", "sets": {"registration-indep-v1": {"0": {
        "initial": [0.0] * len(cases), "cases": cases, "+ refinement": values, "MI": [],
        "seconds": {"+ refinement": [1.0] * len(cases)}}}}}


def test_merge_concatenates_split_runs_in_order():
    ck, merged = bench.merge_results([_run(["a", "b"], [0.1, 2.5]), _run(["c"], [0.3])])
    out = merged["registration-indep-v1"]["0"]
    assert ck == ["s1.pt", "s2.pt"]
    assert out["cases"] == ["a", "b", "c"] and out["+ refinement"] == [0.1, 2.5, 0.3]
    assert out["seconds"]["+ refinement"] == [1.0, 1.0, 1.0] and out["MI"] == []
    # one case of three above 2 mm from the truth
    assert bench._cell(out["+ refinement"], out["initial"], 0.0).endswith("; 33 %")


def test_merge_refuses_runs_of_different_models():
    with pytest.raises(SystemExit, match="different checkpoints"):
        bench.merge_results([_run(["a"], [0.1]), _run(["b"], [0.2], ck=("other.pt", "s2.pt"))])


def test_section_reports_the_refinement_without_its_reach():
    run = _run(["a", "b"], [0.0, 16.0])
    out = run["sets"]["registration-indep-v1"]["0"]
    out["initial"] = [16.0, 16.0]
    out["refinement"] = [{"kept": True, "beyond_reach": False, "moved_mm": 3.0, "proposal_sre_mm": 0.0, "lc2_gain": 0.2},
                         {"kept": False, "beyond_reach": True, "moved_mm": 15.2, "proposal_sre_mm": 2.0, "lc2_gain": 0.3}]
    lines = bench._reach_lines({"16": out})
    assert "1 of 2 refinements refused" in lines[-1] and "15.2" in lines[-1]
    assert lines[-1].endswith("without the reach: 1.00 ± 1.00 (1.00); 0 %")


def test_section_reports_the_refinement_without_its_dead_zone():
    run = _run(["a", "b"], [0.0, 0.0])
    out = run["sets"]["registration-indep-v1"]["0"]
    out["refinement"] = [{"kept": False, "beyond_reach": False, "within_noise": True, "moved_mm": 2.6,
                          "proposal_sre_mm": 2.6, "lc2_gain": 0.09},
                         {"kept": False, "beyond_reach": False, "moved_mm": 1.0, "proposal_sre_mm": 1.0, "lc2_gain": 0.01}]
    lines = bench._reach_lines({"0": out})
    assert "1 refused for moving it less than the dead zone (moves 2.6 mm)" in lines[-1]
    assert lines[-1].endswith("without the dead zone: 1.30 ± 1.30 (1.30); 50 %")


def test_section_reports_the_refinement_without_its_multistart():
    run = _run(["a", "b"], [1.5, 4.0])
    out = run["sets"]["registration-indep-v1"]["0"]
    out["initial"] = [16.0, 16.0]
    out["refinement"] = [{"kept": True, "beyond_reach": False, "moved_mm": 14.0, "proposal_sre_mm": 1.5, "lc2_gain": 0.4,
                          "multistart_chosen": "start", "agreeing": [["estimate", "start"]], "single_start_sre_mm": 10.5},
                         {"kept": True, "beyond_reach": False, "moved_mm": 5.0, "proposal_sre_mm": 4.0, "lc2_gain": 0.2,
                          "multistart_chosen": "estimate", "agreeing": [], "single_start_sre_mm": 4.0}]
    lines = bench._reach_lines({"16": out})
    assert "multi-start: 1 end point(s) reached from two starts" in lines[-1]
    assert lines[-1].endswith("(the previous rule): 7.25 ± 3.25 (7.25); 0 %")
