"""What may reach the GPU besides masked activations: model state, caller scalars, seeds, cmif's side inputs."""

import logging

import pytest
import torch
import transformers
from tiny_models import tiny_inputs, tiny_model

import secure_split
from secure_split import SplitConfig, SplitGenerator
from secure_split.passes.capture import StateError
from secure_split.passes.label_cmif import CmifInputError
from secure_split.passes.leak_audit import LeakError
from secure_split.tiny import CONFIGS

RING_PLAINTEXT = 2.0**40  # a ring-encoded plaintext stays far below this; a one-time pad almost never does


def masked(tensor: torch.Tensor) -> bool:
    return (tensor.abs() >= RING_PLAINTEXT).double().mean().item() > 0.99


class WritesBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("prev", torch.zeros(2, 8))

    def forward(self, x):
        y = self.lin(x + self.prev)
        self.prev.copy_(x)
        return y


class StashesAcrossABreak(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        self.stash = x * 2
        torch._dynamo.graph_break()
        return self.lin(self.stash)


class ScalesBy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, secret: float):
        return self.lin(x * secret)


def test_a_buffer_written_from_the_input_is_refused():
    with pytest.raises(StateError, match=r"\['prev'\]"):
        secure_split.split(WritesBuffer(), (torch.randn(2, 8),))


def test_state_stashed_on_self_across_a_graph_break_is_read_per_call_and_masked():
    model = StashesAcrossABreak()
    compiled = torch.compile(model, backend="secure_split")  # no fullgraph: the break splits the forward
    for _ in range(2):  # the second call must not see the first call's stash
        x = torch.randn(2, 8)
        with torch.no_grad(), secure_split.trace_boundary() as trace:
            out = compiled(x)
        torch.testing.assert_close(out, model.lin(x * 2))
        assert trace.to_gpu() and all(masked(r.tensor) for r in trace.to_gpu())


class ReadsANumberBeforeABreak(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        n = float(x.sum().item())  # a graph break: the next graph would bake this request's number
        return self.lin(x * n)


def test_a_number_computed_from_the_input_before_a_graph_break_is_refused():
    with pytest.raises(Exception, match="before a graph break"):
        torch.compile(ReadsANumberBeforeABreak(), backend="secure_split")(torch.randn(2, 8))


def test_a_python_float_from_the_caller_is_refused_unless_declared_public():
    model, x = ScalesBy(), torch.randn(2, 8)
    with pytest.raises(LeakError, match="secret") as refused:
        secure_split.split(model, (x, 3.25))
    assert "3.25" not in str(refused.value) and "13" not in str(refused.value)  # the value is the secret
    with pytest.raises(Exception, match="secret"):  # the same through torch.compile (Dynamo wraps the error)
        torch.compile(model, backend="secure_split")(x, 3.25)
    program = secure_split.split(model, (x, 3.25), config=SplitConfig(public_inputs=("secret",)))
    torch.testing.assert_close(program(x, 3.25), model(x, 3.25))


def test_test_seed_warns_for_every_program_and_is_refused_by_bundles_and_workers(tmp_path, caplog):
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    with caplog.at_level(logging.WARNING, logger="secure_split"):
        secure_split.split(model, args, kwargs, SplitConfig(test_seed=0))
    assert sum("test_seed=0" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="test_seed"):
        secure_split.export_bundle(model, args, tmp_path / "b", SplitConfig(test_seed=0), kwargs)
    assert not (tmp_path / "b.key").exists() and not (tmp_path / "b").exists()  # a refused export leaves nothing
    with pytest.raises(TypeError):
        SplitConfig(seed=0)  # the old option that keyed masks from a public label is gone


def test_unseeded_programs_draw_unrelated_masks():
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    sent = []
    for _ in range(2):
        program = secure_split.split(model, args, kwargs, SplitConfig())
        with secure_split.trace_boundary() as trace:
            program(*args, **kwargs)
        sent.append(trace.to_gpu()[0].tensor)
        torch._dynamo.reset()
    assert (sent[0] != sent[1]).double().mean().item() > 0.99


def test_prefill_and_decode_never_share_a_keystream_even_under_a_test_seed():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).eval()
    ids = torch.randint(2, 128, (1, 8))
    generator = SplitGenerator(model, SplitConfig(test_seed=0), bucket=16)
    generator.generate(ids, 2)
    streams = [p.rng.random_bytes(32) for p in generator.programs.values()]
    assert len(streams) >= 2 and len(set(streams)) == len(streams)


def test_cmif_splits_bert_with_segment_ids_and_sanitizes_only_the_word_tokens():
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    kwargs["token_type_ids"] = torch.randint(0, 2, args[0].shape)
    program = secure_split.split(model, args, kwargs, SplitConfig(policy="cmif"))
    with torch.no_grad():
        expected = model(*args, **kwargs).last_hidden_state
    torch.testing.assert_close(program(*args, **kwargs).last_hidden_state, expected)
    assert [program.artifact.input_sources[i] for i in program.artifact.token_inputs] == ["args[0]"]
    protections = {c.name: c.protection for c in program.artifact.cuts if c.direction == "to_gpu"}
    assert "public" in protections.values() and "ε-DP, not masked" in protections.values()
    sanitized = secure_split.split(model, args, kwargs, SplitConfig(policy="cmif", epsilon=1.0))
    sanitized(*args, **kwargs)  # segment ids index a 2-row table: sanitizing them as words would fail here


class WithProfile(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, input_ids, profile):
        return self.lin(self.embed(input_ids) + profile)


def test_cmif_refuses_private_inputs_it_cannot_protect():
    ids = torch.randint(0, 100, (2, 4))
    with pytest.raises(CmifInputError, match="profile"):
        secure_split.split(WithProfile(), (ids, torch.randn(2, 4, 8)), config=SplitConfig(policy="cmif"))
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    kwargs["token_type_ids"] = torch.zeros_like(args[0])
    with pytest.raises(CmifInputError, match="token_type_ids"):
        secure_split.split(model, args, kwargs, SplitConfig(policy="cmif", public_inputs=("attention_mask",)))
