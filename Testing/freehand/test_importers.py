"""TUS-REC and PLUS/Slicer tracked-sequence importers/exporters against the sweep contract."""

import gzip
import re

import h5py
import numpy as np
import pytest

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import LPS_TO_RAS
from ultrasound_ai.io.plus import pixel_matrices_to_rigid, read_plus_sequence, write_plus_sequence
from ultrasound_ai.io.sweep import Sweep
from ultrasound_ai.io.tusrec import read_tusrec_calibration, read_tusrec_scan


def _rot(axis, a):
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def _rigid(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def _sweep(n=4, h=5, w=7, spacing=(0.2, 0.35)):
    rng = np.random.default_rng(3)
    tforms = np.stack(
        [_rigid(_rot(2, 0.3 * i) @ _rot(0, 0.2 + 0.1 * i) @ _rot(1, -0.4), [10.0 + i, -5.0 * i, 2.5]) for i in range(n)]
    )
    return Sweep(
        frames=rng.integers(0, 256, (n, h, w), dtype=np.uint8),
        pixel_spacing_xy=spacing,
        tforms=tforms,
        timestamps_s=np.array([12.3456789, 12.40000001, 12.45, 12.5123456789])[:n],
    )


def _fmt_matrix(M):
    return " ".join(repr(float(v)) for v in np.asarray(M).reshape(-1))


# ----------------------------------------------------------------------------------------------
# PLUS: our writer <-> our reader
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["s.igs.mha", "s.igs.nrrd"])
@pytest.mark.parametrize("compress", [False, True])
def test_plus_round_trip_is_identical(tmp_path, name, compress):
    s = _sweep()
    out = write_plus_sequence(s, tmp_path / name, compress=compress)
    assert not [f for f in tmp_path.iterdir() if is_partial(f)]
    r = read_plus_sequence(out)
    np.testing.assert_array_equal(r.frames, s.frames)
    assert r.frames.dtype == np.uint8
    assert r.pixel_spacing_xy == pytest.approx(s.pixel_spacing_xy, rel=1e-12)
    np.testing.assert_allclose(r.tforms, s.tforms, rtol=1e-9, atol=1e-9 * np.abs(s.tforms).max())
    np.testing.assert_array_equal(r.timestamps_s, s.timestamps_s)
    assert r.attrs["plus_invalid_frames_dropped"] == 0


def test_plus_written_header_has_what_volume_reconstruction_needs(tmp_path):
    s = _sweep()
    text = write_plus_sequence(s, tmp_path / "a.igs.mha").read_bytes().split(b"ElementDataFile = LOCAL\n")[0].decode()
    assert "UltrasoundImageOrientation = MF" in text and "UltrasoundImageType = BRIGHTNESS" in text
    assert "DimSize = 7 5 4" in text and "ElementType = MET_UCHAR" in text
    for i in range(4):
        assert f"Seq_Frame{i:04d}_ImageToReferenceTransformStatus = OK" in text
        assert f"Seq_Frame{i:04d}_Timestamp = " in text
    # ImageToReference includes the pixel scaling and maps into RAS.
    m = re.search(r"Seq_Frame0002_ImageToReferenceTransform = (.*)", text).group(1)
    M = np.array([float(v) for v in m.split()]).reshape(4, 4)
    np.testing.assert_allclose(np.linalg.norm(M[:3, 0]), 0.2, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(M[:3, 1]), 0.35, rtol=1e-12)
    np.testing.assert_allclose(M[:3, 3], (LPS_TO_RAS @ s.tforms[2])[:3, 3], rtol=1e-12)


def test_plus_writer_uses_given_estimated_tforms_and_refuses_none(tmp_path):
    s = _sweep()
    est = np.repeat(np.eye(4)[None], 4, axis=0)
    est[:, 2, 3] = np.arange(4) * 0.5
    r = read_plus_sequence(write_plus_sequence(s, tmp_path / "e.igs.nrrd", tforms=est))
    np.testing.assert_allclose(r.tforms, est, atol=1e-12)
    with pytest.raises(InputError, match="tforms"):
        write_plus_sequence(s.without_truth(), tmp_path / "none.igs.mha")
    with pytest.raises(InputError, match=r"\.mha"):
        write_plus_sequence(s, tmp_path / "x.h5")
    assert not (tmp_path / "none.igs.mha").exists()
    assert not [f for f in tmp_path.iterdir() if is_partial(f)]


