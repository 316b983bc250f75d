"""The CusText+ token sanitizer ("custext+", Chen et al. 2023)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .sanitizer_base import VocabularySanitizer, token_mask


class CusTextPlus(VocabularySanitizer):
    """Mechanism "custext+" (CusText+, Chen et al. 2023): the vocabulary is partitioned greedily into clusters of k
    mutually near tokens (cosine); x gives y in its own cluster with probability ∝ exp(ε·u(x, y)/2), u the cosine
    similarity min-max normalised to [0, 1] within the cluster (Δ = 1). ε-DP between tokens of the same cluster; the
    cluster itself is revealed (its members share one output set, which is how CusText makes per-token output sets
    consistent). Stopwords (`stopword_ids`) are kept as they are."""

    mechanism = "custext+"

    def __init__(self, *base: Any, stopword_ids: Iterable[int] = (), **named: Any) -> None:
        super().__init__(*base, **named)
        self.kept |= token_mask(self.table.shape[0], stopword_ids)
        self.cluster_of, self.clusters = _clusters(self.unit, self.outputs, self.k)

    def _fill_probabilities(self, token_id: int, probs: torch.Tensor) -> None:
        members, logits = self._logits(token_id)
        probs[members] = torch.softmax(logits, 0)

    def _draw(self, tokens: torch.Tensor) -> torch.Tensor:
        """One draw per token from its cluster: the clusters' CDFs as rows (padded to k), searched row by row."""
        unique, inverse = torch.unique(tokens, return_inverse=True)
        members = torch.zeros(len(unique), self.k, dtype=torch.int64)
        cdf = torch.full((len(unique), self.k), 2.0, dtype=torch.float64)  # padding is never reached
        for row, token in enumerate(unique.tolist()):
            ids, logits = self._logits(token)
            members[row, : len(ids)], members[row, len(ids) :] = ids, ids[-1]
            cdf[row, : len(ids)] = torch.softmax(logits, 0).cumsum(0)
            cdf[row, len(ids) - 1] = 1.0
        u = self.rng.uniform(len(tokens), torch.float64)[:, None]
        pick = torch.searchsorted(cdf[inverse], u).clamp_(max=self.k - 1)
        return members[inverse].gather(1, pick).flatten()

    def _logits(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The members of `token`'s cluster, and the logits ε·u/2 of drawing each."""
        members = self.clusters[int(self.cluster_of[token])]
        similarity = (self.unit[members] @ self.unit[token]).double()
        spread = similarity.max() - similarity.min()
        score = (similarity - similarity.min()) / spread if spread > 0 else torch.ones_like(similarity)
        return members, 0.5 * self.epsilon * score


def _clusters(unit: torch.Tensor, outputs: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CusText's mapping: greedily, the first unassigned token and its k - 1 nearest unassigned ones form a
    cluster; every token's output set is its cluster. Returns each token's cluster index (-1: none) and them."""
    cluster_of = torch.full((unit.shape[0],), -1, dtype=torch.int64)
    clusters = []
    remaining = outputs.clone()
    while len(remaining):
        similarity = unit[remaining] @ unit[remaining[0]]
        take = torch.topk(similarity, min(k, len(remaining))).indices
        take = torch.cat([torch.zeros(1, dtype=torch.int64), take[take != 0]])[: min(k, len(remaining))]
        cluster_of[remaining[take]] = len(clusters)
        clusters.append(remaining[take].sort().values)
        keep = torch.ones(len(remaining), dtype=torch.bool)
        keep[take] = False
        remaining = remaining[keep]
    return cluster_of, clusters
