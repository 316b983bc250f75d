"""Mask insertion: a `mask` op on every enclave→GPU edge and an `unmask` op on every GPU→enclave edge.

The pass rewrites the boundary graph (the one that calls the stage submodules). Each `mask`/`unmask` node
carries the `Cut` it implements in `node.meta`; the runtime gives them their meaning. A value read by several
GPU stages is masked (and crosses) once.

`mask` and `unmask` are the ops `torch.ops.secure_split.mask` and `.unmask`, registered here: the runtime
interprets them by identity (`node.target is mask`); run as they are, they raise, and on fake tensors they
give a value like their input.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .infra import require, require_meta
from .label import GPU
from .meta import CUT, SIDE, STAGE, TAINT
from .ring import wire_dtype
from .taint import PUBLIC

MASKED = ("ring", "float", "remo")


@dataclass(frozen=True)
class Cut:
    """One edge of the boundary: which value crosses, which way, and how it is protected."""

    index: int
    direction: str  # "to_gpu" or "to_enclave"
    stage: int  # the GPU stage on this edge
    name: str
    protection: str  # the masking scheme, "none", or "public" (a value that holds no user data)
    shape: tuple[int, ...]
    dtype: torch.dtype  # on the wire (ring: int64)
    stride: tuple[int, ...]  # the layout the stages were traced with

    @property
    def masked(self) -> bool:
        """Whether a one-time mask hides the value (not public, plaintext or ε-DP only)."""
        return self.protection in MASKED

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def empty(self) -> torch.Tensor:
        """An uninitialised tensor in the traced layout (contiguous if that layout overlaps itself)."""
        if not _non_overlapping(self.shape, self.stride):
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype)

    def zeros(self) -> torch.Tensor:
        """Zeros in the traced layout: the mask-free input f(0) is evaluated on, or a stage's example input."""
        return self.empty().zero_()


def _non_overlapping(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    dims = sorted((st, sz) for sz, st in zip(shape, stride, strict=True) if sz > 1)
    reach = 1
    for st, sz in dims:
        if st < reach:
            return False
        reach = st * sz
    return True


def _boundary_op(name: str, doc: str) -> torch._ops.OpOverloadPacket:
    """Register `torch.ops.secure_split.<name>(Tensor value) -> Tensor`, which only the runtime gives a meaning."""

    def outside_the_runtime(value: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"secure_split {name} op executed outside the secure_split runtime")

    outside_the_runtime.__doc__ = doc
    op = torch.library.custom_op(f"secure_split::{name}", outside_the_runtime, mutates_args=())
    op.register_fake(torch.empty_like)
    return getattr(torch.ops.secure_split, name)


mask = _boundary_op("mask", "Boundary op: hide `value` and send it to the GPU.")
unmask = _boundary_op("unmask", "Boundary op: bring a GPU result back to the enclave and remove its mask.")


def cuts(boundary: fx.GraphModule) -> list[Cut]:
    return [n.meta[CUT] for n in boundary.graph.nodes if CUT in n.meta]


class InsertMasksPass(PassBase):
    """Inserts the boundary ops into a boundary graph built by `partitioner.stages.build_partition`."""

    def __init__(self, masking: str, protection: str | None = None) -> None:
        """`protection` names what protects private values when it is not `masking` (e.g. CMIF's ε-DP)."""
        super().__init__()
        self.masking = masking
        self.protection = protection or masking

    def requires(self, graph_module: fx.GraphModule) -> None:
        """A boundary graph (`build_partition`): stage calls with their side and stage, read by index."""
        calls = [n for n in graph_module.graph.nodes if n.op == "call_module"]
        require(self, bool(calls), "needs a boundary graph that calls stage submodules (build_partition)")
        require_meta(self, calls, SIDE, "needs the side of every stage call")
        require_meta(self, calls, STAGE, "needs the stage index of every stage call")
        values = {v for c in calls if c.meta[SIDE] == GPU for v in c.all_input_nodes}
        values |= {u for c in calls if c.meta[SIDE] == GPU for u in c.users}
        require_meta(self, values, "val", "needs the value (meta 'val') of every GPU stage input and output")
        require_meta(self, values, TAINT, "needs the taint of every GPU stage input and output")
        require(self, not any(n.target in (mask, unmask) for n in graph_module.graph.nodes), "masks already in")

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """Every GPU stage input is a `mask` node and every boundary op carries its cut."""
        calls = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.meta[SIDE] == GPU]
        bare = [v.name for c in calls for v in c.all_input_nodes if v.target is not mask]
        require(self, not bare, f"GPU stage inputs {bare} are not masked")
        ops = [n for n in graph_module.graph.nodes if n.target in (mask, unmask)]
        require_meta(self, ops, CUT, "every mask and unmask carries its cut")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        masked: dict[fx.Node, fx.Node] = {}
        count = 0
        for call in [n for n in graph.nodes if n.op == "call_module" and n.meta[SIDE] == GPU]:
            stage = call.meta[STAGE]
            for value in call.all_input_nodes:
                if value not in masked:
                    with graph.inserting_after(value):
                        masked[value] = graph.call_function(mask, (value,))
                    masked[value].meta.update({"val": value.meta["val"], TAINT: value.meta[TAINT]})
                    masked[value].meta[CUT] = self._cut(count, "to_gpu", stage, value)
                    count += 1
                call.replace_input_with(value, masked[value])
            for item in [u for u in call.users if u.target is operator.getitem]:
                with graph.inserting_after(item):
                    back = graph.call_function(unmask, (item,))
                item.replace_all_uses_with(back, delete_user_cb=lambda user, b=back: user is not b)
                back.meta[CUT] = self._cut(count, "to_enclave", stage, item)
                back.meta.update({"val": item.meta["val"], TAINT: item.meta[TAINT]})
                count += 1
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, count > 0)

    def _cut(self, index: int, direction: str, stage: int, value: fx.Node) -> Cut:
        val = value.meta["val"]
        protection = "public" if value.meta[TAINT] == PUBLIC else self.protection
        shape, stride = tuple(int(s) for s in val.shape), tuple(int(s) for s in val.stride())
        return Cut(index, direction, stage, value.name, protection, shape, wire_dtype(self.masking, val.dtype), stride)
