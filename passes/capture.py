"""Capture: turn the graph Dynamo hands a backend into a functional ATen graph with model state as constants.

Only parameters and buffers are model state. Any other tensor the graph reads (an attribute set on a module,
a global) is read at call time and may hold one request's data, so it stays a graph input, private like user
data; state the model writes (`self.buf.copy_(x)`) is refused, since a constant cannot follow it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from .meta import PARAM_NAMES, SOURCE, WEIGHTS

InputKind = Literal["user", "parameter", "buffer", "symint"]


_STATE_RE = re.compile(r"\.?_(modules|parameters|buffers)\['([^']+)'\]")
_ARGUMENT_RE = re.compile(r"^L\['(?:args'\]\[(\d+)\]|kwargs'\]\['(\w+)'\]|(\w+)'\])$")


class StateError(ValueError):
    """The model writes its own state in the captured graph: a split program cannot keep it as a constant."""


@dataclass(frozen=True)
class InputSpec:
    """One input of the captured graph: per-call data (private) or model state (public unless listed private)."""

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
    return InputSpec("user", source or node.name)  # arguments, and attributes or globals read at call time


def argument_name(source: str) -> str | None:
    """"L['args'][0]" -> "args[0]", "L['kwargs']['attention_mask']" or "L['attention_mask']" -> "attention_mask";
    None for a source that is not a plain argument of the model (an attribute, a global)."""
    match = _ARGUMENT_RE.match(source)
    if match is None:
        return None
    position, keyword, plain = match.groups()
    return f"args[{position}]" if position is not None else keyword or plain


def capture_dynamo(gm: fx.GraphModule, specs: list[InputSpec], inputs: list[Any]) -> fx.GraphModule:
    """The captured form the compiler takes: a functional ATen graph of the Dynamo graph `gm` on `inputs`, whose
    placeholders are the user inputs (their SOURCE in `node.meta`) and whose model state is `get_attr` constants."""
    return lift_state(lower_to_aten(gm, inputs), specs, inputs)


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
    _refuse_written_state(placeholders, specs)
    for node, spec, value in zip(placeholders, specs, inputs, strict=True):
        if spec.kind == "user":
            node.meta[SOURCE] = spec.name
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


def _refuse_written_state(placeholders: list[fx.Node], specs: list[InputSpec]) -> None:
    """A buffer the model writes (functionalized to a trailing `copy_` into it) would freeze one call's data."""
    written = [spec.name for node, spec in zip(placeholders, specs, strict=True)
               if spec.kind != "user" and any(_writes(user, node) for user in node.users)]  # fmt: skip
    if written:
        raise StateError(
            f"the model writes its state {written} in forward (e.g. self.buf.copy_(x)): a split program keeps model "
            f"state as constants, so the first call's data would be frozen into the stages and reused by later "
            f"calls. Keep per-request state out of the module (pass it as an input, return the new value)"
        )


def _writes(node: fx.Node, target: fx.Node) -> bool:
    """Whether `node` writes into `target` (an argument its schema marks as written)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return False
    return any(arg.alias_info is not None and arg.alias_info.is_write and value is target
               for arg, value in zip(schema.arguments, node.args, strict=False))  # fmt: skip
