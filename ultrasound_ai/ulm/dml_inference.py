"""3DML-ResNet inference: inner, tiled or sliding windows, top-N peaks per frame, localizations in mm.

A window of N frames predicts all its N frames at once (the paper's design: "N normalized B-mode
images ... to generate N 3-channels images"). Work cannot be shared between overlapping windows: each
window is divided by its own maximum and zero-padded in time, and the temporal receptive field (one
frame per 3x3x3 convolution, 11 for the shipped model) is longer than a window, so every output of a
window depends on where the window starts. The paper slides its windows by one frame and averages a
frame's N estimates, because a frame at a window's edge (zero-padded on one side in time) is
estimated worse. Measured on the shipped model (400 fast-simulated frames, 100 bubbles/frame), a
frame estimated once at window position 0 or N-1 had raw Jaccard 0.53, at positions 1..N-2
0.61-0.62, and the N-estimate average 0.617: averaging mostly repairs the edge estimates. Hence:
- "inner" (the pipeline's default): the trained N-frame windows slid by N - 2, each frame estimated
  once, by the window in which it is neither first nor last (only the acquisition's first and last
  frames are estimated at an edge): N / (N - 2) passes per frame (8/6 for the shipped model) instead
  of N, within 0.005 raw and tracked Jaccard of the paper's stride 1 there; on the frozen pymust-formed
  set the fast-simulator-only checkpoint stayed up to 0.014 below it (frames unlike its training ones,
  where averaging helps more), the shipped pymust-fine-tuned one within 0.004 on every condition. A smaller stride averages several inner estimates: 3 (two each, 8/3
  passes) stayed within 0.008 of stride 1 on both sets. What the old path has more is the average itself
  (`bench/diagnose_ulm_window_ensemble.py`, seven pymust validation pieces): inner estimates alone averaged at
  stride 1 matched it, the counts of either layout changed little, and both the Pos maps and the
  offsets of a second estimate helped. Longer windows do not help: their middle frames see more temporal context
  than any training window had (16- to 40-frame windows lost 0.02);
- "sliding": the paper's windows slid by a stride (1 = the paper's), the estimates of a frame averaged;
- "tiled": windows side by side (stride N), every frame predicted once, a quarter of them at an edge:
  N / (N - 2) times fewer passes than "inner", 0.026 lower raw Jaccard.
All run in the channels-last layout with in-place arithmetic (`model_predictor`: the same numbers,
faster with oneDNN), a single window padded to a batch of two; channels_last=False, fused=False,
pad_single=False give the plain path of before, for comparisons. On CPU, batches of windows run on one
worker thread per torch thread (`workers`, up to MAX_WORKERS, torch's threads shared among them; the sums
are taken in window order, so the localizations are the same numbers as with one worker; workers=1 is the
path before), and the finished frames are localized, and tracked by the pipeline (`push_into`), while the
workers predict the next batches. The
predictor is asked for the frames a batch of windows keeps only (`predicts_frame_range`: "inner" windows
drop their edge frames), so the counting network and the last convolution run on 6 of 8 frames (every earlier
layer is needed on all of them); the same localizations on the speed benchmark's set, ~8 % less CPU per
frame with the tracker's vectorised assignments. On CPU the
3D ResNet runs in 8-bit integers by default (`precision` "auto", `dml_int8`; "fp32" is the arithmetic
before): on the seven pymust validation pieces its pooled raw / tracked Jaccard was fp32's within 0.001
(0.416 / 0.394), each piece within 0.006; the whole pipeline ran 1.6x faster on one thread.

Why not faster in fp32: the shipped network costs ~2.2 GFLOP per frame with "inner" windows (8/6 passes
of ~1.6 GFLOP, 94 % of it 3x3x3 convolutions), and oneDNN runs those at ~100 GFLOP/s per core on an
AVX2 EPYC (one thread, channels-last), about its FMA peak; 20x the old path (~6 frames/s on 2 cores)
needs ~8 ms per frame on 2 cores, which the convolutions alone exceed. How much int8 gains depends on the
cores: the whole default pipeline ran 19.0x the old path on the AVX2 EPYC and 29.7x on an AVX-512 EPYC
with VNNI (bench ulm_speed), whose old path was about as fast. Winograd-style 2D transforms
built from PyTorch ops (their batched products alone took longer than the direct convolution) and
NNPACK (slower, and it fails on batched input here) did not help; int8 does. The runner below also supports
windows longer than the training ones that keep only their frames at least `keep_margin` from the
edges (then divided by the median of their N-frame maxima, the training scale: see
`normalise_windows`).

Sliding window (the paper: "infer super-localization for each input US frame several times by
shifting the batch of N images a single frame at a time"). Windows of N frames start at 0, stride,
2*stride, ... (stride 1 = the paper). A frame's maps (Pos, X_E, Y_E) and count are the plain mean of
the estimates of every window that holds it. When the windows do not reach the last frames
(T - N not a multiple of the stride), one more window ending at the last frame is run, and it counts
only for the frames no other window covered, so the result does not depend on how the frames are
split into blocks. An acquisition shorter than N frames is one window of all its frames.

Streaming: `SlidingWindowRunner.push(frames)` returns the frames that no later window can touch
(all windows holding them have run) and keeps the rest; `finish()` returns the remainder. Pushing
the frames in any block sizes gives exactly what one push of all of them gives; the pipeline's
blocks may overlap: `push(block, start)` skips frames already pushed.

Detections: in frame i, the N_i local maxima (3 x 3) of the averaged Pos with the highest values,
N_i = round(averaged count of the counting network) or a given number per frame (`bubbles_per_frame`).
Only peaks: Pos of one bubble often spreads over two neighbouring pixels, and keeping both made pairs
of detections within lambda/2 that the tracker could not link consistently (tracks broke into pieces
shorter than the minimum length: tracked Jaccard 0.38 -> 0.56 on a 100-bubble simulated set). A detection in pixel
(iz, ix) with offsets (X_E, Y_E) lies at
    z_mm = z0 + (iz + X_E - 0.5) * dz,   x_mm = x0 + (ix + Y_E - 0.5) * dx
(pixel centres at origin + index * pixel size; offsets in [0, 1] map to [-0.5, 0.5] pixel). By default
(`rs_agreement_px`, RS_AGREEMENT_PX below) the offsets are then averaged with the radial-symmetry centre
of the input envelope around that pixel where the two agree within 0.3 px along both axes: on frames
formed unlike the training ones the network detects well but places less precisely. The intensity
column is the envelope of the input frame at that pixel (as the classical methods report).

The network expects pixels of the size it was trained on (`input.pixel_size_lambda` in its card);
another pixel size is refused with a clear message (resample the acquisition first).
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = [
    "FrameEstimate",
    "SlidingWindowRunner",
    "DmlLocalizationRunner",
    "load_dml_model",
    "select_detections",
    "estimates_to_localizations",
    "localize_3dml",
    "model_predictor",
    "DmlFrameCounter",
    "pipeline_counter",
    "default_workers",
    "gil_switch_interval",
    "resolve_int8",
    "torch_threads_for_workers",
]

# predict(windows [B, n, Z, X]) -> (maps [B, n, 3, Z, X], counts [B, n]); a predictor with the attribute
# predicts_frame_range = True also takes keep=(lo, hi) and returns those frames only ([B, hi - lo, ...]).
PredictFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]

# Window modes of the pipeline (see the module docstring): "inner" N-frame windows slid by N - 2, each
# frame estimated once away from a window's edge (the default); "tiled" N-frame windows side by side;
# "sliding": the paper's N-frame windows slid by a stride, estimates averaged.
WINDOW_MODES = ("inner", "tiled", "sliding")
DEFAULT_WINDOW_MODE = "inner"
# Frames dropped at each end of an "inner" window: the edge frame only (positions 1..N-2 were all as
# good as the average of the paper's N estimates).
INNER_MARGIN = 1
# Stride of "sliding" windows when none is given (each frame predicted N/2 = 4 times); "inner" windows
# are slid by N - 2 unless a stride is given.
DEFAULT_STRIDE = 2
# Windows per network call in "inner"/"tiled" modes: per window, 3D convolutions on 2-3 windows ran
# about 15 % faster than on 4 and 30 % faster than on 6 (activations stay in cache).
BATCH_WINDOWS = 3
# The same per single-thread worker (window workers, below): 2 windows per call took 10-15 % less CPU time
# per window than 3 on one torch thread (the two workers' activations share the L3 cache).
WORKER_BATCH_WINDOWS = 2
# Sub-pixel refinement of the default runner (`estimates_to_localizations`' rs_agreement_px): on frames
# formed unlike the training ones (pymust SIMUS + delay-and-sum, the frozen set's validation pieces)
# the network found more bubbles than RS (83 vs 79 % of its detections within lambda/2 at 100/frame,
# -40 dB) but placed them less precisely (axial offsets shrunk towards the pixel centre), which cut
# its tracks. Averaging its offsets with radial symmetry's where the two agree within 0.3 px raised the
# mean raw/tracked Jaccard of the six pymust validation pieces 0.379/0.352 -> 0.419/0.391 (every piece
# gained) and cost 0.003 on four fast-simulator validation acquisitions (0.602 -> 0.599); 0.3 px was
# the widest agreement costing at most 0.005 there (0.2-0.4 px tried, 0.5 lost 0.02).
RS_AGREEMENT_PX = 0.3
# CPU inference: batches of windows run on this many threads at most (one per torch thread by default,
# torch's threads shared among them). On the shared 2-core machine two single-thread workers ran the
# pipeline 1.4-1.7x faster than one worker on two torch threads (a preempted OpenMP thread stalls its
# partner); on a quiet machine what they add is localizing and tracking while the network runs (bench
# ulm_speed's rows). The outputs are the same numbers (see _predictions).
MAX_WORKERS = 8
# Python's GIL switch interval while window workers run (seconds; None: left as it is, 5 ms by default). Between
# two torch operations (~80 per batch of windows) a worker must take the GIL back, and the thread localizing
# and tracking the finished frames (Python-heavy) keeps it up to the whole interval: at 5 ms the workers can
# wait a tenth of their time (bench ulm_speed's row with the interval left at 5 ms measures what this gives).
GIL_SWITCH_INTERVAL_S = 0.0005
# Arithmetic of the 3D ResNet: "auto" = int8 on CPU where PyTorch has oneDNN's quantized engine (`dml_int8`:
# pooled Jaccard of the seven pymust validation pieces that of fp32 within 0.001, each piece within 0.006;
# the network ~1.7x faster on one thread), else fp32; "int8"; "fp32" (the arithmetic before).
PRECISIONS = ("auto", "int8", "fp32")
DEFAULT_PRECISION = "auto"


def check_precision(value) -> None:
    """InputError naming --precision unless value is one of PRECISIONS."""
    if value not in PRECISIONS:
        raise InputError(f"3DML-ResNet precision (--precision): expected one of {list(PRECISIONS)}, got {value!r}")


def check_rs_agreement(value) -> None:
    """InputError naming --rs-agreement unless value is None or a finite number of pixels >= 0."""
    try:
        ok = value is None or bool(np.isfinite(value) and value >= 0)
    except TypeError:
        ok = False
    if not ok:
        raise InputError(f"radial-symmetry agreement (--rs-agreement): expected a number of pixels >= 0 (0 = the "
                         f"3DML-ResNet offsets alone), got {value!r}")


@dataclass
class FrameEstimate:
    """One frame's averaged network output."""

    index: int  # global 0-based frame index
    envelope: np.ndarray  # [Z, X] the input frame (float32)
    maps: np.ndarray  # [3, Z, X] mean Pos, X_E (z offset), Y_E (x offset)
    count: float  # mean predicted number of bubbles
    n_estimates: int  # how many windows were averaged


