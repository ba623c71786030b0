"""ULM tracking: frame-to-frame Hungarian linking, gap closing, track filtering, smoothing, fine
interpolation and velocities.

Linking (`Tracker`) is incremental: frames are pushed in increasing order, block after block, and
the tracks still open at the end of a block simply continue into the next one, so block boundaries
of a streamed acquisition do not cut tracks. A track that has not been extended for more than
`max_gap` frames is closed and emitted (when it has at least `min_length` points).

Per frame, the open tracks' last positions and the frame's detections are assigned by
`scipy.optimize.linear_sum_assignment` on Euclidean distances; pairs farther than
`max_link_distance` are forbidden. With `max_gap` = g > 0 a track that missed up to g frames still
competes for detections (gap closing).

Post-processing works on many tracks at once (concatenated arrays with segment boundaries):
moving-average smoothing with a window that shrinks symmetrically at the track ends (as MATLAB's
`smooth(..., 'moving')`), velocities by central differences of the smoothed positions over time
(mm/s), and linear interpolation between consecutive points in steps no longer than `max_step_mm`
(for rendering on a fine grid without holes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ultrasound_ai.core.errors import InputError

__all__ = ["Tracker", "link", "FineTracks", "smooth_tracks", "track_velocities", "interpolate_tracks",
           "postprocess_tracks"]

_FORBIDDEN = 1e12


class Tracker:
    """Incremental frame-to-frame linker. Feed frames in increasing order; collect emitted tracks.

    Each emitted track is an int64 array of the caller's point indices, in frame order.
    """

    def __init__(self, max_link_distance: float = 2.0, max_gap: int = 0, min_length: int = 2):
        if not np.isfinite(max_link_distance) or max_link_distance <= 0:
            raise InputError(f"max_link_distance: expected a positive distance, got {max_link_distance!r}")
        if int(max_gap) < 0:
            raise InputError(f"max_gap: expected a number of frames >= 0, got {max_gap!r}")
        if int(min_length) < 1:
            raise InputError(f"min_length: expected a number of points >= 1, got {min_length!r}")
        self.max_link_distance = float(max_link_distance)
        self.max_gap = int(max_gap)
        self.min_length = int(min_length)
        self._pos = np.zeros((0, 2))
        self._last = np.zeros(0, dtype=np.int64)
        self._members: list[list[int]] = []
        self._last_frame: int | None = None

    def _close(self, keep_mask: np.ndarray, out: list[np.ndarray]) -> None:
        for i in np.flatnonzero(~keep_mask):
            if len(self._members[i]) >= self.min_length:
                out.append(np.asarray(self._members[i], dtype=np.int64))
        self._pos = self._pos[keep_mask]
        self._last = self._last[keep_mask]
        self._members = [m for m, k in zip(self._members, keep_mask.tolist()) if k]

    def add_frame(self, frame: int, positions: np.ndarray, indices: np.ndarray) -> list[np.ndarray]:
        """Link the detections of one frame (positions [n, 2], caller indices [n]); return closed tracks."""
        frame = int(frame)
        if self._last_frame is not None and frame <= self._last_frame:
            raise InputError(f"tracking: frames must be pushed in increasing order, got {frame} after {self._last_frame}")
        self._last_frame = frame
        out: list[np.ndarray] = []
        alive = self._last >= frame - 1 - self.max_gap
        if not alive.all():
            self._close(alive, out)
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = pos.shape[0]
        taken = np.zeros(n, dtype=bool)
        if n and self._pos.shape[0]:
            # Per axis: a reduction over a trailing axis of 2 is slow in numpy (the same sums, bit for bit).
            dz = self._pos[:, 0, None] - pos[None, :, 0]
            dx = self._pos[:, 1, None] - pos[None, :, 1]
            d = np.sqrt(dz * dz + dx * dx)
            ok = d <= self.max_link_distance
            rows = np.flatnonzero(ok.any(1))
            if rows.size:
                cols = np.flatnonzero(ok[rows].any(0))
                sub = np.where(ok[np.ix_(rows, cols)], d[np.ix_(rows, cols)], _FORBIDDEN)
                r, c = linear_sum_assignment(sub)
                good = sub[r, c] < _FORBIDDEN
                trs, dets = rows[r[good]], cols[c[good]]
                # Whole arrays at once (per-element numpy indexing was a third of the tracking time).
                self._pos[trs] = pos[dets]
                self._last[trs] = frame
                taken[dets] = True
                for tr, point in zip(trs.tolist(), idx[dets].tolist()):
                    self._members[tr].append(point)
        new = np.flatnonzero(~taken)
        if new.size:
            self._pos = np.concatenate([self._pos, pos[new]])
            self._last = np.concatenate([self._last, np.full(new.size, frame, dtype=np.int64)])
            self._members.extend([[j] for j in idx[new].tolist()])
        return out

    def add_points(self, frames: np.ndarray, positions: np.ndarray, indices: np.ndarray | None = None) -> list[np.ndarray]:
        """Push many points (any frame order within the batch, frames after those already pushed)."""
        frames = np.asarray(frames).astype(np.int64).reshape(-1)
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if indices is None:
            indices = np.arange(frames.size)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not (frames.size == positions.shape[0] == indices.size):
            raise InputError("tracking: frames, positions and indices must have the same length")
        order = np.argsort(frames, kind="stable")
        frames, positions, indices = frames[order], positions[order], indices[order]
        out: list[np.ndarray] = []
        if frames.size == 0:
            return out
        bounds = np.flatnonzero(np.diff(frames)) + 1
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [frames.size]])
        for a, b in zip(starts, stops):
            out.extend(self.add_frame(int(frames[a]), positions[a:b], indices[a:b]))
        return out

    def finish(self) -> list[np.ndarray]:
        """Close every open track; return those long enough."""
        out: list[np.ndarray] = []
        self._close(np.zeros(len(self._members), dtype=bool), out)
        return out


def link(locs: np.ndarray, max_link_distance: float = 2.0, max_gap: int = 0, min_length: int = 2) -> np.ndarray:
    """Track ids (0, 1, ... in order of track end; -1 for points in no kept track) for locs [K, >=3] =
    (frame, z, x, ...), distances in the units of z and x."""
    locs = np.asarray(locs, dtype=np.float64)
    if locs.ndim != 2 or locs.shape[1] < 3:
        raise InputError(f"tracking: expected localizations [K, >=3] = (frame, z, x, ...), got shape {locs.shape}")
    tr = Tracker(max_link_distance, max_gap, min_length)
    tracks = tr.add_points(locs[:, 0], locs[:, 1:3]) + tr.finish()
    ids = np.full(locs.shape[0], -1, dtype=np.int64)
    for k, members in enumerate(tracks):
        ids[members] = k
    return ids


# ------------------------------------------------------------------------------------------------
# post-processing on concatenated tracks
# ------------------------------------------------------------------------------------------------

@dataclass
class FineTracks:
    """Points of many tracks, concatenated: track id, time (frames, may be fractional), z, x (mm),
    velocities vz, vx (mm/s)."""

    track_id: np.ndarray
    frame: np.ndarray
    z: np.ndarray
    x: np.ndarray
    vz: np.ndarray
    vx: np.ndarray

    def __len__(self) -> int:
        return int(self.track_id.shape[0])

    @property
    def speed(self) -> np.ndarray:
        return np.hypot(self.vz, self.vx)

    @staticmethod
    def empty() -> "FineTracks":
        z = np.zeros(0)
        return FineTracks(np.zeros(0, np.int64), z, z, z, z, z)


def _segments(track_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal ids (tracks must be contiguous)."""
    n = track_id.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(track_id)) + 1])
    lengths = np.diff(np.concatenate([starts, [n]]))
    return starts, lengths


