"""Pass lists under torch's PassManager: per-policy lists, the graph logged after each pass, a pass's own error
raised as it is, and pre/postconditions that name the pass and what is missing."""

import logging

import pytest
import torch
from fx_graphs import Mlp, aten_graph
from torch.fx.passes.infra.pass_base import PassBase

from secure_split.compile import label_passes
from secure_split.config import SplitConfig
from secure_split.partitioner.stages import build_partition
from secure_split.passes.fold_public import FoldPublicPass
from secure_split.passes.infra import PassConditionError, run_passes
from secure_split.passes.insert_masks import InsertMasksPass, mask
from secure_split.passes.label import LabelPass
from secure_split.passes.meta import SIDE
from secure_split.passes.ring_lower import RingLowerPass
from secure_split.passes.taint import TaintPass


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({}, ["TaintPass", "FoldPublicPass", "LabelPass"]),
        ({"policy": "auto"}, ["TaintPass", "FoldPublicPass", "MinCutLabelPass"]),
        ({"policy": "cmif"}, ["TaintPass", "FoldPublicPass", "CmifLabelPass"]),
        ({"policy": "talaria"},
         ["TaintPass", "FoldPublicPass", "SeparateWeightsPass", "FoldNormScalePass", "TalariaLabelPass"]),
    ],
)  # fmt: skip
def test_each_policy_is_a_list_of_passes(config, names):
    assert [type(p).__name__ for p in label_passes(SplitConfig(**config))] == names


def test_declared_public_inputs_reach_the_taint_pass():
    taint = label_passes(SplitConfig(), frozenset({"arg1_1"}))[0]
    assert taint.input_taints == {"arg1_1": "public"}


def test_the_graph_is_logged_after_each_pass(caplog):
    gm = aten_graph(Mlp(), torch.randn(3, 4))
    with caplog.at_level(logging.DEBUG, logger="secure_split"):
        labelled = run_passes([TaintPass(), FoldPublicPass(), LabelPass()], gm)
    assert labelled is gm and all(SIDE in n.meta for n in gm.graph.nodes)
    logged = [r.getMessage() for r in caplog.records if r.name == "secure_split"]
    assert [m.split(":")[0] for m in logged] == ["after TaintPass", "after FoldPublicPass", "after LabelPass"]
    assert all("torch.ops.aten.addmm.default" in m for m in logged)


class Refusing(PassBase):
    def call(self, graph_module):
        raise NotImplementedError("policy='talaria': cannot place it")


def test_a_pass_error_is_raised_as_it_is_with_a_note_naming_the_pass():
    with pytest.raises(NotImplementedError, match="cannot place it") as raised:
        run_passes([TaintPass(), Refusing()], aten_graph(Mlp(), torch.randn(3, 4)))
    (note,) = raised.value.__notes__  # PassManager's own words, which name the pass and the ones before it
    assert "'Refusing' pass" in note and "['TaintPass']" in note


def test_a_broken_precondition_names_the_pass_and_what_is_missing():
    gm = aten_graph(Mlp(), torch.randn(3, 4))
    with pytest.raises(PassConditionError, match=r"^LabelPass: needs every node tainted \(TaintPass\): no "
                                                 r"'secure_split.taint' on arg0_1, _param_constant0, t, "):  # fmt: skip
        run_passes([LabelPass()], gm)


def boundary():
    gm = aten_graph(Mlp(), torch.randn(3, 4))
    return build_partition(run_passes([TaintPass(), FoldPublicPass(), LabelPass()], gm))


def test_mask_insertion_needs_a_boundary_graph_and_masks_every_gpu_input():
    partition = boundary()
    with pytest.raises(PassConditionError, match="InsertMasksPass: needs a boundary graph that calls stage"):
        InsertMasksPass("ring")(partition.labelled)
    call = next(n for n in partition.boundary.graph.nodes if n.op == "call_module")
    del call.meta[SIDE]
    with pytest.raises(PassConditionError, match=f"InsertMasksPass: needs the side of every stage call: .*{call.name}"):
        InsertMasksPass("ring")(partition.boundary)
    call.meta[SIDE] = "enclave"
    run_passes([InsertMasksPass("ring")], partition.boundary)
    gpu_calls = [n for n in partition.boundary.graph.nodes if n.op == "call_module" and n.meta[SIDE] == "gpu"]
    assert gpu_calls and all(v.target is mask for c in gpu_calls for v in c.all_input_nodes)
    with pytest.raises(PassConditionError, match="InsertMasksPass: masks already in"):
        InsertMasksPass("ring")(partition.boundary)


def test_the_ring_lowering_takes_one_stage_not_the_boundary():
    partition = boundary()
    with pytest.raises(PassConditionError, match="RingLowerPass: needs a stage graph, not a boundary graph"):
        RingLowerPass(16, 100.0)(partition.boundary)
    stage = partition.stage_module(next(s for s in partition.stages if s.side == "gpu"))
    lowered = run_passes([RingLowerPass(16, 100.0)], stage)
    assert lowered is not stage and lowered.meta["ring_frac_bits"]

