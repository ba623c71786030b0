"""Volumes: file round trips with oblique geometry, index <-> LPS maths, resampling and bad inputs."""

import os

import numpy as np
import pytest
import SimpleITK as sitk

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import InputError, OutputWriteError
from ultrasound_ai.io.volume import Volume, read_volume, resample_volume, write_volume

SPACING = np.array([0.3, 0.7, 1.9])
ORIGIN = np.array([-12.5, 40.25, 7.0])


def rotation(ax, ay, az):
    """R = Rz Ry Rx from angles in degrees (an oblique, right-handed rotation)."""
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


DIRECTION = rotation(20, -35, 50)


def make_volume(dtype=np.int16, direction=DIRECTION, components=None):
    rng = np.random.default_rng(0)
    shape = (4, 5, 6) + ((components,) if components else ())  # k, j, i all different
    array = rng.integers(-1000, 1000, size=shape).astype(dtype)
    return Volume(array, SPACING, ORIGIN, direction)


# NIfTI keeps the geometry in float32; NRRD and MetaImage print it with full double precision.
@pytest.mark.parametrize("ext,atol", [(".nrrd", 1e-12), (".nii", 1e-6), (".nii.gz", 1e-6), (".mha", 1e-12),
                                      (".mhd", 1e-12)])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_all_formats(tmp_path, ext, atol, compress):
    vol = make_volume()
    path = write_volume(vol, tmp_path / f"vol{ext}", compress=compress)
    back = read_volume(path)
    assert back.array.dtype == np.int16
    assert back.array.shape == (4, 5, 6) and back.shape_ijk == (6, 5, 4)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing_xyz, SPACING, rtol=0, atol=atol)
    np.testing.assert_allclose(back.origin_lps, ORIGIN, rtol=0, atol=atol * 100)
    np.testing.assert_allclose(back.direction, DIRECTION, rtol=0, atol=atol)
    assert not [p for p in os.listdir(tmp_path) if is_partial(p)]


def test_mhd_writes_header_and_named_data_file(tmp_path):
    write_volume(make_volume(), tmp_path / "scan.mhd")
    assert sorted(os.listdir(tmp_path)) == ["scan.mhd", "scan.raw"]
    assert "ElementDataFile = scan.raw" in (tmp_path / "scan.mhd").read_text()
    np.testing.assert_array_equal(read_volume(tmp_path / "scan.mhd").array, make_volume().array)


def test_left_handed_direction_round_trips(tmp_path):
    flipped = DIRECTION @ np.diag([1.0, 1.0, -1.0])  # det -1: allowed by ITK
    vol = make_volume(direction=flipped)
    for ext in (".nrrd", ".nii"):
        back = read_volume(write_volume(vol, tmp_path / f"lh{ext}"))
        np.testing.assert_allclose(back.direction, flipped, atol=1e-6)
        np.testing.assert_array_equal(back.array, vol.array)


def test_vector_volume_round_trip(tmp_path):
    vol = make_volume(dtype=np.float32, components=2)
    assert vol.is_vector and vol.n_components == 2 and vol.shape_ijk == (6, 5, 4)
    for ext in (".nrrd", ".mha"):
        back = read_volume(write_volume(vol, tmp_path / f"vec{ext}"))
        assert back.is_vector and back.array.shape == (4, 5, 6, 2)
        np.testing.assert_array_equal(back.array, vol.array)
        np.testing.assert_allclose(back.direction, DIRECTION, atol=1e-12)


def test_known_voxel_position_by_hand_and_by_sitk():
    vol = make_volume()
    ijk = np.array([2, 3, 1])  # array element [1, 3, 2]
    by_hand = ORIGIN + DIRECTION[:, 0] * 2 * 0.3 + DIRECTION[:, 1] * 3 * 0.7 + DIRECTION[:, 2] * 1 * 1.9
    np.testing.assert_allclose(vol.index_to_physical(ijk), by_hand, atol=1e-12)
    np.testing.assert_allclose(vol.ijk_to_lps() @ np.append(ijk, 1.0), np.append(by_hand, 1.0), atol=1e-12)
    image = vol.to_sitk()
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk.tolist()), by_hand, atol=1e-12)
    assert image[2, 3, 1] == vol.array[1, 3, 2]  # SimpleITK indexes (i, j, k)
    # Inverse, on a batch of continuous indices.
    pts = np.random.default_rng(1).uniform(-2, 7, size=(10, 3))
    np.testing.assert_allclose(vol.physical_to_index(vol.index_to_physical(pts)), pts, atol=1e-10)
    cont = image.TransformPhysicalPointToContinuousIndex(by_hand.tolist())
    np.testing.assert_allclose(vol.physical_to_index(by_hand), cont, atol=1e-10)
    np.testing.assert_allclose(vol.lps_to_ijk() @ vol.ijk_to_lps(), np.eye(4), atol=1e-12)


