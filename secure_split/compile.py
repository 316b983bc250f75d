"""The compiler pipeline: capture → taint → label → stages → masks → audit, logging the graph at each step."""

from __future__ import annotations

import logging

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase

import secure_split.runtime.ring_kernels  # noqa: F401  registers torch.ops.secure_split.ring_product for the passes
from secure_split.partitioner.min_cut import MinCutLabelPass
from secure_split.partitioner.stages import PartitionResult, build_partition
from secure_split.passes.capture import argument_name
from secure_split.passes.fold_norm_scale import FoldNormScalePass
from secure_split.passes.fold_public import FoldPublicPass
from secure_split.passes.infra import run_passes
from secure_split.passes.insert_masks import InsertMasksPass
from secure_split.passes.label import LabelPass
from secure_split.passes.label_cmif import PROTECTION as CMIF_PROTECTION
from secure_split.passes.label_cmif import CmifLabelPass
from secure_split.passes.label_talaria import TalariaLabelPass
from secure_split.passes.leak_audit import audit
from secure_split.passes.meta import REASON, SIDE, SOURCE
from secure_split.passes.ring_lower import RingHeadroom, RingLowerPass
from secure_split.passes.rowwise import RemoRowwise
from secure_split.passes.taint import PUBLIC, TaintPass
from secure_split.passes.weight_ops import SeparateWeightsPass

from .artifact import SplitArtifact, token_positions
from .config import SplitConfig
from .program import SplitProgram

log = logging.getLogger("secure_split")


def compile_graph(captured: fx.GraphModule, config: SplitConfig) -> SplitProgram:
    """Split one captured graph (`passes.capture_export` or `passes.capture_dynamo`: static shapes, user inputs
    as placeholders, model state as constants) into an audited `SplitProgram`."""
    partition = build_partition(label_graph(captured, config))
    protection = CMIF_PROTECTION if config.sanitizes_tokens else None
    run_passes([InsertMasksPass(config.masking, protection)], partition.boundary)
    public = declared_public(partition.labelled, config)
    verdict = audit(partition.boundary, config.masking, config.private, config.policy, partition.labelled, public)
    if config.masking == "ring":
        _lower_to_ring(partition, config)
    tokens = token_positions(partition) if config.sanitizes_tokens else []
    program = SplitProgram(SplitArtifact.compiled(partition, config, tokens, verdict))
    if config.plaintext and program.artifact.cuts:
        log.warning("secure_split: masking='none': activations cross to the GPU in plaintext (baseline only)")
    if log.isEnabledFor(logging.INFO):  # a report walks the whole graph: build it only to print it
        log.info("%s", program.report())
    return program


def _lower_to_ring(partition: PartitionResult, config: SplitConfig) -> None:
    """Replace every (audited) GPU stage by its exact Z_2^64 version."""
    lower = RingLowerPass(config.frac_bits, config.activation_bound, config.ring_kernel)
    for spec in partition.stages:
        if spec.side == "gpu":
            lowered = run_passes([lower], partition.stage_module(spec))
            partition.boundary.add_submodule(spec.module_name, lowered)


def label_graph(aten: fx.GraphModule, config: SplitConfig) -> fx.GraphModule:
    """Taint, fold and label a captured graph: every node tagged enclave or gpu (in place; returned)."""
    _log("captured ATen graph", aten)
    labelled = run_passes(label_passes(config, declared_public(aten, config)), aten)
    _log_labels(labelled)
    return labelled


def label_passes(config: SplitConfig, public_inputs: frozenset[str] = frozenset()) -> list[PassBase]:
    """The policy's pass list, from a captured graph to a labelled one: taint (`public_inputs` name the graph
    inputs declared public), fold public values, under talaria separate the weights from the ops they are fused
    with and fold norm scales, then the policy's label pass."""
    passes: list[PassBase] = [TaintPass(config.private, dict.fromkeys(public_inputs, PUBLIC)), FoldPublicPass()]
    if config.policy == "talaria":
        passes += [SeparateWeightsPass(), FoldNormScalePass()]
    # Ring and remo keys are fixed per call before it runs: a public value computed at run time (a random
    # draw) is made in the enclave and sent as it is, not recomputed by a GPU stage.
    options = dict(min_gpu_flops=config.min_gpu_flops, public_on_gpu=config.masking in ("float", "none"),
                   rules=_masking_rules(config))  # fmt: skip
    if config.policy == "auto":  # ring: float32 crosses as int64
        return [*passes, MinCutLabelPass(config.cost, 2.0 if config.masking == "ring" else 1.0, **options)]
    return [*passes, LABEL_PASSES.get(config.policy, LabelPass)(**options)]


LABEL_PASSES = {"cmif": CmifLabelPass, "talaria": TalariaLabelPass}


def declared_public(gm: fx.GraphModule, config: SplitConfig) -> frozenset[str]:
    """The names of the graph inputs the user declared public (`SplitConfig.public_inputs`)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return frozenset(n.name for n in inputs if argument_name(n.meta.get(SOURCE, "")) in config.public_inputs)


def _masking_rules(config: SplitConfig) -> list:
    """What the masking scheme itself cannot put on the GPU (e.g. ring overflow, remo's row-wise stages)."""
    if config.masking == "ring":
        return [RingHeadroom(config.frac_bits, config.activation_bound)]
    return [RemoRowwise()] if config.masking == "remo" else []


def _log(title: str, gm: fx.GraphModule) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s:\n%s", title, gm.print_readable(print_output=False))


def _log_labels(gm: fx.GraphModule) -> None:
    if log.isEnabledFor(logging.DEBUG):
        rows = [f"  {n.name:<32} {n.meta[SIDE] or '-':<8} {n.meta[REASON]}" for n in gm.graph.nodes if SIDE in n.meta]
        log.debug("labelled graph:\n%s", "\n".join(rows))
