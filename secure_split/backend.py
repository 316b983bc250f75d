"""The TorchDynamo backend `secure_split`, registered through the `torch_dynamo_backends` entry point."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from secure_split.passes.capture import InputSpec, is_number, path_name, refuse_private_numbers
from secure_split.passes.capture_dynamo import capture_dynamo, classify_inputs, dynamo_source

from .compile import compile_graph
from .config import SplitConfig
from .program import SplitProgram


class SplitCompiledFunction:
    """What Dynamo calls instead of the graph: one `SplitProgram` per input signature, built on first use.

    Specializing on first call (rather than at compile time) also serves graphs Dynamo compiled with dynamic
    shapes: each concrete shape gets its own audited program.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], config: SplitConfig) -> None:
        refuse_private_numbers(_guarded_numbers(), config.public_inputs)
        self.gm = gm
        self.config = config
        self.specs: list[InputSpec] = classify_inputs(gm, example_inputs)
        self.programs: dict[tuple, SplitProgram] = {}
        self.last_program: SplitProgram | None = None

    def __call__(self, *inputs: Any) -> Any:
        key = self._signature(inputs)
        program = self.programs.get(key)
        if program is None:
            program = compile_graph(capture_dynamo(self.gm, self.specs, list(inputs)), self.config)
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


def _guarded_numbers() -> list[str]:
    """The ints and floats of the traced frame's arguments (at any depth; not the model's attributes nor its
    functions' defaults) that Dynamo guards by value: it baked them into the graph as constants (a stage's code
    could carry them to the GPU) and recompiles when one changes. Read while Dynamo compiles, the only time its
    tracing context (torch 2.13's) is there to read."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    from torch._guards import GuardSource, TracingContext

    frame, context = getattr(InstructionTranslator.current_tx(), "f_locals", None), TracingContext.try_get()
    if frame is None or context is None:
        return []
    names = []
    for guard in context.guards_context.dynamo_guards:
        by_value = guard.create_fn_name() in ("CONSTANT_MATCH", "EQUALS_MATCH")
        located = dynamo_source(guard.originating_source) if by_value and guard.source is GuardSource.LOCAL else None
        if located is not None and is_number(_read(frame, guard.originating_source)):
            names.append(path_name(*located[:2]))
    return names


def _read(frame: dict[str, Any], source: Any) -> Any:
    """The value a local `source` (a local, its items and attributes) names in `frame`."""
    from torch._dynamo.source import AttrSource, LocalSource

    if isinstance(source, LocalSource):
        return frame.get(source.local_name)
    value = _read(frame, source.base)
    if isinstance(source, AttrSource):
        return getattr(value, source.member, None)
    return value[source.index] if hasattr(source, "index") else value


def secure_split_backend(
    gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None
) -> SplitCompiledFunction:
    """`torch.compile(model, backend="secure_split", options={...})`: options are `SplitConfig` fields."""
    return SplitCompiledFunction(gm, example_inputs, SplitConfig.from_options(options))
