"""Ahead-of-time entry point: `split(model, args, kwargs, config) -> SplitProgram`, captured through `torch.export`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from secure_split.passes.capture import refuse_private_numbers
from secure_split.passes.capture_export import capture_export

from .compile import compile_graph
from .config import SplitConfig
from .entry import ModelEntry
from .program import SplitProgram


def split(
    model: torch.nn.Module,
    args: tuple[Any, ...] | Any,
    kwargs: dict[str, Any] | None = None,
    config: SplitConfig | None = None,
) -> SplitProgram:
    """Capture `model` on example inputs with `torch.export` (static shapes) and split it.

    The returned program is callable with the model's own arguments (same shapes as the example) and exposes
    `report()`; it is run once on the example before it is returned. It uses the same compiler as
    `torch.compile(backend="secure_split")`, and leaves the caller's other compiled models as they are.
    """
    config = config or SplitConfig()
    if config.policy == "cmif":
        config = dataclasses.replace(config, special_token_ids=(*config.special_token_ids, *special_token_ids(model)))
    args = args if isinstance(args, tuple) else (args,)
    captured, signature = capture_export(model, args, kwargs)
    refuse_private_numbers(signature.numbers, config.public_inputs)
    program = compile_graph(captured, config)
    program._entry = ModelEntry(model, signature)
    program(*args, **(kwargs or {}))
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