# ----------------------------------------------------------------------------------------------
# PLUS: files written by hand, as PLUS writes them
# ----------------------------------------------------------------------------------------------

# Three 4x3 frames (W=4, H=3). Frame 1's transform is INVALID and must be dropped.
_SX, _SY = 0.25, 0.4
_R_RAS = [_rot(2, np.pi / 2), _rot(0, 0.3) @ _rot(2, 0.1), _rot(1, -0.7) @ _rot(2, 1.2)]
_T_RAS = [[10.0, 20.0, 30.0], [1.0, 2.0, 3.0], [-4.0, 5.5, 6.25]]


def _plus_matrices(z_scale=0.3):
    return [_rigid(R, t) @ np.diag([_SX, _SY, z_scale, 1.0]) for R, t in zip(_R_RAS, _T_RAS)]


def _pixels():
    return np.arange(3 * 3 * 4, dtype=np.uint8).reshape(3, 3, 4) * 7


def _mha_header(n=3, dims="4 3 3", element_type="MET_UCHAR", orientation="MF", matrices=None, extra=(), status=None,
                compressed_size=None, skip_transform=()):
    matrices = _plus_matrices() if matrices is None else matrices
    status = status or ["OK", "INVALID", "OK"]
    lines = [
        "ObjectType = Image", "NDims = 3", "AnatomicalOrientation = RAI", "BinaryData = True",
        "BinaryDataByteOrderMSB = False", "CenterOfRotation = 0 0 0",
        f"CompressedData = {'True' if compressed_size else 'False'}",
    ]
    if compressed_size:
        lines.append(f"CompressedDataSize = {compressed_size}")
    lines += [
        f"DimSize = {dims}", "ElementNumberOfChannels = 1", "ElementSpacing = 1 1 1", f"ElementType = {element_type}",
        "Kinds = domain domain list", "Offset = 0 0 0", "TransformMatrix = 1 0 0 0 1 0 0 0 1",
        f"UltrasoundImageOrientation = {orientation}", "UltrasoundImageType = BRIGHTNESS",
    ]
    lines += list(extra)
    for i in range(n):
        lines.append(f"Seq_Frame{i:04d}_FrameNumber = {i}")
        if i not in skip_transform:
            lines.append(f"Seq_Frame{i:04d}_ImageToReferenceTransform = {_fmt_matrix(matrices[i])}")
            lines.append(f"Seq_Frame{i:04d}_ImageToReferenceTransformStatus = {status[i]}")
        lines.append(f"Seq_Frame{i:04d}_Timestamp = {1.5 + 0.05 * i!r}")
        lines.append(f"Seq_Frame{i:04d}_ImageStatus = OK")
    lines.append("ElementDataFile = LOCAL")
    return ("\n".join(lines) + "\n").encode()


def _write(path, header, data):
    path.write_bytes(header + data)
    return path


def test_plus_hand_written_mha_reads_correctly(tmp_path):
    f = _write(tmp_path / "hand.igs.mha", _mha_header(), _pixels().tobytes())
    s = read_plus_sequence(f)
    np.testing.assert_array_equal(s.frames, _pixels()[[0, 2]])
    assert s.pixel_spacing_xy == pytest.approx((_SX, _SY), rel=1e-12)
    assert s.attrs["plus_invalid_frames_dropped"] == 1
    np.testing.assert_array_equal(s.attrs["plus_source_frame_index"], [0, 2])
    np.testing.assert_array_equal(s.timestamps_s, [1.5, 1.5 + 0.05 * 2])
    assert s.attrs["plus_image_z_scale_mm"] == pytest.approx(0.3)
    # Frame 0 by hand: R = 90° about z (RAS), so image x -> RAS +y (0.25 mm/px), image y -> RAS -x.
    # Pixel (c=2, r=1): RAS = (10 - 0.4, 20 + 0.5, 30) -> LPS = (-9.6, -20.5, 30).
    p = s.tforms[0] @ [2 * _SX, 1 * _SY, 0, 1]
    np.testing.assert_allclose(p[:3], [-9.6, -20.5, 30.0], atol=1e-12)
    # z = x × y (right-handed), unit length.
    np.testing.assert_allclose(s.tforms[0][:3, 2], np.cross(s.tforms[0][:3, 0], s.tforms[0][:3, 1]), atol=1e-12)


