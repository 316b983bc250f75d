"""Text generation with split programs: the KV cache, the sampling and the generated tokens stay in the enclave.

Prefill is one split program per prompt shape. Each decode step runs a split program for one new token whose
past keys and values are the enclave's cache zero-padded to a multiple of `bucket` positions (the padding
masked out by the attention mask), so a decode program is built once per bucket, not once per token. The
K and V projections of the new token still run masked on the GPU; their results come back to the enclave,
which appends them to its cache. Nothing of the cache is ever sent to the GPU.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from secure_split.enclave_runtime.csprng import CSPRNG

from .api import split
from .buckets import pad_to, round_up
from .config import SplitConfig
from .program import SplitProgram
from .report import PartitionReport


@dataclass
class Sampling:
    """How the next token is chosen from the logits: greedy, or sampled with the enclave's CSPRNG."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0, top_k >= 0 and 0 < top_p <= 1, got {self}")

    def choose(self, logits: torch.Tensor, rng: CSPRNG) -> torch.Tensor:
        """One token id per row of `logits` [B, V]."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits.double() / self.temperature
        if self.top_k:
            kth = scores.topk(min(self.top_k, scores.shape[-1]), -1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs, order = scores.softmax(-1).sort(-1, descending=True)
        if self.top_p < 1:
            outside = probs.cumsum(-1) - probs >= self.top_p  # keep the smallest prefix reaching top_p
            probs = probs.masked_fill(outside, 0.0)
        cdf = probs.cumsum(-1)
        u = rng.uniform(len(logits)).double()[:, None] * cdf[:, -1:]
        pick = (cdf < u).sum(-1).clamp(max=probs.shape[-1] - 1)
        return order.gather(-1, pick[:, None])[:, 0]


@dataclass
class GenerationStats:
    """What crossed per generated token, summed over the decode programs' reports."""

    tokens: int = 0
    round_trips: int = 0
    bytes_to_gpu: int = 0
    bytes_to_enclave: int = 0
    enclave_flops: int = 0
    gpu_flops: int = 0
    prefill_s: float = 0.0  # wall time in prefill calls, and in decode calls (building programs excluded)
    decode_s: float = 0.0

    def per_token(self) -> dict[str, float]:
        n = max(1, self.tokens)
        flops = self.enclave_flops + self.gpu_flops
        return {"round_trips": self.round_trips / n, "bytes_to_gpu": self.bytes_to_gpu / n,
                "bytes_to_enclave": self.bytes_to_enclave / n,
                "enclave_flop_share": self.enclave_flops / flops if flops else 1.0}  # fmt: skip


