"""One Glow (Kingma & Dhariwal 2018) for 2D images ``(N,C,H,W)`` and 3D volumes ``(N,C,D,H,W)``.

Every layer is exactly invertible with a cheap log-determinant, so ``forward`` returns the
exact log-density of a continuous input. Per-sample log-determinants and log-densities are
accumulated in float64 whatever the layers run in: with 512x512 inputs the totals are
~1e6 nats and the two-model posterior is a *difference* of two such totals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import lu as scipy_lu
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

ScaleFn = Literal["paper", "glow"]
LOG_2PI = math.log(2 * math.pi)


def _conv(ndim: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    if ndim == 2:
        return nn.Conv2d
    if ndim == 3:
        return nn.Conv3d
    raise ValueError(f"Glow supports 2D or 3D data, got ndim={ndim}")


def _sum_per_sample(t: Tensor) -> Tensor:
    """Sum all but the batch dimension, in float64."""
    return t.reshape(t.shape[0], -1).to(torch.float64).sum(dim=1)


def gaussian_log_p(x: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """Element-wise log N(x; mean, exp(logs)^2), in the input's dtype (float32 or wider)."""
    x, mean, logs = x.float(), mean.float(), logs.float()
    return -0.5 * (LOG_2PI + 2.0 * logs + (x - mean) ** 2 * torch.exp(-2.0 * logs))


