"""ULM acquisition / result HDF5 contracts and the PALA .mat importer."""

import h5py
import numpy as np
import pytest
import scipy.io

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.ulm_files import (
    Acquisition,
    UlmResult,
    acquisition_info,
    iter_blocks,
    read_acquisition,
    read_gt_positions,
    read_pala_mat,
    read_result,
    write_acquisition,
    write_result,
)

PIX = (0.05, 0.1)  # dz != dx so an axis swap cannot pass
ORIGIN = (3.0, -7.05)


def _acq(T=20, Z=6, X=9, seed=0, **kw):
    rng = np.random.default_rng(seed)
    iq = (rng.standard_normal((T, Z, X)) + 1j * rng.standard_normal((T, Z, X))).astype(np.complex64)
    gt = np.array([[0, 3.1, -7.0, 5], [0, 3.2, -6.9, 6], [T - 1, 3.15, -6.5, 5]], dtype=np.float64)
    args = dict(iq=iq, pixel_size_mm=PIX, origin_mm=ORIGIN, frame_rate_hz=1000.0, wavelength_mm=0.09856,
                gt_positions=gt, attrs={"seed": 3, "params": {"a": 1, "b": [1, 2]}, "name": "x"})
    args.update(kw)
    return Acquisition(**args)


def _raw_file(path, **datasets_and_attrs):
    attrs = datasets_and_attrs.pop("attrs", {})
    with h5py.File(path, "w") as fh:
        for k, v in datasets_and_attrs.items():
            fh.create_dataset(k, data=v)
        for k, v in attrs.items():
            fh.attrs[k] = v
    return path


GOOD_ATTRS = dict(pixel_size_mm=np.array(PIX), origin_mm=np.array(ORIGIN), frame_rate_hz=1000.0, wavelength_mm=0.1)


def test_iq_round_trip_keeps_everything(tmp_path):
    acq = _acq()
    path = write_acquisition(acq, tmp_path / "a.h5")
    back = read_acquisition(path)
    assert back.kind == "iq" and back.iq.dtype == np.complex64
    np.testing.assert_array_equal(back.iq, acq.iq)
    assert back.pixel_size_mm == PIX and back.origin_mm == ORIGIN
    assert back.frame_rate_hz == 1000.0 and back.wavelength_mm == 0.09856
    np.testing.assert_array_equal(back.gt_positions, acq.gt_positions)
    assert back.attrs["seed"] == 3 and back.attrs["params"] == {"a": 1, "b": [1, 2]} and back.attrs["name"] == "x"
    np.testing.assert_allclose(back.z_mm(), 3.0 + 0.05 * np.arange(6))
    np.testing.assert_allclose(back.x_mm(), -7.05 + 0.1 * np.arange(9))
    with h5py.File(path) as fh:  # the raw layout is the contract
        assert fh["iq"].dtype == np.complex64 and fh["iq"].shape == (20, 6, 9)
        np.testing.assert_array_equal(fh.attrs["pixel_size_mm"], PIX)
        np.testing.assert_array_equal(fh.attrs["origin_mm"], ORIGIN)
        assert fh["gt_positions"].dtype == np.float64
        assert fh["iq"].chunks[1:] == (6, 9)  # chunked along T only


def test_bmode_round_trip_with_three_column_truth(tmp_path):
    bmode = np.random.default_rng(1).random((5, 4, 7)).astype(np.float64)
    acq = Acquisition(bmode=bmode, pixel_size_mm=PIX, origin_mm=ORIGIN, frame_rate_hz=500, wavelength_mm=0.2,
                      gt_positions=np.array([[1, 3.0, -7.0], [4, 3.1, -6.9]]))
    assert acq.bmode.dtype == np.float32
    back = read_acquisition(write_acquisition(acq, tmp_path / "b.h5"))
    assert back.kind == "bmode" and back.iq is None
    np.testing.assert_array_equal(back.bmode, bmode.astype(np.float32))
    assert back.gt_positions.shape == (2, 3)


def test_complex128_is_converted_and_truth_can_be_removed(tmp_path):
    acq = _acq(iq=np.ones((3, 4, 5), np.complex128), gt_positions=None)
    assert acq.iq.dtype == np.complex64
    assert _acq().without_truth().gt_positions is None
    full = _acq()
    assert full.without_truth().attrs == full.attrs and full.gt_positions is not None


def test_frame_slice_restricts_and_renumbers_truth(tmp_path):
    acq = _acq()
    path = write_acquisition(acq, tmp_path / "a.h5")
    part = read_acquisition(path, frames=slice(10, 20))
    np.testing.assert_array_equal(part.iq, acq.iq[10:20])
    np.testing.assert_array_equal(part.gt_positions, [[9, 3.15, -6.5, 5]])
    assert read_acquisition(path, truth=False).gt_positions is None
    np.testing.assert_array_equal(read_gt_positions(path), acq.gt_positions)


