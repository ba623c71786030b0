"""Bad acquisitions and options in `ulm process`: exit 2 with a message naming the input and the option,
and no result file (or partial file) left behind."""

import h5py
import numpy as np
import pytest

from ultrasound_ai.cli import main
from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.pipeline import UlmParams, process_acquisition

_ATTRS = dict(pixel_size_mm=[0.1, 0.1], origin_mm=[0.0, 0.0], frame_rate_hz=1000.0, wavelength_mm=0.1)


def _acq_file(path, data):
    with h5py.File(path, "w") as f:
        f.create_dataset("iq", data=data)
        for k, v in _ATTRS.items():
            f.attrs[k] = v
    return path


def _noise(t=30, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, 16, 18)) + 1j * rng.standard_normal((t, 16, 18))).astype(np.complex64)


def _run(tmp_path, data, *extra):
    path = _acq_file(tmp_path / "acq.h5", data)
    out = tmp_path / "out.h5"
    code = main(["ulm", "process", str(path), "--out", str(out), "--quiet", "--bubbles-per-frame", "3", *extra])
    return code, path, out


def _nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if is_partial(p)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_iq_is_named(tmp_path, capsys, bad):
    data = _noise()
    data[17, 3, 4] = bad
    code, path, out = _run(tmp_path, data)
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and "NaN or infinite" in err and "frame 17" in err
    _nothing_written(tmp_path, out)


def test_all_zero_acquisition_is_refused(tmp_path, capsys):
    code, path, out = _run(tmp_path, np.zeros((30, 16, 18), np.complex64))
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "all zero" in err
    _nothing_written(tmp_path, out)
    # The same without the SVD filter (the zero check is not the filter's).
    code, path, out = _run(tmp_path, np.zeros((30, 16, 18), np.complex64), "--svd-cutoff", "0")
    assert code == 2 and "all zero" in capsys.readouterr().err


def test_fewer_frames_than_the_svd_cut_names_the_option(tmp_path, capsys):
    code, path, out = _run(tmp_path, _noise(t=4), "--svd-cutoff", "4")
    err = capsys.readouterr().err
    assert code == 2
    assert "--svd-cutoff" in err and str(path) in err and "4 frames" in err and "band [" not in err
    _nothing_written(tmp_path, out)
    # One frame more is enough (one component kept).
    code, _, out = _run(tmp_path, _noise(t=5), "--svd-cutoff", "4", "--min-track-length", "1")
    assert code == 0 and out.exists()


def test_negative_svd_cutoff_is_refused(tmp_path, capsys):
    code, path, out = _run(tmp_path, _noise(), "--svd-cutoff", "-2")
    err = capsys.readouterr().err
    assert code == 2 and "--svd-cutoff" in err and "-2" in err
    _nothing_written(tmp_path, out)
    with pytest.raises(InputError, match="svd cutoff"):
        UlmParams(svd_cutoff=-1).validate()
    with pytest.raises(InputError, match="svd cutoff"):
        UlmParams(svd_cutoff=(-1, 5)).validate()


def test_in_memory_acquisition_messages(tmp_path):
    from ultrasound_ai.io.ulm_files import Acquisition

    data = _noise()
    data[2] = np.nan
    acq = Acquisition(iq=data, pixel_size_mm=(0.1, 0.1), origin_mm=(0.0, 0.0), frame_rate_hz=1000.0, wavelength_mm=0.1)
    with pytest.raises(InputError, match="frame 2.*NaN or infinite"):
        process_acquisition(acq, "rs", dict(bubbles_per_frame=3))
