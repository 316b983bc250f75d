"""What every token sanitizer mechanism shares: the vocabulary, its special tokens, the CSPRNG and the loop.

A mechanism subclasses `VocabularySanitizer` and supplies `_draw` (replacements for a batch of tokens) and
`_fill_probabilities` (one token's exact output distribution); `sanitizer.make_token_sanitizer` builds one by
name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch

from .csprng import CSPRNG


class VocabularySanitizer:
    """A token sanitizer over a model's embedding table `embeddings` (vocabulary × width).

    k: candidates per token (what it means is the mechanism's). test_seed: tests only: makes the noise
    reproducible, and predictable (`CSPRNG`); None keys it from the OS. special_ids: never replaced, never
    produced: `outputs`, every mechanism's range, leaves them out, and `kept` (tokens returned as they are)
    holds them."""

    mechanism: ClassVar[str]

    def __init__(
        self,
        epsilon: float,
        embeddings: torch.Tensor,
        k: int = 20,
        test_seed: int | None = None,
        special_ids: Iterable[int] = (),
    ) -> None:
        if not (isinstance(epsilon, int | float) and epsilon > 0):
            raise ValueError(f"Sanitizer epsilon must be a positive number (math.inf: no noise), got {epsilon!r}")
        if embeddings.dim() != 2:
            raise ValueError(f"Sanitizer embeddings must be a (vocabulary, width) table, got {tuple(embeddings.shape)}")
        if not (isinstance(k, int) and 1 <= k <= embeddings.shape[0]):
            raise ValueError(f"Sanitizer k must be an int in [1, vocabulary size], got {k!r}")
        self.epsilon, self.k = float(epsilon), k
        self.rng = CSPRNG("sanitizer", test_seed)
        self.table = embeddings.detach().to(torch.float32).cpu()
        self.special = token_mask(self.table.shape[0], special_ids)
        self.outputs = torch.nonzero(~self.special).flatten()  # the range of every mechanism
        self.unit = torch.nn.functional.normalize(self.table, dim=1)
        self.kept = self.special.clone()
        self.tokens_seen = 0
        self.tokens_replaced = 0

    @property
    def replacement_rate(self) -> float:
        """The share of the tokens sanitized so far that came out different."""
        return self.tokens_replaced / max(self.tokens_seen, 1)

    def sanitize(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids of the same shape and dtype, each non-special one drawn from the mechanism."""
        flat = token_ids.flatten().to(torch.int64).cpu()
        if bool(((flat < 0) | (flat >= self.table.shape[0])).any()):
            raise ValueError(f"token ids must lie in [0, {self.table.shape[0]}) (the embedding table's rows)")
        out = flat.clone()
        if math.isfinite(self.epsilon):
            todo = torch.nonzero(~self.kept[flat]).flatten()
            if len(todo):
                out[todo] = self._draw(flat[todo])
        self.tokens_seen += int((~self.special[flat]).sum())
        self.tokens_replaced += int((out != flat).sum())
        return out.reshape(token_ids.shape).to(token_ids.dtype)

    def probabilities(self, token_id: int) -> torch.Tensor:
        """The exact output distribution for one input token, over the whole vocabulary (float64)."""
        probs = torch.zeros(self.table.shape[0], dtype=torch.float64)
        if self.kept[token_id] or not math.isfinite(self.epsilon):
            probs[token_id] = 1.0
        else:
            self._fill_probabilities(token_id, probs)
        return probs

    def _draw(self, tokens: torch.Tensor) -> torch.Tensor:
        """One output token per input token (none of them kept; ε finite), from the CSPRNG."""
        raise NotImplementedError

    def _fill_probabilities(self, token_id: int, probs: torch.Tensor) -> None:
        """Write the output distribution of a token that is not kept (ε finite) into `probs` (zeros)."""
        raise NotImplementedError


def token_mask(size: int, ids: Iterable[int]) -> torch.Tensor:
    """A vocabulary-sized mask, True at `ids`."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.as_tensor(list(ids), dtype=torch.int64)] = True
    return mask
