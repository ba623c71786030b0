"""The ULM processing pipeline, streamed block by block:

    blocks of frames -> SVD clutter filter (+ optional Butterworth band-pass) -> localization
    (a registered method: "rs", "wa", "3dml", ...) -> tracking -> rendering -> ULM result file.

Streaming. Frames are read `block_frames` at a time (`iter_blocks`), so a 20,000-frame acquisition
never sits whole in memory. Consecutive blocks overlap by 2*margin frames when a temporal band-pass
is used: each block is filtered whole and only its middle part is localized (the first block keeps
its start, the last its end), so the kept parts tile the acquisition exactly and the filter's edge
transients are thrown away. When clutter filters are on, a last block shorter than half a block (or
than the filters need, e.g. no more frames than the SVD cutoff) is merged into the block before it,
so every filtered block has enough frames for a meaningful SVD / band-pass. Localizers are streaming objects (`push(frames, start)` returns the rows
of the frames they have finished, `finish()` the rest), and the tracker keeps its open tracks from
one block to the next, so tracks continue across block boundaries. Closed tracks are smoothed,
differentiated, interpolated and rendered at once; only the localizations table grows with the
acquisition.

The ground truth (`gt_positions`) is never read here: results are identical without it.

Localization methods are looked up in a small registry (localizers.py, re-exported here):
`register_localizer(name, factory, label=..., tooltip=...)`, where `factory(ctx: LocalizerContext)` returns
a `Localizer`: `push(frames, start) -> [K, 4]` rows = (global frame, z_mm, x_mm, intensity) and
`finish() -> [K, 4]`. Counting networks for the classical
methods (`counting_network=True`) come from `register_counter(name, factory)`: `factory(ctx)` returns
`counts(frames, start) -> [n]` bubbles per frame. The default counter is the 3DML-ResNet checkpoint's
counting network (`params.model`, or the installed default), imported only when it is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ultrasound_ai.core.errors import Cancelled, InputError

from .dml_inference import (
    DEFAULT_PRECISION,
    DEFAULT_WINDOW_MODE,
    RS_AGREEMENT_PX,
    WINDOW_MODES,
    check_precision,
    check_rs_agreement,
)
from .localization import localize, to_mm
from .localizers import (
    Localizer,
    LocalizerInfo,
    create_localizer,
    localizer_info,
    localizer_names,
    register_localizer,
    unregister_localizer,
)
from .rendering import Renderer, RenderGrid, save_maps_png
from .tracking import Tracker, postprocess_tracks

__all__ = ["UlmParams", "LocalizerContext", "Localizer", "LocalizerInfo", "register_localizer",
           "unregister_localizer", "localizer_names", "localizer_info", "register_counter",
           "process_acquisition", "ClassicalLocalizer"]

PIPELINE_VERSION = "1"
# Detections per frame of the classical methods when no count is given and no counting network is installed.
FALLBACK_BUBBLES_PER_FRAME = 40
_DML_METHOD = "ulm_3dml_resnet"  # the model registry's method name of the counting network's checkpoint


@dataclass
class UlmParams:
    """Processing parameters (CLI flags in brackets)."""

    bubbles_per_frame: Any = None          # detections kept per frame: int or per-frame array [--bubbles-per-frame]
    counting_network: bool | None = None   # per-frame counts from the counting network; None = automatic [--counting-network]
    svd_cutoff: Any = 4                    # remove the k first singular components, or keep band (k1, k2); 0/None = off [--svd-cutoff]
    band_hz: Any = None                    # (lo, hi) Butterworth band-pass in Hz, None = off [--band]
    block_frames: int = 800                # frames per block [--block-frames]
    margin_frames: int | None = None       # overlap half-width; None = 16 with band-pass, else 0
    fwhm_px: tuple = (3.0, 3.0)            # PSF full width at half maximum (z, x) in pixels
    window: int = 5                        # sub-pixel window size (pixels)
    max_maxima: int | None = 3             # reject windows holding more regional maxima
    link_distance_px: float = 2.0          # maximum linking distance (pixels) [--link-distance]
    max_gap: int = 0                       # frames a track may skip (gap closing) [--max-gap]
    min_track_length: int = 15             # points a track needs to be kept [--min-track-length]
    smooth_window: int = 5                 # moving-average window along tracks (points)
    resolution_factor: float = 10.0        # rendering pixel = wavelength / factor [--resolution-factor]
    device: str = "auto"                   # torch device for the SVD and networks [--device]
    model: Any = None                      # network model for learned methods (None = installed default) [--checkpoint]
    window_mode: str = DEFAULT_WINDOW_MODE  # 3DML-ResNet windows: "inner", "tiled" or "sliding" [--window-mode]
    window_stride: int | None = None       # windows' stride, frames; None: N - 2 ("inner"), 2 ("sliding") [--window-stride]
    rs_agreement_px: float = RS_AGREEMENT_PX  # 3DML offsets averaged with radial symmetry's within this; 0 = off [--rs-agreement]
    precision: str = DEFAULT_PRECISION     # 3DML-ResNet arithmetic: "auto" (int8 on CPU where available), "int8", "fp32" [--precision]

    # True when the counting network was chosen by default (no count given), not asked for.
    counting_network_auto: bool = field(default=False, init=False, repr=False, compare=False)

    def validate(self) -> "UlmParams":
        if self.counting_network is None:
            # The default: a fixed number when one is given, else the counting network.
            self.counting_network_auto = self.bubbles_per_frame is None
            self.counting_network = self.bubbles_per_frame is None
        if self.counting_network:
            self.bubbles_per_frame = None
        elif self.bubbles_per_frame is None:
            raise InputError("bubbles per frame: give a number (--bubbles-per-frame N) or use the counting network")
        elif np.isscalar(self.bubbles_per_frame) and (not np.isfinite(self.bubbles_per_frame) or self.bubbles_per_frame < 0):
            raise InputError(f"bubbles per frame: expected a number >= 0, got {self.bubbles_per_frame!r}")
        _check_svd_cutoff(self.svd_cutoff)
        if int(self.block_frames) < 2:
            raise InputError(f"block_frames: expected at least 2 frames per block, got {self.block_frames}")
        if self.margin_frames is not None and int(self.margin_frames) < 0:
            raise InputError(f"margin_frames: expected >= 0, got {self.margin_frames}")
        if self.band_hz is not None and np.size(self.band_hz) != 2:
            raise InputError(f"band: expected two frequencies (lo, hi) in Hz, got {self.band_hz!r}")
        if not np.isfinite(self.link_distance_px) or self.link_distance_px <= 0:
            raise InputError(f"link distance: expected a positive number of pixels, got {self.link_distance_px!r}")
        if int(self.min_track_length) < 1:
            raise InputError(f"min track length: expected >= 1 point, got {self.min_track_length!r}")
        if int(self.max_gap) < 0:
            raise InputError(f"max gap: expected >= 0 frames, got {self.max_gap!r}")
        try:
            stride_ok = self.window_stride is None or (int(self.window_stride) == self.window_stride
                                                       and int(self.window_stride) >= 1)
        except (TypeError, ValueError):
            stride_ok = False
        if not stride_ok:
            raise InputError(f"window stride: expected a whole number of frames >= 1, got {self.window_stride!r}")
        check_rs_agreement(self.rs_agreement_px)
        if self.window_mode not in WINDOW_MODES:
            raise InputError(f"window mode (--window-mode): expected one of {list(WINDOW_MODES)}, got {self.window_mode!r}")
        check_precision(self.precision)
        if not np.isfinite(self.resolution_factor) or self.resolution_factor <= 0:
            raise InputError(f"resolution factor: expected a positive number, got {self.resolution_factor!r}")
        return self

    @property
    def margin(self) -> int:
        if self.margin_frames is not None:
            return int(self.margin_frames)
        return 16 if self.band_hz is not None else 0

    def to_attrs(self) -> dict:
        d = asdict(self)
        d.pop("counting_network_auto", None)
        d["model"] = None if self.model is None else str(self.model)
        if d["bubbles_per_frame"] is not None and not np.isscalar(d["bubbles_per_frame"]):
            d["bubbles_per_frame"] = "per-frame array"
        return json.loads(json.dumps(d, default=lambda o: np.asarray(o).tolist()))


def _check_svd_cutoff(cutoff) -> None:
    """0 / None = no SVD filter; k > 0 or a band (k1, k2) with k1 >= 0. Negative numbers are refused
    (they used to mean "no filter" silently)."""
    if cutoff is None:
        return
    values = [cutoff] if np.isscalar(cutoff) else list(cutoff)
    for v in values:
        if v is None:
            continue
        try:
            ok = float(v) == int(v) and int(v) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"svd cutoff (--svd-cutoff): expected 0 (no SVD filter) or a whole number of singular "
                             f"components >= 1 to remove, got {cutoff!r}")


@dataclass
class LocalizerContext:
    """What a localizer factory gets: geometry, parameters, resolved device, optional counter."""

    pixel_size_mm: tuple[float, float]
    origin_mm: tuple[float, float]
    wavelength_mm: float
    frame_rate_hz: float
    frame_shape: tuple[int, int]
    n_frames: int
    params: UlmParams
    device: Any = None
    counter: Callable | None = None
    # Detections kept per frame (global index; -1 = not reported): filled by the localizers.
    frame_counts: np.ndarray | None = None

    def record_counts(self, start: int, counts: np.ndarray) -> None:
        """Frames start, start + 1, ... kept counts[0], counts[1], ... detections."""
        if self.frame_counts is not None:
            counts = np.asarray(counts).reshape(-1)
            self.frame_counts[start:start + counts.size] = counts


_COUNTERS: dict[str, Callable[[LocalizerContext], Callable]] = {}


def register_counter(name: str, factory: Callable[[LocalizerContext], Callable]) -> None:
    """Add a counting network for the classical methods; `default` is the one `counting_network` uses."""
    _COUNTERS[str(name).lower()] = factory


class ClassicalLocalizer:
    """Regional maxima + weighted average / radial symmetry on each pushed block (no state needed)."""

    def __init__(self, ctx: LocalizerContext, method: str):
        self.ctx = ctx
        self.method = method
        p = ctx.params
        if p.counting_network:
            if ctx.counter is None:
                raise InputError("counting network: none is registered for the classical methods; give "
                                 "--bubbles-per-frame N, or use --method 3dml (which has its own counter)")
        elif not np.isscalar(p.bubbles_per_frame):
            counts = np.asarray(p.bubbles_per_frame)
            if counts.shape != (ctx.n_frames,):
                raise InputError(f"bubbles per frame: a per-frame array must have one count per frame "
                                 f"({ctx.n_frames}), got shape {counts.shape}")

    def push(self, frames: np.ndarray, start: int) -> np.ndarray:
        p = self.ctx.params
        n = frames.shape[0]
        if p.counting_network:
            counts = np.asarray(self.ctx.counter(frames, start))
        elif np.isscalar(p.bubbles_per_frame):
            counts = int(round(float(p.bubbles_per_frame)))
        else:
            counts = np.asarray(p.bubbles_per_frame)[start:start + n]
        self.ctx.record_counts(start, np.broadcast_to(counts, (n,)))
        rows = localize(frames, counts, self.method, p.fwhm_px, p.window, p.max_maxima)
        return to_mm(rows, self.ctx.pixel_size_mm, self.ctx.origin_mm, frame_offset=start)

    def finish(self) -> np.ndarray:
        return np.zeros((0, 4))


def dml_localizer(ctx: LocalizerContext):
    from .dml_inference import DmlLocalizationRunner

    p = ctx.params
    return DmlLocalizationRunner(ctx.pixel_size_mm, ctx.origin_mm, ctx.wavelength_mm, model=p.model,
                                 device=ctx.device if ctx.device is not None else p.device,
                                 bubbles_per_frame=p.bubbles_per_frame, record_counts=ctx.record_counts,
                                 window_mode=p.window_mode,
                                 window_stride=None if p.window_stride is None else int(p.window_stride),
                                 rs_agreement_px=p.rs_agreement_px, fwhm_px=p.fwhm_px, window=p.window,
                                 precision=p.precision)


def _default_counter(ctx: LocalizerContext):
    """The 3DML-ResNet checkpoint's counting network (imported lazily: torch models only when used)."""
    from .dml_inference import pipeline_counter

    try:
        return pipeline_counter(ctx)
    except InputError as exc:
        # Say which feature needed the checkpoint and how to do without it.
        raise InputError(f"counting network: {exc} (give a 3DML-ResNet checkpoint with --checkpoint PATH, or "
                         f"--bubbles-per-frame N)") from exc


