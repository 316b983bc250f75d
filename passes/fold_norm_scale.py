"""Fold a norm's scale γ and shift β into the linear ops that read the normalised value.

(x̂ · γ + β) · Wt + b = x̂ · (diag(γ) · Wt) + (β · Wt + b): when every reader of the scaled value is a product
with a weight matrix (directly, or through views and slices of whole rows), the weight owner's
matrices absorb γ and β and the scaling disappears from the graph. Where something else also reads it (BERT's
post-LN residual), the scale and shift stay as element-wise GPU ops. Talaria runs this after
`SeparateWeightsPass`, so RMSNorm's and LayerNorm's scales are both plain `mul`/`add` nodes by then.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses import FakeTensorMode
from torch.fx.passes.infra.pass_base import PassResult

from .label import packet
from .meta import PARAM_NAMES, PRIVATE_PARAM, TAINT, WEIGHTS
from .taint import PRIVATE, PUBLIC, TaintedGraphPass

aten = torch.ops.aten
ROW_OPS = {aten.view, aten._unsafe_view, aten.reshape, aten.alias, aten.clone, aten.slice, aten.select}


class FoldNormScalePass(TaintedGraphPass):
    """Rewrites `mm`/`addmm` readers of x̂·γ(+β) to read x̂ with folded weights; see the module docstring."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        folded = 0
        for node in list(graph_module.graph.nodes):
            if node.op == "call_function" and packet(node) is aten.mul and node.meta.get(TAINT) == PRIVATE:
                folded += _fold(graph_module, node)
        graph_module.graph.eliminate_dead_code()
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, folded > 0)


def _fold(gm: fx.GraphModule, scale: fx.Node) -> bool:
    private = [a for a in scale.args if isinstance(a, fx.Node) and a.meta.get(TAINT) == PRIVATE]
    gamma = _feature_vector(gm, scale)
    if len(private) != 1 or gamma is None:
        return False
    end, beta = scale, None
    shift = next(iter(scale.users)) if len(scale.users) == 1 else None
    if shift is not None and packet(shift) is aten.add and not shift.kwargs and _feature_vector(gm, shift) is not None:
        end, beta = shift, _feature_vector(gm, shift)
    products = _products(gm, end)
    if not products:
        return False
    for product, reads in products:
        _rewrite(gm, product, reads, gamma, beta)
    end.replace_all_uses_with(private[0])
    return True


def _feature_vector(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """The 1-D weight constant that `node` combines with its private input, feature by feature."""
    consts = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr" and a.meta.get(WEIGHTS)]
    width = node.meta["val"].shape[-1]
    if len(consts) != 1 or len(node.args) != 2:
        return None
    value = getattr(gm, str(consts[0].target))
    return (consts[0], value) if value.dim() == 1 and value.shape[0] == width else None


def _products(gm: fx.GraphModule, end: fx.Node) -> list[tuple[fx.Node, fx.Node]] | None:
    """Every (product, the node it reads) below `end`, through row ops; None if anything else reads it."""
    found = []
    for user in end.users:
        if _moves_rows_only(user, end):
            below = _products(gm, user)
            if below is None:
                return None
            found += below
        elif _weight_of(gm, user, end) is not None:
            found.append((user, end))
        else:
            return None
    return found or None


def _moves_rows_only(node: fx.Node, source: fx.Node) -> bool:
    """Whether `node` regroups or selects whole rows of `source` (so it commutes with per-feature γ and β)."""
    if packet(node) not in ROW_OPS or node.args[0] is not source:
        return False
    rank = source.meta["val"].dim()
    dim = node.args[1] if packet(node) in (aten.slice, aten.select) and len(node.args) > 1 else 0
    along_rows = packet(node) not in (aten.slice, aten.select) or dim not in (-1, rank - 1)
    return along_rows and node.meta["val"].shape[-1] == source.meta["val"].shape[-1]


def _weight_of(gm: fx.GraphModule, product: fx.Node, reads: fx.Node) -> fx.Node | None:
    """The constant Wt (features × outputs) of `product` = reads · Wt (+ b), or None for any other op."""
    op, args = packet(product), product.args
    position = {aten.mm: 0, aten.addmm: 1}.get(op)
    if position is None or product.kwargs or args[position] is not reads:
        return None
    weight = args[position + 1]
    if op is aten.addmm and not (isinstance(args[0], fx.Node) and args[0].op == "get_attr"):
        return None
    is_const = isinstance(weight, fx.Node) and weight.op == "get_attr"
    return weight if is_const and getattr(gm, str(weight.target)).dim() == 2 else None


def _rewrite(
    gm: fx.GraphModule,
    product: fx.Node,
    reads: fx.Node,
    gamma: tuple[fx.Node, torch.Tensor],
    beta: tuple[fx.Node, torch.Tensor] | None,
) -> None:
    weight = _weight_of(gm, product, reads)
    assert weight is not None
    wt = getattr(gm, str(weight.target))
    sources = [weight, gamma[0]]
    bias = (product.args[0], getattr(gm, str(product.args[0].target))) if packet(product) is aten.addmm else None
    new_bias = bias[1] if bias is not None else None
    if beta is not None:
        shifted = beta[1].to(wt.dtype) @ wt
        new_bias = shifted if new_bias is None else new_bias + shifted
        sources.append(beta[0])
    with gm.graph.inserting_before(product):
        folded_wt = _constant(gm, f"{weight.target}_x_{gamma[0].target}", gamma[1][:, None] * wt, sources)
        args: tuple = (reads, folded_wt)
        if new_bias is not None:
            bias_sources = sources + ([bias[0]] if bias is not None else [])
            args = (_constant(gm, f"{folded_wt.target}_bias", new_bias, bias_sources), reads, folded_wt)
        new = gm.graph.call_function(aten.addmm.default if new_bias is not None else aten.mm.default, args)
    new.meta.update(product.meta)
    product.replace_all_uses_with(new)
    gm.graph.erase_node(product)


def _constant(gm: fx.GraphModule, name: str, value: torch.Tensor, sources: list[fx.Node]) -> fx.Node:
    """A public constant computed from the weights `sources`, registered on `gm`."""
    attr = "folded_" + name.replace(".", "_")
    gm.register_buffer(attr, value.contiguous(), persistent=False)
    node = gm.graph.get_attr(attr)
    node.meta["val"] = FakeTensorMode().from_tensor(value)
    node.meta[TAINT] = PUBLIC
    node.meta[PRIVATE_PARAM] = False
    for key in (PARAM_NAMES, WEIGHTS):
        node.meta[key] = tuple(sorted({n for s in sources for n in s.meta.get(key, ())}))
    return node
