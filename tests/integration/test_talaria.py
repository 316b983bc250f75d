"""Talaria with ReMO masks: no weight in the enclave, outputs equal eager, and what remo leaves unmasked."""

import pytest
import torch
import transformers

import secure_split
from secure_split import SplitConfig
from secure_split.passes.label_talaria import reads_weight
from secure_split.passes.meta import CUT, SIDE
from secure_split.tiny import CONFIGS, tiny_inputs

TOLERANCE = dict(atol=5e-3, rtol=1e-3)  # float masks of std 100 (measured: max |Δ| ≤ 1.1e-3)


def tiny_lm(name: str) -> torch.nn.Module:
    """Decoders with their LM head (talaria must run it on the GPU too); BERT as an encoder."""
    torch.manual_seed(0)
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(CONFIGS[name]()).eval()


def first_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_talaria_matches_eager_with_every_weight_on_the_gpu(name):
    model = tiny_lm(name)
    args, kwargs = tiny_inputs(name)
    program = secure_split.split(model, args, kwargs, SplitConfig(policy="talaria"))
    with secure_split.trace_boundary() as trace:
        out = first_output(program(*args, **kwargs))
    with torch.no_grad():
        torch.testing.assert_close(out, first_output(model(*args, **kwargs)), **TOLERANCE)
    assert program.parameter_names("enclave") == []
    on_gpu = set(program.parameter_names("gpu"))
    named = dict(model.named_parameters(remove_duplicate=False))
    assert {id(p) for n, p in named.items() if n in on_gpu} == {id(p) for p in model.parameters()}
    report = program.report()
    assert report.masking == "remo" and set(report.protection) == {"remo"}
    assert report.remo_unmasked_share == 0.0
    scales = [n for n in program.artifact.labelled.graph.nodes
              if n.op == "call_function" and n.target == torch.ops.aten.mul.Tensor and reads_weight(n)]  # fmt: skip
    if name == "bert":  # post-LN: the residual reads the scaled value too, so γ stays an element-wise GPU op
        assert len(scales) == 5 and all(n.meta[SIDE] == "gpu" for n in scales)
    else:  # pre-norm: every norm scale is folded into the weights of the projections that read it
        assert scales == []
    for record in trace.to_gpu():  # every value is masked: a Gaussian mask of std 100 is never exactly 0 or 1
        assert (record.tensor == 0).float().mean() < 1e-3 and (record.tensor == 1).float().mean() < 1e-3
        assert record.tensor.std() > 20, record.name


def test_the_embedding_runs_on_the_gpu_as_a_masked_one_hot_product():
    model = tiny_lm("gpt2")
    args, kwargs = tiny_inputs("gpt2")
    program = secure_split.split(model, args, kwargs, SplitConfig(policy="talaria", masking="none"))
    with secure_split.trace_boundary() as trace:
        program(*args, **kwargs)
    first = trace.to_gpu()[0].tensor.reshape(-1, model.config.vocab_size)  # what remo hides: one-hot rows
    torch.testing.assert_close(first.argmax(-1), args[0].flatten())
    assert torch.equal(first.sum(-1), torch.ones(args[0].numel()))


def test_remo_unmask_terms_equal_the_stage_on_the_mask():
    """P·R, with R = f(Q) - f(0) from the GPU, is L(P·Q) = f(P·Q) - f(0), which the enclave could not compute."""
    model = tiny_lm("llama")
    args, kwargs = tiny_inputs("llama")  # 32 rows, width 64: each basis needs two GPU runs
    program = secure_split.split(model, args, kwargs, SplitConfig(policy="talaria"))
    masks, terms = program.keys.remo.draw()
    for call in program.keys.gpu_calls:
        stage = program.artifact.boundary.get_submodule(str(call.target))
        held = [masks[a.name] for a in call.args]
        zeros = [a.meta[CUT].zeros() for a in call.args]
        for term, on_mask, at_zero in zip(terms[call.name], stage(*held), stage(*zeros), strict=True):
            torch.testing.assert_close(term, on_mask - at_zero, atol=2e-3, rtol=1e-4)


def test_remo_below_full_rank_leaves_the_complement_of_the_basis_in_the_clear():
    model = tiny_lm("gpt2")
    args, kwargs = tiny_inputs("gpt2")
    rank = 16
    program = secure_split.split(model, args, kwargs, SplitConfig(policy="talaria", remo_rank=rank))
    with secure_split.trace_boundary() as trace:
        out = first_output(program(*args, **kwargs))
    with torch.no_grad():
        torch.testing.assert_close(out, first_output(model(*args, **kwargs)), **TOLERANCE)
    first_mask = next(iter(program.keys.remo.cuts))
    basis = program.keys.remo.bases[first_mask]
    assert basis.shape == (rank, model.config.vocab_size)
    sent = trace.to_gpu()[0].tensor.double().reshape(-1, basis.shape[1])
    one_hot = torch.nn.functional.one_hot(args[0].flatten(), model.config.vocab_size).double()
    complement = torch.eye(basis.shape[1], dtype=torch.float64) - basis.T @ basis
    torch.testing.assert_close(sent @ complement, one_hot @ complement, atol=1e-4, rtol=0)  # in the clear
    assert ((sent - one_hot) @ basis.T).abs().mean() > 20  # masked inside the span
    assert (sent @ complement).argmax(-1).eq(args[0].flatten()).float().mean() > 0.9  # the tokens show
    assert 0 < program.report().remo_unmasked_share < 1


def test_remo_keys_come_from_the_pool_and_are_fresh_per_call():
    model = tiny_lm("bert")
    args, kwargs = tiny_inputs("bert")
    config = SplitConfig(policy="talaria", precompute=3, pool_empty="raise")
    program = secure_split.split(model, args, kwargs, config)  # its capture call takes one entry
    assert len(program.keys.pool) == 2
    sent = []
    for _ in range(2):
        with secure_split.trace_boundary() as trace:
            out = program(*args, **kwargs).last_hidden_state
        sent.append(trace.to_gpu()[0].tensor)
        with torch.no_grad():
            torch.testing.assert_close(out, model(*args, **kwargs).last_hidden_state, **TOLERANCE)
    assert not torch.allclose(sent[0], sent[1], atol=1.0)
    with pytest.raises(secure_split.PoolEmptyError):
        program(*args, **kwargs)


def test_secureinfer_with_remo_masks_keeps_only_row_wise_work_on_the_gpu():
    model = tiny_lm("llama")
    args, kwargs = tiny_inputs("llama")
    program = secure_split.split(model, args, kwargs, SplitConfig(masking="remo"))
    with torch.no_grad():
        torch.testing.assert_close(first_output(program(*args, **kwargs)), first_output(model(*args, **kwargs)),
                                   **TOLERANCE)  # fmt: skip
    report = program.report()
    assert report.policy == "secureinfer" and set(report.protection) == {"remo"}
    assert any(reason.startswith("remo masking needs row-wise GPU ops") for reason in report.kept_in_enclave)


class WeightAsThreshold(torch.nn.Module):
    """A weight used non-linearly: no enclave-free, mask-compatible placement exists."""

    def __init__(self) -> None:
        super().__init__()
        self.floor = torch.nn.Parameter(torch.zeros(8))
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(torch.maximum(x, self.floor))


class Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [(WeightAsThreshold(), (2, 8), "not affine in its input"), (Conv(), (2, 4, 8), "holds no weight")],
)
def test_talaria_refuses_a_weight_it_can_place_nowhere(model, shape, match):
    with pytest.raises(NotImplementedError, match=match):
        secure_split.split(model.eval(), torch.randn(*shape), config=SplitConfig(policy="talaria"))
