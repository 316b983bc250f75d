"""The `auto` policy: choose enclave/GPU labels by a minimum s-t cut over a cost model, under secureinfer's rules.

Every node secureinfer must keep home (non-affine, private weights, unmaskable values) is tied to the source
(the enclave). Every other private node may go either way, and the cut pays
- its compute on the side it lands on (FLOPs / that side's throughput), and
- for each value whose consumers sit on the other side, its bytes × link cost + one crossing's latency, once per
  value and direction however many consumers it has (an auxiliary node per value and direction does that).
Round trips are not linear in the labels; the per-crossing latency stands in for them, and the report shows the
real count.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from secure_split.partitioner.stages import assign_stages
from secure_split.passes.flops import node_flops, value_bytes
from secure_split.passes.label import ENCLAVE, GPU, LabelPass, _set, consumers, is_getitem
from secure_split.passes.meta import REASON, SIDE, TAINT
from secure_split.passes.taint import PRIVATE

_SOURCE, _SINK = "enclave", "gpu"


@dataclass(frozen=True)
class Cost:
    """What a split costs: seconds per byte crossing, per crossing, and per FLOP on each side."""

    link_bytes_per_s: float = 10e9  # PCIe-class link between the enclave and the GPU
    latency_s: float = 20e-6  # one crossing
    enclave_flops_per_s: float = 50e9  # a CPU enclave
    gpu_flops_per_s: float = 50e12  # a datacenter GPU


class MinCutLabelPass(LabelPass):
    """Labels like secureinfer, then moves the movable nodes to minimise `Cost` (networkx minimum cut)."""

    def __init__(self, cost: Cost, wire_bytes: float = 1.0, **kwargs) -> None:
        """`wire_bytes`: bytes on the wire per byte of value (2 for ring masking: float32 crosses as int64)."""
        super().__init__(**kwargs)
        self.cost = cost
        self.wire_bytes = wire_bytes

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        nodes = [n for n in graph_module.graph.nodes if not is_getitem(n)]
        super().call(graph_module)  # secureinfer's labels: the baseline auto must not cross more bytes than
        baseline = {n: (n.meta[SIDE], n.meta[REASON]) for n in graph_module.graph.nodes}
        baseline_bytes = crossing_bytes(graph_module)
        for node in nodes:
            self._initial(node)
        movable = {n for n in nodes if n.meta[SIDE] == GPU}
        on_gpu = self._solve(nodes, movable)
        for node in movable - on_gpu:
            _set(node, ENCLAVE, "auto: cheaper in the enclave under the cost model")
        result = self._finish(graph_module, nodes)
        if crossing_bytes(graph_module) > baseline_bytes:  # the cost model traded bytes for compute: keep the baseline
            for node, (side, reason) in baseline.items():
                _set(node, side, reason)
        return result

    def _solve(self, nodes: list[fx.Node], movable: set[fx.Node]) -> set[fx.Node]:
        """The movable nodes on the sink (GPU) side of a minimum cut."""
        graph = nx.DiGraph()
        graph.add_nodes_from([_SOURCE, _SINK])
        private = [n for n in nodes if n.op != "get_attr" and n.meta.get(TAINT) == PRIVATE]
        for node in private:
            if node in movable:
                flops = node_flops(node)
                graph.add_edge(_SOURCE, node, capacity=flops / self.cost.gpu_flops_per_s)  # paid if on the GPU
                graph.add_edge(node, _SINK, capacity=flops / self.cost.enclave_flops_per_s)  # paid if at home
            else:
                graph.add_edge(_SOURCE, node)  # no capacity: infinite, the node stays in the enclave
        for node in private:
            self._add_crossing(graph, node, [u for u in consumers(node) if u in graph])
        _, (_, gpu_side) = nx.minimum_cut(graph, _SOURCE, _SINK)
        return {n for n in gpu_side if isinstance(n, fx.Node)}

    def _add_crossing(self, graph: nx.DiGraph, node: fx.Node, users: list[fx.Node]) -> None:
        """Pay the value's crossing once per direction if any consumer sits on the other side."""
        if not users:
            return
        price = value_bytes(node) * self.wire_bytes / self.cost.link_bytes_per_s + self.cost.latency_s
        out, back = ("out", node), ("back", node)
        graph.add_edge(node, out, capacity=price)  # node at home, a consumer on the GPU
        graph.add_edge(back, node, capacity=price)  # node on the GPU, a consumer at home
        for user in users:
            graph.add_edge(out, user)
            graph.add_edge(user, back)


def crossing_bytes(gm: fx.GraphModule) -> int:
    """Bytes crossing per call under the current labels, counted as the boundary will be built: a value read by
    GPU stages crosses to the GPU once, a GPU stage output read outside its stage comes back once."""
    stage = assign_stages(gm)
    total = 0
    for node in gm.graph.nodes:
        if node not in stage:
            continue
        readers = [u for u in node.users if stage.get(u, -1) != stage[node]]
        if node.meta[SIDE] == GPU and readers:
            total += value_bytes(node)
        if any(u.meta.get(SIDE) == GPU for u in readers):
            total += value_bytes(node)
    return total
