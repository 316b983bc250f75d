"""What crosses the boundary: under masks, nothing the GPU sees resembles a real activation."""

import pytest
import torch
from tiny_models import split_and_trace
from torch import fx

import secure_split


def eager_activations(program, args) -> list[torch.Tensor]:
    """Every floating-point value the captured graph computes on these inputs, in plaintext."""
    values = []

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1:
                    values.append(t.detach().reshape(-1).double())
            return out

    with torch.no_grad():
        Recorder(program.artifact.labelled).run(*args)
    return values


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


def crossings(name, masking):
    program, trace, args, kwargs = split_and_trace(name, masking=masking)
    inputs = [kwargs["attention_mask"] if "attention_mask" in n else args[0] for n in program.artifact.input_sources]
    assert len(inputs) == 2
    return trace, eager_activations(program, inputs)


@pytest.mark.parametrize("masking", ["float", "ring"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_masked_crossings_hide_activations(name, masking):
    trace, activations = crossings(name, masking)
    assert trace.to_gpu()
    for record in trace.to_gpu():
        sent = record.tensor.reshape(-1).double()
        if masking == "ring":  # as the GPU would read it: fixed point with 16 fractional bits
            sent = sent / 2**16
        for act in activations:
            if act.numel() != sent.numel():
                continue
            assert not torch.allclose(sent, act, atol=1e-2, rtol=1e-2), record.name
            assert abs(correlation(sent, act)) < 0.1, (record.name, correlation(sent, act))


def test_unmasked_baseline_shows_activations():
    """The same check sees through masking='none': the GPU receives real activations verbatim."""
    trace, activations = crossings("llama", "none")
    hits = 0
    for record in trace.to_gpu():
        sent = record.tensor.reshape(-1).double()
        hits += any(act.numel() == sent.numel() and torch.allclose(sent, act) for act in activations)
    assert hits == len(trace.to_gpu())


def test_trace_records_are_copies_of_what_crossed():
    _, trace, _, _ = split_and_trace("bert")
    assert {r.direction for r in trace} == {"to_gpu", "to_enclave"}
    for record in trace:
        assert record.tensor.device.type == "cpu" and isinstance(record.stage, int) and record.name
    with secure_split.trace_boundary() as outer:
        pass
    assert len(outer) == 0, "nothing crosses when nothing runs"
