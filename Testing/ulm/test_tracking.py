"""Hungarian linking with a maximum distance, gap closing, minimum length; smoothing, velocities, interpolation."""

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.tracking import (
    Tracker,
    interpolate_tracks,
    link,
    postprocess_tracks,
    smooth_tracks,
    track_velocities,
)


def _line(frames, z0, x0, dz, dx):
    f = np.asarray(frames, dtype=float)
    return np.column_stack([f, z0 + dz * (f - f[0]), x0 + dx * (f - f[0])])


def _ids_of(ids, rows):
    return set(ids[rows].tolist())


def test_two_parallel_tracks_are_linked_separately():
    a = _line(range(20), 10, 10, 0.5, 0.1)
    b = _line(range(20), 10, 14, 0.5, -0.05)  # 4 px apart at the start, 1.15 px at the end: no crossing
    perm = np.random.default_rng(0).permutation(40)
    locs = np.concatenate([a, b])[perm]
    in_a = perm < 20
    ids = link(locs, max_link_distance=1.0, min_length=5)
    assert len(set(ids[in_a].tolist())) == 1 and len(set(ids[~in_a].tolist())) == 1
    assert set(ids[in_a].tolist()) != set(ids[~in_a].tolist())
    assert (ids >= 0).all()


def test_hungarian_prefers_the_global_assignment():
    # Frame 1: detection p is nearest to track A, but giving it to B leaves A its own close detection.
    locs = np.array([[0, 0.0, 0.0], [0, 0.0, 1.6],      # A at x=0, B at x=1.6
                     [1, 0.0, 0.9], [1, 0.0, -0.5]])     # p (0.9 from A, 0.7 from B), q (0.5 from A)
    ids = link(locs, max_link_distance=1.0, min_length=1)
    assert ids[2] == ids[1] and ids[3] == ids[0]


def test_gap_closing():
    track = _line([0, 1, 2, 3, 4, 6, 7, 8, 9], 5, 5, 0.3, 0.0)  # frame 5 missing
    ids0 = link(track, max_link_distance=1.0, max_gap=0, min_length=1)
    assert len(set(ids0.tolist())) == 2
    ids1 = link(track, max_link_distance=1.0, max_gap=1, min_length=1)
    assert len(set(ids1.tolist())) == 1


def test_short_and_far_tracks_removed():
    long = _line(range(30), 10, 10, 0.2, 0.2)
    spurious = np.array([[3, 40.0, 40.0], [4, 40.2, 40.1], [20, 60.0, 5.0]])
    jumpy = np.array([[10, 80.0, 80.0], [11, 83.0, 80.0], [12, 86.0, 80.0]])  # steps beyond the link distance
    locs = np.concatenate([long, spurious, jumpy])
    ids = link(locs, max_link_distance=1.0, min_length=5)
    assert len(set(ids[:30].tolist())) == 1 and ids[0] >= 0
    assert (ids[30:] == -1).all()


def test_streaming_in_blocks_equals_one_pass():
    rng = np.random.default_rng(1)
    tracks = [_line(range(s, s + 25), rng.uniform(0, 50), rng.uniform(0, 50), *rng.uniform(-0.5, 0.5, 2))
              for s in rng.integers(0, 40, 12)]
    locs = np.concatenate(tracks)
    locs = locs[np.argsort(locs[:, 0], kind="stable")]
    one = link(locs, 1.0, 0, 3)
    tr = Tracker(1.0, 0, 3)
    closed = []
    for lo, hi in [(0, 17), (17, 33), (33, 70)]:
        sel = np.flatnonzero((locs[:, 0] >= lo) & (locs[:, 0] < hi))
        closed += tr.add_points(locs[sel, 0], locs[sel, 1:3], sel)
    closed += tr.finish()
    streamed = np.full(len(locs), -1)
    for k, m in enumerate(closed):
        streamed[m] = k
    # Same partition of the points into tracks (ids are numbered in closing order in both).
    assert sorted(map(tuple, (np.flatnonzero(one == k) for k in set(one.tolist()) if k >= 0))) == \
        sorted(map(tuple, (np.flatnonzero(streamed == k) for k in set(streamed.tolist()) if k >= 0)))


def test_frames_must_increase():
    tr = Tracker(1.0)
    tr.add_frame(5, np.zeros((1, 2)), [0])
    with pytest.raises(InputError, match="increasing"):
        tr.add_frame(5, np.zeros((1, 2)), [1])
    with pytest.raises(InputError, match="max_link_distance"):
        Tracker(0.0)


def test_moving_average_smoothing():
    tid = np.zeros(5, int)
    np.testing.assert_allclose(smooth_tracks(tid, np.array([0, 0, 3, 0, 0.0]), 3), [0, 1, 1, 1, 0])
    # Window shrinks symmetrically at the ends: end points unchanged, linear data unchanged.
    lin = np.arange(10.0) * 0.3
    np.testing.assert_allclose(smooth_tracks(np.zeros(10, int), lin, 5), lin)
    # Two tracks are smoothed independently.
    vals = np.array([0, 0, 9, 0, 0, 100, 100, 100.0])
    out = smooth_tracks(np.array([0, 0, 0, 0, 0, 1, 1, 1]), vals, 3)
    np.testing.assert_allclose(out, [0, 3, 3, 3, 0, 100, 100, 100])


def test_velocities_in_mm_per_s():
    f = np.arange(6.0)
    pos = np.column_stack([0.01 * f, -0.02 * f])  # mm per frame
    v = track_velocities(np.zeros(6, int), f, pos, frame_rate_hz=1000.0)
    np.testing.assert_allclose(v, np.tile([10.0, -20.0], (6, 1)))


def test_interpolation_steps_and_end_points():
    tid = np.array([0, 0, 0, 1, 1])
    frame = np.array([0, 1, 2, 0, 1.0])
    z = np.array([0.0, 0.1, 0.1, 5.0, 5.0])
    x = np.array([0.0, 0.0, 0.25, 5.0, 5.05])
    fine = interpolate_tracks(tid, frame, z, x, np.zeros(5), np.zeros(5), max_step_mm=0.03)
    steps = np.hypot(np.diff(fine.z), np.diff(fine.x))[np.diff(fine.track_id) == 0]
    assert steps.max() <= 0.03 + 1e-12
    assert len(fine) == 1 + 4 + 9 + 1 + 2  # ceil(0.1/0.03)=4, ceil(0.25/0.03)=9, ceil(0.05/0.03)=2
    for k in (0, 1):
        m = fine.track_id == k
        sel = tid == k
        assert (fine.z[m][[0, -1]] == z[sel][[0, -1]]).all() and (fine.x[m][[0, -1]] == x[sel][[0, -1]]).all()


def test_postprocess_velocity_of_straight_track():
    t = _line(range(10), 1.0, 2.0, 0.05, 0.0)  # 0.05 mm per frame downwards
    fine = postprocess_tracks([t], [7], frame_rate_hz=500.0, smooth_window=5, max_step_mm=0.01)
    assert set(fine.track_id.tolist()) == {7}
    np.testing.assert_allclose(fine.vz, 25.0)
    np.testing.assert_allclose(fine.speed, 25.0)
