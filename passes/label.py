"""Labelling: tag every node `enclave` or `gpu` in `node.meta`, with the reason, without changing the graph.

A node may run on the GPU only when it is affine in its private inputs and every other input is public
(`AffineOperatorSupport`). Among those, matmul-like ops are the work worth offloading; the affine "glue" around
them (views, adds, scaling) follows them only where that does not add a crossing, and a GPU region without
enough compute stays in the enclave.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.operator_support import OperatorSupportBase

from .flops import node_flops
from .infra import AnnotationPass, require
from .meta import REASON, SIDE, TAINT
from .taint import PRIVATE, PUBLIC, SECRET, require_tainted

aten = torch.ops.aten
ENCLAVE, GPU = "enclave", "gpu"

# Linear in exactly one private operand; every other tensor operand must be public.
COMPUTE_OPS = {aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm, aten.linear, aten.convolution}
# Linear in their single tensor input (the other arguments are sizes, dims, dtypes).
SHAPE_OPS = {
    aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t, aten.expand, aten.clone,
    aten.squeeze, aten.unsqueeze, aten.slice, aten.select, aten.split, aten.split_with_sizes, aten.unbind,
    aten.chunk, aten.flatten, aten.alias, aten.detach, aten.narrow, aten.neg, aten.sum, aten.mean,
}  # fmt: skip
# Sums of their operands: any mix of private and public is affine.
SUM_OPS = {aten.add, aten.sub, aten.cat, aten.stack}
# A private operand times/over a public one.
SCALE_OPS = {aten.mul, aten.div}
MASKABLE_DTYPES = {torch.float32, torch.float64}


def packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def is_compute(node: fx.Node) -> bool:
    return packet(node) in COMPUTE_OPS


class ReasonedSupport(OperatorSupportBase):
    """A torch.fx operator support that keeps the reason of each decision, by node name, in `reasons`.

    `check(node) -> (ok, reason)` is the detailed entry; `is_node_supported` (torch's interface, for
    partitioners and the `operator_support` combinators) calls it on ops and records its reason. A node that is
    not an op (an input, a constant, the output) is not supported: it is no work to place."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def is_node_supported(self, submodules: Mapping[str, torch.nn.Module], node: fx.Node) -> bool:
        ok, reason = self.check(node) if node.op == "call_function" else (False, f"{node.op}: not an op")
        self.reasons[node.name] = reason
        return ok

    def check(self, node: fx.Node) -> tuple[bool, str]:
        raise NotImplementedError


class AffineOperatorSupport(ReasonedSupport):
    """Supports a private op that is affine in its private inputs with all other inputs public: what may run
    on the GPU on masked inputs (TaintPass first)."""

    def check(self, node: fx.Node) -> tuple[bool, str]:
        """(ok, reason) for running `node` on masked inputs."""
        op = packet(node)
        name = str(op or node.target)
        inputs = node.all_input_nodes
        if any(n.meta[TAINT] == SECRET for n in inputs):
            return False, "touches a private parameter"
        private = [n for n in inputs if n.meta[TAINT] == PRIVATE]
        bad = [n for n in private if _dtype(n) not in MASKABLE_DTYPES]
        if bad:
            return False, f"{name} reads a {_dtype(bad[0])} value, which cannot be masked additively"
        if op in COMPUTE_OPS:
            return self._check_compute(node, op, private)
        if op in SHAPE_OPS:
            return (len(private) == 1 and len(inputs) == 1), f"{name}: linear view/reduction"
        if op in SUM_OPS:
            return _alpha_ok(node), f"{name}: sum of operands"
        if op in SCALE_OPS:
            return _check_scale(node, op, private)
        return False, f"{name}: not affine in its input"

    def _check_compute(self, node: fx.Node, op, private: list[fx.Node]) -> tuple[bool, str]:
        name = str(op)
        if len(private) != 1:
            return False, f"{name} with {len(private)} private operands (e.g. attention scores)"
        if op in (aten.addmm, aten.baddbmm) and node.args[0] is private[0]:
            return False, f"{name}: private value as the added term of a product"
        if op in (aten.linear, aten.convolution) and node.args[0] is not private[0]:
            return False, f"{name}: private weight"
        return True, f"{name}: linear in the masked input, public weight"


def _dtype(node: fx.Node):
    val = node.meta.get("val")
    return getattr(val, "dtype", None)


def _alpha_ok(node: fx.Node) -> bool:
    alpha = node.kwargs.get("alpha", 1)
    return isinstance(alpha, int | float) and not isinstance(alpha, bool)


def _check_scale(node: fx.Node, op, private: list[fx.Node]) -> tuple[bool, str]:
    name = str(op)
    if len(private) != 1:
        return False, f"{name} of two private values"
    if op is aten.div and node.args[0] is not private[0]:
        return False, f"{name} by a private value"
    if node.kwargs.get("rounding_mode") is not None:
        return False, f"{name} with rounding"
    return True, f"{name}: scaling by a public value"


def consumers(node: fx.Node) -> list[fx.Node]:
    """Users of a node, looking through `getitem` on multi-output ops."""
    out: list[fx.Node] = []
    for user in node.users:
        out.extend(consumers(user) if is_getitem(user) else [user])
    return out


def producer(node: fx.Node) -> fx.Node:
    """The node that really computes a value (the op behind a `getitem`)."""
    while is_getitem(node):
        node = node.args[0]
    return node


