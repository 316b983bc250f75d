"""The TorchDynamo backend `secure_split`, registered through the `torch_dynamo_backends` entry point."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from secure_split.passes.capture import InputSpec, argument_name, capture_dynamo, classify_inputs
from secure_split.passes.leak_audit import LeakError

from .compile import compile_graph
from .config import SplitConfig
from .program import SplitProgram


class SplitCompiledFunction:
    """What Dynamo calls instead of the graph: one `SplitProgram` per input signature, built on first use.

    Specializing on first call (rather than at compile time) also serves graphs Dynamo compiled with dynamic
    shapes: each concrete shape gets its own audited program.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], config: SplitConfig) -> None:
        refuse_private_numbers(config.public_inputs)
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


def refuse_private_numbers(public: tuple[str, ...]) -> None:
    """Refuse the ints and floats of the traced frame that Dynamo baked into the graph, unless declared public.

    Dynamo specializes Python numbers: their values become constants of the graph (a stage's code could carry
    them to the GPU) and a guard on each value recompiles when it changes. Those guards name them. Called while
    Dynamo compiles, the only time its tracing context (torch 2.13's) is there to read."""
    private = [name for name in _guarded_numbers() if argument_name(name) not in public]
    if private:  # never the values themselves: they are the caller's secrets
        raise LeakError(
            f"Python number(s) {private} (the caller's arguments, or values computed before a graph break) would be "
            f"baked into the split graph as constants, where GPU stage code carries them in the clear: pass each "
            f"as a tensor (private, masked), or declare an argument public with SplitConfig(public_inputs=(...))"
        )


def _guarded_numbers() -> list[str]:
    """The traced frame's arguments (not the model's attributes nor its functions' defaults) that are ints or
    floats guarded by value."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    from torch._guards import GuardSource, TracingContext

    frame, context = getattr(InstructionTranslator.current_tx(), "f_locals", None), TracingContext.try_get()
    if frame is None or context is None:
        return []
    names = []
    for guard in context.guards_context.dynamo_guards:
        by_value = guard.create_fn_name() in ("CONSTANT_MATCH", "EQUALS_MATCH")
        if guard.source is not GuardSource.LOCAL or not by_value or argument_name(guard.name) is None:
            continue
        value = eval(guard.name, {"L": frame})  # a guard's name is the expression Dynamo reads its value with
        if isinstance(value, int | float) and not isinstance(value, bool):
            names.append(guard.name)
    return sorted(set(names))


def secure_split_backend(
    gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None
) -> SplitCompiledFunction:
    """`torch.compile(model, backend="secure_split", options={...})`: options are `SplitConfig` fields."""
    return SplitCompiledFunction(gm, example_inputs, SplitConfig.from_options(options))
