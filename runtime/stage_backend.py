"""Where GPU stages run, and the one way values reach them: `StageBackend`.

A backend holds the GPU stages under their names: fx stages moved once to a torch device (in process),
onnxruntime sessions (`OnnxStage`, a bundle's) or a remote worker's stages (`RemoteStage`, KServe v2 / Triton).
Whatever they are, every value sent, run and received goes through the backend's `Channel`, which counts the
bytes and shows each crossing to `trace_boundary()` observers. Holds only the stages' public weights."""

from __future__ import annotations

import copy

import torch

from .channel import Channel


class StageBackend:
    """The GPU side of a split as the enclave sees it: stage modules by name, and the channel to them."""

    def __init__(self, stages: dict[str, torch.nn.Module], device: torch.device) -> None:
        self.device = device
        self.stages = {name: _on_device(module, device) for name, module in stages.items()}
        self.channel = Channel(device)

    def send(self, stage: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` (already masked or public) as the GPU holds it."""
        return self.channel.to_gpu(stage, name, value)

    @torch.inference_mode()
    def run(self, name: str, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One stage call on values the GPU holds; the results stay there until `receive`d."""
        return tuple(self.stages[name](*inputs))

    def receive(self, stage: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """A GPU result, as the enclave holds it (on the CPU)."""
        return self.channel.to_enclave(stage, name, value)


def _on_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if device.type == "cpu":
        return module
    return copy.deepcopy(module).to(device)


class WorkerError(RuntimeError):
    """A remote GPU worker failed a request; `retryable` when a new attempt may succeed (unreachable, too slow)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
