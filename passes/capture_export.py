"""Capture through `torch.export` (`split()`, `export_bundle`): the model, on example arguments, to the captured
form (`capture.lift_state`), and the signature that maps the model's own arguments onto it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind as ExportInput
from torch.export.graph_signature import OutputKind
from torch.utils._pytree import GetAttrKey, KeyEntry, MappingKey, SequenceKey, TreeSpec, tree_flatten_with_path

from .capture import (
    HiddenInputError,
    InputSpec,
    Step,
    is_number,
    lift_state,
    lower_to_aten,
    path_name,
    positional_names,
    state_error,
)


@dataclass(frozen=True)
class GraphInput:
    """One input of a graph `capture_export` made, as a call supplies it: `read` is the index of a leaf of the
    call's `(args, kwargs)`, or the qualified name of a module attribute read afresh on each call."""

    read: int | str
    name: str  # its SOURCE
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class ExportSignature:
    """How the model's own arguments map onto a graph `capture_export` made, and its outputs back.

    `in_spec`/`out_spec` are the pytree specs of `(args, kwargs)` and of the model's output. `sources` names each
    leaf of `(args, kwargs)`; `constants` holds, by leaf index, the non-tensor leaves the graph was specialized
    on (a call must pass the same values); `inputs` are the graph's inputs, in order."""

    in_spec: TreeSpec
    out_spec: TreeSpec
    sources: list[str]
    constants: dict[int, Any]
    inputs: list[GraphInput]

    @property
    def numbers(self) -> list[str]:
        """The arguments that are Python ints or floats: the graph holds their values as constants."""
        return [self.sources[i] for i, value in self.constants.items() if is_number(value)]


