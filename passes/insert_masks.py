"""Mask insertion: a `mask` op on every enclave→GPU edge and an `unmask` op on every GPU→enclave edge.

The pass rewrites the boundary graph (the one that calls the stage submodules). Each `mask`/`unmask` node
carries the `Cut` it implements in `node.meta`; the runtime gives them their meaning. A value read by several
GPU stages is masked (and crosses) once.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from secure_split.enclave_runtime.masking import wire_dtype

from .label import GPU
from .meta import CUT, SIDE, STAGE, TAINT
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


def _non_overlapping(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    dims = sorted((st, sz) for sz, st in zip(shape, stride, strict=True) if sz > 1)
    reach = 1
    for st, sz in dims:
        if st < reach:
            return False
        reach = st * sz
    return True


def mask(value: torch.Tensor) -> torch.Tensor:
    """Boundary op: hide `value` and send it to the GPU. Only the secure_split runtime executes it."""
    raise RuntimeError("secure_split mask op executed outside the secure_split runtime")


def unmask(value: torch.Tensor) -> torch.Tensor:
    """Boundary op: bring a GPU result back to the enclave and remove its mask."""
    raise RuntimeError("secure_split unmask op executed outside the secure_split runtime")


def cuts(boundary: fx.GraphModule) -> list[Cut]:
    return [n.meta[CUT] for n in boundary.graph.nodes if CUT in n.meta]


class InsertMasksPass(PassBase):
    """Inserts the boundary ops into a boundary graph built by `partitioner.stages.build_partition`."""

    def __init__(self, masking: str, protection: str | None = None) -> None:
        """`protection` names what protects private values when it is not `masking` (e.g. CMIF's ε-DP)."""
        super().__init__()
        self.masking = masking
        self.protection = protection or masking

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
