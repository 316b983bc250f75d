"""Row-wise stages: what ReMO's factored masks need from a GPU stage.

A ReMO mask is M = P · Q: P (rows × m) secret and fresh per call, Q (m × d) public. The GPU removes nothing;
the enclave subtracts L(M) = P · L(Q), with R = L(Q) computed once by the weight owner. That factorisation holds
when the stage's linear part acts on every row of its input (a vector along the last dimension, leading
dimensions flattened) with the same map: linear layers, scaling by a per-feature vector, adding constants, and
views that only regroup the leading dimensions. Head splits, transposes and batched products do not.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .label import ENCLAVE, GPU, SCALE_OPS, SUM_OPS, AffineOperatorSupport, ReasonedSupport, _set, packet
from .meta import SIDE, TAINT
from .taint import PRIVATE, PUBLIC

aten = torch.ops.aten

ROW_VIEWS = {aten.view, aten._unsafe_view, aten.reshape, aten.clone, aten.alias, aten.detach, aten.squeeze,
             aten.unsqueeze, aten.flatten}  # fmt: skip
ROW_PRODUCTS = {aten.mm: 0, aten.addmm: 1, aten.matmul: 0, aten.linear: 0}  # op -> position of the rows operand


def rowwise(node: fx.Node) -> tuple[bool, str]:
    """(ok, reason): whether a private GPU node maps each row of its private inputs by one shared linear map."""
    op = packet(node)
    name = str(op or node.target)
    private = [n for n in node.all_input_nodes if n.meta[TAINT] == PRIVATE]
    out = _shape(node)
    if op in ROW_VIEWS:
        same = bool(out) and out[-1] == _shape(private[0])[-1] and math.prod(out) == math.prod(_shape(private[0]))
        return same, f"{name}: {'regroups rows' if same else 'moves values across rows'}"
    if op in ROW_PRODUCTS:
        weight = [n for n in node.all_input_nodes if n.meta[TAINT] == PUBLIC and len(_shape(n)) == 2]
        ok = node.args[ROW_PRODUCTS[op]] is private[0] and len(private) == 1 and bool(weight)
        return ok, f"{name}: {'rows times a weight matrix' if ok else 'not a product of rows by one matrix'}"
    if op is aten.neg:
        return True, "neg"
    if op in SUM_OPS | SCALE_OPS and op not in (aten.cat, aten.stack):
        if any(_shape(p) != out for p in private):
            return False, f"{name}: a private operand is broadcast across rows"
        scales = [n for n in node.all_input_nodes if n.meta[TAINT] == PUBLIC] if op in SCALE_OPS else []
        per_feature = all(math.prod(_shape(s)) == (_shape(s) or (1,))[-1] for s in scales)
        return per_feature, f"{name}: {'per-feature' if per_feature else 'per-row'} public operand"
    if op in (aten.cat, aten.split, aten.split_with_sizes, aten.chunk):
        dim = node.args[1 if op is aten.cat else 2] if len(node.args) > (1 if op is aten.cat else 2) else 0
        rank = len(_shape(private[0]))
        ok = dim in (-1, rank - 1) and (op is not aten.cat or all(_shape(p)[:-1] == out[:-1] for p in private))
        return ok, f"{name}: {'along features' if ok else 'across rows'}"
    return False, f"{name}: not a row-wise map"


class RowwiseSupport(AffineOperatorSupport):
    """Affine in the masked inputs (AffineOperatorSupport) and row-wise: what remo masking can run on the GPU."""

    def check(self, node: fx.Node) -> tuple[bool, str]:
        ok, reason = super().check(node)
        return rowwise(node) if ok else (ok, reason)


class RemoRowwise(ReasonedSupport):
    """Supports row-wise private ops (`rowwise`); as a labelling rule for ReMO masking, a private GPU op it does
    not support stays in the enclave."""

    def check(self, node: fx.Node) -> tuple[bool, str]:
        return rowwise(node) if node.meta[TAINT] == PRIVATE else (True, "holds no user data")

    def __call__(self, nodes: list[fx.Node]) -> bool:
        """Demote the GPU ops that are not row-wise; True when a label changed."""
        on_gpu = [n for n in nodes if n.op == "call_function" and n.meta[SIDE] == GPU and n.meta[TAINT] == PRIVATE]
        demoted = [n for n in on_gpu if not self.is_node_supported({}, n)]
        for node in demoted:
            _set(node, ENCLAVE, f"remo masking needs row-wise GPU ops ({self.reasons[node.name]})")
        return bool(demoted)


def _shape(node: fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()
