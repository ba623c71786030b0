"""The frozen-set benchmark's result cache is keyed by what each row computes, not by its name only."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the bench imports its neighbours (report, ulm_frozen_set)
spec = importlib.util.spec_from_file_location("bench_ulm_frozen", BENCH / "bench_ulm_frozen.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_cache_key_changes_with_the_rows_processing_parameters():
    # A cache written before a default changed (e.g. 3dml's rs_agreement_px) must not answer for the
    # new default: the key holds the row's parameters.
    from ultrasound_ai.ulm.pipeline import UlmParams

    key = bench.cache_key("test_b100_n40_p0", "3dml", "ulm_3dml_small", None, UlmParams(device="cpu"))
    assert key == bench.cache_key("test_b100_n40_p0", "3dml", "ulm_3dml_small", None, UlmParams(device="cpu"))
    assert key != bench.cache_key("test_b100_n40_p0", "3dml", "ulm_3dml_small", None,
                                  UlmParams(device="cpu", rs_agreement_px=0))
    assert key != bench.cache_key("test_b100_n40_p1", "3dml", "ulm_3dml_small", None, UlmParams(device="cpu"))
    method, params = bench._params("3dml-net", None, {}, 100.0)
    assert (method, params.rs_agreement_px) == ("3dml", 0)


def test_a_speed_ratio_is_called_indicative_only_when_a_compared_row_came_from_the_cache():
    # Passing --cache alone must not mark ratios of rows all timed in this run as coming from other runs.
    assert bench.timing_provenance(set(), ("3dml", "3dml-sliding")) == " (same run)."
    assert bench.timing_provenance({"rs"}, ("3dml", "3dml-sliding")) == " (same run)."
    assert "indicative only" in bench.timing_provenance({"3dml-sliding"}, ("3dml", "3dml-sliding"))