def test_plus_known_pixel_lands_on_same_ras_point(tmp_path):
    f = _write(tmp_path / "hand.igs.mha", _mha_header(), _pixels().tobytes())
    s = read_plus_sequence(f)
    M = _plus_matrices()
    for k, i in enumerate([0, 2]):
        for c, r in [(0, 0), (3, 2), (1, 2)]:
            via_plus = M[i] @ [c, r, 0, 1]
            via_contract = LPS_TO_RAS @ s.tforms[k] @ [c * s.pixel_spacing_xy[0], r * s.pixel_spacing_xy[1], 0, 1]
            np.testing.assert_allclose(via_contract, via_plus, atol=1e-12)


def _header_matrices(path):
    text = path.read_bytes()
    out = {}
    for m in re.finditer(rb"Seq_Frame(\d+)_ImageToReferenceTransform *:?= *([^\n]*)", text):
        out[int(m.group(1))] = np.array([float(v) for v in m.group(2).split()]).reshape(4, 4)
    return out


@pytest.mark.parametrize("z_scale", [0.3, 0.0])
def test_plus_to_contract_to_plus_reproduces_header_matrices(tmp_path, z_scale):
    M = _plus_matrices(z_scale)
    f = _write(tmp_path / "hand.igs.mha", _mha_header(matrices=M, status=["OK"] * 3), _pixels().tobytes())
    s = read_plus_sequence(f)
    for ext in ("igs.mha", "igs.nrrd"):
        back = write_plus_sequence(s, tmp_path / f"back.{ext}")
        got = _header_matrices(back)
        assert sorted(got) == [0, 1, 2]
        for i in range(3):
            np.testing.assert_allclose(got[i], M[i], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(read_plus_sequence(back).frames, _pixels())


@pytest.mark.parametrize("frame_kind", ["list", "time"])
def test_plus_hand_written_nrrd_gzip_frame_axis_first(tmp_path, frame_kind):
    # Frame axis first ("list domain domain"), key:=value per-frame lines, gzip encoding.
    M = _plus_matrices()
    pix = _pixels()  # [N, H, W]
    data = np.transpose(pix, (1, 2, 0)).tobytes()  # file order: N fastest, then W, then H
    lines = ["NRRD0004", "# written by hand", "type: unsigned char", "dimension: 3", "sizes: 3 4 3",
             f"kinds: {frame_kind} domain domain", "endian: little", "encoding: gzip",
             "ultrasound image orientation:=MF", "ultrasound image type:=BRIGHTNESS"]
    for i in range(3):
        lines += [f"Seq_Frame{i:04d}_ImageToReferenceTransform:={_fmt_matrix(M[i])}",
                  f"Seq_Frame{i:04d}_ImageToReferenceTransformStatus:=OK",
                  f"Seq_Frame{i:04d}_Timestamp:={0.1 * (i + 1)!r}"]
    f = _write(tmp_path / "hand.igs.nrrd", ("\n".join(lines) + "\n\n").encode(), gzip.compress(data))
    s = read_plus_sequence(f)
    np.testing.assert_array_equal(s.frames, pix)
    assert s.pixel_spacing_xy == pytest.approx((_SX, _SY))
    np.testing.assert_allclose(LPS_TO_RAS @ s.tforms[1] @ [3 * _SX, 2 * _SY, 0, 1], M[1] @ [3, 2, 0, 1], atol=1e-12)


def test_plus_orientation_un_is_flipped_to_mf(tmp_path):
    pix = _pixels()
    stored = pix[:, ::-1, ::-1].copy()  # what a UN file holds for the MF frames `pix`
    f = _write(tmp_path / "un.igs.mha", _mha_header(orientation="UN", status=["OK"] * 3), stored.tobytes())
    np.testing.assert_array_equal(read_plus_sequence(f).frames, pix)


def test_plus_element_spacing_and_rgb(tmp_path):
    # A file that keeps the pixel size in ElementSpacing and a rigid ImageToReference (Slicer-style),
    # with RGB pixels: same geometry as PLUS's scaled matrices; grey = rounded BT.601 luma.
    rigid = [_rigid(R, t) for R, t in zip(_R_RAS, _T_RAS)]
    header = _mha_header(matrices=rigid, status=["OK"] * 3).decode()
    header = header.replace("ElementSpacing = 1 1 1", f"ElementSpacing = {_SX} {_SY} 1")
    header = header.replace("ElementNumberOfChannels = 1", "ElementNumberOfChannels = 3")
    rgb = np.stack([_pixels(), np.full((3, 3, 4), 100, np.uint8), np.full((3, 3, 4), 10, np.uint8)], axis=-1)
    s = read_plus_sequence(_write(tmp_path / "rgb.igs.mha", header.encode(), rgb.tobytes()))
    assert s.pixel_spacing_xy == pytest.approx((_SX, _SY))
    expected = np.rint(_pixels() * 0.299 + 100 * 0.587 + 10 * 0.114).astype(np.uint8)
    np.testing.assert_array_equal(s.frames, expected)
    ref = read_plus_sequence(_write(tmp_path / "ref.igs.mha", _mha_header(status=["OK"] * 3), _pixels().tobytes()))
    np.testing.assert_allclose(s.tforms, ref.tforms, atol=1e-12)


def test_plus_uint16_frames_rule(tmp_path):
    pix = _pixels().astype("<u2")
    f = _write(tmp_path / "u16.igs.mha", _mha_header(element_type="MET_USHORT", status=["OK"] * 3), pix.tobytes())
    np.testing.assert_array_equal(read_plus_sequence(f).frames, _pixels())  # fits 0..255: lossless cast
    pix[0, 0, 0] = 1000
    f = _write(tmp_path / "u16b.igs.mha", _mha_header(element_type="MET_USHORT", status=["OK"] * 3), pix.tobytes())
    with pytest.raises(InputError, match=r"values \d+\.\.1000; expected 0\.\.255"):
        read_plus_sequence(f)


def test_plus_probe_chain(tmp_path):
    # No ImageToReference: ProbeToReference per frame + an ImageToProbe calibration.
    cal = _rigid(_rot(0, 0.5), [1.0, 2.0, 3.0]) @ np.diag([_SX, _SY, 1.0, 1.0])
    probe = [_rigid(_rot(2, 0.2 * i), [5.0 * i, 0, 1]) for i in range(3)]
    lines = _mha_header(matrices=[np.eye(4)] * 3, status=["OK"] * 3).decode()
    lines = lines.replace("ImageToReference", "ProbeToReference")
    for i in range(3):
        lines = lines.replace(f"Seq_Frame{i:04d}_ProbeToReferenceTransform = {_fmt_matrix(np.eye(4))}",
                              f"Seq_Frame{i:04d}_ProbeToReferenceTransform = {_fmt_matrix(probe[i])}")
    f = _write(tmp_path / "chain.igs.mha", lines.encode(), _pixels().tobytes())
    with pytest.raises(InputError, match="ImageToProbe"):
        read_plus_sequence(f)
    s = read_plus_sequence(f, image_to_probe=cal)
    for i in range(3):
        np.testing.assert_allclose(LPS_TO_RAS @ s.tforms[i] @ [2 * _SX, 1 * _SY, 0, 1], probe[i] @ cal @ [2, 1, 0, 1],
                                   atol=1e-12)
    # The calibration as a per-frame field of the file works the same.
    extra = "".join(f"Seq_Frame{i:04d}_ImageToProbeTransform = {_fmt_matrix(cal)}\n" for i in range(3))
    f2 = _write(tmp_path / "chain2.igs.mha", lines.replace("ElementDataFile", extra + "ElementDataFile").encode(),
                _pixels().tobytes())
    np.testing.assert_allclose(read_plus_sequence(f2).tforms, s.tforms, atol=1e-12)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_transforms", "ImageToReferenceTransform.*missing"),
        ("count_mismatch", "3 frames.*2 transforms"),
        ("nan", "Seq_Frame0002_ImageToReferenceTransform.*NaN"),
        ("pixel_type", "ElementType.*MET_WEIRD"),
        ("truncated", "ElementDataFile.*truncated"),
        ("truncated_gzip", "ElementDataFile.*truncated"),
        ("shear", "shear"),
        ("not_found", "not found"),
    ],
)
def test_plus_bad_files(tmp_path, case, match):
    f = tmp_path / f"{case}.igs.mha"
    data = _pixels().tobytes()
    ok3 = ["OK"] * 3
    if case == "missing_transforms":
        _write(f, _mha_header(skip_transform=(0, 1, 2)), data)
    elif case == "count_mismatch":
        _write(f, _mha_header(skip_transform=(1,), status=ok3), data)
    elif case == "nan":
        M = _plus_matrices()
        M[2] = M[2].copy()
        M[2][0, 1] = np.nan
        _write(f, _mha_header(matrices=M, status=ok3), data)
    elif case == "pixel_type":
        _write(f, _mha_header(element_type="MET_WEIRD"), data)
    elif case == "truncated":
        _write(f, _mha_header(), data[:-5])
    elif case == "truncated_gzip":
        import zlib

        z = zlib.compress(data)[:-8]
        _write(f, _mha_header(compressed_size=len(z)), z)
    elif case == "shear":
        M = _plus_matrices()
        M[0] = M[0].copy()
        M[0][:3, 1] += 0.05 * M[0][:3, 0]
        _write(f, _mha_header(matrices=M, status=ok3), data)
    with pytest.raises(InputError, match=match) as ei:
        read_plus_sequence(f)
    assert str(f) in str(ei.value)


