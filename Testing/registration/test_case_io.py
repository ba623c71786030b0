import json

import numpy as np
import pytest
import SimpleITK as sitk

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import apply_transform, invert_rigid, lps_to_ras_points, params_to_matrix
from ultrasound_ai.io.volume import Volume, write_volume
from ultrasound_ai.registration.case import (
    Case,
    import_muregpro,
    read_case,
    read_transform_tfm,
    result_json,
    surface_points_from_label,
    write_case,
    write_result_json,
    write_transform_tfm,
)


def _vol(shape_kji, spacing=(0.7, 0.9, 2.5), origin=(-10.0, 5.0, 3.0), value=None, dtype=np.float32):
    arr = np.zeros(shape_kji, dtype=dtype) if value is None else value
    return Volume(arr, spacing, origin, np.eye(3))


def test_case_round_trip(tmp_path, small_case):
    d = write_case(small_case, tmp_path / "c1")
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["fixed.nrrd", "fixed_label.nrrd", "moving.nrrd", "moving_label.nrrd", "surface_fixed.csv",
         "landmarks_fixed.csv", "landmarks_moving.csv", "truth.json"])
    doc = json.loads((d / "truth.json").read_text())
    assert np.allclose(doc["fixed_to_moving_lps"], small_case.truth_fixed_to_moving)
    assert (d / "surface_fixed.csv").read_text().splitlines()[0] == "x,y,z"
    back = read_case(d)
    assert back.name == small_case.name
    assert back.fixed.same_grid(small_case.fixed) and np.array_equal(back.fixed.array, small_case.fixed.array)
    assert np.array_equal(back.moving.array, small_case.moving.array)
    assert np.array_equal(back.fixed_label.array, small_case.fixed_label.array)
    assert np.array_equal(back.surface_fixed, small_case.surface_fixed)
    assert np.array_equal(back.landmarks_moving, small_case.landmarks_moving)
    assert np.array_equal(back.truth_fixed_to_moving, small_case.truth_fixed_to_moving)
    assert back.attrs["registration_sim_version"] == small_case.attrs["registration_sim_version"]
    # Rewriting replaces the folder and leaves no temporary folder behind.
    write_case(back, d)
    assert [p.name for p in tmp_path.iterdir()] == ["c1"]


def test_surface_derived_from_label_when_absent(tmp_path):
    arr = np.zeros((10, 20, 30), np.uint8)
    arr[3:7, 5:15, 10:20] = 1
    lab = _vol(arr.shape, value=arr)
    pts = surface_points_from_label(lab)
    idx = np.round(lab.physical_to_index(pts)).astype(int)
    # Every point is a label voxel on the box's boundary.
    assert np.all(arr[idx[:, 2], idx[:, 1], idx[:, 0]] == 1)
    on_face = ((idx[:, 0] == 10) | (idx[:, 0] == 19) | (idx[:, 1] == 5) | (idx[:, 1] == 14) | (idx[:, 2] == 3)
               | (idx[:, 2] == 6))
    assert on_face.all()
    case = Case(_vol(arr.shape), lab, _vol((8, 8, 8), spacing=(1, 1, 1)))
    assert np.array_equal(case.surface_fixed, pts)
    d = write_case(case, tmp_path / "c")
    assert not (d / "truth.json").exists()
    assert np.allclose(read_case(d).surface_fixed, pts)


def test_bad_cases(tmp_path):
    img = _vol((10, 20, 30))
    lab = np.zeros((10, 20, 30), np.uint8)
    with pytest.raises(InputError, match="empty"):
        Case(img, _vol(lab.shape, value=lab), _vol((8, 8, 8)))
    lab[4, 5, 6] = 1
    with pytest.raises(InputError, match="same grid"):
        Case(img, _vol(lab.shape, origin=(0, 0, 0), value=lab), _vol((8, 8, 8)))
    with pytest.raises(InputError, match="2D"):
        Case(img, _vol(lab.shape, value=lab), _vol((1, 8, 8)))
    with pytest.raises(InputError, match="missing fixed.nrrd"):
        read_case(tmp_path)


def test_tfm_round_trip_and_itk_direction(tmp_path):
    T = params_to_matrix([3.0, -7.5, 12.0, 10.0, -20.0, 35.0])
    path = write_transform_tfm(T, tmp_path / "T.tfm")
    assert np.allclose(read_transform_tfm(path), T, atol=1e-12)
    # SimpleITK reads the file as the same fixed -> moving point mapping.
    p = np.array([10.0, -4.0, 7.0])
    assert np.allclose(sitk.ReadTransform(str(path)).TransformPoint(p.tolist()), apply_transform(T, p))
    with pytest.raises(InputError, match="rigid"):
        write_transform_tfm(np.diag([2.0, 1.0, 1.0, 1.0]), tmp_path / "bad.tfm")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["T.tfm"]
    with pytest.raises(InputError, match="not found"):
        read_transform_tfm(tmp_path / "none.tfm")