def squeeze(x: Tensor) -> Tensor:
    """Space-to-channel: 2x2 (2D) or 2x2x2 (3D) neighbourhoods become channels."""
    if x.dim() == 4:
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 2, 2, w // 2, 2)
        return x.permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)
    n, c, d, h, w = x.shape
    x = x.reshape(n, c, d // 2, 2, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, c * 8, d // 2, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Inverse of :func:`squeeze`."""
    if x.dim() == 4:
        n, c, h, w = x.shape
        x = x.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c // 4, h * 2, w * 2)
    n, c, d, h, w = x.shape
    x = x.reshape(n, c // 8, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(n, c // 8, d * 2, h * 2, w * 2)


class ActNorm(nn.Module):
    """Per-channel affine with data-dependent initialisation (zero mean, unit variance).

    The ``initialized`` flag is a persistent buffer: a model loaded from a state dict is
    never re-initialised from the first batch it happens to see.
    """

    initialized: Tensor

    def __init__(self, channels: int, ndim: int, scale: float = 1.0) -> None:
        super().__init__()
        shape = (1, channels) + (1,) * ndim
        self.bias = nn.Parameter(torch.zeros(shape))
        self.logs = nn.Parameter(torch.zeros(shape))
        self.scale = scale
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims, keepdim=True)
        std = ((x - mean) ** 2).mean(dim=dims, keepdim=True).sqrt()
        self.bias.data.copy_(-mean)
        self.logs.data.copy_(torch.log(self.scale / (std + 1e-6)))
        self.initialized.fill_(1)

    def _spatial(self, x: Tensor) -> int:
        return int(np.prod(x.shape[2:]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not bool(self.initialized):
            self._initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        return y, self.logdet(x)

    def logdet(self, x: Tensor) -> Tensor:
        """Per-sample log-determinant ``(N,)`` in float64 for an input shaped like ``x``."""
        logdet = self.logs.float().sum().to(torch.float64) * self._spatial(x)
        return logdet.expand(x.shape[0])

    def folded(self) -> tuple[Tensor, Tensor]:
        """``(scale, offset)`` per channel, ``y = x * scale + offset``: what a preceding linear
        layer absorbs so that this layer costs no pass over the activations."""
        scale = torch.exp(self.logs).reshape(-1)
        return scale, self.bias.reshape(-1) * scale

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConvLU(nn.Module):
    """Invertible 1x1 (1x1x1) convolution, W = P L (U + diag(sign * exp(log_s))).

    The log-determinant is sum(log_s) per position; the inverse is assembled in float64.
    """

    p: Tensor
    sign_s: Tensor
    l_mask: Tensor
    eye: Tensor

    def __init__(self, channels: int, ndim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.ndim = ndim
        w0 = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0]
        p, lower, upper = (torch.from_numpy(a).float() for a in scipy_lu(w0.double().numpy()))
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))
        self.upper = nn.Parameter(torch.triu(upper, 1))

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        lower = self.lower.to(dtype) * self.l_mask.to(dtype) + self.eye.to(dtype)
        upper = self.upper.to(dtype) * self.l_mask.T.to(dtype)
        upper = upper + torch.diag(self.sign_s.to(dtype) * torch.exp(self.log_s.to(dtype)))
        return self.p.to(dtype) @ lower @ upper

    def _kernel(self, w: Tensor) -> Tensor:
        return w.reshape(*w.shape, *([1] * self.ndim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weight(self.log_s.dtype).to(x.dtype)
        return _conv_fn(x)(x, self._kernel(w)), self.logdet(x)

    def forward_after(self, norm: ActNorm, x: Tensor) -> tuple[Tensor, Tensor]:
        """``norm`` then this convolution as one convolution with a bias:
        ``W (x s + o) = (W diag(s)) x + W o``; the log-determinant of both."""
        scale, offset = norm.folded()
        w = self.weight(offset.dtype)
        y = _conv_fn(x)(x, self._kernel((w * scale).to(x.dtype)), (w @ offset).to(x.dtype))
        return y, norm.logdet(x) + self.logdet(x)

    def logdet(self, x: Tensor) -> Tensor:
        logdet = self.log_s.float().sum().to(torch.float64) * int(np.prod(x.shape[2:]))
        return logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight(torch.float64)).to(y.dtype)
        return _conv_fn(y)(y, self._kernel(w_inv))


class ZeroConv(nn.Module):
    """3x3(x3) convolution initialised to zero with a learned output scale (Glow's Conv2dZeros)."""

    def __init__(self, cin: int, cout: int, ndim: int) -> None:
        super().__init__()
        self.conv = _conv(ndim)(cin, cout, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        assert self.conv.bias is not None
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros((1, cout) + (1,) * ndim))

    def forward(self, x: Tensor) -> Tensor:
        # conv(x) * e^(3 logs), with the scale folded into the weights: one pass, not two.
        scale = torch.exp(self.logs * 3.0).reshape(-1)
        return _conv_fn(x)(x, _scaled(self.conv.weight, scale), _bias(self.conv) * scale,
                           padding=self.conv.padding)


def condition_channels(x: Tensor, cond: Tensor | None) -> Tensor | None:
    """Broadcast a one-hot condition ``(N, n)`` to ``(N, n, *spatial)``, or None."""
    if cond is None:
        return None
    return cond.to(x.dtype).reshape(*cond.shape, *([1] * (x.dim() - 2))).expand(
        -1, -1, *x.shape[2:])


def _with_extra(x: Tensor, coords: bool, cond: Tensor | None) -> Tensor:
    parts = [x]
    if coords:
        parts.append(coordinate_channels(x))
    c = condition_channels(x, cond)
    if c is not None:
        parts.append(c)
    return torch.cat(parts, dim=1) if len(parts) > 1 else x


def coordinate_channels(x: Tensor) -> Tensor:
    """One channel per spatial axis holding the position in [-1, 1], batch-expanded."""
    axes = [torch.linspace(-1.0, 1.0, s, device=x.device, dtype=x.dtype) for s in x.shape[2:]]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids)[None].expand(x.shape[0], -1, *x.shape[2:])


class CouplingNet(nn.Module):
    """conv3 - ActNorm - ReLU - conv1 - ActNorm - ReLU - ZeroConv3.

    With ``coords`` the conditioner also sees where it is in the image: radiographs and head
    CTs are roughly aligned, and "dense tissue here" is normal at the heart and abnormal in a
    lung base. The coupling stays exactly invertible (the conditioner may be any function).
    """

    def __init__(self, cin: int, cout: int, hidden: int, ndim: int, coords: bool = False,
                 n_cond: int = 0) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.coords = coords
        self.c1 = conv(cin + (ndim if coords else 0) + n_cond, hidden, 3, padding=1, bias=False)
        self.n1 = ActNorm(hidden, ndim)
        self.c2 = conv(hidden, hidden, 1, bias=False)
        self.n2 = ActNorm(hidden, ndim)
        self.c3 = ZeroConv(hidden, cout, ndim)
        nn.init.normal_(self.c1.weight, std=0.05)
        nn.init.normal_(self.c2.weight, std=0.05)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        x = fast_layout(_with_extra(x, self.coords, cond))
        h = F.relu(_conv_then_norm(self.c1, self.n1, x))
        h = F.relu(_conv_then_norm(self.c2, self.n2, h))
        return self.c3(h).contiguous()


def _conv_fn(x: Tensor) -> Callable[..., Tensor]:
    return F.conv2d if x.dim() == 4 else F.conv3d


def _scaled(weight: Tensor, scale: Tensor) -> Tensor:
    """A convolution weight with output channel ``o`` multiplied by ``scale[o]``."""
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def _bias(conv: nn.Conv2d | nn.Conv3d) -> Tensor:
    if conv.bias is None:
        return conv.weight.new_zeros(conv.weight.shape[0])
    return conv.bias


def _conv_then_norm(conv: nn.Conv2d | nn.Conv3d, norm: ActNorm, x: Tensor) -> Tensor:
    """``norm(conv(x))`` as one convolution (the ActNorm's scale and offset folded into the
    weights and bias; exact up to rounding). Before its data-dependent initialisation the
    ActNorm has to see ``conv(x)`` itself."""
    if not bool(norm.initialized):
        return norm(conv(x))[0]
    scale, offset = norm.folded()
    return _conv_fn(x)(x, _scaled(conv.weight, scale), _bias(conv) * scale + offset,
                       padding=conv.padding)


def fast_layout(x: Tensor) -> Tensor:
    """``x`` in the memory layout that the CPU convolutions (oneDNN) run fastest on.

    Channels-last made the 3D coupling networks of the patch models (8^3 positions and
    fewer) 1.4-1.9x faster on CPU, and was no faster, or slower, for larger grids and 2D
    (docs/benchmarks.md), hence the rule. The result is the same up to rounding.
    """
    if x.device.type != "cpu" or x.dim() != 5 or math.prod(x.shape[2:]) > _CHANNELS_LAST_MAX_POSITIONS:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d)


