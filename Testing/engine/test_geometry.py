"""Round trips, known answers and an independent oracle (scipy) for ultrasound_ai.core.geometry."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from ultrasound_ai.core import geometry as g
from ultrasound_ai.core.errors import InputError

CONVENTIONS = ["xyz", "ZYX", "YZX"]

# --- strategies ---------------------------------------------------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)


@st.composite
def rotations(draw):
    """A uniformly-ish spread rotation matrix, built by scipy (independent of the module)."""
    q = np.array(draw(st.tuples(*[st.floats(-1, 1, **finite)] * 4)))
    assume(np.linalg.norm(q) > 0.1)
    return Rotation.from_quat(q).as_matrix()


@st.composite
def rigids(draw):
    R = draw(rotations())
    t = np.array(draw(st.tuples(*[st.floats(-500, 500, **finite)] * 3)))
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


@st.composite
def principal_angles(draw, degrees=False):
    """Angles inside matrix_to_euler's principal range, away from its boundaries and gimbal lock."""
    a0 = draw(st.floats(-3.1, 3.1, **finite))
    a1 = draw(st.floats(-1.5, 1.5, **finite))
    a2 = draw(st.floats(-3.1, 3.1, **finite))
    a = np.array([a0, a1, a2])
    return np.degrees(a) if degrees else a


def Rx(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def Ry(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def Rz(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# --- Euler angles -------------------------------------------------------------------------------


def test_known_quarter_turns_by_hand():
    h = math.pi / 2
    # 90 deg about x maps y -> z; about y maps z -> x; about z maps x -> y (right-handed).
    rx = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float)
    ry = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float)
    rz = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)
    np.testing.assert_allclose(g.euler_to_matrix([h, 0, 0], "xyz"), rx, atol=1e-15)
    np.testing.assert_allclose(g.euler_to_matrix([0, h, 0], "xyz"), ry, atol=1e-15)
    np.testing.assert_allclose(g.euler_to_matrix([0, 0, h], "xyz"), rz, atol=1e-15)
    # ZYX and YZX put the angles on different axes.
    np.testing.assert_allclose(g.euler_to_matrix([90, 0, 0], "ZYX", degrees=True), rz, atol=1e-15)
    np.testing.assert_allclose(g.euler_to_matrix([0, 0, 90], "ZYX", degrees=True), rx, atol=1e-15)
    np.testing.assert_allclose(g.euler_to_matrix([90, 0, 0], "YZX", degrees=True), ry, atol=1e-15)
    np.testing.assert_allclose(g.euler_to_matrix([0, 90, 0], "YZX", degrees=True), rz, atol=1e-15)
    np.testing.assert_allclose(g.euler_to_matrix([0, 0, 90], "YZX", degrees=True), rx, atol=1e-15)
    # Order matters: static xyz applies x first, so R = Rz Ry Rx.
    a = [0.3, -0.4, 1.1]
    np.testing.assert_allclose(g.euler_to_matrix(a, "xyz"), Rz(1.1) @ Ry(-0.4) @ Rx(0.3), atol=1e-15)
    np.testing.assert_allclose(g.euler_to_matrix(a, "ZYX"), Rz(0.3) @ Ry(-0.4) @ Rx(1.1), atol=1e-15)
    np.testing.assert_allclose(g.euler_to_matrix(a, "YZX"), Ry(0.3) @ Rz(-0.4) @ Rx(1.1), atol=1e-15)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_scipy_oracle_both_directions(convention):
    rng = np.random.default_rng(1)
    angles = np.stack(
        [rng.uniform(-3.1, 3.1, 50), rng.uniform(-1.5, 1.5, 50), rng.uniform(-3.1, 3.1, 50)], -1
    ).reshape(5, 10, 3)
    R = g.euler_to_matrix(angles, convention)
    assert R.shape == (5, 10, 3, 3) and R.dtype == np.float64
    ref = Rotation.from_euler(convention, angles.reshape(-1, 3)).as_matrix().reshape(5, 10, 3, 3)
    np.testing.assert_allclose(R, ref, atol=1e-14)
    mats = Rotation.random(40, random_state=2).as_matrix()
    np.testing.assert_allclose(
        g.matrix_to_euler(mats, convention, degrees=True),
        Rotation.from_matrix(mats).as_euler(convention, degrees=True),
        atol=1e-9,
    )


