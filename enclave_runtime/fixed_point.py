"""Fixed-point codec between floating-point activations and Z_2^64 (int64 with wrap-around).

A real x is held as round(x·2^b) with b fractional bits: activations enter the GPU with b = `frac_bits`, a
product with a weight encoded at f bits leaves with b + f bits. Decoding reads the integer as signed, so a result is
correct while its magnitude stays below 2^63; the compiler bounds that from the weights and a declared
activation bound, and `encode` refuses any activation beyond that bound instead of wrapping it into garbage.
"""

from __future__ import annotations

import torch

INT64_LIMIT = 2.0**63


class RingOverflowError(OverflowError):
    """A value would leave the range where fixed-point arithmetic in Z_2^64 is exact."""


def encode(x: torch.Tensor | float, bits: int) -> torch.Tensor:
    """round(x·2^bits) as int64; x must fit (see `check_bound`)."""
    x = torch.as_tensor(x)
    return torch.round(x.to(torch.float64) * 2.0**bits).to(torch.int64)


def decode(y: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (y.to(torch.float64) * 2.0**-bits).to(dtype)


def check_bound(x: torch.Tensor, bound: float, name: str) -> float:
    """Refuse an activation the compiler's headroom analysis did not allow for; returns its largest |x|."""
    peak = x.abs().max().item() if x.numel() else 0.0
    if not peak <= bound:  # also catches NaN
        raise RingOverflowError(
            f"activation {name!r} reached |x| = {peak:.6g}, beyond SplitConfig.activation_bound = {bound:g}: "
            "its fixed-point encoding could overflow Z_2^64 on the GPU; raise activation_bound (the compiler "
            "re-checks the headroom) or lower frac_bits"
        )
    return peak
