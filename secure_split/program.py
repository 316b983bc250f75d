"""`SplitProgram`: a compiled split of one graph, and the trusted runtime that executes it.

The program interprets the boundary graph: enclave stages run here on the CPU, GPU stages run in the
`GpuExecutor` behind the `Channel`, `mask` nodes hide and send, `unmask` nodes receive and subtract the unmask
term. Masks are drawn fresh for every call and dropped when the call returns.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from secure_split.enclave_runtime.csprng import CSPRNG
from secure_split.enclave_runtime.masking import make_masking
from secure_split.partitioner.stages import PartitionResult, StageSpec
from secure_split.passes.insert_masks import Cut, cuts, mask, unmask
from secure_split.passes.meta import CUT, SIDE
from secure_split.runtime.channel import Channel
from secure_split.runtime.gpu_executor import GpuExecutor

from .config import SplitConfig
from .report import PartitionReport, build_report

_last_run: weakref.ref[SplitProgram] | None = None


def last_program() -> SplitProgram:
    """The program that ran most recently, e.g. behind a `torch.compile(backend="secure_split")` call."""
    program = _last_run() if _last_run is not None else None
    if program is None:
        raise RuntimeError("no secure_split program has run yet")
    return program


class SplitProgram:
    """One model graph split into enclave and GPU stages, with masks at every cut. Call it like the model."""

    def __init__(self, partition: PartitionResult, config: SplitConfig, input_names: list[str]) -> None:
        self.partition = partition
        self.config = config
        self.input_names = input_names  # where each graph input came from, e.g. "L['kwargs']['attention_mask']"
        self.boundary = partition.boundary
        self.cuts: list[Cut] = cuts(self.boundary)
        self.device = torch.device(config.device)
        self.masking = make_masking(config.masking, CSPRNG(config.seed), config.mask_scale)
        self.channel = Channel(self.device)
        self.gpu = GpuExecutor({s.module_name: partition.stage_module(s) for s in self.gpu_stages}, self.device)
        self._gpu_spec = {s.module_name: s for s in self.gpu_stages}
        self.calls = 0
        self._zero_terms: dict[str, tuple[torch.Tensor, ...]] = {}
        self._entry: Callable[..., Any] | None = None

    @property
    def gpu_stages(self) -> list[StageSpec]:
        return [s for s in self.partition.stages if s.side == "gpu"]

    def run(self, *inputs: torch.Tensor) -> Any:
        """Execute on the graph's flat user inputs (what the compiled graph receives)."""
        global _last_run
        with torch.inference_mode():
            result = _BoundaryInterpreter(self).run(*inputs)
        self.calls += 1
        _last_run = weakref.ref(self)
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call with the model's own arguments (programs from `split()`), or with flat graph inputs."""
        if self._entry is None:
            return self.run(*args, **kwargs)
        before = self.calls
        with torch.no_grad():  # as captured: grad mode is part of Dynamo's guards
            result = self._entry(*args, **kwargs)
        if self.calls == before:
            raise RuntimeError(
                "this call did not run through the split program (new input shapes or dtypes make Dynamo "
                "compile a new graph); call secure_split.split() again for these inputs"
            )
        return result

    def report(self) -> PartitionReport:
        return build_report(self)

    def zero_terms(self, spec: StageSpec, held: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """f(0) for a GPU stage: its constant part, the same for every call of this shape."""
        if spec.module_name not in self._zero_terms:
            inputs = [v if kind == "public" else torch.zeros_like(v) for kind, v in held]
            self._zero_terms[spec.module_name] = tuple(self.partition.stage_module(spec)(*inputs))
        return self._zero_terms[spec.module_name]


class _BoundaryInterpreter(fx.Interpreter):
    """Executes one call of the boundary graph, holding this call's masks."""

    def __init__(self, program: SplitProgram) -> None:
        super().__init__(program.boundary, garbage_collect_values=True)
        self.program = program
        self.masks: dict[fx.Node, tuple[str, torch.Tensor]] = {}
        self.terms: dict[fx.Node, tuple[torch.Tensor, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target is mask:
            return self._mask(n, self.env[n.args[0]])
        if n.op == "call_function" and n.target is unmask:
            return self._unmask(n, self.env[n.args[0]])
        if n.op == "call_module" and n.meta[SIDE] == "gpu":
            args, _ = self.fetch_args_kwargs_from_env(n)
            return self.program.gpu.run(str(n.target), list(args))
        return super().run_node(n)

    def _mask(self, n: fx.Node, value: torch.Tensor) -> torch.Tensor:
        cut: Cut = n.meta[CUT]
        masking = self.program.masking
        if cut.protection == "public":
            self.masks[n] = ("public", value)
            hidden = value
        else:
            r = masking.draw(value)
            self.masks[n] = ("mask", r)
            hidden = masking.hide(value, r)
        return self.program.channel.to_gpu(cut.stage, cut.name, hidden)

    def _unmask(self, n: fx.Node, value: torch.Tensor) -> torch.Tensor:
        cut: Cut = n.meta[CUT]
        received = self.program.channel.to_enclave(cut.stage, cut.name, value)
        if cut.protection in ("public", "none"):
            return received
        item = n.args[0]
        assert item.target is operator.getitem
        call, index = item.args[0], item.args[1]
        if call not in self.terms:
            self.terms[call] = self._unmask_terms(call)
        return self.program.masking.reveal(received, self.terms[call][index])

    def _unmask_terms(self, call: fx.Node) -> tuple[torch.Tensor, ...]:
        """L(r) = f(r) - f(0) for every output of one GPU stage call, computed in the enclave."""
        spec = self.program._gpu_spec[str(call.target)]
        held = [self.masks[a] for a in call.args]
        with_masks = self.program.partition.stage_module(spec)(*[v for _, v in held])
        zeros = self.program.zero_terms(spec, held)
        return tuple(fr - f0 for fr, f0 in zip(with_masks, zeros, strict=True))