def smooth_tracks(track_id: np.ndarray, values: np.ndarray, window: int = 5) -> np.ndarray:
    """Moving average of `values` [N] or [N, d] within each contiguous track, window shrinking
    symmetrically at the ends (the end points stay where they are)."""
    v = np.asarray(values, dtype=np.float64)
    squeeze = v.ndim == 1
    v = v.reshape(v.shape[0], -1)
    half = max(int(window), 1) // 2
    if half == 0 or v.shape[0] == 0:
        return v[:, 0].copy() if squeeze else v.copy()
    starts, lengths = _segments(np.asarray(track_id))
    j = np.arange(v.shape[0]) - np.repeat(starts, lengths)          # index within the track
    n = np.repeat(lengths, lengths)
    h = np.minimum(np.minimum(j, n - 1 - j), half)
    cs = np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(v, axis=0)])
    g = np.arange(v.shape[0])
    out = (cs[g + h + 1] - cs[g - h]) / (2 * h + 1)[:, None]
    return out[:, 0] if squeeze else out


def track_velocities(track_id: np.ndarray, frame: np.ndarray, pos: np.ndarray, frame_rate_hz: float) -> np.ndarray:
    """Velocities [N, d] (units of pos per second): central differences inside tracks, one-sided at the
    ends, zero for single-point tracks."""
    pos = np.asarray(pos, dtype=np.float64).reshape(len(frame), -1)
    t = np.asarray(frame, dtype=np.float64) / float(frame_rate_hz)
    starts, lengths = _segments(np.asarray(track_id))
    j = np.arange(pos.shape[0]) - np.repeat(starts, lengths)
    n = np.repeat(lengths, lengths)
    g = np.arange(pos.shape[0])
    lo = np.where(j > 0, g - 1, g)
    hi = np.where(j < n - 1, g + 1, g)
    dt = t[hi] - t[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        v = (pos[hi] - pos[lo]) / dt[:, None]
    v[dt <= 0] = 0.0
    return v


def interpolate_tracks(track_id, frame, z, x, vz, vx, max_step_mm: float) -> FineTracks:
    """Insert points between consecutive points of each track so no step exceeds `max_step_mm`
    (linear in position, time and velocity)."""
    if not np.isfinite(max_step_mm) or max_step_mm <= 0:
        raise InputError(f"interpolation step: expected a positive length in mm, got {max_step_mm!r}")
    track_id = np.asarray(track_id)
    cols = [np.asarray(a, dtype=np.float64) for a in (frame, z, x, vz, vx)]
    n = track_id.shape[0]
    if n == 0:
        return FineTracks.empty()
    same = np.zeros(n, dtype=bool)
    same[:-1] = track_id[1:] == track_id[:-1]                          # point i has a successor in its track
    nxt = np.minimum(np.arange(n) + 1, n - 1)
    step = np.hypot(cols[1][nxt] - cols[1], cols[2][nxt] - cols[2])
    nsub = np.where(same, np.maximum(np.ceil(step / max_step_mm), 1), 1).astype(np.int64)
    src = np.repeat(np.arange(n), nsub)
    first = np.repeat(np.cumsum(nsub) - nsub, nsub)
    frac = (np.arange(src.size) - first) / np.repeat(nsub, nsub)
    out = [c[src] + (c[nxt][src] - c[src]) * frac for c in cols]
    return FineTracks(track_id[src].astype(np.int64), *out)


def postprocess_tracks(tracks: list[np.ndarray], ids, frame_rate_hz: float, smooth_window: int = 5,
                       max_step_mm: float | None = None) -> FineTracks:
    """Smooth, differentiate and (optionally) interpolate tracks given as arrays [n, 3] = (frame, z_mm, x_mm)."""
    if not tracks:
        return FineTracks.empty()
    pts = np.concatenate([np.asarray(t, dtype=np.float64)[:, :3] for t in tracks])
    tid = np.repeat(np.asarray(ids, dtype=np.int64), [len(t) for t in tracks])
    zx = smooth_tracks(tid, pts[:, 1:3], smooth_window)
    v = track_velocities(tid, pts[:, 0], zx, frame_rate_hz)
    if max_step_mm is None:
        return FineTracks(tid, pts[:, 0], zx[:, 0], zx[:, 1], v[:, 0], v[:, 1])
    return interpolate_tracks(tid, pts[:, 0], zx[:, 0], zx[:, 1], v[:, 0], v[:, 1], max_step_mm)
