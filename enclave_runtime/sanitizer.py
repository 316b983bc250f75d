"""The enclave's token sanitizer (CMIF): token ids are replaced under differential privacy before the embedding.

`Sanitizer(mechanism, epsilon, embeddings, k)` replaces each token independently; all randomness comes from the
enclave's CSPRNG. Special tokens (padding, CLS, SEP, ...) are never replaced and never produced. What each
mechanism guarantees, per token, for two non-special input tokens x, x' and any output y:

- "rnm" (CMIF's Report-Noisy-Max): P[y | x] ≤ e^ε · P[y | x'] for *every* pair x, x' (ε-DP on one token).
  Each output token y gets a score u(x, y) in [0, 1]: (1 + cos(E_x, E_y)) / 2 for the k tokens most
  cosine-similar to x in the model's own embedding table E, and 0 for every other token. Scores lie in [0, 1],
  so their sensitivity is Δ = 1; the mechanism reports argmax_y u(x, y) + Lap(2Δ/ε), the scale that makes
  Report-Noisy-Max ε-DP for scores that are not monotone (Dwork & Roth, sec. 3.3).
  The top-k caveat: each token has its own top-k set. Had the mechanism drawn only from C(x), an output in C(x)
  but not in C(x') would be impossible under x' and the privacy loss infinite. Here the range is the whole
  vocabulary for every input: tokens outside C(x) are still candidates, with the floor score 0, and their noisy
  maximum is drawn exactly (the maximum of m i.i.d. Laplace variables by its inverse CDF, the winner uniform
  among them), so a call costs O(k) per token, not O(vocabulary). The top-k only decides which tokens get a
  semantic score.
- "santext+" (SanText+, Yue et al. 2021): a sensitive token x gives y with probability ∝ exp(-ε·‖E_x - E_y‖/2)
  over the vocabulary: ε·d-metric local DP, P[y | x] ≤ e^{ε·‖E_x - E_x'‖} · P[y | x'], a weaker bound for
  tokens far apart. Tokens are sensitive when among the fraction w least frequent (`frequencies`; without
  them every token is); a non-sensitive token is sanitized with probability p and kept otherwise, so it has no
  DP guarantee of its own.
- "custext+" (CusText+, Chen et al. 2023): the vocabulary is partitioned greedily into clusters of k mutually
  near tokens (cosine); x gives y in its own cluster with probability ∝ exp(ε·u(x, y)/2), u the cosine
  similarity min-max normalised to [0, 1] within the cluster (Δ = 1). ε-DP between tokens of the same cluster;
  the cluster itself is revealed (its members share one output set, which is how CusText makes per-token output
  sets consistent). Stopwords (`stopword_ids`) are kept as they are.

A sequence of n tokens sanitized independently is nε-DP (basic composition) against changing every token.
ε = ∞ returns the input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch

from .csprng import CSPRNG

MECHANISMS = ("rnm", "santext+", "custext+")
_GRID = 256  # integration points per Laplace scale, for `probabilities` under rnm


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


class Sanitizer:
    """A token sanitizer over a model's embedding table `embeddings` (vocabulary × width).

    k: candidates per token (rnm: the tokens that get a semantic score; custext+: the cluster size).
    test_seed: tests only: makes the noise reproducible, and predictable (`CSPRNG`); None keys it from the OS.
    special_ids: never replaced, never produced. frequencies (santext+): per-token counts that decide which
    tokens are sensitive (the fraction w least frequent); p (santext+): the probability that a non-sensitive
    token is sanitized. stopword_ids (custext+): kept as they are."""

    def __init__(
        self,
        mechanism: str,
        epsilon: float,
        embeddings: torch.Tensor,
        k: int = 20,
        test_seed: int | None = None,
        special_ids: Iterable[int] = (),
        frequencies: torch.Tensor | None = None,
        stopword_ids: Iterable[int] = (),
        p: float = 0.3,
        w: float = 0.9,
    ) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"Sanitizer mechanism must be one of {list(MECHANISMS)}, got {mechanism!r}")
        if not (isinstance(epsilon, int | float) and epsilon > 0):
            raise ValueError(f"Sanitizer epsilon must be a positive number (math.inf: no noise), got {epsilon!r}")
        if embeddings.dim() != 2:
            raise ValueError(f"Sanitizer embeddings must be a (vocabulary, width) table, got {tuple(embeddings.shape)}")
        if not (isinstance(k, int) and 1 <= k <= embeddings.shape[0]):
            raise ValueError(f"Sanitizer k must be an int in [1, vocabulary size], got {k!r}")
        if not (0.0 <= p <= 1.0 and 0.0 <= w <= 1.0):
            raise ValueError(f"Sanitizer p and w must lie in [0, 1], got p={p!r}, w={w!r}")
        self.mechanism, self.epsilon, self.k, self.p = mechanism, float(epsilon), k, p
        self.rng = CSPRNG("sanitizer", test_seed)
        self.table = embeddings.detach().to(torch.float32).cpu()
        vocabulary = self.table.shape[0]
        self.special = _mask(vocabulary, special_ids)
        self.outputs = torch.nonzero(~self.special).flatten()  # the range of every mechanism
        self.unit = torch.nn.functional.normalize(self.table, dim=1)
        self.output_unit, self.output_table = self.unit[self.outputs], self.table[self.outputs].double()
        self.kept = self.special | _mask(vocabulary, stopword_ids if mechanism == "custext+" else ())
        self.sensitive = _sensitive(frequencies, w, vocabulary) if mechanism == "santext+" else ~self.special
        custext = mechanism == "custext+"
        self.cluster_of, self.clusters = _clusters(self.unit, self.outputs, k) if custext else (None, [])
        self._top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
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
        elif self.mechanism == "rnm":
            ids, scores = self._candidates(token_id)
            inside, floor = _noisy_max_probabilities(scores, len(self.outputs) - len(ids), 2.0 / self.epsilon)
            probs[self.outputs] = floor
            probs[ids] = inside
        elif self.mechanism == "santext+":
            probs[self.outputs] = self._santext_probabilities(torch.tensor([token_id]))[0]
            if not self.sensitive[token_id]:
                probs *= self.p
                probs[token_id] += 1.0 - self.p
        else:
            members, logits = self._custext_logits(token_id)
            probs[members] = torch.softmax(logits, 0)
        return probs

    # -- the mechanisms -------------------------------------------------------------------------------------

    def _draw(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mechanism == "rnm":
            return self._report_noisy_max(tokens)
        if self.mechanism == "santext+":
            return self._santext(tokens)
        return self._custext(tokens)

    def _report_noisy_max(self, tokens: torch.Tensor) -> torch.Tensor:
        scale = 2.0 / self.epsilon
        unique, inverse = torch.unique(tokens, return_inverse=True)
        self._find_candidates([int(t) for t in unique if int(t) not in self._top])
        ids = torch.stack([self._top[int(t)][0] for t in unique])[inverse]
        scores = torch.stack([self._top[int(t)][1] for t in unique])[inverse]
        best, where = (scores + _laplace(self.rng, tuple(scores.shape), scale)).max(dim=1)
        winners = ids.gather(1, where[:, None]).flatten()
        outside = len(self.outputs) - ids.shape[1]  # every token's candidates number min(k, range)
        if outside == 0:
            return winners
        floor = _laplace_max(self.rng, len(tokens), outside, scale) > best
        if floor.any():
            winners[floor] = self._outside(ids[floor])
        return winners

    def _outside(self, candidates: torch.Tensor) -> torch.Tensor:
        """One output token per row, uniform among those not in the row's candidates (rejection sampling)."""
        picks = torch.empty(len(candidates), dtype=torch.int64)
        todo = torch.arange(len(candidates))
        while len(todo):
            draw = self.outputs[_uniform_index(self.rng, len(todo), len(self.outputs))]
            fresh = ~(candidates[todo] == draw[:, None]).any(dim=1)
            picks[todo[fresh]] = draw[fresh]
            todo = todo[~fresh]
        return picks

    def _candidates(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """rnm: the k output tokens most cosine-similar to `token`, and their scores (1 + cos) / 2."""
        self._find_candidates([token] if token not in self._top else [])
        return self._top[token]

    def _find_candidates(self, tokens: list[int]) -> None:
        """Compute and keep the candidates of `tokens`, in blocks (one product with the table per block)."""
        for i in range(0, len(tokens), 1024):
            block = tokens[i : i + 1024]
            top = torch.topk(self.unit[block] @ self.output_unit.T, min(self.k, len(self.outputs)), dim=1)
            for token, index, value in zip(block, top.indices, top.values, strict=True):
                self._top[token] = (self.outputs[index], (1.0 + value.to(torch.float64)) / 2.0)

    def _santext(self, tokens: torch.Tensor) -> torch.Tensor:
        out = tokens.clone()
        sanitize = self.sensitive[tokens] | (self.rng.uniform(len(tokens), torch.float64) <= self.p)
        rows = torch.nonzero(sanitize).flatten()
        if len(rows):
            unique, inverse = torch.unique(tokens[rows], return_inverse=True)
            cdf = self._santext_probabilities(unique).cumsum(dim=1)[inverse]
            u = self.rng.uniform(len(rows), torch.float64)[:, None] * cdf[:, -1:]
            out[rows] = self.outputs[torch.searchsorted(cdf, u).clamp_(max=len(self.outputs) - 1).flatten()]
        return out

    def _santext_probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(self.table[tokens].double(), self.output_table)
        return torch.softmax(-0.5 * self.epsilon * distance, dim=1)

    def _custext(self, tokens: torch.Tensor) -> torch.Tensor:
        """One draw per token from its cluster: the clusters' CDFs as rows (padded to k), searched row by row."""
        unique, inverse = torch.unique(tokens, return_inverse=True)
        members = torch.zeros(len(unique), self.k, dtype=torch.int64)
        cdf = torch.full((len(unique), self.k), 2.0, dtype=torch.float64)  # padding is never reached
        for row, token in enumerate(unique.tolist()):
            ids, logits = self._custext_logits(token)
            members[row, : len(ids)], members[row, len(ids) :] = ids, ids[-1]
            cdf[row, : len(ids)] = torch.softmax(logits, 0).cumsum(0)
            cdf[row, len(ids) - 1] = 1.0
        u = self.rng.uniform(len(tokens), torch.float64)[:, None]
        pick = torch.searchsorted(cdf[inverse], u).clamp_(max=self.k - 1)
        return members[inverse].gather(1, pick).flatten()

    def _custext_logits(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cluster_of is not None
        members = self.clusters[int(self.cluster_of[token])]
        similarity = (self.unit[members] @ self.unit[token]).double()
        spread = similarity.max() - similarity.min()
        score = (similarity - similarity.min()) / spread if spread > 0 else torch.ones_like(similarity)
        return members, 0.5 * self.epsilon * score


def _mask(size: int, ids: Iterable[int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.as_tensor(list(ids), dtype=torch.int64)] = True
    return mask


def _sensitive(frequencies: torch.Tensor | None, w: float, size: int) -> torch.Tensor:
    """SanText+: the fraction `w` least frequent tokens are sensitive (all of them without frequencies)."""
    if frequencies is None:
        return torch.ones(size, dtype=torch.bool)
    order = torch.argsort(torch.as_tensor(frequencies, dtype=torch.float64), stable=True)
    sensitive = torch.zeros(size, dtype=torch.bool)
    sensitive[order[: round(w * size)]] = True
    return sensitive


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


def _laplace(rng: CSPRNG, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Laplace(0, scale) samples by the inverse CDF of keystream uniforms."""
    u = rng.uniform(math.prod(shape), torch.float64).clamp_(max=1.0 - 2.0**-53).reshape(shape)
    return torch.where(u < 0.5, scale * torch.log(2.0 * u), -scale * torch.log(2.0 - 2.0 * u))


def _laplace_max(rng: CSPRNG, n: int, m: int, scale: float) -> torch.Tensor:
    """n draws of the maximum of m i.i.d. Laplace(0, scale) variables.

    P(max ≤ t) = F(t)^m, so max = F⁻¹(U^{1/m}); its upper tail q = 1 - U^{1/m} = -expm1(log U / m) keeps full
    precision when m is a whole vocabulary."""
    q = -torch.expm1(torch.log(rng.uniform(n, torch.float64)) / m)
    return torch.where(q <= 0.5, -scale * torch.log(2.0 * q), scale * torch.log(2.0 - 2.0 * q))


def _uniform_index(rng: CSPRNG, n: int, size: int) -> torch.Tensor:
    """n indices uniform in [0, size) (53 random bits each; the bias is below size / 2^53)."""
    return (rng.uniform(n, torch.float64) * size).ceil_().to(torch.int64).sub_(1).clamp_(0, size - 1)


def _noisy_max_probabilities(scores: torch.Tensor, floor_count: int, scale: float) -> tuple[torch.Tensor, float]:
    """P(argmax) of scores + Laplace(scale) noise, with `floor_count` more scores of 0: for each scored token,
    and for each floor token (all equal). A 1-D integral over the maximum's value, on a fine grid."""
    lo, hi = float(scores.min().clamp(max=0.0)) - 40 * scale, float(scores.max()) + 40 * scale
    t = torch.linspace(lo, hi, int((hi - lo) / scale * _GRID) + 1, dtype=torch.float64)
    shifted = t[None, :] - scores[:, None]
    log_cdf = torch.where(shifted < 0, math.log(0.5) + shifted / scale, torch.log1p(-0.5 * torch.exp(-shifted / scale)))
    log_pdf = -math.log(2 * scale) - shifted.abs() / scale
    floor_cdf = torch.where(t < 0, math.log(0.5) + t / scale, torch.log1p(-0.5 * torch.exp(-t / scale)))
    all_cdf = log_cdf.sum(0) + floor_count * floor_cdf
    inside = torch.trapezoid(torch.exp(log_pdf + all_cdf - log_cdf), t, dim=1)
    floor_pdf = -math.log(2 * scale) - t.abs() / scale
    floor = torch.trapezoid(torch.exp(floor_pdf + all_cdf - floor_cdf), t) if floor_count else torch.tensor(0.0)
    return inside, float(floor)
