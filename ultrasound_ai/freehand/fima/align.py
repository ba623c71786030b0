"""FiMA's online alignment (paper §2.3): test-time adaptation of a trained IMU variant to one sweep.

Per sweep, starting from the trained weights, Adam minimises

    L = L_align + L_prior
    L_align = InfoNCE(F_I, F_A), tau = 0.1 (eq. 3): per frame pair i the image feature F_I[i] should
              match its own fusion-weighted IMU-acceleration feature F_A[i] better than those of the other
              pairs of the sweep (window);
    L_prior = 1 - Pearson(predicted Euler angles, fusion-weighted mean IMU angle) per axis (eq. 4): the
              IMUs' relative rotations, weighted by the angle fusion weights, serve as pseudo-labels.

for `steps` steps (paper: 60) at `lr` (paper: 2e-6). Nothing is learned from ground truth.

What adapts. By default only `decoder_parameters()` (the stage SSM-Cs, the IMU fusion, the head SSM-C and
the head): the backbone's features (`encode`: the CNN and SSM-F, by far the most of the cost) are computed
once without gradients and re-decoded at every step, which costs seconds per sweep on a CPU.
``whole_network=True`` adapts every parameter, re-encoding the frames with gradients at every step (the
paper's reading; about 3x a training step per window per step: a GPU job at full size).

Reset and order. The model passed in is never modified: each call adapts a deep copy, so every sweep
starts from the trained weights and the result for a sweep does not depend on which sweeps came before.
The copy runs in eval mode (batch norm uses its running statistics and does not update them).

`fima.method.align_sweep` runs it on one sweep and returns the adapted estimate.

A sweep longer than the network's window is aligned as its windows together: the loss is the mean of the
windows' losses (each window's InfoNCE takes its negatives from its own pairs), one Adam step per step.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ultrasound_ai.core.errors import InputError

__all__ = ["AlignOptions", "AlignWindow", "AlignResult", "online_align", "check_settings", "DEFAULT_STEPS", "DEFAULT_LR",
           "DEFAULT_TAU"]

DEFAULT_STEPS = 60
DEFAULT_LR = 2e-6
DEFAULT_TAU = 0.1


@dataclass
class AlignOptions:
    """Online alignment settings (paper §2.3): Adam steps and lr, InfoNCE temperature, what adapts."""

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    tau: float = DEFAULT_TAU
    whole_network: bool = False


@dataclass
class AlignWindow:
    """One window of a sweep: cached `encode` features (decoder-only alignment) and/or the frames
    [1, n, h, w] (whole-network alignment), and the per-pair IMU inputs [1, n-1, M, 3]."""

    imu_acc: torch.Tensor
    imu_angle: torch.Tensor
    features: object = None  # fima.model.FimaFeatures
    frames: Optional[torch.Tensor] = None


@dataclass
class AlignResult:
    """model: the adapted copy (eval mode). history: L_align + L_prior (window mean) before each step and,
    last, after the final step (steps + 1 values); info_nce / prior: its two terms, same indexing."""

    model: torch.nn.Module
    history: List[float]
    info_nce: List[float] = field(default_factory=list)
    prior: List[float] = field(default_factory=list)
    steps: int = 0
    lr: float = 0.0
    whole_network: bool = False
    seconds: float = 0.0


def check_settings(steps, lr, tau) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise InputError(f"online alignment align_steps: expected an integer >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"online alignment align_lr: expected a positive finite number, got {lr!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise InputError(f"online alignment tau: expected a positive finite number, got {tau!r}")


def online_align(model, windows: Sequence[AlignWindow], *, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                 tau: float = DEFAULT_TAU, whole_network: bool = False, pair_chunk: Optional[int] = None,
                 progress: Optional[Callable[[float, str], None]] = None) -> AlignResult:
    """Adapt a copy of `model` (a FimaNet IMU variant) to the sweep `windows`; see the module docstring."""
    from ultrasound_ai.freehand.fima.losses import alignment_loss

    check_settings(steps, lr, tau)
    if not model.cfg.uses_imus:
        raise InputError(f"online alignment: model variant {model.cfg.variant!r} uses the images only; "
                         "it has no IMU features to align")
    if not windows:
        raise InputError("online alignment: no windows given")
    for k, w in enumerate(windows):
        if w.imu_acc is None or w.imu_angle is None:
            raise InputError(f"online alignment window {k}: IMU inputs are required")
        if whole_network and w.frames is None:
            raise InputError(f"online alignment window {k}: whole_network=True needs the window's frames")
        if not whole_network and w.features is None:
            raise InputError(f"online alignment window {k}: decoder-only alignment needs the cached features")
    t0 = time.monotonic()
    net = copy.deepcopy(model)  # the reset: every sweep starts from the trained weights
    net.eval()
    trainable = list(net.parameters()) if whole_network else list(net.decoder_parameters())
    chosen = {id(p) for p in trainable}
    for p in net.parameters():
        p.requires_grad_(id(p) in chosen)
    opt = torch.optim.Adam(trainable, lr=float(lr))
    history, nce, prior = [], [], []
    n_win = len(windows)
    for step in range(int(steps) + 1):
        last = step == int(steps)
        opt.zero_grad(set_to_none=True)
        total = {"loss": 0.0, "info_nce": 0.0, "prior": 0.0}
        with torch.set_grad_enabled(not last):
            for w in windows:
                if whole_network:
                    out = net(w.frames, w.imu_acc, w.imu_angle, pair_chunk=pair_chunk)
                else:
                    out = net.decode(w.features, w.imu_acc, w.imu_angle)
                loss, parts = alignment_loss(out, w.imu_angle, tau)
                if not last:
                    (loss / n_win).backward()  # gradients accumulate window by window: bounded memory
                total["loss"] += float(loss.detach()) / n_win
                total["info_nce"] += parts["info_nce"] / n_win
                total["prior"] += parts["prior"] / n_win
        if not math.isfinite(total["loss"]):
            raise RuntimeError(f"online alignment: the loss is not finite at step {step} (lower align_lr?)")
        history.append(total["loss"])
        nce.append(total["info_nce"])
        prior.append(total["prior"])
        if not last:
            opt.step()
            if progress is not None:
                progress((step + 1) / max(1, int(steps)), f"FiMA online alignment: step {step + 1}/{steps}")
    for p in net.parameters():
        p.requires_grad_(False)
    return AlignResult(model=net, history=history, info_nce=nce, prior=prior, steps=int(steps), lr=float(lr),
                       whole_network=bool(whole_network), seconds=time.monotonic() - t0)