_CHANNELS_LAST_MAX_POSITIONS = 512


def scale_function(kind: ScaleFn) -> Callable[[Tensor], Tensor]:
    """Coupling scale: Shibata et al.'s ``sigmoid(h - 0.1) + 0.6`` or Glow's ``sigmoid(h + 2)``."""
    if kind == "paper":
        return lambda h: torch.sigmoid(h - 0.1) + 0.6
    if kind == "glow":
        return lambda h: torch.sigmoid(h + 2.0)
    raise ValueError(f"unknown coupling scale function {kind!r}; use 'paper' or 'glow'")


class AffineCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int, ndim: int, scale_fn: ScaleFn,
                 coords: bool = False, n_cond: int = 0) -> None:
        super().__init__()
        self.ca = channels // 2
        self.cb = channels - self.ca
        self.net = CouplingNet(self.ca, 2 * self.cb, hidden, ndim, coords, n_cond)
        self.scale_fn_name = scale_fn
        self.scale_fn = scale_function(scale_fn)

    def _shift_scale(self, xa: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.net(xa, cond)
        shift, raw = h[:, 0::2], h[:, 1::2]
        return shift, self.scale_fn(raw)

    def forward(self, x: Tensor, cond: Tensor | None = None,
                per_position: bool = False) -> tuple[Tensor, Tensor]:
        """``(y, log-det)``: per sample, or per position ``(N, *spatial)`` in float64."""
        xa, xb = x[:, : self.ca], x[:, self.ca :]
        shift, scale = self._shift_scale(xa, cond)
        yb = (xb + shift) * scale
        log_scale = torch.log(scale.float())
        if per_position:
            return torch.cat([xa, yb], dim=1), log_scale.to(torch.float64).sum(dim=1)
        return torch.cat([xa, yb], dim=1), _sum_per_sample(log_scale)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        ya, yb = y[:, : self.ca], y[:, self.ca :]
        shift, scale = self._shift_scale(ya, cond)
        return torch.cat([ya, yb / scale - shift], dim=1)


class FlowStep(nn.Module):
    """ActNorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, channels: int, hidden: int, ndim: int, scale_fn: ScaleFn,
                 generator: torch.Generator | None = None, coords: bool = False,
                 n_cond: int = 0) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels, ndim)
        self.invconv = InvConvLU(channels, ndim, generator)
        self.coupling = AffineCoupling(channels, hidden, ndim, scale_fn, coords, n_cond)

    def forward(self, x: Tensor, cond: Tensor | None = None,
                per_position: bool = False) -> tuple[Tensor, Tensor]:
        """``(y, log-det)``; with ``per_position`` the log-det is a map ``(N, *spatial)``."""
        if bool(self.actnorm.initialized):
            x, ld12 = self.invconv.forward_after(self.actnorm, x)
        else:
            x, ld1 = self.actnorm(x)
            x, ld2 = self.invconv(x)
            ld12 = ld1 + ld2
        x, ld3 = self.coupling(x, cond, per_position)
        if per_position:
            # ActNorm and the 1x1 convolution contribute the same amount at every position.
            n_pos = int(np.prod(x.shape[2:]))
            return x, ld3 + ld12[:, None].reshape(-1, *([1] * (x.dim() - 2))) / n_pos
        return x, ld12 + ld3

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y, cond)))


class SplitPrior(nn.Module):
    """Factor out half the channels; their density is conditioned on the kept half."""

    def __init__(self, channels: int, ndim: int, n_cond: int = 0) -> None:
        super().__init__()
        self.keep = channels // 2
        self.conv = ZeroConv(self.keep + n_cond, 2 * (channels - self.keep), ndim)

    def params(self, h: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out = self.conv(_with_extra(h, False, cond))
        return out[:, 0::2], out[:, 1::2]


@dataclass
class FlowOutput:
    """Result of a forward pass; ``log_p`` is the exact log-density in nats (float64)."""

    zs: list[Tensor]
    log_p: Tensor
    logdet: Tensor
    log_pz: Tensor


@dataclass(frozen=True)
class GlowConfig:
    in_channels: int = 1
    ndim: int = 2
    levels: int = 3
    steps: int = 8
    hidden: int = 128
    scale_fn: ScaleFn = "paper"
    checkpoint: bool = False
    coords: bool = False  # position channels in the coupling conditioners
    conditions: int = 0  # >0: a class-conditional Glow p(x | c), c in 0..conditions-1


class Glow(nn.Module):
    """Multi-scale Glow: L levels of (squeeze, K flow steps, split), learned top prior."""

    def __init__(self, config: GlowConfig, seed: int | None = None) -> None:
        super().__init__()
        if config.levels < 1 or config.steps < 1:
            raise ValueError("Glow needs at least one level and one step per level")
        if config.in_channels < 1 or config.hidden < 1:
            raise ValueError("Glow needs positive in_channels and hidden width")
        _conv(config.ndim)
        self.config = config
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        factor = 4 if config.ndim == 2 else 8
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        c = config.in_channels
        for i in range(config.levels):
            c *= factor
            self.levels.append(nn.ModuleList(
                FlowStep(c, config.hidden, config.ndim, config.scale_fn, gen, config.coords,
                         config.conditions)
                for _ in range(config.steps)))
            if i < config.levels - 1:
                self.splits.append(SplitPrior(c, config.ndim, config.conditions))
                c = c // 2
        self.top_channels = c
        # Learned top prior, one mean/log-scale per channel (sized to any input grid) and
        # per condition for a conditional model.
        nc = max(1, config.conditions)
        self.top_mean = nn.Parameter(torch.zeros((nc, c) + (1,) * config.ndim))
        self.top_logs = nn.Parameter(torch.zeros((nc, c) + (1,) * config.ndim))

    def _steps(self, i: int) -> list[FlowStep]:
        return cast(list[FlowStep], list(cast(nn.ModuleList, self.levels[i])))

    def _split(self, i: int) -> SplitPrior:
        return cast(SplitPrior, self.splits[i])

    def freeze_finest(self, k: int) -> None:
        """Freeze the ``k`` finest levels (their flow steps and split priors).

        Two models that share frozen fine levels have identical fine-level terms, so those
        cancel exactly in ``log p0 - log p1``.
        """
        if not 0 <= k <= self.config.levels:
            raise ValueError(f"can freeze 0..{self.config.levels} levels, not {k}")
        for i in range(self.config.levels):
            mods: list[nn.Module] = [self.levels[i]]
            if i < len(self.splits):
                mods.append(self.splits[i])
            for m in mods:
                for p in m.parameters():
                    p.requires_grad_(i >= k)

    # -- shape checks ---------------------------------------------------------------------
    @property
    def multiple(self) -> int:
        """Every spatial size must be divisible by this."""
        return 2 ** self.config.levels

    def check_input(self, x: Tensor) -> None:
        cfg = self.config
        if x.dim() != cfg.ndim + 2:
            raise ValueError(
                f"expected a {cfg.ndim}D batch of shape (N,C,{'D,' if cfg.ndim == 3 else ''}H,W) "
                f"with {cfg.ndim + 2} dimensions, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} channel(s), got {x.shape[1]}")
        bad = [s for s in x.shape[2:] if s % self.multiple]
        if bad:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by "
                             f"2**levels = {self.multiple}")
        if not torch.isfinite(x).all():
            n_bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"input holds {n_bad} non-finite value(s) (NaN or inf)")

    # -- passes ---------------------------------------------------------------------------
    def _run_step(self, step: FlowStep, h: Tensor, cond: Tensor | None,
                  per_position: bool) -> tuple[Tensor, Tensor]:
        if self.config.checkpoint and self.training and torch.is_grad_enabled():
            return cast(tuple[Tensor, Tensor],
                        torch_checkpoint(step, h, cond, per_position, use_reentrant=False))
        return cast(tuple[Tensor, Tensor], step(h, cond, per_position))

    def _onehot(self, cond: Tensor | int | None, n: int, device: torch.device) -> Tensor | None:
        k = self.config.conditions
        if k == 0:
            if cond is not None:
                raise ValueError("this Glow is unconditional; do not pass a condition")
            return None
        if cond is None:
            raise ValueError(f"this Glow is conditional: pass cond in 0..{k - 1}")
        c = torch.full((n,), cond, dtype=torch.long) if isinstance(cond, int) else cond.long()
        if c.shape != (n,) or int(c.min()) < 0 or int(c.max()) >= k:
            raise ValueError(f"condition must be {n} class indices in 0..{k - 1}")
        return F.one_hot(c.to(device), k).to(self.top_mean.dtype)

    def _top(self, onehot: Tensor | None) -> tuple[Tensor, Tensor]:
        if onehot is None:
            return self.top_mean, self.top_logs
        shape = (onehot.shape[0], *self.top_mean.shape[1:])
        mean = (onehot @ self.top_mean.flatten(1)).reshape(shape)
        logs = (onehot @ self.top_logs.flatten(1)).reshape(shape)
        return mean, logs

    def _pass(self, x: Tensor, onehot: Tensor | None,
              per_position: bool) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
        """Latents and, per level, (log-det, log p of the latent factored out there).

        The terms are per sample ``(N,)``, or with ``per_position`` maps ``(N, *grid_i)`` on
        level i's grid (the input grid divided by 2**(i+1)); all in float64.
        """
        _, zs, terms = self.run_levels(x, onehot, per_position, 0, len(self.levels))
        return zs, terms

    def run_levels(self, h: Tensor, onehot: Tensor | None, per_position: bool, start: int,
                   stop: int) -> tuple[Tensor, list[Tensor], list[tuple[Tensor, Tensor]]]:
        """Levels ``start`` to ``stop - 1`` of :meth:`_pass` from the state ``h`` entering
        level ``start`` (the input for 0): the state after them, their latents and terms.

        Split so that two models sharing their finest levels can run those once
        (:mod:`flows.pair`).
        """
        zs: list[Tensor] = []
        terms: list[tuple[Tensor, Tensor]] = []
        for i in range(start, stop):
            h = squeeze(h)
            logdet: Tensor | None = None
            for step in self._steps(i):
                h, ld = self._run_step(step, h, onehot, per_position)
                logdet = ld if logdet is None else logdet + ld
            assert logdet is not None
            if i < len(self.splits):
                split = self._split(i)
                h, z = h[:, : split.keep], h[:, split.keep :]
                mean, logs = split.params(h, onehot)
            else:  # the top: learned prior on what is left
                z = h
                mean, logs = self._top(onehot)
            lp = gaussian_log_p(z, mean, logs)
            zs.append(z)
            terms.append((logdet, lp.to(torch.float64).sum(dim=1) if per_position
                          else _sum_per_sample(lp)))
        return h, zs, terms

    @staticmethod
    def output(zs: list[Tensor], terms: list[tuple[Tensor, Tensor]]) -> FlowOutput:
        """A :class:`FlowOutput` from every level's latents and per-sample terms."""
        logdet = torch.stack([t[0] for t in terms]).sum(dim=0)
        log_pz = torch.stack([t[1] for t in terms]).sum(dim=0)
        return FlowOutput(zs=zs, log_p=log_pz + logdet, logdet=logdet, log_pz=log_pz)

    def position_map(self, terms: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
        """Every level's per-position terms spread over the input grid of ``x`` (see
        :meth:`log_p_map`)."""
        ndim = self.config.ndim
        total = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.float64, device=x.device)
        for i, (logdet, log_pz) in enumerate(terms):
            f = 2 ** (i + 1)
            m = (logdet + log_pz) / f ** ndim
            for axis in range(1, ndim + 1):
                m = m.repeat_interleave(f, dim=axis)
            total = total + m
        return total

    def forward(self, x: Tensor, cond: Tensor | int | None = None) -> FlowOutput:
        self.check_input(x)
        return self.output(*self._pass(x, self._onehot(cond, x.shape[0], x.device), False))

    def log_p_map(self, x: Tensor, cond: Tensor | int | None = None) -> Tensor:
        """log p(x) decomposed exactly over input positions: ``(N, *spatial)``, float64.

        Each level's per-position terms (coupling log-scales, the constant ActNorm and 1x1
        terms, the density of the latent factored out there) are spread evenly over the
        input pixels that position covers, so the map sums to ``log_p`` of :meth:`forward`
        and a region's share of the density can be read off without a sliding window.
        """
        self.check_input(x)
        _, terms = self._pass(x, self._onehot(cond, x.shape[0], x.device), True)
        return self.position_map(terms, x)

    def log_prob(self, x: Tensor, cond: Tensor | int | None = None) -> Tensor:
        return self.forward(x, cond).log_p

    def inverse(self, zs: list[Tensor], cond: Tensor | int | None = None) -> Tensor:
        if len(zs) != self.config.levels:
            raise ValueError(f"inverse needs {self.config.levels} latents, got {len(zs)}")
        h = zs[-1]
        onehot = self._onehot(cond, h.shape[0], h.device)
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                h = torch.cat([h, zs[i]], dim=1)
            for step in reversed(self._steps(i)):
                h = step.inverse(h, onehot)
            h = unsqueeze(h)
        return h

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, ...], temperature: float = 0.7,
               generator: torch.Generator | None = None, cond: int | None = None) -> Tensor:
        """Draw ``n`` samples on a spatial grid ``shape`` (e.g. ``(64, 64)``)."""
        if len(shape) != self.config.ndim or any(s % self.multiple for s in shape):
            raise ValueError(f"sample shape {shape} must be {self.config.ndim}D and divisible "
                             f"by {self.multiple}")
        dev = self.top_mean.device
        top_spatial = tuple(s // self.multiple for s in shape)

        def draw(mean: Tensor, logs: Tensor) -> Tensor:
            eps = torch.randn(mean.shape, generator=generator, device="cpu").to(dev)
            return mean + torch.exp(logs) * eps * temperature

        top_shape = (n, self.top_channels, *top_spatial)
        onehot = self._onehot(cond, n, dev)
        top_mean, top_logs = self._top(onehot)
        h = draw(top_mean.expand(top_shape), top_logs.expand(top_shape))
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                mean, logs = self._split(i).params(h, onehot)
                h = torch.cat([h, draw(mean, logs)], dim=1)
            for step in reversed(self._steps(i)):
                h = step.inverse(h, onehot)
            h = unsqueeze(h)
        return h

    @torch.no_grad()
    def initialize(self, x: Tensor, cond: Tensor | int | None = None) -> None:
        """Data-dependent ActNorm initialisation from one (large) batch."""
        was = self.training
        self.train()
        self.forward(x, cond)
        self.train(was)

    @property
    def initialized(self) -> bool:
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))


