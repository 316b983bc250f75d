"""`KeyProvider`: the enclave's secrets of a split, call by call (as CrypTen's TupleProvider is for its tuples).

A call's keys are its masks, the unmask terms of every GPU stage call (L(r) = f(r) - f(0), from the enclave's
own copies of the public stages, or ReMO's P·R) and its verification vectors. They come from the offline pool
filled by `precompute()`, or are made on the spot when the pool is empty (`pool_empty="online"`); either way
one call uses them and destroys them after it. A pool seals to a file bound to its split's `fingerprint`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import fx

from secure_split.passes.insert_masks import Cut, mask
from secure_split.passes.meta import CUT, SIDE

from .csprng import CSPRNG
from .integrity import StageVerifier, required_bits
from .masking import MaskingScheme, reveal
from .pool import CallKeys, KeyPool
from .remo_keys import RemoKeys


class PoolEmptyError(RuntimeError):
    """The offline pool is empty and `SplitConfig.pool_empty` is "raise"."""


class KeyProvider:
    """Masks, unmask terms and check vectors for the calls of one boundary graph, and their offline pool."""

    def __init__(
        self,
        boundary: fx.GraphModule,
        masking: MaskingScheme,
        rng: CSPRNG,
        pool_empty: str,
        verifiers: dict[str, StageVerifier],
        binding: bytes,
        remo: RemoKeys | None = None,
    ) -> None:
        """`boundary`'s GPU stage submodules are the enclave's own copies of the public stages (fx stages, or a
        bundle's CPU sessions): unmask terms are computed with them. `verifiers`: per GPU stage call (verify).
        `binding`: what identifies the split (`SplitArtifact.fingerprint()`); a sealed pool is bound to it."""
        self.boundary = boundary
        self.masking = masking
        self.rng = rng
        self.pool_empty = pool_empty
        self.verifiers = verifiers
        self.remo = remo
        self.binding = binding
        self.pool = KeyPool()
        self.pool_calls = 0  # calls whose keys came from the pool
        self.online_calls = 0  # calls whose keys were made on the spot
        self.gpu_calls = gpu_calls(boundary)
        self._masked = masked_sends(boundary)
        self._zero_outputs: dict[str, tuple[torch.Tensor, ...]] = {}

    def for_call(self) -> CallKeys:
        """One call's keys, from the pool or made now; marked used (a second use raises `MaskReuseError`)."""
        keys = self.pool.take()
        if keys is not None:
            self.pool_calls += 1
        elif self.pool_empty == "raise":
            raise PoolEmptyError(
                "the unmask-term pool is empty and SplitConfig.pool_empty='raise': call program.precompute(n) "
                "before running, or use pool_empty='online'"
            )
        else:
            keys = self.make()
            self.online_calls += 1
        self.pool.mark_used(keys)
        return keys

    def precompute(self, n_calls: int) -> int:
        """Put keys for `n_calls` more calls in the pool (Slalom's offline phase); returns the pool's size."""
        if n_calls < 0:
            raise ValueError(f"precompute needs a number of calls >= 0, got {n_calls}")
        for _ in range(n_calls):
            self.pool.add(self.make())
        return len(self.pool)

    def save(self, path: str | Path) -> int:
        return self.pool.save(path, self.fingerprint)

    def load(self, path: str | Path) -> int:
        return self.pool.load(path, self.fingerprint)

    def make(self) -> CallKeys:
        """Fresh masks for every masked cut of one call, and the unmask terms of every GPU stage call."""
        if self.remo is not None:
            return CallKeys(self.pool.new_serial(), *self.remo.draw())
        masks = {n.name: _draw(self.masking, n.meta[CUT]) for n in self._masked}
        terms, checks = {}, {}
        for call in self.gpu_calls:
            if all_masked(call):
                terms[call.name] = self.unmask_terms(call, [masks[a.name] for a in call.args], cache=True)
            if call.name in self.verifiers:
                checks[call.name] = self.verifiers[call.name].make_checks(self.rng, self._zero_outputs[call.name])
        return CallKeys(self.pool.new_serial(), masks, terms, checks)

    def terms(self, keys: CallKeys, call: fx.Node, public: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The unmask terms of one GPU stage call; a stage with a public input has terms that depend on the value
        sent for it (`public`, by mask node), made when first needed."""
        if call.name not in keys.terms:
            held = [keys.masks[a.name] if a.meta[CUT].masked else public[a.name] for a in call.args]
            keys.terms[call.name] = self.unmask_terms(call, held, cache=False)
        return keys.terms[call.name]

    def unmask_terms(self, call: fx.Node, held: list[torch.Tensor], cache: bool) -> tuple[torch.Tensor, ...]:
        """L(r) = f(r) - f(0) for each output of one GPU stage call; `held` has masks, and public inputs as sent."""
        stage = self.boundary.get_submodule(str(call.target))
        f0 = self._zero_outputs.get(call.name) if cache else None
        if f0 is None:
            pairs = zip(call.args, held, strict=True)
            zeros = [a.meta[CUT].zeros() if a.meta[CUT].masked else v for a, v in pairs]
            f0 = tuple(stage(*zeros))
            if cache:
                self._zero_outputs[call.name] = f0
        return tuple(reveal(fr, z) for fr, z in zip(stage(*held), f0, strict=True))

    @property
    def bytes_per_call(self) -> int:
        """Memory one call's keys take in the pool: masks, unmask terms and verification vectors."""
        keyed = sum(n.meta[CUT].nbytes for n in self.boundary.graph.nodes if CUT in n.meta and n.meta[CUT].masked)
        return keyed + sum(v.nbytes_per_call for v in self.verifiers.values())

    @property
    def verify_error_bits(self) -> float | None:
        """-log2 of the probability that a wrong GPU answer passes verification in one call (None: no check)."""
        if not self.verifiers:
            return None
        return -math.log2(sum(2.0**-v.plan.soundness_bits for v in self.verifiers.values()))

    @property
    def fingerprint(self) -> bytes:
        """What a pool is bound to: the split's binding, and remo's public bases."""
        digest = hashlib.sha256(self.binding)
        for name, basis in (self.remo.bases if self.remo is not None else {}).items():  # a pool fits its bases only
            digest.update(name.encode() + (b"identity" if basis is None else basis.numpy().tobytes()))
        return digest.digest()


def stage_verifiers(boundary: fx.GraphModule) -> dict[str, StageVerifier]:
    """The Freivalds checks of every GPU stage call of an in-process split (its stages are ring fx stages)."""
    calls = gpu_calls(boundary)
    target = required_bits(len(calls))
    verifiers = {}
    for call in calls:
        if not all_masked(call):
            raise NotImplementedError(f"verify=True: {call.target} reads a public value at run time")
        like = [a.meta[CUT].zeros() for a in call.args]
        stage = boundary.get_submodule(str(call.target))
        verifiers[call.name] = StageVerifier.for_stage(stage, like, str(call.target), target)
    return verifiers


def masked_sends(boundary: fx.GraphModule) -> list[fx.Node]:
    """The `mask` nodes whose value crosses under a one-time mask (each needs a fresh mask per call)."""
    return [n for n in boundary.graph.nodes if n.target is mask and n.meta[CUT].masked]


def gpu_calls(boundary: fx.GraphModule) -> list[fx.Node]:
    return [n for n in boundary.graph.nodes if n.op == "call_module" and n.meta[SIDE] == "gpu"]


def all_masked(call: fx.Node) -> bool:
    """Whether every input of a GPU stage call crosses masked (so its unmask terms depend on masks alone)."""
    return all(a.meta[CUT].masked for a in call.args)


def _draw(masking: MaskingScheme, cut: Cut) -> torch.Tensor:
    """A fresh mask for `cut`, in the layout the GPU stage was traced with (its views depend on it)."""
    return cut.empty().copy_(masking.draw(cut.shape, cut.dtype))
