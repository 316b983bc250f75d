"""TaintPass on a hand-made graph: user data is private, weights public (secret when listed private), and each
value takes the strongest taint of what it is computed from, data first."""

import pytest
import torch
from fx_graphs import Weights, aten_graph, op, placeholders

from secure_split.passes.infra import GraphChangedError, PassConditionError, graph_signature
from secure_split.passes.meta import PARAM_NAMES, PRIVATE_PARAM, TAINT
from secure_split.passes.taint import PRIVATE, PUBLIC, SECRET, TaintPass

aten = torch.ops.aten


class Scaled(Weights):
    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        scale = self.v * 2  # weights only
        y = x @ self.w  # user data times a weight
        return y * scale + bias.neg()


def tainted(**options):
    gm = aten_graph(Scaled(), torch.randn(3, 4), torch.randn(3, 4))
    TaintPass(**options)(gm)
    return gm


def taints(gm):
    return {n.name: n.meta[TAINT] for n in gm.graph.nodes}


def scale_of(gm):
    """v * 2, the value computed from a weight alone."""
    return next(n for n in gm.graph.nodes if n.target is aten.mul.Tensor and n.args[1] == 2)


def test_user_inputs_are_private_weights_public_and_data_dominates():
    gm = tainted()
    x, bias = placeholders(gm)
    assert x.meta[TAINT] == bias.meta[TAINT] == PRIVATE
    assert all(n.meta[TAINT] == PUBLIC and not n.meta[PRIVATE_PARAM] for n in gm.graph.nodes if n.op == "get_attr")
    assert scale_of(gm).meta[TAINT] == PUBLIC
    assert op(gm, aten.mm.default).meta[TAINT] == PRIVATE
    assert op(gm, aten.neg.default).meta[TAINT] == PRIVATE
    assert op(gm, aten.add.Tensor).meta[TAINT] == PRIVATE
    assert set(taints(gm).values()) == {PRIVATE, PUBLIC}


def test_a_weight_matching_a_private_glob_is_secret_and_so_is_what_it_alone_computes():
    gm = tainted(private_globs=("v",))
    weights = {n.meta[PARAM_NAMES][0]: n for n in gm.graph.nodes if n.op == "get_attr"}
    assert weights["v"].meta[TAINT] == SECRET and weights["v"].meta[PRIVATE_PARAM]
    assert weights["w"].meta[TAINT] == PUBLIC and not weights["w"].meta[PRIVATE_PARAM]
    scale = scale_of(gm)
    assert scale.meta[TAINT] == SECRET
    (product,) = scale.users  # y * scale: user data and a secret weight
    assert product.meta[TAINT] == PRIVATE


def test_an_input_declared_public_taints_only_what_it_alone_computes():
    names = [n.name for n in placeholders(aten_graph(Scaled(), torch.randn(3, 4), torch.randn(3, 4)))]
    gm = tainted(input_taints={names[1]: PUBLIC})
    assert [n.meta[TAINT] for n in placeholders(gm)] == [PRIVATE, PUBLIC]
    assert op(gm, aten.neg.default).meta[TAINT] == PUBLIC
    assert op(gm, aten.add.Tensor).meta[TAINT] == PRIVATE


def test_taint_pass_annotates_only_and_refuses_unknown_inputs():
    gm = aten_graph(Scaled(), torch.randn(3, 4), torch.randn(3, 4))
    before = graph_signature(gm)
    result = TaintPass()(gm)
    assert not result.modified and graph_signature(gm) == before
    with pytest.raises(PassConditionError, match=r"TaintPass: input_taints names \['mask'\]"):
        TaintPass(input_taints={"mask": PUBLIC})(gm)


def test_a_taint_pass_that_edits_the_graph_is_refused():
    class Editing(TaintPass):
        def call(self, graph_module):
            node = op(graph_module, aten.neg.default)
            node.target = aten.relu.default
            return super().call(graph_module)

    with pytest.raises(GraphChangedError, match=r"Editing may only annotate nodes, but it changed node neg"):
        Editing()(aten_graph(Scaled(), torch.randn(3, 4), torch.randn(3, 4)))
