"""Taint analysis: which values derive from user data (private), from private weights only (secret), or neither."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .infra import AnnotationPass, require, require_meta
from .meta import PARAM_NAMES, PRIVATE_PARAM, TAINT

PRIVATE, SECRET, PUBLIC = "private", "secret", "public"


def taint_of(node: fx.Node) -> str:
    return node.meta[TAINT]


class TaintPass(AnnotationPass):
    """Marks user inputs private, model state public (or secret when a `private` glob matches), and propagates.

    `input_taints` overrides the taint of graph inputs by name (e.g. inputs the user declared public)."""

    def __init__(self, private_globs: tuple[str, ...] = (), input_taints: dict[str, str] | None = None) -> None:
        super().__init__()
        self.private_globs = private_globs
        self.input_taints = input_taints or {}

    def requires(self, graph_module: fx.GraphModule) -> None:
        names = {n.name for n in graph_module.graph.nodes if n.op == "placeholder"}
        unknown = sorted(set(self.input_taints) - names)
        require(self, not unknown, f"input_taints names {unknown}, which are not inputs of the graph ({sorted(names)})")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        for node in graph_module.graph.nodes:
            node.meta[TAINT] = self._taint(node)
        return PassResult(graph_module, False)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        require_tainted(self, graph_module)

    def _taint(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            return self.input_taints.get(node.name, PRIVATE)
        if node.op == "get_attr":
            names = node.meta.get(PARAM_NAMES, (str(node.target),))
            node.meta[PRIVATE_PARAM] = any(fnmatchcase(n, g) for n in names for g in self.private_globs)
            return SECRET if node.meta[PRIVATE_PARAM] else PUBLIC
        return combine(taint_of(p) for p in node.all_input_nodes)


def combine(taints) -> str:
    """Data dominates: a value computed from user data is private (it may cross masked); else secret beats public."""
    seen = set(taints)
    if PRIVATE in seen:
        return PRIVATE
    return SECRET if SECRET in seen else PUBLIC


def require_tainted(pass_, graph_module: fx.GraphModule) -> None:
    """`pass_`'s precondition (or postcondition) that every node of the graph has its taint."""
    require_meta(pass_, graph_module.graph.nodes, TAINT, "needs every node tainted (TaintPass)")


class TaintedGraphPass(PassBase):
    """A pass over a tainted graph (TaintPass first) that leaves every node, new ones included, tainted."""

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_tainted(self, graph_module)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        require_tainted(self, graph_module)
