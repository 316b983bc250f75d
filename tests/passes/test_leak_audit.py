"""The leak audit refuses programs that would show the GPU a non-linear op, a plaintext value or a private weight."""

import pytest
import torch
from tiny_models import labelled_graph
from torch import fx

from secure_split.partitioner.stages import build_partition
from secure_split.passes.insert_masks import InsertMasksPass, mask
from secure_split.passes.label import GPU
from secure_split.passes.leak_audit import LeakError, audit
from secure_split.passes.meta import SIDE


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()


def finish(aten, masking="float", private=(), policy="secureinfer"):
    partition = build_partition(aten)
    InsertMasksPass(masking)(partition.boundary)
    audit(partition.boundary, masking, private, policy)
    return partition


def node(aten, target):
    return next(n for n in aten.graph.nodes if n.op == "call_function" and n.target == target)


def test_honest_program_passes_the_audit():
    aten = labelled_graph(mlp(), torch.randn(4, 16))
    partition = finish(aten)
    assert [s.side for s in partition.stages] == ["gpu", "enclave", "gpu"]


def test_non_linear_op_on_gpu_is_refused():
    aten = labelled_graph(mlp(), torch.randn(4, 16))
    node(aten, torch.ops.aten.gelu.default).meta[SIDE] = GPU
    with pytest.raises(LeakError, match=r"gelu.*invariant 2"):
        finish(aten)


def test_plaintext_value_on_gpu_is_refused():
    aten = labelled_graph(mlp(), torch.randn(4, 16))
    partition = build_partition(aten)
    InsertMasksPass("float")(partition.boundary)
    graph = partition.boundary.graph
    masked = next(n for n in graph.nodes if n.target is mask)
    masked.replace_all_uses_with(masked.args[0])  # bypass the mask: the GPU would get the raw input
    graph.erase_node(masked)
    with pytest.raises(LeakError, match="without a mask op"):
        audit(partition.boundary, "float")


def test_unmasked_crossing_is_refused_unless_masking_is_none():
    aten = labelled_graph(mlp(), torch.randn(4, 16))
    partition = build_partition(aten)
    InsertMasksPass("none")(partition.boundary)
    audit(partition.boundary, "none")
    with pytest.raises(LeakError, match=r"protection 'none'.*invariant 1"):
        audit(partition.boundary, "float")


def test_gpu_result_used_without_unmask_is_refused():
    aten = labelled_graph(mlp(), torch.randn(4, 16))
    partition = build_partition(aten)
    InsertMasksPass("float")(partition.boundary)
    graph = partition.boundary.graph
    back = next(n for n in graph.nodes if n.op == "call_function" and n.target.__name__ == "unmask")
    back.replace_all_uses_with(back.args[0])
    graph.erase_node(back)
    with pytest.raises(LeakError, match="without passing through unmask"):
        audit(partition.boundary, "float")


def test_private_parameter_stays_in_enclave_and_is_refused_on_gpu():
    private = ("0.weight",)
    aten = labelled_graph(mlp(), torch.randn(4, 16), private)
    first = node(aten, torch.ops.aten.addmm.default)
    assert first.meta[SIDE] == "enclave" and "private parameter" in first.meta["secure_split.reason"]
    finish(aten, private=private)
    first.meta[SIDE] = GPU  # a mislabelled partition: the audit must catch it without trusting labels
    with pytest.raises(LeakError, match=r"private parameter|invariant 3"):
        finish(aten, private=private)


def test_boundary_ops_refuse_to_run_outside_the_runtime():
    aten = labelled_graph(mlp(), torch.randn(4, 16))
    partition = finish(aten)
    with pytest.raises(RuntimeError, match="outside the secure_split runtime"):
        fx.Interpreter(partition.boundary).run(torch.randn(4, 16))


def test_talaria_audit_refuses_a_weight_in_the_enclave():
    aten = labelled_graph(mlp(), torch.randn(4, 16), policy="talaria")
    partition = finish(aten, "remo", policy="talaria")
    assert [s.side for s in partition.stages] == ["gpu", "enclave", "gpu"]  # both linears masked on the GPU
    node(aten, torch.ops.aten.addmm.default).meta[SIDE] = "enclave"  # mislabelled: a weight kept by the enclave
    with pytest.raises(LeakError, match=r"talaria: stage\d+_enclave holds weight\(s\) \['0\.(weight|bias)'\]"):
        finish(aten, "remo", policy="talaria")


class Heads(torch.nn.Module):
    """A projection, then a transpose: affine, but it moves values across rows."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.nn.functional.gelu(self.proj(x).transpose(0, 1))


def test_remo_audit_refuses_a_gpu_op_that_is_not_row_wise():
    torch.manual_seed(0)
    aten = labelled_graph(Heads().eval(), torch.randn(4, 16), masking="remo")
    transpose = node(aten, torch.ops.aten.transpose.int)
    assert transpose.meta[SIDE] == "enclave" and "row-wise" in transpose.meta["secure_split.reason"]
    finish(aten, "float")  # with float masks a transpose may run on the GPU
    transpose.meta[SIDE] = GPU
    finish(aten, "float")
    with pytest.raises(LeakError, match=r"transpose.*not a row-wise map.*invariant 2"):
        finish(aten, "remo")
