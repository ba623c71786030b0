"""Phantom and frame formation: speckle decorrelation, grid independence, anatomy, determinism."""

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import euler_to_matrix, make_rigid
from ultrasound_ai.freehand.simulation.phantom import Phantom, Psf, make_phantom, to_uint8

H, W, SP = 150, 170, (0.15, 0.15)


@pytest.fixture(scope="module")
def homog():
    return Phantom.homogeneous(5)


@pytest.mark.parametrize("yaw_deg", [0.0, 30.0, 60.0])
def test_elevational_decorrelation_follows_beam_profile(homog, yaw_deg):
    """Frames as written (uint8) of homogeneous tissue d apart correlate as exp(−d²/2σ_e²)."""
    psf = Psf(sigma_e_mm=0.6)
    # Yaw: rotation about the depth axis (image y = world y); also a small tilt so no axis is aligned.
    R = euler_to_matrix(np.radians([4.0, yaw_deg, 0.0]), "xyz")
    t0 = np.array([1.37, 0.0, 2.71])
    ref = to_uint8(homog.render_plane(make_rigid(R, t0), (H, W), SP, psf)).astype(float)
    for d in (0.3, 0.6, 1.0, 1.8):
        img = to_uint8(homog.render_plane(make_rigid(R, t0 + d * R[:, 2]), (H, W), SP, psf)).astype(float)
        rho = np.corrcoef(ref.ravel(), img.ravel())[0, 1]
        expected = np.exp(-(d**2) / (2 * psf.sigma_e_mm**2))
        assert abs(rho - expected) <= 0.05, (yaw_deg, d, rho, expected)


def test_speckle_is_fully_developed_and_calibrated(homog):
    psf = Psf()
    img = homog.render_plane(np.eye(4), (H, W), SP, psf).astype(np.float64)
    # Invert the compression: intensity of reference tissue is exponential with mean 1.
    intensity = psf.noise_floor * (10 ** (img * psf.dynamic_range_db / 10) - 1)
    assert abs(intensity.mean() - 1.0) < 0.12
    assert abs(intensity.std() / intensity.mean() - 1.0) < 0.12  # exponential: std = mean
    dens_per_cell = homog.scatterer_density_per_mm3 * psf.axial_fwhm_mm * psf.lateral_fwhm_mm * 2.355 * psf.sigma_beam_mm
    assert dens_per_cell >= 10


def test_sub_pixel_shift_gives_shifted_image(homog):
    """The speckle field does not depend on the frame's pixel grid."""
    R = euler_to_matrix(np.radians([0.0, 20.0, 0.0]), "xyz")
    t = np.array([0.5, 0.2, 1.0])
    h, w = 60, 70
    for axis, frac in ((0, 0.3), (1, 0.5)):
        off = np.zeros(3)
        off[axis] = frac * 0.15
        shifted = homog.render_plane(make_rigid(R, t + R @ off), (h, w), SP, Psf())
        spacing, shape = [0.15, 0.15], [h, w]
        spacing[axis] = 0.015  # a 10x finer grid along the shift axis holds the shifted samples
        shape[1 - axis] *= 10
        fine = homog.render_plane(make_rigid(R, t), tuple(shape), tuple(spacing), Psf())
        k = int(round(frac * 10))
        ref = fine[:, k::10][:, :w] if axis == 0 else fine[k::10][:h]
        assert np.corrcoef(shifted.ravel(), ref.ravel())[0, 1] > 0.98
        unshifted = homog.render_plane(make_rigid(R, t), (h, w), SP, Psf())
        assert np.corrcoef(shifted.ravel(), unshifted.ravel())[0, 1] < 0.97  # the shift is visible


def test_scatterer_field_is_deterministic_and_cache_independent():
    a, b = Phantom.homogeneous(9), Phantom.homogeneous(9, max_cached_cells=2)
    pa, ea = a.cell_scatterers(3, -2, 7)
    for cell in [(0, 0, 0), (1, 1, 1), (5, 5, 5)]:
        b.cell_scatterers(*cell)
    pb, eb = b.cell_scatterers(3, -2, 7)
    assert np.array_equal(pa, pb) and np.array_equal(ea, eb)
    c = a._cell_positions((3, -2, 7)).T  # [n, 3]
    assert np.all((c >= np.array([9, -6, 21]) - 1e-4) & (c <= np.array([12, -3, 24]) + 1e-4))
    other = Phantom.homogeneous(10).cell_scatterers(3, -2, 7)[0]
    assert len(other) != len(pa) or not np.array_equal(other, pa)
    img1 = a.render_plane(np.eye(4), (40, 50), SP)
    img2 = b.render_plane(np.eye(4), (40, 50), SP)
    assert np.array_equal(img1, img2)


def test_anatomy_echogenicity():
    ph = make_phantom(4, kind="carotid")
    v = ph.vessels[0]
    z = np.array([10.0])
    cx, cy = v.centre(z)
    lumen = ph.echogenicity(np.array([[cx[0], cy[0], 10.0]]))[0]
    wall = ph.echogenicity(np.array([[cx[0], cy[0] + v.radius + v.wall / 2, 10.0]]))[0]
    assert lumen < 0.1 and wall > 1.5
    # Layers: gel above the skin is anechoic, skin is bright, muscle is mid-grey on average.
    gel = ph.echogenicity(np.array([[30.0, 0.1, 50.0]]))[0]
    skin_y = ph.skin_surface_y(30.0, 50.0) + ph.skin_mm / 2
    skin = ph.echogenicity(np.array([[30.0, float(skin_y), 50.0]]))[0]
    assert gel < 0.1 and skin > 1.2
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(-40, 40, 4000), rng.uniform(0, 40, 4000), rng.uniform(0, 100, 4000)])
    e = ph.echogenicity(pts)
    assert e.shape == (4000,) and np.all(e >= 0) and 0.3 < np.median(e) < 1.5
    # A rendered carotid frame through the vessel shows a dark lumen.
    pose = make_rigid(np.eye(3), [cx[0] - 6.0, 0.0, 10.0])
    img = ph.render_plane(pose, (int((cy[0] + 8) / 0.15), 80), SP)
    row, col = int(round(cy[0] / 0.15)), 40
    assert img[row - 3:row + 4, col - 3:col + 4].mean() < 0.5 * img.mean()


def test_random_phantoms_differ_and_repeat():
    a, b, c = make_phantom(1), make_phantom(1), make_phantom(2)
    pts = np.random.default_rng(0).uniform(0, 30, (500, 3))
    assert np.array_equal(a.echogenicity(pts), b.echogenicity(pts))
    assert not np.array_equal(a.echogenicity(pts), c.echogenicity(pts))


def test_bad_inputs(homog):
    with pytest.raises(InputError, match="rigid"):
        homog.render_plane(np.diag([2.0, 1, 1, 1]), (10, 10), SP)
    with pytest.raises(InputError, match="4, 4"):
        homog.render_plane(np.eye(3), (10, 10), SP)
    with pytest.raises(InputError, match="spacing"):
        homog.render_plane(np.eye(4), (10, 10), (0.0, 0.1))
    with pytest.raises(InputError, match="points"):
        homog.echogenicity(np.zeros((4, 2)))
    with pytest.raises(InputError, match="sigma_e_mm"):
        Psf(sigma_e_mm=-1)
    with pytest.raises(InputError, match="kind"):
        Phantom(seed=1, kind="liver")
