"""The one interpreter of a split's boundary graph, run in the enclave, whatever runs the GPU stages.

Enclave stages run here on the CPU; GPU stages run on a `StageBackend` (in process, onnxruntime, or a remote
worker), and every value reaches it through the backend. A `mask` node encodes, hides and sends its value; an
`unmask` node receives a result, removes its unmask term and decodes it. A call's keys come from the
`KeyProvider`; a retryable worker failure runs the call again from the start, with fresh keys.
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from secure_split.passes.insert_masks import Cut, mask, unmask
from secure_split.passes.meta import CUT, SIDE
from secure_split.runtime.stage_backend import StageBackend, WorkerError

from .keys import KeyProvider
from .masking import MaskingScheme, hide, reveal
from .pool import CallKeys

log = logging.getLogger("secure_split")


@dataclass
class SplitExecutor:
    """Runs calls of `boundary`: masking at every cut, GPU stages on `backend`, keys from `keys` (None when
    nothing is masked). `ring_bits`: each GPU stage's outputs' fractional bits under ring masking, by stage name.
    `retries`: how often a call that a remote worker failed (retryably) runs again, with fresh masks."""

    boundary: fx.GraphModule
    backend: StageBackend
    keys: KeyProvider | None
    masking: MaskingScheme
    ring_bits: dict[str, tuple[int, ...] | None]
    retries: int
    retried: int = 0  # attempts run again after a worker failed them

    def run(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """One call on the graph's flat inputs; a retryable worker failure runs it again from the start with new
        keys, as often as `retries` allows (only set above 0 where a resend reveals nothing more: ring's uniform
        one-time pads, or no masks)."""
        for attempt in itertools.count():
            keys = self.keys.for_call() if self.keys is not None else None
            try:
                return _CallInterpreter(self, keys).run(*inputs)
            except WorkerError as error:
                if not error.retryable or attempt >= self.retries:
                    raise
                self.retried += 1
                log.warning("secure_split: %s; running the call again with fresh masks", error)
                time.sleep(min(0.05 * 2**attempt, 1.0))
            finally:
                if keys is not None:
                    keys.destroy()


class _CallInterpreter(fx.Interpreter):
    """Executes one call of the boundary graph with that call's keys."""

    def __init__(self, executor: SplitExecutor, keys: CallKeys | None) -> None:
        super().__init__(executor.boundary, garbage_collect_values=True)
        self.executor = executor
        self.call_keys = keys
        self.verifiers = executor.keys.verifiers if executor.keys is not None else {}
        self.public: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target is mask:
            return self._mask(n, self.env[n.args[0]])
        if n.op == "call_function" and n.target is unmask:
            return self._unmask(n, self.env[n.args[0]])
        if n.op == "call_module" and n.meta[SIDE] == "gpu":
            args, _ = self.fetch_args_kwargs_from_env(n)
            result = self.executor.backend.run(str(n.target), list(args))
            if n.name in self.verifiers:
                assert self.call_keys is not None
                sent, got = [a.to("cpu") for a in args], [r.to("cpu") for r in result]
                self.verifiers[n.name].check(self.call_keys.checks[n.name], sent, got)
            return result
        return super().run_node(n)

    def _mask(self, n: fx.Node, value: torch.Tensor) -> torch.Tensor:
        cut: Cut = n.meta[CUT]
        if value.is_floating_point():
            value = self.executor.masking.encode(value, cut.name)
        if cut.masked:
            assert self.call_keys is not None
            value = hide(value, self.call_keys.masks[n.name])
        else:
            self.public[n.name] = value
        return self.executor.backend.send(cut.stage, cut.name, value)

    def _unmask(self, n: fx.Node, value: torch.Tensor) -> torch.Tensor:
        cut: Cut = n.meta[CUT]
        received = self.executor.backend.receive(cut.stage, cut.name, value)
        item = n.args[0]
        assert item.target is operator.getitem
        call, index = item.args[0], item.args[1]
        if cut.masked:
            assert self.executor.keys is not None and self.call_keys is not None
            received = reveal(received, self.executor.keys.terms(self.call_keys, call, self.public)[index])
        if call.name in self.verifiers:
            self.verifiers[call.name].check_range(index, received)
        bits = self.executor.ring_bits.get(str(call.target))
        return self.executor.masking.decode(received, None if bits is None else bits[index], n.meta["val"].dtype)
