"""Capture: turn a model (through `torch.export`) or the graph Dynamo hands a backend into a functional ATen graph
with model state as constants.

Only parameters and buffers are model state. Any other tensor the graph reads (an attribute set on a module;
under Dynamo also a global) is read at call time and may hold one request's data, so it stays a graph input,
private like user data (the export path refuses such a tensor it cannot name: a global, a closure); state the
model writes (`self.buf.copy_(x)`) is refused, since a constant cannot follow it.

Every graph input is named by where the caller's value comes from, in one plain form for both captures: a model
argument by the name `forward`'s own frame gives it ("x", "attention_mask", or "args[0]" for an item of `*args`,
as transformers' forward wrappers take them), a value inside one by its path ("past_key_values['key_cache'][0]"),
a module attribute as "self.scale", a global as "global name".

This module holds what both captures share: the names, the refusals and the captured form (`lift_state`);
`capture_export` and `capture_dynamo` are the two ways in.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from .leak_audit import LeakError
from .meta import PARAM_NAMES, SOURCE, WEIGHTS

InputKind = Literal["user", "parameter", "buffer", "literal", "constant", "symint"]
Step = tuple[Literal["attr", "item"], Any]  # one step into a value: `.name` or `[key]`


class StateError(ValueError):
    """The model writes its own state in the captured graph: a split program cannot keep it as a constant."""


class HiddenInputError(ValueError):
    """The model reads a tensor that is neither model state nor a module attribute (a global, a closure) at call
    time: the split program could neither read it afresh per call nor keep it as a constant."""


@dataclass(frozen=True)
class InputSpec:
    """One input of the captured graph: per-call data (private), model state (public unless listed private), a
    tensor literal of the code (`torch.tensor([...])`, public) or a Python value the graph was specialized on."""

    kind: InputKind
    name: str  # user inputs: where the value comes from (plain form); model state: its qualified name


# -- naming ----------------------------------------------------------------------------------------------


def positional_names(model: torch.nn.Module, count: int) -> list[str]:
    """The names `model.forward`'s own frame gives its first `count` positional arguments, as Dynamo's sources
    name them: a named parameter ("x"), or an item of its `*args` ("args[0]": transformers' forward wrappers)."""
    parameters = inspect.signature(model.forward, follow_wrapped=False).parameters.values()
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = next((p.name for p in parameters if p.kind is p.VAR_POSITIONAL), "args")
    return [named[i] if i < len(named) else path_name(rest, [("item", i - len(named))]) for i in range(count)]


def path_name(root: str, steps: Iterable[Step]) -> str:
    """`root` followed by attribute and item steps: ("self", [("attr", "scale")]) -> "self.scale"."""
    return root + "".join(f".{key}" if kind == "attr" else f"[{key!r}]" for kind, key in steps)


def argument_name(source: str) -> str | None:
    """The model argument a graph input's source names ("args[0]", "attention_mask"), or None when the source is
    not a whole argument (a value inside one, a module attribute, a global)."""
    position = source.removeprefix("args[").removesuffix("]")
    whole = source.isidentifier() or (source.startswith("args[") and source.endswith("]") and position.isdigit())
    return source if whole else None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def refuse_private_numbers(names: Iterable[str], public: tuple[str, ...]) -> None:
    """Refuse the caller's Python ints and floats `names` that the graph holds as constants, unless public."""
    private = sorted({name for name in names if name not in public})
    if private:  # never the values themselves: they are the caller's secrets
        raise LeakError(
            f"Python number(s) {private} (the caller's arguments, or values computed before a graph break) would be "
            f"baked into the split graph as constants, where GPU stage code carries them in the clear: pass each "
            f"as a tensor (private, masked), or declare an argument public with SplitConfig(public_inputs=(...))"
        )


# -- the captured form -------------------------------------------------------------------------------------


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
        if spec.kind in ("symint", "constant") or not isinstance(value, torch.Tensor):
            raise NotImplementedError(f"input {spec.name!r} ({spec.kind}) is still used after specialization")
        attr = "state_" + re.sub(r"\W", "_", spec.name)
        aten.register_buffer(attr, value.detach(), persistent=False)
        with aten.graph.inserting_before(node):
            const = aten.graph.get_attr(attr)
        const.meta.update(node.meta)
        const.meta[PARAM_NAMES] = (spec.name,) if spec.kind in ("parameter", "buffer") else ()
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
        raise state_error(written)


def state_error(written: list[str]) -> StateError:
    return StateError(
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