# Factories of the built-in localizers, named in the registry (localizers.py).


def radial_symmetry_localizer(ctx: LocalizerContext) -> ClassicalLocalizer:
    return ClassicalLocalizer(ctx, "rs")


def weighted_average_localizer(ctx: LocalizerContext) -> ClassicalLocalizer:
    return ClassicalLocalizer(ctx, "wa")


register_counter("default", _default_counter)


# ------------------------------------------------------------------------------------------------


class _RowStore:
    """Growing [K, 4] table of localizations (amortised doubling) plus their track ids."""

    def __init__(self):
        self.rows = np.zeros((1024, 4))
        self.n = 0

    def append(self, rows: np.ndarray) -> np.ndarray:
        k = rows.shape[0]
        if self.n + k > self.rows.shape[0]:
            grown = np.zeros((max(2 * self.rows.shape[0], self.n + k), 4))
            grown[:self.n] = self.rows[:self.n]
            self.rows = grown
        self.rows[self.n:self.n + k] = rows[:, :4]
        idx = np.arange(self.n, self.n + k)
        self.n += k
        return idx

    def table(self) -> np.ndarray:
        return self.rows[:self.n]


def _memory_blocks(frames: np.ndarray, block_frames: int, overlap: int):
    """iter_blocks' contract for frames already in memory."""
    n = frames.shape[0]
    stride = block_frames - overlap
    start = 0
    while True:
        stop = min(start + block_frames, n)
        yield start, frames[start:stop]
        if stop >= n:
            break
        start += stride