@pytest.mark.parametrize("block,overlap", [(7, 0), (7, 3), (20, 0), (64, 5), (1, 0)])
def test_iter_blocks_reassembles_the_whole_array(tmp_path, block, overlap):
    acq = _acq(T=20)
    path = write_acquisition(acq, tmp_path / "a.h5")
    blocks = list(iter_blocks(path, block_frames=block, overlap=overlap))
    starts = [s for s, _ in blocks]
    assert starts == list(range(0, 20, block - overlap))[: len(starts)]
    for s, b in blocks:
        assert b.dtype == np.complex64 and b.shape[0] == min(block, 20 - s)
        np.testing.assert_array_equal(b, acq.iq[s:s + b.shape[0]])
    assert blocks[-1][0] + blocks[-1][1].shape[0] == 20
    stride = block - overlap
    rebuilt = np.concatenate([blocks[0][1]] + [b[overlap:] for _, b in blocks[1:]])
    np.testing.assert_array_equal(rebuilt, acq.iq)
    assert all(starts[i + 1] - starts[i] == stride for i in range(len(starts) - 1))


def test_iter_blocks_rejects_bad_block_sizes(tmp_path):
    path = write_acquisition(_acq(), tmp_path / "a.h5")
    with pytest.raises(InputError, match="block_frames"):
        next(iter_blocks(path, block_frames=0))
    with pytest.raises(InputError, match="overlap"):
        next(iter_blocks(path, block_frames=4, overlap=4))


def test_acquisition_info_reads_no_frames(tmp_path, small_acquisition_file, small_acquisition):
    info = acquisition_info(small_acquisition_file)
    assert info.kind == "iq" and info.shape == small_acquisition.shape and info.dtype == np.complex64
    assert info.pixel_size_mm == small_acquisition.pixel_size_mm
    assert info.n_gt_positions == small_acquisition.gt_positions.shape[0]
    assert info.attrs["ulm_sim_version"] == small_acquisition.attrs["ulm_sim_version"]


def test_simulated_file_blocks_equal_whole(small_acquisition_file, small_acquisition):
    got = np.concatenate([b for _, b in iter_blocks(small_acquisition_file, block_frames=64)])
    np.testing.assert_array_equal(got, small_acquisition.iq)


