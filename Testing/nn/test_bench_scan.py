"""The selective-scan benchmark's mambapy row computes the same scan, and the engine's memory stays bounded."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ultrasound_ai.nn.selective_scan import selective_scan_chunked, selective_scan_ref

spec = importlib.util.spec_from_file_location(
    "bench_selective_scan", Path(__file__).parents[2] / "bench" / "bench_selective_scan.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_mambapy_row_is_the_same_scan():
    pytest.importorskip("mambapy")
    x = tuple(t.double() for t in bench.make_inputs(8, 4, 100))
    ref = selective_scan_ref(*x, True)
    out = bench.mambapy_scan(*x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-10


def test_engine_largest_tensor_is_one_chunk_whatever_the_length():
    sizes = []
    for L in (1024, 4096):
        x = bench.make_inputs(16, 8, L)
        with torch.no_grad():
            sizes.append(bench.largest_tensor_mb(lambda: selective_scan_chunked(*x, True, chunk_size=64)))
    # [1, 16, L] inputs/outputs grow with L; no [1, 16, L, 8] tensor (the naive scan's) appears.
    assert sizes[1] <= 1.01 * 16 * 4096 * 4 / 2**20 < 16 * 4096 * 8 * 4 / 2**20
