"""Exactness of the Glow: invertibility, log-determinants, ActNorm state, sampling, bad input."""

from __future__ import annotations

import io

import pytest
import torch

from flows.glow import ActNorm, Glow, GlowConfig, InvConvLU, squeeze, unsqueeze

CASES = [
    pytest.param(GlowConfig(1, 2, levels=2, steps=2, hidden=8, scale_fn="paper"), (1, 1, 4, 4),
                 id="2d-paper"),
    pytest.param(GlowConfig(1, 2, levels=2, steps=2, hidden=8, scale_fn="glow"), (1, 1, 4, 4), id="2d-glow"),
    pytest.param(GlowConfig(1, 3, levels=2, steps=2, hidden=4, scale_fn="paper"), (1, 1, 4, 4, 4), id="3d"),
]


def _trained_like(cfg: GlowConfig, shape: tuple[int, ...], seed: int = 0) -> Glow:
    """A model whose couplings are not at their identity initialisation."""
    torch.manual_seed(seed)
    g = Glow(cfg, seed=seed).double()
    g.initialize(torch.rand(8, *shape[1:], dtype=torch.float64) - 0.5)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g.eval()


@pytest.mark.parametrize("cfg,shape", CASES)
def test_inverse_recovers_input_float32(cfg: GlowConfig, shape: tuple[int, ...]) -> None:
    g = _trained_like(cfg, shape).float()
    x = torch.rand(4, *shape[1:]) - 0.5
    with torch.no_grad():
        out = g(x)
        xr = g.inverse(out.zs)
    assert (xr - x).abs().max().item() < 1e-4
    assert out.log_p.dtype == torch.float64


@pytest.mark.parametrize("cfg,shape", CASES)
def test_logdet_matches_bruteforce_jacobian(cfg: GlowConfig, shape: tuple[int, ...]) -> None:
    g = _trained_like(cfg, shape)
    x = torch.rand(*shape, dtype=torch.float64) - 0.5

    def flat_z(inp: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.reshape(-1) for z in g(inp.reshape(shape)).zs])

    jac = torch.autograd.functional.jacobian(flat_z, x.reshape(-1))
    brute = torch.linalg.slogdet(jac)[1].item()
    with torch.no_grad():
        ours = g(x).logdet.item()
    assert abs(brute) > 1e-3
    assert abs(ours - brute) / abs(brute) < 1e-3


def test_squeeze_roundtrip_2d_3d() -> None:
    for shape in [(2, 3, 8, 4), (2, 3, 4, 8, 6)]:
        x = torch.randn(shape)
        assert torch.equal(unsqueeze(squeeze(x)), x)


def test_invconv_inverse_in_float64() -> None:
    layer = InvConvLU(6, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.log_s.add_(torch.linspace(-0.5, 0.7, 6))
        layer.upper.add_(0.3)
    x = torch.randn(2, 6, 3, 3)
    y, ld = layer(x)
    assert torch.allclose(layer.inverse(y), x, atol=1e-5)
    assert torch.allclose(ld[0], torch.linalg.slogdet(layer.weight(torch.float64))[1] * 9,
                          rtol=1e-5)


def test_actnorm_initialisation_survives_state_dict() -> None:
    cfg = GlowConfig(1, 2, levels=2, steps=1, hidden=8)
    g = Glow(cfg, seed=0)
    assert not g.initialized
    g.initialize(torch.rand(16, 1, 8, 8) * 3 + 7)
    assert g.initialized
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    h = Glow(cfg, seed=1)
    buf.seek(0)
    h.load_state_dict(torch.load(buf, weights_only=True))
    assert h.initialized
    before = {k: v.clone() for k, v in h.state_dict().items()}
    h.train()
    h(torch.rand(4, 1, 8, 8) - 100.0)  # a very different batch must not re-initialise
    for k, v in h.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.rand(3, 1, 8, 8) - 0.5
    g.eval()
    h.eval()
    with torch.no_grad():
        assert torch.allclose(g(x).log_p, h(x).log_p)


def test_actnorm_data_init_normalises() -> None:
    layer = ActNorm(3, 2)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 4
    y, _ = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)


