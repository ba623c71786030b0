"""The sweep file contract: round trip of every field, clear errors on bad files, atomic writes."""

import h5py
import numpy as np
import pytest

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.io.sweep import Sweep, read_sweep, write_sweep


def _rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def make_sweep(n=5, m=3, h=7, w=9):
    rng = np.random.default_rng(1)
    tforms = np.repeat(np.eye(4)[None], n, axis=0)
    for i in range(n):
        tforms[i, :3, :3] = _rot_z(0.1 * i)
        tforms[i, :3, 3] = [1.0 * i, -2.0, 0.5 * i]
    return Sweep(
        frames=rng.integers(0, 256, (n, h, w), dtype=np.uint8),
        pixel_spacing_xy=(0.15, 0.2),
        tforms=tforms,
        timestamps_s=np.arange(n) / 20.0 + 3.0,
        frame_rate_hz=20.0,
        imu_acc=(rng.normal(size=(m, n, 3)) + [0.0, -9.81, 0.0]).astype(np.float32),  # about 1 g, as the contract
        imu_euler_deg=rng.normal(size=(m, n, 3)).astype(np.float32),
        imu_position_mm=rng.normal(size=(m, 3)),
        imu_weights=rng.random((n - 1, m)).astype(np.float32),
        attrs={"simulator_version": "freehand-sim-1", "seed": 7, "sigma_e_mm": 0.6, "tactic": "loop",
               "extra": {"a": [1, 2]}, "vec": [1.0, 2.0]},
    )


def test_round_trip_every_field(tmp_path):
    s = make_sweep()
    path = write_sweep(s, tmp_path / "s.h5")
    r = read_sweep(path)
    assert r.frames.dtype == np.uint8 and np.array_equal(r.frames, s.frames)
    assert r.pixel_spacing_xy == (0.15, 0.2)  # x (column) spacing first
    for key in ("tforms", "timestamps_s", "imu_acc", "imu_euler_deg", "imu_position_mm", "imu_weights"):
        a, b = getattr(r, key), getattr(s, key)
        assert a.dtype == b.dtype and np.array_equal(a, b), key
    assert r.tforms.dtype == np.float64 and r.imu_acc.dtype == np.float32
    assert r.frame_rate_hz == 20.0
    assert r.attrs["simulator_version"] == "freehand-sim-1" and r.attrs["seed"] == 7
    assert r.attrs["tactic"] == "loop" and r.attrs["extra"] == {"a": [1, 2]}
    assert np.allclose(r.attrs["vec"], [1.0, 2.0]) and r.attrs["sigma_e_mm"] == 0.6
    with h5py.File(path, "r") as fh:  # the on-disk layout is the contract's
        assert fh["frames"].shape == (5, 7, 9) and fh["frames"].compression == "gzip"
        assert list(fh.attrs["pixel_spacing_mm"]) == [0.15, 0.2]
        assert fh.attrs["imu_position_mm"].shape == (3, 3)


def test_minimal_sweep_and_without_truth(tmp_path):
    s = make_sweep()
    t = s.without_truth()
    assert t.tforms is None and s.tforms is not None and np.array_equal(t.frames, s.frames)
    minimal = Sweep(frames=s.frames, pixel_spacing_xy=(0.3, 0.1))
    r = read_sweep(write_sweep(minimal, tmp_path / "m.h5"))
    assert r.tforms is None and r.timestamps_s is None and r.imu_acc is None and r.frame_rate_hz is None
    assert r.pixel_spacing_xy == (0.3, 0.1)
    with pytest.raises(InputError, match="timestamps_s"):
        r.times_s()
    assert np.allclose(make_sweep().times_s(), np.arange(5) / 20.0 + 3.0)


def _write_raw(path, **datasets):
    attrs = datasets.pop("attrs", {"pixel_spacing_mm": [0.2, 0.1]})
    with h5py.File(path, "w") as fh:
        for k, v in datasets.items():
            fh.create_dataset(k, data=v)
        for k, v in attrs.items():
            fh.attrs[k] = v
    return path


FR = np.zeros((4, 5, 6), np.uint8)


