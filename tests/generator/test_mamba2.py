import pytest
import torch

import qg.generator.mamba2 as mamba2
from qg.generator.mamba2 import Mamba2, ssd_scan, ssd_sequential


def scan_inputs(b=2, length=37, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    dt = torch.nn.functional.softplus(r(b, length, h))
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 4 - 0.1
    return r(b, length, h, p), dt, A, r(b, length, g, n), r(b, length, g, n)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("groups,d_shape", [(1, None), (2, "head"), (4, "hdim")])
def test_chunked_scan_matches_sequential_recurrence(chunk, groups, d_shape):
    x, dt, A, B, C = scan_inputs(g=groups)
    D = {
        None: None,
        "head": torch.randn(4, dtype=torch.float64),
        "hdim": torch.randn(4, 3, dtype=torch.float64),
    }[d_shape]
    torch.testing.assert_close(
        ssd_scan(x, dt, A, B, C, chunk, D),
        ssd_sequential(x, dt, A, B, C, D),
        rtol=1e-10,
        atol=1e-10,
    )


def test_initial_states():
    x, dt, A, B, C = scan_inputs()
    h0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(
        ssd_scan(x, dt, A, B, C, 8, initial_states=h0),
        ssd_sequential(x, dt, A, B, C, initial_states=h0),
        rtol=1e-10,
        atol=1e-10,
    )


def tiny(**kw):
    torch.manual_seed(0)
    # dt_min/dt_max large enough that the state's dynamics matter at these short lengths
    return Mamba2(16, **{"d_state": 4, "headdim": 8, "dt_min": 0.1, "dt_max": 1.0, **kw}).double()


@pytest.fixture
def reference_forward(monkeypatch):
    """The module's forward with the sequential recurrence in place of the chunked scan."""

    def forward(m: Mamba2, u):
        with monkeypatch.context() as patch:
            patch.setattr(
                mamba2,
                "ssd_scan",
                lambda x, dt, A, B, C, chunk_size, D=None: ssd_sequential(x, dt, A, B, C, D),
            )
            return m(u)

    return forward


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ngroups": 2},
        {"D_has_hdim": True},
        {"d_ssm": 16},
        {"rmsnorm": False},
        {"norm_before_gate": True},
    ],
    ids=str,
)
def test_module_matches_reference_and_is_chunk_invariant(kw, reference_forward):
    m = tiny(**kw)
    u = torch.randn(2, 29, 16, dtype=torch.float64)
    ref = reference_forward(m, u)
    for chunk in (4, 8, 256):
        m.chunk_size = chunk
        torch.testing.assert_close(m(u), ref, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    m = tiny(chunk_size=4)
    u = torch.randn(1, 10, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: m(u), (u,), eps=1e-6, atol=1e-5)
    # and the parameters receive finite gradients
    m(u).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize(
    "d_model,kw",
    [
        (64, {}),
        (128, {"ngroups": 2, "d_state": 16}),
        (96, {"headdim": 32, "D_has_hdim": True}),
        (64, {"d_ssm": 64}),
    ],
)
def test_state_dict_matches_mamba_ssm_formulas(d_model, kw):
    m = Mamba2(d_model, **kw)
    d_state, expand, headdim, ngroups, d_conv = (
        kw.get("d_state", 128),
        2,
        kw.get("headdim", 64),
        kw.get("ngroups", 1),
        4,
    )
    d_inner = expand * d_model
    d_ssm = kw.get("d_ssm", d_inner)
    nheads = d_ssm // headdim
    conv_dim = d_ssm + 2 * ngroups * d_state
    expected = [
        ("dt_bias", (nheads,)),
        ("A_log", (nheads,)),
        ("D", (d_ssm if kw.get("D_has_hdim") else nheads,)),
        ("in_proj.weight", (2 * d_inner + 2 * ngroups * d_state + nheads, d_model)),
        ("conv1d.weight", (conv_dim, 1, d_conv)),
        ("conv1d.bias", (conv_dim,)),
        ("norm.weight", (d_ssm,)),
        ("out_proj.weight", (d_model, d_inner)),
    ]
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == expected
    other = Mamba2(d_model, **kw)
    other.load_state_dict(m.state_dict(), strict=True)
    u = torch.randn(1, 5, d_model)
    torch.testing.assert_close(other(u), m(u))


def test_initialisation_ranges():
    m = Mamba2(128, dt_min=0.001, dt_max=0.1)
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16 and torch.equal(m.D, torch.ones(4))


def test_bad_configuration():
    with pytest.raises(ValueError, match="multiple of headdim"):
        Mamba2(40)  # d_inner 80 is not a multiple of 64
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(64, ngroups=3)
    with pytest.raises(NotImplementedError, match="DDP"):
        Mamba2(64, process_group=object())


def test_causal():
    m = tiny(chunk_size=4)
    u = torch.randn(1, 13, 16, dtype=torch.float64)
    v = u.clone()
    v[:, 7] += 1.0
    a, b = m(u), m(v)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_bfloat16_runs_in_float32_inside():
    torch.manual_seed(0)
    m = Mamba2(64, d_state=16, chunk_size=16)
    u = torch.randn(2, 40, 64)
    ref = m(u)
    out = m.to(torch.bfloat16)(u.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_cpu_never_needs_kernels():
    m = Mamba2(64, use_kernels=None)
    assert not m._kernels(torch.zeros(1, 2, 64))


def test_stable_segsum_is_the_difference_of_prefix_sums():
    x = torch.randn(3, 17, dtype=torch.float64)
    stable, naive = mamba2.segsum(x), mamba2.segsum_naive(x)
    finite = torch.isfinite(naive)
    assert torch.equal(finite, torch.isfinite(stable)) and finite.sum() == 3 * 17 * 18 // 2
    assert torch.allclose(stable[finite], naive[finite], atol=1e-12)
    assert torch.allclose(stable[0, 5, 2], x[0, 3:6].sum())  # sum of x[j+1..i] for i = 5, j = 2
