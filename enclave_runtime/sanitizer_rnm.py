"""CMIF's Report-Noisy-Max token sanitizer ("rnm")."""

from __future__ import annotations

from typing import Any

import torch

from .dp_noise import laplace, laplace_max, noisy_max_probabilities, uniform_index
from .sanitizer_base import VocabularySanitizer


class ReportNoisyMax(VocabularySanitizer):
    """Mechanism "rnm" (CMIF's Report-Noisy-Max): P[y | x] ≤ e^ε · P[y | x'] for *every* pair x, x'
    (ε-DP on one token).

    Each output token y gets a score u(x, y) in [0, 1]: (1 + cos(E_x, E_y)) / 2 for the k tokens most
    cosine-similar to x in the model's own embedding table E, and 0 for every other token. Scores lie in [0, 1],
    so their sensitivity is Δ = 1; the mechanism reports argmax_y u(x, y) + Lap(2Δ/ε), the scale that makes
    Report-Noisy-Max ε-DP for scores that are not monotone (Dwork & Roth, sec. 3.3).
    The top-k caveat: each token has its own top-k set. Had the mechanism drawn only from C(x), an output in C(x)
    but not in C(x') would be impossible under x' and the privacy loss infinite. Here the range is the whole
    vocabulary for every input: tokens outside C(x) are still candidates, with the floor score 0, and their noisy
    maximum is drawn exactly (the maximum of m i.i.d. Laplace variables by its inverse CDF, the winner uniform
    among them), so a call costs O(k) per token, not O(vocabulary). The top-k only decides which tokens get a
    semantic score."""

    mechanism = "rnm"

    def __init__(self, *base: Any, **named: Any) -> None:
        super().__init__(*base, **named)
        self.output_unit = self.unit[self.outputs]
        self._top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _fill_probabilities(self, token_id: int, probs: torch.Tensor) -> None:
        ids, scores = self._candidates(token_id)
        inside, floor = noisy_max_probabilities(scores, len(self.outputs) - len(ids), 2.0 / self.epsilon)
        probs[self.outputs] = floor
        probs[ids] = inside

    def _draw(self, tokens: torch.Tensor) -> torch.Tensor:
        scale = 2.0 / self.epsilon
        unique, inverse = torch.unique(tokens, return_inverse=True)
        self._find_candidates([int(t) for t in unique if int(t) not in self._top])
        ids = torch.stack([self._top[int(t)][0] for t in unique])[inverse]
        scores = torch.stack([self._top[int(t)][1] for t in unique])[inverse]
        best, where = (scores + laplace(self.rng, tuple(scores.shape), scale)).max(dim=1)
        winners = ids.gather(1, where[:, None]).flatten()
        outside = len(self.outputs) - ids.shape[1]  # every token's candidates number min(k, range)
        if outside == 0:
            return winners
        floor = laplace_max(self.rng, len(tokens), outside, scale) > best
        if floor.any():
            winners[floor] = self._outside(ids[floor])
        return winners

    def _outside(self, candidates: torch.Tensor) -> torch.Tensor:
        """One output token per row, uniform among those not in the row's candidates (rejection sampling)."""
        picks = torch.empty(len(candidates), dtype=torch.int64)
        todo = torch.arange(len(candidates))
        while len(todo):
            draw = self.outputs[uniform_index(self.rng, len(todo), len(self.outputs))]
            fresh = ~(candidates[todo] == draw[:, None]).any(dim=1)
            picks[todo[fresh]] = draw[fresh]
            todo = todo[~fresh]
        return picks

    def _candidates(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k output tokens most cosine-similar to `token`, and their scores (1 + cos) / 2."""
        self._find_candidates([token] if token not in self._top else [])
        return self._top[token]

    def _find_candidates(self, tokens: list[int]) -> None:
        """Compute and keep the candidates of `tokens`, in blocks (one product with the table per block)."""
        for i in range(0, len(tokens), 1024):
            block = tokens[i : i + 1024]
            top = torch.topk(self.unit[block] @ self.output_unit.T, min(self.k, len(self.outputs)), dim=1)
            for token, index, value in zip(block, top.indices, top.values, strict=True):
                self._top[token] = (self.outputs[index], (1.0 + value.to(torch.float64)) / 2.0)
