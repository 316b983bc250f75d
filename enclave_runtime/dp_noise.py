"""Differential-privacy noise for the token sanitizer, all drawn from the enclave's CSPRNG (`CSPRNG.uniform`).

Laplace draws and the maximum of many Laplace variables by the inverse CDF, uniform indices, and the exact
output probabilities of Report-Noisy-Max (a 1-D integral).
"""

from __future__ import annotations

import math

import torch

from .csprng import CSPRNG

GRID = 256  # integration points per Laplace scale, for `noisy_max_probabilities`


def laplace(rng: CSPRNG, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Laplace(0, scale) samples by the inverse CDF of keystream uniforms."""
    u = rng.uniform(math.prod(shape), torch.float64).clamp_(max=1.0 - 2.0**-53).reshape(shape)
    return torch.where(u < 0.5, scale * torch.log(2.0 * u), -scale * torch.log(2.0 - 2.0 * u))


def laplace_max(rng: CSPRNG, n: int, m: int, scale: float) -> torch.Tensor:
    """n draws of the maximum of m i.i.d. Laplace(0, scale) variables.

    P(max ≤ t) = F(t)^m, so max = F⁻¹(U^{1/m}); its upper tail q = 1 - U^{1/m} = -expm1(log U / m) keeps full
    precision when m is a whole vocabulary."""
    q = -torch.expm1(torch.log(rng.uniform(n, torch.float64)) / m)
    return torch.where(q <= 0.5, -scale * torch.log(2.0 * q), scale * torch.log(2.0 - 2.0 * q))


def uniform_index(rng: CSPRNG, n: int, size: int) -> torch.Tensor:
    """n indices uniform in [0, size) (53 random bits each; the bias is below size / 2^53)."""
    return (rng.uniform(n, torch.float64) * size).ceil_().to(torch.int64).sub_(1).clamp_(0, size - 1)


def noisy_max_probabilities(scores: torch.Tensor, floor_count: int, scale: float) -> tuple[torch.Tensor, float]:
    """P(argmax) of scores + Laplace(scale) noise, with `floor_count` more scores of 0: for each scored token,
    and for each floor token (all equal). A 1-D integral over the maximum's value, on a fine grid."""
    lo, hi = float(scores.min().clamp(max=0.0)) - 40 * scale, float(scores.max()) + 40 * scale
    t = torch.linspace(lo, hi, int((hi - lo) / scale * GRID) + 1, dtype=torch.float64)
    shifted = t[None, :] - scores[:, None]
    log_cdf = torch.where(shifted < 0, math.log(0.5) + shifted / scale, torch.log1p(-0.5 * torch.exp(-shifted / scale)))
    log_pdf = -math.log(2 * scale) - shifted.abs() / scale
    floor_cdf = torch.where(t < 0, math.log(0.5) + t / scale, torch.log1p(-0.5 * torch.exp(-t / scale)))
    all_cdf = log_cdf.sum(0) + floor_count * floor_cdf
    inside = torch.trapezoid(torch.exp(log_pdf + all_cdf - log_cdf), t, dim=1)
    floor_pdf = -math.log(2 * scale) - t.abs() / scale
    floor = torch.trapezoid(torch.exp(floor_pdf + all_cdf - floor_cdf), t) if floor_count else torch.tensor(0.0)
    return inside, float(floor)
