"""Stage building on a hand-labelled graph: stages alternate sides, enclave first; each op runs in the earliest
stage of its side after everything it reads; each stage reads and returns exactly what crosses its border."""

import operator

import torch
from fx_graphs import aten_graph, op, ops

from secure_split.partitioner.stages import assign_stages, build_partition
from secure_split.passes.label import ENCLAVE, GPU
from secure_split.passes.meta import SIDE, STAGE
from secure_split.passes.taint import TaintPass

aten = torch.ops.aten


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(4, 4))
        self.w2 = torch.nn.Parameter(torch.randn(4, 4))
        self.w3 = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x)
        a, b = h @ self.w1, h @ self.w2  # both ready once h is: one GPU stage
        c = torch.tanh(a)
        return c @ self.w3 + b  # b waits on the GPU side until the last enclave stage reads it


def labelled():
    """relu, tanh and the final add in the enclave; the three products on the GPU."""
    gm = aten_graph(TwoLayers(), torch.randn(3, 4))
    TaintPass()(gm)
    for node in gm.graph.nodes:
        node.meta[SIDE] = GPU if node.target is aten.mm.default else ENCLAVE
    return gm


def test_each_op_runs_in_the_earliest_stage_of_its_side():
    gm = labelled()
    stage = assign_stages(gm)
    a, b, last = ops(gm, aten.mm.default)
    assert stage[op(gm, aten.relu.default)] == 0
    assert stage[a] == stage[b] == 1  # b is not delayed to stage 3, next to the product it is added to
    assert stage[op(gm, aten.tanh.default)] == 2 and stage[last] == 3
    assert stage[op(gm, aten.add.Tensor)] == 4
    assert all(n.meta[STAGE] == s for n, s in stage.items())
    assert all(s % 2 == (n.meta[SIDE] == GPU) for n, s in stage.items())  # even: enclave, odd: GPU


def test_the_partition_alternates_sides_and_wires_what_crosses():
    gm = labelled()
    x = torch.randn(3, 4)
    expected = gm(x)
    partition = build_partition(gm)
    specs = partition.stages
    assert [(s.index, s.side) for s in specs] == [(0, ENCLAVE), (1, GPU), (2, ENCLAVE), (3, GPU), (4, ENCLAVE)]
    assert [(s.inputs, s.outputs) for s in specs] == [
        (("arg0_1",), ("relu",)),
        (("relu",), ("mm", "mm_1")),
        (("mm",), ("tanh",)),
        (("tanh",), ("mm_2",)),
        (("mm_2", "mm_1"), ("add",)),
    ]
    assert [s.num_nodes for s in specs] == [1, 2, 1, 1, 1]
    calls = [n for n in partition.boundary.graph.nodes if n.op == "call_module"]
    assert [(c.target, c.meta[SIDE], c.meta[STAGE]) for c in calls] == [(s.module_name, s.side, s.index) for s in specs]
    items = [n for n in partition.boundary.graph.nodes if n.target is operator.getitem]
    assert [n.name for n in items] == ["relu", "mm", "mm_1", "tanh", "mm_2", "add"]
    gpu = partition.stage_module(specs[1])
    assert sorted(n.target for n in gpu.graph.nodes if n.op == "get_attr") == ["_param_constant0", "_param_constant1"]
    torch.testing.assert_close(partition.boundary(x), expected, rtol=0, atol=0)
