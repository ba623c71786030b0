"""Why the default 3DML windows lose a little Jaccard against the old path: the averaged estimates, or the counts?

On the pymust validation pieces of the frozen set (`ulm_frozen_set.py`, never its test pieces), every 8-frame
window at stride 1 is predicted once (fp32), and the pipeline (the same post-processing for every row) is run
on combinations of those predictions:
- `old`: the old path's layout (stride 1, all N estimates of a frame averaged, edge ones included);
- `inner`: the default's layout (windows slid by N - 2, one estimate per frame away from the edges);
- `inner-s1`, `inner-s3`: inner estimates only, slid by 1 (N - 2 averaged) or 3 (two averaged);
- `inner+old-count`, `old+inner-count`: the maps of one layout with the counts (detections per frame) of the
  other, which says whether the counting causes the difference.
Pooled raw and tracked Jaccard per row; printed only (a diagnosis, no benchmark section).

    python bench/diagnose_ulm_window_ensemble.py [--pieces val_b40_n40_p0 ...]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = ("old", "inner", "inner-s1", "inner-s3", "inner+old-count", "old+inner-count")


class WindowBank:
    """Every stride-1 window's prediction of one envelope, computed on first use; a predictor that answers
    from it (windows are recognised by their first frame) with the counts optionally replaced per frame."""

    def __init__(self, predict, env: np.ndarray, n: int):
        self.predict, self.env, self.n = predict, env, n
        self.start = {hashlib.sha1(f.tobytes()).hexdigest(): t for t, f in enumerate(env)}
        self.bank: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.counts: np.ndarray | None = None  # per frame, replacing the network's when set

    def window(self, s: int):
        if s not in self.bank:
            maps, counts = self.predict(self.env[None, s:s + self.n])
            self.bank[s] = (maps[0], counts[0])
        return self.bank[s]

    def __call__(self, windows: np.ndarray):
        maps, counts = [], []
        for w in windows:
            s = self.start.get(hashlib.sha1(w[0].tobytes()).hexdigest())
            if s is None or not np.array_equal(self.env[s:s + self.n], w):
                raise RuntimeError("diagnosis: a window that is not a stride-1 window of the envelope")
            m, c = self.window(s)
            maps.append(m)
            counts.append(c if self.counts is None else self.counts[s:s + self.n].astype(np.float32))
        return np.stack(maps), np.stack(counts)

    def mean_counts(self, layout: str) -> np.ndarray:
        """Per-frame count of the `old` (all windows holding the frame) or `inner` (the default's one) layout."""
        t_total, n = self.env.shape[0], self.n
        out = np.zeros(t_total)
        starts = list(range(0, t_total - n + 1, n - 2))
        for t in range(t_total):
            if layout == "old":
                ests = [(s, t - s) for s in range(max(0, t - n + 1), min(t, t_total - n) + 1)]
            else:
                own = [s for s in starts if s + 1 <= t <= s + n - 2 or (s == 0 and t == 0)]
                s = own[0] if own else t_total - n  # uncovered frames: the tail window
                ests = [(s, t - s)]
            out[t] = np.mean([self.window(s)[1][j] for s, j in ests])
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pieces", nargs="+", default=None, help="validation pieces (default: every val_* made)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import ulm_frozen_set as fs

    from ultrasound_ai.io.ulm_files import read_acquisition
    from ultrasound_ai.ulm.dml_inference import load_dml_model, model_predictor
    from ultrasound_ai.ulm.metrics import evaluate_result
    from ultrasound_ai.ulm.pipeline import UlmParams, _clutter, dml_localizer, process_acquisition, register_localizer

    net, _ = load_dml_model(None, "cpu")
    n = net.config.window_frames
    predict = model_predictor(net, channels_last=True, int8=False)
    state: dict = {}

    def banked(ctx):
        from dataclasses import replace

        r = dml_localizer(replace(ctx, params=replace(ctx.params, precision="fp32")))
        r.runner.predict, r.runner.workers = state["bank"], 1
        return r

    register_localizer("3dml-banked", banked)
    layouts = {"old": dict(window_mode="sliding", window_stride=1), "inner": {}, "inner-s1": dict(window_stride=1),
               "inner-s3": dict(window_stride=3)}
    paths = sorted(fs.DATA_DIR.glob("val_*.h5"))
    if args.pieces:
        paths = [p for p in paths if p.stem in args.pieces]
    if not paths:
        print(f"no validation piece in {fs.DATA_DIR}: run `python bench/ulm_frozen_set.py generate` first")
        return 2
    totals = {row: np.zeros((2, 3)) for row in ROWS}
    for path in paths:
        acq = read_acquisition(path)
        env = np.abs(_clutter(acq.iq, UlmParams(), acq.frame_rate_hz, None)).astype(np.float32)
        bank = state["bank"] = WindowBank(predict, env, n)
        counts = {"old": None, "inner": None}
        line = []
        for row in ROWS:
            maps_of, _, count_of = row.partition("+")
            bank.counts = None
            if count_of:
                layout = count_of.removesuffix("-count")
                counts[layout] = bank.mean_counts(layout) if counts[layout] is None else counts[layout]
                bank.counts = counts[layout]
            res = process_acquisition(acq, "3dml-banked", UlmParams(device="cpu", **layouts[maps_of]))
            ev = evaluate_result(res, acq.gt_positions, acq.wavelength_mm, acq.frame_rate_hz)
            for i, kind in enumerate(("raw", "tracked")):
                totals[row][i] += [ev[kind][c] for c in ("tp", "fp", "fn")]
            line.append(f"{row} {ev['raw']['jaccard']:.4f}/{ev['tracked']['jaccard']:.4f}")
        print(path.stem, "raw/tracked:", ", ".join(line), flush=True)
    print(f"pooled over {len(paths)} validation pieces (raw / tracked Jaccard):")
    for row, t in totals.items():
        jac = t[:, 0] / t.sum(axis=1)
        print(f"  {row:16s} {jac[0]:.4f} / {jac[1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
