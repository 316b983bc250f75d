"""Masking schemes: how the enclave hides a value before it crosses to the GPU, and recovers the result.

A GPU stage f is affine in its masked inputs, f(x + r) = f(x) + L(r), so the enclave subtracts the unmask term
L(r) = f(r) - f(0), which it computes itself from the masks (Slalom's idea).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .csprng import CSPRNG


class MaskingScheme(Protocol):
    name: str

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        """A fresh mask shaped like `like`; never returned twice."""
        ...

    def hide(self, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def reveal(self, value: torch.Tensor, term: torch.Tensor) -> torch.Tensor: ...


class FloatMasking:
    """Additive Gaussian masks in floating point: statistical hiding, error growing with `scale`."""

    name = "float"

    def __init__(self, rng: CSPRNG, scale: float) -> None:
        self.rng = rng
        self.scale = scale

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        # Same strides as the value: the stage graph's views were traced against that layout.
        return torch.empty_like(like).copy_(self.rng.gaussian(tuple(like.shape), self.scale, like.dtype))

    def hide(self, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return value + mask

    def reveal(self, value: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return value - term


class NoMasking:
    """Plaintext crossing: a baseline, reported as unprotected."""

    name = "none"

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like)

    def hide(self, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return value

    def reveal(self, value: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return value


def make_masking(name: str, rng: CSPRNG, scale: float) -> MaskingScheme:
    if name == "float":
        return FloatMasking(rng, scale)
    if name == "none":
        return NoMasking()
    raise ValueError(f"no masking scheme named {name!r}")