class SplitGenerator:
    """Split prefill and decode programs for one model, built on first use per prompt shape and cache bucket."""

    def __init__(self, model: torch.nn.Module, config: SplitConfig | None = None, bucket: int = 32) -> None:
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.model = model
        self.config = config or SplitConfig()
        self.bucket = bucket
        self.rng = CSPRNG("sampler", self.config.test_seed)  # never the masks' keystream
        self.programs: dict[tuple, SplitProgram] = {}
        self.reports: dict[tuple, PartitionReport] = {}
        self.stats = GenerationStats()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 **sampling: Any) -> torch.Tensor:  # fmt: skip
        """The prompt followed by up to `max_new_tokens` tokens per row (as `model.generate` returns them)."""
        choose = Sampling(**sampling)
        mask, positions = self._prompt(input_ids, attention_mask, max_new_tokens)
        out = self._run(("prefill", tuple(input_ids.shape)), input_ids, attention_mask=mask, position_ids=positions)
        keys = [layer.keys for layer in out.past_key_values.layers]
        values = [layer.values for layer in out.past_key_values.layers]
        eos, pad = self._eos_and_pad()
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        generated = []
        position = positions[:, -1:]
        for step in range(max_new_tokens):
            token = choose.choose(out.logits[:, -1], self.rng)
            if eos is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
                done |= torch.isin(token, eos)
            generated.append(token)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            position = position + 1
            out = self._decode(token[:, None], keys, values, mask, position)
            layers = out.past_key_values.layers
            keys = [torch.cat([k, layer.keys[:, :, -1:]], 2) for k, layer in zip(keys, layers, strict=True)]
            values = [torch.cat([v, layer.values[:, :, -1:]], 2) for v, layer in zip(values, layers, strict=True)]
        return torch.cat([input_ids, torch.stack(generated, 1)], 1)

    @torch.no_grad()
    def precompute(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None
                   ) -> dict[tuple, int]:  # fmt: skip
        """Fill the key pools for one generation of this shape, `max_new_tokens` tokens ahead.

        Builds the prefill and every decode bucket's program the generation will need (each build runs its
        program once), then puts keys for the prefill and each decode step in their pools. Returns pool sizes."""
        mask, positions = self._prompt(input_ids, attention_mask, max_new_tokens)
        prefill = ("prefill", tuple(input_ids.shape))
        layers = self._run(prefill, input_ids, attention_mask=mask, position_ids=positions).past_key_values.layers
        steps: dict[int, int] = {}
        for length in range(input_ids.shape[1], input_ids.shape[1] + max_new_tokens - 1):
            padded = self._bucket_of(length)
            steps[padded] = steps.get(padded, 0) + 1
        token = input_ids[:, -1:]  # shaped as a decode step's token
        for padded in steps:
            key = ("decode", tuple(token.shape), padded)
            if key not in self.programs:  # built on a zero cache of the bucket's size
                zeros = [torch.zeros(*layer.keys.shape[:2], padded, layer.keys.shape[-1]) for layer in layers]
                full = torch.ones(len(token), padded + 1, dtype=torch.long)
                position = positions[:, -1:]
                self._decode(token, zeros, [z.clone() for z in zeros], full, position, count=False)
        pools = {prefill: self.programs[prefill].precompute(1)}
        for padded, count in steps.items():
            key = ("decode", tuple(token.shape), padded)
            pools[key] = self.programs[key].precompute(count)
        return pools

    def _decode(self, token, keys, values, mask, position, count: bool = True):
        """One decode step on the cache padded to its bucket; the new token's slot is the last one.
        `count=False`: a build run of `precompute`, not a generated token (kept out of the stats)."""
        length = keys[0].shape[2]
        padded = self._bucket_of(length)
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            shape = (*k.shape[:2], padded, k.shape[-1])
            cache.update(pad_to(k, shape), pad_to(v, shape), i)
        holes = torch.zeros(len(mask), padded - length, dtype=mask.dtype)
        full_mask = torch.cat([mask[:, :-1], holes, mask[:, -1:]], 1)
        key = ("decode", tuple(token.shape), padded)
        out = self._run(key, token, attention_mask=full_mask, position_ids=position, past_key_values=cache)
        if not count:
            return out
        self.stats.tokens += 1
        report = self.reports[key]
        self.stats.round_trips += report.round_trips
        self.stats.bytes_to_gpu += report.bytes_to_gpu
        self.stats.bytes_to_enclave += report.bytes_to_enclave
        self.stats.enclave_flops += report.enclave_flops
        self.stats.gpu_flops += report.gpu_flops
        return out

    def _run(self, key: tuple, ids: torch.Tensor, **kwargs: Any) -> Any:
        kwargs["use_cache"] = True
        if key not in self.programs:
            self.programs[key] = split(self.model, (ids,), kwargs, self.config)
            self.reports[key] = self.programs[key].report()  # its counts per call, taken once
        start = time.perf_counter()
        out = self.programs[key](ids, **kwargs)
        elapsed = time.perf_counter() - start
        if key[0] == "prefill":
            self.stats.prefill_s += elapsed
        else:
            self.stats.decode_s += elapsed
        return out

    def _prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The checked prompt's mask and positions (left padding: positions count real tokens only)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self._check(input_ids, mask, max_new_tokens)
        return mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _bucket_of(self, length: int) -> int:
        """The padded cache length a decode step on `length` cached positions runs at."""
        return round_up(length, self.bucket)

    def _eos_and_pad(self) -> tuple[torch.Tensor | None, int]:
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            return None, 0
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos])
        pad = getattr(config, "pad_token_id", None)
        return eos_ids, int(eos_ids[0] if pad is None else pad)

    def _check(self, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise ValueError(f"generate needs a non-empty prompt [batch, length], got shape {tuple(input_ids.shape)}")
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)  # fmt: skip
        if limit is not None and int(mask.sum(-1).max()) + max_new_tokens > limit:
            raise ValueError(f"{input_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed the model's "
                             f"{limit} positions")  # fmt: skip


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    config: SplitConfig | None = None,
    attention_mask: torch.Tensor | None = None,
    bucket: int = 32,
    **sampling: Any,
) -> torch.Tensor:
    """Generate with split prefill and decode programs (greedy, or `do_sample=True` with `temperature`,
    `top_k`, `top_p`); the KV cache, the sampling and the tokens never leave the enclave."""
    config = config or SplitConfig()
    generators = _GENERATORS.setdefault(model, {})
    if (config, bucket) not in generators:  # programs are reused across calls: each shape is split once
        generators[(config, bucket)] = SplitGenerator(model, config, bucket)
    generator = generators[(config, bucket)]
    generator.rng = CSPRNG("sampler", config.test_seed)  # a test-seeded call samples the same tokens every time
    return generator.generate(input_ids, max_new_tokens, attention_mask, **sampling)


_GENERATORS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, SplitGenerator]] = weakref.WeakKeyDictionary()