def test_zyx_is_xyz_with_reversed_angles():
    a = np.random.default_rng(3).uniform(-3, 3, (7, 3))
    np.testing.assert_allclose(g.euler_to_matrix(a, "ZYX"), g.euler_to_matrix(a[:, ::-1], "xyz"), atol=1e-15)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("degrees", [False, True])
@settings(max_examples=30)
@given(data=st.data())
def test_euler_angle_round_trip(convention, degrees, data):
    a = data.draw(principal_angles(degrees=degrees))
    R = g.euler_to_matrix(a, convention, degrees=degrees)
    assert g.is_rigid(g.make_rigid(R, [0, 0, 0]))
    np.testing.assert_allclose(g.matrix_to_euler(R, convention, degrees=degrees), a, atol=1e-7 if degrees else 1e-9)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("degrees", [False, True])
@settings(max_examples=30)
@given(R=rotations())
def test_euler_matrix_round_trip(convention, degrees, R):
    a = g.matrix_to_euler(R, convention, degrees=degrees)
    lim = 180.0 if degrees else math.pi
    assert np.all(np.abs(a) <= lim + 1e-12) and abs(a[1]) <= lim / 2 + 1e-12
    np.testing.assert_allclose(g.euler_to_matrix(a, convention, degrees=degrees), R, atol=1e-12)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@settings(max_examples=30)
@given(a0=st.floats(-3.1, 3.1, **finite), a2=st.floats(-3.1, 3.1, **finite), tiny=st.sampled_from([0.0, 1e-12, -1e-9]))
def test_gimbal_lock_round_trips_matrix(convention, sign, a0, a2, tiny):
    a = np.array([a0, sign * (math.pi / 2) + tiny, a2])
    R = g.euler_to_matrix(a, convention)
    back = g.matrix_to_euler(R, convention)
    assert np.all(np.isfinite(back))
    np.testing.assert_allclose(g.euler_to_matrix(back, convention), R, atol=1e-12)
    if tiny == 0.0:
        # Exactly locked: the leftmost factor's angle is set to 0, the other outer one carries the rotation.
        assert abs(back[2 if convention == "xyz" else 0]) < 1e-12


def test_unknown_convention_is_rejected():
    for bad in ["zyx", "XYZ", "abc", 3]:
        with pytest.raises(InputError, match="convention"):
            g.euler_to_matrix([0, 0, 0], bad)
        with pytest.raises(InputError, match="convention"):
            g.matrix_to_euler(np.eye(3), bad)
        with pytest.raises(InputError, match="convention"):
            g.params_to_matrix(np.zeros(6), bad)


# --- 6-DOF parameters ---------------------------------------------------------------------------


def test_params_layout_translation_first():
    T = g.params_to_matrix([1.0, -2.0, 3.5, 0.0, 0.0, 90.0])
    expected = np.array([[0, -1, 0, 1.0], [1, 0, 0, -2.0], [0, 0, 1, 3.5], [0, 0, 0, 1]])
    np.testing.assert_allclose(T, expected, atol=1e-15)
    np.testing.assert_allclose(g.apply_transform(T, [1.0, 0, 0]), [1.0, -1.0, 3.5], atol=1e-15)
    # Radians when asked.
    np.testing.assert_allclose(g.params_to_matrix([1.0, -2.0, 3.5, 0, 0, math.pi / 2], degrees=False), T, atol=1e-15)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("degrees", [False, True])
@settings(max_examples=30)
@given(data=st.data())
def test_params_round_trip(convention, degrees, data):
    T = data.draw(rigids())
    p = g.matrix_to_params(T, convention, degrees=degrees)
    assert p.shape == (6,)
    np.testing.assert_allclose(p[:3], T[:3, 3], atol=0)
    np.testing.assert_allclose(g.params_to_matrix(p, convention, degrees=degrees), T, atol=1e-10)
    angles = data.draw(principal_angles(degrees=degrees))
    p2 = np.concatenate([T[:3, 3], angles])
    np.testing.assert_allclose(
        g.matrix_to_params(g.params_to_matrix(p2, convention, degrees), convention, degrees), p2, atol=1e-7
    )