@pytest.mark.parametrize(
    "datasets,attrs,match",
    [
        ({"iq": np.zeros((2, 3, 4), np.int16)}, GOOD_ATTRS, r"'iq' must be complex64.*int16"),
        ({"iq": np.zeros((3, 4), np.complex64)}, GOOD_ATTRS, r"'iq' must be 3-D \[T, Z, X\]"),
        ({"bmode": np.zeros((2, 3, 4), np.complex64)}, GOOD_ATTRS, r"'bmode' must be real"),
        ({"iq": np.zeros((2, 3, 4), np.complex64), "bmode": np.zeros((2, 3, 4), np.float32)}, GOOD_ATTRS,
         "found both"),
        ({"frames": np.zeros((2, 3, 4), np.float32)}, GOOD_ATTRS, "found neither"),
        ({"iq": np.zeros((2, 3, 4), np.complex64)}, {k: v for k, v in GOOD_ATTRS.items() if k != "pixel_size_mm"},
         "missing 'pixel_size_mm'"),
        ({"iq": np.zeros((2, 3, 4), np.complex64)}, {**GOOD_ATTRS, "pixel_size_mm": np.array([0.1, -0.1])},
         "'pixel_size_mm' must be two positive"),
        ({"iq": np.zeros((2, 3, 4), np.complex64)}, {**GOOD_ATTRS, "origin_mm": np.array([0.0, np.nan])},
         "'origin_mm' must be two finite"),
        ({"iq": np.zeros((2, 3, 4), np.complex64)}, {**GOOD_ATTRS, "origin_mm": np.array([0.0, 1.0, 2.0])},
         "'origin_mm' must be two finite"),
        ({"iq": np.zeros((2, 3, 4), np.complex64)}, {k: v for k, v in GOOD_ATTRS.items() if k != "wavelength_mm"},
         "missing 'wavelength_mm'"),
        ({"iq": np.zeros((2, 3, 4), np.complex64), "gt_positions": np.zeros((4, 2))}, GOOD_ATTRS,
         r"'gt_positions' must be \[K, 4\]"),
        ({"iq": np.zeros((2, 3, 4), np.complex64), "gt_positions": np.array([[5.0, 0, 0, 1]])}, GOOD_ATTRS,
         r"integer frame indices in \[0, 2\)"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, datasets, attrs, match):
    path = _raw_file(tmp_path / "bad.h5", **datasets, attrs=attrs)
    with pytest.raises(InputError, match=match) as err:
        read_acquisition(path)
    assert "bad.h5" in str(err.value)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_acquisition(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(InputError, match="not an HDF5 file"):
        acquisition_info(tmp_path / "text.h5")


def test_failed_write_leaves_nothing(tmp_path):
    acq = _acq(attrs={"bad": object()})
    with pytest.raises(InputError, match="attribute 'bad'"):
        write_acquisition(acq, tmp_path / "out.h5")
    assert list(tmp_path.iterdir()) == []
    assert not any(is_partial(p) for p in tmp_path.iterdir())


def test_contract_clash_and_constructor_errors():
    with pytest.raises(InputError, match="clashes"):
        _acq(attrs={"pixel_size_mm": 1})
    with pytest.raises(InputError, match="exactly one of 'iq'"):
        Acquisition(pixel_size_mm=PIX, origin_mm=ORIGIN, frame_rate_hz=1, wavelength_mm=1)
    with pytest.raises(InputError, match="'iq' must be complex64"):
        _acq(iq=np.zeros((2, 3, 4), np.float32))


def test_result_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    loc = np.column_stack([np.arange(6), rng.random(6) + 3, rng.random(6) - 7, rng.random(6), [0, 0, 1, 1, -1, 2]])
    dens = rng.random((30, 50)).astype(np.float32)
    res = UlmResult(localizations=loc, density=dens, direction=-dens, velocity_mm_s=dens * 10,
                    pixel_size_mm=(0.005, 0.01), origin_mm=(3.0, -7.0), attrs={"method": "rs", "res": 10})
    back = read_result(write_result(res, tmp_path / "r.h5"))
    np.testing.assert_array_equal(back.localizations, loc)
    np.testing.assert_array_equal(back.density, dens)
    np.testing.assert_array_equal(back.direction, -dens)
    assert back.velocity_mm_s.dtype == np.float32
    assert back.pixel_size_mm == (0.005, 0.01) and back.origin_mm == (3.0, -7.0)
    assert back.attrs == {"method": "rs", "res": 10}
    only = read_result(write_result(UlmResult(localizations=np.zeros((0, 5))), tmp_path / "e.h5"))
    assert only.localizations.shape == (0, 5) and only.density is None
    assert back.count_per_frame is None and only.count_per_frame is None
    counted = read_result(write_result(UlmResult(localizations=loc, count_per_frame=np.array([2, 0, 1, 3, 1, 5, 0])),
                                       tmp_path / "c.h5"))
    assert counted.count_per_frame.dtype == np.int32 and counted.count_per_frame.tolist() == [2, 0, 1, 3, 1, 5, 0]


def test_bad_results():
    loc = np.array([[4, 1, 1, 1, -1]])
    for bad in (np.array([1.5] * 5), np.array([-1] * 5), np.zeros((5, 1), int), np.zeros(4, int)):
        with pytest.raises(InputError, match="count_per_frame"):
            UlmResult(localizations=loc, count_per_frame=bad)
    with pytest.raises(InputError, match=r"\[K, 5\]"):
        UlmResult(localizations=np.zeros((3, 4)))
    with pytest.raises(InputError, match="track ids"):
        UlmResult(localizations=np.array([[0, 1, 1, 1, -2]]))
    with pytest.raises(InputError, match="missing 'pixel_size_mm'"):
        UlmResult(localizations=np.zeros((0, 5)), density=np.zeros((4, 4)))
    with pytest.raises(InputError, match="has shape"):
        UlmResult(localizations=np.zeros((0, 5)), density=np.zeros((4, 4)), direction=np.zeros((4, 5)),
                  pixel_size_mm=(1, 1), origin_mm=(0, 0))


# -- PALA .mat ------------------------------------------------------------------------------------

LAM = 0.09856


def _pala_arrays(Z=6, X=9, T=4):
    rng = np.random.default_rng(5)
    iq = rng.standard_normal((Z, X, T)) + 1j * rng.standard_normal((Z, X, T))  # MATLAB order [Z, X, T]
    listpos = rng.random((3, 3, T)) * 5  # [N, (x, y, z), T] in wavelengths
    listpos[1, :, 2] = np.nan  # bubble 1 absent from frame 2
    pdata = {"PDelta": np.array([[1.0, 0.0, 0.5]]), "Origin": np.array([[-4.0, 0.0, 20.0]]),
             "Size": np.array([[Z, X, 1]])}
    uf = {"Lambda": np.array([[LAM]]), "FrameRateUF": np.array([[1000.0]])}
    return iq, listpos, pdata, uf


def _check_pala(acq, iq, listpos):
    Z, X, T = iq.shape
    assert acq.shape == (T, Z, X)
    np.testing.assert_allclose(acq.iq[2, 4, 7], iq[4, 7, 2], rtol=1e-6)
    np.testing.assert_allclose(acq.iq, np.moveaxis(iq, 2, 0).astype(np.complex64))
    np.testing.assert_allclose(acq.pixel_size_mm, (0.5 * LAM, 1.0 * LAM))
    np.testing.assert_allclose(acq.origin_mm, (20.0 * LAM, -4.0 * LAM))
    assert acq.wavelength_mm == pytest.approx(LAM) and acq.frame_rate_hz == 1000.0
    gt = acq.gt_positions
    assert gt.shape == (3 * T - 1, 4)
    row = gt[(gt[:, 0] == 3) & (gt[:, 3] == 2)][0]
    np.testing.assert_allclose(row[1:3], (listpos[2, 2, 3] * LAM, listpos[2, 0, 3] * LAM))
    assert not np.any((gt[:, 0] == 2) & (gt[:, 3] == 1))


def test_pala_v5_with_sequence_file_one_folder_up(tmp_path):
    iq, listpos, pdata, uf = _pala_arrays()
    (tmp_path / "IQ").mkdir()
    scipy.io.savemat(tmp_path / "IQ" / "PALA_InSilicoFlow_IQ001.mat", {"IQ": iq, "ListPos": listpos})
    scipy.io.savemat(tmp_path / "PALA_InSilicoFlow_sequence.mat", {"PData": pdata, "UF": uf})
    acq = read_pala_mat(tmp_path / "IQ" / "PALA_InSilicoFlow_IQ001.mat")
    _check_pala(acq, iq, listpos)
    # ... and written through the contract unchanged.
    back = read_acquisition(write_acquisition(acq, tmp_path / "acq.h5"))
    np.testing.assert_array_equal(back.iq, acq.iq)


def test_pala_v5_wavelength_from_probe_and_frame_rate_from_p(tmp_path):
    iq, listpos, pdata, _ = _pala_arrays()
    scipy.io.savemat(tmp_path / "x_IQ001.mat", {
        "IQ": iq, "PData": pdata, "P": {"FrameRate": 500.0},
        "Trans": {"frequency": 15.625}, "Resource": {"Parameters": {"speedOfSound": 1540.0}}})
    acq = read_pala_mat(tmp_path / "x_IQ001.mat")
    assert acq.wavelength_mm == pytest.approx(LAM) and acq.frame_rate_hz == 500.0 and acq.gt_positions is None


def _write_v73(path, variables):
    """A MATLAB v7.3 file as MATLAB lays it out: HDF5 with a 512-byte header, transposed arrays,
    complex as (real, imag) compounds, structs as groups."""
    with h5py.File(path, "w", userblock_size=512) as fh:
        def put(group, name, value):
            if isinstance(value, dict):
                g = group.create_group(name)
                g.attrs["MATLAB_class"] = np.bytes_("struct")
                for k, v in value.items():
                    put(g, k, v)
                return
            a = np.asarray(value)
            a = a.reshape(1, 1) if a.ndim == 0 else a
            t = a.T
            if np.iscomplexobj(t):
                rec = np.empty(t.shape, dtype=[("real", "<f8"), ("imag", "<f8")])
                rec["real"], rec["imag"] = t.real, t.imag
                t = rec
            ds = group.create_dataset(name, data=t)
            ds.attrs["MATLAB_class"] = np.bytes_("double")
        for k, v in variables.items():
            put(fh, k, v)
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")


def test_pala_v73(tmp_path):
    iq, listpos, pdata, uf = _pala_arrays()
    _write_v73(tmp_path / "PALA_InVivo_IQ001.mat", {"IQ": iq, "ListPos": listpos, "PData": pdata, "UF": uf})
    with h5py.File(tmp_path / "PALA_InVivo_IQ001.mat") as fh:
        assert fh["IQ"].shape == (4, 9, 6)  # transposed on disk, as MATLAB writes it
    _check_pala(read_pala_mat(tmp_path / "PALA_InVivo_IQ001.mat"), iq, listpos)


def test_pala_errors(tmp_path):
    iq, *_ = _pala_arrays()
    scipy.io.savemat(tmp_path / "lonely_IQ001.mat", {"IQ": iq})
    with pytest.raises(InputError, match="PData.PDelta"):
        read_pala_mat(tmp_path / "lonely_IQ001.mat")
    scipy.io.savemat(tmp_path / "real.mat", {"IQ": iq.real})
    with pytest.raises(InputError, match="must be complex"):
        read_pala_mat(tmp_path / "real.mat")
    scipy.io.savemat(tmp_path / "noiq.mat", {"B": np.zeros(3)})
    with pytest.raises(InputError, match="no variable 'IQ'"):
        read_pala_mat(tmp_path / "noiq.mat")
    with pytest.raises(InputError, match="not found"):
        read_pala_mat(tmp_path / "missing.mat")