class Conditioned(nn.Module):
    """One condition of a class-conditional Glow, used like an unconditional model.

    The two-model posterior can be served by one conditional network: M0 = p(x | c=0) and
    M1 = p(x | c=1) share every weight except what the condition changes.
    """

    def __init__(self, glow: Glow, condition: int) -> None:
        super().__init__()
        if not 0 <= condition < glow.config.conditions:
            raise ValueError(f"condition {condition} out of range for this Glow")
        self.glow = glow
        self.condition = condition

    @property
    def config(self) -> GlowConfig:
        return self.glow.config

    @property
    def initialized(self) -> bool:
        return self.glow.initialized

    def forward(self, x: Tensor) -> FlowOutput:
        return cast(FlowOutput, self.glow(x, self.condition))

    def log_p_map(self, x: Tensor) -> Tensor:
        return self.glow.log_p_map(x, self.condition)

    def sample(self, n: int, shape: tuple[int, ...], temperature: float = 0.7,
               generator: torch.Generator | None = None) -> Tensor:
        return self.glow.sample(n, shape, temperature, generator, cond=self.condition)


def _mean_output(outs: Sequence[FlowOutput]) -> FlowOutput:
    """The mean log-density of several passes (latents: the first pass's)."""
    return FlowOutput(zs=outs[0].zs, log_p=torch.stack([o.log_p for o in outs]).mean(0),
                      logdet=torch.stack([o.logdet for o in outs]).mean(0),
                      log_pz=torch.stack([o.log_pz for o in outs]).mean(0))


