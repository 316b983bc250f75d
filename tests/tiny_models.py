"""The tiny models (`secure_split.tiny`), and a split-and-trace helper for the tests."""

from __future__ import annotations

import torch
from torch import fx

from secure_split.compile import label_graph
from secure_split.config import SplitConfig
from secure_split.passes.capture_dynamo import capture_dynamo, classify_inputs
from secure_split.tiny import CONFIGS, DECODERS, VOCAB, tiny_inputs, tiny_model

__all__ = ["CONFIGS", "DECODERS", "VOCAB", "TokenMlp", "labelled_graph", "split_and_trace", "tiny_inputs", "tiny_model"]


class TokenMlp(torch.nn.Module):
    """Embedding, then two linear layers around a ReLU: two GPU stages, and a bundle export several times
    quicker than a tiny BERT's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(input_ids))))


def split_and_trace(name: str, **config):
    """Split a tiny model, run it once under `trace_boundary()`; returns (program, trace, args, kwargs)."""
    import secure_split

    model = tiny_model(name)
    args, kwargs = tiny_inputs(name)
    program = secure_split.split(model, args, kwargs, secure_split.SplitConfig(**config))
    with secure_split.trace_boundary() as trace:
        program(*args, **kwargs)
    return program, trace, args, kwargs


def labelled_graph(model: torch.nn.Module, x: torch.Tensor, private=(), **config) -> fx.GraphModule:
    """`model` captured on `x` and labelled under `SplitConfig(private=private, **config)`."""
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, list(example_inputs), classify_inputs(gm, example_inputs)))
        return gm

    torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(x)
    gm, inputs, specs = captured[0]  # Dynamo drops the placeholders' sources once the backend returns
    return label_graph(capture_dynamo(gm, specs, inputs), SplitConfig(private=private, **config))
