"""FiMA's encoder streamed over pair chunks (SSM-F's scan and convolution states carried) equals one pass,
and its memory does not grow with the window."""

import pytest
import torch

from ultrasound_ai.freehand.fima.model import SSMF, FimaNet, make_config


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _net(variant="fima"):
    torch.manual_seed(0)
    net = FimaNet(make_config("tiny", variant)).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics and skip gains
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def test_ssmf_in_pieces_with_carried_state_equals_one_call():
    torch.manual_seed(1)
    cfg = make_config("tiny", "fima")
    ssmf = SSMF(8, cfg).double()
    feat = torch.randn(2, 9, 8, 3, 4, dtype=torch.float64)
    whole = ssmf(feat)
    state, pieces = None, []
    for s, e in ((0, 1), (1, 5), (5, 9)):
        out, state = ssmf(feat[:, s:e], state=state, return_state=True)
        pieces.append(out)
    assert set(state) == {"row", "col"}
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["fima", "rem-prime"])  # two scan orders, one
def test_streamed_window_equals_one_pass_float32(variant):
    net = _net(variant)
    g = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 256, (1, 14, 32, 36), generator=g, dtype=torch.uint8)  # 13 pairs
    acc, ang = torch.randn(1, 13, 4, 3, generator=g), torch.randn(1, 13, 4, 3, generator=g)
    with torch.no_grad():
        whole = net.encode(frames)
        for chunk in (2, 5):
            streamed = net.encode(frames, pair_chunk=chunk)
            for a, b in zip(streamed.pooled + [streamed.final], whole.pooled + [whole.final]):
                assert a.shape == b.shape and _rel(a, b) <= 1e-5, (chunk, _rel(a, b))
        out_w = net(frames, acc, ang).params
        out_s = net(frames, acc, ang, pair_chunk=4).params
    assert _rel(out_s, out_w) <= 1e-5


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    def __enter__(self):
        self.max_numel = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_streamed_encoder_memory_does_not_grow_with_the_window():
    # Before streaming, SSM-F took the whole window's tokens at once: its [B, d, L*h*w] tensors grew with L.
    net = _net()
    largest = []
    for n in (9, 17):
        frames = torch.randint(0, 256, (1, n, 32, 36), dtype=torch.uint8)
        with torch.no_grad(), _LargestTensor() as probe:
            net.encode(frames, pair_chunk=4)
        largest.append(probe.max_numel)
    assert largest[1] == largest[0]