class Averaged(nn.Module):
    """Several independently trained models used as one: the mean of their log-densities.

    One training run's posterior is mostly that run's SGD noise (three seeds of one bundle
    agree on a case with r 0.1-0.5, docs/results.md); averaging log p over members (a deep
    ensemble, the geometric mean of the densities) averages that noise out, and the map of the
    mean is the mean of the members' maps. Sampling uses the first member.
    """

    def __init__(self, members: Sequence[Glow | Conditioned]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an average needs at least two members")
        if any(m.config != members[0].config for m in members):
            raise ValueError("the members of an average must share one Glow configuration")
        self.members = nn.ModuleList(members)

    def _each(self) -> list[Glow | Conditioned]:
        return cast("list[Glow | Conditioned]", list(self.members))

    @property
    def config(self) -> GlowConfig:
        return self._each()[0].config

    @property
    def initialized(self) -> bool:
        return all(m.initialized for m in self._each())

    def forward(self, x: Tensor) -> FlowOutput:
        return _mean_output([m(x) for m in self._each()])

    def log_p_map(self, x: Tensor) -> Tensor:
        return torch.stack([m.log_p_map(x) for m in self._each()]).mean(0)

    def sample(self, n: int, shape: tuple[int, ...], temperature: float = 0.7,
               generator: torch.Generator | None = None) -> Tensor:
        return self._each()[0].sample(n, shape, temperature, generator)


View = tuple[tuple[int, ...], bool]  # (offset, mirrored) of one copy averaged by Translated


def translations(radius: int, ndim: int) -> list[tuple[int, ...]]:
    """Every integer offset within ``radius`` along each of ``ndim`` axes, (0, ...) first."""
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"translation radius must be a whole number >= 0, got {radius!r}")
    offs = itertools.product(range(-radius, radius + 1), repeat=ndim)
    return sorted(offs, key=lambda o: (max(map(abs, o), default=0), o))