def capture_export(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> tuple[fx.GraphModule, ExportSignature]:
    """The captured form the compiler takes, through `torch.export` (non-strict, static shapes) on the example
    `(args, kwargs)`, and the signature that maps the model's own arguments onto it.

    The export's graph signature tells parameters, buffers, lifted constants and user inputs apart: a buffer or
    parameter written in forward raises `StateError`; a tensor attribute of a module (not a parameter/buffer)
    becomes a graph input read afresh per call; a tensor literal of the code stays a constant; any other tensor
    read from outside (a global, a closure) raises `HiddenInputError`."""
    _register_pytrees()
    kwargs = kwargs or {}
    with torch.no_grad(), _attributes_kept(model):
        program = torch.export.export(model, args, kwargs, strict=False)
    _refuse_mutations(program)
    leaves = tree_flatten_with_path((args, kwargs))[0]
    positional = positional_names(model, len(args))
    sources = [_leaf_name(path, positional) for path, _ in leaves]
    specs, values, inputs = _export_inputs(model, program, [value for _, value in leaves], sources)
    constants = {i: value for i, (_, value) in enumerate(leaves) if not isinstance(value, torch.Tensor)}
    captured = lift_state(lower_to_aten(program.graph_module, values), specs, values)
    _drop_asserts(captured)
    return captured, ExportSignature(program.call_spec.in_spec, program.call_spec.out_spec, sources, constants,
                                     inputs)  # fmt: skip


@contextmanager
def _attributes_kept(model: torch.nn.Module) -> Iterator[None]:
    """Export runs forward on fake tensors: what forward assigns to its modules (`self.stash = x`) is put back."""
    before = {module: dict(vars(module)) for module in model.modules()}
    try:
        yield
    finally:
        for module, attributes in before.items():
            vars(module).clear()
            vars(module).update(attributes)


def _register_pytrees() -> None:
    """transformers' KV cache as a pytree, so that a model taking or returning one exports (idempotent)."""
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:  # no transformers: no cache to register
        return
    register_dynamic_cache_export_support()


def _leaf_name(path: tuple[KeyEntry, ...], positional: list[str]) -> str:
    """The plain name of one leaf of `(args, kwargs)` from its pytree path."""
    _, first, *rest = path  # (args, kwargs)[0 or 1], then a position in args or a keyword of kwargs
    root = positional[first.idx] if isinstance(first, SequenceKey) else first.key
    return path_name(root, (_step(key) for key in rest))


def _step(key: KeyEntry) -> Step:
    if isinstance(key, GetAttrKey):
        return ("attr", key.name)
    if isinstance(key, SequenceKey):
        return ("item", key.idx)
    if isinstance(key, MappingKey):
        return ("item", key.key)
    raise NotImplementedError(f"pytree key {key!r}: no name for it")


def _refuse_mutations(program: torch.export.ExportedProgram) -> None:
    written = {OutputKind.BUFFER_MUTATION: [], OutputKind.PARAMETER_MUTATION: [], OutputKind.USER_INPUT_MUTATION: []}
    for spec in program.graph_signature.output_specs:
        if spec.kind in written:
            written[spec.kind].append(spec.target)
        elif spec.kind != OutputKind.USER_OUTPUT:
            raise NotImplementedError(f"export output of kind {spec.kind.name}: a split program returns values only")
    state = written[OutputKind.BUFFER_MUTATION] + written[OutputKind.PARAMETER_MUTATION]
    if state:
        raise state_error(state)
    if written[OutputKind.USER_INPUT_MUTATION]:
        raise NotImplementedError(
            f"the model writes its input(s) {written[OutputKind.USER_INPUT_MUTATION]} in place: a split program "
            f"returns new values and never writes the caller's tensors"
        )


def _export_inputs(
    model: torch.nn.Module, program: torch.export.ExportedProgram, leaves: list[Any], sources: list[str]
) -> tuple[list[InputSpec], list[Any], list[GraphInput]]:
    """For each input of the export's graph: its spec and its value on the example; and the per-call inputs
    as a call supplies them."""
    placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"]
    state = {**program.state_dict, **program.constants}
    user = iter(range(len(leaves)))
    specs, values, inputs = [], [], []
    for node, spec in zip(placeholders, program.graph_signature.input_specs, strict=True):
        if spec.kind == ExportInput.USER_INPUT:
            index = next(user)
            value = leaves[index]
            if isinstance(value, torch.Tensor):
                specs.append(InputSpec("user", sources[index]))
                inputs.append(GraphInput(index, sources[index], tuple(value.shape), value.dtype))
            else:
                specs.append(InputSpec("constant", sources[index]))
        elif spec.kind in (ExportInput.PARAMETER, ExportInput.BUFFER):
            value = state[spec.target]
            specs.append(InputSpec("parameter" if spec.kind == ExportInput.PARAMETER else "buffer", spec.target))
        elif spec.kind == ExportInput.CONSTANT_TENSOR:
            value = state[spec.target]
            if module_attribute(model, spec.target) is value:  # read afresh on each call: it may hold a request's data
                specs.append(InputSpec("user", path_name("self", (("attr", a) for a in spec.target.split(".")))))
                inputs.append(GraphInput(spec.target, specs[-1].name, tuple(value.shape), value.dtype))
            elif all(u.target is torch.ops.aten.lift_fresh_copy.default for u in node.users):
                specs.append(InputSpec("literal", spec.target))  # `torch.tensor([...])` in the code
            else:
                raise HiddenInputError(
                    "the model reads a tensor at call time that is neither a parameter, a buffer nor an attribute "
                    "of one of its modules (a global, or a closure): a split program could neither read it afresh "
                    "for each call nor keep it as a constant. Register it as a buffer (model state), or pass it "
                    "as an argument (private)"
                )
        else:
            raise NotImplementedError(f"export input {spec.arg.name!r} of kind {spec.kind.name} cannot be split")
        values.append(value)
    return specs, values, inputs


def module_attribute(model: torch.nn.Module, name: str) -> Any:
    """The attribute `name` ("sub.scale") of `model`'s modules, or None."""
    value: Any = model
    for part in name.split("."):
        value = getattr(value, part, None)
    return value


_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default)


def _drop_asserts(gm: fx.GraphModule) -> None:
    """Export's checks of tensor metadata at `.to()` calls: the shapes are static and checked at the entry."""
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ASSERTS]:
        gm.graph.erase_node(node)
    gm.recompile()
