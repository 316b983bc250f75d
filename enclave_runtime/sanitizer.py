"""The enclave's token sanitizer (CMIF): token ids are replaced under differential privacy before the embedding.

`make_token_sanitizer(mechanism, epsilon, embeddings, k)` builds one; it replaces each token independently, and
all randomness comes from the enclave's CSPRNG. Special tokens (padding, CLS, SEP, ...) are never replaced and
never produced. The mechanisms, each class stating what it guarantees per token, for two non-special input
tokens x, x' and any output y:

- "rnm": `ReportNoisyMax` (CMIF's Report-Noisy-Max, `sanitizer_rnm`): ε-DP on one token, for every pair x, x'.
- "santext+": `SanTextPlus` (Yue et al. 2021, `sanitizer_santext`): ε·d-metric local DP on sensitive tokens.
- "custext+": `CusTextPlus` (Chen et al. 2023, `sanitizer_custext`): ε-DP between tokens of one cluster.

A sequence of n tokens sanitized independently is nε-DP (basic composition) against changing every token.
ε = ∞ returns the input.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from .sanitizer_base import VocabularySanitizer
from .sanitizer_custext import CusTextPlus
from .sanitizer_rnm import ReportNoisyMax
from .sanitizer_santext import SanTextPlus

SANITIZERS: dict[str, type[VocabularySanitizer]] = {c.mechanism: c for c in (ReportNoisyMax, SanTextPlus, CusTextPlus)}
MECHANISMS = tuple(SANITIZERS)


class TokenSanitizer(Protocol):
    epsilon: float
    mechanism: str

    def sanitize(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids of the same shape, each possibly replaced, under an ε-DP guarantee per token."""
        ...


class IdentitySanitizer:
    """ε = ∞: no replacement."""

    epsilon = math.inf
    mechanism = "none"

    def sanitize(self, token_ids: torch.Tensor) -> torch.Tensor:
        return token_ids


def make_token_sanitizer(
    mechanism: str,
    epsilon: float,
    embeddings: torch.Tensor,
    k: int = 20,
    test_seed: int | None = None,
    special_ids: Iterable[int] = (),
    **options: Any,
) -> VocabularySanitizer:
    """The sanitizer `mechanism` names, over the embedding table `embeddings` (vocabulary × width).

    k: candidates per token (rnm: the tokens that get a semantic score; custext+: the cluster size).
    test_seed: tests only: makes the noise reproducible, and predictable (`CSPRNG`); None keys it from the OS.
    special_ids: never replaced, never produced. options, each mechanism's own: frequencies (santext+): per-token
    counts that decide which tokens are sensitive (the fraction w least frequent); p (santext+): the probability
    that a non-sensitive token is sanitized; stopword_ids (custext+): kept as they are."""
    if mechanism not in SANITIZERS:
        raise ValueError(f"Sanitizer mechanism must be one of {list(MECHANISMS)}, got {mechanism!r}")
    cls = SANITIZERS[mechanism]
    parameters = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if unknown := sorted(set(options) - set(accepted)):
        raise ValueError(f"Sanitizer {mechanism!r} takes the options {accepted}, not {unknown}")
    return cls(epsilon, embeddings, k, test_seed, special_ids, **options)