def translate(x: Tensor, offset: Sequence[int]) -> Tensor:
    """``x`` moved by whole pixels/voxels: ``out[..., i] = x[..., i + offset]``.

    Positions that fall off the edge repeat the edge value (no wrap-around), as in the
    training augmentation.
    """
    nd = x.dim() - 2
    if len(offset) != nd:
        raise ValueError(f"offset {tuple(offset)} does not match a {nd}D input")
    r = max((abs(int(o)) for o in offset), default=0)
    if r == 0:
        return x
    xp = F.pad(x, [r] * (2 * nd), mode="replicate")
    sl = [slice(None), slice(None)] + [slice(r + int(o), r + int(o) + s)
                                       for o, s in zip(offset, x.shape[2:], strict=True)]
    return xp[tuple(sl)]


def untranslate_map(m: Tensor, offset: Sequence[int]) -> Tensor:
    """The adjoint of :func:`translate` for a per-position map ``(N, *spatial)``.

    Entry ``i`` of a translated input's map belongs to input position ``clamp(i + offset)``;
    it is added there, so the map keeps its sum (the log-density) exactly.
    """
    out = m
    for axis, o in enumerate(offset, start=1):
        if o == 0:
            continue
        n = out.shape[axis]
        idx = (torch.arange(n, device=out.device) + int(o)).clamp_(0, n - 1)
        out = torch.zeros_like(out).index_add_(axis, idx, out)
    return out


