"""The partition report: what runs where, what crosses, and how it is protected."""

from __future__ import annotations

import math
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secure_split.enclave_runtime.masking import MIN_SIGNIFICANT_BITS, RingMasking

from .draw import SplitGraph, draw_report

if TYPE_CHECKING:
    from secure_split.enclave_runtime.keys import KeyProvider
    from secure_split.enclave_runtime.masking import MaskingScheme
    from secure_split.enclave_runtime.sanitizer import TokenSanitizer

    from .artifact import SplitArtifact


@dataclass
class PartitionReport:
    """Counts per call of one split program. `str()` is a table; `to_dict()` is JSON-ready."""

    policy: str
    masking: str
    device: str
    enclave_nodes: int
    gpu_nodes: int
    stages: int
    round_trips: int
    cuts: int
    bytes_to_gpu: int
    bytes_to_enclave: int
    enclave_flops: int
    gpu_flops: int
    enclave_flop_share: float
    protection: dict[str, int]
    kept_in_enclave: dict[str, int]
    calls: int
    keys_from_pool: int  # calls whose masks and unmask terms were precomputed
    keys_made_online: int  # calls that found the pool empty and made theirs on the spot
    pool_size: int  # calls the pool holds keys for now
    pool_bytes_per_call: int  # masks + unmask terms of one call
    verify_error_bits: float | None  # a wrong GPU answer passes a call's checks with probability ≤ 2^-this
    remo_unmasked_share: float | None  # remo: share of the coordinates sent that cross unmasked (rank < width)
    sanitizer: str | None = None  # cmif: the token sanitizer's mechanism
    epsilon: float | None = None  # cmif: its ε per token (inf: tokens are not sanitized)
    tokens_replaced: int | None = None  # cmif: tokens the sanitizer changed so far, of
    tokens_sanitized: int | None = None  # cmif: the non-special tokens it has seen
    # ring: cut name -> the fewest significant bits its values kept so far, where below MIN_SIGNIFICANT_BITS
    precision_lost: dict[str, float] = field(default_factory=dict)
    cut_table: list[dict[str, Any]] = field(default_factory=list)
    audit: str = ""  # what the leak audit proved of this split
    graph: SplitGraph | None = field(default=None, repr=False, compare=False)  # for draw(); not serialised

    def to_dict(self) -> dict[str, Any]:
        return {f.name: deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "graph"}

    def draw(self, path: str | Path) -> Path:
        """Render the split graph to `path` (.svg or .png): enclave and GPU lanes, cuts labelled with bytes."""
        return draw_report(self, path)

    def __str__(self) -> str:
        rows = [
            ("policy / masking", f"{self.policy} / {self.masking}"),
            ("GPU stages run on", self.device),
            ("nodes: enclave / gpu", f"{self.enclave_nodes} / {self.gpu_nodes}"),
            ("stages / round trips", f"{self.stages} / {self.round_trips}"),
            ("cuts (tensors crossing)", str(self.cuts)),
            ("bytes to GPU / to enclave", f"{self.bytes_to_gpu:,} / {self.bytes_to_enclave:,}"),
            ("FLOPs: enclave / gpu", f"{self.enclave_flops:,} / {self.gpu_flops:,}"),
            ("enclave FLOP share", f"{self.enclave_flop_share:.2%}"),
            ("protection of cuts", ", ".join(f"{k}: {v}" for k, v in sorted(self.protection.items()))),
            ("calls: keys from pool / online", f"{self.calls}: {self.keys_from_pool} / {self.keys_made_online}"),
            ("pool: calls ready / bytes per call", f"{self.pool_size} / {self.pool_bytes_per_call:,}"),
            ("remo: share of values sent unmasked", "n/a" if self.remo_unmasked_share is None
             else f"{self.remo_unmasked_share:.2%}"),
            ("integrity check (Freivalds)", "off" if self.verify_error_bits is None
             else f"on: a wrong answer passes with p <= 2^-{self.verify_error_bits:.1f} per call"),
            ("token sanitizer (cmif)", "n/a" if self.sanitizer is None
             else f"{self.sanitizer}, ε = {self.epsilon:g} per token; replaced {self.tokens_replaced:,} of "
                  f"{self.tokens_sanitized:,} tokens so far"),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        lines = ["secure_split partition report", "-" * (width + 40)]
        lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
        if self.audit:
            lines.append(self.audit)
        if self.kept_in_enclave:
            lines.append("private ops kept in the enclave, by reason:")
            lines += [f"  {n:4d}  {reason}" for reason, n in sorted(self.kept_in_enclave.items(), key=lambda x: -x[1])]
        if "none" in self.protection:
            lines.append("WARNING: masking='none': activations cross to the GPU in plaintext")
        if self.precision_lost:
            lines.append(f"WARNING: values kept fewer than {MIN_SIGNIFICANT_BITS} significant bits in fixed point "
                         f"(raise frac_bits): {', '.join(sorted(self.precision_lost))}")  # fmt: skip
        if self.epsilon is not None and math.isinf(self.epsilon):
            lines.append("WARNING: cmif with epsilon=inf: tokens are not sanitized, their embeddings cross as they are")
        return "\n".join(lines)


def build_report(
    artifact: SplitArtifact,
    keys: KeyProvider | None,
    masking: MaskingScheme,
    sanitizer: TokenSanitizer | None,
    calls: int,
    device: str,
) -> PartitionReport:
    """The artifact's compile-time counts, with a program's counters so far: its calls, the pool (`keys`), ring
    precision (`masking`) and cmif's token replacements (`sanitizer`)."""
    counts = artifact.counts
    cut_list = artifact.cuts
    total = counts.enclave_flops + counts.gpu_flops
    return PartitionReport(
        policy=artifact.config.policy,
        masking=artifact.config.masking,
        device=device,
        enclave_nodes=counts.enclave_nodes,
        gpu_nodes=counts.gpu_nodes,
        stages=len(artifact.stages),
        round_trips=len(artifact.gpu_stages),
        cuts=len(cut_list),
        bytes_to_gpu=sum(c.nbytes for c in cut_list if c.direction == "to_gpu"),
        bytes_to_enclave=sum(c.nbytes for c in cut_list if c.direction == "to_enclave"),
        enclave_flops=counts.enclave_flops,
        gpu_flops=counts.gpu_flops,
        enclave_flop_share=counts.enclave_flops / total if total else 1.0,
        protection=dict(Counter(c.protection for c in cut_list)),
        kept_in_enclave=dict(counts.kept_in_enclave),
        calls=calls,
        keys_from_pool=keys.pool_calls if keys is not None else 0,
        keys_made_online=keys.online_calls if keys is not None else 0,
        pool_size=len(keys.pool) if keys is not None else 0,
        verify_error_bits=keys.verify_error_bits if keys is not None else None,
        remo_unmasked_share=keys.remo.unmasked_share if keys is not None and keys.remo is not None else None,
        precision_lost=dict(masking.precision_lost) if isinstance(masking, RingMasking) else {},
        **_sanitizer_fields(sanitizer),
        pool_bytes_per_call=keys.bytes_per_call if keys is not None else 0,
        cut_table=[
            {"index": c.index, "direction": c.direction, "stage": c.stage, "name": c.name,
             "protection": c.protection, "shape": list(c.shape), "dtype": str(c.dtype), "bytes": c.nbytes}
            for c in cut_list
        ],
        graph=artifact.graph,
        audit=artifact.verdict,
    )


def _sanitizer_fields(sanitizer: TokenSanitizer | None) -> dict[str, Any]:
    if sanitizer is None:
        return {}
    return {"sanitizer": sanitizer.mechanism, "epsilon": sanitizer.epsilon,
            "tokens_replaced": getattr(sanitizer, "tokens_replaced", 0),
            "tokens_sanitized": getattr(sanitizer, "tokens_seen", 0)}  # fmt: skip