def test_from_sitk_and_2d_image():
    image = sitk.Image([7, 3], sitk.sitkFloat32)
    image.SetSpacing([0.2, 0.5])
    image.SetOrigin([1.0, 2.0])
    image[4, 1] = 3.5
    vol = Volume.from_sitk(image)
    assert vol.array.shape == (1, 3, 7)
    assert vol.array[0, 1, 4] == 3.5
    np.testing.assert_allclose(vol.spacing_xyz, [0.2, 0.5, 1.0])
    np.testing.assert_allclose(np.linalg.det(vol.direction), 1.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(spacing_xyz=[0.3, 0.0, 1.9]), "spacing"),
        (dict(spacing_xyz=[0.3, -1, 1.9]), "spacing"),
        (dict(spacing_xyz=[0.3, np.nan, 1.9]), "spacing"),
        (dict(spacing_xyz=[0.3, 0.7]), "spacing"),
        (dict(origin_lps=[0, np.inf, 0]), "origin"),
        (dict(direction=np.diag([1.0, 2.0, 1.0])), "orthonormal"),
        (dict(direction=[[1, 0.3, 0], [0, 1, 0], [0, 0, 1]]), "orthonormal"),
        (dict(direction=np.eye(2)), "direction"),
        (dict(array=np.zeros((3, 4))), "dimensions"),
        (dict(array=np.zeros((2, 3, 4, 2, 2))), "dimensions"),
        (dict(array=np.array([["a"]] * 2, dtype=object).reshape(1, 2, 1)), "dtype"),
    ],
)
def test_bad_geometry_raises_input_error(kwargs, match):
    args = dict(array=np.zeros((2, 3, 4)), spacing_xyz=SPACING, origin_lps=ORIGIN, direction=np.eye(3))
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        Volume(**args)


def test_read_errors_name_the_path(tmp_path):
    missing = tmp_path / "nothing.nrrd"
    with pytest.raises(InputError, match="nothing.nrrd.*not found"):
        read_volume(missing)
    with pytest.raises(InputError, match="unsupported extension"):
        read_volume(tmp_path / "image.png")
    good = write_volume(make_volume(), tmp_path / "good.nrrd")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.nrrd"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="truncated.nrrd"):
        read_volume(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(InputError, match="garbage.nii.gz"):
        read_volume(garbage)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_writer(image, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a header")  # the writer got part-way before failing
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_writer)
    # A failed write is not bad input (exit 1, not 2).
    with pytest.raises(OutputWriteError, match="could not write"):
        write_volume(make_volume(), tmp_path / "out.nrrd")
    with pytest.raises(OutputWriteError, match="could not write"):
        write_volume(make_volume(), tmp_path / "out.mhd")
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match="unsupported extension"):
        write_volume(make_volume(), tmp_path / "out.tiff")


def test_resample_identity_and_known_shift():
    # Linear ramp along i: resampling at a shifted grid must give the ramp at the shifted positions.
    k, j, i = np.meshgrid(np.arange(6), np.arange(7), np.arange(8), indexing="ij")
    ramp = (10.0 * i + 3.0 * j + k).astype(np.float32)
    vol = Volume(ramp, SPACING, ORIGIN, DIRECTION)
    same = resample_volume(vol, vol)
    assert same.same_grid(vol)
    np.testing.assert_allclose(same.array, ramp, atol=1e-4)

    # Translate by exactly one voxel along i (in LPS: direction column 0 times spacing 0.3).
    t = np.eye(4)
    t[:3, 3] = DIRECTION[:, 0] * SPACING[0]
    shifted = resample_volume(vol, vol, transform_lps=t, default=-1.0)
    np.testing.assert_allclose(shifted.array[:, :, :-1], ramp[:, :, 1:], atol=1e-3)
    assert np.all(shifted.array[:, :, -1] == -1.0)  # outside the moving volume

    nearest = resample_volume(vol, vol, transform_lps=t, interpolator="nearest")
    np.testing.assert_array_equal(nearest.array[:, :, :-1], ramp[:, :, 1:])

    # A finer reference grid: values follow the ramp at the reference's physical points.
    fine = Volume(np.zeros((3, 3, 5), np.uint8), SPACING / 2, ORIGIN, DIRECTION)
    out = resample_volume(vol, fine)
    kk, jj, ii = np.meshgrid(np.arange(3) / 2, np.arange(3) / 2, np.arange(5) / 2, indexing="ij")
    expected = 10 * ii + 3 * jj + kk
    np.testing.assert_allclose(out.array, expected, atol=1e-3)
    assert out.array.dtype == np.float32 and out.same_grid(fine)

    with pytest.raises(InputError, match="interpolator"):
        resample_volume(vol, vol, interpolator="cubic-ish")
    with pytest.raises(InputError, match="4x4"):
        resample_volume(vol, vol, transform_lps=np.eye(3))