def test_sampling_shapes_and_temperature() -> None:
    g = _trained_like(GlowConfig(1, 2, levels=2, steps=2, hidden=8), (1, 1, 8, 8)).float()
    gen = torch.Generator().manual_seed(0)
    s0 = g.sample(4, (8, 8), temperature=0.0, generator=gen)
    s1 = g.sample(4, (8, 8), temperature=1.0, generator=gen)
    assert s0.shape == (4, 1, 8, 8) and torch.isfinite(s1).all()
    assert torch.allclose(s0[0], s0[1])  # T=0: every sample is the prior mode
    assert s1.std() > s0.std()
    g3 = _trained_like(GlowConfig(1, 3, levels=2, steps=1, hidden=4), (1, 1, 4, 4, 4)).float()
    assert g3.sample(2, (4, 8, 8)).shape == (2, 1, 4, 8, 8)


def test_checkpointing_gives_same_gradients() -> None:
    cfg = GlowConfig(1, 2, levels=2, steps=2, hidden=8)
    a = _trained_like(cfg, (1, 1, 8, 8)).float().train()
    b = Glow(GlowConfig(1, 2, levels=2, steps=2, hidden=8, checkpoint=True)).float().train()
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, 1, 8, 8) - 0.5
    a(x).log_p.sum().backward()
    b(x).log_p.sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.grad is not None and pb.grad is not None
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


@pytest.mark.parametrize(
    "shape,msg",
    [((2, 8, 8), "dimensions"), ((2, 2, 8, 8), "channel"), ((2, 1, 6, 8), "divisible"),
     ((2, 1, 4, 8, 8), "dimensions")],
)
def test_bad_input_shapes(shape: tuple[int, ...], msg: str) -> None:
    g = Glow(GlowConfig(1, 2, levels=2, steps=1, hidden=4))
    with pytest.raises(ValueError, match=msg):
        g(torch.zeros(shape))


def test_nan_input_is_refused() -> None:
    g = Glow(GlowConfig(1, 2, levels=1, steps=1, hidden=4))
    x = torch.zeros(2, 1, 4, 4)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        g(x)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="2D or 3D"):
        Glow(GlowConfig(1, 4, levels=1, steps=1, hidden=4))
    with pytest.raises(ValueError, match="scale function"):
        Glow(GlowConfig(1, 2, levels=1, steps=1, hidden=4, scale_fn="tanh"))  # type: ignore[arg-type]


def test_conditional_glow_is_exact_per_condition() -> None:
    from flows.glow import Conditioned

    cfg = GlowConfig(1, 2, levels=2, steps=2, hidden=8, conditions=2)
    g = Glow(cfg, seed=0).double()
    g.initialize(torch.rand(8, 1, 4, 4, dtype=torch.float64) - 0.5, cond=torch.tensor([0, 1] * 4))
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g.eval()
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64) - 0.5
    for c in (0, 1):
        m = Conditioned(g, c)
        out = m(x)
        assert torch.allclose(g.inverse(out.zs, c), x, atol=1e-8)
        jac = torch.autograd.functional.jacobian(
            lambda v, c=c: torch.cat([z.reshape(-1) for z in g(v.reshape(1, 1, 4, 4), c).zs]),
            x.reshape(-1))
        assert abs(torch.linalg.slogdet(jac)[1].item() - out.logdet.item()) < 1e-6
    assert not torch.allclose(g(x, 0).log_p, g(x, 1).log_p)
    assert Conditioned(g, 1).sample(2, (4, 4)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="conditional"):
        g(x)
    with pytest.raises(ValueError, match="class indices"):
        g(x, torch.tensor([2]))
    with pytest.raises(ValueError, match="unconditional"):
        Glow(GlowConfig(1, 2, levels=1, steps=1, hidden=4))(torch.zeros(1, 1, 4, 4), 0)


