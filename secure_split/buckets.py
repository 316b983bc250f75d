"""Shape buckets: a split made for one shape serves every smaller one, its inputs zero-padded up to the bucket
(the padding hidden by the attention mask, padded alike) and its outputs cut back. Bundles pad their inputs to
the smallest exported bucket; generation pads the enclave's KV cache to a multiple of its bucket size."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def round_up(length: int, bucket: int) -> int:
    """The bucket `length` falls in: the next multiple of `bucket`."""
    return -(-length // bucket) * bucket


def pad_to(value: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`value` zero-padded at the end of each dimension up to `shape`, laid out contiguously (as a traced split
    expects its inputs)."""
    if tuple(value.shape) == tuple(shape):
        return value.contiguous()
    out = value.new_zeros(tuple(shape))
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out
