"""Masking schemes: how the enclave encodes and hides a value before it crosses to the GPU, and recovers results.

A GPU stage f is affine in its masked inputs, f(x + r) = f(x) + L(r), so the enclave subtracts the unmask
term L(r) = f(r) - f(0), which it computes itself from the masks (Slalom's idea), ahead of time if it likes.
`ring` makes this exact: values are fixed-point integers in Z_2^64 and masks are uniform there (a one-time pad).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch

from secure_split.passes.ring import check_bound, decode, encode

from .csprng import CSPRNG

# A value whose largest |x| encodes below 2^10 keeps fewer than 10 significant bits: even its largest entry is
# resolved to worse than 0.1 % (2^-10), and every smaller one worse still.
MIN_SIGNIFICANT_BITS = 10
log = logging.getLogger("secure_split")


class MaskingScheme(Protocol):
    name: str

    def encode(self, value: torch.Tensor, name: str) -> torch.Tensor:
        """The enclave value as the GPU computes on it (unmasked)."""
        ...

    def decode(self, value: torch.Tensor, bits: int | None, dtype: torch.dtype) -> torch.Tensor: ...

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A fresh mask in the wire domain; never returned twice."""
        ...


class RingMasking:
    """Fixed-point values in Z_2^64 under uniform one-time pads: perfect hiding, bit-exact unmasking."""

    name = "ring"

    def __init__(self, rng: CSPRNG, frac_bits: int, activation_bound: float) -> None:
        self.rng = rng
        self.frac_bits = frac_bits
        self.activation_bound = activation_bound
        # value name -> the fewest significant bits it kept, for values that kept fewer than MIN_SIGNIFICANT_BITS
        self.precision_lost: dict[str, float] = {}

    def encode(self, value: torch.Tensor, name: str) -> torch.Tensor:
        self._note_precision(check_bound(value, self.activation_bound, name), name)
        return encode(value, self.frac_bits)

    def _note_precision(self, peak: float, name: str) -> None:
        """Record, and warn the first time, a value whose largest |x| keeps < MIN_SIGNIFICANT_BITS bits."""
        if peak == 0.0 or peak * 2.0**self.frac_bits >= 2.0**MIN_SIGNIFICANT_BITS:  # zeros encode exactly
            return
        bits = math.log2(peak) + self.frac_bits  # below 0: every entry rounds to 0
        if name not in self.precision_lost:
            log.warning(
                "secure_split: cut %r: its largest |x| sent, %.3g, keeps %.1f significant bits at frac_bits=%d "
                "(fewer than %d): results lose precision; raise SplitConfig.frac_bits",
                name, peak, bits, self.frac_bits, MIN_SIGNIFICANT_BITS,
            )  # fmt: skip
        self.precision_lost[name] = min(bits, self.precision_lost.get(name, bits))

    def decode(self, value: torch.Tensor, bits: int | None, dtype: torch.dtype) -> torch.Tensor:
        assert bits is not None, "a ring value decodes with the fractional bits its GPU stage produced"
        return decode(value, bits, dtype)

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.rng.integers(shape)


class _FloatingPoint:
    """Values cross in their own dtype, unencoded."""

    def encode(self, value: torch.Tensor, name: str) -> torch.Tensor:
        return value

    def decode(self, value: torch.Tensor, bits: int | None, dtype: torch.dtype) -> torch.Tensor:
        return value


class FloatMasking(_FloatingPoint):
    """Additive Gaussian masks in floating point: statistical hiding, error growing with `scale`."""

    name = "float"

    def __init__(self, rng: CSPRNG, scale: float) -> None:
        self.rng = rng
        self.scale = scale

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.rng.gaussian(shape, self.scale, dtype)


class RemoMasking(_FloatingPoint):
    """ReMO's factored masks: a value's rows get P · Q, P secret and fresh per call, Q public per program.

    Q (m × d) has orthonormal rows, so each row's mask is Gaussian with std `scale` inside the m-dimensional
    subspace Q spans, and zero outside it: with m < d that complement crosses unmasked. Because the mask is
    P · Q, the unmask term of a row-wise stage L is P · L(Q), and L(Q) is computed by whoever holds the weights.
    """

    name = "remo"

    def __init__(self, rng: CSPRNG, scale: float, rank: int | None) -> None:
        self.rng = rng
        self.scale = scale
        self.rank = rank

    def rank_for(self, width: int) -> int:
        """m for rows of `width` features: the configured rank, at most the width (None: full rank)."""
        return width if self.rank is None else min(self.rank, width)

    def basis(self, width: int) -> torch.Tensor | None:
        """A public Q: `rank_for(width)` orthonormal rows of length `width` (float64); None for the identity.

        At full rank any orthonormal Q gives P · Q the same law as P (an isotropic Gaussian is rotation
        invariant), so the identity is used and never materialised (a vocabulary-wide Q would not fit)."""
        if self.rank_for(width) == width:
            return None
        q, _ = torch.linalg.qr(self.rng.gaussian((width, self.rank_for(width)), 1.0, torch.float64))
        return q.T.contiguous()

    def factor(self, rows: int, rank: int) -> torch.Tensor:
        """A secret P for one call: Gaussian, std `scale` (float64)."""
        return self.rng.gaussian((rows, rank), self.scale, torch.float64)

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        raise RuntimeError("remo masks are drawn as factors P · Q (secure_split.remo.RemoKeys)")


class NoMasking(_FloatingPoint):
    """Plaintext crossing: a baseline, reported as unprotected. It draws no masks."""

    name = "none"

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        raise RuntimeError("masking='none' draws no masks")


def hide(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """value + mask (wrapping in Z_2^64 for int64), in the mask's layout, which is the one the stage was traced on."""
    if value.shape != mask.shape:  # a mask of a wrong (edited) cut shape would broadcast: one pad over many values
        raise ValueError(f"a value of shape {tuple(value.shape)} cannot hide under a mask of shape {tuple(mask.shape)}")
    return torch.add(value, mask, out=torch.empty_like(mask))


def reveal(value: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    return torch.sub(value, term, out=torch.empty_like(value))


def make_masking(
    name: str, rng: CSPRNG, mask_scale: float, frac_bits: int, activation_bound: float, remo_rank: int | None
) -> MaskingScheme:
    if name == "ring":
        return RingMasking(rng, frac_bits, activation_bound)
    if name == "float":
        return FloatMasking(rng, mask_scale)
    if name == "remo":
        return RemoMasking(rng, mask_scale, remo_rank)
    if name == "none":
        return NoMasking()
    raise ValueError(f"no masking scheme named {name!r}")