def _envelope(block, what: str) -> np.ndarray:
    a = np.asarray(block)
    if a.ndim != 3:
        raise InputError(f"{what}: expected frames [T, Z, X], got shape {a.shape}")
    if a.dtype.kind == "c":
        a = np.abs(a)
    elif a.dtype.kind not in "iuf":
        raise InputError(f"{what}: expected complex IQ or real B-mode frames, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what}: frames contain NaN or infinite values")
    return a


class SlidingWindowRunner:
    """Runs `predict` on sliding windows of a frame stream and averages each frame's estimates.

    predict(windows [B, n, Z, X] float32) -> (maps [B, n, 3, Z, X], counts [B, n]), numpy arrays.
    """

    def __init__(self, predict: PredictFn, window_frames: int, stride: int = 1, batch_windows: int = 4,
                 keep_margin: int = 0, workers: int = 1):
        if int(window_frames) < 1:
            raise InputError(f"window_frames must be a positive number of frames, got {window_frames}")
        if not 1 <= int(stride) <= int(window_frames):
            raise InputError(f"window stride must be in [1, window_frames = {window_frames}], got {stride}")
        if not 0 <= 2 * int(keep_margin) <= int(window_frames) - int(stride):
            raise InputError(f"keep margin must be in [0, (window_frames - stride) / 2], got {keep_margin}")
        self.predict = predict
        self.n = int(window_frames)
        self.stride = int(stride)
        # A window's estimates count only for its frames [m, n - m) (all of them at the acquisition's start).
        self.m = int(keep_margin)
        self.batch_windows = max(1, int(batch_windows))
        if int(workers) < 1:
            raise InputError(f"window workers must be a positive number of threads, got {workers}")
        # workers > 1: batches of windows predicted on that many threads at once (see _predictions).
        self.workers = int(workers)
        self._pool = None
        self._frames: list[np.ndarray] = []  # raw frames from self._raw_start on
        self._raw_start = 0
        self._end = 0  # frames pushed so far
        self._next_start = 0  # start of the next regular window
        self._emit = 0  # first frame not yet returned
        self._sum_maps: dict[int, np.ndarray] = {}
        self._sum_count: dict[int, float] = {}
        self._n_est: dict[int, int] = {}
        self._shape: tuple[int, int] | None = None
        self._finished = False

    def push(self, frames, start: int | None = None) -> list[FrameEstimate]:
        """Add frames (the stream continues at `start`, default: where it stopped); returns finished frames."""
        return [e for part in self.push_iter(frames, start) for e in part]

    def push_iter(self, frames, start: int | None = None):
        """As push, but yields the finished frames in parts, one after each batch of windows, so the caller
        can work on them while the workers predict the next batches (the parts join into push's list)."""
        if self._finished:
            raise RuntimeError("SlidingWindowRunner: push() after finish()")
        env = _envelope(frames, "3DML-ResNet input block")
        if start is not None:
            start = int(start)
            if start > self._end or start < 0:
                raise InputError(f"3DML-ResNet input block: starts at frame {start} but the stream is at frame "
                                 f"{self._end} (blocks must be contiguous or overlap the previous one)")
            env = env[self._end - start:]  # overlapping frames were pushed already
        if env.shape[0] == 0:
            return
        if self._shape is None:
            self._shape = env.shape[1:]
        elif env.shape[1:] != self._shape:
            raise InputError(f"3DML-ResNet input block: frames are {env.shape[1]} x {env.shape[2]} but earlier "
                             f"ones were {self._shape[0]} x {self._shape[1]}")
        self._frames.extend(env)
        self._end += env.shape[0]
        starts = []
        while self._next_start + self.n <= self._end:
            starts.append(self._next_start)
            self._next_start += self.stride
        # Frames before the next window's kept range are final.
        for next_start in self._run(starts, self.n):
            yield self._collect(min(next_start + self.m, self._end), keep_from=next_start)
        yield self._collect(min(self._next_start + self.m, self._end) if self._next_start else 0)

    def finish(self) -> list[FrameEstimate]:
        """Run the last window if frames are left uncovered; return every frame not yet returned."""
        if self._finished:
            return []
        self._finished = True
        try:
            if self._end == 0:
                return []
            uncovered = [t for t in range(self._emit, self._end) if self._n_est.get(t, 0) == 0]
            if uncovered:
                n = min(self.n, self._end)
                for _ in self._run([self._end - n], n, only=set(uncovered)):
                    pass
            return self._collect(self._end)
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _window(self, s: int, n: int) -> np.ndarray:
        i = s - self._raw_start
        return np.stack(self._frames[i:i + n])

    def _call(self, windows: np.ndarray, keep: tuple[int, int]):
        """The predictor on windows, for their frames keep = (lo, hi) when it can predict only those
        (`predicts_frame_range`), else for all of them."""
        if getattr(self.predict, "predicts_frame_range", False) and keep != (0, windows.shape[1]):
            return self.predict(windows, keep=keep)
        return self.predict(windows)

    def _predictions(self, groups: list[list[int]], n: int, keeps: list[tuple[int, int]]):
        """(windows, maps, counts) of each group of window starts, in order. With workers > 1 the groups
        are predicted on a thread pool, at most 2 * workers in flight (the predictor must release the GIL
        while it computes, as torch does); the results are used in the same order, so the sums are the
        same as with one worker."""
        if self.workers == 1 or len(groups) < 2:
            for group, keep in zip(groups, keeps):
                windows = np.stack([self._window(s, n) for s in group])
                yield (windows, *self._call(windows, keep))
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="3dml-window")
        pending: deque = deque()
        todo = iter(zip(groups, keeps))
        try:
            while True:
                for group, keep in todo:
                    windows = np.stack([self._window(s, n) for s in group])
                    pending.append((windows, self._pool.submit(self._call, windows, keep)))
                    if len(pending) >= 2 * self.workers:
                        break
                if not pending:
                    return
                windows, future = pending.popleft()
                yield (windows, *future.result())
        finally:
            for _, future in pending:
                future.cancel()

    def _run(self, starts: list[int], n: int, only: set | None = None):
        """Predicts the windows at `starts` batch by batch and adds their estimates; yields after each batch
        the start of the next window not yet added (the frames before it are final)."""
        groups = [starts[b:b + self.batch_windows] for b in range(0, len(starts), self.batch_windows)]
        keeps = [self._kept_frames(group, n, only) for group in groups]
        for gi, (group, keep, (windows, maps, counts)) in enumerate(zip(groups, keeps,
                                                                       self._predictions(groups, n, keeps))):
            maps = np.asarray(maps, dtype=np.float64)
            counts = np.asarray(counts, dtype=np.float64)
            # The predictor gave either every frame of the windows or the kept ones, keep = (lo, hi), only.
            lo, hi = (0, n) if maps.shape[1:2] == (n,) else keep
            if maps.shape != (len(group), hi - lo, 3) + windows.shape[2:] or counts.shape != (len(group), hi - lo):
                raise RuntimeError(f"window predictor returned maps {maps.shape} and counts {counts.shape} for "
                                   f"windows {windows.shape} (frames {keep} kept)")
            for k, s in enumerate(group):
                for j in range(n):
                    t = s + j
                    if only is not None:
                        if t not in only:
                            continue
                    elif (j < self.m and s > 0) or j >= n - self.m:
                        continue  # too close to this window's edge; a neighbouring window covers it
                    j -= lo
                    if t in self._sum_maps:
                        self._sum_maps[t] += maps[k, j]
                        self._sum_count[t] += counts[k, j]
                        self._n_est[t] += 1
                    else:
                        self._sum_maps[t] = maps[k, j].copy()
                        self._sum_count[t] = float(counts[k, j])
                        self._n_est[t] = 1
            yield groups[gi + 1][0] if gi + 1 < len(groups) else self._next_start

    def _kept_frames(self, group: list[int], n: int, only: set | None) -> tuple[int, int]:
        """(lo, hi): the window positions whose estimates some window of the group keeps (see _run)."""
        if only is not None:
            pos = [t - s for s in group for t in only if 0 <= t - s < n]
            return (min(pos), max(pos) + 1) if pos else (0, n)
        return (0 if min(group) == 0 else self.m), n - self.m

    def _collect(self, upto: int, keep_from: int | None = None) -> list[FrameEstimate]:
        """The frames before `upto` not yet returned; raw frames are kept from `keep_from` (default: the
        next regular window's start) on."""
        out = []
        for t in range(self._emit, upto):
            n_est = self._n_est.pop(t)
            out.append(FrameEstimate(index=t, envelope=self._frames[t - self._raw_start],
                                     maps=(self._sum_maps.pop(t) / n_est).astype(np.float32),
                                     count=self._sum_count.pop(t) / n_est, n_estimates=n_est))
        self._emit = max(self._emit, upto)
        # Keep the raw frames later windows need, including the last N for a final tail window.
        keep_from = max(0, min(self._emit, self._next_start if keep_from is None else keep_from, self._end - self.n))
        drop = keep_from - self._raw_start
        if drop > 0:
            del self._frames[:drop]
            self._raw_start = keep_from
        return out


