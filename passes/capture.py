"""Capture: turn the graph Dynamo hands a backend into a functional ATen graph with model state as constants."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from .meta import PARAM_NAMES, WEIGHTS

InputKind = Literal["user", "parameter", "buffer", "constant", "symint"]


_STATE_RE = re.compile(r"\.?_(modules|parameters|buffers)\['([^']+)'\]")


@dataclass(frozen=True)
class InputSpec:
    """One input of the captured graph: user data (private) or model state (public unless listed private)."""

    kind: InputKind
    name: str


def classify_inputs(gm: fx.GraphModule, example_inputs: list[Any]) -> list[InputSpec]:
    """Tell user inputs from lifted parameters/buffers, using the source Dynamo recorded for each placeholder."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"graph has {len(placeholders)} inputs but {len(example_inputs)} examples were given")
    return [_classify(node, value) for node, value in zip(placeholders, example_inputs, strict=True)]


def _classify(node: fx.Node, value: Any) -> InputSpec:
    if isinstance(value, torch.SymInt | int):
        return InputSpec("symint", node.name)
    grapharg = node.meta.get("grapharg")
    source = grapharg.source.name if grapharg is not None else ""
    parts = _STATE_RE.findall(source)
    if parts and parts[-1][0] in ("parameters", "buffers"):
        kind: InputKind = "parameter" if parts[-1][0] == "parameters" else "buffer"
        return InputSpec(kind, ".".join(name for _, name in parts))
    if isinstance(value, torch.nn.Parameter):
        return InputSpec("parameter", node.name)
    if source.startswith("G[") or source.startswith("L['self']"):
        return InputSpec("constant", source)
    return InputSpec("user", source or node.name)


def lower_to_aten(gm: fx.GraphModule, inputs: list[Any]) -> fx.GraphModule:
    """Trace `gm` to ATen ops on concrete inputs; functionalize only when the graph mutates something."""
    with torch.no_grad():
        aten = make_fx(gm)(*inputs)
        if any(_mutates(n) for n in aten.graph.nodes):
            aten = make_fx(functionalize(gm))(*inputs)
    return aten


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def lift_state(aten: fx.GraphModule, specs: list[InputSpec], inputs: list[Any]) -> fx.GraphModule:
    """Replace model-state placeholders by `get_attr` constants; keep only user tensors as graph inputs."""
    placeholders = [n for n in aten.graph.nodes if n.op == "placeholder"]
    for node, spec, value in zip(placeholders, specs, inputs, strict=True):
        if spec.kind == "user":
            continue
        if not node.users:
            aten.graph.erase_node(node)
            continue
        if spec.kind == "symint":
            raise NotImplementedError(f"symbolic size input {spec.name!r} is still used after specialization")
        attr = "state_" + re.sub(r"\W", "_", spec.name)
        aten.register_buffer(attr, value.detach(), persistent=False)
        with aten.graph.inserting_before(node):
            const = aten.graph.get_attr(attr)
        const.meta.update(node.meta)
        const.meta[PARAM_NAMES] = (spec.name,)
        const.meta[WEIGHTS] = (spec.name,) if spec.kind == "parameter" else ()
        node.replace_all_uses_with(const)
        aten.graph.erase_node(node)
    aten.graph.lint()
    aten.recompile()
    return aten
