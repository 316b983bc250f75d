"""Talaria's labelling: every op that reads a weight runs on the GPU, masked; everything else in the enclave.

The enclave holds no parameter at all (buffers such as RoPE frequencies are not weights). `SeparateWeightsPass`
first rewrites the ops that fuse a weight with a non-linear step (embedding look-ups, affine layer norms); an
op that still reads a weight without being affine in its input cannot be placed and is an error. Views that
only regroup rows may join the GPU work they sit next to, so they cost no extra crossing.
"""

from __future__ import annotations

from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .label import ENCLAVE, GPU, LabelPass, _set, packet
from .meta import REASON, SIDE, TAINT, WEIGHTS
from .rowwise import ROW_VIEWS
from .taint import PRIVATE


def reads_weight(node: fx.Node) -> bool:
    """Whether `node` reads a model parameter, or a constant computed from one."""
    return any(p.op == "get_attr" and p.meta.get(WEIGHTS) for p in node.all_input_nodes)


class TalariaLabelPass(LabelPass):
    """Weight-dependent ops on the GPU whatever their size; weight-independent ops in the enclave."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**{**options, "min_gpu_flops": 0})  # every weight op must leave the enclave

    def _anchor(self, node: fx.Node) -> bool:
        return reads_weight(node)

    def _initial(self, node: fx.Node) -> None:
        if node.op != "call_function" or node.meta[TAINT] != PRIVATE:
            super()._initial(node)
        elif reads_weight(node):
            ok, reason = self.support.check(node)
            if not ok:
                raise NotImplementedError(
                    f"policy='talaria': {node.name} ({packet(node)}) reads a weight but is not affine in its input "
                    f"({reason}); it can run neither on the GPU under masks nor in the enclave, which holds no "
                    "weight. Use policy='secureinfer' for this model."
                )
            _set(node, GPU, f"talaria: reads a weight ({reason})")
        elif packet(node) in ROW_VIEWS:
            _set(node, GPU, "talaria: a view beside GPU work")
        else:
            _set(node, ENCLAVE, "talaria: weight-independent")

    def _finish(self, graph_module: fx.GraphModule, nodes: list[fx.Node]) -> PassResult:
        result = super()._finish(graph_module, nodes)
        for node in nodes:
            if node.op == "call_function" and reads_weight(node) and node.meta[SIDE] != GPU:
                raise NotImplementedError(
                    f"policy='talaria': {node.name} reads a weight but must stay in the enclave "
                    f"({node.meta[REASON]}); talaria's enclave holds no weight"
                )
        return result
