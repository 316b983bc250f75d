"""Labelling on hand-made graphs: which single ops may run on the GPU on masked inputs and why (the operator
supports), and the label pass, which only annotates."""

import re

import pytest
import torch
from fx_graphs import Mlp, Weights, aten_graph, op, ops
from torch.fx.passes.operator_support import OperatorSupportBase, chain, create_op_support

from secure_split.passes.infra import GraphChangedError, PassConditionError
from secure_split.passes.label import ENCLAVE, GPU, AffineOperatorSupport, LabelPass
from secure_split.passes.meta import REASON, SIDE
from secure_split.passes.rowwise import RemoRowwise, RowwiseSupport
from secure_split.passes.taint import TaintPass

aten = torch.ops.aten


class Mixed(Weights):
    def forward(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor):
        a = x @ self.w  # a private value times a public weight
        scores = x @ y.t()  # two private values
        scaled = a * self.v  # by a public vector
        square = a * scores  # two private values
        inverse = self.v / x  # by a private value
        return torch.relu(a), scaled, square, inverse, ids.view(-1)


def mixed(private_globs=()):
    gm = aten_graph(Mixed(), torch.randn(4, 4), torch.randn(4, 4), torch.arange(3))
    TaintPass(private_globs)(gm)
    return gm


def test_affine_support_decides_each_op_and_says_why():
    gm = mixed()
    support = AffineOperatorSupport()
    product, scores = ops(gm, aten.mm.default)
    scaled, square = ops(gm, aten.mul.Tensor)
    cases = [
        (product, True, r"aten.mm: linear in the masked input, public weight"),
        (scores, False, r"aten.mm with 2 private operands \(e.g. attention scores\)"),
        (op(gm, aten.t.default), True, r"aten.t: linear view/reduction"),
        (scaled, True, r"aten.mul: scaling by a public value"),
        (square, False, r"aten.mul of two private values"),
        (op(gm, aten.div.Tensor), False, r"aten.div by a private value"),
        (op(gm, aten.relu.default), False, r"aten.relu: not affine in its input"),
        (op(gm, aten.view.default), False, r"aten.view reads a torch.int64 value, which cannot be masked additively"),
    ]
    for node, ok, reason in cases:
        decided, why = support.check(node)
        assert decided is ok and re.fullmatch(reason, why), (node.name, why)
        assert support.is_node_supported(dict(gm.named_modules()), node) is ok
        assert support.reasons[node.name] == why


def test_an_op_on_a_private_weight_is_never_supported():
    gm = mixed(private_globs=("w",))
    product = ops(gm, aten.mm.default)[0]
    assert AffineOperatorSupport().check(product) == (False, "touches a private parameter")


def test_the_supports_are_torch_operator_supports():
    gm = mixed()
    support = AffineOperatorSupport()
    assert isinstance(support, OperatorSupportBase) and isinstance(RemoRowwise(), OperatorSupportBase)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert not support.is_node_supported({}, inputs[0]) and support.reasons[inputs[0].name] == "placeholder: not an op"
    no_products = chain(support, create_op_support(lambda _, n: n.target is not aten.mm.default))
    scaled, product = ops(gm, aten.mul.Tensor)[0], ops(gm, aten.mm.default)[0]
    assert no_products.is_node_supported({}, scaled) and not no_products.is_node_supported({}, product)


def test_remo_needs_row_wise_ops_and_demotes_the_others():
    gm = mixed()
    transpose, scaled = op(gm, aten.t.default), ops(gm, aten.mul.Tensor)[0]
    assert AffineOperatorSupport().check(transpose)[0]
    assert RowwiseSupport().check(transpose) == (False, "aten.t: not a row-wise map")
    assert RowwiseSupport().check(scaled) == (True, "aten.mul: per-feature public operand")
    for node in (transpose, scaled):
        node.meta[SIDE] = GPU
    rule = RemoRowwise()
    assert rule([transpose, scaled]) and not rule([transpose, scaled])  # a second sweep changes nothing
    assert transpose.meta[SIDE] == ENCLAVE and transpose.meta[REASON] == (
        "remo masking needs row-wise GPU ops (aten.t: not a row-wise map)")  # fmt: skip
    assert scaled.meta[SIDE] == GPU and rule.reasons[scaled.name] == "aten.mul: per-feature public operand"


def labelled_mlp(label_pass):
    gm = aten_graph(Mlp(), torch.randn(3, 4))
    TaintPass()(gm)
    label_pass(gm)
    return gm


def test_label_pass_puts_products_on_the_gpu_and_non_linear_ops_in_the_enclave():
    gm = labelled_mlp(LabelPass())
    assert [n.meta[SIDE] for n in ops(gm, aten.addmm.default)] == [GPU, GPU]
    assert op(gm, aten.relu.default).meta[SIDE] == ENCLAVE
    assert all(n.meta[SIDE] == ENCLAVE for n in gm.graph.nodes if n.op in ("placeholder", "output"))
    assert all(n.meta[REASON] for n in gm.graph.nodes)


def test_label_pass_needs_taints_and_labels_every_op():
    with pytest.raises(PassConditionError, match=r"LabelPass: needs every node tainted \(TaintPass\): no "):
        LabelPass()(aten_graph(Mlp(), torch.randn(3, 4)))

    class Forgetful(LabelPass):
        def call(self, graph_module):
            result = super().call(graph_module)
            del op(graph_module, aten.relu.default).meta[SIDE]
            return result

    with pytest.raises(PassConditionError, match=r"Forgetful: every op gets a side and a reason; none for \['relu'\]"):
        labelled_mlp(Forgetful())


def test_a_label_pass_that_changes_the_graph_is_refused():
    class Rewriting(LabelPass):
        def call(self, graph_module):
            result = super().call(graph_module)
            op(graph_module, aten.relu.default).target = aten.gelu.default  # e.g. a "fix-up" while labelling
            return result

    with pytest.raises(GraphChangedError, match=r"Rewriting may only annotate nodes, but it changed node relu "):
        labelled_mlp(Rewriting())
