"""The ops the passes emit without importing a runtime: the ring product (its kernel is the GPU side's) and the
boundary ops mask/unmask (only the runtime gives them a meaning)."""

import pytest
import torch
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import secure_split.runtime.ring_kernels as kernels
from secure_split.passes import ring
from secure_split.passes.insert_masks import mask, unmask


def test_the_ring_product_is_one_registered_op_that_passes_and_runtime_share():
    assert ring.ring_product_op() is kernels.ring_product is torch.ops.secure_split.ring_product
    assert ring.LIMB_BITS == kernels.LIMB_BITS and ring.LIMBS == kernels.LIMBS  # the meaning of public_limbs


def test_the_ring_product_traces_into_its_limb_products_without_reading_a_value():
    a = torch.randint(-(2**62), 2**62, (3, 5))
    w = torch.randint(-(2**20), 2**20, (5, 2))
    limbs = ring.signed_limbs_needed(w)
    traced = make_fx(lambda a, w: kernels.ring_product("mm", a, w, 1, "limbs", limbs), tracing_mode="fake")(a, w)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.mm.default in targets and not any("secure_split" in str(t) for t in targets)
    assert sum(n.target is torch.ops.aten.mm.default for n in traced.graph.nodes) == 4 + 3  # i + j < 4, j < 2
    assert torch.equal(traced(a, w), a @ w)


def test_the_ring_product_of_floats_has_a_gradient():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 2, dtype=torch.float64)
    kernels.ring_product("mm", x, w, 1, "auto", 1).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(1).expand(3, 5))


@pytest.mark.parametrize("boundary_op", [mask, unmask])
def test_boundary_ops_raise_when_run_and_keep_their_value_shape_when_traced(boundary_op):
    assert boundary_op is getattr(torch.ops.secure_split, boundary_op.__name__)
    with pytest.raises(RuntimeError, match=f"secure_split {boundary_op.__name__} op executed outside the"):
        boundary_op(torch.ones(2))
    with FakeTensorMode():
        out = boundary_op(torch.empty(2, 3, dtype=torch.float64))
    assert out.shape == (2, 3) and out.dtype == torch.float64
