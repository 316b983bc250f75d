"""Capture from the graph Dynamo hands the `secure_split` backend (`torch.compile`): its inputs classified by the
`Source` Dynamo recorded for each, then the captured form (`capture.lift_state`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import fx

from .capture import InputSpec, Step, lift_state, lower_to_aten, path_name


def classify_inputs(gm: fx.GraphModule, example_inputs: list[Any]) -> list[InputSpec]:
    """Tell user inputs from lifted parameters/buffers, from the source Dynamo recorded for each placeholder."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"graph has {len(placeholders)} inputs but {len(example_inputs)} examples were given")
    return [_classify(node, value) for node, value in zip(placeholders, example_inputs, strict=True)]


def _classify(node: fx.Node, value: Any) -> InputSpec:
    if isinstance(value, torch.SymInt | int):
        return InputSpec("symint", node.name)
    grapharg = node.meta.get("grapharg")
    located = dynamo_source(grapharg.source) if grapharg is not None else None
    if located is None:
        return InputSpec("parameter" if isinstance(value, torch.nn.Parameter) else "user", node.name)
    root, steps, state = located
    if state is not None or isinstance(value, torch.nn.Parameter):
        kind = state or "parameter"
        return InputSpec(kind, ".".join(str(key) for _, key in steps))  # qualified name in the module it came from
    return InputSpec("user", path_name(root, steps))  # arguments, and attributes or globals read at call time


def dynamo_source(source: Any) -> tuple[str, list[Step], Literal["parameter", "buffer"] | None] | None:
    """A Dynamo `Source`, structurally: the plain root ("x", "args", "attention_mask", "self", "global G"), the
    attribute/item steps below it (a module's `_modules`/`_parameters`/`_buffers` dicts read as attributes), and
    whether it is a parameter or buffer of a module. None for a source of another kind."""
    from torch._dynamo import source as sources

    steps: list[Step] = []
    state = None
    while isinstance(source, sources.ChainedSource):
        if isinstance(source, sources.AttrSource):
            steps.append(("attr", source.member))
        elif isinstance(source, sources.GetItemSource | sources.DictGetItemSource):
            if isinstance(source.index, sources.Source) or getattr(source, "index_is_slice", False):
                return None
            steps.append(("item", source.index))
        elif not isinstance(source, sources.NNModuleSource):  # a module wrapper reads the same value as its base
            return None
        source = source.base
    steps.reverse()
    if isinstance(source, sources.GlobalSource):
        root = f"global {source.global_name}"
    elif not isinstance(source, sources.LocalSource):
        return None
    elif source.is_varkw and steps and steps[0][0] == "item":  # **kwargs["attention_mask"] -> "attention_mask"
        root = steps.pop(0)[1]
    else:
        root = source.local_name
    plain: list[Step] = []
    for kind, key in steps:  # `._modules['sub']` -> `.sub`; `._parameters['weight']` -> `.weight` (state)
        if plain and plain[-1] in (("attr", "_modules"), ("attr", "_parameters"), ("attr", "_buffers")):
            state = {"_parameters": "parameter", "_buffers": "buffer"}.get(plain.pop()[1])
            plain.append(("attr", key))
        else:
            state = None
            plain.append((kind, key))
    return root, plain, state


def capture_dynamo(gm: fx.GraphModule, specs: list[InputSpec], inputs: list[Any]) -> fx.GraphModule:
    """The captured form the compiler takes: a functional ATen graph of the Dynamo graph `gm` on `inputs`, whose
    placeholders are the user inputs (their SOURCE in `node.meta`) and whose model state is `get_attr` constants."""
    return lift_state(lower_to_aten(gm, inputs), specs, inputs)
