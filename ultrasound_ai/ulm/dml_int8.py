"""8-bit integer inference of the 3DML-ResNet (CPU): the same checkpoint, quantized when it is loaded.

Why: on CPU the 3D convolutions are ~94 % of the network's time and fp32 oneDNN already runs them near
the cores' FMA peak (~100 GFLOP/s per core measured on the AVX2 EPYC), so only fewer operations per
frame or cheaper ones can make the whole pipeline faster; int8 convolutions (oneDNN, u8 x s8 with 32-bit
sums, AVX2) are the cheaper ones: the network ran ~1.7x and the whole pipeline 1.6x faster on one thread,
and on the seven pymust validation pieces the pooled raw / tracked Jaccard was fp32's within 0.001 (each
piece within 0.006). The first and last convolutions stay in fp32: with them in int8 too (the normalised
input on 256 levels) three validation pieces lost 0.005-0.010 tracked Jaccard against fp32.

What is quantized: the 3D ResNet between its first and last convolutions (every convolution with
per-output-channel weight scales, the residual sums, the leaky ReLU; PReLU with its one slope is that
leaky ReLU): the first convolution's output is quantized, the last one's input dequantized. The counting
network stays in fp32 (its ~7 % of the time is not worth its accuracy). Activation ranges are calibrated
once per model on windows of the project's fast simulator (`ulm.simulator`, the training family:
fixed seeds, 40-200 bubbles per frame, -40 to -20 dB noise), never on the acquisition being processed,
so a result does not depend on how the frames are split into blocks. Calibrating takes ~1 s of CPU, once
per process and model.

Needs PyTorch's "onednn" quantized engine (x86 builds); `int8_available()` says whether it is there.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ultrasound_ai.core.errors import InputError

__all__ = ["int8_available", "quantize_resnet", "quantized_engine"]

ENGINE = "onednn"
# Calibration acquisitions (bubbles per frame, noise dB, seed): the training family's range.
_CALIBRATION = ((40.0, -40.0, 910001), (100.0, -30.0, 910002), (200.0, -20.0, 910003))
_CALIBRATION_FRAMES = 16
_CALIBRATION_SHAPE = (48, 48)
_CALIBRATION_TREES = 2  # vessel trees per calibration acquisition (building them is most of the simulation time)

_cache: dict = {}
_lock = threading.Lock()


def int8_available() -> bool:
    return ENGINE in torch.backends.quantized.supported_engines


@contextmanager
def quantized_engine():
    """PyTorch's quantized engine set to oneDNN for the duration (the packed int8 weights are oneDNN's)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class _QuantBlock(nn.Module):
    def __init__(self, block):
        from torch.ao.nn.quantized import FloatFunctional

        super().__init__()
        if block.act.weight.numel() != 1:
            raise InputError("3DML-ResNet int8: expected PReLU with one slope per layer")
        self.conv1, self.conv2 = copy.deepcopy(block.conv1), copy.deepcopy(block.conv2)
        self.act = nn.LeakyReLU(float(block.act.weight))
        self.res_scale = float(block.res_scale)
        self.mul, self.add = FloatFunctional(), FloatFunctional()

    def forward(self, x):
        return self.add.add(x, self.mul.mul_scalar(self.conv2(self.act(self.conv1(x))), self.res_scale))


class _QuantResNet(nn.Module):
    """DmlResNet's forward with quantization stubs: normalised windows [B, N, Z, X] -> maps [B, N, 3, Z, X]."""

    def __init__(self, resnet):
        import torch.ao.quantization as tq
        from torch.ao.nn.quantized import FloatFunctional

        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv_first = copy.deepcopy(resnet.conv_first)
        self.blocks = nn.Sequential(*[_QuantBlock(b) for b in resnet.blocks])
        self.conv_mid, self.conv_last = copy.deepcopy(resnet.conv_mid), copy.deepcopy(resnet.conv_last)
        self.skip = FloatFunctional()

    def forward(self, x, keep=None):
        """keep=(lo, hi): the maps of frames lo..hi-1 only (`dml_resnet.conv_frames`)."""
        from ultrasound_ai.ulm.dml_resnet import conv_frames

        v = x.unsqueeze(1).contiguous(memory_format=torch.channels_last_3d)
        layered = self.quant(self.conv_first(v))
        y = self.skip.add(self.conv_mid(self.blocks(layered)), layered)
        return torch.sigmoid(conv_frames(self.conv_last, y, keep, self.dequant)).transpose(1, 2)


def _calibration_windows(n: int) -> list[torch.Tensor]:
    import numpy as np

    from ultrasound_ai.ulm.clutter import svd_filter
    from ultrasound_ai.ulm.dml_resnet import normalise_windows
    from ultrasound_ai.ulm.simulator import UlmSimConfig, simulate_acquisition

    out = []
    for bubbles, noise_db, seed in _CALIBRATION:
        acq = simulate_acquisition(UlmSimConfig(n_frames=_CALIBRATION_FRAMES, bubbles_per_frame=bubbles,
                                                clutter_db=20.0, noise_db=noise_db, seed=seed,
                                                shape_zx=_CALIBRATION_SHAPE, n_trees=_CALIBRATION_TREES))
        env = torch.from_numpy(np.abs(svd_filter(acq.iq, 4)).astype(np.float32))
        a = (env.shape[0] - n) // 2  # one window from the middle of each acquisition
        out.append(normalise_windows(env[None, a:a + n]))
    return out


def quantize_resnet(net) -> nn.Module:
    """The int8 version of a DmlLocalizer's ResNet (cached per model object and weights), on CPU."""
    import torch.ao.quantization as tq

    if not int8_available():
        raise InputError(f"3DML-ResNet int8: this PyTorch has no {ENGINE!r} quantized engine (supported: "
                         f"{torch.backends.quantized.supported_engines}); use --precision fp32")
    key = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in net.resnet.parameters())).hexdigest()
    with _lock:
        if key in _cache:
            return _cache[key]
        with quantized_engine(), torch.no_grad(), warnings.catch_warnings():
            # torch.ao.quantization's eager mode warns that it will move to torchao; it works as documented.
            warnings.simplefilter("ignore")
            q = _QuantResNet(net.resnet.cpu()).eval()
            q.qconfig = tq.get_default_qconfig(ENGINE)
            q.conv_first.qconfig = q.conv_last.qconfig = None  # fp32: the input's and the maps' precision
            tq.prepare(q, inplace=True)
            q(torch.cat(_calibration_windows(net.config.window_frames)))  # one call: observers update once
            tq.convert(q, inplace=True)
        _cache.clear()  # one model at a time: a long-lived process does not keep stale copies
        _cache[key] = q
        return q
