"""`SplitProgram`: the face of one split: call it like the model, read its `report()`.

What was compiled is the `SplitArtifact`; what runs it is the trusted `SplitExecutor` (enclave_runtime), with
GPU stages on a `StageBackend` and the call's secrets from a `KeyProvider`. The program wires the three
together, sanitizes cmif's tokens first, and keeps one call at a time.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from secure_split.enclave_runtime.csprng import CSPRNG
from secure_split.enclave_runtime.executor import SplitExecutor
from secure_split.enclave_runtime.integrity import StageVerifier
from secure_split.enclave_runtime.keys import KeyProvider, all_masked, gpu_calls, masked_sends, stage_verifiers
from secure_split.enclave_runtime.masking import RemoMasking, make_masking
from secure_split.enclave_runtime.remo_keys import RemoKeys
from secure_split.enclave_runtime.sanitizer import IdentitySanitizer, TokenSanitizer, make_token_sanitizer
from secure_split.passes.label_cmif import token_embeddings
from secure_split.runtime.stage_backend import StageBackend

from .artifact import SplitArtifact
from .config import SplitConfig
from .report import PartitionReport, build_report

_last_run: weakref.ref[SplitProgram] | None = None
log = logging.getLogger("secure_split")


def last_program() -> SplitProgram:
    """The program that ran most recently, e.g. behind a `torch.compile(backend="secure_split")` call."""
    program = _last_run() if _last_run is not None else None
    if program is None:
        raise RuntimeError("no secure_split program has run yet")
    return program


class SplitProgram:
    """One model graph split into enclave and GPU stages, with masks at every cut. Call it like the model."""

    def __init__(
        self,
        artifact: SplitArtifact,
        gpu_modules: dict[str, torch.nn.Module] | None = None,
        verifiers: dict[str, StageVerifier] | None = None,
        sanitizer: TokenSanitizer | None = None,
    ) -> None:
        """`gpu_modules`: what the GPU runs for each GPU stage, when not the artifact's stage modules themselves
        (a bundle's sessions on the GPU's providers, or a remote worker's; the enclave keeps its own copies of
        the public stages for unmask terms). `verifiers` (verify=True) and `sanitizer` (cmif), when not made
        from the artifact (a bundle's)."""
        config = artifact.config
        self.artifact = artifact
        self.config = config
        self.device = torch.device(config.device)
        self._binding = artifact.fingerprint()  # what the key stream (under a test seed) and a sealed pool bind to
        self.rng = _mask_stream(config, self._binding)
        self.masking = make_masking(config.masking, self.rng, config.mask_scale,
                                    config.frac_bits, config.activation_bound, config.remo_rank)  # fmt: skip
        modules = gpu_modules or {s.module_name: artifact.stage_module(s) for s in artifact.gpu_stages}
        self.gpu = StageBackend(modules, self.device)
        self.keys = self._key_provider(verifiers) if config.masking != "none" else None
        ring_bits = {name: facts.ring_bits for name, facts in artifact.facts.items()}
        self.executor = SplitExecutor(artifact.boundary, self.gpu, self.keys, self.masking, ring_bits,
                                      config.gpu_retries)  # fmt: skip
        if sanitizer is None and config.sanitizes_tokens:
            sanitizer = make_sanitizer(config, lambda: _token_table(artifact))
        self.sanitizer = sanitizer
        self.calls = 0
        # One call at a time: a call's keys, the CSPRNGs (their ciphers are not thread-safe), the pool and the
        # counters are shared. Re-entrant: a call through the model's own arguments reaches run() on this thread.
        self._lock = threading.RLock()
        self._entry: Callable[..., Any] | None = None  # calls with the model's own arguments (`split()` sets it)
        if config.precompute:
            self.precompute(config.precompute)

    def _key_provider(self, verifiers: dict[str, StageVerifier] | None) -> KeyProvider:
        boundary, config = self.artifact.boundary, self.config
        if config.verify and verifiers is None:
            verifiers = stage_verifiers(boundary)
        remo = None
        if isinstance(self.masking, RemoMasking):
            calls = gpu_calls(boundary)
            for call in calls:
                if not all_masked(call):  # its linear part would depend on that input: no fixed R = L(Q)
                    raise NotImplementedError(f"masking='remo': {call.target} reads a public value at run time")
            remo = RemoKeys(self.masking, masked_sends(boundary), calls, self.gpu, boundary)
        return KeyProvider(boundary, self.masking, self.rng, config.pool_empty, verifiers or {}, self._binding, remo)

    def run(self, *inputs: torch.Tensor) -> Any:
        """Execute on the graph's flat user inputs (what the compiled graph receives). Thread-safe: calls queue."""
        global _last_run
        with self._lock, torch.inference_mode():
            if self.sanitizer is not None:  # CMIF: tokens are sanitized before anything reads them
                tokens = self.artifact.token_inputs
                inputs = tuple(self.sanitizer.sanitize(x) if i in tokens else x for i, x in enumerate(inputs))
            result = self.executor.run(inputs)
            self.calls += 1
        _last_run = weakref.ref(self)
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call with the model's own arguments (programs from `split()`), or with flat graph inputs."""
        if self._entry is None:
            return self.run(*args, **kwargs)
        return self._entry(self, *args, **kwargs)

    def report(self) -> PartitionReport:
        """What runs where and what crosses (fixed at compile time), with this program's counters so far."""
        return build_report(self.artifact, self.keys, self.masking, self.sanitizer, self.calls, str(self.device))

    def parameter_names(self, side: str) -> list[str]:
        """The model parameters (`nn.Parameter`s, not buffers) whose values `side` ("enclave" or "gpu") holds.

        A side holds a weight it reads, or a public value computed from it (e.g. Wᵀ, which names W). Sorted."""
        return self.artifact.parameter_names(side)

    # -- the offline pool ------------------------------------------------------------------------------------

    def precompute(self, n_calls: int) -> int:
        """Fill the pool with keys for `n_calls` more calls (Slalom's offline phase); returns the pool's size."""
        if self.keys is None:
            raise ValueError("masking='none' uses no masks: there is nothing to precompute")
        with self._lock, torch.inference_mode():
            return self.keys.precompute(n_calls)

    def save_pool(self, path: str | Path) -> int:
        """Seal the pool to `path` (AES-GCM, enclave-held key) and empty it; returns the number of calls saved."""
        with self._lock:
            return self._keys().save(path)

    def load_pool(self, path: str | Path) -> int:
        """Load a sealed pool; a tampered, foreign or replayed file raises `PoolError`. Returns the count."""
        with self._lock:
            return self._keys().load(path)

    def _keys(self) -> KeyProvider:
        if self.keys is None:
            raise ValueError("masking='none' uses no masks: this program has no key pool")
        return self.keys


def make_sanitizer(config: SplitConfig, table: Callable[[], torch.Tensor]) -> TokenSanitizer:
    """cmif's token sanitizer over the embedding table `table()` gives (ε = ∞: none, and the report warns)."""
    if math.isinf(config.epsilon):
        return IdentitySanitizer()
    return make_token_sanitizer(config.sanitizer, config.epsilon, table(), config.sanitizer_k, config.test_seed,
                                config.special_token_ids)  # fmt: skip


def _token_table(artifact: SplitArtifact) -> torch.Tensor:
    """cmif: the word embedding's table, from the labelled graph (a loaded program reads the bundle's copy)."""
    assert artifact.labelled is not None
    return token_embeddings(artifact.labelled)


def _mask_stream(config: SplitConfig, binding: bytes) -> CSPRNG:
    """The program's key stream: from `os.urandom`; under a test seed, one domain per split, so that no two
    programs (a generation's prefill and decode) share a keystream."""
    if config.test_seed is None:
        return CSPRNG()
    log.warning("secure_split: SplitConfig.test_seed=%d: anyone who knows it can rebuild this program's masks "
                "(tests only; never deploy it)", config.test_seed)  # fmt: skip
    return CSPRNG(f"masks/{binding.hex()}", config.test_seed)