class Translated(nn.Module):
    """A model scored as the mean of its log-densities over small translations of the input.

    A CPU-sized model's log-density of one image moves with a one-pixel shift almost as much
    as between cases (the posterior of a case and of its 1-pixel shift correlate at r ~0.3,
    docs/results.md): part of every score is where the anatomy happens to fall on the pixel
    grid. Averaging over the ``(2 r + 1)^ndim`` translations within ``radius`` removes that
    part, like a test-time ensemble, at that many times the scoring cost; a shift of a pixel
    or two moves no anatomy out of the field, so every translated copy is still an image
    the models know. A map is the mean of the translated maps, each moved back onto the
    input's grid (so it still sums to the mean log-density). Sampling is the wrapped model's.

    ``mirror_axis`` (a spatial axis, e.g. 2 = left-right of a ``(D, H, W)`` head CT) adds the
    mirror image of every translated copy: for anatomy that is mirror-symmetric across that
    axis a mirrored normal head is another normal head, so the average over both halves the
    part of the score that depends on the image's handedness. ``radius`` may then be 0.
    """

    def __init__(self, model: FlowModel, radius: int, mirror_axis: int | None = None) -> None:
        super().__init__()
        if isinstance(model, Translated):
            raise ValueError("the model is already scored over translations")
        least = 0 if mirror_axis is not None else 1
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < least:
            raise ValueError(f"a translation average needs radius >= {least}, got {radius!r}")
        if mirror_axis is not None and not 0 <= mirror_axis < model.config.ndim:
            raise ValueError(f"mirror axis {mirror_axis} is not a spatial axis of the model")
        self.model = model
        self.radius = radius
        self.mirror_axis = mirror_axis

    def same_views(self, other: Translated) -> bool:
        """Whether ``other`` averages over the same translations and mirror images."""
        return (self.radius, self.mirror_axis) == (other.radius, other.mirror_axis)

    def views(self, x: Tensor) -> list[View]:
        """The (offset, mirrored) copies of ``x`` that are averaged, the identity first."""
        offs = translations(self.radius, x.dim() - 2)
        mirrored = [(o, True) for o in offs] if self.mirror_axis is not None else []
        return [(o, False) for o in offs] + mirrored

    def view(self, x: Tensor, v: View) -> Tensor:
        """``x`` translated by ``v``'s offset, then mirrored if ``v`` says so."""
        y = translate(x, v[0])
        return y.flip(2 + self.mirror_axis) if v[1] and self.mirror_axis is not None else y

    def unview_map(self, m: Tensor, v: View) -> Tensor:
        """A view's map ``(N, *spatial)`` moved back onto the input's grid (sum kept)."""
        if v[1] and self.mirror_axis is not None:
            m = m.flip(1 + self.mirror_axis)
        return untranslate_map(m, v[0])

    @property
    def config(self) -> GlowConfig:
        return self.model.config

    @property
    def initialized(self) -> bool:
        return self.model.initialized

    def forward(self, x: Tensor) -> FlowOutput:
        return _mean_output([self.model(self.view(x, v)) for v in self.views(x)])

    def log_p_map(self, x: Tensor) -> Tensor:
        maps = [self.unview_map(self.model.log_p_map(self.view(x, v)), v) for v in self.views(x)]
        return torch.stack(maps).mean(0)

    def sample(self, n: int, shape: tuple[int, ...], temperature: float = 0.7,
               generator: torch.Generator | None = None) -> Tensor:
        return self.model.sample(n, shape, temperature, generator)


FlowModel = Glow | Conditioned | Averaged | Translated
