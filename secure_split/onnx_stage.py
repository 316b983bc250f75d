"""One stage of a split bundle, run by onnxruntime and called like the fx stage it was exported from."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from secure_split.runtime.onnx_session import CPU, CUDA, numpy_feeds, onnxruntime_gpu_providers, open_session

log = logging.getLogger("secure_split")


def gpu_providers(requested: list[str] | None) -> list[str]:
    """The providers GPU stages ask for: `requested`, else CUDA when onnxruntime has it, else the CPU (logged)."""
    if requested:
        return list(requested)
    if onnxruntime_gpu_providers() == [CUDA] and torch.cuda.is_available():
        return [CUDA]
    log.info("secure_split: no CUDA execution provider (onnxruntime-gpu and a GPU); GPU stages run on the CPU")
    return [CPU]


class OnnxStage(torch.nn.Module):
    """A stage file with its own onnxruntime session, opened on first use on exactly `providers`.

    A GPU stage that asks for CUDA refuses to start if onnxruntime would run it, or any of its nodes, elsewhere:
    no silent fallback to the CPU."""

    def __init__(self, path: Path, providers: list[str], input_names: list[str]) -> None:
        super().__init__()
        self.path = path
        self.input_names = input_names
        self.providers = providers
        self._session = None

    def open(self):
        """The onnxruntime session, opened on first use."""
        if self._session is None:
            self._session = open_session(self.path, self.providers)
        return self._session

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        used = {i.name for i in self.open().get_inputs()}
        outputs = self.open().run(None, numpy_feeds(self.input_names, inputs, used))
        return tuple(torch.from_numpy(out) for out in outputs)