def _geometry(source):
    """(kind, shape, pixel_size_mm, origin_mm, frame_rate_hz, wavelength_mm, blocks_fn) without gt."""
    from ultrasound_ai.io.ulm_files import Acquisition, acquisition_info, iter_blocks

    if isinstance(source, Acquisition):
        frames = source.frames
        return (source.kind, source.shape, source.pixel_size_mm, source.origin_mm, source.frame_rate_hz,
                source.wavelength_mm, lambda b, o: _memory_blocks(frames, b, o), "acquisition")
    if isinstance(source, (str, os.PathLike)):
        info = acquisition_info(source)
        return (info.kind, info.shape, info.pixel_size_mm, info.origin_mm, info.frame_rate_hz, info.wavelength_mm,
                lambda b, o: iter_blocks(source, b, o), str(source))
    raise InputError(f"ULM processing: expected an acquisition file path or an Acquisition, got {type(source).__name__}")


def _min_filtered_frames(params: UlmParams) -> int:
    """Fewest frames a block needs for the clutter filters (0 when no filter is on)."""
    need = 0
    if params.svd_cutoff is not None:
        c = params.svd_cutoff
        if np.isscalar(c):
            need = int(c) + 1  # at least one component must be kept
        else:
            c = list(c)
            k1 = int(c[0]) if len(c) else 0
            k2 = 0 if len(c) < 2 or c[1] is None else int(c[1])
            need = k2 if k2 > 0 else k1 + 1
    if params.band_hz is not None:
        # sosfiltfilt's default padding: 3 * (2 * sections + 1) frames; one section per 2nd-order stage.
        sections = 2 if float(params.band_hz[0]) > 0 else 1
        need = max(need, 3 * (2 * sections + 1) + 1)
    return need