def test_params_batched_shape():
    p = np.zeros((2, 3, 6))
    p[..., 0] = np.arange(6).reshape(2, 3)
    T = g.params_to_matrix(p)
    assert T.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(T[..., 0, 3], p[..., 0])
    np.testing.assert_allclose(g.matrix_to_params(T), p, atol=1e-14)


# --- Quaternions --------------------------------------------------------------------------------


def test_quaternion_known_values():
    s = math.sqrt(0.5)
    np.testing.assert_allclose(g.quaternion_to_matrix([s, 0, 0, s]), g.euler_to_matrix([0, 0, 90], "xyz", True), atol=1e-15)
    np.testing.assert_allclose(g.matrix_to_quaternion(np.eye(3)), [1, 0, 0, 0], atol=0)
    # 180-degree turns (trace = -1): w = 0, the axis must come out exactly.
    for axis in range(3):
        R = np.diag([-1.0, -1.0, -1.0])
        R[axis, axis] = 1.0
        q = g.matrix_to_quaternion(R)
        expected = np.zeros(4)
        expected[axis + 1] = 1.0
        np.testing.assert_allclose(np.abs(q), expected, atol=1e-15)
    # Non-unit input is normalised.
    np.testing.assert_allclose(g.quaternion_to_matrix([2 * s, 0, 0, 2 * s]), g.quaternion_to_matrix([s, 0, 0, s]), atol=1e-15)


@given(R=rotations())
def test_quaternion_round_trip_and_scipy_oracle(R):
    q = g.matrix_to_quaternion(R)
    assert q[0] >= 0 and abs(np.linalg.norm(q) - 1) < 1e-12
    np.testing.assert_allclose(g.quaternion_to_matrix(q), R, atol=1e-12)
    ref = Rotation.from_matrix(R).as_quat()  # scalar-last
    ref = np.array([ref[3], ref[0], ref[1], ref[2]])
    ref = ref if ref[0] > 0 else -ref
    if q[0] > 1e-9:
        np.testing.assert_allclose(q, ref, atol=1e-12)
    else:  # w == 0: q and -q are both canonical.
        assert min(np.abs(q - ref).max(), np.abs(q + ref).max()) < 1e-12


@given(q=st.tuples(*[st.floats(-1, 1, **finite)] * 4))
def test_quaternion_from_quaternion_round_trip(q):
    q = np.array(q)
    assume(np.linalg.norm(q) > 0.1)
    qn = q / np.linalg.norm(q) * (1 if q[0] >= 0 else -1)
    back = g.matrix_to_quaternion(g.quaternion_to_matrix(q))
    if qn[0] > 1e-6:
        np.testing.assert_allclose(back, qn, atol=1e-12)
    else:
        assert min(np.abs(back - qn).max(), np.abs(back + qn).max()) < 1e-12


def test_quaternion_batched_and_zero_rejected():
    Rs = Rotation.random(24, random_state=4).as_matrix().reshape(2, 3, 4, 3, 3)
    q = g.matrix_to_quaternion(Rs)
    assert q.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(g.quaternion_to_matrix(q), Rs, atol=1e-12)
    with pytest.raises(InputError, match="q:.*zero"):
        g.quaternion_to_matrix([0.0, 0.0, 0.0, 0.0])


# --- Rigid algebra ------------------------------------------------------------------------------


