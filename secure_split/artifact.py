"""`SplitArtifact`: what compilation produces, frozen: the boundary graph and every fact about it that the report,
a drawing, a bundle and the trusted executor need.

Built once by the compiler (`SplitArtifact.compiled`), or rebuilt from a bundle manifest (`bundle_codec`): both
give the same report counts, drawing and parameter names, since both hold the same compile-time facts.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from secure_split.partitioner.stages import PartitionResult, StageSpec
from secure_split.passes.flops import node_flops
from secure_split.passes.insert_masks import Cut, cuts
from secure_split.passes.label import GPU, is_getitem
from secure_split.passes.label_cmif import token_inputs
from secure_split.passes.meta import REASON, RING_BITS, SIDE, SOURCE, STAGE, TAINT, WEIGHTS
from secure_split.passes.taint import PRIVATE

from .config import SplitConfig
from .draw import SplitGraph, extract_graph

SIDES = ("enclave", "gpu")


@dataclass(frozen=True)
class CompiledCounts:
    """The report's counts that compilation fixes: nodes and FLOPs per side, private ops kept and why."""

    enclave_nodes: int
    gpu_nodes: int
    enclave_flops: int
    gpu_flops: int
    kept_in_enclave: dict[str, int]

    @classmethod
    def of(cls, labelled: fx.GraphModule) -> CompiledCounts:
        nodes = [n for n in labelled.graph.nodes if n.op == "call_function" and not is_getitem(n)]
        sides = Counter(n.meta[SIDE] for n in nodes)
        flops: Counter[str] = Counter()
        for node in nodes:
            flops[node.meta[SIDE]] += node_flops(node)
        kept = Counter(n.meta[REASON] for n in nodes if n.meta[SIDE] == "enclave" and n.meta[TAINT] == PRIVATE)
        return cls(sides["enclave"], sides["gpu"], flops["enclave"], flops["gpu"], dict(kept))


@dataclass(frozen=True)
class StageFacts:
    """What compilation knows of one stage beyond its spec."""

    parameters: tuple[str, ...]  # the model parameters it holds (sorted)
    ring_bits: tuple[int, ...] | None  # ring masking, GPU stages: each output's fractional bits
    identity: str  # sha256 of its code (and, on the GPU side, its public constants), or of its bundle file


@dataclass(frozen=True)
class SplitArtifact:
    """One model graph split into enclave and GPU stages with masks at every cut, audited; nothing of a call.

    `boundary` calls one submodule per stage (fx stages after compilation, onnxruntime stages from a bundle)
    and holds a `mask`/`unmask` node per cut. `facts` has each stage's `StageFacts`, by module name. `labelled`,
    the ATen graph every node of which is tagged with its side, is kept by compilation only (a bundle is
    written from it) and is None in a loaded artifact."""

    config: SplitConfig
    boundary: fx.GraphModule
    stages: tuple[StageSpec, ...]
    input_sources: tuple[str, ...]  # where each graph input came from: "args[0]", "attention_mask", ...
    token_inputs: tuple[int, ...]  # cmif: the inputs that are token ids of the word embedding
    counts: CompiledCounts
    facts: dict[str, StageFacts]
    graph: SplitGraph
    verdict: str  # the leak audit's
    labelled: fx.GraphModule | None = None

    @classmethod
    def compiled(
        cls, partition: PartitionResult, config: SplitConfig, token_inputs: list[int], verdict: str
    ) -> SplitArtifact:
        labelled = partition.labelled
        sources = tuple(n.meta[SOURCE] for n in labelled.graph.nodes if n.op == "placeholder")
        facts = {spec.module_name: _stage_facts(partition, spec) for spec in partition.stages}
        return cls(config, partition.boundary, tuple(partition.stages), sources, tuple(token_inputs),
                   CompiledCounts.of(labelled), facts, extract_graph(labelled, partition.boundary), verdict,
                   labelled)  # fmt: skip

    @property
    def cuts(self) -> list[Cut]:
        return cuts(self.boundary)

    @property
    def gpu_stages(self) -> list[StageSpec]:
        return [s for s in self.stages if s.side == GPU]

    def stage_module(self, spec: StageSpec) -> Any:
        return self.boundary.get_submodule(spec.module_name)

    def parameter_names(self, side: str) -> list[str]:
        """The model parameters (`nn.Parameter`s, not buffers) whose values `side` ("enclave" or "gpu") holds.

        A side holds a weight it reads, or a public value computed from it (e.g. Wᵀ, which names W). Sorted."""
        if side not in SIDES:
            raise ValueError(f"side must be 'enclave' or 'gpu', got {side!r}")
        held = (self.facts[spec.module_name].parameters for spec in self.stages if spec.side == side)
        return sorted({name for names in held for name in names})

    def fingerprint(self) -> bytes:
        """What a sealed key pool is bound to: the boundary, its cuts, and every stage's identity."""
        digest = hashlib.sha256(repr(self.cuts).encode() + self.boundary.code.encode())
        for spec in self.stages:
            digest.update(self.facts[spec.module_name].identity.encode())
        return digest.digest()


def _stage_facts(partition: PartitionResult, spec: StageSpec) -> StageFacts:
    stage = partition.stage_module(spec)
    identity = hashlib.sha256(stage.code.encode())
    if spec.side == GPU:
        for name, buffer in stage.named_buffers():
            identity.update(name.encode() + buffer.contiguous().view(torch.uint8).numpy().tobytes())
    bits = stage.meta.get(RING_BITS)
    parameters = stage_parameters(partition.labelled, spec.index)
    return StageFacts(parameters, None if bits is None else tuple(bits), identity.hexdigest())


def stage_parameters(labelled: fx.GraphModule, stage: int) -> tuple[str, ...]:
    """The parameters read by the nodes of one stage (through the constants derived from them). Sorted."""
    names = {name for node in stage_constants(labelled, stage) for name in node.meta.get(WEIGHTS, ())}
    return tuple(sorted(names))


def stage_constants(labelled: fx.GraphModule, stage: int) -> list[fx.Node]:
    """The constants (get_attr nodes of the labelled graph) that one stage's nodes read."""
    return [n for n in labelled.graph.nodes
            if n.op == "get_attr" and any(u.meta.get(STAGE) == stage for u in n.users)]  # fmt: skip


def token_positions(partition: PartitionResult) -> list[int]:
    """Which flat graph inputs are token ids (CMIF sanitizes them before anything reads them)."""
    placeholders = [n.name for n in partition.boundary.graph.nodes if n.op == "placeholder"]
    tokens = {n.name for n in token_inputs(partition.labelled)}
    return [i for i, name in enumerate(placeholders) if name in tokens]
