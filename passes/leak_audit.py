"""Leak audit: prove DESIGN.md's three invariants on a finished boundary graph, or refuse it.

The audit trusts no label: it recomputes taint through the boundary graph and inside every stage, then checks
1. every input of a GPU stage arrives through a `mask` op, masked unless it holds no user data;
2. every GPU stage is affine in its masked inputs;
3. no private parameter is read by a GPU stage;
and the policy's own contract: under `talaria`, no enclave stage holds a parameter; under `remo` masking,
every GPU stage is row-wise (`passes.rowwise`); under `cmif`, no raw token id crosses.

`audit_boundary` is the part that needs no stage's graph, given how taint crosses each stage: a bundle's loader
runs it on the boundary it rebuilt from a manifest, whose stages are opaque ONNX files (`opaque_stage_taints`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from torch import fx

from .insert_masks import Cut, mask, unmask
from .label import GPU, AffineOperatorSupport
from .label_cmif import PROTECTION as CMIF_PROTECTION
from .label_cmif import raw_token_nodes, refuse_undeclared_inputs
from .meta import CUT, PRIVATE_PARAM, SIDE, TAINT, WEIGHTS
from .ring import wire_dtype
from .rowwise import RowwiseSupport
from .taint import PRIVATE, PUBLIC, SECRET, TaintPass, combine


class LeakError(RuntimeError):
    """A split program would show the GPU something it must not see."""


StageTaints = Callable[[fx.Node, list[str]], list[str]]  # (stage call, its arguments' taints) -> its outputs'


def audit(
    boundary: fx.GraphModule,
    masking: str,
    private_globs: tuple[str, ...] = (),
    policy: str = "secureinfer",
    labelled: fx.GraphModule | None = None,
    public_inputs: frozenset[str] = frozenset(),
) -> str:
    """Raise `LeakError` naming the first violated invariant; when all hold, return what was proved (the
    verdict a `SplitArtifact` keeps). Graph inputs are private but those named in `public_inputs` (declared
    public by the user).

    Under `policy="cmif"` private values cross with ε-DP protection instead of masks and GPU stages need not be
    affine, but no value computed from the raw token ids other than through the embedding may cross: the audit
    recomputes those values on the `labelled` graph."""
    support = None if policy == "cmif" else RowwiseSupport() if masking == "remo" else AffineOperatorSupport()
    if policy == "cmif":
        _check_no_raw_tokens_cross(boundary, labelled)
    if policy == "talaria":
        _check_no_weight_in_enclave(boundary)

    def stage_taints(call: fx.Node, inputs: list[str]) -> list[str]:
        return _stage_taints(boundary.get_submodule(str(call.target)), call, inputs, private_globs, support)

    audit_boundary(boundary, masking, policy, stage_taints, public_inputs)
    proved = [f"every GPU stage input is public or protected by {required_protection(policy, masking)}",
              "no raw token id crosses" if policy == "cmif" else
              "every GPU stage is row-wise affine" if masking == "remo" else "every GPU stage is affine",
              "no private parameter is on the GPU"]  # fmt: skip
    if policy == "talaria":
        proved.append("no enclave stage holds a weight")
    return f"audited ({policy}, {masking}): " + "; ".join(proved)


def required_protection(policy: str, masking: str) -> str:
    """What protects a value holding user data when it crosses: the masking, or cmif's ε-DP on the tokens."""
    return CMIF_PROTECTION if policy == "cmif" else masking


def audit_boundary(
    boundary: fx.GraphModule,
    masking: str,
    policy: str,
    stage_taints: StageTaints,
    public_inputs: frozenset[str] = frozenset(),
) -> None:
    """The invariants that hold at the boundary whatever the stages compute, given `stage_taints`: the taint of
    each output of a stage call from its arguments' (it may check the stage too). Graph inputs are private but
    those in `public_inputs`. Every input of a GPU stage is a `mask` op of a value that derives from no private
    parameter (invariants 1, 3); every cut has its op's direction, the masking's wire dtype and the protection
    `required_protection` names ("public" only for a public value); a masked value goes to GPU stages only; every
    GPU result comes back through `unmask`."""
    expected = required_protection(policy, masking)
    taint: dict[fx.Node, str] = {}
    for node in boundary.graph.nodes:
        if node.op == "placeholder":
            taint[node] = PUBLIC if node.name in public_inputs else PRIVATE
        elif node.op == "call_module":
            on_gpu = node.meta.get(SIDE) == GPU
            if on_gpu:
                _check_gpu_inputs(node, taint)
            outputs = stage_taints(node, [taint[a.args[0] if a.target is mask else a] for a in node.args])
            for item in node.users:
                _check_stage_result(node, item, on_gpu)
                taint[item] = outputs[item.args[1]]
        elif node.op == "call_function":
            if node.target is operator.getitem and node.args[0].op == "call_module":
                continue
            taint[node] = combine(taint[p] for p in node.all_input_nodes)
            if node.target in (mask, unmask):
                _check_cut(node, taint[node], masking, expected)


