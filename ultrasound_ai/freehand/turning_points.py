"""Where a freehand sweep reverses its direction of travel, from the images alone (mirror correlation).

Two frames cannot tell a motion from its mirror image through the image plane, so an images-only method
knows how far each frame pair moved out of plane but not which way. A reversal, though, shows in the
sequence: when the probe turns at frame r, frames r - j and r + j lie at about the same elevation (the
probe passes the same place on its way out and back), so they are far more alike than frames 2j apart on
one side of r, which under steady travel lie 2j steps apart. Score per frame r:

    s(r) = mean_j NCC(f[r-j], f[r+j]) - max(mean_j NCC(f[r], f[r+2j]), mean_j NCC(f[r-2j], f[r])),  j = 1..J

s is about 0 under steady motion (the three pairs are equally far apart), also during a pause (all three
are alike), and clearly positive at a reversal. Turning points are the local maxima of s above a threshold,
at least `min_separation` frames apart; the direction of travel flips at each.

Threshold: chosen on sweeps of the training simulator (motion "varied", seeds 778,000-778,011, none in a
frozen set): the |dz|-weighted agreement between the predicted and the true direction of travel of the frame
centre (up to one sign per sweep) was 0.54 assuming one direction throughout, and with the turning points
0.56 / 0.67 / 0.63 / 0.61 at thresholds 0.10 / 0.15 / 0.20 / 0.25: 0.15 kept. It helps linear and loop
sweeps with real reversals; on sector sweeps (rotation about the probe face, the frame centre barely
moves) a spurious turn can flip rotations. With MoGLo-Net (its direction "turns") it lowered the mean FDR on
the training family's held-out set freehand-v2 (48.4 vs 52.9 %, lower on 7 of the 8 sweeps where it found a
turn) but raised it on the independent family freehand-indep-v1 (43.0 vs 37.5 %; linear and curved sweeps,
whose speed changes and pauses it took for turns): an option for research, not a default.
"""

from __future__ import annotations

import numpy as np

from ultrasound_ai.core.errors import InputError

__all__ = ["mirror_scores", "turning_points", "travel_signs", "DEFAULT_THRESHOLD", "DEFAULT_LAGS"]

DEFAULT_THRESHOLD = 0.15
DEFAULT_LAGS = 3
DEFAULT_MIN_SEPARATION = 5


def _normalised(frames: np.ndarray) -> np.ndarray:
    f = np.asarray(frames, dtype=np.float64).reshape(len(frames), -1)
    f = f - f.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(norm, 1e-12)


def mirror_scores(frames, lags: int = DEFAULT_LAGS) -> np.ndarray:
    """s(r) per frame (module docstring); NaN where r - 2*lags or r + 2*lags falls outside the sweep."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or len(frames) < 1:
        raise InputError(f"turning points: expected frames [N, H, W], got shape {frames.shape}")
    lags = int(lags)
    if lags < 1:
        raise InputError(f"turning points: lags must be a positive number of frames, got {lags}")
    f = _normalised(frames)
    n = len(f)
    out = np.full(n, np.nan)
    if n <= 4 * lags:
        return out
    r = np.arange(2 * lags, n - 2 * lags)
    mirror = np.zeros(len(r))
    ahead = np.zeros(len(r))
    behind = np.zeros(len(r))
    for j in range(1, lags + 1):
        mirror += np.einsum("ij,ij->i", f[r - j], f[r + j])
        ahead += np.einsum("ij,ij->i", f[r], f[r + 2 * j])
        behind += np.einsum("ij,ij->i", f[r - 2 * j], f[r])
    out[r] = (mirror - np.maximum(ahead, behind)) / lags
    return out


def turning_points(frames, threshold: float = DEFAULT_THRESHOLD, lags: int = DEFAULT_LAGS,
                   min_separation: int = DEFAULT_MIN_SEPARATION) -> list[int]:
    """Frames at which the direction of travel reverses, in increasing order."""
    s = np.nan_to_num(mirror_scores(frames, lags), nan=-np.inf)
    picked: list[int] = []
    for r in np.argsort(-s, kind="stable"):
        if s[r] < threshold:
            break
        if all(abs(int(r) - p) >= int(min_separation) for p in picked):
            picked.append(int(r))
    return sorted(picked)


def travel_signs(n_pairs: int, turns) -> np.ndarray:
    """+1 / -1 per frame pair (pair i = frames i -> i + 1): +1 up to the first turning point, flipping at each."""
    signs = np.ones(int(n_pairs))
    for t in turns:
        signs[int(t):] *= -1
    return signs
