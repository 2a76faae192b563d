"""n-bit quantisation, dequantisation and bits per dimension.

Images reach the flows as floats in [0, 1]. They are quantised to ``n_bits`` (the paper's
BCT uses 7 bits, CXR 8), then dequantised into [-0.5, 0.5): uniform noise within each bin
while training, the bin centre (a fixed offset) at inference so scores are deterministic.
The density of a continuous input relates to the probability of the discrete image by
``log P(x) = log p(y) - D * n_bits * log 2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_bits(n_bits: int) -> None:
    if not 1 <= n_bits <= 16:
        raise ValueError(f"n_bits must be between 1 and 16, got {n_bits}")


def dequantize(x01: Tensor, n_bits: int, *, noise: bool, generator: torch.Generator | None = None
               ) -> Tensor:
    """Map [0, 1] images to dequantised flow inputs in [-0.5, 0.5).

    ``noise=False`` puts every value at its bin centre (deterministic inference).
    """
    check_bits(n_bits)
    bins = 2 ** n_bits
    q = torch.clamp(torch.floor(x01 * bins), 0, bins - 1)
    if noise:
        u = torch.rand(q.shape, generator=generator, device="cpu").to(q.device, q.dtype)
    else:
        u = torch.full_like(q, 0.5)
    return (q + u) / bins - 0.5


def discrete_log_p(log_p: Tensor, n_dims: int, n_bits: int) -> Tensor:
    """Log-probability of the discrete image from the continuous density (nats)."""
    return log_p - n_dims * n_bits * math.log(2.0)


def bits_per_dim(log_p: Tensor, n_dims: int, n_bits: int) -> Tensor:
    """Negative discrete log-likelihood in bits per dimension (the usual flow metric)."""
    return -discrete_log_p(log_p, n_dims, n_bits) / (n_dims * math.log(2.0))