def pos_peaks(pos: np.ndarray) -> np.ndarray:
    """Local maxima (3 x 3 neighbourhood) with Pos > 0 of Pos maps [..., Z, X] (frames separately)."""
    from scipy.ndimage import maximum_filter

    size = (1,) * (pos.ndim - 2) + (3, 3)
    return (pos >= maximum_filter(pos, size=size, mode="constant", cval=-np.inf)) & (pos > 0)


def select_detections(maps: np.ndarray, n: int, peaks_only: bool = False,
                      peaks: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The n pixels with the highest Pos: (iz, ix, z_offset_px, x_offset_px, pos), by decreasing Pos.

    peaks_only: choose among the local maxima of Pos (3 x 3 neighbourhood) only, so one bubble whose
    probability spreads over two neighbouring pixels is not kept twice (fewer than n when there are
    fewer peaks with Pos > 0); peaks: those maxima, when computed already (`pos_peaks`)."""
    pos = maps[0]
    flat = pos.reshape(-1)
    if peaks_only:
        is_peak = (pos_peaks(pos) if peaks is None else peaks).reshape(-1)
        flat = np.where(is_peak, flat, -np.inf)
        n = min(int(n), int(is_peak.sum()))
    n = int(max(0, min(int(n), pos.size)))
    if n == 0:
        e = np.zeros(0)
        return e.astype(np.int64), e.astype(np.int64), e, e, e
    idx = np.argpartition(-flat, n - 1)[:n] if n < flat.size else np.arange(flat.size)
    # Ties broken by pixel index, so the order (and the kept set) is reproducible.
    idx = idx[np.lexsort((idx, -flat[idx]))]
    iz, ix = np.unravel_index(idx, pos.shape)
    zoff = maps[1].reshape(-1)[idx].astype(np.float64) - 0.5
    xoff = maps[2].reshape(-1)[idx].astype(np.float64) - 0.5
    return iz.astype(np.int64), ix.astype(np.int64), zoff, xoff, flat[idx].astype(np.float64)


def estimates_to_localizations(estimates: Iterable[FrameEstimate], pixel_size_mm, origin_mm,
                               bubbles_per_frame=None, record_counts: Callable | None = None,
                               peaks_only: bool = False, rs_agreement_px: float | None = None,
                               fwhm_px=(3.0, 3.0), window: int = 5) -> np.ndarray:
    """Averaged frame estimates -> localizations [K, 4] = (frame, z_mm, x_mm, intensity).

    bubbles_per_frame: None = the counting network's rounded count per frame; an int = that many in
    every frame; a mapping/array indexed by the global frame index = per-frame numbers.
    record_counts(frame, [n]) is told the number of detections kept in each frame.
    rs_agreement_px: when > 0, each detection's offsets are averaged with the radial-symmetry centre of
    the envelope in a `window` x `window` patch around its pixel (`localization.radial_symmetry`, PSF
    aspect from fwhm_px) when the two agree within this many pixels along both axes (see
    RS_AGREEMENT_PX); None or 0: the network's offsets alone.
    """
    dz, dx = (float(v) for v in pixel_size_mm)
    z0, x0 = (float(v) for v in origin_mm)
    parts, envs = [], []
    estimates = list(estimates)
    # The peaks of every frame in one filter call (per-call overhead was most of the per-frame cost).
    peaks = pos_peaks(np.stack([e.maps[0] for e in estimates])) if peaks_only and estimates else None
    for k, est in enumerate(estimates):
        if bubbles_per_frame is None:
            n = int(np.floor(est.count + 0.5))
        elif np.isscalar(bubbles_per_frame):
            n = int(bubbles_per_frame)
        else:
            n = int(bubbles_per_frame[est.index])
        if n < 0:
            raise InputError(f"bubbles per frame must be >= 0, got {n} for frame {est.index}")
        if record_counts is not None:
            record_counts(est.index, np.array([n]))
        iz, ix, zoff, xoff, _ = select_detections(est.maps, n, peaks_only, None if peaks is None else peaks[k])
        if iz.size == 0:
            continue
        parts.append((np.full(iz.size, len(envs)), est.index, iz, ix, zoff, xoff))
        envs.append(est.envelope)
    if not parts:
        return np.zeros((0, 4))
    slot, iz, ix, zoff, xoff = (np.concatenate([p[k] for p in parts]) for k in (0, 2, 3, 4, 5))
    frame = np.concatenate([np.full(p[2].size, p[1], dtype=np.float64) for p in parts])
    env = np.stack(envs)
    if rs_agreement_px:
        zoff, xoff = _average_with_radial_symmetry(env, slot, iz, ix, zoff, xoff, float(rs_agreement_px),
                                                   fwhm_px, window)
    r = np.empty((iz.size, 4))
    r[:, 0] = frame
    r[:, 1] = z0 + (iz + zoff) * dz
    r[:, 2] = x0 + (ix + xoff) * dx
    r[:, 3] = env[slot, iz, ix]
    return r


def _average_with_radial_symmetry(env, slot, iz, ix, zoff, xoff, agreement_px: float, fwhm_px, window: int):
    """Offsets (z, x) averaged with radial symmetry's where both axes agree within agreement_px; the
    network's alone near the border (no full window) or where radial symmetry fails or disagrees."""
    from .localization import Detections, extract_windows, radial_symmetry

    half = int(window) // 2
    inside = (iz >= half) & (iz < env.shape[1] - half) & (ix >= half) & (ix < env.shape[2] - half)
    k = np.flatnonzero(inside)
    if k.size == 0:
        return zoff, xoff
    det = Detections(slot[k], iz[k], ix[k], np.zeros(k.size, np.float32))
    fz, fx = (float(v) for v in np.broadcast_to(np.asarray(fwhm_px, dtype=np.float64).reshape(-1), (2,)))
    rz, rx = radial_symmetry(extract_windows(env, det, window), fx / fz)
    with np.errstate(invalid="ignore"):
        agree = np.isfinite(rz) & np.isfinite(rx) & (np.abs(rz - zoff[k]) <= agreement_px) & (
            np.abs(rx - xoff[k]) <= agreement_px)
    zoff, xoff = zoff.copy(), xoff.copy()
    zoff[k[agree]] = (zoff[k[agree]] + rz[agree]) / 2
    xoff[k[agree]] = (xoff[k[agree]] + rx[agree]) / 2
    return zoff, xoff


# ------------------------------------------------------------------------------------ the model


def load_dml_model(model=None, device="auto"):
    """(DmlLocalizer in eval mode on `device`, card). `model`: None (the installed default of method
    ulm_3dml_resnet), a model name, a .pt path, or a DmlLocalizer (its card is then {})."""
    from ultrasound_ai.core.device import resolve_device
    from ultrasound_ai.ulm.dml_resnet import METHOD, DmlLocalizer

    dev = resolve_device(device)
    if isinstance(model, DmlLocalizer):
        return model.to(dev).eval(), {}
    from ultrasound_ai.models.checkpoint import load_into, read_card
    from ultrasound_ai.models.registry import default_model, find_model

    path = default_model(METHOD).pt_path if model is None else find_model(os.fspath(model))
    card = read_card(path)
    if str(card.get("method", "")).lower() != METHOD:
        raise InputError(f"model {path}: its card says method {card.get('method')!r}, expected {METHOD!r}")
    net = DmlLocalizer(card.get("configuration") or {})
    card = load_into(net, path, map_location="cpu", dtype="float32")
    return net.to(dev).eval(), card


def model_predictor(net, device=None, channels_last: bool = False, fused: bool = True,
                    norm_group: int | None = None, pad_single: bool = True, int8: bool = False) -> PredictFn:
    """A SlidingWindowRunner predictor running `net` (no gradients) on its device.

    channels_last: run the convolutions in the channels-last memory layout; fused: in-place sums and
    PReLU (`DmlResNet.set_inference`). The same arithmetic either way, faster on CPU with oneDNN.
    pad_single: run a lone window beside a copy of itself (PyTorch does not give a batch of one 3D
    window to oneDNN on CPU: it ran about 14x slower per window than a batch of two).
    int8: the ResNet quantized to 8-bit integers (`dml_int8`, CPU only; run inside its quantized_engine())."""
    import torch

    dev = device if device is not None else next(net.parameters()).device
    net.resnet.set_inference(channels_last, fused)
    net.counter.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    resnet = None
    if int8:
        if torch.device(dev).type != "cpu":
            raise InputError(f"3DML-ResNet int8 (--precision int8) runs on CPU only, not on {dev}")
        from .dml_int8 import quantize_resnet

        resnet = quantize_resnet(net)

    def predict(windows: np.ndarray, keep: tuple[int, int] | None = None):
        x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
        b = x.shape[0]
        if pad_single and b == 1 and torch.device(dev).type == "cpu":
            x = x.expand(2, *x.shape[1:])
        with torch.no_grad():
            out = net(x.to(dev), norm_group, resnet, keep)
        return out["maps"][:b].float().cpu().numpy(), out["count"][:b].float().cpu().numpy()

    # keep=(lo, hi): maps and counts of those frames of the windows only (the runner keeps no others).
    predict.predicts_frame_range = True
    return predict


def _check_pixel_size(card: dict, pixel_size_mm, wavelength_mm, what: str) -> None:
    inp = card.get("input") if isinstance(card, dict) else None
    want = inp.get("pixel_size_lambda") if isinstance(inp, dict) else None
    if want is None or wavelength_mm is None:
        return
    have = np.asarray(pixel_size_mm, dtype=np.float64) / float(wavelength_mm)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    if want.shape != (2,) or not np.allclose(have, want, rtol=0.05, atol=0):
        raise InputError(f"{what}: pixels of {have.round(4).tolist()} wavelengths (z, x), but model "
                         f"{card.get('name', '?')!r} was trained on {want.tolist()}; resample the acquisition "
                         f"to its pixel size first")


class DmlLocalizationRunner:
    """Streaming 3DML-ResNet localization of an acquisition's frames, block by block.

        runner = DmlLocalizationRunner(pixel_size_mm, origin_mm, wavelength_mm, model=None, device="auto")
        for start, block in blocks:  rows = runner.push(block, start)   # [K, 4] finished frames
        rows = runner.finish()
    """

    def __init__(self, pixel_size_mm, origin_mm, wavelength_mm=None, *, model=None, device="auto",
                 bubbles_per_frame=None, window_mode: str = DEFAULT_WINDOW_MODE, window_stride: int | None = None,
                 window_frames: int | None = None, keep_margin: int | None = None, batch_windows: int | None = None,
                 channels_last: bool = True, fused: bool = True, pad_single: bool = True, peaks_only: bool = True,
                 rs_agreement_px: float | None = RS_AGREEMENT_PX, fwhm_px=(3.0, 3.0), window: int = 5,
                 record_counts: Callable | None = None, workers: int | None = None,
                 precision: str = DEFAULT_PRECISION):
        self.net, self.card = load_dml_model(model, device)
        self.int8 = resolve_int8(precision, next(self.net.parameters()).device)
        _check_pixel_size(self.card, pixel_size_mm, wavelength_mm, "3DML-ResNet input")
        if bubbles_per_frame is not None and np.isscalar(bubbles_per_frame) and int(bubbles_per_frame) < 0:
            raise InputError(f"bubbles per frame must be >= 0 or None (counting network), got {bubbles_per_frame}")
        self.pixel_size_mm = tuple(float(v) for v in pixel_size_mm)
        self.origin_mm = tuple(float(v) for v in origin_mm)
        self.bubbles_per_frame = bubbles_per_frame
        self.record_counts = record_counts
        self.peaks_only = peaks_only
        check_rs_agreement(rs_agreement_px)
        self.rs_agreement_px = rs_agreement_px
        self.fwhm_px, self.window = fwhm_px, int(window)
        if window_mode not in WINDOW_MODES:
            raise InputError(f"3DML-ResNet window mode: expected one of {list(WINDOW_MODES)}, got {window_mode!r}")
        side_by_side = window_mode != "sliding"
        # "inner"/"tiled" windows (the training length by default) keep only their frames at least
        # keep_margin from the edges (default: 1 for "inner", 0 for "tiled") and are slid by n - 2 margins;
        # "inner" windows may be slid by less (window_stride), then a frame's inner estimates are averaged.
        m = int((INNER_MARGIN if window_mode == "inner" else 0) if keep_margin is None else keep_margin)
        n = int(window_frames or self.net.config.window_frames)
        if side_by_side and n - 2 * m < 1:
            raise InputError(f"3DML-ResNet windows of {n} frames cannot keep a margin of {m} frames at each end")
        if window_mode == "sliding":
            stride = int(window_stride or DEFAULT_STRIDE)
        elif window_mode == "inner" and window_stride is not None:
            stride = int(window_stride)
            if not 1 <= stride <= n - 2 * m:
                raise InputError(f"window stride (--window-stride) of inner windows: expected 1 to {n - 2 * m} frames "
                                 f"(windows of {n} frames keeping {n - 2 * m}), got {window_stride}")
        else:
            stride = n - 2 * m
        # channels_last=False, fused=False, pad_single=False: the plain path of the past (for comparisons).
        # Windows longer than the training ones are scaled as those were (normalise_windows' group).
        predict = model_predictor(self.net, channels_last=channels_last, fused=fused,
                                  norm_group=self.net.config.window_frames if side_by_side else None,
                                  pad_single=pad_single, int8=self.int8)
        if workers is None:
            workers = default_workers(next(self.net.parameters()).device)
        if not batch_windows:
            batch_windows = (WORKER_BATCH_WINDOWS if workers > 1 else BATCH_WINDOWS) if side_by_side else 4
        self.runner = SlidingWindowRunner(predict, n, stride=stride, batch_windows=batch_windows, keep_margin=m,
                                          workers=workers)

    def _rows(self, estimates) -> np.ndarray:
        return estimates_to_localizations(estimates, self.pixel_size_mm, self.origin_mm, self.bubbles_per_frame,
                                          self.record_counts, self.peaks_only, self.rs_agreement_px, self.fwhm_px,
                                          self.window)

    def push(self, block, start: int | None = None) -> np.ndarray:
        parts: list[np.ndarray] = []
        self.push_into(block, start, parts.append)
        return np.concatenate(parts) if parts else np.zeros((0, 4))

    def push_into(self, block, start: int | None, sink: Callable[[np.ndarray], None]) -> None:
        """As push, but each batch's rows go to sink(rows) as soon as they are localized, in frame order: the
        localization and the caller's work on the rows (the pipeline's tracking) run while the workers
        predict the next batches of windows."""
        with self._inference():
            for est in self.runner.push_iter(block, start):
                rows = self._rows(est)
                if rows.shape[0]:
                    sink(rows)

    def finish(self) -> np.ndarray:
        with self._inference():
            return self._rows(self.runner.finish())

    @contextmanager
    def _inference(self):
        """torch's threads shared among the window workers, and oneDNN's quantized engine for int8, while
        windows run."""
        with torch_threads_for_workers(self.runner.workers), gil_switch_interval(
                GIL_SWITCH_INTERVAL_S if self.runner.workers > 1 else None):
            if not self.int8:
                yield
                return
            from .dml_int8 import quantized_engine

            with quantized_engine():
                yield


_gil_lock = threading.Lock()
_gil_users = 0
_gil_before = 0.005


@contextmanager
def gil_switch_interval(seconds: float | None):
    """Python's GIL switch interval at most `seconds` while inside (None: unchanged); the interval before is
    restored when the last of several concurrent users leaves (runners in other threads may overlap)."""
    global _gil_users, _gil_before
    if seconds is None:
        yield
        return
    with _gil_lock:
        if _gil_users == 0:
            _gil_before = sys.getswitchinterval()
        _gil_users += 1
        sys.setswitchinterval(min(_gil_before, float(seconds)))
    try:
        yield
    finally:
        with _gil_lock:
            _gil_users -= 1
            if _gil_users == 0:
                sys.setswitchinterval(_gil_before)


def resolve_int8(precision: str, device) -> bool:
    """Whether the ResNet runs in int8 for `precision` ("auto", "int8", "fp32") on `device`."""
    import torch

    from .dml_int8 import int8_available

    check_precision(precision)
    on_cpu = torch.device(device).type == "cpu"
    if precision == "int8" and not on_cpu:
        raise InputError(f"3DML-ResNet precision int8 (--precision int8) runs on CPU only, not on {device}")
    if precision == "int8" and not int8_available():
        raise InputError("3DML-ResNet precision int8 (--precision int8): this PyTorch has no oneDNN quantized engine "
                         f"(it has {torch.backends.quantized.supported_engines}); use --precision fp32")
    return precision == "int8" or (precision == "auto" and on_cpu and int8_available())


def default_workers(device) -> int:
    """Window workers of the runner on `device`: on CPU one per torch thread up to MAX_WORKERS (torch's
    threads shared among them while they run); on a GPU one."""
    import torch

    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


@contextmanager
def torch_threads_for_workers(workers: int):
    """While `workers` > 1 threads each run windows: torch's intra-op threads shared among them (one each
    on 2 cores), then restored."""
    if workers <= 1:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DmlFrameCounter:
    """Bubbles per frame from the counting network alone (for the classical methods' top-N).

    counts(frames [n, Z, X], start) -> int [n]: the frames are cut into consecutive groups of N (the
    window length; the last group may be shorter), each group normalised by its maximum as a window
    is, and every frame's count rounded to the nearest integer.
    """

    def __init__(self, model=None, device="auto", window_frames: int | None = None, *, pixel_size_mm=None,
                 wavelength_mm=None):
        import torch

        self.net, self.card = load_dml_model(model, device)
        if pixel_size_mm is not None:
            _check_pixel_size(self.card, pixel_size_mm, wavelength_mm, "counting network input")
        self.n = int(window_frames or self.net.config.window_frames)
        self._torch = torch
        self._device = next(self.net.parameters()).device

    def __call__(self, frames, start: int = 0) -> np.ndarray:
        from ultrasound_ai.ulm.dml_resnet import normalise_windows

        torch = self._torch
        env = _envelope(frames, "counting network input")
        out = np.zeros(env.shape[0], np.int64)
        with torch.no_grad():
            for a in range(0, env.shape[0], self.n):
                w = torch.from_numpy(np.ascontiguousarray(env[a:a + self.n])).to(self._device)
                c = self.net.counter(normalise_windows(w[None])[0])
                out[a:a + w.shape[0]] = np.floor(c.float().cpu().numpy() + 0.5).astype(np.int64)
        return out


def pipeline_counter(ctx) -> DmlFrameCounter:
    """Factory for `pipeline.register_counter("default", pipeline_counter)` (a LocalizerContext in)."""
    return DmlFrameCounter(ctx.params.model, ctx.device if ctx.device is not None else ctx.params.device,
                           pixel_size_mm=ctx.pixel_size_mm, wavelength_mm=ctx.wavelength_mm)


def localize_3dml(acquisition, *, model=None, device="auto", bubbles_per_frame=None,
                  window_mode: str = DEFAULT_WINDOW_MODE, window_stride: int | None = None, block_frames: int = 200,
                  rs_agreement_px: float | None = RS_AGREEMENT_PX, precision: str = DEFAULT_PRECISION,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Localize every frame of an Acquisition (or an acquisition file path): [K, 4] (frame, z_mm, x_mm,
    intensity). Never reads the ground truth."""
    from ultrasound_ai.io.ulm_files import Acquisition, acquisition_info, iter_blocks

    if isinstance(acquisition, Acquisition):
        geo = (acquisition.pixel_size_mm, acquisition.origin_mm, acquisition.wavelength_mm)
        total = acquisition.n_frames
        frames = acquisition.frames
        blocks = ((s, frames[s:s + block_frames]) for s in range(0, total, block_frames))
    elif isinstance(acquisition, (str, os.PathLike)):
        info = acquisition_info(acquisition)
        geo = (info.pixel_size_mm, info.origin_mm, info.wavelength_mm)
        total = info.n_frames
        blocks = iter_blocks(acquisition, block_frames)
    else:
        raise InputError(f"3DML-ResNet: expected an Acquisition or an acquisition file, got {type(acquisition).__name__}")
    runner = DmlLocalizationRunner(*geo, model=model, device=device, bubbles_per_frame=bubbles_per_frame,
                                   window_mode=window_mode, window_stride=window_stride,
                                   rs_agreement_px=rs_agreement_px, precision=precision)
    parts = []
    for start, block in blocks:
        parts.append(runner.push(block, start))
        if progress is not None:
            progress(min(start + len(block), total), total)
    parts.append(runner.finish())
    return np.concatenate(parts)
