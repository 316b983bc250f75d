"""`SplitProgram`: a compiled split of one graph, and the trusted runtime that executes it.

The program interprets the boundary graph: enclave stages run here on the CPU, GPU stages run in the
`GpuExecutor` behind the `Channel`, `mask` nodes encode, hide and send, `unmask` nodes receive, subtract the
unmask term and decode. A call's keys (its masks and their unmask terms) come from the offline pool filled by
`precompute()`, or are made on the spot when the pool is empty (`SplitConfig.pool_empty`); either way they are
used by that call only and destroyed after it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import operator
import threading
import time
import weakref
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import fx

from secure_split.enclave_runtime.csprng import CSPRNG
from secure_split.enclave_runtime.integrity import StageVerifier, required_bits
from secure_split.enclave_runtime.masking import MaskingScheme, RemoMasking, hide, make_masking, reveal
from secure_split.enclave_runtime.pool import CallKeys, KeyPool
from secure_split.enclave_runtime.sanitizer import IdentitySanitizer, TokenSanitizer, make_token_sanitizer
from secure_split.partitioner.stages import PartitionResult, StageSpec
from secure_split.passes.insert_masks import Cut, cuts, mask, unmask
from secure_split.passes.label_cmif import token_embeddings, token_inputs
from secure_split.passes.meta import CUT, RING_BITS, SIDE, WEIGHTS
from secure_split.runtime.channel import Channel
from secure_split.runtime.gpu_executor import GpuExecutor, WorkerError

from .config import SplitConfig
from .remo import RemoKeys
from .report import PartitionReport, build_report

_last_run: weakref.ref[SplitProgram] | None = None
log = logging.getLogger("secure_split")


def last_program() -> SplitProgram:
    """The program that ran most recently, e.g. behind a `torch.compile(backend="secure_split")` call."""
    program = _last_run() if _last_run is not None else None
    if program is None:
        raise RuntimeError("no secure_split program has run yet")
    return program


class PoolEmptyError(RuntimeError):
    """The offline pool is empty and `SplitConfig.pool_empty` is "raise"."""


class SplitProgram:
    """One model graph split into enclave and GPU stages, with masks at every cut. Call it like the model."""

    def __init__(
        self,
        partition: PartitionResult,
        config: SplitConfig,
        input_names: list[str],
        token_inputs: list[int] | None = None,
        gpu_modules: dict[str, torch.nn.Module] | None = None,
        verifiers: dict[str, StageVerifier] | None = None,
        sanitizer: TokenSanitizer | None = None,
    ) -> None:
        """`token_inputs`: which flat inputs are token ids (cmif sanitizes them); None finds them in the graph.
        `gpu_modules`: what the GPU runs for each GPU stage, when not the stage modules themselves (a bundle's
        sessions on the GPU's providers, or a remote worker's; the enclave keeps its own copies of public stages
        for unmask terms). `verifiers` (verify=True), per GPU stage call, and `sanitizer` (cmif), when not made
        from the graph (a bundle's)."""
        self.partition = partition
        self.config = config
        self.input_names = input_names  # where each graph input came from, e.g. "L['kwargs']['attention_mask']"
        self.boundary = partition.boundary
        self.cuts: list[Cut] = cuts(self.boundary)
        self.device = torch.device(config.device)
        self.rng = _mask_stream(config, self._boundary_digest)
        self.masking = make_masking(
            config.masking, self.rng, config.mask_scale, config.frac_bits, config.activation_bound, config.remo_rank
        )
        self.channel = Channel(self.device)
        modules = gpu_modules or {s.module_name: partition.stage_module(s) for s in self.gpu_stages}
        self.gpu = GpuExecutor(modules, self.device)
        self.pool = KeyPool()
        self.calls = 0
        self.pool_calls = 0  # calls whose keys came from the pool
        self.online_calls = 0  # calls whose keys were made on the spot
        self.retries = 0  # attempts run again after a remote GPU worker failed them
        # One call at a time: a call's keys, the CSPRNGs (their ciphers are not thread-safe), the pool and the
        # counters are shared. Re-entrant: a call through Dynamo's entry reaches run() on the same thread.
        self._lock = threading.RLock()
        self._gpu_calls = [n for n in self.boundary.graph.nodes if n.op == "call_module" and n.meta[SIDE] == "gpu"]
        self._masked = [n for n in self.boundary.graph.nodes if n.target is mask and n.meta[CUT].masked]
        self._zero_outputs: dict[str, tuple[torch.Tensor, ...]] = {}
        self.remo = self._make_remo() if isinstance(self.masking, RemoMasking) else None
        self.verifiers = (verifiers or self._make_verifiers()) if config.verify else {}
        if sanitizer is None and config.policy == "cmif":
            sanitizer = make_sanitizer(config, lambda: token_embeddings(partition.labelled))
        self.sanitizer = sanitizer
        if token_inputs is None:
            token_inputs = _token_positions(partition) if config.policy == "cmif" else []
        self.token_inputs = token_inputs
        self._entry: Callable[..., Any] | None = None
        if config.precompute:
            self.precompute(config.precompute)

    @property
    def gpu_stages(self) -> list[StageSpec]:
        return [s for s in self.partition.stages if s.side == "gpu"]

    def run(self, *inputs: torch.Tensor) -> Any:
        """Execute on the graph's flat user inputs (what the compiled graph receives). Thread-safe: calls queue."""
        global _last_run
        with self._lock, torch.inference_mode():
            if self.sanitizer is not None:  # CMIF: tokens are sanitized before anything reads them
                inputs = tuple(self._sanitized(i, x) for i, x in enumerate(inputs))
            result = self._run_with_retries(inputs)
            self.calls += 1
        _last_run = weakref.ref(self)
        return result

    def _run_with_retries(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """One call; a retryable worker failure runs it again from the start with new keys (fresh masks), as
        often as `SplitConfig.gpu_retries` allows: only under ring or no masking, where a resend reveals nothing
        more (Gaussian masks never retry: each resend would be one more noisy copy of the same values)."""
        for attempt in itertools.count():
            keys = self._keys_for_call()
            try:
                return _BoundaryInterpreter(self, keys).run(*inputs)
            except WorkerError as error:
                if not error.retryable or attempt >= self.config.gpu_retries:
                    raise
                self.retries += 1
                log.warning("secure_split: %s; running the call again with fresh masks", error)
                time.sleep(min(0.05 * 2**attempt, 1.0))
            finally:
                if keys is not None:
                    keys.destroy()

    def _sanitized(self, index: int, value: torch.Tensor) -> torch.Tensor:
        assert self.sanitizer is not None
        return self.sanitizer.sanitize(value) if index in self.token_inputs else value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call with the model's own arguments (programs from `split()`), or with flat graph inputs."""
        if self._entry is None:
            return self.run(*args, **kwargs)
        with self._lock, torch.no_grad():  # as captured: grad mode is part of Dynamo's guards
            before = self.calls
            result = self._entry(*args, **kwargs)
            ran = self.calls != before
        if not ran:
            raise RuntimeError(
                "this call did not run through the split program (new input shapes or dtypes make Dynamo "
                "compile a new graph); call secure_split.split() again for these inputs"
            )
        return result

    def report(self) -> PartitionReport:
        return build_report(self)

    def parameter_names(self, side: str) -> list[str]:
        """The model parameters (`nn.Parameter`s, not buffers) whose values `side` ("enclave" or "gpu") holds.

        A side holds a weight it reads, or a public value computed from it (e.g. Wᵀ, which names W). Sorted."""
        if side not in ("enclave", "gpu"):
            raise ValueError(f"side must be 'enclave' or 'gpu', got {side!r}")
        names: set[str] = set()
        for node in self.partition.labelled.graph.nodes:
            if node.op == "get_attr" and any(u.meta.get(SIDE) == side for u in node.users):
                names.update(node.meta.get(WEIGHTS, ()))
        return sorted(names)

    # -- the offline pool ------------------------------------------------------------------------------------

    def precompute(self, n_calls: int) -> int:
        """Fill the pool with keys for `n_calls` more calls (Slalom's offline phase); returns the pool's size."""
        if self.config.masking == "none":
            raise ValueError("masking='none' uses no masks: there is nothing to precompute")
        if n_calls < 0:
            raise ValueError(f"precompute needs a number of calls >= 0, got {n_calls}")
        with self._lock, torch.inference_mode():
            for _ in range(n_calls):
                self.pool.add(self._make_keys())
            return len(self.pool)

    def save_pool(self, path: str | Path) -> int:
        """Seal the pool to `path` (AES-GCM, enclave-held key) and empty it; returns the number of calls saved."""
        with self._lock:
            return self.pool.save(path, self.fingerprint)

    def load_pool(self, path: str | Path) -> int:
        """Load a sealed pool; a tampered, foreign or replayed file raises `PoolError`. Returns the count."""
        with self._lock:
            return self.pool.load(path, self.fingerprint)

    @cached_property
    def fingerprint(self) -> bytes:
        """What a pool is bound to: the boundary, every stage's code, and the GPU stages' public constants."""
        digest = self._boundary_digest()
        for spec in self.partition.stages:
            stage = self.partition.stage_module(spec)
            digest.update(stage.code.encode())
            if spec.side == "gpu":
                for name, buffer in stage.named_buffers():
                    digest.update(name.encode() + buffer.contiguous().view(torch.uint8).numpy().tobytes())
        for name, basis in (self.remo.bases if self.remo is not None else {}).items():  # a pool fits its bases only
            digest.update(name.encode() + (b"identity" if basis is None else basis.numpy().tobytes()))
        return digest.digest()

    def _boundary_digest(self) -> hashlib._Hash:
        return hashlib.sha256(repr(self.cuts).encode() + self.boundary.code.encode())

    def _keys_for_call(self) -> CallKeys | None:
        if self.config.masking == "none":
            return None
        keys = self.pool.take()
        if keys is not None:
            self.pool_calls += 1
        elif self.config.pool_empty == "raise":
            raise PoolEmptyError(
                "the unmask-term pool is empty and SplitConfig.pool_empty='raise': call program.precompute(n) "
                "before running, or use pool_empty='online'"
            )
        else:
            keys = self._make_keys()
            self.online_calls += 1
        self.pool.mark_used(keys)
        return keys

    def _make_remo(self) -> RemoKeys:
        assert isinstance(self.masking, RemoMasking)
        for call in self._gpu_calls:
            if not _all_masked(call):  # its linear part would depend on that input: no fixed R = L(Q)
                raise NotImplementedError(f"masking='remo': {call.target} reads a public value at run time")
        return RemoKeys(self.masking, self._masked, self._gpu_calls, self.gpu, self.channel, self.boundary)

    def _make_keys(self) -> CallKeys:
        """Fresh masks for every masked cut of one call, and the unmask terms of every GPU stage call."""
        if self.remo is not None:
            return CallKeys(self.pool.new_serial(), *self.remo.draw())
        masks = {n.name: _draw(self.masking, n.meta[CUT]) for n in self._masked}
        terms = {}
        checks = {}
        for call in self._gpu_calls:
            if _all_masked(call):
                terms[call.name] = self.unmask_terms(call, [masks[a.name] for a in call.args], cache=True)
            if call.name in self.verifiers:
                checks[call.name] = self.verifiers[call.name].make_checks(self.rng, self._zero_outputs[call.name])
        return CallKeys(self.pool.new_serial(), masks, terms, checks)

    def _make_verifiers(self) -> dict[str, StageVerifier]:
        target = required_bits(len(self._gpu_calls))
        verifiers = {}
        for call in self._gpu_calls:
            if not _all_masked(call):
                raise NotImplementedError(f"verify=True: {call.target} reads a public value at run time")
            like = [a.meta[CUT].empty().zero_() for a in call.args]
            stage = self.boundary.get_submodule(str(call.target))
            verifiers[call.name] = StageVerifier.for_stage(stage, like, str(call.target), target)
        return verifiers

    @property
    def pool_bytes_per_call(self) -> int:
        """Memory one call's keys take in the pool: masks, unmask terms and verification vectors."""
        keyed = sum(c.nbytes for c in self.cuts if c.masked)
        return keyed + sum(v.nbytes_per_call for v in self.verifiers.values())

    @property
    def verify_error_bits(self) -> float | None:
        """-log2 of the probability that a wrong GPU answer passes verification in one call (None: no check)."""
        if not self.verifiers:
            return None
        return -math.log2(sum(2.0**-v.plan.soundness_bits for v in self.verifiers.values()))

    def unmask_terms(self, call: fx.Node, held: list[torch.Tensor], cache: bool) -> tuple[torch.Tensor, ...]:
        """L(r) = f(r) - f(0) for each output of one GPU stage call; `held` has masks, and public inputs as sent."""
        stage = self.boundary.get_submodule(str(call.target))
        f0 = self._zero_outputs.get(call.name) if cache else None
        if f0 is None:
            pairs = zip(call.args, held, strict=True)
            zeros = [a.meta[CUT].empty().zero_() if a.meta[CUT].masked else v for a, v in pairs]
            f0 = tuple(stage(*zeros))
            if cache:
                self._zero_outputs[call.name] = f0
        return tuple(reveal(fr, z) for fr, z in zip(stage(*held), f0, strict=True))

    def output_bits(self, call: fx.Node, index: int) -> int | None:
        """The fractional bits of a GPU stage output (ring masking), else None."""
        bits = self.boundary.get_submodule(str(call.target)).meta.get(RING_BITS)
        return None if bits is None else bits[index]


def make_sanitizer(config: SplitConfig, table: Callable[[], torch.Tensor]) -> TokenSanitizer:
    """cmif's token sanitizer over the embedding table `table()` gives (ε = ∞: none, and the report warns)."""
    if math.isinf(config.epsilon):
        return IdentitySanitizer()
    return make_token_sanitizer(config.sanitizer, config.epsilon, table(), config.sanitizer_k, config.test_seed,
                                config.special_token_ids)  # fmt: skip


def _mask_stream(config: SplitConfig, boundary: Callable[[], hashlib._Hash]) -> CSPRNG:
    """The program's key stream: from `os.urandom`; under a test seed, one domain per boundary, so that no two
    programs (a generation's prefill and decode) share a keystream."""
    if config.test_seed is None:
        return CSPRNG()
    log.warning("secure_split: SplitConfig.test_seed=%d: anyone who knows it can rebuild this program's masks "
                "(tests only; never deploy it)", config.test_seed)  # fmt: skip
    return CSPRNG(f"masks/{boundary().hexdigest()}", config.test_seed)


def _draw(masking: MaskingScheme, cut: Cut) -> torch.Tensor:
    """A fresh mask for `cut`, in the layout the GPU stage was traced with (its views depend on it)."""
    return cut.empty().copy_(masking.draw(cut.shape, cut.dtype))


def _token_positions(partition: PartitionResult) -> list[int]:
    """Which flat graph inputs are token ids (CMIF sanitizes them before anything reads them)."""
    placeholders = [n.name for n in partition.boundary.graph.nodes if n.op == "placeholder"]
    tokens = {n.name for n in token_inputs(partition.labelled)}
    return [i for i, name in enumerate(placeholders) if name in tokens]


def _all_masked(call: fx.Node) -> bool:
    """Whether every input of a GPU stage call crosses masked (so its unmask terms depend on masks alone)."""
    return all(a.meta[CUT].masked for a in call.args)


class _BoundaryInterpreter(fx.Interpreter):
    """Executes one call of the boundary graph with that call's keys."""

    def __init__(self, program: SplitProgram, keys: CallKeys | None) -> None:
        super().__init__(program.boundary, garbage_collect_values=True)
        self.program = program
        self.keys = keys
        self.public: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target is mask:
            return self._mask(n, self.env[n.args[0]])
        if n.op == "call_function" and n.target is unmask:
            return self._unmask(n, self.env[n.args[0]])
        if n.op == "call_module" and n.meta[SIDE] == "gpu":
            args, _ = self.fetch_args_kwargs_from_env(n)
            result = self.program.gpu.run(str(n.target), list(args))
            if n.name in self.program.verifiers:
                assert self.keys is not None
                sent, got = [a.to("cpu") for a in args], [r.to("cpu") for r in result]
                self.program.verifiers[n.name].check(self.keys.checks[n.name], sent, got)
            return result
        return super().run_node(n)

    def _mask(self, n: fx.Node, value: torch.Tensor) -> torch.Tensor:
        cut: Cut = n.meta[CUT]
        if value.is_floating_point():
            value = self.program.masking.encode(value, cut.name)
        if cut.masked:
            assert self.keys is not None
            value = hide(value, self.keys.masks[n.name])
        else:
            self.public[n.name] = value
        return self.program.channel.to_gpu(cut.stage, cut.name, value)

    def _unmask(self, n: fx.Node, value: torch.Tensor) -> torch.Tensor:
        cut: Cut = n.meta[CUT]
        received = self.program.channel.to_enclave(cut.stage, cut.name, value)
        item = n.args[0]
        assert item.target is operator.getitem
        call, index = item.args[0], item.args[1]
        if cut.masked:
            received = reveal(received, self._terms(call)[index])
        if call.name in self.program.verifiers:
            self.program.verifiers[call.name].check_range(index, received)
        return self.program.masking.decode(received, self.program.output_bits(call, index), n.meta["val"].dtype)

    def _terms(self, call: fx.Node) -> tuple[torch.Tensor, ...]:
        assert self.keys is not None
        if call.name not in self.keys.terms:  # a stage with a public input: its terms depend on that input
            held = [self.keys.masks[a.name] if a.meta[CUT].masked else self.public[a.name] for a in call.args]
            self.keys.terms[call.name] = self.program.unmask_terms(call, held, cache=False)
        return self.keys.terms[call.name]
