"""SVD clutter filter (Gram matrix, torch) against numpy's SVD; Butterworth band-pass."""

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.clutter import bandpass_filter, parse_cutoff, svd_filter


def _lowrank_block(T, Z, X, spectrum, noise, seed=0, complex_=True):
    """Block with a known singular spectrum plus a little noise (distinct, well-separated values)."""
    rng = np.random.default_rng(seed)
    r = len(spectrum)
    if complex_:
        u = np.linalg.qr(rng.standard_normal((T, r)) + 1j * rng.standard_normal((T, r)))[0]
        v = np.linalg.qr(rng.standard_normal((Z * X, r)) + 1j * rng.standard_normal((Z * X, r)))[0]
        n = noise * (rng.standard_normal((T, Z * X)) + 1j * rng.standard_normal((T, Z * X)))
        a = (u * np.asarray(spectrum)) @ v.conj().T + n
        return a.reshape(T, Z, X).astype(np.complex64)
    u = np.linalg.qr(rng.standard_normal((T, r)))[0]
    v = np.linalg.qr(rng.standard_normal((Z * X, r)))[0]
    a = (u * np.asarray(spectrum)) @ v.T + noise * rng.standard_normal((T, Z * X))
    return a.reshape(T, Z, X).astype(np.float32)


def _numpy_svd_filter(block, k1, k2):
    t = block.shape[0]
    casorati = block.reshape(t, -1).T.astype(np.complex128)  # pixels x frames
    u, s, vh = np.linalg.svd(casorati, full_matrices=False)
    kept = (u[:, k1:k2] * s[k1:k2]) @ vh[k1:k2]
    return kept.T.reshape(block.shape)


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_remove_leading_components_matches_numpy_svd():
    # Tissue-like spectrum: a few strong components, then a floor (subspace-iteration path).
    block = _lowrank_block(120, 12, 20, [400, 150, 60, 30, 4, 3, 2], noise=0.05)
    out = svd_filter(block, 4)
    assert out.dtype == np.complex64 and out.shape == block.shape
    assert _rel_err(out, _numpy_svd_filter(block, 4, 120)) < 1e-4


def test_band_and_flat_spectrum_match_numpy_svd():
    # Slowly decaying but distinct spectrum: the eigh path (no clear gap for the iteration).
    spectrum = 100 * 0.93 ** np.arange(40)
    block = _lowrank_block(60, 10, 12, spectrum, noise=0.0, seed=1)
    for cutoff, (k1, k2) in [(3, (3, 60)), ((2, 9), (2, 9)), ((5, 50), (5, 50))]:
        assert _rel_err(svd_filter(block, cutoff), _numpy_svd_filter(block, k1, k2)) < 1e-3, cutoff


def test_kept_subspace_is_orthogonal_to_removed_components():
    block = _lowrank_block(80, 8, 10, [300, 100, 40, 5, 4, 3], noise=0.02, seed=2)
    out = svd_filter(block, 3).reshape(80, -1).T  # Casorati of the output
    _, _, vh = np.linalg.svd(block.reshape(80, -1).T.astype(np.complex128), full_matrices=False)
    # The output's time courses have no energy along the 3 removed right singular vectors.
    leak = np.abs(out @ vh[:3].conj().T).max() / np.abs(out).max()
    assert leak < 1e-4


def test_real_input_and_torch_tensor():
    import torch

    block = _lowrank_block(50, 6, 7, [50, 20, 5, 1], noise=0.01, seed=3, complex_=False)
    out = svd_filter(block, 2)
    assert out.dtype == np.float32
    assert _rel_err(out, _numpy_svd_filter(block, 2, 50).real) < 1e-4
    t = svd_filter(torch.from_numpy(block), 2)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), out, atol=1e-5)


def test_zero_cutoff_is_identity():
    block = _lowrank_block(20, 4, 5, [5, 1], noise=0.1)
    np.testing.assert_array_equal(svd_filter(block, 0), block)


@pytest.mark.parametrize("bad", [-1, 30, (5, 3), (1, 2, 3)])
def test_bad_cutoff(bad):
    with pytest.raises(InputError, match="cutoff"):
        parse_cutoff(bad, 20)


def test_bad_inputs():
    with pytest.raises(InputError, match=r"\[T, Z, X\]"):
        svd_filter(np.zeros((10, 10), np.complex64), 1)
    with pytest.raises(InputError, match="dtype"):
        svd_filter(np.zeros((10, 3, 3), np.int16), 1)


def test_bandpass_keeps_band_and_rejects_outside():
    fr = 1000.0
    t = np.arange(800) / fr
    inband = np.exp(2j * np.pi * 150 * t)
    slow = np.exp(2j * np.pi * 5 * t)
    block = ((inband + 3 * slow)[:, None, None] * np.ones((1, 2, 3))).astype(np.complex64)
    out = bandpass_filter(block, fr, (50, 249))
    assert out.dtype == np.complex64
    mid = slice(100, 700)  # away from the edges
    np.testing.assert_allclose(out[mid, 0, 0], inband[mid], atol=0.05)


def test_bandpass_errors():
    block = np.zeros((100, 2, 2), np.complex64)
    with pytest.raises(InputError, match="Nyquist"):
        bandpass_filter(block, 400.0, (50, 249))
    with pytest.raises(InputError, match="lo < hi"):
        bandpass_filter(block, 1000.0, (200, 100))
    with pytest.raises(InputError, match="frames"):
        bandpass_filter(block[:10], 1000.0, (50, 249))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    block = _lowrank_block(200, 20, 30, [400, 150, 60, 30, 4, 3, 2], noise=0.05)
    cpu = svd_filter(block, 4)
    gpu = svd_filter(block, 4, device="cuda")
    assert isinstance(gpu, np.ndarray)
    assert _rel_err(gpu, cpu) < 1e-4