class LabelPass(AnnotationPass):
    """Tags every node `enclave` or `gpu` (meta[SIDE]) with a reason (meta[REASON]). Needs TaintPass first.

    A label pass only annotates: it raises `GraphChangedError` if it changed the graph (`AnnotationPass`)."""

    def __init__(
        self,
        support: AffineOperatorSupport | None = None,
        min_gpu_flops: int = 1,
        rules: Sequence[Callable[[list[fx.Node]], bool]] = (),
        public_on_gpu: bool = True,
    ) -> None:
        """`rules` demote more nodes (e.g. masking-specific limits); each returns True when it changed a label.
        `public_on_gpu=False` computes every public value that is not folded (e.g. a random draw) in the
        enclave, which sends it as it is (ring masking cannot lower arbitrary public ops onto integers)."""
        super().__init__()
        self.support = support or AffineOperatorSupport()
        self.min_gpu_flops = min_gpu_flops
        self.rules = rules
        self.public_on_gpu = public_on_gpu

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_tainted(self, graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        nodes = [n for n in graph_module.graph.nodes if not is_getitem(n)]
        for node in nodes:
            self._initial(node)
        return self._finish(graph_module, nodes)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        ops = [n for n in graph_module.graph.nodes if n.op == "call_function"]
        unplaced = [n.name for n in ops if n.meta.get(SIDE) not in (ENCLAVE, GPU) or REASON not in n.meta]
        require(self, not unplaced, f"every op gets a side and a reason; none for {unplaced[:5]}")

    def _finish(self, graph_module: fx.GraphModule, nodes: list[fx.Node]) -> PassResult:
        """Demote until nothing changes, place public values, label getitems like their producers."""
        while self._demote_detached_glue(nodes) | self._demote_small_regions(nodes) | self._apply_rules(nodes):
            pass
        self._place_public(nodes)
        for node in graph_module.graph.nodes:
            if is_getitem(node):
                source = producer(node)
                _set(node, source.meta[SIDE], source.meta[REASON])
        return PassResult(graph_module, False)

    def _initial(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "output"):
            _set(node, ENCLAVE, "graph input/output: user data lives in the enclave")
        elif node.op == "get_attr":
            _set(node, None, "constant: copied into every stage that reads it")
        elif node.meta[TAINT] == SECRET:
            _set(node, ENCLAVE, "touches a private parameter")
        elif node.meta[TAINT] == PUBLIC:
            _set(node, None, "public")
        else:
            ok, reason = self.support.check(node)
            _set(node, GPU if ok else ENCLAVE, reason)

    def _anchor(self, node: fx.Node) -> bool:
        """Work that is worth a GPU region on its own (glue around it follows it)."""
        return is_compute(node)

    def _apply_rules(self, nodes: list[fx.Node]) -> bool:
        changed = False
        for rule in self.rules:
            changed |= rule(nodes)
        return changed

    def _demote_detached_glue(self, nodes: Iterable[fx.Node]) -> bool:
        """Affine glue stays on the GPU only next to GPU work: fed by it, or feeding only it."""
        changed = False
        for node in nodes:
            if node.meta[SIDE] != GPU or self._anchor(node):
                continue
            fed = all(_side(producer(p)) == GPU for p in node.all_input_nodes if p.meta[TAINT] == PRIVATE)
            users = consumers(node)
            feeds = bool(users) and all(_side(u) == GPU for u in users)
            if not (fed or feeds):
                _set(node, ENCLAVE, f"{packet(node)}: affine, kept beside its enclave neighbours")
                changed = True
        return changed

    def _demote_small_regions(self, nodes: Iterable[fx.Node]) -> bool:
        changed = False
        for region in gpu_regions(nodes):
            flops = sum(node_flops(n) for n in region)
            if not any(self._anchor(n) for n in region) or flops < self.min_gpu_flops:
                for node in region:
                    _set(node, ENCLAVE, f"GPU region of {flops} FLOPs without enough linear work")
                changed = True
        return changed

    def _place_public(self, nodes: list[fx.Node]) -> None:
        for node in reversed(nodes):
            if node.op == "call_function" and node.meta[TAINT] == PUBLIC:
                users = consumers(node)
                on_gpu = self.public_on_gpu and bool(users) and all(_side(u) == GPU for u in users)
                _set(node, GPU if on_gpu else ENCLAVE, "public: computed where it is used")


def gpu_regions(nodes: Iterable[fx.Node]) -> list[list[fx.Node]]:
    """Connected components of private GPU nodes (edges through getitem count)."""
    gpu = [n for n in nodes if _side(n) == GPU and n.meta[TAINT] == PRIVATE]
    seen: set[fx.Node] = set()
    regions = []
    for start in gpu:
        if start in seen:
            continue
        region, stack = [], [start]
        seen.add(start)
        while stack:
            node = stack.pop()
            region.append(node)
            neighbours = [producer(p) for p in node.all_input_nodes] + consumers(node)
            for other in neighbours:
                if other not in seen and _side(other) == GPU and other.meta[TAINT] == PRIVATE:
                    seen.add(other)
                    stack.append(other)
        regions.append(region)
    return regions


def _side(node: fx.Node) -> str | None:
    return node.meta.get(SIDE)


def _set(node: fx.Node, side: str | None, reason: str) -> None:
    node.meta[SIDE] = side
    node.meta[REASON] = reason
