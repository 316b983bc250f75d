"""The one channel every crossing between enclave and GPU passes through, with observers for tracing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Crossing:
    """One tensor crossing the boundary; `tensor` is a CPU copy of exactly what crossed."""

    direction: str  # "to_gpu" or "to_enclave"
    stage: int
    name: str
    tensor: torch.Tensor


Observer = Callable[[Crossing], None]
_observers: list[Observer] = []


@contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Call `observer` for every crossing while the context is open."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


class Channel:
    """In-process transport between the enclave (CPU) and the GPU stages' device; counts bytes both ways."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes_to_gpu = 0
        self.bytes_to_enclave = 0

    def to_gpu(self, stage: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_to_gpu += tensor.numel() * tensor.element_size()
        self._notify("to_gpu", stage, name, tensor)
        return tensor.to(self.device, non_blocking=False)

    def to_enclave(self, stage: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_to_enclave += tensor.numel() * tensor.element_size()
        received = tensor.to("cpu")
        self._notify("to_enclave", stage, name, received)
        return received

    def _notify(self, direction: str, stage: int, name: str, tensor: torch.Tensor) -> None:
        if _observers:
            record = Crossing(direction, stage, name, tensor.detach().to("cpu", copy=True))
            for observer in list(_observers):
                observer(record)
