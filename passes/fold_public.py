"""Constant folding of public values: everything computed from model state and shapes alone.

A program is specialized to one input signature, so a value that holds no user data (a transposed weight, a
causal mask, RoPE tables) is the same on every call: compute it once, here, and let every stage that reads it
hold it as a constant instead of recomputing it or sending it across the boundary.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .meta import PARAM_NAMES, PRIVATE_PARAM, TAINT, WEIGHTS
from .taint import PUBLIC, TaintedGraphPass


class FoldPublicPass(TaintedGraphPass):
    """Replaces public call_function nodes (TaintPass first) by `get_attr` constants holding their value."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        values: dict[fx.Node, object] = {}
        folded = 0
        for node in list(graph_module.graph.nodes):
            if node.op == "get_attr":
                values[node] = getattr(graph_module, str(node.target))
            elif node.op == "call_function" and node.meta.get(TAINT) == PUBLIC and _foldable(node, values):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
                if isinstance(values[node], torch.Tensor) and _folds(node):
                    values[_replace_with_constant(graph_module, node, values[node])] = values[node]
                    folded += 1
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
        return PassResult(graph_module, folded > 0)


def _foldable(node: fx.Node, values: dict[fx.Node, object]) -> bool:
    """Deterministic, and computed from folded values only (a random draw upstream makes it vary per call)."""
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags and all(p in values for p in node.all_input_nodes)


def _folds(node: fx.Node) -> bool:
    """Fold where a non-public node reads the value; purely public chains fold at their last link."""
    return any(u.meta.get(TAINT) != PUBLIC or u.op == "output" for u in node.users)


def _replace_with_constant(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> fx.Node:
    attr = f"folded_{node.name}"
    gm.register_buffer(attr, value, persistent=False)
    with gm.graph.inserting_before(node):
        const = gm.graph.get_attr(attr)
    const.meta.update(node.meta)
    const.meta[PARAM_NAMES] = _sources(node, PARAM_NAMES)
    const.meta[WEIGHTS] = _sources(node, WEIGHTS)
    const.meta[PRIVATE_PARAM] = False
    node.replace_all_uses_with(const)
    return const


def _sources(node: fx.Node, key: str) -> tuple[str, ...]:
    """The model state (PARAM_NAMES) or parameters (WEIGHTS) a public value was computed from."""
    names: set[str] = set()
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        names.update(n.meta.get(key, ()) if n.op == "get_attr" else ())
        stack.extend(n.all_input_nodes)
    return tuple(sorted(names))