@pytest.mark.parametrize(
    "datasets, match",
    [
        (dict(tforms=np.repeat(np.eye(4)[None], 4, 0)), "frames"),
        (dict(frames=FR.astype(np.float32)), "uint8"),
        (dict(frames=np.zeros((4, 5), np.uint8)), "3-D"),
        (dict(frames=FR[:1]), "at least 2"),
        (dict(frames=FR, attrs={}), "pixel_spacing_mm"),
        (dict(frames=FR, attrs={"pixel_spacing_mm": [0.1, -0.2]}), "pixel_spacing_mm"),
        (dict(frames=FR, attrs={"pixel_spacing_mm": [0.1]}), "pixel_spacing_mm"),
        (dict(frames=FR, attrs={"pixel_spacing_mm": [0.0003, 0.0003]}), "pixel_spacing_mm.*millimetres"),  # metres
        (dict(frames=FR, attrs={"pixel_spacing_mm": [150.0, 150.0]}), "pixel_spacing_mm.*millimetres"),  # micrometres
        (dict(frames=FR, tforms=np.repeat(np.eye(4)[None], 3, 0)), "3 matrices for 4 frames"),
        (dict(frames=FR, tforms=np.full((4, 4, 4), np.nan)), "NaN"),
        (dict(frames=FR, tforms=np.repeat(np.diag([2.0, 1, 1, 1])[None], 4, 0)), "rigid"),
        (dict(frames=FR, tforms=np.repeat(np.diag([-1.0, 1, 1, 1])[None], 4, 0)), "rigid"),
        (dict(frames=FR, imu_acc=np.zeros((2, 4, 3), np.float32)), "frame_rate_hz"),
        (dict(frames=FR, timestamps_s=np.arange(4.0), imu_acc=np.zeros((2, 3, 3), np.float32)), "imu_acc"),
        (dict(frames=FR, timestamps_s=np.arange(4.0), imu_euler_deg=np.zeros((2, 4, 2), np.float32)), "imu_euler_deg"),
        (dict(frames=FR, timestamps_s=np.arange(4.0), imu_acc=np.zeros((2, 4, 3), np.float32),
              imu_euler_deg=np.zeros((3, 4, 3), np.float32)), "IMUs"),
        (dict(frames=FR, timestamps_s=np.array([0.0, 0.1, 0.1, 0.2])), "increase"),
        (dict(frames=FR, timestamps_s=np.arange(3.0)), "timestamps_s"),
        # a unit slip would silently rescale time for every IMU and smoothing step: milliseconds, a period for a rate
        (dict(frames=FR, timestamps_s=np.arange(4.0) * 50.0), "timestamps_s.*seconds"),
        (dict(frames=FR, attrs={"pixel_spacing_mm": [0.1, 0.1], "frame_rate_hz": 0.05}), "frame_rate_hz.*Hz"),
        # specific force in g, or with gravity removed: every IMU consumer would integrate nonsense
        (dict(frames=FR, timestamps_s=np.arange(4.0), imu_acc=np.tile(np.float32([0, 0, 1.0]), (2, 4, 1))),
         "imu_acc.*m/s"),
        (dict(frames=FR, timestamps_s=np.arange(4.0), imu_acc=np.zeros((2, 4, 3), np.float32)), "imu_acc.*gravity"),
        (dict(frames=FR, imu_weights=np.zeros((4, 2), np.float32)), "imu_weights"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, datasets, match):
    path = _write_raw(tmp_path / "bad.h5", **datasets)
    with pytest.raises(InputError, match=match) as info:
        read_sweep(path)
    assert "bad.h5" in str(info.value)  # the message names the file


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_sweep(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(InputError, match="not an HDF5"):
        read_sweep(tmp_path / "text.h5")


def test_failed_write_leaves_nothing(tmp_path):
    bad = make_sweep()
    bad.tforms[2, 0, 0] = np.nan
    with pytest.raises(InputError, match="tforms"):
        write_sweep(bad, tmp_path / "out.h5")
    bad = make_sweep()
    bad.attrs["obj"] = object()  # fails half-way through writing the attributes
    with pytest.raises(InputError, match="obj"):
        write_sweep(bad, tmp_path / "out.h5")
    assert list(tmp_path.iterdir()) == []
    good = write_sweep(make_sweep(), tmp_path / "out.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"] and not is_partial(good)


def test_write_is_byte_identical(tmp_path):
    a = write_sweep(make_sweep(), tmp_path / "a.h5").read_bytes()
    b = write_sweep(make_sweep(), tmp_path / "b.h5").read_bytes()
    assert a == b
