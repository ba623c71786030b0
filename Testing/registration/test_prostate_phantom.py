import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import apply_transform, invert_rigid, is_rigid, matrix_to_params
from ultrasound_ai.io.volume import resample_volume
from ultrasound_ai.registration.phantom import (
    PROBE_RADIUS,
    PROBE_Y,
    REGISTRATION_SIM_VERSION,
    PhantomConfig,
    simulate_case,
)


def _label_at(vol, pts):
    idx = np.round(vol.physical_to_index(pts)).astype(int)
    return vol.array[idx[:, 2], idx[:, 1], idx[:, 0]]


def test_seeded_and_recorded(small_case):
    again = simulate_case(5, PhantomConfig.small())
    assert np.array_equal(again.fixed.array, small_case.fixed.array)
    assert np.array_equal(again.moving.array, small_case.moving.array)
    assert np.array_equal(again.truth_fixed_to_moving, small_case.truth_fixed_to_moving)
    other = simulate_case(6, PhantomConfig.small())
    assert not np.allclose(other.truth_fixed_to_moving, small_case.truth_fixed_to_moving)
    assert small_case.attrs["registration_sim_version"] == REGISTRATION_SIM_VERSION
    assert small_case.attrs["seed"] == 5


def test_truth_maps_anatomy_between_spaces(small_case):
    c = small_case
    T = c.truth_fixed_to_moving
    assert is_rigid(T)
    # Landmarks: the moving ones are the truth image of the fixed ones.
    assert np.allclose(apply_transform(T, c.landmarks_fixed), c.landmarks_moving)
    assert 3 <= len(c.landmarks_fixed) <= 6
    # The MR gland label, resampled into TRUS space through inv(T), overlaps the TRUS gland label.
    mr_in_us = resample_volume(c.fixed_label, c.moving_label, invert_rigid(T), "nearest").array
    a, b = mr_in_us.astype(bool), c.moving_label.array.astype(bool)
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.85
    # ...and far less when the truth is ignored (so the pose is not the identity).
    no_truth = resample_volume(c.fixed_label, c.moving_label, None, "nearest").array.astype(bool)
    assert 2 * (no_truth & b).sum() / (no_truth.sum() + b.sum()) < dice - 0.05
    # Surface points lie on the gland boundary in both spaces.
    sf = c.surface_fixed
    inward = sf + 0.15 * (sf.mean(0) - sf)
    assert _label_at(c.fixed_label, inward).mean() > 0.9


def test_probe_pose_range_and_fan():
    cfg = PhantomConfig.small()
    poses = [simulate_case(s, cfg) for s in range(3)]
    params = np.array([matrix_to_params(invert_rigid(c.truth_fixed_to_moving)) for c in poses])
    # World = MR space; the probe pose is centre jitter (±3 mm) plus the random motion (±10 mm, ±15°).
    assert np.all(np.abs(params[:, 3:]) <= 15.0 + 1e-6)
    assert np.all(np.abs(params[:, :3]) <= 10.0 + 3.0 + 15 * np.pi / 180 * 30)
    assert np.ptp(params[:, 3:], axis=0).max() > 5.0  # actually random
    for c in poses:
        us = c.moving.array
        # The fan is fixed in the probe frame (the TRUS grid): every non-zero voxel lies inside it.
        assert 0.3 < (us > 0).mean() < 0.9
        kji = np.argwhere(us > 0)
        q = c.moving.index_to_physical(kji[:, ::-1].astype(float))
        r = np.hypot(q[:, 0], PROBE_Y - q[:, 1])
        ang = np.degrees(np.arctan2(np.abs(q[:, 0]), PROBE_Y - q[:, 1]))
        tol = c.moving.spacing_xyz.max()
        assert r.min() >= PROBE_RADIUS - tol and r.max() <= cfg.fan_depth_mm + tol
        assert ang.max() <= cfg.fan_half_angle_deg + 1e-6 and np.abs(q[:, 2]).max() <= cfg.fan_half_length_mm + tol


def test_modalities_have_expected_contrast(small_case):
    c = small_case
    mr, lab = c.fixed.array, c.fixed_label.array.astype(bool)
    assert mr.dtype == np.float32 and c.moving.array.dtype == np.uint8
    # Spacing: MR thick slices, TRUS near-isotropic.
    assert c.fixed.spacing_xyz[2] > 1.8 * c.fixed.spacing_xyz[0]
    assert c.moving.spacing_xyz.max() / c.moving.spacing_xyz.min() < 1.2
    # The periprostatic fat just outside the gland is brighter than the gland in both modalities
    # (T2: fat bright, TZ dark; TRUS: fat hyperechoic).
    from scipy import ndimage

    ring = ndimage.binary_dilation(lab, iterations=2) & ~lab
    assert mr[ring].mean() > 1.2 * mr[lab].mean()
    us = c.moving.array.astype(float)
    ul = c.moving_label.array.astype(bool)
    fan = us > 0
    uring = ndimage.binary_dilation(ul, iterations=2) & ~ul
    assert us[uring & fan].mean() > 1.1 * us[ul & fan].mean()


def test_held_out_family_differs():
    base = simulate_case(2, PhantomConfig.small())
    held = simulate_case(2, PhantomConfig.small(family="superquadric"))
    assert held.attrs["family"] == "superquadric"
    assert not np.array_equal(base.fixed_label.array, held.fixed_label.array)
    h = PhantomConfig.held_out()
    assert h.family == "superquadric" and h.mr_spacing_xy_mm[0] > PhantomConfig().mr_spacing_xy_mm[1]
    with pytest.raises(InputError, match="family"):
        PhantomConfig(family="cube")


def test_randomised_family_varies_appearance_and_probe_placement():
    from ultrasound_ai.registration.phantom import FAT, PZ, _Style

    cfg = PhantomConfig.randomised()
    styles = [_Style(cfg, s) for s in range(40)]
    ratio = np.array([st.us_echo[PZ] / st.us_echo[FAT] for st in styles])
    assert ratio.min() < 0.5 and ratio.max() > 1.2  # hypo- to hyperechoic glands
    assert {st.capsule_gain == 0 for st in styles} == {True, False}  # capsule echo absent or present
    gaps = np.array([st.probe_gap_mm for st in styles])
    assert 1.5 <= gaps.min() and gaps.max() <= 8.0 and np.ptp(gaps) > 4
    assert np.ptp([st.fan[0] for st in styles]) > 15 and np.ptp([st.attenuation for st in styles]) > 0.05
    # The fixed (default) style is the version-1 appearance.
    fixed = _Style(PhantomConfig(), 3)
    assert not fixed.randomised and fixed.probe_gap_mm is None and fixed.push_mm == 0


def test_randomised_probe_sits_behind_the_gland():
    c = simulate_case(2, PhantomConfig.randomised(mr_spacing_xy_mm=(1.2, 1.3), mr_spacing_z_mm=(2.5, 3.0),
                                                   us_spacing_mm=(1.1, 1.2), surface_points=400))
    from ultrasound_ai.registration.phantom import _Style

    st = _Style(PhantomConfig.randomised(), 2)
    kji = np.argwhere(c.moving_label.array)
    p = c.moving_label.index_to_physical(kji[:, ::-1].astype(float))  # probe frame: axis at (0, PROBE_Y)
    closest = np.hypot(p[:, 0], p[:, 1] - PROBE_Y).min() - st.probe_radius
    assert closest <= st.probe_gap_mm + st.push_mm + 2.5  # the gland a few mm in front of the probe surface
    assert c.attrs["config"]["randomise"] is True
