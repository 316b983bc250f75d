"""Runs GPU stages on masked inputs. Holds only the stages' public weights, on its own device."""

from __future__ import annotations

import copy

import torch
from torch import fx


class GpuExecutor:
    """The untrusted worker: a named set of stage modules, moved once to `device`."""

    def __init__(self, stages: dict[str, fx.GraphModule], device: torch.device) -> None:
        self.device = device
        self.stages = {name: _on_device(module, device) for name, module in stages.items()}

    @torch.inference_mode()
    def run(self, name: str, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(self.stages[name](*inputs))


def _on_device(module: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    if device.type == "cpu":
        return module
    return copy.deepcopy(module).to(device)


class WorkerError(RuntimeError):
    """A remote GPU worker failed a request; `retryable` when a new attempt may succeed (unreachable, too slow)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
