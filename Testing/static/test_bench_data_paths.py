"""Every frozen-set default folder is the checkout's git-ignored bench/data, never a folder inside the package.

(A module moved one package deeper kept `parents[2]` and wrote its set under ultrasound_ai/bench/data.)
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_DATA = REPO / "bench" / "data"


def test_freehand_benchmark_set_default_folder():
    from ultrasound_ai.freehand.simulation.benchmark_set import default_cache_dir

    assert default_cache_dir("freehand-v1") == BENCH_DATA / "freehand-v1"


def test_freehand_indep_set_default_folder():
    from ultrasound_ai.validation import freehand_indep_set

    assert freehand_indep_set.default_cache_dir().parent == BENCH_DATA


def test_registration_frozen_sets_default_root():
    from ultrasound_ai.registration.frozen_sets import DEFAULT_ROOT

    assert DEFAULT_ROOT == BENCH_DATA