def test_pixel_matrices_to_rigid_spacing_must_not_vary():
    M = np.stack([np.diag([0.2, 0.3, 1, 1]), np.diag([0.25, 0.3, 1, 1])])
    with pytest.raises(InputError, match="varies"):
        pixel_matrices_to_rigid(M, "m")


# ----------------------------------------------------------------------------------------------
# TUS-REC
# ----------------------------------------------------------------------------------------------

_TSX, _TSY = 0.229, 0.2205


def _calib_csv(path, labels=True, calib=None):
    scale = np.diag([_TSX, _TSY, 1.0, 1.0])
    calib = _rigid(_rot(1, np.pi / 2), [5.0, -3.0, 12.0]) if calib is None else calib
    lines = []
    if labels:
        lines.append("scaling_from_pixel_to_mm")
    lines += [",".join(repr(float(v)) for v in row) for row in scale]
    if labels:
        lines.append("spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system")
    lines += [",".join(repr(float(v)) for v in row) for row in calib]
    path.write_text("\n".join(lines) + "\n")
    return path, scale, calib


def _tusrec_scan(path, n=4, h=6, w=8, n_tforms=None, dtype=np.float64):
    rng = np.random.default_rng(5)
    tforms = np.stack([_rigid(_rot(0, 0.1 * i) @ _rot(2, 0.3), [100.0, 20.0 * i, -50.0]) for i in range(n_tforms or n)])
    frames = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    with h5py.File(path, "w") as fh:
        fh["frames"] = frames
        fh["tforms"] = tforms.astype(dtype)
    return frames, tforms.astype(dtype).astype(np.float64)


