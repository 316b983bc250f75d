"""Talaria's lowering: pull every weight out of the weight-independent op it is fused with.

Talaria's enclave holds no weight, so an op that mixes user data non-linearly with a weight must be rewritten
into a weight-independent part (enclave) and an affine part that reads the weight (GPU, on masked inputs):
- an embedding look-up W[ids] becomes the product one_hot(ids) · W: the enclave builds the one-hot rows, the
  GPU multiplies them, masked, by the table (tokens never cross in the clear);
- a layer norm with scale γ and shift β becomes the normalisation alone, then ·γ and +β, which
  `FoldNormScalePass` folds into the linear ops that read them (or which run on the GPU as element-wise ops).
Runs after TaintPass and FoldPublicPass: look-ups of public ids (positions) are already constants.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch._subclasses import FakeTensorMode
from torch.fx.passes.infra.pass_base import PassResult

from .infra import require
from .label import packet
from .meta import TAINT
from .taint import PRIVATE, TaintedGraphPass

aten = torch.ops.aten


class SeparateWeightsPass(TaintedGraphPass):
    """Rewrites private embedding look-ups and affine layer norms (see the module docstring)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        changed = False
        for node in _fused_with_weights(graph_module):
            if packet(node) is aten.embedding:
                _embedding_as_one_hot(graph_module.graph, node)
            else:
                _split_layer_norm(graph_module.graph, node)
            changed = True
        graph_module.graph.eliminate_dead_code()
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, changed)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        super().ensures(graph_module)
        left = [n.name for n in _fused_with_weights(graph_module)]
        require(self, not left, f"ops still fuse a weight with a private value: {left}")


def _fused_with_weights(gm: fx.GraphModule) -> list[fx.Node]:
    """Private embedding look-ups, and layer norms with a scale or shift."""
    private = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get(TAINT) == PRIVATE]
    return [n for n in private if packet(n) is aten.embedding or _affine_layer_norm(n)]


def _affine_layer_norm(node: fx.Node) -> bool:
    return packet(node) is aten.native_layer_norm and any(a is not None for a in node.args[2:4])


def _embedding_as_one_hot(graph: fx.Graph, node: fx.Node) -> None:
    table, ids = node.args[0], node.args[1]
    vocab, width = (int(s) for s in table.meta["val"].shape)
    rows = int(ids.meta["val"].numel())
    with graph.inserting_before(node):
        one_hot = _call(graph, aten.one_hot.default, (ids, vocab))
        as_float = _call(graph, aten._to_copy.default, (one_hot,), {"dtype": table.meta["val"].dtype})
        flat = _call(graph, aten.view.default, (as_float, [rows, vocab]))
        product = _call(graph, aten.mm.default, (flat, table))
        looked_up = _call(graph, aten.view.default, (product, [*ids.meta["val"].shape, width]))
    node.replace_all_uses_with(looked_up)
    graph.erase_node(node)


def _split_layer_norm(graph: fx.Graph, node: fx.Node) -> None:
    x, shape, weight, bias, eps = node.args
    normed_users = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    with graph.inserting_before(node):
        bare = _call(graph, aten.native_layer_norm.default, (x, shape, None, None, eps))
        out: fx.Node = _call(graph, operator.getitem, (bare, 0))
        if weight is not None:
            out = _call(graph, aten.mul.Tensor, (out, weight))
        if bias is not None:
            out = _call(graph, aten.add.Tensor, (out, bias))
    for user in normed_users:
        user.replace_all_uses_with(out)
    node.replace_all_uses_with(bare)  # the mean and rstd outputs, if anything reads them


def _call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A new private node, with its value's metadata computed on the fake tensors of its inputs."""
    node = graph.call_function(target, args, kwargs or {})
    with FakeTensorMode():  # the inputs' values come from several fake modes: remake them in one
        vals = fx.node.map_arg((args, kwargs or {}), lambda n: _like(n.meta["val"]))
        node.meta["val"] = target(*vals[0], **vals[1])
    node.meta[TAINT] = PRIVATE
    return node


def _like(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype)
    return tuple(_like(v) for v in val) if isinstance(val, tuple | list) else val
