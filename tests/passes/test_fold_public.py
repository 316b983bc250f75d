"""FoldPublicPass on a hand-made graph: values computed from weights alone become constants where private work
reads them; private values, secret ones and random draws stay computed."""

import pytest
import torch
from fx_graphs import Weights, aten_graph, op, ops

from secure_split.passes.fold_public import FoldPublicPass
from secure_split.passes.infra import PassConditionError
from secure_split.passes.meta import PARAM_NAMES, PRIVATE_PARAM, TAINT
from secure_split.passes.taint import PRIVATE, PUBLIC, TaintPass

aten = torch.ops.aten


class Folding(Weights):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w.t() * 2  # public: the same on every call
        noise = torch.rand_like(self.v)  # public, but drawn afresh on every call
        return (x @ w) * self.v + noise


def folded(private_globs=()):
    module, x = Folding(), torch.randn(3, 4)
    gm = aten_graph(module, x)
    torch.manual_seed(0)
    expected = gm(x)
    TaintPass(private_globs)(gm)
    result = FoldPublicPass()(gm)
    torch.manual_seed(0)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    return module, gm, result


def test_a_public_chain_folds_into_one_constant_that_the_private_product_reads():
    module, gm, result = folded()
    assert result.modified
    assert not ops(gm, aten.t.default) and not [n for n in ops(gm, aten.mul.Tensor) if n.args[1] == 2]
    product = op(gm, aten.mm.default)
    x, weight = product.args
    assert x.op == "placeholder" and weight.op == "get_attr" and weight.target.startswith("folded_")
    torch.testing.assert_close(getattr(gm, weight.target), module.w.detach().t() * 2)
    assert weight.meta[TAINT] == PUBLIC and weight.meta[PARAM_NAMES] == ("w",) and not weight.meta[PRIVATE_PARAM]
    assert all(n.meta[TAINT] == PRIVATE for n in (product, *product.users))


def test_random_draws_and_private_values_stay_computed():
    _, gm, _ = folded()
    (draw,) = [n for n in ops(gm) if n.target.overloadpacket is aten.rand_like]
    assert draw.meta[TAINT] == PUBLIC  # public, but not a constant
    assert [n.target for n in ops(gm) if n.meta[TAINT] == PRIVATE] == [aten.mm.default, aten.mul.Tensor,
                                                                       aten.add.Tensor]  # fmt: skip


def test_values_computed_from_a_private_weight_are_not_folded():
    _, gm, _ = folded(private_globs=("w",))
    assert op(gm, aten.t.default).meta[TAINT] == "secret"
    assert op(gm, aten.mm.default).args[1].op == "call_function"


def test_nothing_to_fold_leaves_the_graph_as_it_was():
    gm = aten_graph(torch.nn.ReLU(), torch.randn(3, 4))
    TaintPass()(gm)
    code = gm.code
    assert not FoldPublicPass()(gm).modified and gm.code == code


def test_folding_needs_a_tainted_graph():
    gm = aten_graph(Folding(), torch.randn(3, 4))
    with pytest.raises(PassConditionError, match=r"FoldPublicPass: needs every node tainted \(TaintPass\)"):
        FoldPublicPass()(gm)
