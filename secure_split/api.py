"""Ahead-of-time entry point: `split(model, args, kwargs, config) -> SplitProgram`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .backend import SplitCompiledFunction
from .config import SplitConfig
from .program import SplitProgram


def split(
    model: torch.nn.Module,
    args: tuple[Any, ...] | Any,
    kwargs: dict[str, Any] | None = None,
    config: SplitConfig | None = None,
) -> SplitProgram:
    """Capture `model` on example inputs with Dynamo (fullgraph, static shapes) and split it.

    The returned program is callable with the model's own arguments (same shapes as the example) and exposes
    `report()`. It uses the same compiler as `torch.compile(backend="secure_split")`.
    """
    config = config or SplitConfig()
    if config.policy == "cmif":
        config = dataclasses.replace(config, special_token_ids=(*config.special_token_ids, *special_token_ids(model)))
    args = args if isinstance(args, tuple) else (args,)
    captured: list[SplitCompiledFunction] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> SplitCompiledFunction:
        captured.append(SplitCompiledFunction(gm, example_inputs, config))
        return captured[-1]

    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args, **(kwargs or {}))
    except torch._dynamo.exc.BackendCompilerFailed as error:  # a refusal raised while Dynamo compiled: say it plainly
        raise error.inner_exception from None
    if not captured or captured[-1].last_program is None:
        raise RuntimeError("Dynamo did not hand the model's graph to secure_split (was it already compiled?)")
    program = captured[-1].last_program
    program._entry = compiled
    return program


SPECIAL_TOKENS = ("pad", "bos", "eos", "cls", "sep", "mask", "unk", "decoder_start")


def special_token_ids(model: torch.nn.Module) -> list[int]:
    """The special token ids a transformers model's config names (cmif never sanitizes them)."""
    config = getattr(model, "config", None)
    ids = []
    for name in SPECIAL_TOKENS:
        value = getattr(config, f"{name}_token_id", None)
        ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    return [int(i) for i in ids]