@given(T=rigids(), p=st.tuples(*[st.floats(-100, 100, **finite)] * 3))
def test_invert_and_apply(T, p):
    Ti = g.invert_rigid(T)
    np.testing.assert_allclose(Ti @ T, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(Ti, np.linalg.inv(T), atol=1e-10)
    assert g.is_rigid(T) and g.is_rigid(Ti)
    q = g.apply_transform(T, p)
    np.testing.assert_allclose(q, (T @ np.append(p, 1.0))[:3], atol=1e-10)
    np.testing.assert_allclose(g.apply_transform(Ti, q), p, atol=1e-9)
    np.testing.assert_array_equal(g.make_rigid(g.rotation(T), g.translation(T)), T)


def test_batched_broadcasting_and_is_rigid():
    Ts = g.params_to_matrix(np.random.default_rng(5).uniform(-50, 50, (4, 6)))
    pts = np.random.default_rng(6).uniform(-10, 10, (7, 3))
    out = g.apply_transform(Ts[:, None], pts)  # [4, 1, 4, 4] x [7, 3] -> [4, 7, 3]
    assert out.shape == (4, 7, 3)
    np.testing.assert_allclose(out[2, 5], g.apply_transform(Ts[2], pts[5]), atol=1e-13)
    assert g.apply_transform(Ts[0], pts).shape == (7, 3)
    T = g.make_rigid(np.eye(3), np.zeros((5, 3)))  # rotation broadcast over translations
    assert T.shape == (5, 4, 4)
    assert g.is_rigid(Ts)
    scaled = Ts.copy()
    scaled[1, :3, :3] *= 0.15  # a pixel->mm scaling is not rigid
    assert not g.is_rigid(scaled)
    reflected = Ts[0] @ np.diag([1.0, 1.0, -1.0, 1.0])
    assert not g.is_rigid(reflected)
    bad_row = Ts[0].copy()
    bad_row[3, 0] = 0.5
    assert not g.is_rigid(bad_row)
    nan = Ts[0].copy()
    nan[0, 0] = np.nan
    assert not g.is_rigid(nan)
    with pytest.raises(InputError, match="T: .*rigid"):
        g.invert_rigid(scaled)
    with pytest.raises(InputError, match="R: expected a proper rotation"):
        g.make_rigid(np.diag([1.0, 1.0, -1.0]), [0, 0, 0])


def test_orthonormalize_and_compose():
    T = g.params_to_matrix([1, 2, 3, 10, 20, 30])
    noisy = T + np.random.default_rng(7).normal(0, 1e-5, (4, 4)) * np.r_[[1, 1, 1, 1]][:, None] * [1, 1, 1, 0]
    noisy[3] = [0, 0, 0, 1]
    fixed = g.orthonormalize(noisy)
    assert g.is_rigid(fixed, atol=1e-12)
    np.testing.assert_allclose(fixed, T, atol=1e-4)
    A, B = g.params_to_matrix([1, 0, 0, 0, 0, 90]), g.params_to_matrix([0, 2, 0, 90, 0, 0])
    np.testing.assert_allclose(g.compose(A, B), A @ B)


# --- Series -------------------------------------------------------------------------------------

SHAPE_HW, SPACING_XY = (31, 48), (0.15, 0.2)  # non-square frame and spacing: axis swaps fail


def test_reference_points_and_identity_series():
    ref = g.frame_reference_points(SHAPE_HW, SPACING_XY)
    np.testing.assert_allclose(ref, [[47 / 2 * 0.15, 15 * 0.2, 0], [0, 0, 0], [47 * 0.15, 0, 0]], atol=1e-15)
    np.testing.assert_allclose(g.pose_to_series(np.eye(4), SHAPE_HW, SPACING_XY), ref.reshape(9), atol=1e-15)
    np.testing.assert_allclose(g.series_to_pose(ref.reshape(9), SHAPE_HW, SPACING_XY), np.eye(4), atol=1e-14)


@given(T=rigids())
def test_series_round_trip(T):
    s = g.pose_to_series(T, SHAPE_HW, SPACING_XY)
    assert s.shape == (9,)
    np.testing.assert_allclose(s[3:6], T[:3, 3], atol=1e-12)  # top-left corner = image origin
    np.testing.assert_allclose(g.series_to_pose(s, SHAPE_HW, SPACING_XY), T, atol=1e-10)


def test_series_batched_and_float32_storage():
    Ts = g.params_to_matrix(np.random.default_rng(8).uniform(-200, 200, (3, 5, 6)))
    s = g.pose_to_series(Ts, SHAPE_HW, SPACING_XY)
    assert s.shape == (3, 5, 9)
    np.testing.assert_allclose(g.series_to_pose(s, SHAPE_HW, SPACING_XY), Ts, atol=1e-10)
    # Stored as float32 (as in FiMA files): accepted, pose recovered to float32 precision and rigid.
    back = g.series_to_pose(s.astype(np.float32), SHAPE_HW, SPACING_XY)
    assert g.is_rigid(back, atol=1e-12)
    np.testing.assert_allclose(back, Ts, atol=1e-3)


def test_series_inconsistent_with_frame_is_rejected():
    T = g.params_to_matrix([5, 6, 7, 10, 20, 30])
    s = g.pose_to_series(T, SHAPE_HW, SPACING_XY)
    with pytest.raises(InputError, match="series: .*top-corner distance"):
        g.series_to_pose(s, (31, 40), SPACING_XY)
    with pytest.raises(InputError, match="series: .*centre-to-top-edge"):
        g.series_to_pose(s, (25, 48), SPACING_XY)
    with pytest.raises(InputError, match="series: "):
        g.series_to_pose(s, SHAPE_HW, SPACING_XY[::-1])  # swapped spacing
    skew = s.copy()
    skew[0:3] += 0.05 * (s[6:9] - s[3:6]) / np.linalg.norm(s[6:9] - s[3:6])
    with pytest.raises(InputError, match="along the top edge"):
        g.series_to_pose(skew, SHAPE_HW, SPACING_XY)
    with pytest.raises(InputError, match="series: expected shape \\[..., 9\\]"):
        g.series_to_pose(s[:8], SHAPE_HW, SPACING_XY)
    for bad_shape in [(1, 48), (31,), (31.5, 48), "ab"]:
        with pytest.raises(InputError, match="frame_shape_hw"):
            g.frame_reference_points(bad_shape, SPACING_XY)
    for bad_sp in [(0.15,), (0.0, 0.2), (np.nan, 0.2), (-1, 0.2)]:
        with pytest.raises(InputError, match="pixel_spacing_xy"):
            g.pose_to_series(T, SHAPE_HW, bad_sp)


# --- Sequences ----------------------------------------------------------------------------------


@st.composite
def pose_sequences(draw):
    n = draw(st.integers(1, 6))
    return np.stack([draw(rigids()) for _ in range(n)])


@given(P=pose_sequences())
def test_relative_chain_round_trip(P):
    rel = g.to_relative(P)
    assert rel.shape == (len(P) - 1, 4, 4)
    for i in range(len(P) - 1):
        np.testing.assert_allclose(rel[i], g.relative_transform(P[i], P[i + 1]), atol=1e-12)
    np.testing.assert_allclose(g.chain_relative(rel, first=P[0]), P, atol=1e-9)
    N = g.normalize_to_first(P)
    np.testing.assert_array_equal(N[0], np.eye(4))
    np.testing.assert_allclose(g.chain_relative(g.to_relative(N)), N, atol=1e-9)
    np.testing.assert_allclose(g.to_relative(N), rel, atol=1e-9)  # relative motion unchanged


def test_relative_transform_known_answer():
    A = g.params_to_matrix([10, 0, 0, 0, 0, 90])
    B = g.params_to_matrix([10, 5, 0, 0, 0, 90])
    # b sits 5 mm along world y from a; a's x axis points along world y, so in a's frame: +5 mm in x.
    np.testing.assert_allclose(g.relative_transform(A, B), g.params_to_matrix([5, 0, 0, 0, 0, 0]), atol=1e-14)
    assert g.chain_relative(np.zeros((0, 4, 4))).shape == (1, 4, 4)


def test_sequence_bad_inputs():
    with pytest.raises(InputError, match=r"poses: expected shape \[N, 4, 4\]"):
        g.to_relative(np.eye(4))
    with pytest.raises(InputError, match="poses: expected shape"):
        g.normalize_to_first(np.zeros((0, 4, 4)))
    with pytest.raises(InputError, match=r"rel: expected shape \[N-1, 4, 4\]"):
        g.chain_relative(np.eye(4))
    with pytest.raises(InputError, match="first: expected shape"):
        g.chain_relative(np.eye(4)[None], first=np.eye(4)[None])


# --- LPS / RAS ----------------------------------------------------------------------------------


def test_lps_ras_constant():
    np.testing.assert_array_equal(g.LPS_TO_RAS @ g.LPS_TO_RAS, np.eye(4))
    np.testing.assert_array_equal(g.lps_to_ras_points([1.0, 2.0, 3.0]), [-1.0, -2.0, 3.0])


@given(T=rigids(), p=st.tuples(*[st.floats(-100, 100, **finite)] * 3))
def test_lps_ras_round_trips_and_consistency(T, p):
    p = np.array(p)
    np.testing.assert_array_equal(g.ras_to_lps_points(g.lps_to_ras_points(p)), p)
    np.testing.assert_array_equal(g.ras_to_lps_transform(g.lps_to_ras_transform(T)), T)
    T_ras = g.lps_to_ras_transform(T)
    assert g.is_rigid(T_ras)
    # Mapping a point in LPS then converting equals converting then mapping in RAS.
    np.testing.assert_allclose(
        g.lps_to_ras_points(g.apply_transform(T, p)), g.apply_transform(T_ras, g.lps_to_ras_points(p)), atol=1e-10
    )


# --- torch --------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_torch_matches_numpy(convention):
    rng = np.random.default_rng(9)
    p = rng.uniform(-60, 60, (3, 4, 6))
    Tn = g.params_to_matrix(p, convention)
    Tt = g.params_to_matrix(torch.tensor(p), convention)
    assert isinstance(Tt, torch.Tensor) and Tt.dtype == torch.float64 and Tt.shape == (3, 4, 4, 4)
    np.testing.assert_allclose(Tt.numpy(), Tn, atol=1e-13)
    np.testing.assert_allclose(g.matrix_to_params(Tt, convention).numpy(), g.matrix_to_params(Tn, convention), atol=1e-11)
    np.testing.assert_allclose(g.matrix_to_quaternion(Tt[..., :3, :3]).numpy(), g.matrix_to_quaternion(Tn[..., :3, :3]), atol=1e-13)
    q = g.matrix_to_quaternion(Tn[..., :3, :3])
    np.testing.assert_allclose(g.quaternion_to_matrix(torch.tensor(q)).numpy(), Tn[..., :3, :3], atol=1e-13)
    # float32 stays float32.
    T32 = g.euler_to_matrix(torch.tensor(p[..., 3:], dtype=torch.float32), convention, degrees=True)
    assert T32.dtype == torch.float32
    np.testing.assert_allclose(T32.numpy(), Tn[..., :3, :3], atol=1e-5)
    a32 = g.matrix_to_euler(T32, convention, degrees=True)
    assert a32.dtype == torch.float32
    np.testing.assert_allclose(g.euler_to_matrix(a32, convention, True).numpy(), Tn[..., :3, :3], atol=1e-5)


def test_torch_rigid_series_and_sequences():
    P = g.params_to_matrix(np.random.default_rng(10).uniform(-40, 40, (5, 6)))
    Pt = torch.tensor(P)
    np.testing.assert_allclose(g.invert_rigid(Pt).numpy(), g.invert_rigid(P), atol=1e-14)
    np.testing.assert_allclose(g.to_relative(Pt).numpy(), g.to_relative(P), atol=1e-12)
    np.testing.assert_allclose(g.chain_relative(g.to_relative(Pt), first=Pt[0]).numpy(), P, atol=1e-10)
    np.testing.assert_allclose(g.normalize_to_first(Pt).numpy(), g.normalize_to_first(P), atol=1e-12)
    s = g.pose_to_series(Pt, SHAPE_HW, SPACING_XY)
    np.testing.assert_allclose(s.numpy(), g.pose_to_series(P, SHAPE_HW, SPACING_XY), atol=1e-12)
    np.testing.assert_allclose(g.series_to_pose(s, SHAPE_HW, SPACING_XY).numpy(), P, atol=1e-10)
    pts = torch.ones(2, 3, dtype=torch.float32)
    assert g.apply_transform(P[0], pts).dtype == torch.float32  # numpy T follows the tensor argument
    np.testing.assert_allclose(g.lps_to_ras_transform(Pt).numpy(), g.lps_to_ras_transform(P))
    with pytest.raises(InputError, match="angles: .*NaN"):
        g.euler_to_matrix(torch.tensor([0.0, float("nan"), 0.0]), "xyz")


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_gradcheck(convention):
    a = torch.tensor([[0.3, -0.7, 2.0], [-2.5, 1.2, 0.4]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: g.euler_to_matrix(x, convention), (a,))
    R = g.euler_to_matrix(a.detach(), convention).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: g.matrix_to_euler(m, convention), (R,))
    p = torch.tensor([1.0, -2.0, 3.0, 10.0, -20.0, 30.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: g.params_to_matrix(x, convention), (p,))


def test_gradient_flows_through_losses():
    p = torch.tensor([[1.0, 2.0, 3.0, 10.0, 20.0, 30.0]], requires_grad=True)
    target = g.params_to_matrix(torch.tensor([[1.5, 2.0, 3.0, 12.0, 20.0, 30.0]]))
    loss = (g.params_to_matrix(p) - target).abs().sum() + g.matrix_to_params(g.params_to_matrix(p)).sum()
    loss = loss + g.pose_to_series(g.params_to_matrix(p), SHAPE_HW, SPACING_XY).sum()
    loss = loss + g.matrix_to_quaternion(g.params_to_matrix(p)[..., :3, :3]).sum()
    loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # At exact gimbal lock the gradient stays finite (no NaN from the unused branch).
    R = g.euler_to_matrix(torch.tensor([0.4, math.pi / 2, 0.2], dtype=torch.float64), "xyz").requires_grad_(True)
    g.matrix_to_euler(R, "xyz").sum().backward()
    assert torch.isfinite(R.grad).all()


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_shapes_and_values_name_the_argument():
    cases = [
        (lambda: g.euler_to_matrix(np.zeros(4), "xyz"), r"angles: expected shape \[..., 3\], got \[4\]"),
        (lambda: g.matrix_to_euler(np.zeros((4, 4)), "xyz"), r"R: expected shape \[..., 3, 3\]"),
        (lambda: g.params_to_matrix(np.zeros(3)), r"p: expected shape \[..., 6\]"),
        (lambda: g.matrix_to_params(np.eye(3)), r"T: expected shape \[..., 4, 4\]"),
        (lambda: g.apply_transform(np.eye(4), np.zeros((5, 2))), r"points: expected shape \[..., 3\]"),
        (lambda: g.apply_transform(np.eye(4), [np.inf, 0, 0]), "points: contains NaN or infinite"),
        (lambda: g.make_rigid(np.eye(3), [0, np.nan, 0]), "t: contains NaN"),
        (lambda: g.invert_rigid(np.eye(3)), r"T: expected shape \[..., 4, 4\]"),
        (lambda: g.quaternion_to_matrix([1, 0, 0]), r"q: expected shape \[..., 4\]"),
        (lambda: g.matrix_to_quaternion(np.full((3, 3), np.nan)), "R: contains NaN"),
        (lambda: g.pose_to_series(np.eye(3), SHAPE_HW, SPACING_XY), r"T: expected shape \[..., 4, 4\]"),
        (lambda: g.relative_transform(np.eye(4), np.zeros(3)), r"T_b: expected shape"),
        (lambda: g.lps_to_ras_points(np.zeros((2, 2))), r"p: expected shape \[..., 3\]"),
        (lambda: g.lps_to_ras_transform(np.zeros((3, 4))), r"T: expected shape \[..., 4, 4\]"),
        (lambda: g.euler_to_matrix("abc", "xyz"), "angles: expected an array of real numbers"),
        (lambda: g.compose(), "at least one"),
        (lambda: g.apply_transform(np.zeros((5, 4, 4)) + np.eye(4), np.zeros((2, 3))), "T, points: leading"),
        (lambda: g.relative_transform(np.stack([np.eye(4)] * 3), np.stack([np.eye(4)] * 2)), "T_a, T_b: leading"),
        (lambda: g.make_rigid(np.stack([np.eye(3)] * 3), np.zeros((2, 3))), "R, t: leading"),
    ]
    for call, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            call()