def test_result_json_moving_to_fixed_ras(tmp_path):
    T = params_to_matrix([5.0, 2.0, -3.0, 0.0, 0.0, 90.0])  # fixed -> moving, LPS
    doc = json.loads(write_result_json(T, tmp_path / "r.json", "mi").read_text())
    assert doc["method"] == "mi" and np.allclose(doc["fixed_to_moving_lps"], T)
    M = np.array(doc["moving_to_fixed_ras"])
    # A fixed-space point p and its moving-space image q = T(p): the Slicer to-parent matrix maps q's RAS
    # coordinates back to p's RAS coordinates.
    p = np.array([12.0, -8.0, 30.0])
    q = apply_transform(T, p)
    assert np.allclose(apply_transform(M, lps_to_ras_points(q)), lps_to_ras_points(p))
    # and the inverse direction
    assert np.allclose(apply_transform(np.linalg.inv(M), lps_to_ras_points(p)), lps_to_ras_points(q))
    # Hand check of the LPS -> RAS flip: 90 deg about z, so the RAS matrix keeps that rotation but the
    # translation's x, y flip sign.
    inv = invert_rigid(T)
    assert np.allclose(M[:3, 3], inv[:3, 3] * [-1, -1, 1])
    assert result_json(T, "attention")["method"] == "attention"


def _write_nifti4d(channels, spacing, origin, path):
    arr = np.stack(channels, axis=0)  # [C, k, j, i] -> a 4D image, channel slowest
    img = sitk.GetImageFromArray(arr.astype(np.uint8), isVector=False)
    img.SetSpacing(list(spacing) + [1.0])
    img.SetOrigin(list(origin) + [0.0])
    sitk.WriteImage(img, str(path))


def test_import_muregpro(tmp_path):
    src = tmp_path / "nifti" / "train"
    for sub in ("mr_images", "us_images", "mr_labels", "us_labels"):
        (src / sub).mkdir(parents=True)
    shape = (12, 14, 16)
    sp_mr, sp_us = (0.8, 0.8, 0.8), (0.8, 0.8, 0.8)
    org_mr, org_us = (-5.0, -6.0, -4.0), (-3.0, -6.0, -4.0)
    rng = np.random.default_rng(0)
    for name in ("000000", "000001"):
        mr = Volume(rng.random(shape).astype(np.float32), sp_mr, org_mr, np.eye(3))
        us = Volume((rng.random(shape) * 255).astype(np.uint8), sp_us, org_us, np.eye(3))
        write_volume(mr, src / "mr_images" / f"{name}.nii.gz")
        write_volume(us, src / "us_images" / f"{name}.nii.gz")
        gl = np.zeros(shape, np.uint8)
        gl[3:9, 4:10, 5:11] = 1
        lm = np.zeros(shape, np.uint8)
        lm[5, 6, 7] = 1
        empty = np.zeros(shape, np.uint8)
        _write_nifti4d([gl, lm, empty], sp_mr, org_mr, src / "mr_labels" / f"{name}.nii.gz")
        lm_us = np.zeros(shape, np.uint8)
        lm_us[5, 6, 9] = 1
        _write_nifti4d([gl, lm_us, lm_us], sp_us, org_us, src / "us_labels" / f"{name}.nii.gz")
    written = import_muregpro(src, tmp_path / "cases")
    assert [p.name for p in written] == ["000000", "000001"]
    case = read_case(written[0])
    assert case.truth_fixed_to_moving is None and case.attrs["source"] == "muregpro"
    assert case.fixed_label.array.sum() == 6 * 6 * 6 and case.moving_label.array.sum() == 216
    assert np.allclose(case.fixed.origin_lps, org_mr, atol=1e-5)
    # One landmark pair (the third channel is empty on the MR side); positions in each image's space.
    assert case.landmarks_fixed.shape == (1, 3)
    assert np.allclose(case.landmarks_fixed[0], np.array(org_mr) + np.array([7, 6, 5]) * 0.8, atol=1e-4)
    assert np.allclose(case.landmarks_moving[0], np.array(org_us) + np.array([9, 6, 5]) * 0.8, atol=1e-4)
    with pytest.raises(InputError, match="us_labels"):
        import_muregpro(tmp_path / "cases", tmp_path / "x")