@pytest.mark.parametrize("labels, dtype, atol", [(True, np.float64, 1e-9), (False, np.float32, 1e-6)])
def test_tusrec_known_pixel_matches_hand_computation(tmp_path, labels, dtype, atol):
    # float32 tracker matrices (as in the challenge files) are rigid only to ~1e-7: 0.1 µm here.
    csv, scale, calib = _calib_csv(tmp_path / "calib_matrix.csv", labels=labels)
    frames, tforms = _tusrec_scan(tmp_path / "LH_rotation.h5", dtype=dtype)
    s = read_tusrec_scan(tmp_path / "LH_rotation.h5", csv)
    np.testing.assert_array_equal(s.frames, frames)
    assert s.pixel_spacing_xy == pytest.approx((_TSX, _TSY), rel=1e-12)
    assert s.frame_rate_hz == 20.0 and s.timestamps_s is None
    for i in range(4):
        for c, r in [(0, 0), (7, 5), (3, 2)]:
            tusrec = tforms[i] @ calib @ scale @ [c + 1, r + 1, 0, 1]  # the challenge's 1-based pixel
            ours = s.tforms[i] @ [c * _TSX, r * _TSY, 0, 1]
            np.testing.assert_allclose(ours, tusrec, atol=atol)


def test_tusrec_fully_explicit_numbers(tmp_path):
    # Tool pose identity; calibration = +90° about y and translation (5, -3, 12):
    # pixel (c=1, r=0) is TUS-REC pixel (2, 1) -> image mm (2·sx, sy, 0) -> tool (0, sy, -2·sx) + t.
    csv, _, _ = _calib_csv(tmp_path / "calib.csv")
    with h5py.File(tmp_path / "scan.h5", "w") as fh:
        fh["frames"] = np.zeros((2, 3, 4), np.uint8)
        fh["tforms"] = np.repeat(np.eye(4)[None], 2, axis=0)
    s = read_tusrec_scan(tmp_path / "scan.h5", csv)
    np.testing.assert_allclose(s.tforms[1] @ [_TSX, 0, 0, 1], [5.0, -3.0 + _TSY, 12.0 - 2 * _TSX, 1.0], atol=1e-12)


