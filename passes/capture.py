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
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx
from torch.export.graph_signature import InputKind as ExportInput
from torch.export.graph_signature import OutputKind
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import GetAttrKey, KeyEntry, MappingKey, SequenceKey, TreeSpec, tree_flatten_with_path

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


# -- capture through torch.export --------------------------------------------------------------------------


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
        raise _state_error(state)
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


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default)


def _drop_asserts(gm: fx.GraphModule) -> None:
    """Export's checks of tensor metadata at `.to()` calls: the shapes are static and checked at the entry."""
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ASSERTS]:
        gm.graph.erase_node(node)
    gm.recompile()


def refuse_private_numbers(names: Iterable[str], public: tuple[str, ...]) -> None:
    """Refuse the caller's Python ints and floats `names` that the graph holds as constants, unless public."""
    private = sorted({name for name in names if name not in public})
    if private:  # never the values themselves: they are the caller's secrets
        raise LeakError(
            f"Python number(s) {private} (the caller's arguments, or values computed before a graph break) would be "
            f"baked into the split graph as constants, where GPU stage code carries them in the clear: pass each "
            f"as a tensor (private, masked), or declare an argument public with SplitConfig(public_inputs=(...))"
        )


# -- capture from Dynamo's graph ---------------------------------------------------------------------------


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
        raise _state_error(written)


def _state_error(written: list[str]) -> StateError:
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