def opaque_stage_taints(inputs: list[str], outputs: int, private_weights: bool) -> list[str]:
    """The taints of a stage whose graph the audit cannot read (an ONNX file), from its arguments' alone: every
    output is private if any argument is, and at least secret if the stage may hold `private_weights`."""
    return [combine([*inputs, SECRET] if private_weights else inputs)] * outputs


def _check_no_raw_tokens_cross(boundary: fx.GraphModule, labelled: fx.GraphModule | None) -> None:
    if labelled is None:
        raise ValueError("auditing a cmif program needs its labelled graph")
    refuse_undeclared_inputs(labelled)
    raw = {n.name for n in raw_token_nodes(labelled)}
    for node in boundary.graph.nodes:
        if node.target is mask and node.args[0].name in raw:
            raise LeakError(f"{node.args[0].name!r}, computed from the raw token ids, crosses to the GPU (cmif)")


def _check_no_weight_in_enclave(boundary: fx.GraphModule) -> None:
    """Talaria's contract: no enclave stage (nor the boundary graph itself) holds a model parameter."""
    graphs = [("the boundary graph", boundary)]
    graphs += [(str(n.target), boundary.get_submodule(str(n.target))) for n in boundary.graph.nodes
               if n.op == "call_module" and n.meta.get(SIDE) != GPU]  # fmt: skip
    for where, gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.meta.get(WEIGHTS):
                raise LeakError(f"talaria: {where} holds weight(s) {list(node.meta[WEIGHTS])} in the enclave")


def _check_gpu_inputs(call: fx.Node, taint: dict[fx.Node, str]) -> None:
    for value in call.all_input_nodes:
        if value.target is not mask:
            raise LeakError(f"{call.target}: input {value.name!r} reaches the GPU without a mask op (invariant 1)")
        if taint[value.args[0]] == SECRET:
            raise LeakError(f"{call.target}: {value.args[0].name!r} derives from a private parameter (invariant 3)")


def _check_stage_result(call: fx.Node, item: fx.Node, on_gpu: bool) -> None:
    if item.target is not operator.getitem:
        raise LeakError(f"{call.target}: {item.name} takes its result whole; a stage's outputs are read by index")
    if on_gpu and any(u.target is not unmask for u in item.users):
        raise LeakError(f"{call.target}: a GPU result is used without passing through unmask")


def _check_cut(node: fx.Node, taint: str, masking: str, expected: str) -> None:
    """A cut's protection (no weaker than `expected`), direction, wire dtype, and readers."""
    cut: Cut = node.meta[CUT]
    where = f"cut {cut.index} {cut.name!r} ({cut.direction}, stage {cut.stage})"
    if cut.protection not in (expected, "public") or (cut.protection == "public" and taint != PUBLIC):
        raise LeakError(f"{where}: a {taint} value crosses with protection {cut.protection!r}; masking {masking!r} "
                        f"requires {expected!r} (invariant 1)")  # fmt: skip
    direction = "to_gpu" if node.target is mask else "to_enclave"
    if cut.direction != direction:
        raise LeakError(f"{where}: the cut of a {node.target.__name__}() op goes {direction}")
    dtype = node.meta["val"].dtype
    if cut.dtype != wire_dtype(masking, dtype):
        raise LeakError(f"{where}: {dtype} crosses as {cut.dtype}; masking {masking!r} sends it as "
                        f"{wire_dtype(masking, dtype)}")  # fmt: skip
    if node.target is mask and any(u.op != "call_module" or u.meta.get(SIDE) != GPU for u in node.users):
        raise LeakError(f"{where}: a masked value is read by {[u.name for u in node.users]}, not by GPU stages only")


def _stage_taints(
    stage: fx.GraphModule,
    call: fx.Node,
    inputs: list[str],
    private_globs: tuple[str, ...],
    support: AffineOperatorSupport | None,
) -> list[str]:
    """Taint of each stage output; for a GPU stage, also check it is legal (affine too, given `support`)."""
    TaintPass(private_globs, {p.name: t for p, t in zip(_placeholders(stage), inputs, strict=True)})(stage)
    if call.meta.get(SIDE) == GPU:
        _check_gpu_stage(stage, call, support)
    output = next(n for n in stage.graph.nodes if n.op == "output")
    return [n.meta[TAINT] for n in output.args[0]]


def _check_gpu_stage(stage: fx.GraphModule, call: fx.Node, support: AffineOperatorSupport | None) -> None:
    """Invariants 2 (unless `support` is None) and 3 inside one GPU stage whose taint is already computed."""
    for node in stage.graph.nodes:
        if node.op == "get_attr" and node.meta.get(PRIVATE_PARAM):
            raise LeakError(f"{call.target}: private parameter {node.target!r} is on the GPU (invariant 3)")
        private = node.op == "call_function" and node.meta[TAINT] == PRIVATE and node.target is not operator.getitem
        if support is not None and private:
            ok, reason = support.check(node)
            if not ok:
                raise LeakError(f"{call.target}: {node.name} is not affine in masked inputs ({reason}; invariant 2)")
        if node.op == "call_function" and node.meta[TAINT] == SECRET:
            raise LeakError(f"{call.target}: {node.name} computes on a private parameter (invariant 3)")


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]
