"""The enclave's token sanitizer hook (CMIF): token ids are replaced before the embedding, never after.

`IdentitySanitizer` (ε = ∞) keeps every token; the Report-Noisy-Max mechanism plugs into the same interface.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class TokenSanitizer(Protocol):
    epsilon: float

    def sanitize(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids of the same shape, each possibly replaced, under an ε-DP guarantee per token."""
        ...


class IdentitySanitizer:
    """ε = ∞: no replacement (the cmif policy's default until a mechanism is chosen)."""

    epsilon = math.inf

    def sanitize(self, token_ids: torch.Tensor) -> torch.Tensor:
        return token_ids