def test_tusrec_landmarks_are_stored_zero_based(tmp_path):
    csv, _, _ = _calib_csv(tmp_path / "calib_matrix.csv")
    _tusrec_scan(tmp_path / "RH_rotation.h5")
    lm = np.array([[1, 1, 1], [3, 8, 6], [2, 4, 3]], dtype=np.int64)  # (frame 0-based, x, y 1-based)
    with h5py.File(tmp_path / "landmark_000.h5", "w") as fh:
        fh["RH_rotation"] = lm
        fh["LH_rotation"] = lm[:1]
    s = read_tusrec_scan(tmp_path / "RH_rotation.h5", csv, landmarks=tmp_path / "landmark_000.h5")
    np.testing.assert_array_equal(s.attrs["landmarks"], [[1, 0, 0], [3, 7, 5], [2, 3, 2]])
    assert s.attrs["landmarks"].dtype == np.float64
    with pytest.raises(InputError, match="outside"):
        read_tusrec_scan(tmp_path / "RH_rotation.h5", csv, landmarks=np.array([[1, 9, 1]]))
    with pytest.raises(InputError, match="frame index"):
        read_tusrec_scan(tmp_path / "RH_rotation.h5", csv, landmarks=np.array([[4, 1, 1]]))


def test_tusrec_errors(tmp_path):
    csv, _, _ = _calib_csv(tmp_path / "calib_matrix.csv")
    _tusrec_scan(tmp_path / "scan.h5")
    with pytest.raises(InputError, match="calib_missing.csv.*not found"):
        read_tusrec_scan(tmp_path / "scan.h5", tmp_path / "calib_missing.csv")
    short = tmp_path / "short.csv"
    short.write_text("\n".join(csv.read_text().splitlines()[:7]) + "\n")
    with pytest.raises(InputError, match="8 numeric rows"):
        read_tusrec_calibration(short)
    wide = tmp_path / "wide.csv"
    wide.write_text(csv.read_text().replace("0.229,", "0.229,0.0,", 1))
    with pytest.raises(InputError, match="5 numbers"):
        read_tusrec_calibration(wide)
    bad_cal, _, _ = _calib_csv(tmp_path / "bad.csv", calib=np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="rigid"):
        read_tusrec_calibration(bad_cal)
    _tusrec_scan(tmp_path / "mismatch.h5", n=4, n_tforms=3)
    with pytest.raises(InputError, match="3 transforms for 4 frames"):
        read_tusrec_scan(tmp_path / "mismatch.h5", csv)
    with pytest.raises(InputError, match="not found"):
        read_tusrec_scan(tmp_path / "nope.h5", csv)


@pytest.mark.parametrize("name, compress", [("a.igs.mha", False), ("b.igs.mha", True), ("c.igs.nrrd", False),
                                            ("d.igs.nrrd", True)])
def test_plus_written_files_read_by_itk(tmp_path, name, compress):
    # An independent MetaImage/NRRD reader sees the same pixels (ITK reads the NRRD 'list' axis as components).
    sitk = pytest.importorskip("SimpleITK")
    s = _sweep()
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(write_plus_sequence(s, tmp_path / name, compress=compress))))
    np.testing.assert_array_equal(a if name.endswith(".mha") else np.moveaxis(a, -1, 0), s.frames)