@pytest.mark.parametrize("cfg,shape", CASES)
def test_log_p_map_sums_to_log_p(cfg: GlowConfig, shape: tuple[int, ...]) -> None:
    g = _trained_like(cfg, tuple(s * 2 if i >= 2 else s for i, s in enumerate(shape)))
    x = torch.rand(3, *[s * 2 if i >= 2 else s for i, s in enumerate(shape)][1:],
                   dtype=torch.float64) - 0.5
    with torch.no_grad():
        m = g.log_p_map(x)
        lp = g(x).log_p
    assert m.shape == (3, *x.shape[2:])
    assert torch.allclose(m.flatten(1).sum(1), lp, rtol=1e-9, atol=1e-6)


def test_log_p_map_is_local() -> None:
    """Changing one corner pixel changes the map most near that corner."""
    g = _trained_like(GlowConfig(1, 2, levels=2, steps=2, hidden=8), (1, 1, 16, 16))
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64) - 0.5
    y = x.clone()
    y[0, 0, 1, 1] += 0.4
    with torch.no_grad():
        d = (g.log_p_map(y) - g.log_p_map(x)).abs()[0]
    assert d[:4, :4].sum() > d[8:, 8:].sum()


def test_an_average_needs_two_members_of_one_configuration() -> None:
    from flows.glow import Averaged

    a = Glow(GlowConfig(1, 2, levels=2, steps=1, hidden=8), seed=0)
    b = Glow(GlowConfig(1, 2, levels=2, steps=1, hidden=8), seed=1)
    c = Glow(GlowConfig(1, 2, levels=2, steps=1, hidden=4), seed=2)
    with pytest.raises(ValueError, match="at least two"):
        Averaged([a])
    with pytest.raises(ValueError, match="one Glow configuration"):
        Averaged([a, c])
    x = torch.rand(3, 1, 8, 8) - 0.5
    for g in (a, b):
        g.initialize(x)
    avg = Averaged([a, b]).eval()
    with torch.no_grad():
        assert torch.allclose(avg(x).log_p, (a(x).log_p + b(x).log_p) / 2)
        # the map of the mean sums to the mean log-density, as each member's does
        assert torch.allclose(avg.log_p_map(x).flatten(1).sum(1), avg(x).log_p, rtol=1e-5)
    assert avg.sample(2, (8, 8)).shape == (2, 1, 8, 8)


def test_folded_layers_and_channels_last_compute_the_same_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inference-speed paths (ActNorms folded into the adjacent convolutions, channels-last
    activations for small 3D grids) change nothing but rounding."""
    import flows.glow as glow

    g = _trained_like(GlowConfig(1, 3, levels=2, steps=2, hidden=8, scale_fn="glow"), (1, 1, 8, 8, 8))
    x = torch.rand(3, 1, 8, 8, 8, dtype=torch.float64) - 0.5
    step = g._steps(0)[0]
    h = squeeze(x)
    with torch.no_grad():
        folded, ld = step(h)
        a, ld1 = step.actnorm(h)
        b, ld2 = step.invconv(a)
        c, ld3 = step.coupling(b)
        net = step.coupling.net
        hidden = torch.relu(net.n1(net.c1(b[:, : step.coupling.ca]))[0])
        assert torch.allclose(torch.relu(glow._conv_then_norm(net.c1, net.n1, b[:, : step.coupling.ca])),
                              hidden, atol=1e-12)
        assert torch.allclose(folded, c, atol=1e-12)
        with torch.no_grad():  # the coupling's last layer: a trained-like, non-zero output scale
            net.c3.logs.fill_(0.1)
            net.c3.conv.weight.normal_(std=0.1)
        plain = net.c3.conv(hidden) * torch.exp(net.c3.logs * 3.0)
        assert plain.abs().max() > 1e-3 and torch.allclose(net.c3(hidden), plain, atol=1e-12)
        assert torch.allclose(ld, ld1 + ld2 + ld3, atol=1e-9)
        assert glow.fast_layout(h).is_contiguous(memory_format=torch.channels_last_3d)
        with_cl = g(x).log_p
        monkeypatch.setattr(glow, "_CHANNELS_LAST_MAX_POSITIONS", 0)
        without = g(x).log_p
    assert torch.allclose(with_cl, without, atol=1e-9)
