"""Where in a window 3DML-ResNet estimates a frame best: the evidence for the "inner" window layout.

Every N-frame window of one acquisition is run once (stride 1, the shipped model, the pipeline's SVD
filter); each frame's estimate is then taken from chosen windows and positions and run through the
pipeline's detection, tracking and metrics (raw and tracked Jaccard):
- "position j": every frame estimated once, by the window in which it is at position j;
- the layouts of `--window-mode`: the paper's stride-1 average, sliding windows at stride 2 and 4,
  tiled windows, inner windows slid by 6, 3 and 2 (positions 1..N-2, estimates averaged).
No timing; prints one JSON line per variant (no BENCHMARKS section).

    python bench/bench_ulm_windows.py                      # 400 fast-simulated frames, 100 bubbles/frame
    python bench/bench_ulm_windows.py --piece val_b40_n20_p0   # a frozen-set VALIDATION acquisition

(The speed benchmark's data is the default: seed 12, clutter +20 dB, noise -30 dB. Use the frozen set's
validation pieces only, never its test pieces, to choose anything.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _acquisition(args):
    if args.piece:
        import ulm_frozen_set as fs

        found = [p for p in fs.pieces() if p.name == args.piece]
        if not found:
            raise SystemExit(f"unknown frozen-set piece {args.piece!r}")
        return fs.load(found[0])
    from ultrasound_ai.ulm.simulator import UlmSimConfig, simulate_acquisition

    return simulate_acquisition(UlmSimConfig(n_frames=args.frames, bubbles_per_frame=args.bubbles, clutter_db=20.0,
                                             noise_db=-30.0, seed=12))


class _Replay:
    """A pipeline localizer that emits given per-frame estimates (or captures the filtered frames)."""

    estimates: list = []
    captured: list | None = []  # None once the frames are captured

    def __init__(self, ctx):
        self.ctx = ctx

    def push(self, frames, start):
        if _Replay.captured is not None:
            _Replay.captured.append(np.abs(frames).astype(np.float32))
        return np.zeros((0, 4))

    def finish(self):
        from ultrasound_ai.ulm.dml_inference import estimates_to_localizations

        return estimates_to_localizations(_Replay.estimates, self.ctx.pixel_size_mm, self.ctx.origin_mm,
                                          peaks_only=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--piece", default=None, help="a frozen-set acquisition (validation pieces only for choices)")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--bubbles", type=float, default=100.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from ultrasound_ai.ulm import dml_inference as di
    from ultrasound_ai.ulm.metrics import evaluate_result
    from ultrasound_ai.ulm.pipeline import UlmParams, process_acquisition, register_localizer

    acq = _acquisition(args)
    register_localizer("replay-windows", _Replay)
    params = UlmParams(device="cpu", bubbles_per_frame=1)  # the count comes from the estimates
    process_acquisition(acq, "replay-windows", params)
    env = np.concatenate(_Replay.captured)
    _Replay.captured = None
    net, _ = di.load_dml_model(None, "cpu")
    n, t_total = net.config.window_frames, env.shape[0]
    predict = di.model_predictor(net, channels_last=True)
    starts = list(range(t_total - n + 1))
    maps = np.zeros((len(starts), n, 3) + env.shape[1:], np.float32)
    counts = np.zeros((len(starts), n), np.float32)
    for a in range(0, len(starts), 3):
        group = starts[a:a + 3]
        maps[group], counts[group] = predict(np.stack([env[s:s + n] for s in group]))

    def windows_of(t):
        return range(max(0, t - n + 1), min(t_total - n, t) + 1)

    def score(name, choose):
        """choose(t) -> [(window start, position)] averaged for frame t (the nearest window if empty)."""
        est = []
        for t in range(t_total):
            pairs = choose(t) or [(s, t - s) for s in windows_of(t)][:1]
            est.append(di.FrameEstimate(t, env[t], np.mean([maps[s, j] for s, j in pairs], axis=0),
                                        float(np.mean([counts[s, j] for s, j in pairs])), len(pairs)))
        _Replay.estimates = est
        res = process_acquisition(acq, "replay-windows", params)
        ev = evaluate_result(res, acq.gt_positions, acq.wavelength_mm, acq.frame_rate_hz)
        print(json.dumps({"variant": name, "raw_jaccard": round(ev["raw"]["jaccard"], 4),
                          "tracked_jaccard": round(ev["tracked"]["jaccard"], 4)}), flush=True)

    def layout(stride, margin=0):
        return lambda t: [(s, t - s) for s in windows_of(t) if s % stride == 0 and margin <= t - s < n - margin]

    for j in range(n):
        score(f"position {j}", lambda t, j=j: [(t - j, j)] if 0 <= t - j <= t_total - n else [])
    score("sliding stride 1 (the paper's, the old path)", layout(1))
    score("sliding stride 2", layout(2))
    score("sliding stride 4", layout(4))
    score(f"tiled (stride {n})", layout(n))
    for stride in (n - 2, 3, 2):
        score(f"inner stride {stride}", layout(stride, di.INNER_MARGIN))
    return 0


if __name__ == "__main__":
    sys.exit(main())
