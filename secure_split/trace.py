"""`trace_boundary()`: record every tensor that crosses between enclave and GPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from secure_split.runtime.channel import Crossing, observe


class BoundaryTrace:
    """The crossings seen while tracing, in order. Iterate it, index it, or filter by direction."""

    def __init__(self) -> None:
        self.records: list[Crossing] = []

    def __iter__(self) -> Iterator[Crossing]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Crossing:
        return self.records[i]

    def to_gpu(self) -> list[Crossing]:
        return [r for r in self.records if r.direction == "to_gpu"]

    def to_enclave(self) -> list[Crossing]:
        return [r for r in self.records if r.direction == "to_enclave"]

    @property
    def bytes(self) -> int:
        return sum(r.tensor.numel() * r.tensor.element_size() for r in self.records)


@contextmanager
def trace_boundary() -> Iterator[BoundaryTrace]:
    """`with trace_boundary() as trace:` — each record has direction, stage, name and a CPU copy of the tensor."""
    trace = BoundaryTrace()
    with observe(trace.records.append):
        yield trace
