"""Mamba block: equals a hand-written composition on the reference scan; mamba_ssm names and init."""

import math

import pytest
import torch
import torch.nn.functional as F

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.nn.mamba import Mamba
from ultrasound_ai.nn.selective_scan import selective_scan_ref

MAMBA_SSM_KEYS = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                  "dt_proj.bias", "A_log", "D", "out_proj.weight"}


def _by_hand(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """Mamba's forward written out with plain ops and the sequential reference scan."""
    L = h.shape[1]
    xz = h @ m.in_proj.weight.t()
    x, z = xz[..., :m.d_inner], xz[..., m.d_inner:]
    xc = x.transpose(1, 2)
    k = m.d_conv
    xp = F.pad(xc, (k - 1, 0))  # causal: only past and present samples
    w = m.conv1d.weight[:, 0, :]  # [d_inner, k]
    conv = sum(xp[..., j:j + L] * w[:, j:j + 1] for j in range(k)) + m.conv1d.bias[:, None]
    xs = F.silu(conv)
    dbl = xs.transpose(1, 2) @ m.x_proj.weight.t()
    dt, B, C = dbl[..., :m.dt_rank], dbl[..., m.dt_rank:m.dt_rank + m.d_state], dbl[..., m.dt_rank + m.d_state:]
    delta = (dt @ m.dt_proj.weight.t() + m.dt_proj.bias).transpose(1, 2)
    y = selective_scan_ref(xs, F.softplus(delta), -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2),
                           m.D, z.transpose(1, 2))
    return y.transpose(1, 2) @ m.out_proj.weight.t()


def test_forward_equals_hand_written_composition():
    torch.manual_seed(0)
    m = Mamba(d_model=6, d_state=5, d_conv=3, expand=2, chunk_size=4).double()
    with torch.no_grad():  # make D, A and the conv non-trivial
        m.D.normal_()
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
    h = torch.randn(2, 13, 6, dtype=torch.float64)
    out = m(h)
    assert out.shape == (2, 13, 6)
    torch.testing.assert_close(out, _by_hand(m, h), rtol=1e-9, atol=1e-10)


def test_causal():
    torch.manual_seed(1)
    m = Mamba(d_model=4, d_state=3).double()
    h = torch.randn(1, 10, 4, dtype=torch.float64)
    h2 = h.clone()
    h2[:, 6:] += 1.0
    a, b = m(h), m(h2)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_parameter_names_shapes_and_init_follow_mamba_ssm():
    torch.manual_seed(2)
    m = Mamba(d_model=32, d_state=16, d_conv=4, expand=2, dt_min=0.001, dt_max=0.1)
    sd = m.state_dict()
    assert set(sd) == MAMBA_SSM_KEYS
    assert sd["in_proj.weight"].shape == (128, 32) and sd["conv1d.weight"].shape == (64, 1, 4)
    assert sd["x_proj.weight"].shape == (2 + 32, 64)  # dt_rank = ceil(32 / 16) = 2
    assert sd["dt_proj.weight"].shape == (64, 2) and sd["A_log"].shape == (64, 16)
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1, 17.0).expand(64, 16))  # S4D-real
    dt = F.softplus(m.dt_proj.bias.detach())
    assert float(dt.min()) >= 0.001 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    assert float(m.dt_proj.weight.detach().abs().max()) <= 2 ** -0.5
    assert torch.equal(m.D.detach(), torch.ones(64))
    # A state dict saved from another instance loads (what a mamba_ssm checkpoint looks like).
    other = Mamba(d_model=32)
    other.load_state_dict(sd)
    h = torch.randn(1, 7, 32)
    torch.testing.assert_close(other(h), m(h))


def test_bad_input():
    m = Mamba(d_model=4)
    with pytest.raises(InputError, match="hidden states"):
        m(torch.randn(2, 5, 3))
    with pytest.raises(InputError, match="dt_min"):
        Mamba(d_model=4, dt_min=0.5, dt_max=0.1)


def test_gradients_flow_to_every_parameter():
    torch.manual_seed(3)
    m = Mamba(d_model=4, d_state=3, chunk_size=4)
    m(torch.randn(2, 9, 4)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0, name
    assert math.isfinite(float(m.A_log.grad.sum()))


@pytest.mark.parametrize("d_conv", [1, 4])
def test_scan_branch_streamed_in_pieces_equals_one_pass(d_conv):
    # The causal convolution's left context and the scan state carried across pieces (some shorter than
    # the kernel) reproduce the one-pass output.
    from ultrasound_ai.nn.mamba import ScanBranch

    torch.manual_seed(3)
    br = ScanBranch(6, d_state=4, d_conv=d_conv, dt_rank=2).double()
    br.chunk_size = 5
    x, z = torch.randn(2, 6, 40, dtype=torch.float64), torch.randn(2, 6, 40, dtype=torch.float64)
    whole = br(x, z)
    state, outs = None, []
    for s, e in ((0, 2), (2, 3), (3, 17), (17, 40)):
        y, state = br(x[..., s:e], z[..., s:e], state=state, return_state=True)
        outs.append(y)
        assert state.conv.shape == (2, 6, d_conv - 1) and state.ssm.shape == (2, 6, 4)
    torch.testing.assert_close(torch.cat(outs, -1), whole, rtol=1e-10, atol=1e-12)
