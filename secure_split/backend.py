"""The TorchDynamo backend `secure_split`, registered through the `torch_dynamo_backends` entry point."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from secure_split.passes.capture import InputSpec, classify_inputs

from .compile import compile_graph
from .config import SplitConfig
from .program import SplitProgram


class SplitCompiledFunction:
    """What Dynamo calls instead of the graph: one `SplitProgram` per input signature, built on first use.

    Specializing on first call (rather than at compile time) also serves graphs Dynamo compiled with dynamic
    shapes: each concrete shape gets its own audited program.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], config: SplitConfig) -> None:
        self.gm = gm
        self.config = config
        self.specs: list[InputSpec] = classify_inputs(gm, example_inputs)
        self.programs: dict[tuple, SplitProgram] = {}
        self.last_program: SplitProgram | None = None

    def __call__(self, *inputs: Any) -> Any:
        key = self._signature(inputs)
        program = self.programs.get(key)
        if program is None:
            program = compile_graph(self.gm, self.specs, list(inputs), self.config)
            self.programs[key] = program
        self.last_program = program
        return program.run(*(x for x, s in zip(inputs, self.specs, strict=True) if s.kind == "user"))

    def _signature(self, inputs: tuple[Any, ...]) -> tuple:
        key = []
        for value, spec in zip(inputs, self.specs, strict=True):
            if isinstance(value, torch.Tensor) and spec.kind == "user":
                key.append((tuple(value.shape), value.dtype, value.device.type))
            elif spec.kind == "symint":
                key.append(int(value))
        return tuple(key)


def secure_split_backend(
    gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None
) -> SplitCompiledFunction:
    """`torch.compile(model, backend="secure_split", options={...})`: options are `SplitConfig` fields."""
    return SplitCompiledFunction(gm, example_inputs, SplitConfig.from_options(options))