def _merge_short_tail(blocks, t_total: int, min_frames: int):
    """Pass (start, block) through, but fold a last block shorter than `min_frames` into the one before
    it (overlapping frames taken once), so the filters never see a too-short tail."""
    prev = None
    for start, block in blocks:
        n = block.shape[0]
        if prev is not None:
            p_start, p_block = prev
            p_end = p_start + p_block.shape[0]
            if start + n >= t_total and n < min_frames:
                yield p_start, np.concatenate([p_block, block[p_end - start:]], axis=0)
                return
            yield prev
        prev = (start, block)
    if prev is not None:
        yield prev


def _clutter(block: np.ndarray, params: UlmParams, frame_rate_hz: float, device) -> np.ndarray:
    from .clutter import bandpass_filter, parse_cutoff, svd_filter

    out = block
    if params.svd_cutoff is not None:
        k1, k2 = parse_cutoff(params.svd_cutoff, block.shape[0])
        if (k1, k2) != (0, block.shape[0]):
            out = svd_filter(block, (k1, k2), device=device)
            if not isinstance(out, np.ndarray):
                out = out.cpu().numpy()
    if params.band_hz is not None:
        out = bandpass_filter(out, frame_rate_hz, tuple(params.band_hz))
    return out


class _TrackStore:
    """Localizations as they arrive -> tracker -> rendering of every closed track; the result's tables."""

    def __init__(self, params: UlmParams, pix, origin, frame_shape, wavelength_mm: float, frame_rate_hz: float):
        self.params = params
        self.pix, self.origin, self.fr = pix, origin, frame_rate_hz
        self.grid = RenderGrid.for_acquisition(pix, origin, frame_shape, wavelength_mm, params.resolution_factor)
        self.renderer = Renderer(self.grid)
        self.tracker = Tracker(params.link_distance_px, params.max_gap, params.min_track_length)
        self.store = _RowStore()
        self.track_ids: list[tuple[np.ndarray, int]] = []
        self.step_mm = min(self.grid.pixel_size_mm) / 2  # interpolation finer than the rendering grid: no holes

    def _render(self, closed: list[np.ndarray]) -> None:
        if not closed:
            return
        first = len(self.track_ids)
        table = self.store.table()
        for k, members in enumerate(closed):
            self.track_ids.append((members, first + k))
        fine = postprocess_tracks([table[m, :3] for m in closed], np.arange(first, first + len(closed)),
                                  self.fr, self.params.smooth_window, self.step_mm)
        self.renderer.add(fine)

    def take(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
        if rows.shape[0] == 0:
            return
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        idx = self.store.append(rows)
        pz = (rows[:, 1] - self.origin[0]) / self.pix[0]
        px = (rows[:, 2] - self.origin[1]) / self.pix[1]
        self._render(self.tracker.add_points(rows[:, 0], np.column_stack([pz, px]), idx))

    def finish(self) -> tuple[np.ndarray, dict]:
        """(localizations [K, 5] with track ids, rendered images)."""
        self._render(self.tracker.finish())
        table = self.store.table()
        loc = np.zeros((table.shape[0], 5))
        loc[:, :4] = table
        loc[:, 4] = -1
        for members, tid in self.track_ids:
            loc[members, 4] = tid
        return loc, self.renderer.images()


class _InputGuard:
    """Checks each block of the input: finite samples, and not an all-zero acquisition (at the end)."""

    def __init__(self, label: str):
        self.label = label
        self.any_signal = False

    def check(self, block: np.ndarray, start: int) -> None:
        finite = np.isfinite(block)
        if not finite.all():
            bad = start + int(np.argmin(finite.reshape(finite.shape[0], -1).all(axis=1)))
            raise InputError(f"{self.label}: frame {bad} contains NaN or infinite values; expected finite IQ or "
                             f"B-mode samples (repair or drop the damaged frames)")
        if not self.any_signal:
            self.any_signal = bool(np.any(block != 0))

    def finish(self) -> None:
        if not self.any_signal:
            raise InputError(f"{self.label}: the frames are all zero (no signal to localize); check the export "
                             f"of the acquisition")


def _check_filter_frames(params: UlmParams, t_total: int, label: str) -> None:
    """An acquisition too short for the clutter filters, in the words of the options (CLI flags)."""
    need = _min_filtered_frames(params)
    if t_total >= need:
        return
    if params.svd_cutoff is not None and t_total < _min_filtered_frames(UlmParams(svd_cutoff=params.svd_cutoff)):
        raise InputError(f"{label}: {t_total} frames, but the SVD clutter filter (--svd-cutoff {params.svd_cutoff}) "
                         f"removes components from a block of frames and needs at least "
                         f"{_min_filtered_frames(UlmParams(svd_cutoff=params.svd_cutoff))} frames; give a smaller "
                         f"--svd-cutoff, or 0 for no SVD filter")
    raise InputError(f"{label}: {t_total} frames, but the temporal band-pass (--band {params.band_hz}) needs at "
                     f"least {need} frames; turn it off or give a longer acquisition")


def _frame_blocks(blocks_fn, params: UlmParams, t_total: int):
    """(start, block, a, b): blocks as read, with the kept part [a, b) of each (see the module docstring)."""
    margin = params.margin
    block_frames = int(params.block_frames)
    if 2 * margin >= block_frames:
        raise InputError(f"block_frames ({block_frames}) must exceed twice the overlap margin ({margin})")
    blocks = blocks_fn(block_frames, 2 * margin)
    need = _min_filtered_frames(params)
    if need:
        if block_frames < need:
            raise InputError(f"block_frames ({block_frames}) is too short for the clutter filters (svd cutoff "
                             f"{params.svd_cutoff!r}, band {params.band_hz!r}): they need at least {need} frames per block")
        blocks = _merge_short_tail(blocks, t_total, max(need, block_frames // 2))
    for start, block in blocks:
        n = block.shape[0]
        yield start, block, (0 if start == 0 else margin), (n if start + n >= t_total else n - margin)


def _check_memory(params: UlmParams, kind: str, shape, pix, origin, lam) -> None:
    """Estimate the two big allocations before any work (core/memory.py): exit 2 naming the option."""
    from ultrasound_ai.core.memory import check_memory

    t_total, nz, nx = shape
    frames = min(int(params.block_frames), t_total)
    sample = 8 if kind == "iq" else 4
    # The block as read, the SVD projection, the filtered block and the localizer's envelope.
    check_memory(4 * frames * nz * nx * sample, what=f"a block of {frames} frames of {nz}x{nx} pixels",
                 option="--block-frames (block_frames)")
    grid = RenderGrid.for_acquisition(pix, origin, (nz, nx), lam, params.resolution_factor)
    # Three float64 accumulators and the three float64 maps made from them.
    check_memory(6 * 8 * grid.shape[0] * grid.shape[1],
                 what=f"a rendering grid of {grid.shape[0]}x{grid.shape[1]} pixels",
                 option="--resolution-factor (resolution_factor)")


def _as_params(params) -> UlmParams:
    if params is None:
        params = UlmParams()
    elif isinstance(params, dict):
        unknown = set(params) - set(UlmParams.__dataclass_fields__)
        if unknown:
            raise InputError(f"ULM parameters: unknown {sorted(unknown)}; expected some of {sorted(UlmParams.__dataclass_fields__)}")
        params = UlmParams(**params)
    return params.validate()


def _count_source(name: str, params: UlmParams) -> str:
    """Where the per-frame number of detections comes from, after resolving the automatic default."""
    if not params.counting_network:
        return "fixed"
    if name == "3dml" or params.model is not None:
        return "counting network"
    from ultrasound_ai.models.registry import list_models

    if list_models(_DML_METHOD):
        return "counting network"
    if params.counting_network_auto:
        # Automatic default without an installed counting network: the classical chain's fixed N.
        params.counting_network = False
        params.bubbles_per_frame = FALLBACK_BUBBLES_PER_FRAME
        return "fixed (no counting network installed)"
    return "counting network"  # explicitly asked for: the counter factory names what is missing


def process_acquisition(source, method: str = "rs", params: UlmParams | dict | None = None, out=None, *,
                        png=None, progress: Callable[[float, str], None] | None = None,
                        cancel_check: Callable[[], bool] | None = None, show_progress: bool = False):
    """Process an acquisition (file path or Acquisition) into a ULM result; write it to `out` if given.

    progress(fraction, message) is called after every block; cancel_check() returning True (or raising
    Cancelled) stops the work with Cancelled and leaves no output file behind.
    Returns the UlmResult.
    """
    from tqdm import tqdm

    from ultrasound_ai.io.ulm_files import UlmResult, write_result

    params = _as_params(params)
    name = str(method).lower()
    if name not in localizer_names():
        raise InputError(f"method: expected one of {localizer_names()}, got {method!r}")
    kind, shape, pix, origin, fr, lam, blocks_fn, label = _geometry(source)
    t_total, nz, nx = shape
    _check_filter_frames(params, t_total, label)
    _check_memory(params, kind, shape, pix, origin, lam)
    count_source = _count_source(name, params)
    device = None
    if params.svd_cutoff is not None or name == "3dml" or params.counting_network:
        from ultrasound_ai.core.device import resolve_device

        device = resolve_device(params.device)
    ctx = LocalizerContext(pixel_size_mm=tuple(pix), origin_mm=tuple(origin), wavelength_mm=float(lam),
                           frame_rate_hz=float(fr), frame_shape=(nz, nx), n_frames=t_total, params=params,
                           device=device, frame_counts=np.full(t_total, -1, np.int64))
    if params.counting_network and name != "3dml":
        factory = _COUNTERS.get("default")
        ctx.counter = factory(ctx) if factory is not None else None
    localizer = create_localizer(name, ctx)
    tracks = _TrackStore(params, pix, origin, (nz, nx), float(lam), float(fr))
    guard = _InputGuard(label)

    def check_cancel() -> None:
        if cancel_check is not None and cancel_check():
            raise Cancelled("ULM processing cancelled")

    bar = tqdm(total=t_total, desc=f"ulm {name}", unit="frame", disable=not show_progress)
    try:
        for start, block, a, b in _frame_blocks(blocks_fn, params, t_total):
            check_cancel()
            guard.check(block, start)
            filtered = _clutter(block, params, fr, device)
            if hasattr(localizer, "push_into"):  # tracks each batch of rows while the next one is computed
                localizer.push_into(filtered[a:b], start + a, tracks.take)
            else:
                tracks.take(localizer.push(filtered[a:b], start + a))
            bar.update(b - a)
            if progress is not None:
                progress((start + b) / t_total, f"frames {start + b}/{t_total}")
        check_cancel()
        guard.finish()
        tracks.take(localizer.finish())
        loc, images = tracks.finish()
    finally:
        bar.close()

    attrs = {"method": name, "pipeline_version": PIPELINE_VERSION, "n_frames": int(t_total),
             "n_tracks": len(tracks.track_ids), "resolution_factor": float(params.resolution_factor),
             "wavelength_mm": float(lam), "frame_rate_hz": float(fr), "count_source": count_source,
             "params": params.to_attrs()}
    counts = ctx.frame_counts if np.all(ctx.frame_counts >= 0) else None  # a custom localizer may not say
    result = UlmResult(localizations=loc, **images, pixel_size_mm=tracks.grid.pixel_size_mm,
                       origin_mm=tracks.grid.origin_mm, count_per_frame=counts, attrs=attrs,
                       source=f"ULM result of {label}")
    if out is not None:
        write_result(result, out)
    if png is not None:
        save_maps_png(images, png)
    return result
