"""The tiny models (`secure_split.tiny`), and a split-and-trace helper for the tests."""

from __future__ import annotations

from secure_split.tiny import CONFIGS, DECODERS, VOCAB, tiny_inputs, tiny_model

__all__ = ["CONFIGS", "DECODERS", "VOCAB", "split_and_trace", "tiny_inputs", "tiny_model"]


def split_and_trace(name: str, **config):
    """Split a tiny model, run it once under `trace_boundary()`; returns (program, trace, args, kwargs)."""
    import secure_split

    model = tiny_model(name)
    args, kwargs = tiny_inputs(name)
    program = secure_split.split(model, args, kwargs, secure_split.SplitConfig(**config))
    with secure_split.trace_boundary() as trace:
        program(*args, **kwargs)
    return program, trace, args, kwargs
