"""Lowering for ONNX export: stages rewritten into ops that mean the same in onnxruntime, on any provider.

- Ring products use the float64 limb kernel with the public operand's limb count fixed at compile time: exact,
  a static graph, and float64 GEMMs (onnxruntime's CUDA provider has no int64 MatMul; on its CPU provider
  int64 MatMul is far slower than float64 GEMMs). The op's kernel is made of plain tensor ops
  (CompositeImplicitAutograd), so the export traces the limb products themselves: no ONNX translation needed.
- Fused attention is written out. torch's CPU attention kernels return zeros for a query row whose mask is
  -inf everywhere (e.g. the padded positions of a left-padded batch); ONNX's translation of the fused op
  computes softmax(-inf, ..., -inf) = NaN there, and the NaN then reaches every position through attention·V.
  Written out as matmul, softmax and a guard on such rows, the stage means the same in both runtimes.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .infra import require
from .ring import ring_product_op

aten = torch.ops.aten
FUSED = {aten._scaled_dot_product_flash_attention_for_cpu.default, aten.scaled_dot_product_attention.default}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v, with zeros for a query whose every key is masked (as torch's kernels)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    dead = torch.isneginf(scores.amax(-1, keepdim=True))
    probs = torch.softmax(torch.where(dead, torch.zeros_like(scores), scores), -1)
    out = torch.matmul(torch.where(dead, torch.zeros_like(probs), probs), v)
    return out.transpose(1, 2).contiguous().transpose(1, 2)  # the fused kernels' layout: heads inside tokens


class PortableAttentionPass(PassBase):
    """Replaces fused attention nodes by a call to `attention` (dropout must be 0: inference only)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        changed = False
        for node in list(graph_module.graph.nodes):
            if node.op == "call_function" and node.target in FUSED:
                _replace(graph_module.graph, node)
                changed = True
        if changed:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, changed)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        fused = [n.name for n in graph_module.graph.nodes if n.op == "call_function" and n.target in FUSED]
        require(self, not fused, f"fused attention left: {fused}")


class LimbProductsPass(PassBase):
    """Switches every ring product to the limb kernel (its public limb count was fixed by the ring lowering)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        products = _ring_products(graph_module)
        for node in products:
            op, a, b, public, _, limbs = node.args
            node.args = (op, a, b, public, "limbs", limbs)
        if products:
            graph_module.recompile()
        return PassResult(graph_module, bool(products))

    def ensures(self, graph_module: fx.GraphModule) -> None:
        other = [n.name for n in _ring_products(graph_module) if n.args[4] != "limbs" or n.args[5] is None]
        require(self, not other, f"ring products not on the limb kernel with a fixed limb count: {other}")


def _ring_products(gm: fx.GraphModule) -> list[fx.Node]:
    op = ring_product_op()
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def portable(stage: fx.GraphModule) -> fx.GraphModule:
    """A copy of `stage` (sharing its constants) lowered for ONNX export."""
    copied = fx.GraphModule(stage, copy.deepcopy(stage.graph), stage.__class__.__name__)
    for lowering in (PortableAttentionPass(), LimbProductsPass()):
        copied = lowering(copied).graph_module
    return copied


def _replace(graph: fx.Graph, node: fx.Node) -> None:
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
    if bound.get("dropout_p") or bound.get("enable_gqa"):
        raise NotImplementedError(f"{node.name}: attention with dropout or grouped heads is not written out")
    kwargs = {"attn_mask": bound.get("attn_mask"), "is_causal": bound.get("is_causal", False),
              "scale": bound.get("scale")}  # fmt: skip
    with graph.inserting_before(node):
        out = graph.call_function(attention, (bound["query"], bound["key"], bound["value"]), kwargs)
    if node.target is aten.scaled_dot_product_attention.default:
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
    else:  # the fused CPU kernel returns (output, logsumexp); only the output may be read
        for user in list(node.users):
            if user.target is not operator.getitem or user.args[1] != 0:
                raise NotImplementedError(f"{node.name}: its logsumexp output is read; cannot write it out")
            out.meta.update(user.meta)
            user.replace_all_uses_with(out)
            graph.erase_node(user)
    graph.erase_node(node)
