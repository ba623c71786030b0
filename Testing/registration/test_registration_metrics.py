import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import apply_transform, params_to_matrix
from ultrasound_ai.registration.metrics import centred_perturbation, perturbation_with_sre, sre, tre


def _sphere(n=200, r=20.0, c=(5.0, -3.0, 10.0)):
    rng = np.random.default_rng(1)
    u = rng.normal(size=(n, 3))
    return u / np.linalg.norm(u, axis=1, keepdims=True) * r + np.array(c)


def test_sre_translation_is_its_length():
    pts = _sphere()
    T_true = params_to_matrix([1, 2, 3, 10, -5, 20])
    shift = np.eye(4)
    shift[:3, 3] = [3.0, 4.0, 0.0]
    assert sre(shift @ T_true, T_true, pts) == pytest.approx(5.0, abs=1e-9)
    assert sre(T_true, T_true, pts) == pytest.approx(0.0, abs=1e-12)


def test_sre_rotation_about_sphere_centre_known_answer():
    # A rotation by a about the z axis through a ring's centre moves every ring point by 2 r sin(a/2).
    r, a = 15.0, 30.0
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    c = np.array([4.0, 5.0, 6.0])
    ring = c + r * np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], 1)
    D = centred_perturbation([0, 0, 0, 0, 0, a], c)
    assert sre(D, np.eye(4), ring) == pytest.approx(2 * r * np.sin(np.radians(a) / 2), rel=1e-9)


def test_tre_landmarks_and_truth_agree():
    T_true = params_to_matrix([5, -2, 1, 3, 4, -6])
    lf = _sphere(6)
    lm = apply_transform(T_true, lf)
    T_est = params_to_matrix([5.5, -2, 1, 3, 4, -6])
    assert tre(T_est, landmarks_fixed=lf, landmarks_moving=lm) == pytest.approx(0.5)
    assert tre(T_est, T_true, lf) == pytest.approx(0.5)
    with pytest.raises(InputError, match="paired"):
        tre(T_est, landmarks_fixed=lf, landmarks_moving=lm[:3])


@pytest.mark.parametrize("target", [0.0, 0.5, 8.0, 16.0, 20.0])
def test_perturbation_hits_target_sre(target):
    pts = _sphere()
    T_true = params_to_matrix([10, 20, -5, 8, -12, 30])
    rng = np.random.default_rng(int(target * 10))
    T_init, params = perturbation_with_sre(T_true, target, pts, rng, return_params=True)
    assert sre(T_init, T_true, pts) == pytest.approx(target, abs=1e-6)
    # The perturbation is the drawn direction about the centroid: T_init = T_true @ D(params).
    assert np.allclose(T_init, T_true @ centred_perturbation(params, pts.mean(0)), atol=1e-9)


def test_perturbation_is_seeded_and_bad_inputs():
    pts = _sphere()
    a = perturbation_with_sre(np.eye(4), 8.0, pts, np.random.default_rng(3))
    b = perturbation_with_sre(np.eye(4), 8.0, pts, np.random.default_rng(3))
    assert np.array_equal(a, b)
    with pytest.raises(InputError, match="target_sre_mm"):
        perturbation_with_sre(np.eye(4), -1.0, pts, np.random.default_rng(0))
    with pytest.raises(InputError, match="surface_points"):
        sre(np.eye(4), np.eye(4), np.zeros((0, 3)))
    with pytest.raises(InputError, match="T_est"):
        sre(np.eye(3), np.eye(4), pts)
