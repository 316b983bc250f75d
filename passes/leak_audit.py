"""Leak audit: prove DESIGN.md's three invariants on a finished boundary graph, or refuse it.

The audit trusts no label: it recomputes taint through the boundary graph and inside every stage, then checks
1. every input of a GPU stage arrives through a `mask` op, masked unless it holds no user data;
2. every GPU stage is affine in its masked inputs;
3. no private parameter is read by a GPU stage;
and the policy's own contract: under `talaria`, no enclave stage holds a parameter; under `remo` masking,
every GPU stage is row-wise (`passes.rowwise`); under `cmif`, no raw token id crosses.
"""

from __future__ import annotations

import operator

from torch import fx

from .insert_masks import mask, unmask
from .label import GPU, AffineOperatorSupport
from .label_cmif import PROTECTION as CMIF_PROTECTION
from .label_cmif import raw_token_nodes
from .meta import CUT, PRIVATE_PARAM, SIDE, TAINT, WEIGHTS
from .rowwise import RowwiseSupport
from .taint import PRIVATE, PUBLIC, SECRET, TaintPass, combine


class LeakError(RuntimeError):
    """A split program would show the GPU something it must not see."""


def audit(
    boundary: fx.GraphModule,
    masking: str,
    private_globs: tuple[str, ...] = (),
    policy: str = "secureinfer",
    labelled: fx.GraphModule | None = None,
) -> None:
    """Raise `LeakError` naming the first violated invariant; return None when all hold.

    Under `policy="cmif"` private values cross with ε-DP protection instead of masks and GPU stages need not be
    affine, but no value computed from the raw token ids other than through the embedding may cross: the audit
    recomputes those values on the `labelled` graph."""
    taint: dict[fx.Node, str] = {}
    support = None if policy == "cmif" else RowwiseSupport() if masking == "remo" else AffineOperatorSupport()
    expected = CMIF_PROTECTION if policy == "cmif" else masking
    if policy == "cmif":
        _check_no_raw_tokens_cross(boundary, labelled)
    if policy == "talaria":
        _check_no_weight_in_enclave(boundary)
    for node in boundary.graph.nodes:
        if node.op == "placeholder":
            taint[node] = PRIVATE
        elif node.op == "call_module":
            stage = boundary.get_submodule(str(node.target))
            on_gpu = node.meta.get(SIDE) == GPU
            if on_gpu:
                _check_gpu_inputs(node, taint, expected)
            outputs = _stage_taints(stage, node, taint, private_globs, support, on_gpu)
            for item in node.users:
                taint[item] = outputs[item.args[1]]
                if on_gpu and any(u.target is not unmask for u in item.users):
                    raise LeakError(f"{node.target}: a GPU result is used without passing through unmask")
        elif node.op == "call_function":
            if node.target is operator.getitem and node.args[0].op == "call_module":
                continue
            taint[node] = combine(taint[p] for p in node.all_input_nodes)


def _check_no_raw_tokens_cross(boundary: fx.GraphModule, labelled: fx.GraphModule | None) -> None:
    if labelled is None:
        raise ValueError("auditing a cmif program needs its labelled graph")
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


def _check_gpu_inputs(call: fx.Node, taint: dict[fx.Node, str], masking: str) -> None:
    for value in call.all_input_nodes:
        if value.target is not mask:
            raise LeakError(f"{call.target}: input {value.name!r} reaches the GPU without a mask op (invariant 1)")
        protection = value.meta[CUT].protection
        source = value.args[0]
        if taint[source] == SECRET:
            raise LeakError(f"{call.target}: {source.name!r} derives from a private parameter (invariant 3)")
        private_unmasked = taint[source] == PRIVATE and protection != masking
        if private_unmasked or (protection == "public" and taint[source] != PUBLIC):
            raise LeakError(
                f"{call.target}: {taint[source]} value {source.name!r} crosses with protection {protection!r} "
                f"under masking {masking!r} (invariant 1)"
            )


def _stage_taints(
    stage: fx.GraphModule,
    call: fx.Node,
    taint: dict[fx.Node, str],
    private_globs: tuple[str, ...],
    support: AffineOperatorSupport | None,
    on_gpu: bool,
) -> list[str]:
    """Taint of each stage output; for a GPU stage, also check it is legal (affine too, given `support`)."""
    args = [a.args[0] if a.target is mask else a for a in call.args]
    inputs = {p.name: taint[a] for p, a in zip(_placeholders(stage), args, strict=True)}
    TaintPass(private_globs, inputs)(stage)
    if on_gpu:
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
