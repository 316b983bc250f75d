"""The SanText+ token sanitizer ("santext+", Yue et al. 2021)."""

from __future__ import annotations

from typing import Any

import torch

from .sanitizer_base import VocabularySanitizer


class SanTextPlus(VocabularySanitizer):
    """Mechanism "santext+" (SanText+, Yue et al. 2021): a sensitive token x gives y with probability
    ∝ exp(-ε·‖E_x - E_y‖/2) over the vocabulary: ε·d-metric local DP, P[y | x] ≤ e^{ε·‖E_x - E_x'‖} · P[y | x'], a
    weaker bound for tokens far apart. Tokens are sensitive when among the fraction w least frequent (`frequencies`;
    without them every token is); a non-sensitive token is sanitized with probability p and kept otherwise, so it
    has no DP guarantee of its own."""

    mechanism = "santext+"

    def __init__(
        self, *base: Any, frequencies: torch.Tensor | None = None, p: float = 0.3, w: float = 0.9, **named: Any
    ) -> None:
        super().__init__(*base, **named)
        if not (0.0 <= p <= 1.0 and 0.0 <= w <= 1.0):
            raise ValueError(f"Sanitizer p and w must lie in [0, 1], got p={p!r}, w={w!r}")
        self.p = p
        self.sensitive = _sensitive(frequencies, w, self.table.shape[0])
        self.output_table = self.table[self.outputs].double()

    def _fill_probabilities(self, token_id: int, probs: torch.Tensor) -> None:
        probs[self.outputs] = self._distances_softmax(torch.tensor([token_id]))[0]
        if not self.sensitive[token_id]:
            probs *= self.p
            probs[token_id] += 1.0 - self.p

    def _draw(self, tokens: torch.Tensor) -> torch.Tensor:
        out = tokens.clone()
        sanitize = self.sensitive[tokens] | (self.rng.uniform(len(tokens), torch.float64) <= self.p)
        rows = torch.nonzero(sanitize).flatten()
        if len(rows):
            unique, inverse = torch.unique(tokens[rows], return_inverse=True)
            cdf = self._distances_softmax(unique).cumsum(dim=1)[inverse]
            u = self.rng.uniform(len(rows), torch.float64)[:, None] * cdf[:, -1:]
            out[rows] = self.outputs[torch.searchsorted(cdf, u).clamp_(max=len(self.outputs) - 1).flatten()]
        return out

    def _distances_softmax(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's sanitized output distribution over `outputs`: softmax of -ε·distance/2."""
        distance = torch.cdist(self.table[tokens].double(), self.output_table)
        return torch.softmax(-0.5 * self.epsilon * distance, dim=1)


def _sensitive(frequencies: torch.Tensor | None, w: float, size: int) -> torch.Tensor:
    """The fraction `w` least frequent tokens are sensitive (all of them without frequencies)."""
    if frequencies is None:
        return torch.ones(size, dtype=torch.bool)
    order = torch.argsort(torch.as_tensor(frequencies, dtype=torch.float64), stable=True)
    sensitive = torch.zeros(size, dtype=torch.bool)
    sensitive[order[: round(w * size)]] = True
    return sensitive
